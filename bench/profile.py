"""Profile pyscsi-target under one bench load with py-spy; print the hottest functions.

    python3 -m bench.profile [--load rr4k_qd32] [--seconds 10] [--svg /tmp/flame.svg]

Starts the daemon alone (demo LUN pre-filled as in bench/run), runs the load while
`py-spy record --format raw` samples the daemon, then aggregates the collapsed stacks into
self time and inclusive time per file:function (idle time in the event loop's selector shows
up as `select`/`poll`/`run_once` self time and is reported separately).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading

from .loads import Runner, default_loads, tempdir
from .targets import GiB, fill_file, start_pyscsi

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")
IDLE = ("select", "poll", "epoll_wait", "_run_once", "wait", "_worker", "get")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/pyscsi_target/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/pyscsi_target/":
                path = "pyscsi_target/" + path
            break
    return f"{path}:{m.group('func')}"


def aggregate(raw: str, top: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if ".py:" not in leaf:  # a native frame: name the Python code that called into it
            caller = next((f for f in reversed(frames) if ".py:" in f), "")
            leaf = f"{leaf} <- {caller}" if caller else leaf
        self_t[leaf] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self time (top):"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    out += ["", "inclusive time (top, pyscsi_target/ and asyncio/uvloop only):"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(400)
            if f.startswith("pyscsi_target/") or "asyncio" in f or "uvloop" in f][:top]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.profile")
    ap.add_argument("--load", default="rr4k_qd32", help="a load id of bench/run")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--svg", help="also write a flame graph here")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    load = next(ld for ld in default_loads() if ld.id == args.load)
    work = tempdir()
    img = work / "main.img"
    fill_file(img, GiB)
    system = start_pyscsi(work, img)
    try:
        runner = Runner(work, args.seconds)
        runner.run(load, system)  # warm-up (and qemu-img count calibration)
        raw = work / "profile.txt"
        spy = ["py-spy", "record", "--pid", str(system.pid), "--rate", str(args.rate), "--duration",
               str(args.seconds), "--format", "raw", "-o", str(raw),
               *([] if args.native else ["--nonblocking"]),
               *(["--native"] if args.native else [])]
        prof = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sample_box = []
        t = threading.Thread(target=lambda: sample_box.append(runner.run(load, system)))
        t.start()
        _, err = prof.communicate(timeout=args.seconds + 60)
        t.join()
        s = sample_box[0]
        print(f"{load.title}: " + (f"{s.iops:,.0f} IOPS, {s.mbps:.1f} MB/s, target cpu {s.cpu_s:.2f}s"
                                   if s.ok else f"ERROR {s.error}"))
        if prof.returncode != 0 or not raw.exists():
            print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
            return 1
        print(aggregate(raw.read_text()))
        if args.svg:
            svg = ["py-spy", "record", "--pid", str(system.pid), "--rate", str(args.rate), "--duration",
                   str(args.seconds), "-o", args.svg, "--nonblocking"]
            prof = subprocess.Popen(svg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runner.run(load, system)
            prof.wait(timeout=args.seconds + 60)
            print(f"flame graph: {args.svg}")
    finally:
        system.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
