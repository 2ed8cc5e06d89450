"""Hostile initiators for the hardening tests (issue 10), each bounded in count and time.

- ``dataless_writes``: sessions that send large WRITEs and never the data they announce.
- ``process_rss``: a process's resident set, to measure what an attack costs the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import rawclient as R

P = R.P


def process_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class DatalessWrites:
    """What the target answered the hostile WRITEs: R2Ts, or a SCSI status without data."""

    clients: list[R.RawClient] = field(default_factory=list)
    r2ts: int = 0
    statuses: list[int] = field(default_factory=list)  # SCSI status of WRITEs refused at once

    def close(self) -> None:
        for c in self.clients:
            c.close()


def dataless_writes(host: str, port: int, iqn: str, *, sessions: int = 6, writes: int = 4, size: int = 64 << 20,
                    unsolicited: bool = False, almost_all_data: bool = False, timeout: float = 10.0,
                    settle: float = 1.0) -> DatalessWrites:
    """``sessions`` sessions each send ``writes`` WRITE(16)s of ``size`` bytes and no data.

    With ``unsolicited`` the commands announce unsolicited Data-Out (F=0: the target must be
    ready for FirstBurstLength bytes without asking) and the helper waits ``settle`` seconds
    for what comes (a refused command is only answered once its unsolicited data is in, which
    never happens); otherwise each command's answer (R2T or status) is read, so the target has
    acted on all of them when this returns.  The sessions stay open (``close`` ends them).

    With ``almost_all_data`` the sessions negotiate the largest bursts and most outstanding
    R2Ts, and answer every R2T with all of its data but the last PDU: the target holds what
    arrived, so the memory is really used, and the command never completes."""
    out = DatalessWrites()
    blocks = size // 512
    deadline = time.monotonic() + timeout
    try:
        for _ in range(sessions):
            c = R.RawClient(host, port)
            out.clients.append(c)
            ops: dict[str, str] = {"InitialR2T": "No", "ImmediateData": "Yes"} if unsolicited else {}
            if almost_all_data:
                ops.update({"MaxBurstLength": "16776192", "MaxOutstandingR2T": "16"})
            got = c.login(iqn, operational=ops or None)
            if not got.ok:
                raise AssertionError(f"login failed: {got.status:#06x}")
            cmds = []
            for _ in range(writes):
                cmd = c.scsi_pdu(R.write16(0, blocks), write_len=size)
                cmd.final = 0 if unsolicited else 1
                c.send(cmd)
                cmds.append(cmd.itt)
            pending = set(cmds)
            until = min(deadline, time.monotonic() + settle) if unsolicited or almost_all_data else deadline
            while pending:
                try:
                    pdu = c.recv(max(0.01, until - time.monotonic()))
                except TimeoutError:
                    if unsolicited or almost_all_data:
                        break
                    raise
                itt = getattr(pdu, "itt", None)
                if itt not in pending:
                    continue
                if isinstance(pdu, P.R2T):
                    out.r2ts += 1
                    if almost_all_data:
                        _send_all_but_last(c, pdu)
                        continue  # more R2Ts may follow for this command
                    pending.discard(itt)
                elif isinstance(pdu, P.ScsiResponse):
                    out.statuses.append(pdu.status)
                    pending.discard(itt)
    except BaseException:
        out.close()
        raise
    return out


def _send_all_but_last(c: R.RawClient, r2t: P.R2T) -> None:
    """Answer an R2T with its data minus the last PDU (no F bit: the burst stays open)."""
    chunk = c.max_xmit
    end = r2t.offset + r2t.desired_length
    off, datasn, wire = r2t.offset, 0, []
    payload = bytes(chunk)
    while off + chunk < end:
        wire.append(c.encode(P.DataOut(final=0, lun=r2t.lun, itt=r2t.itt, ttt=r2t.ttt, expstatsn=c.expstatsn,
                                       datasn=datasn, offset=off, data=payload)))
        off += chunk
        datasn += 1
    c.send_bytes(b"".join(wire))
