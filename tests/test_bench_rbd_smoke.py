"""Smoke test of ``python3 -m bench.rbd --quick``: the three RBD rows (fio's rbd engine, pyscsi-target over
RBD, tgtd with tgt-rbd) complete on one image of the loopback cluster, and the result JSON is well formed.
No timing assertions: the numbers depend on the machine and its load."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.ceph import have_ceph

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("iscsi-perf", "qemu-img", "tgtd", "tgtadm", "fio")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or bool(have_ceph())
                                or not Path("/usr/lib/tgt/backing-store/bs_rbd.so").exists(),
                                reason="needs libiscsi-bin, qemu-utils, tgt + tgt-rbd, fio and the Ceph daemons")


def test_rbd_rows_side_by_side(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.rbd", "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    latest = tmp_path / "rbd-latest-quick.json"
    assert latest.exists(), f"no JSON written; rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(latest.read_text())
    assert res["schema"] == "pyscsi-target-bench-rbd/1" and not res["errors"], res["errors"]
    assert [row["id"] for row in res["loads"]] == ["rr4k_qd32", "rr4k_qd1", "sr128k_qd16", "rw4k_qd32"]
    for row in res["loads"]:
        assert row["ok"], [s["error"] for ss in row["rounds"].values() for s in ss if not s["ok"]]
        for name in ("fio-rbd", "pyscsi-target", "tgtd-rbd"):
            med = row["median"][name]
            assert med["iops"] > 0 and math.isfinite(med["mbps"]), (row["id"], name, med)
        assert row["pyscsi_over_fio"] > 0 and row["pyscsi_over_tgtd"] > 0
    assert res["ok"] and r.returncode == 0, r.stderr[-2000:]
    assert "rr4k_qd32" in r.stdout and "vs fio" in r.stdout
