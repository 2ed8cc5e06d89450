"""The workbench's seats on one connection: where fault rules act and captures listen.

A connection nothing applies to runs the plain classes and pays nothing.  While a rule or
a capture covers it, a ``ConnectionHook`` sits on the seams the core was built with:

- input: the ``Connection``'s class is swapped for ``InterceptedConnection``, whose
  ``handle`` (the connection's one input point) passes each event to the hook first;
- output: the ``WireOutput``'s class is swapped for ``InterceptedWireOutput``, whose
  ``emit`` (the one output point, login responses included) does the same;
- bytes read: the ``PDUReader``'s ``tap`` gets each PDU's bytes as received (captures);
- SCSI: the session's SCSI layer is wrapped in a ``FaultDevice`` while a status, latency
  or hold rule covers the session.

Swapping the class back (``detach``) restores the plain path.  Output is captured after the
faults acted, so a capture shows what went over the wire.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ..iscsi.connection import Connection
from ..iscsi.events import Event
from ..iscsi.pdu import (
    PDU,
    RESERVED_TAG,
    AsyncEvent,
    DataOut,
    Op,
    Payload,
    ScsiCommand,
    WireOutput,
    lun_to_int,
)
from ..iscsi.scsi_layer import ScsiLayer
from ..scsi.task import Nexus, ScsiTask, TmfResult
from . import pcapng
from .capture import Capture, Stream
from .faults import INPUT, OUTPUT, PDU_NAMES, SCSI, FaultRule

if TYPE_CHECKING:
    from ..server.protocol import IscsiProtocol
    from . import Workbench

log = logging.getLogger(__name__)

MAX_PENDING = 1 << 20  # bytes buffered for captures before the login says who is connecting
MAX_COMMANDS = 4096  # commands whose LUN and CDB output rules may need
# The outgoing PDUs that belong to one SCSI command (found by ITT).
_TASK_OUT = frozenset((Op.DATA_IN, Op.R2T, Op.SCSI_RSP))
Command = tuple[int, bytes]  # (LUN, CDB)


_time_ns = time.time_ns


class InterceptedConnection(Connection):
    """A Connection whose input passes its hook first (swapped in by ``attach``)."""

    hook: ConnectionHook

    def handle(self, ev: Event) -> None:
        self.hook.on_input(self, ev)


class InterceptedWireOutput(WireOutput):
    """A WireOutput whose PDUs pass its hook before they are queued (swapped in by ``attach``)."""

    __slots__ = ()

    def emit(self, hdr: bytearray, parts: Sequence[Payload] = (), dlen: int = 0) -> None:
        hook = self.hook
        if isinstance(hook, ConnectionHook):
            hook.on_output(self, hdr, parts, dlen)
        else:
            WireOutput.emit(self, hdr, parts, dlen)


def _is_status(op: int, hdr: bytes | bytearray) -> bool:
    """The PDU carries a SCSI command's status (its last)."""
    return op == Op.SCSI_RSP or (op == Op.DATA_IN and bool(hdr[1] & 0x01))


def identity_of(proto: IscsiProtocol) -> tuple[str | None, str | None, int | None]:
    """(target IQN, initiator name, TSIH) of a connection, each None until known ("" for
    the target of a Discovery session)."""
    conn = proto.conn
    if conn is not None:
        s = conn.session
        return (s.target.iqn if s.target else ""), s.initiator_name, s.tsih
    login = proto.login
    if login is None or not login.initiator_name:
        return None, None, None
    target = login.target.iqn if login.target is not None else ("" if login.session_type == "Discovery" else None)
    return target, login.initiator_name, None


class ConnectionHook:
    """What the workbench does to one connection: the rules covering it, the captures it feeds."""

    def __init__(self, wb: Workbench, proto: IscsiProtocol) -> None:
        self.wb = wb
        self.proto = proto
        self.rules_in: list[FaultRule] = []
        self.rules_out: list[FaultRule] = []
        self.rules_scsi: list[FaultRule] = []
        self.streams: dict[int, Stream] = {}  # capture id -> this connection's stream in it
        self.captures: dict[int, Capture] = {}
        # Captured pieces kept until the login says who this is: (ts, from initiator, bytes, header).
        self.pending: list[tuple[int, bool, bytes, int]] | None = None
        self.pending_size = 0
        self.commands: dict[int, Command] = {}  # ITT -> (LUN, CDB): context for output rules
        self.delayed_in: dict[int, deque[Event]] = {}  # ITT -> input waiting behind a delayed PDU
        self.delayed_out: dict[int, deque[tuple[bytearray, Sequence[Payload], int]]] = {}
        self.reorder: dict[int, list[tuple[bytearray, Sequence[Payload], int]]] = {}
        self.dead = False  # the connection is being dropped by a fault: nothing more goes out
        self.ending = ""  # how a fault ended it ("reset" or "close"), for the captures
        self.device: FaultDevice | None = None

    # --- identity --------------------------------------------------------------------------------

    def identity(self) -> tuple[str | None, str | None, int | None]:
        return identity_of(self.proto)

    def applies(self, rule: FaultRule) -> bool:
        target, initiator, tsih = self.identity()
        return rule.scope.identity_known(target, initiator, tsih) and rule.scope.matches_nexus(target, initiator,
                                                                                               tsih)

    def _fired(self, rule: FaultRule, what: str) -> None:
        target, initiator, tsih = self.identity()
        self.wb.faults.fired(rule, tsih, initiator, target, what)
        if rule.spent:
            self.wb.schedule_refresh()

    @property
    def empty(self) -> bool:
        return not (self.rules_in or self.rules_out or self.rules_scsi or self.streams or self.pending is not None
                    or (self.device is not None and self.device.held))

    # --- input -------------------------------------------------------------------------------------

    def on_input(self, conn: Connection, ev: Event) -> None:
        if isinstance(ev, PDU):
            cmd: Command | None = None
            if isinstance(ev, ScsiCommand):
                cmd = (lun_to_int(ev.lun), bytes(ev.cdb))
                if self.rules_out:
                    if len(self.commands) >= MAX_COMMANDS:
                        self.commands.clear()  # ITTs of commands that never answered (aborted)
                    self.commands[ev.itt] = cmd
            elif isinstance(ev, DataOut):
                cmd = self.commands.get(ev.itt)
            for rule in self.rules_in:
                if rule.opcode is not None and ev.opcode != rule.opcode:
                    continue
                if rule.scope.needs_command and (cmd is None or not rule.scope.matches_command(*cmd)):
                    continue
                if not self.applies(rule) or not rule.trigger():
                    continue
                if self._act_in(conn, rule, ev):
                    return
            queue = self.delayed_in.get(ev.itt) if ev.itt != RESERVED_TAG else None
            if queue is not None:
                ev.data = bytes(ev.data)  # it outlives the receive buffer
                queue.append(ev)
                return
        Connection.handle(conn, ev)

    def _act_in(self, conn: Connection, rule: FaultRule, pdu: PDU) -> bool:
        """Carry out an input rule; True if the PDU is consumed."""
        what = f"{PDU_NAMES.get(pdu.opcode, hex(pdu.opcode))} {pdu!r}"
        self._fired(rule, what)
        kind = rule.kind
        if kind == "drop":
            self.drop(rule.how)
            return True
        if kind == "delay":
            pdu.data = bytes(pdu.data)
            self.delayed_in.setdefault(pdu.itt, deque()).append(pdu)
            self.proto.loop.call_later(rule.delay_ms / 1000, self._release_in, conn, pdu.itt)
            return True
        if kind == "reject":
            conn.reject_pdu(pdu, rule.reason)
            return True
        if kind == "async":
            self.send_async(conn, rule)
            return False
        return False

    def _release_in(self, conn: Connection, itt: int) -> None:
        queue = self.delayed_in.pop(itt, None)
        if queue is None or conn.closed:
            return
        while queue:
            Connection.handle(conn, queue.popleft())
            if conn.closing:
                break
        self.proto.flush_later()

    def send_async(self, conn: Connection, rule: FaultRule) -> None:
        event = rule.event
        if event == AsyncEvent.LOGOUT_REQUEST:
            self.proto.request_logout(max(1, rule.wait))
            return
        p = conn.session.params
        if event == AsyncEvent.DROP_CONNECTION:
            conn.send_async(event, conn.cid, rule.wait, p.default_time2retain)
        elif event == AsyncEvent.DROP_ALL_CONNECTIONS:
            conn.send_async(event, 0, rule.wait, p.default_time2retain)
        else:  # RENEGOTIATE: Parameter3 is the time to start the negotiation in
            conn.send_async(event, 0, 0, rule.wait)
        self.proto.flush_later()
        if event in (AsyncEvent.DROP_CONNECTION, AsyncEvent.DROP_ALL_CONNECTIONS):
            # The target drops the connection, as it announced (after the message is out).
            self.proto.loop.call_later(0.5, self.drop, "close")

    # --- output ------------------------------------------------------------------------------------

    def on_output(self, out: WireOutput, hdr: bytearray, parts: Sequence[Payload], dlen: int) -> None:
        if self.dead:
            return
        op = hdr[0] & 0x3F
        itt = int.from_bytes(hdr[16:20], "big")
        if self.rules_out:
            cmd = self.commands.get(itt) if op in _TASK_OUT else None
            for rule in self.rules_out:
                if not self._out_matches(rule, op, itt, hdr, dlen, cmd, out) or not self.applies(rule):
                    continue
                if not rule.trigger():
                    continue
                if self._act_out(out, rule, op, itt, hdr, parts, dlen):
                    if op in _TASK_OUT and _is_status(op, hdr):
                        self.commands.pop(itt, None)
                    return
        if itt in self.reorder and op in _TASK_OUT:
            self._reorder(out, itt, op, hdr, parts, dlen)
        elif itt in self.delayed_out and itt != RESERVED_TAG:
            self.delayed_out[itt].append((hdr, parts, dlen))
        else:
            self.commit(out, hdr, parts, dlen)
        if op in _TASK_OUT and _is_status(op, hdr):
            self.commands.pop(itt, None)

    def _out_matches(self, rule: FaultRule, op: int, itt: int, hdr: bytearray, dlen: int, cmd: Command | None,
                     out: WireOutput) -> bool:
        kind = rule.kind
        if kind == "ignore_nop":
            return op == Op.NOP_IN and itt != RESERVED_TAG
        if rule.pdu == "scsi-response":
            if not _is_status(op, hdr):
                return False
        elif rule.opcode is not None and op != rule.opcode:
            return False
        if kind == "corrupt_header_digest" and not out.header_digest:
            return False
        if kind == "corrupt_data_digest" and not (out.data_digest and dlen):
            return False
        if kind == "reorder_data_in" and (itt in self.reorder or _is_status(op, hdr)):
            return False  # already reordering this command, or its only Data-In
        return not rule.scope.needs_command or (cmd is not None and rule.scope.matches_command(*cmd))

    def _act_out(self, out: WireOutput, rule: FaultRule, op: int, itt: int, hdr: bytearray,
                 parts: Sequence[Payload], dlen: int) -> bool:
        """Carry out an output rule; True if it dealt with the PDU."""
        kind = rule.kind
        what = f"{PDU_NAMES.get(op, hex(op))} ITT {itt:#x}"
        if kind == "reorder_data_in":
            self.reorder[itt] = [(hdr, parts, dlen)]
            self._fired(rule, f"{what}: its Data-In PDUs go out in reverse order")
            return True
        self._fired(rule, what)
        if kind in ("withhold", "ignore_nop"):
            return True
        if kind == "delay":
            self.delayed_out.setdefault(itt, deque()).append((hdr, parts, dlen))
            self.proto.loop.call_later(rule.delay_ms / 1000, self._release_out, out, itt)
            return True
        if kind == "drop":
            self.commit(out, hdr, parts, dlen, f"fault #{rule.id}: connection dropped after this PDU")
            self.drop(rule.how)
            return True
        if kind == "drop_mid_pdu":
            self.commit(out, hdr, parts, dlen, f"fault #{rule.id}: connection closed in the middle of this PDU",
                        cut=True)
            self.drop("close")
            return True
        if kind == "corrupt_header_digest":
            self.commit(out, hdr, parts, dlen, f"fault #{rule.id}: header digest corrupted", corrupt="header")
            return True
        if kind == "corrupt_data_digest":
            self.commit(out, hdr, parts, dlen, f"fault #{rule.id}: data digest corrupted", corrupt="data")
            return True
        return False

    def _reorder(self, out: WireOutput, itt: int, op: int, hdr: bytearray, parts: Sequence[Payload],
                 dlen: int) -> None:
        held = self.reorder[itt]
        if op == Op.DATA_IN:
            held.append((hdr, parts, dlen))
        if not _is_status(op, hdr):
            return
        del self.reorder[itt]
        pdus = list(reversed(held))
        if op != Op.DATA_IN:
            pdus.append((hdr, parts, dlen))  # a separate SCSI Response still comes last
        for h, p, n in pdus:
            self.commit(out, h, p, n, "fault: Data-In reordered")

    def _release_out(self, out: WireOutput, itt: int) -> None:
        queue = self.delayed_out.pop(itt, None)
        if queue is None or self.dead or self.proto.transport is None:
            return
        for hdr, parts, dlen in queue:
            self.commit(out, hdr, parts, dlen, "fault: delayed")
        self.proto.flush_later()

    def commit(self, out: WireOutput, hdr: bytearray, parts: Sequence[Payload], dlen: int, comment: str = "",
               corrupt: str = "", cut: bool = False) -> None:
        """Queue the PDU for the socket (the plain encoder), then capture it as it will go."""
        bufs = out.buffers
        n0 = len(bufs)
        WireOutput.emit(out, hdr, parts, dlen)
        if corrupt == "header":
            hdr[-1] ^= 0x01  # the header digest's last byte: ``hdr`` is the queued buffer
        elif corrupt == "data":
            last = bytearray(bufs[-1])
            last[-1] ^= 0x01
            bufs[-1] = bytes(last)
        if cut:
            whole = b"".join(bytes(b) for b in bufs[n0:])
            del bufs[n0:]
            bufs.append(whole[: max(1, len(whole) // 2)])
        if self.streams:
            self._capture(False, bufs[n0:], len(hdr), comment)
        if self.pending is not None:
            self._pend(False, bufs[n0:], len(hdr))

    # --- dropping the connection --------------------------------------------------------------------

    def drop(self, how: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.ending = how
        self.proto.fault_drop(hard=how == "reset")

    # --- capture -----------------------------------------------------------------------------------

    def received(self, view: memoryview, header: int) -> None:
        """The reader's tap: one PDU's bytes (or a skipped piece) as read from the socket."""
        if self.streams:
            self._capture(True, (view,), header, "")
        if self.pending is not None:
            self._pend(True, (view,), header)

    def _capture(self, from_initiator: bool, items: Sequence[Payload], header: int, comment: str) -> None:
        ts = _time_ns()
        for cap_id, st in self.streams.items():
            self.captures[cap_id].record(st, from_initiator, items, header, ts, comment)

    def _pend(self, from_initiator: bool, items: Sequence[Payload], header: int) -> None:
        assert self.pending is not None
        data = b"".join(bytes(b) for b in items)
        if self.pending_size + len(data) > MAX_PENDING:
            data = data[: header]  # a login is small; keep the stream's length, not its bytes
        self.pending.append((_time_ns(), from_initiator, data, header))
        self.pending_size += len(data)

    def join(self, cap: Capture, from_start: bool) -> None:
        """Start feeding ``cap`` (with what was pending, if the connection is new)."""
        if cap.id in self.streams:
            return
        proto = self.proto
        ends = pcapng.Endpoints(proto.peer_addr[0], proto.peer_addr[1], proto.local_addr[0], proto.local_addr[1])
        _t, _i, tsih = self.identity()
        st = cap.open_stream(ends, tsih, from_start, self.pending[0][0] if self.pending else _time_ns())
        self.streams[cap.id] = st
        self.captures[cap.id] = cap
        for ts, from_initiator, data, header in self.pending or ():
            cap.record(st, from_initiator, (data,), header, ts)

    def leave(self, cap_id: int) -> None:
        st = self.streams.pop(cap_id, None)
        cap = self.captures.pop(cap_id, None)
        if st is not None and cap is not None:
            cap.close_stream(st, _time_ns(), reset=self.ending == "reset",
                             comment=f"fault: connection dropped ({self.ending})" if self.ending else "")

    def closed(self) -> None:
        for cap_id in list(self.streams):
            self.leave(cap_id)

    def record_pdus(self, taps: bool) -> None:
        self.proto.reader.tap = self.received if taps else None


# --- the SCSI seat ----------------------------------------------------------------------------------


class FaultDevice:
    """A session's SCSI layer with the status, latency and hold rules in front of it."""

    def __init__(self, real: ScsiLayer, hook: ConnectionHook) -> None:
        self.real = real
        self.hook = hook
        # (nexus id, tag) -> a held or delayed task and the rule that keeps it.  A held task
        # stays until it is aborted, or its rule is removed or expires (then it runs).
        self.held: dict[tuple[int, int], tuple[ScsiTask, FaultRule]] = {}

    def _rule_for(self, task: ScsiTask) -> FaultRule | None:
        lun = task.lun
        for rule in self.hook.rules_scsi:
            if rule.scope.matches_command(lun, task.cdb) and self.hook.applies(rule) and rule.trigger():
                return rule
        return None

    def submit(self, task: ScsiTask) -> None:
        rule = self._rule_for(task)
        if rule is None:
            self.real.submit(task)
            return
        what = f"CDB {bytes(task.cdb[:16]).hex()} LUN {task.lun} tag {task.tag:#x}"
        self.hook._fired(rule, what)
        if rule.kind == "status":
            task.status = rule.status
            task.sense = rule.sense(task.cdb)
            task.data_in = []
            task.data_in_len = 0
            self._complete(task)
        elif rule.kind == "latency":
            self.held[(task.nexus.nexus_id, task.tag)] = (task, rule)
            self.hook.proto.loop.call_later(rule.delay_ms / 1000, self._release, task)
        else:  # hold: until a task management function (or the session's end) aborts it
            self.held[(task.nexus.nexus_id, task.tag)] = (task, rule)

    @staticmethod
    def _complete(task: ScsiTask) -> None:
        cb, task.on_done = task.on_done, None
        if cb is not None:
            cb(task)

    def _release(self, task: ScsiTask) -> None:
        entry = self.held.get((task.nexus.nexus_id, task.tag))
        if entry is not None and entry[0] is task:
            del self.held[(task.nexus.nexus_id, task.tag)]
            if not task.aborted:
                self.real.submit(task)

    def release(self, in_force: set[int]) -> None:
        """Held commands whose rule is no longer in force (removed, expired) go on to the
        logical unit; a rule that merely fired its count keeps what it holds."""
        for task, rule in list(self.held.values()):
            if rule.kind == "hold" and (rule.id not in in_force or rule.expired()):
                self._release(task)

    def _abort(self, match: Any) -> int:
        n = 0
        for key, (task, _rule) in list(self.held.items()):
            if match(task):
                del self.held[key]
                task.aborted = True
                self._complete(task)
                n += 1
        return n

    def __getattr__(self, name: str) -> Any:
        # The rest of what the transport asks of its SCSI layer (a method the contract gains
        # later included) is the real layer's.
        if name == "real":
            raise AttributeError(name)
        return getattr(self.real, name)

    # --- the ScsiLayer contract -----------------------------------------------------------------------

    def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResult:
        if self._abort(lambda t: t.nexus.nexus_id == nexus.nexus_id and t.tag == tag):
            return TmfResult.COMPLETE
        return self.real.abort_task(nexus, lun, tag)

    def abort_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        self._abort(lambda t: t.nexus.nexus_id == nexus.nexus_id and t.lun == lun)
        return self.real.abort_task_set(nexus, lun)

    def clear_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        self._abort(lambda t: t.lun == lun)
        return self.real.clear_task_set(nexus, lun)

    def clear_aca(self, nexus: Nexus, lun: int) -> TmfResult:
        return self.real.clear_aca(nexus, lun)

    def lun_reset(self, nexus: Nexus, lun: int) -> TmfResult:
        self._abort(lambda t: t.lun == lun)
        return self.real.lun_reset(nexus, lun)

    def target_reset(self, nexus: Nexus, cold: bool) -> TmfResult:
        self._abort(lambda t: True)
        return self.real.target_reset(nexus, cold)

    def add_nexus(self, nexus: Nexus) -> None:
        self.real.add_nexus(nexus)

    def nexus_lost(self, nexus: Nexus) -> None:
        self._abort(lambda t: t.nexus.nexus_id == nexus.nexus_id)
        self.real.nexus_lost(nexus)


# --- attaching and detaching ------------------------------------------------------------------------


def attach(proto: IscsiProtocol, hook: ConnectionHook) -> None:
    """Put the hook on the connection's seams (idempotent)."""
    proto.hook = hook
    out = proto.output
    out.hook = hook
    out.__class__ = InterceptedWireOutput
    conn = proto.conn
    if conn is not None and not isinstance(conn, InterceptedConnection):
        conn.__class__ = InterceptedConnection
        conn.hook = hook  # type: ignore[attr-defined]
    hook.record_pdus(bool(hook.streams) or hook.pending is not None)
    _scsi_seat(hook)


def _scsi_seat(hook: ConnectionHook) -> None:
    conn = hook.proto.conn
    if conn is None or conn.session.discovery:
        return
    s = conn.session
    if hook.rules_scsi and hook.device is None and s.device is not None:
        hook.device = FaultDevice(s.device, hook)
        s.device = cast(ScsiLayer, hook.device)  # the contract's methods, and the rest delegated
    device = hook.device
    if device is not None:
        device.release(set(hook.wb.faults.rules))
        if not hook.rules_scsi and not device.held:
            hook.device = None
            real = device.real
            if s.device is device:
                s.device = real


def detach(proto: IscsiProtocol) -> None:
    """Back to the plain path: nothing covers the connection any more."""
    hook = proto.hook
    if hook is None:
        return
    hook.rules_in = hook.rules_out = hook.rules_scsi = []
    _scsi_seat(hook)
    # Delayed PDUs still go (in order); a reorder in progress is let out as it stands.
    for itt in list(hook.delayed_out):
        hook._release_out(proto.output, itt)
    for itt, held in list(hook.reorder.items()):
        del hook.reorder[itt]
        for h, p, n in held:
            hook.commit(proto.output, h, p, n)
    if hook.delayed_in and proto.conn is not None:
        for itt in list(hook.delayed_in):
            hook._release_in(proto.conn, itt)
    hook.closed()
    proto.reader.tap = None
    out = proto.output
    out.__class__ = WireOutput
    out.hook = None
    conn: Connection | None = proto.conn
    if isinstance(conn, InterceptedConnection):
        del conn.__dict__["hook"]
        plain: Connection = conn
        plain.__class__ = Connection
    proto.hook = None


__all__ = ["INPUT", "OUTPUT", "SCSI", "ConnectionHook", "FaultDevice", "InterceptedConnection",
           "InterceptedWireOutput", "attach", "detach"]
