"""Sans-IO iSCSI session state (RFC 7143 sections 4.2.2, 7): the command numbering window.

A session numbers its non-immediate commands with CmdSN.  The target accepts those in
[ExpCmdSN, MaxCmdSN] and *delivers* them in CmdSN order: a command that arrives early
is held until the gap before it is filled.  MaxCmdSN opens the window by the free
command slots (``queue_depth`` minus commands still in progress), so the window is the
flow control an initiator honours; it never moves backwards.

SCSI commands are set up (task-table entry, immediate data copied into their buffer)
as soon as they arrive, even out of order, so that unsolicited Data-Out that follows
an early command finds it; only their delivery (R2Ts, submission) waits for the order.
Other PDU types that arrive early are held as copies.

The session also owns the task table (ITT -> command) and the identity the SCSI layer
sees (the Nexus).  MaxConnections is negotiated to 1, so a session has one connection
at a time (connection reinstatement replaces it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypedDict

from ..scsi.task import Nexus
from .command import Cmd
from .params import LoginResult, SessionParams, TargetInfo, TargetResets
from .pdu import NumberedRequest
from .scsi_layer import ScsiLayer
from .stats import IoStats, SessionCounters
from .violations import Violations
from .write_budget import WriteAccount, WriteBudget

if TYPE_CHECKING:
    from .connection import Connection

SERIAL_MASK = 0xFFFFFFFF
_HALF = 1 << 31

# What waits for its CmdSN turn: a command, a copied request, or None for a CmdSN whose
# command was rejected or aborted but still has to be consumed in order.
Held = Cmd | NumberedRequest | None


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic a < b (RFC 1982, 32 bits)."""
    return a != b and ((b - a) & SERIAL_MASK) < _HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or ((b - a) & SERIAL_MASK) < _HALF


DEFAULT_QUEUE_DEPTH = 128


class SessionInfo(TypedDict):
    tsih: int
    isid: str
    initiator: str
    initiator_alias: str | None
    target: str | None
    type: str
    exp_cmdsn: int
    max_cmdsn: int
    tasks: int
    write_reserved: int
    peer: str | None
    header_digest: bool
    data_digest: bool
    params: dict[str, object]


class Session:
    """One iSCSI session: identity, CmdSN window, task table and its connection."""

    def __init__(
        self,
        result: LoginResult,
        tsih: int,
        nexus: Nexus | None,
        device: ScsiLayer | None = None,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        peers: Callable[[], Iterable[Session]] | None = None,
        io_stats: dict[int, IoStats] | None = None,
        writes: WriteAccount | None = None,
        resets: TargetResets | None = None,
    ) -> None:
        self.tsih = tsih
        self.isid = result.isid
        self.initiator_name = result.initiator_name
        self.initiator_alias = result.initiator_alias
        self.target: TargetInfo | None = result.target
        self.discovery = result.session_type == "Discovery"
        self.params: SessionParams = result.params
        self.nexus = nexus
        self.device = device  # the target's SCSI layer (None in discovery sessions)
        self.queue_depth = queue_depth
        # Sessions on the same target (LUN/target scoped task management reaches them).
        self._peers = peers
        self.exp_cmdsn = result.cmdsn & SERIAL_MASK
        self.max_cmdsn = (self.exp_cmdsn + queue_depth - 1) & SERIAL_MASK
        self.active = 0  # non-immediate SCSI commands accepted and not yet finished
        # Write-buffer memory this session may reserve: its share of the daemon's budget (a
        # session built alone, in a unit test, gets a budget of its own).
        self.writes = writes if writes is not None else WriteBudget().account()
        # The target's reset permissions (shared with the engine); refused when not given.
        self.resets = resets if resets is not None else TargetResets()
        self.held: dict[int, Held] = {}  # CmdSN -> what arrived early (not yet in order)
        self.tasks: dict[int, Cmd] = {}  # ITT -> command in progress
        self.discard_cmdsn: set[int] = set()  # ABORT TASK arrived before the command
        self.connection: Connection | None = None
        self.closed = False
        self.created_ops = 0  # commands delivered, for observability
        # Observability: the target's per-LUN I/O counters (shared by its sessions, kept by
        # the engine), this session's rare events and the rules its initiator broke.
        self.io_stats: dict[int, IoStats] = io_stats if io_stats is not None else {}
        self.counters = SessionCounters()
        self.violations = Violations()
        self.strict = False
        self.full_path = self.discovery  # every command takes the connection's full path (no fast path)
        self.set_strict(result.target is not None and result.target.strict)

    def set_strict(self, on: bool) -> None:
        """Strict mode (violations.py): its checks sit on the full path, so strict sessions take it."""
        self.strict = on
        self.full_path = self.discovery or on

    # --- peers -----------------------------------------------------------------------

    def peers(self) -> Iterable[Session]:
        """Every live session on this session's target, this one included."""
        if self._peers is None:
            return (self,)
        return self._peers()

    # --- CmdSN window -----------------------------------------------------------------

    def in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)

    def admit(self, cmd: Cmd) -> None:
        """A numbered SCSI command takes one of the queue-depth slots until it finishes."""
        cmd.counted = True
        self.active += 1

    def arrive(self, cmdsn: int, item: Held) -> bool:
        """A numbered request in the window arrived.  True: it is the next in order and
        ExpCmdSN has moved past it (the caller delivers it, then ``drain``s); False: it
        is held until the gap before it is filled."""
        if cmdsn == self.exp_cmdsn:
            self.exp_cmdsn = (cmdsn + 1) & SERIAL_MASK
            self._update_window()
            return True
        self.held[cmdsn] = item
        self._update_window()
        return False

    def drain(self) -> Iterator[Held]:
        """What was held and is now in order, consuming each CmdSN as it goes."""
        held = self.held
        while held and self.exp_cmdsn in held:
            item = held.pop(self.exp_cmdsn)
            self.exp_cmdsn = (self.exp_cmdsn + 1) & SERIAL_MASK
            self._update_window()
            yield item

    def release(self, cmd: Cmd) -> None:
        """A command finished (answered, failed or aborted): its slot and buffer are free."""
        if self.tasks.get(cmd.itt) is cmd:
            del self.tasks[cmd.itt]
        if cmd.reserved:
            # Our accounting only: a SCSI layer still writing holds its own view of the buffers.
            self.writes.give(cmd.reserved)
            cmd.reserved = 0
            cmd.parts = []
        if cmd.counted:
            cmd.counted = False
            self.active -= 1
            self._update_window()

    def _update_window(self) -> None:
        """MaxCmdSN: ExpCmdSN plus the free slots, never less than already granted.  Early
        SCSI commands are counted in ``active`` already; other early PDUs are few and
        bounded by the window itself."""
        free = self.queue_depth - self.active
        new_max = (self.exp_cmdsn + max(free, 0) - 1) & SERIAL_MASK
        if sn_lt(self.max_cmdsn, new_max):
            self.max_cmdsn = new_max

    def describe(self) -> SessionInfo:
        """Observability snapshot."""
        conn = self.connection
        return {
            "tsih": self.tsih,
            "isid": f"{self.isid:012x}",
            "initiator": self.initiator_name,
            "initiator_alias": self.initiator_alias,
            "target": self.target.iqn if self.target else None,
            "type": "Discovery" if self.discovery else "Normal",
            "exp_cmdsn": self.exp_cmdsn,
            "max_cmdsn": self.max_cmdsn,
            "tasks": len(self.tasks),
            "write_reserved": self.writes.used,
            "peer": conn.peer if conn else None,
            "header_digest": self.params.header_digest,
            "data_digest": self.params.data_digest,
            "params": dataclasses.asdict(self.params),  # everything negotiated, for `ls -l`
        }
