"""Transport state of one SCSI command: its life cycle, its Data-Out sequences, how it fails.

A command is ``ARRIVED`` when its SCSI Command PDU has been read and its immediate data
taken (even out of CmdSN order), ``ACTIVE`` once its turn has come (R2Ts go out, data
comes in), ``SUBMITTED`` while the SCSI layer runs it and ``DONE`` when it has answered,
failed or been aborted.  The connection makes each transition in one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from ..scsi.sense import (
    ABORTED_COMMAND,
    CHECK_CONDITION,
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_CDB,
    TASK_SET_FULL,
    build_sense,
)
from ..scsi.task import ScsiTask
from .pdu import ScsiCommand, lun_to_int

if TYPE_CHECKING:
    from .connection import Connection


class CmdState(IntEnum):
    ARRIVED = 0  # set up, waiting for its CmdSN turn
    ACTIVE = 1  # in order: soliciting and receiving its data
    SUBMITTED = 2  # with the SCSI layer
    DONE = 3  # answered, failed or aborted


# Hot-path aliases: a module global costs ~15 ns, ``CmdState.ACTIVE`` ~80 ns on 3.11 (the
# enum class attribute lookup); comparisons between members are int comparisons.
ARRIVED = CmdState.ARRIVED
ACTIVE = CmdState.ACTIVE
SUBMITTED = CmdState.SUBMITTED
DONE = CmdState.DONE


@dataclass(frozen=True, slots=True)
class Failure:
    """How a command the transport cannot carry out ends: SAM status and sense data."""

    status: int
    sense: bytes | None


# RFC 7143 11.4.7.2: the iSCSI conditions reported as ABORTED COMMAND sense.
UNEXPECTED_UNSOLICITED_DATA = (0x0C, 0x0C)
NOT_ENOUGH_UNSOLICITED_DATA = (0x0C, 0x0D)  # "incorrect amount of data"
PROTOCOL_SERVICE_CRC_ERROR = (0x47, 0x05)

FAIL_UNEXPECTED_UNSOLICITED = Failure(CHECK_CONDITION, build_sense(ABORTED_COMMAND, UNEXPECTED_UNSOLICITED_DATA))
FAIL_INCORRECT_DATA_AMOUNT = Failure(CHECK_CONDITION, build_sense(ABORTED_COMMAND, NOT_ENOUGH_UNSOLICITED_DATA))
FAIL_DATA_CRC = Failure(CHECK_CONDITION, build_sense(ABORTED_COMMAND, PROTOCOL_SERVICE_CRC_ERROR))
FAIL_TRANSFER_TOO_LONG = Failure(CHECK_CONDITION, build_sense(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
FAIL_TASK_SET_FULL = Failure(TASK_SET_FULL, None)  # the write budget has no room for its data
SENSE_INTERNAL_FAILURE = build_sense(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)


class Seq:
    """One Data-Out sequence: the unsolicited burst or the answer to one R2T.

    Its buffer is allocated when its first data arrives (or with the command, for immediate
    data): memory follows the data actually received, burst by burst."""

    __slots__ = ("start", "end", "next_offset", "exp_datasn", "ttt", "buf")

    def __init__(self, start: int, end: int, ttt: int, buf: bytearray | None = None) -> None:
        self.start = start
        self.end = end
        self.next_offset = start
        self.exp_datasn = 0
        self.ttt = ttt
        self.buf = buf


class Cmd:
    """Transport state of one SCSI command (ScsiTask.transport_ref points here)."""

    __slots__ = (
        "itt", "cmdsn", "lun", "raw_lun", "cdb", "attr", "read", "write", "edtl", "bidi_len",
        "immediate", "parts", "reserved", "received", "seqs", "next_r2t_offset", "r2tsn", "datasn",
        "failed", "state", "counted", "aborted", "task", "conn", "t0",
    )

    def __init__(self, pdu: ScsiCommand, conn: Connection) -> None:
        self.itt = pdu.itt
        self.cmdsn = pdu.cmdsn
        self.raw_lun = pdu.lun
        raw = pdu.lun
        # Most initiators address LUN 0..255 with peripheral addressing: decode inline.
        self.lun = raw >> 48 if raw & 0xFF00FFFFFFFFFFFF == 0 else lun_to_int(raw)
        self.cdb = pdu.full_cdb() if pdu.ahs else pdu.cdb
        self.attr = pdu.attr
        self.read = pdu.read
        self.write = pdu.write
        self.edtl = pdu.edtl
        self.bidi_len = (pdu.bidi_read_length() or 0) if (self.read and self.write) else 0
        self.immediate = pdu.immediate
        # The write data received, one buffer per completed burst: (offset, buffer).
        self.parts: list[tuple[int, bytearray]] = []
        self.reserved = 0  # write-buffer bytes reserved from the session's WriteAccount
        self.received = 0  # Data-Out bytes accounted for (immediate + sequences closed)
        self.seqs: dict[int, Seq] = {}  # TTT (RESERVED_TAG: unsolicited) -> open sequence
        self.next_r2t_offset = 0
        self.r2tsn = 0
        self.datasn = 0  # Data-In PDUs sent
        self.failed: Failure | None = None  # how it ends once its data is in
        self.state = ARRIVED
        self.counted = False  # holds one of the session's queue-depth slots
        self.aborted = False
        self.task: ScsiTask | None = None
        self.conn = conn
        self.t0 = conn.rx_ns  # arrival of its PDU's receive batch, for the latency histogram (stats.py)

    def fail(self, failure: Failure) -> None:
        """The first failure wins: later errors of a doomed command change nothing."""
        if self.failed is None:
            self.failed = failure
