"""CHAP guessing rate against the daemon (issue 10, defect 7): how many secrets a guesser tries,
and how many of those the target really checks, per second.

    python3 -m bench.chap_guesses --clients 3 --seconds 10

Starts the daemon (tests/support/daemon.py) at debug log level with one CHAP target, then
``--clients`` processes log in again and again with wrong secrets, each from the same
address (127.0.0.1) under its own initiator name.  Tries/s is what the clients managed;
checked/s counts the daemon's "CHAP response checked and refused" debug lines (a daemon
without the backoff checks every try).  Bounded: ``--seconds`` per run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures live in tests/support, imported as `support`

from support import rawclient as R  # noqa: E402
from support.daemon import Daemon  # noqa: E402

USER, SECRET = "guessed", "guessedsecret1"


def _guess(host: str, port: int, iqn: str, index: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    name = f"iqn.2026-11.org.pyscsi-target.bench:guesser{index}"
    tries = refused = other = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with R.RawClient(host, port, initiator=name) as c:
            status = c.login(iqn, chap=(USER, f"wrong-{index}-{tries:08d}")).status
        tries += 1
        if status == 0x0201:
            refused += 1
        else:
            other += 1
    out.put((tries, refused, other))


def measure(d: Daemon, iqn: str, clients: int, seconds: float) -> dict[str, float]:
    mark = d.log_mark()
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_guess, args=(d.host, d.port, iqn, i, seconds, q)) for i in range(clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    elapsed = time.monotonic() - t0
    log = d.log_text()[mark:]
    tries = sum(r[0] for r in results)
    checked = log.count("CHAP response checked and refused")
    unchecked = log.count("CHAP response not checked")
    if not checked and not unchecked:
        checked = tries  # a daemon without the backoff (no such lines) checks every try
    return {"clients": clients, "seconds": round(elapsed, 1), "tries": tries,
            "tries_per_s": round(tries / elapsed), "checked": checked, "checked_per_s": round(checked / elapsed, 2),
            "not_0201": sum(r[2] for r in results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.chap_guesses", description=__doc__)
    ap.add_argument("--clients", type=int, action="append", help="guessing processes (repeatable; default 1 and 3)")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chap-guesses-") as tmp:
        d = Daemon(Path(tmp), log_level="debug").start()
        try:
            d.add_auth(5, USER, SECRET)
            iqn = d.add_target("guessed", auth_type="CHAP", auth_group=5)
            for n in args.clients or [1, 3]:
                print(measure(d, iqn, n, args.seconds), flush=True)
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
