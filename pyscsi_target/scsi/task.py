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


class ScsiTask:
    """One SCSI command in flight.

    Inputs are set by the transport; outputs by the SCSI layer before ``on_done``.

    Residuals: for Data-In the transport sends min(data_in_len, expected_len) bytes and
    derives over/underflow from data_in_len.  For Data-Out the SCSI layer sets
    ``xfer_len`` to the bytes the CDB asked for and the transport derives the residual
    from it against ``expected_len``.
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
        data_out: memoryview | bytearray | bytes | None = None,
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
