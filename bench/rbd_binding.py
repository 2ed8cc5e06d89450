"""librbd from Python: which binding, and how completions reach the event loop.

    python3 -m bench.rbd_binding [--seconds 5] [--conf CEPH_CONF --pool rbd --image NAME]

Without ``--conf`` it starts a throwaway loopback cluster (tests/support/ceph.py) and a 128 MiB
image, filled first so that reads reach the OSD (reads of never-written objects are answered
from the object map without one).  Rows, each bounded by ``--seconds`` and a maximum count:

- ``ctypes+eventfd``: backstore/librbd.py as the backstore uses it (completions queued in
  librbd, one eventfd wake-up drains a batch with rbd_poll_io_events);
- ``ctypes+callback``: the same calls, each completion a ctypes callback on a librbd thread
  that takes the GIL and calls ``call_soon_threadsafe`` (one loop wake-up per I/O at worst);
- ``python3-rbd``: Debian's Cython binding (``Image.aio_read``), callback + call_soon_threadsafe;
  only where /usr/lib/python3/dist-packages holds a build for this interpreter's ABI;
- ``fio-rbd``: fio's rbd engine, the ceiling from C.

Reported: IOPS, MB/s, the CPU time of the whole process (every thread, librbd's included) per
I/O, and the part of it spent on the event loop's thread (our Python per I/O).  On a shared
machine the figures move with the others' load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pyscsi_target.backstore import librbd as L  # noqa: E402
from pyscsi_target.cluster.rados import ClusterSettings, Rados  # noqa: E402

MAX_IOS = 2_000_000
Submit = Callable[[bytearray, int, Callable[[int], None]], None]


def run_loop_bench(submit: Submit, size: int, bs: int, qd: int, seconds: float, sequential: bool,
                   write: bool) -> dict[str, float]:
    """Keep ``qd`` I/Os of ``bs`` bytes in flight for ``seconds`` on an asyncio loop."""
    blocks = size // bs
    bufs = [bytearray(os.urandom(bs) if write else bs) for _ in range(qd)]
    state = {"done": 0, "inflight": 0, "next": 0, "err": 0}
    loop = asyncio.get_event_loop()
    finished = loop.create_future()
    deadline = time.monotonic() + seconds

    def issue(k: int) -> None:
        if sequential:
            blk = state["next"] % blocks
            state["next"] += 1
        else:
            blk = random.randrange(blocks)
        state["inflight"] += 1
        submit(bufs[k], blk * bs, partial(complete, k))

    def complete(k: int, r: int) -> None:
        state["inflight"] -= 1
        state["done"] += 1
        if r < 0:
            state["err"] += 1
        if state["done"] < MAX_IOS and time.monotonic() < deadline:
            issue(k)
        elif state["inflight"] == 0 and not finished.done():
            finished.set_result(None)

    cpu0, t0, own0 = time.process_time(), time.perf_counter(), time.thread_time()
    for k in range(qd):
        issue(k)
    loop.run_until_complete(finished)
    wall, cpu, own = time.perf_counter() - t0, time.process_time() - cpu0, time.thread_time() - own0
    n = state["done"]
    if state["err"]:
        raise RuntimeError(f"{state['err']} I/Os failed")
    return {"iops": n / wall, "mbps": n * bs / wall / 1e6, "cpu_us_per_io": cpu / n * 1e6,
            "loop_us_per_io": own / n * 1e6, "ios": n}


class CallbackImage:
    """The ctypes binding with one callback per completion (the alternative to the eventfd)."""

    CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

    def __init__(self, image: L.Image, loop: asyncio.AbstractEventLoop) -> None:
        self.image = image
        self.loop = loop
        self.lib = L.lib()
        self.pending: dict[int, tuple[Callable[[int], None], object]] = {}
        self.cb = self.CB(self._called)
        self.create = self.lib.aio_create_completion_cb

    def _called(self, comp: int | None, _arg: int | None) -> None:
        self.loop.call_soon_threadsafe(self._finish, comp or 0)

    def _finish(self, c: int) -> None:
        r = self.lib.aio_get_return_value(c)
        self.lib.aio_release(c)
        self.pending.pop(c)[0](r)

    def submit(self, write: bool) -> Submit:
        def go(buf: bytearray, off: int, done: Callable[[int], None]) -> None:
            comp = ctypes.c_void_p()
            self.create(None, self.cb, ctypes.byref(comp))
            addr, keep = L.pin(buf)
            self.pending[comp.value or 0] = (done, keep)
            fn = self.lib.aio_write if write else self.lib.aio_read
            fn(self.image.handle, off, len(buf), addr, comp)
        return go


def debian_rbd() -> Any:
    """Debian's python3-rbd/python3-rados, if built for this interpreter's ABI."""
    dist = "/usr/lib/python3/dist-packages"
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    if not os.path.isdir(dist) or not any(f.startswith("rbd.") and tag in f for f in os.listdir(dist)):
        return None
    sys.path.append(dist)  # appended: it must not shadow this interpreter's own packages
    try:
        import rados  # type: ignore[import-not-found]
        import rbd  # type: ignore[import-not-found]
    except ImportError:
        return None
    return rados, rbd


def fio(conf: str, pool: str, image: str, rw: str, bs: str, qd: int, seconds: float) -> dict[str, float]:
    if shutil.which("fio") is None:
        return {}
    args = ["fio", "--name=b", "--ioengine=rbd", "--clientname=admin", f"--pool={pool}", f"--rbdname={image}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--direct=1", f"--runtime={seconds}", "--time_based",
            "--output-format=json", "--numjobs=1"]
    env = {**os.environ, "CEPH_CONF": conf}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if rw in ("read", "randread") else job["write"]
    # fio's own CPU figures count its job thread only; the rusage of the child counts librbd's too
    # (and fio's start-up and image open, a small share of a run of several seconds).
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    ios = max(1, side["total_ios"])
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6, "cpu_us_per_io": cpu_s / ios * 1e6,
            "loop_us_per_io": float("nan"), "ios": ios}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conf")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--image")
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cluster = None
    if args.conf is None:
        from support.ceph import CephCluster

        cluster = CephCluster(Path(tempfile.mkdtemp(prefix="ceph-bench-"))).start()
        args.conf = str(cluster.conf)
    try:
        return bench(args)
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)


def bench(args: argparse.Namespace) -> int:
    rados = Rados(ClusterSettings(conf=args.conf, options=(("rbd_cache", "false"),)))
    io = rados.open_ioctx(args.pool)
    made = args.image is None
    name = args.image or f"bench-{os.getpid()}"
    if made:
        L.create_image(io, name, args.size_mib << 20)
    image = L.Image(io, name)
    size = image.size()
    chunk = os.urandom(4 << 20)
    for off in range(0, size, len(chunk)):  # fill: every object exists, reads go to the OSD
        image.write(chunk[: min(len(chunk), size - off)], off)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    image.start_aio(loop)
    rows: list[tuple[str, str, dict[str, float]]] = []
    cases = [("4K randread QD32", 4096, 32, False, False), ("128K seq read QD8", 128 << 10, 8, True, False),
             ("128K seq write QD8", 128 << 10, 8, True, True)]

    def eventfd_submit(write: bool) -> Submit:
        if write:
            return lambda buf, off, done: image.aio_write([buf], off, done)
        return image.aio_read

    # A second handle without the event socket: librbd would queue its completions there too.
    cb = CallbackImage(L.Image(io, name), loop)
    for label, bs, qd, seq, write in cases:
        w0, r0 = image.wakeups, image.reaped
        rows.append(("ctypes+eventfd", label, run_loop_bench(eventfd_submit(write), size, bs, qd, args.seconds, seq,
                                                              write)))
        rows[-1][2]["per_wakeup"] = (image.reaped - r0) / max(1, image.wakeups - w0)
        if not write:
            rows.append(("ctypes+callback", label, run_loop_bench(cb.submit(False), size, bs, qd, args.seconds, seq,
                                                                   False)))
    deb = debian_rbd()
    if deb is not None:
        drados, drbd = deb
        cl = drados.Rados(conffile=args.conf)
        cl.conf_set("rbd_cache", "false")
        cl.connect()
        dio = cl.open_ioctx(args.pool)
        dimg = drbd.Image(dio, name)

        def deb_submit(buf: bytearray, off: int, done: Callable[[int], None]) -> None:
            def cb_(comp: Any, data: bytes) -> None:
                loop.call_soon_threadsafe(done, comp.get_return_value())
            dimg.aio_read(off, len(buf), cb_)

        for label, bs, qd, seq, _write in cases[:2]:
            rows.append(("python3-rbd", label, run_loop_bench(deb_submit, size, bs, qd, args.seconds, seq, False)))
        dimg.close()
        dio.close()
        cl.shutdown()
    image.stop_aio()
    image.close()
    cb.image.close()
    loop.close()
    fio_cases = [("4K randread QD32", "randread", "4k", 32), ("128K seq read QD8", "read", "128k", 8),
                 ("128K seq write QD8", "write", "128k", 8)]
    for label, rw, fbs, qd in fio_cases:
        res = fio(args.conf, args.pool, name, rw, fbs, qd, args.seconds)
        if res:
            rows.append(("fio-rbd", label, res))
    if made:
        L.remove_image(io, name)
    io.close()
    rados.shutdown()
    if args.json:
        print(json.dumps([{"binding": b, "case": c, **r} for b, c, r in rows], indent=1))
    else:
        print(f"{'binding':<16} {'case':<20} {'IOPS':>9} {'MB/s':>8} {'CPU us/IO':>10} {'loop us/IO':>11}")
        for b, c, r in rows:
            batch = f"  ({r['per_wakeup']:.1f} completions per wake-up)" if "per_wakeup" in r else ""
            print(f"{b:<16} {c:<20} {r['iops']:9.0f} {r['mbps']:8.1f} {r['cpu_us_per_io']:10.1f} "
                  f"{r['loop_us_per_io']:11.1f}{batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
