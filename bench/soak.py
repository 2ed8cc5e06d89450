"""Soak campaign (issue 10): 256 sessions of mixed, self-checking I/O for 10 minutes, outside CI.

    python3 -m bench.soak                       # 256 sessions x 600 s on 4 LUNs
    python3 -m bench.soak --sessions 64 --seconds 120

Starts the daemon (tests/support/daemon.py) with the demo LUN and three more 256 MiB LUNs,
runs tests/support/soak.py against it (WRITE / READ compared / VERIFY BYTCHK / SYNCHRONIZE
CACHE, every block written read back at the end), samples the daemon's RSS, threads and
descriptors every 5 s, and writes the report to bench/results/soak-<UTC>.json.  Exit 0 only
with no error, nothing lost, a clean daemon log and RSS flat over the last third (growth
under 5% of the RSS or 16 MiB).  The short form runs in ``make test``: tests/test_soak.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the fixtures live in tests/support, imported as `support`

from support.daemon import Daemon  # noqa: E402
from support.soak import soak  # noqa: E402


def flat(report_rss: list[tuple[float, float]], growth: float) -> bool:
    last = report_rss[-1][1] if report_rss else 0.0
    return growth < max(16.0, 0.05 * last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--luns", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4, help="commands in flight per session")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        d = Daemon(Path(tmp)).start()
        try:
            if args.luns > 1:
                d.add_luns(args.luns - 1, filesize="256MB")
            assert d.proc is not None
            say(f"daemon pid {d.proc.pid}; {args.sessions} sessions x {args.seconds:.0f} s on {args.luns} LUNs")
            report = soak(d.proc.pid, d.host, d.port, d.iqn, sessions=args.sessions, seconds=args.seconds,
                          luns=args.luns, depth=args.depth, progress=say)
            bad = d.bad_log_lines()
        finally:
            d.stop()
    summary = report.summary()
    summary["daemon_log_problems"] = bad[:20]
    summary["rss_flat"] = flat(report.rss_mib, report.rss_growth_mib())
    doc = {"started": started.isoformat(timespec="seconds"), "summary": summary,
           "errors": report.counts.errors[:100], "rss_mib": report.rss_mib, "threads": report.threads,
           "fds": report.fds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=1))
    say(json.dumps(summary))
    say(f"report: {path}")
    ok = not report.counts.errors and not bad and summary["rss_flat"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
