"""RBD rows: pyscsi-target over RBD, tgtd with Debian's tgt-rbd, and fio's rbd engine, side by side
on one image of one cluster.

    python3 -m bench.rbd [--quick] [--rounds N] [--seconds S] [--conf CEPH_CONF --pool rbd]

Without ``--conf`` it starts the loopback test cluster (tests/support/ceph.py: 1 monitor, 1 memstore
OSD).  One image (256 MiB, filled first so that reads reach the OSD) is exported by both targets at
once: pyscsi-target as an RBD extent (``rbd_cache`` off, completions through the eventfd), tgtd as
``--bstype rbd``.  Rows, round-major and in the order fio, pyscsi-target, tgtd within a row, so that a
burst of background load hits all three:

- ``rr4k_qd32``, ``rr4k_qd1``, ``sr128k_qd16``: iscsi-perf against the targets, fio
  ``randread``/``read`` with the same size and depth;
- ``rw4k_qd32``: qemu-img bench -w against the targets (bench/loads.py), fio ``randwrite``.

fio's rbd engine is librbd from C with nothing in between: the cluster's ceiling for one client.
The goal (issue 13): iSCSI 4K QD32 random read >= 0.7x fio-rbd and >= 1.5x tgt-rbd.  Results go to
``bench/results/rbd-<UTC stamp>.json`` and ``rbd-latest[-quick].json``.  On a shared machine the
figures move with the others' load: compare rows of one run, never runs of different days.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.daemon import BASE_IQN, Daemon  # noqa: E402
from support.tgtd import Lun  # noqa: E402

from bench.loads import Load, Runner, Sample  # noqa: E402
from bench.rbd_binding import fio  # noqa: E402
from bench.targets import System, tuned_tgtd  # noqa: E402
from pyscsi_target.backstore import librbd as L  # noqa: E402
from pyscsi_target.cluster.rados import ClusterSettings, Rados  # noqa: E402

SCHEMA = "pyscsi-target-bench-rbd/1"
HERE = Path(__file__).resolve().parent
MiB = 1 << 20
LOADS = [
    (Load("rr4k_qd32", "4 KiB random read QD32", "iscsi-perf", 4096, 32, True), "randread"),
    (Load("rr4k_qd1", "4 KiB random read QD1", "iscsi-perf", 4096, 1, True), "randread"),
    (Load("sr128k_qd16", "128 KiB sequential read QD16", "iscsi-perf", 131072, 16, False), "read"),
    (Load("rw4k_qd32", "4 KiB random write QD32", "qemu-img", 4096, 32, True, write=True), "randwrite"),
]
ORDER = ("fio-rbd", "pyscsi-target", "tgtd-rbd")


def log(msg: str) -> None:
    print(f"[bench-rbd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_image(conf: str, pool: str, name: str, size: int) -> None:
    """Create and fill the image: every object exists, so reads reach the OSD."""
    with Rados(ClusterSettings(conf=conf, options=(("rbd_cache", "false"),))) as rados, \
            rados.open_ioctx(pool) as io:
        L.create_image(io, name, size)
        image = L.Image(io, name)
        try:
            chunk = os.urandom(4 * MiB)
            for off in range(0, size, len(chunk)):
                image.write(chunk, off)
        finally:
            image.close()


def start_pyscsi(workdir: Path, conf: str, pool: str, image: str) -> System:
    d = Daemon(workdir / "pyscsi-state", log_level="warning", demo=False, extra_args=["--ceph-conf", conf])
    d.start()
    try:
        pg = d.rest("GET", "portal/")[0]
        e = d.rest("POST", "extent/", {"iscsi_target_extent_type": "RBD", "iscsi_target_extent_name": "bench",
                                       "iscsi_target_extent_path": f"{pool}/{image}"})
        t = d.rest("POST", "target/", {"iscsi_target_name": "rbdbench"})
        d.rest("POST", "targetgroup/", {"iscsi_target": t["id"], "iscsi_target_portalgroup": pg["id"],
                                        "iscsi_target_authtype": "None"})
        d.rest("POST", "targettoextent/", {"iscsi_target": t["id"], "iscsi_extent": e["id"], "iscsi_lunid": 0})
    except BaseException:
        d.stop()
        raise
    return System("pyscsi-target", d.host, d.port, f"{BASE_IQN}:rbdbench", {"main": 0}, 512, d)


def start_tgtd(workdir: Path, conf: str, pool: str, image: str) -> System:
    os.environ["CEPH_CONF"] = conf  # bs_rbd reads librados' default configuration
    t = tuned_tgtd([Lun(1, f"{pool}/{image}", bstype="rbd", bsopts=f"conf={conf}")],
                   "iqn.2026-11.org.pyscsi-target.bench:tgtd-rbd", workdir / "tgtd.log")
    return System("tgtd-rbd", t.host, t.port, t.iqn, {"main": 1}, 512, t)


def run_fio(conf: str, pool: str, image: str, load: Load, rw: str, seconds: int) -> Sample:
    try:
        r = fio(conf, pool, image, rw, f"{load.size // 1024}k", load.qd, seconds)
    except Exception as e:  # noqa: BLE001 - a failed sample, not a crashed bench
        return Sample(False, error=f"{type(e).__name__}: {e}")
    if not r:
        return Sample(False, error="fio is not installed")
    ios = int(r["ios"])
    return Sample(True, iops=r["iops"], bytes=ios * load.size, seconds=ios / r["iops"] if r["iops"] else 0.0,
                  cpu_s=r["cpu_us_per_io"] * ios / 1e6,
                  commands=[f"fio --ioengine=rbd --rw={rw} --bs={load.size // 1024}k --iodepth={load.qd}"])


def stop_all(systems: Iterable[System]) -> list[str]:
    """Stop every target; the errors, as result lines."""
    errors = []
    for system in systems:
        try:
            system.stop()
        except Exception as e:  # noqa: BLE001 - the others are stopped still
            errors.append(f"stopping {system.name}: {e}")
    return errors


def _median(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    if not ok:
        return {}
    cpu = [s.cpu_s / (s.iops * s.seconds) * 1e6 for s in ok if s.iops and s.seconds]
    return {"iops": round(statistics.median(s.iops for s in ok), 1),
            "mbps": round(statistics.median(s.mbps for s in ok), 2),
            "cpu_us_per_io": round(statistics.median(cpu), 1) if cpu else None, "rounds_ok": len(ok)}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'row':<13} " + " ".join(f"{n + ' IOPS':>20}" for n in ORDER) + f" {'vs fio':>7} {'vs tgtd':>8}"]
    for row in result["loads"]:
        med = row["median"]
        cells = " ".join(f"{med.get(n, {}).get('iops', float('nan')):>20,.0f}" for n in ORDER)
        lines.append(f"{row['id']:<13} {cells} {row['pyscsi_over_fio'] or float('nan'):>7.2f} "
                     f"{row['pyscsi_over_tgtd'] or float('nan'):>8.2f}")
    lines.append("(CPU us per I/O of each target process, median: "
                 + "; ".join(f"{row['id']} " + ", ".join(f"{n} {row['median'].get(n, {}).get('cpu_us_per_io')}"
                                                        for n in ORDER) for row in result["loads"]) + ")")
    return "\n".join(lines)


def bench(args: argparse.Namespace, conf: str, workdir: Path) -> dict[str, Any]:
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1 if args.quick else 5)
    image = f"bench-{os.getpid()}"
    result: dict[str, Any] = {"schema": SCHEMA, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "quick": args.quick, "config": {"rounds": rounds, "seconds": seconds,
                                                              "image_bytes": args.size_mib * MiB},
                              "loads": [], "errors": []}
    log(f"image {args.pool}/{image}: {args.size_mib} MiB, filling it")
    make_image(conf, args.pool, image, args.size_mib * MiB)
    systems: dict[str, System] = {}
    try:
        systems["pyscsi-target"] = start_pyscsi(workdir, conf, args.pool, image)
        systems["tgtd-rbd"] = start_tgtd(workdir, conf, args.pool, image)
        runner = Runner(workdir, seconds)
        warm = Load("warmup", "warm-up", "iscsi-perf", 4096, 32, True)
        for s in systems.values():
            Runner(workdir, 1).run(warm, s)
        samples: dict[str, dict[str, list[Sample]]] = {ld.id: {n: [] for n in ORDER} for ld, _rw in LOADS}
        for r in range(rounds):
            for ld, rw in LOADS:
                for name in ORDER:
                    s = (run_fio(conf, args.pool, image, ld, rw, seconds) if name == "fio-rbd"
                         else runner.run(ld, systems[name]))
                    samples[ld.id][name].append(s)
                    log(f"round {r + 1}/{rounds} {ld.id:<12} {name:<14} "
                        + (f"{s.iops:>9,.0f} IOPS {s.mbps:8.1f} MB/s" if s.ok else f"ERROR {s.error}"))
        for ld, rw in LOADS:
            med = {n: _median(samples[ld.id][n]) for n in ORDER}
            ours = med["pyscsi-target"].get("iops")
            ratio = {k: round(ours / med[n]["iops"], 3) if ours and med[n].get("iops") else None
                     for k, n in (("pyscsi_over_fio", "fio-rbd"), ("pyscsi_over_tgtd", "tgtd-rbd"))}
            result["loads"].append({
                "id": ld.id, "title": ld.title, "fio_rw": rw, "median": med, **ratio,
                "ok": all(s.ok for ss in samples[ld.id].values() for s in ss),
                "rounds": {n: [s.to_json() for s in samples[ld.id][n]] for n in ORDER}})
    except Exception as e:  # noqa: BLE001 - reported in the result
        log(f"bench aborted: {type(e).__name__}: {e}")
        result["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        result["errors"] += stop_all(systems.values())
        with Rados(ClusterSettings(conf=conf)) as rados, rados.open_ioctx(args.pool) as io:
            L.remove_image(io, image)
    rr = next((row for row in result["loads"] if row["id"] == "rr4k_qd32"), None)
    result["goal"] = {"rr4k_qd32_over_fio": rr and rr["pyscsi_over_fio"], "wanted_over_fio": 0.7,
                      "rr4k_qd32_over_tgtd": rr and rr["pyscsi_over_tgtd"], "wanted_over_tgtd": 1.5}
    result["ok"] = not result["errors"] and bool(result["loads"]) and all(row["ok"] for row in result["loads"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.rbd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke variant: 1 round x 1 s per row")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per run (default 5; quick 1)")
    ap.add_argument("--conf", help="an existing cluster's ceph.conf (default: start the loopback test cluster)")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pyscsi-bench-rbd-"))
    cluster = None
    try:
        conf = args.conf
        if conf is None:
            from support.ceph import CephCluster

            log("starting the loopback test cluster")
            cluster = CephCluster(workdir / "ceph").start()
            conf = str(cluster.conf)
        result = bench(args, conf, workdir)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    text = json.dumps(result, indent=1)
    (out / f"rbd-{stamp}.json").write_text(text)
    (out / ("rbd-latest-quick.json" if args.quick else "rbd-latest.json")).write_text(text)
    print(table(result))
    print(f"\nresults: {out / f'rbd-{stamp}.json'} (ok={result['ok']})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
