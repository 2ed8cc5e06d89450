"""The contract between a SCSI transport (iSCSI here) and the SCSI layer.

The SCSI layer knows nothing of iSCSI: a transport builds a ScsiTask, hands it to
``ScsiDevice.submit`` and is called back once through ``task.on_done``.  The callback
may run synchronously inside ``submit`` (page-cache hits, INQUIRY...) or later on
the event loop (thread-pool I/O); it always runs on the loop thread.

Data direction is from the initiator's point of view: READ means Data-In.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum


class TaskAttr(IntEnum):
    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class TmfResult(IntEnum):
    """SAM-5 task management service responses (mapped to iSCSI codes by the transport)."""

    COMPLETE = 0
    NO_SUCH_TASK = 1
    NO_SUCH_LUN = 2
    NOT_SUPPORTED = 5
    REJECTED = 255


@dataclass(slots=True, eq=False)
class Nexus:
    """One I_T nexus: an initiator port logged in to a target port (an iSCSI session)."""

    nexus_id: int  # unique for the daemon's lifetime
    initiator_name: str  # iSCSI name
    isid: int  # 48-bit; with the name forms the SCSI initiator port name
    target_name: str  # target IQN
    portal_group_tag: int  # relative target port id and target port group
    read_only: bool = False  # access config says (ro): every LU is write-protected

    @property
    def initiator_port(self) -> str:  # SPC-4 iSCSI initiator port name
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        return f"{self.target_name},t,0x{self.portal_group_tag:04x}"


#: A command's Data-Out payload: one buffer, or several in offset order (ScsiTask.data_out).
DataOutPayload = bytes | bytearray | memoryview | list[memoryview]


class ScsiTask:
    """One SCSI command in flight.

    Inputs are set by the transport; outputs by the SCSI layer before ``on_done``.

    Aborts: a task aborted by a TMF (or by another nexus's CLEAR TASK SET, PREEMPT AND
    ABORT, a reset or nexus loss) gets ``aborted = True``.  ``on_done`` is still called
    exactly once for it (at once if it was queued, else when its I/O returns) so the
    transport can free its state, but it must not send a response for it.

    Data-In buffers may hold fewer bytes than ``data_in_len`` (a READ reads only what the
    initiator will accept), never fewer than min(data_in_len, expected_len).

    Data-Out: ``data_out`` is the whole payload the initiator sent (``expected_len``
    bytes), gathered before submit: one buffer, or a list of buffers in offset order (a
    transport that gathers each burst in its own buffer hands them over as they are, so
    that the one copy of write data is the one the backstore writes from).  Handlers
    read it through scsi/command.py's helpers.

    Residuals: for Data-In the transport sends min(data_in_len, expected_len) bytes and
    derives over/underflow from data_in_len.  For Data-Out the SCSI layer sets
    ``xfer_len`` to the bytes the CDB asked for and the transport derives the residual
    from it against ``expected_len``.  Data the initiator sent is either used or the
    command fails: a handler that cannot use a short Data-Out (less than the CDB needs,
    a partial logical block) answers INVALID FIELD IN COMMAND INFORMATION UNIT.
    """

    __slots__ = (
        "nexus", "lun", "cdb", "tag", "attr", "expected_len", "bidi_read_len",
        "data_out", "on_done",
        "status", "sense", "data_in", "data_in_len", "xfer_len", "aborted",
        "transport_ref",
    )

    def __init__(
        self,
        nexus: Nexus,
        lun: int,
        cdb: bytes,
        tag: int,
        attr: TaskAttr = TaskAttr.SIMPLE,
        expected_len: int = 0,
        data_out: DataOutPayload | None = None,
        on_done: Callable[[ScsiTask], None] | None = None,
        bidi_read_len: int = 0,
    ) -> None:
        self.nexus = nexus
        self.lun = lun
        self.cdb = cdb
        self.tag = tag
        self.attr = attr
        self.expected_len = expected_len
        self.bidi_read_len = bidi_read_len
        self.data_out = data_out  # the whole Data-Out payload, gathered before submit
        self.on_done = on_done
        self.status = 0  # SAM status: 0 GOOD, 2 CHECK CONDITION, 8 BUSY, 0x18 RESERVATION CONFLICT...
        self.sense: bytes | None = None
        self.data_in: list[bytes | bytearray | memoryview] = []
        self.data_in_len = 0
        self.xfer_len = 0
        self.aborted = False  # set when a TMF aborted it: the transport sends no response
        self.transport_ref: object = None  # the transport's own per-command state


# --- LUN addressing (SAM-5 4.7) -------------------------------------------------------
#
# ``ScsiTask.lun`` is the LUN as the SCSI layer numbers it: 0..16383 for peripheral or
# flat addressed LUNs and 0xC101 for the REPORT LUNS well-known LUN.  A transport may also
# pass the raw 64-bit LUN field of its PDU (any value >= 1 << 16); ScsiDevice.submit
# decodes that with decode_lun.

WLUN_REPORT_LUNS = 0xC101
LUN_UNSUPPORTED = -1


def decode_lun(field: int) -> int:
    """The LUN number of a 64-bit SAM LUN field, or LUN_UNSUPPORTED."""
    if field & 0x0000FFFFFFFFFFFF:  # second and later levels: no hierarchy here
        return LUN_UNSUPPORTED
    b0, b1 = (field >> 56) & 0xFF, (field >> 48) & 0xFF
    method = b0 >> 6
    if method == 0:  # peripheral device addressing, bus 0 only
        return b1 if b0 == 0 else LUN_UNSUPPORTED
    if method == 1:  # flat space
        return ((b0 & 0x3F) << 8) | b1
    if b0 == 0xC1:  # well-known logical unit
        return 0xC100 | b1
    return LUN_UNSUPPORTED


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field REPORT LUNS returns for ``lun``."""
    if lun >= 0xC100:
        return bytes((0xC1, lun & 0xFF)) + bytes(6)
    if lun < 256:
        return bytes((0x00, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


#: The largest data transfer of one command the SCSI layer accepts (MAXIMUM TRANSFER
#: LENGTH in the block limits VPD page is this divided by the block size; longer commands
#: get INVALID FIELD IN CDB).  A transport must accept Data-Out buffers of this size, so
#: it should size its per-command write buffer limit from this constant.  libiscsi's
#: WriteSame16.Unmap on a 4 KiB-block LU needs 256 MiB (65536 blocks in one WRITE(16)).
MAX_TRANSFER_BYTES = 64 << 20
