"""Micro-benchmark of the iSCSI transport alone: 4 KiB READ(10) commands framed by the
``PDUReader``, handled by ``Connection.handle`` and answered with one Data-In (status
collapsed) into the connection's ``WireOutput``, by a SCSI layer that completes inline.

    python3 -m bench.connection_micro [--ops 100000] [--rounds 7] [--batch 32] [--no-lun-stats]

Prints the best round's process CPU time per command.  It is the path every hook of
the workbench (fault injection, capture, metrics) sits on, so it shows what they cost
with nothing active: compare it before and after a change to the transport.
``--no-lun-stats`` leaves LUN 0 without its I/O counters (as for a LUN the engine does
not map), which takes the per-command metrics accounting out of the figure.
"""

from __future__ import annotations

import argparse
import struct
import time

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.connection import Connection
from pyscsi_target.iscsi.params import LoginResult, SessionParams, TargetInfo
from pyscsi_target.iscsi.session import Session
from pyscsi_target.iscsi.stats import IoStats
from pyscsi_target.scsi.task import Nexus, ScsiTask, TmfResult

IQN = "iqn.2026-11.org.pyscsi-target:bench"
BLOCK = bytes(4096)


class InlineDevice:
    """Completes every READ at once with the same 4 KiB (the transport's cost, not the LU's)."""

    def submit(self, task: ScsiTask) -> None:
        task.data_in = [BLOCK]
        task.data_in_len = 4096
        cb = task.on_done
        assert cb is not None
        cb(task)

    def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResult:
        return TmfResult.NO_SUCH_TASK


def _session(lun_stats: bool) -> tuple[Connection, Session]:
    params = SessionParams(max_recv_dsl=262144, max_xmit_dsl=262144)
    res = LoginResult(session_type="Normal", initiator_name="iqn.2026-11.org.pyscsi-target:i", initiator_alias=None,
                      target=TargetInfo(1, IQN, None, "None", []), isid=1, tsih=1, cid=0, cmdsn=1, statsn=1,
                      params=params)
    session = Session(res, 1, Nexus(1, res.initiator_name, 1, IQN, 1), InlineDevice(),  # type: ignore[arg-type]
                      queue_depth=128, io_stats={0: IoStats()} if lun_stats else {})  # LUN 0 mapped, as the engine does
    return Connection(session, 0, 1, conn_params=params), session


def run(ops: int, rounds: int, batch: int, lun_stats: bool = True) -> float:
    conn, session = _session(lun_stats)
    reader = P.PDUReader(max_data=262144, bufsize=1 << 20)
    cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0).ljust(16, b"\0")
    best = float("inf")
    sn = 1
    for _ in range(rounds):
        # Pre-encode the batches: only framing, handling and encoding are timed.
        batches = []
        for start in range(0, ops, batch):
            wire = bytearray()
            for i in range(start, min(ops, start + batch)):
                wire += P.ScsiCommand(read=True, edtl=4096, itt=i & 0x7FFFFFFF, cmdsn=sn, expstatsn=0,
                                      cdb=cdb).to_bytes()
                sn += 1
            batches.append(bytes(wire))
        t0 = time.process_time()
        for wire in batches:
            buf = reader.get_buffer()
            buf[: len(wire)] = wire
            for ev in reader.buffer_updated(len(wire)):
                conn.handle(ev)
            conn.output.take()
        elapsed = time.process_time() - t0
        if session.tasks:
            raise SystemExit(f"{len(session.tasks)} commands did not complete")
        best = min(best, elapsed / ops)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32, help="PDUs per receive batch (QD32)")
    ap.add_argument("--no-lun-stats", action="store_true", help="no I/O counters for the LUN (no metrics cost)")
    args = ap.parse_args()
    per_op = run(args.ops, args.rounds, args.batch, not args.no_lun_stats)
    print(f"4 KiB READ(10) through PDUReader + Connection.handle + Data-In: {per_op * 1e6:.3f} us/command "
          f"(best of {args.rounds} x {args.ops}, {args.batch} per batch)")


if __name__ == "__main__":
    main()
