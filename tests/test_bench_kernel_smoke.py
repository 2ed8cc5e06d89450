"""Smoke test of the kernel-initiator rows (``bench/run --kernel``): a guest logs in to both targets over
a tap link in a namespace of its own and runs two short fio jobs against each; the JSON carries guest
MB/s, each target's CPU s/GB and both ratios.  No timing assertions: the figures depend on the machine."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("qemu-system-x86_64", "tgtd", "tgtadm", "ip")
JOBS = ("k_rr4k_qd32", "k_sw128k_qd16")

pytestmark = [
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (Debian qemu-system-x86, tgt, iproute2)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the tap namespace and the guest image need root"),
]


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_kernel_rows_run_against_both_targets(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run"), "--quick", "--kernel", "--no-scaling",
                        "--only", ",".join(JOBS), "--kernel-seconds", "2", "--out", str(out), "--workdir", str(work)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    latest = out / "latest-quick.json"
    assert latest.exists(), f"no JSON written; rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads(latest.read_text())
    kern = res["kernel"]
    assert kern["ok"], f"{kern['error']}\n{r.stderr[-3000:]}"
    assert r.returncode == 0 and res["ok"], r.stderr[-3000:]
    assert res["loads"] == []  # --only named kernel rows alone
    assert [row["id"] for row in kern["rows"]] == list(JOBS)
    for row in kern["rows"]:
        for name in ("pyscsi-target", "tgtd"):
            med = row["median"][name]
            assert _positive(med["mbps"]) and _positive(med["cpu_s_per_gb"]), (row["id"], name, med)
            (sample,) = row["rounds"][name]
            assert sample["bytes"] > 0 and sample["seconds"] >= 1.5, sample
        assert _positive(row["ratio"]) and _positive(row["cpu_ratio"])
    # Both targets were reached on their own namespace addresses, with the same negotiated limits.
    disks = kern["guest"]["disks"]
    assert set(disks) == {"pyscsi-target", "tgtd"}
    for text in disks.values():
        assert "max_recv_dlength=262144" in text and "initial_r2t=0" in text, disks
    # Block Limits VPD: Linux sizes requests and readahead from our 1 MiB OPTIMAL TRANSFER LENGTH.
    assert "max_sectors_kb=1024 " in disks["pyscsi-target"] and "optimal_io_size=1048576 " in disks["pyscsi-target"]
    assert "CPU s/GB" in r.stdout and "kernel load" in r.stdout
