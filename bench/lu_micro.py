"""Micro-benchmark of the SCSI layer alone: a 4 KiB READ(10) that hits the page cache,
submitted to ScsiDevice.submit and completed inline (no iSCSI, no sockets).

    python3 -m bench.lu_micro [--ops 100000] [--rounds 7]

Prints the best round's CPU time per command (process CPU time, which other processes on
a shared machine disturb far less than wall time; the path is single-threaded and never
waits).  It measures routing, prechecks, the LU's read path and the backstore's RWF_NOWAIT
read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import tempfile
import time

from pyscsi_target.backstore.file import FileBackstore
from pyscsi_target.scsi.device import ScsiDevice
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.registry import ScsiRegistry
from pyscsi_target.scsi.settings import LuSettings
from pyscsi_target.scsi.task import Nexus, ScsiTask, TaskAttr


async def run(ops: int, rounds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lu.img")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
            f.write(os.urandom(1 << 20))  # the first MiB is data in the page cache
        registry = ScsiRegistry()
        lu = LogicalUnit(LuSettings("bench", bytes.fromhex("3000000000000001"), "bench"),
                         FileBackstore(path, 64 << 20), registry)
        dev = ScsiDevice("iqn.2026-11.org.pyscsi-target:bench", registry)
        dev.set_luns({0: lu})
        nexus = Nexus(1, "iqn.2026-11.org.pyscsi-target:initiator", 1, dev.target_iqn, 1)
        dev.add_nexus(nexus)
        done: list[ScsiTask] = []
        dev.submit(ScsiTask(nexus, 0, bytes(16), 0, TaskAttr.SIMPLE, 0, None, done.append))  # the UA
        cdbs = [struct.pack(">BBIBHB", 0x28, 0, (i * 8) % 2048, 0, 8, 0).ljust(16, b"\0") for i in range(256)]
        best = float("inf")
        for _ in range(rounds):
            done.clear()
            t0 = time.process_time()
            for i in range(ops):
                dev.submit(ScsiTask(nexus, 0, cdbs[i & 255], i, TaskAttr.SIMPLE, 4096, None, done.append))
            elapsed = time.process_time() - t0
            if len(done) != ops or any(t.status for t in done):
                raise SystemExit("a READ did not complete inline with GOOD: is the file in the page cache?")
            best = min(best, elapsed / ops)
        dev.close()
        lu.close()
        return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    per_op = asyncio.run(run(args.ops, args.rounds))
    print(f"4 KiB READ(10), page-cache hit, ScsiDevice.submit -> GOOD inline: {per_op * 1e6:.2f} us/command "
          f"(best of {args.rounds} x {args.ops})")


if __name__ == "__main__":
    main()
