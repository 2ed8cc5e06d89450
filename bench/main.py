"""bench/run: pyscsi-target against Debian tgtd, side by side on loopback.  See bench/README.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .kernel import kernel_jobs, run_kernel
from .loads import Load, Runner, Sample, default_loads, tempdir
from .scaling import run_scaling
from .targets import TGTD_PARAMS, GiB, System, fill_file, start_pyscsi, start_tgtd

HERE = Path(__file__).resolve().parent
SCHEMA = "pyscsi-target-bench/1"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    if not ok:
        return {}
    cpg = [s.cpu_s_per_gb for s in ok if s.cpu_s_per_gb is not None]
    return {"iops": round(statistics.median(s.iops for s in ok), 1),
            "mbps": round(statistics.median(s.mbps for s in ok), 2),
            "cpu_s_per_gb": round(statistics.median(cpg), 4) if cpg else None,
            "rounds_ok": len(ok)}


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    started = dt.datetime.now(dt.UTC)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir).resolve() if args.workdir else tempdir()
    workdir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    seconds = args.seconds or (1 if quick else 4)
    loads = default_loads()
    only = set(args.only.split(",")) if args.only else None
    if only is not None:
        loads = [ld for ld in loads if ld.id in only]
    kernel = args.kernel and (only is None or any(j.id in only for j in kernel_jobs()))
    session_steps = [1, 8] if quick else [1, 64, 256]
    target_counts = [1, 10] if quick else [1, 100, 1000]
    result: dict[str, Any] = {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"), "quick": quick,
        "machine": report.machine(),
        "config": {"rounds": rounds, "seconds": seconds, "order": "round-major, A then B within each row",
                   "lun_size": GiB, "tgtd_params": TGTD_PARAMS, "session_steps": session_steps,
                   "target_counts": target_counts},
        "loads": [], "scaling": {}, "errors": [],
    }
    if kernel:
        result["kernel"] = {}
    systems: dict[str, System] = {}
    try:
        if loads:
            _libiscsi_rows(result, systems, workdir, loads, rounds, seconds)
        if kernel:
            log("kernel initiator rows (fio in a qemu guest over a tap link)")
            result["kernel"] = run_kernel(workdir, quick=quick, rounds=args.kernel_rounds,
                                          seconds=args.kernel_seconds, only=only, log=log)
            if not result["kernel"]["ok"]:
                log(f"kernel rows failed: {result['kernel']['error']}")
        if not args.no_scaling:
            result["scaling"] = run_scaling(["pyscsi-target", "tgtd"], workdir, session_steps=session_steps,
                                            target_counts=target_counts, repeat=3 if quick else 5, log=log,
                                            sequential=10 if quick else 100, storm_seconds=1.0 if quick else 5.0)
    except Exception as e:
        log(f"bench aborted: {type(e).__name__}: {e}")
        result["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        for s in systems.values():
            try:
                s.stop()
            except Exception as e:
                result["errors"].append(f"stopping {s.name}: {e}")
        log_tail = _daemon_log_problems(workdir)
        if log_tail:
            result["pyscsi_log_problems"] = log_tail
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["duration_s"] = round(time.perf_counter() - t_start, 1)
    result["ok"] = (not result["errors"] and all(r["ok"] for r in result["loads"])
                    and all(v.get("ok") for part in result["scaling"].values() for v in part.values())
                    and (not kernel or result["kernel"].get("ok", False)))
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "")
    js = json.dumps(result, indent=1)
    (out_dir / f"{stamp}.json").write_text(js)
    (out_dir / ("latest-quick.json" if quick else "latest.json")).write_text(js)
    err = report.chart(result, out_dir / (f"{stamp}.png"))
    if err:
        log(f"chart skipped: {err}")
    else:
        shutil.copyfile(out_dir / f"{stamp}.png", out_dir / ("latest-quick.png" if quick else "latest.png"))
    print(report.table(result))
    print(f"\nresults: {out_dir / (stamp + '.json')}  ({result['duration_s']} s, ok={result['ok']})")
    return 0 if result["ok"] else 1


def _libiscsi_rows(result: dict[str, Any], systems: dict[str, System], workdir: Path,
                   loads: list[Load], rounds: int, seconds: int) -> None:
    """The libiscsi rows: both targets on loopback, every load A then B, rounds outermost."""
    log(f"workdir {workdir}; pre-filling a 1 GiB image")
    main_img = workdir / "tgtd-main.img"
    fill_file(main_img, GiB)
    log("starting tgtd")
    systems["tgtd"] = start_tgtd(workdir, main_img)
    log("starting pyscsi-target (copying the same image into its demo LUN)")
    systems["pyscsi-target"] = start_pyscsi(workdir, main_img)
    for s in systems.values():
        log(f"  {s.name}: pid {s.pid}, {s.url()} (block size {s.block_size})")
    order = ["pyscsi-target", "tgtd"]
    runner = Runner(workdir, seconds)
    samples: dict[str, dict[str, list[Sample]]] = {ld.id: {n: [] for n in order} for ld in loads}
    warm = Load("warmup", "warm-up", "iscsi-perf", 4096, 32, True)
    for name in order:  # first-use costs (thread pools, page cache of the image) stay out of round 1
        w = Runner(workdir, 1).run(warm, systems[name])
        if not w.ok:
            log(f"warm-up on {name} failed: {w.error}")
    for r in range(rounds):
        for ld in loads:
            for name in order:
                s = runner.run(ld, systems[name])
                samples[ld.id][name].append(s)
                log(f"round {r + 1}/{rounds} {ld.id:<16} {name:<14} "
                    + (f"{s.iops:>10,.0f} IOPS {s.mbps:8.1f} MB/s cpu {s.cpu_s:6.2f}s" if s.ok
                       else f"ERROR {s.error}"))
    for ld in loads:
        result["loads"].append(_load_result(ld, samples[ld.id]))
    result["derived"] = _derived(result["loads"])
    for name in order:
        systems.pop(name).stop()  # the kernel and scaling rows start their own


def _load_result(ld: Load, samples: dict[str, list[Sample]]) -> dict[str, Any]:
    med = {n: _median(v) for n, v in samples.items()}
    a, b = med.get("pyscsi-target", {}).get("iops"), med.get("tgtd", {}).get("iops")
    ok = all(s.ok for v in samples.values() for s in v)
    return {"id": ld.id, "title": ld.title, "tool": ld.tool, "size": ld.size, "qd": ld.qd, "sessions": ld.sessions,
            "random": ld.random, "write": ld.write, "lun": ld.lun, "header_digest": ld.header_digest,
            "note": ld.note, "ok": ok, "ratio": round(a / b, 3) if a and b else None, "median": med,
            "rounds": {n: [s.to_json() for s in v] for n, v in samples.items()}}


def _derived(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Header-digest cost (1 - IOPS_on/IOPS_off) and 1 TiB/1 GiB IOPS, per target."""
    by = {r["id"]: r for r in rows}
    out: dict[str, dict[str, float | None]] = {}

    def iops(rid: str, name: str) -> float | None:
        return by.get(rid, {}).get("median", {}).get(name, {}).get("iops")

    for label, num, den, fn in (("header_digest_cost", "rr4k_qd32_hd", "rr4k_qd32", lambda x, y: 1 - x / y),
                                ("iops_1tib_over_1gib", "rr4k_qd32_sp1t", "rr4k_qd32_sp1g", lambda x, y: x / y)):
        vals = {}
        for name in ("pyscsi-target", "tgtd"):
            x, y = iops(num, name), iops(den, name)
            vals[name] = round(fn(x, y), 3) if x and y else None
        if any(v is not None for v in vals.values()):
            out[label] = vals
    return out


def _daemon_log_problems(workdir: Path) -> list[str]:
    lines: list[str] = []
    for p in workdir.glob("pyscsi-*/daemon.log"):
        for line in p.read_text(errors="replace").splitlines():
            if any(w in line for w in ("ERROR", "CRITICAL", "Traceback")):
                lines.append(f"{p.parent.name}: {line}")
    return lines[:50]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke variant: 1 round x 1 s per load, small scaling")
    ap.add_argument("--rounds", type=int, help="A/B rounds per load (default 3; quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per run (default 4; quick 1)")
    ap.add_argument("--only", help="comma-separated load ids (see bench/README.md)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the idle-session and target-count rows")
    ap.add_argument("--kernel", action="store_true",
                    help="add the kernel-initiator rows (fio in a qemu guest on a tap link; needs root)")
    ap.add_argument("--kernel-rounds", type=int, help="kernel rows: rounds (default 3; quick 1)")
    ap.add_argument("--kernel-seconds", type=int, help="kernel rows: seconds per fio run (default 6; quick 2)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory (default bench/results)")
    ap.add_argument("--workdir", help="scratch directory for images and state (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return run(ap.parse_args(argv))
