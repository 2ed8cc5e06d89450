"""Smoke test of bench/run --quick: every load completes without errors against both targets, and the
result JSON is well formed.  No timing assertions: the numbers depend on the machine and its load."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("iscsi-perf", "qemu-img", "tgtd", "tgtadm", "cc")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)} (Debian libiscsi-bin, qemu-utils, tgt, gcc)")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run"), "--quick", "--out", str(out),
                        "--workdir", str(work)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    latest = out / "latest-quick.json"
    assert latest.exists(), f"no JSON written; rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r, json.loads(latest.read_text()), out


def test_every_load_completes_without_errors(quick_result) -> None:
    r, res, _ = quick_result
    failures = [f"{row['id']}/{name}: {s['error']}" for row in res["loads"] for name, rounds in row["rounds"].items()
                for s in rounds if not s["ok"]]
    assert not failures, "\n".join(failures)
    assert not res["errors"], res["errors"]
    for part in ("idle_memory", "targets"):
        for name, v in res["scaling"][part].items():
            assert v["ok"], f"{part}/{name}: {v['error']}"
    assert res["ok"] is True
    assert r.returncode == 0, r.stderr[-3000:]


def test_json_is_well_formed(quick_result) -> None:
    _, res, out = quick_result
    assert res["schema"] == "pyscsi-target-bench/1"
    assert res["quick"] is True
    assert {"nproc", "cpu_model", "kernel", "mem_gib"} <= set(res["machine"])
    ids = [row["id"] for row in res["loads"]]
    assert ids == sorted(set(ids), key=ids.index), "duplicate load ids"
    assert {"rr4k_qd1", "rr4k_qd32", "sr128k_qd16", "rw4k_qd32", "sw128k_qd16", "rr4k_qd32_hd",
            "rr4k_32sess", "rr4k_qd32_sp1g", "rr4k_qd32_sp1t"} <= set(ids)
    for row in res["loads"]:
        assert set(row["rounds"]) == {"pyscsi-target", "tgtd"}
        for name, rounds in row["rounds"].items():
            assert len(rounds) == res["config"]["rounds"]
            for s in rounds:
                assert all(_number(s[k]) for k in ("iops", "bytes", "seconds", "cpu_s", "mbps")), s
                assert s["iops"] > 0 and s["bytes"] > 0
            med = row["median"][name]
            assert _number(med["iops"]) and _number(med["mbps"])
        assert _number(row["ratio"])
    mem = res["scaling"]["idle_memory"]
    for name in ("pyscsi-target", "tgtd"):
        steps = [p["sessions"] for p in mem[name]["points"]]
        assert steps == res["config"]["session_steps"]
        pts = res["scaling"]["targets"][name]["points"]
        assert [p["targets"] for p in pts] == res["config"]["target_counts"]
        assert all(_number(p["discovery_s"]) and _number(p["startup_s"]) for p in pts)
    # The timestamped copy and the chart sit beside latest-quick.json.
    assert len(list(out.glob("2*Z-quick.json"))) == 1
    try:
        import matplotlib  # noqa: F401  (test extra; the chart is skipped without it)
    except ImportError:
        return
    assert (out / "latest-quick.png").stat().st_size > 1000
