"""What every command handler shares: the command descriptor, its flags, and the
Data-In helper.  The table of all commands is scsi/command_table.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyscsi_target.scsi.sense import short_data_out
from pyscsi_target.scsi.task import ScsiTask

if TYPE_CHECKING:  # annotations only: lu.py imports this module
    from pyscsi_target.scsi.lu import LogicalUnit

Handler = Callable[["LogicalUnit", ScsiTask], None]


class F:
    """Command flags: plain ints, because IntFlag arithmetic costs ~1.8 us per test on the
    hot path (measured) and every command tests several."""

    NONE = 0
    UA_EXEMPT = 1  # INQUIRY, REPORT LUNS, REQUEST SENSE: never report a unit attention
    WRITE = 2  # modifies the medium: refused on write-protected LUs
    MEDIUM = 4  # touches the medium: NOT READY while stopped or sanitizing
    PR_READ = 8  # conflicts under exclusive-access persistent reservations
    PR_WRITE = 16  # conflicts under write-exclusive and exclusive-access reservations
    PR_ALLOWED = 32  # allowed whatever persistent reservation exists
    RESV_ALLOWED = 64  # allowed from other nexuses under a RESERVE(6/10) reservation
    SANITIZE_OK = 128  # allowed while a sanitize operation runs


@dataclass(frozen=True, slots=True)
class Command:
    opcode: int
    sa: int | None  # service action, or None for opcodes without service actions
    name: str
    handler: Handler
    usage: bytes  # CDB usage data for REPORT SUPPORTED OPERATION CODES (byte 0 = opcode)
    flags: int = F.NONE
    timeout: int = 30  # nominal/recommended command timeout in seconds (RSOC RCTD)

    @property
    def cdb_len(self) -> int:
        return len(self.usage)


def usage(*mask: int) -> bytes:
    return bytes(mask)


def cdb_group_len(opcode: int) -> int:
    """CDB length implied by the opcode's group code (SPC-4 4.2.5.1)."""
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 16)


def set_data_in(task: ScsiTask, data: bytes | bytearray, alloc: int) -> None:
    """Return ``data`` as the Data-In, cut to the CDB's ALLOCATION LENGTH (SPC-4 4.2.5.6)."""
    n = min(len(data), alloc)
    task.data_in = [memoryview(data)[:n]] if n else []
    task.data_in_len = n


def data_out_view(task: ScsiTask) -> memoryview:
    """The Data-Out payload as one run of bytes (empty when the initiator sent none).

    A payload gathered in several buffers is joined here (a copy): parameter lists and the
    other small payloads; medium writes take ``data_out_parts`` instead."""
    d = task.data_out
    if d is None:
        return memoryview(b"")
    if isinstance(d, list):
        return memoryview(d[0] if len(d) == 1 else b"".join(d)).cast("B")
    return memoryview(d).cast("B")


def data_out_len(task: ScsiTask) -> int:
    """How many Data-Out bytes the initiator sent."""
    d = task.data_out
    if d is None:
        return 0
    if isinstance(d, list):
        return sum(len(b) for b in d)
    return memoryview(d).nbytes


def data_out_parts(task: ScsiTask, nbytes: int) -> list[memoryview]:
    """The first ``nbytes`` of the Data-Out (at most what was sent) as views of the
    transport's buffers, without a copy: what a medium write hands the backstore."""
    d = task.data_out
    if d is None or nbytes <= 0:
        return []
    bufs = d if isinstance(d, list) else [memoryview(d)]
    out: list[memoryview] = []
    for b in bufs:
        v = b.cast("B") if b.format != "B" or b.ndim != 1 else b
        if len(v) >= nbytes:
            out.append(v[:nbytes])
            return out
        out.append(v)
        nbytes -= len(v)
    return out


def data_out_needed(task: ScsiTask, nbytes: int) -> memoryview:
    """The first ``nbytes`` of the Data-Out, or INVALID FIELD IN COMMAND INFORMATION UNIT
    when the initiator's expected data transfer length is shorter than the CDB needs."""
    data = data_out_view(task)
    if len(data) < nbytes:
        raise short_data_out()
    return data[:nbytes]
