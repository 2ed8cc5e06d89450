"""Sans-IO full-feature-phase machine for one iSCSI connection (RFC 7143).

``Connection.handle(event)`` is the one input: what ``PDUReader`` yields (PDU,
DigestError, OversizedPDU) and what the adapter feeds (events.py: keepalive ping,
logout request, drop announcement, task abort, link loss), dispatched on the event's
type.  Everything the target sends goes through the connection's ``WireOutput`` (a list
for ``transport.writelines``).  Completions that arrive later (the SCSI layer's
``on_done`` on the loop) append there too and call ``notify`` so the adapter flushes
once.  No sockets, no timers.

Data path choices (issue 5):
- Data-In, R2T and SCSI Response headers are packed by encoders.py; no PDU objects on
  that path.
- Read payload goes out as memoryview slices of the SCSI layer's buffers (no copy).
- Write payload is copied once, from the receive buffer into one bytearray per burst (the
  unsolicited burst, then each R2T's), allocated when the burst's first data arrives; the
  SCSI layer gets the bursts' buffers as they are and the backstore writes from them.
- A write command reserves its ExpectedDataTransferLength from the session's share of the
  daemon-wide write budget when it arrives (write_budget.py), or ends with TASK SET FULL.
- Status rides in the final Data-In (phase collapse) unless there is sense data.

Seams for what comes later, free while unused: every input passes ``handle`` and every
PDU sent passes ``WireOutput.emit`` (fault injection and capture wrap one or the other,
per connection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum

from ..log_limit import LogLimit
from ..scsi.sense import CHECK_CONDITION
from ..scsi.task import MAX_TRANSFER_BYTES, DataOutPayload, ScsiTask, TaskAttr, TmfResult
from . import encoders
from . import violations as V
from .command import (
    ACTIVE,
    DONE,
    FAIL_DATA_CRC,
    FAIL_INCORRECT_DATA_AMOUNT,
    FAIL_TASK_SET_FULL,
    FAIL_TRANSFER_TOO_LONG,
    FAIL_UNEXPECTED_UNSOLICITED,
    SENSE_INTERNAL_FAILURE,
    SUBMITTED,
    Cmd,
    Failure,
    Seq,
)
from .events import AbortTasks, AnnounceDrop, Event, LinkLost, Notice, Ping, RequestLogout
from .params import LoginPolicy, SessionParams
from .pdu import (
    BHS_LEN,
    PDU,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    DataOut,
    DigestError,
    LogoutOutcome,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    NumberedRequest,
    OversizedPDU,
    Payload,
    Reject,
    RejectReason,
    ScsiCommand,
    SnackRequest,
    TargetPDU,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TmfFunction,
    TmfResponse,
    UnknownPDU,
    WireOutput,
    lun_to_int,
)
from .session import SERIAL_MASK, Held, Session, sn_le, sn_lt
from .stats import clock_ns
from .text import TextHandler

log = logging.getLogger(__name__)
_REFUSALS = LogLimit(10.0)  # refused target resets, one line per peer per 10 s

_TMF_MAP = {
    TmfResult.COMPLETE: TmfResponse.COMPLETE,
    TmfResult.NO_SUCH_TASK: TmfResponse.NO_SUCH_TASK,
    TmfResult.NO_SUCH_LUN: TmfResponse.NO_SUCH_LUN,
    TmfResult.NOT_SUPPORTED: TmfResponse.NOT_SUPPORTED,
    TmfResult.REJECTED: TmfResponse.REJECTED,
}
_ATTRS = tuple(TaskAttr)  # task attribute codes 0..4, looked up without an enum call


def _offset(part: tuple[int, bytearray]) -> int:
    return part[0]


# The largest ExpectedDataTransferLength we gather write data for: the SCSI layer's MAXIMUM
# TRANSFER LENGTH (scsi.task contract), so the two cannot drift apart.
MAX_WRITE_BUFFER = MAX_TRANSFER_BYTES


class ConnState(Enum):
    FULL_FEATURE = "full feature phase"
    CLOSING = "closing"  # logged out or failed: close once the queued output is written
    CLOSED = "closed"  # the link is gone: nothing more in or out


FULL_FEATURE = ConnState.FULL_FEATURE
CLOSING = ConnState.CLOSING
CLOSED = ConnState.CLOSED
_TRANSITIONS = {FULL_FEATURE: (CLOSING, CLOSED), CLOSING: (CLOSED,), CLOSED: ()}


class Connection:
    """One connection in full feature phase."""

    def __init__(
        self,
        session: Session,
        cid: int,
        statsn: int,
        policy: LoginPolicy | None = None,
        peer: str = "",
        notify: Callable[[], None] | None = None,
        on_event: Callable[[Notice, Connection], None] | None = None,
        conn_params: SessionParams | None = None,
        output: WireOutput | None = None,
    ) -> None:
        self.session = session
        self.cid = cid
        self.statsn = statsn & SERIAL_MASK  # StatSN of the next status we send
        self.exp_statsn = statsn
        self.policy = policy  # the engine's LoginPolicy for this connection (SendTargets)
        self.peer = peer
        self.notify = notify or (lambda: None)
        self.on_event = on_event or (lambda _ev, _c: None)
        self._text_handler: TextHandler | None = None
        p = session.params
        # Digests and data segment sizes are per connection (a reinstated connection
        # negotiates its own); the rest is session-wide.
        cp = self.conn_params = conn_params or p
        self.output = output if output is not None else WireOutput()
        self.output.header_digest = cp.header_digest
        self.output.data_digest = cp.data_digest
        self.max_xmit = cp.max_xmit_dsl
        self.max_burst = p.max_burst_length
        self.first_burst = p.first_burst_length
        self.initial_r2t = p.initial_r2t
        self.immediate_data = p.immediate_data
        self.max_r2t = max(1, p.max_outstanding_r2t)
        self.state = FULL_FEATURE
        self.closing = False  # derived from ``state`` by _transition (read per PDU by the adapter)
        self.closed = False
        self._ttt = 0
        self.ping_ttt: int | None = None  # outstanding target NOP-In ping
        self._aborted_itts: set[int] = set()
        # When the current input arrived (the adapter sets it per receive batch): a command's
        # latency is measured from there without reading the clock per PDU.
        self.rx_ns = clock_ns()
        session.connection = self

    def _transition(self, state: ConnState) -> bool:
        """The one place the connection changes state; False if it is already there or past it."""
        if state not in _TRANSITIONS[self.state]:
            return False
        self.state = state
        self.closing = state is not FULL_FEATURE
        self.closed = state is CLOSED
        return True

    # --- small helpers ----------------------------------------------------------------

    def _next_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        return self._ttt

    def _take_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & SERIAL_MASK
        return sn

    def _send_status_pdu(self, pdu: TargetPDU, advance: bool = True) -> None:
        """Stamp StatSN/ExpCmdSN/MaxCmdSN into a PDU object and send it."""
        s = self.session
        pdu.statsn = self._take_statsn() if advance else self.statsn
        pdu.expcmdsn = s.exp_cmdsn
        pdu.maxcmdsn = s.max_cmdsn
        self.output.send(pdu)

    def reject(self, reason: RejectReason, bad: PDU, rule: V.Rule | None) -> None:
        """Reject PDU carrying the offending header (RFC 7143 11.17), and the rule it broke
        in the log and the session's violation report (None: not the initiator's doing)."""
        try:
            raw = bad.raw_header()
        except Exception:  # noqa: BLE001 - an unencodable header still deserves a Reject
            raw = bytes(BHS_LEN)
        self._send_status_pdu(Reject(reason=reason, datasn=0, data=raw))
        s = self.session
        s.counters.count(s.counters.rejects, reason)
        if rule is not None:
            self.violation(rule, f"Reject ({reason.name.lower().replace('_', ' ')})", repr(bad), logging.INFO)

    def reject_pdu(self, pdu: PDU, reason: RejectReason) -> None:
        """Reject a PDU instead of handling it (fault injection).  A numbered request's CmdSN
        is consumed in order, as for any rejected command, so the window moves on."""
        self.reject(reason, pdu, None)
        s = self.session
        if isinstance(pdu, ScsiCommand | NopOut | TaskMgmtRequest | TextRequest | LogoutRequest) and \
                not pdu.immediate and s.in_window(pdu.cmdsn) and pdu.cmdsn not in s.held:
            self._consume_in_order(pdu.cmdsn)

    def violation(self, rule: V.Rule, action: str, what: str, level: int = logging.DEBUG) -> None:
        """Record what the initiator did wrong in the session's report and the log: at INFO
        on a strict target, else at ``level`` (Rejects are rare enough for INFO; CHECK
        CONDITIONs are not: device scans draw ILLEGAL REQUEST for what they probe)."""
        s = self.session
        s.violations.add(rule, action, what)
        s.counters.violations += 1
        log.log(logging.INFO if s.strict else level, "%s: %s for %s [%s]", self.peer, action, what, rule)

    # --- input ------------------------------------------------------------------------

    def handle(self, ev: Event) -> None:
        if self.closed:
            return
        s = self.session
        if type(ev) is ScsiCommand and not ev.immediate and ev.cmdsn == s.exp_cmdsn and not (
            s.full_path or s.discard_cmdsn
        ):
            self._next_command(ev)  # almost every PDU under load
            return
        match ev:
            case DataOut():  # not CmdSN-numbered
                self._data_out(ev)
            case ScsiCommand() | NopOut() | TaskMgmtRequest() | TextRequest() | LogoutRequest():
                self._numbered(ev)
            case SnackRequest():
                # ErrorRecoveryLevel 0: no retransmission service (RFC 7143 11.16).
                self.reject(RejectReason.COMMAND_NOT_SUPPORTED, ev, V.SNACK_AT_ERL0)
            case UnknownPDU():
                self.reject(RejectReason.COMMAND_NOT_SUPPORTED, ev, V.UNKNOWN_OPCODE)
            case PDU():  # a target opcode, or a login request after login
                self.reject(RejectReason.PROTOCOL_ERROR, ev, V.NOT_IN_FULL_FEATURE_PHASE)
            case DigestError():
                self._digest_error(ev)
            case OversizedPDU():
                self._oversized(ev)
            case Ping():
                self.ping()
            case RequestLogout():
                self.request_logout(ev.within)
            case AnnounceDrop():
                self.announce_drop()
            case AbortTasks():
                self.abort_all()
            case LinkLost():
                self.connection_lost()

    def _next_command(self, pdu: ScsiCommand) -> None:
        """Fast path: a SCSI command carrying ExpCmdSN, in a Normal session."""
        s = self.session
        if pdu.expstatsn != self.exp_statsn:
            self._ack_statsn(pdu.expstatsn)
        itt = pdu.itt
        if not pdu.write and pdu.final and not pdu.data and itt not in s.tasks and itt != RESERVED_TAG:
            # A read or no-data command: nothing to gather.
            cmd = Cmd(pdu, self)
            s.tasks[itt] = cmd
            if self._aborted_itts:
                self._aborted_itts.discard(itt)
        else:
            setup = self._setup_cmd(pdu)
            if setup is None:
                self._consume_in_order(pdu.cmdsn)
                return
            cmd = setup
        s.admit(cmd)
        s.arrive(pdu.cmdsn, cmd)  # ExpCmdSN: in order
        self._activate(cmd)
        if s.held:
            self._drain_held()

    def _numbered(self, pdu: ScsiCommand | NumberedRequest) -> None:
        """A PDU carrying CmdSN: executed in CmdSN order unless immediate (RFC 7143 3.2.2.1)."""
        s = self.session
        self._ack_statsn(pdu.expstatsn)
        if s.discovery and isinstance(pdu, ScsiCommand | TaskMgmtRequest):
            self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.DISCOVERY_ONLY_TEXT)
            if not pdu.immediate and s.in_window(pdu.cmdsn):
                self._consume_in_order(pdu.cmdsn)
            return
        if isinstance(pdu, NopOut) and pdu.itt == RESERVED_TAG:
            # A ping answer or a one-way NOP: no CmdSN consumed (must be immediate).
            if s.strict and not pdu.immediate:
                self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.NOP_REPLY_NOT_IMMEDIATE)
                return
            self._nop_out(pdu)
            return
        if pdu.immediate:
            if isinstance(pdu, ScsiCommand):
                cmd = self._setup_cmd(pdu)
                if cmd is not None:
                    self._activate(cmd)
            else:
                self._dispatch(pdu)
            return
        sn = pdu.cmdsn
        if not s.in_window(sn):
            # Outside [ExpCmdSN, MaxCmdSN]: silently ignored (RFC 7143 4.2.2.1).
            log.debug("CmdSN %d outside window [%d, %d], ignored", sn, s.exp_cmdsn, s.max_cmdsn)
            return
        if sn in s.held:
            log.debug("duplicate CmdSN %d ignored", sn)
            return
        item: Held
        if isinstance(pdu, ScsiCommand):
            if sn in s.discard_cmdsn:  # aborted before it arrived
                s.discard_cmdsn.discard(sn)
                self._aborted_itts.add(pdu.itt)
                self._consume_in_order(sn)
                return
            cmd = self._setup_cmd(pdu)
            if cmd is None:
                self._consume_in_order(sn)
                return
            s.admit(cmd)
            item = cmd
        else:
            pdu.data = bytes(pdu.data)  # it may wait for its turn: outlive the receive buffer
            item = pdu
        if s.arrive(sn, item):
            self._deliver(item)
            self._drain_held()

    def _consume_in_order(self, sn: int) -> None:
        """A command that was rejected or discarded still uses up its CmdSN."""
        if self.session.arrive(sn, None):
            self._drain_held()

    def _drain_held(self) -> None:
        for item in self.session.drain():
            self._deliver(item)

    def _deliver(self, item: Held) -> None:
        if isinstance(item, Cmd):
            if not item.aborted:
                self._activate(item)
        elif item is not None:
            self._dispatch(item)

    def _dispatch(self, pdu: NumberedRequest) -> None:
        match pdu:
            case NopOut():
                self._nop_out(pdu)
            case TaskMgmtRequest():
                self._tmf(pdu)
            case TextRequest():
                self._text_req(pdu)
            case LogoutRequest():
                self._logout(pdu)

    def _ack_statsn(self, exp_statsn: int) -> None:
        if sn_lt(self.exp_statsn, exp_statsn) and sn_le(exp_statsn, self.statsn):
            self.exp_statsn = exp_statsn

    def _digest_error(self, ev: DigestError) -> None:
        pdu = ev.pdu
        counters = self.session.counters
        counters.digest_errors[ev.kind] = counters.digest_errors.get(ev.kind, 0) + 1
        if pdu is None:  # header digest: the byte stream cannot be trusted any more
            log.warning("%s: header digest error, dropping connection [%s]", self.peer, V.HEADER_DIGEST)
            self.violation(V.HEADER_DIGEST, "connection dropped", "a PDU whose header digest failed")
            self.drop()
            return
        # Data digest: the PDU is discarded with a Reject (RFC 7143 7.8 / 11.17.1).
        self.reject(RejectReason.DATA_DIGEST_ERROR, pdu, V.DATA_DIGEST)
        match pdu:
            case DataOut():
                # ERL 0: the data cannot be recovered; account for it so the command ends
                # with PROTOCOL SERVICE CRC ERROR once the rest of its data has arrived.
                self._data_out(pdu, failed=FAIL_DATA_CRC)
            case ScsiCommand():
                self._bad_command(pdu, FAIL_DATA_CRC)
            case NopOut() | TextRequest() if not pdu.immediate and pdu.itt != RESERVED_TAG:
                # The command is gone; its CmdSN must not block the window.
                if self.session.in_window(pdu.cmdsn):
                    self._consume_in_order(pdu.cmdsn)

    def _oversized(self, ev: OversizedPDU) -> None:
        """DataSegmentLength above our MaxRecvDataSegmentLength: protocol error."""
        pdu = ev.pdu
        log.info("%s: PDU %s with %d data bytes > MaxRecvDataSegmentLength", self.peer, pdu, ev.length)
        self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.OVERSIZED_SEGMENT)
        match pdu:
            case DataOut():
                cmd = self.session.tasks.get(pdu.itt)
                if cmd is not None and cmd.conn is self:
                    cmd.fail(FAIL_INCORRECT_DATA_AMOUNT)
                    seq = cmd.seqs.get(pdu.ttt)
                    if seq is not None and pdu.final:
                        del cmd.seqs[seq.ttt]
                    self._maybe_submit(cmd)
            case ScsiCommand():
                self._bad_command(pdu, FAIL_INCORRECT_DATA_AMOUNT)
            case NopOut() | TextRequest() | TaskMgmtRequest() | LogoutRequest():
                if not pdu.immediate and self.session.in_window(pdu.cmdsn):
                    self._consume_in_order(pdu.cmdsn)

    def _bad_command(self, pdu: ScsiCommand, failure: Failure) -> None:
        """A SCSI Command whose immediate data was lost: it completes with ``failure``."""
        pdu.data = b""
        s = self.session
        if pdu.immediate:
            cmd = self._setup_cmd(pdu)
            if cmd is not None:
                cmd.fail(failure)
                self._activate(cmd)
            return
        if not s.in_window(pdu.cmdsn) or pdu.cmdsn in s.held:
            return
        cmd = self._setup_cmd(pdu)
        if cmd is None:
            self._consume_in_order(pdu.cmdsn)
            return
        cmd.fail(failure)
        s.admit(cmd)
        if s.arrive(pdu.cmdsn, cmd):
            self._activate(cmd)
            self._drain_held()

    # --- SCSI Command -------------------------------------------------------------------

    def _setup_cmd(self, pdu: ScsiCommand) -> Cmd | None:
        """Create the command, reserve its write data's memory and take its immediate data
        (the one copy)."""
        s = self.session
        if pdu.itt == RESERVED_TAG or pdu.itt in s.tasks:
            # A reserved or duplicate ITT is an invalid field (RFC 7143 11.17.1).
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.ITT_IN_USE)
            return None
        if not pdu.final and not pdu.write:
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.UNSOLICITED_WITHOUT_WRITE)
            return None
        if pdu.attr > 4 and s.strict:
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.RESERVED_TASK_ATTRIBUTE)
            return None
        cmd = Cmd(pdu, self)
        s.tasks[cmd.itt] = cmd
        if self._aborted_itts:
            self._aborted_itts.discard(cmd.itt)  # the ITT is live again
        dlen = len(pdu.data)
        if not cmd.write:
            if dlen:
                # Data with a non-write command: nothing can take it.
                cmd.fail(FAIL_UNEXPECTED_UNSOLICITED)
            return cmd
        edtl = cmd.edtl
        if edtl > MAX_WRITE_BUFFER:
            cmd.fail(FAIL_TRANSFER_TOO_LONG)
        elif s.writes.take(edtl):
            # The whole command is admitted at once, so it can always receive all its data;
            # memory is only allocated burst by burst as the data comes.
            cmd.reserved = edtl
        else:
            cmd.fail(FAIL_TASK_SET_FULL)
        if dlen:
            if not self.immediate_data:
                cmd.fail(FAIL_UNEXPECTED_UNSOLICITED)
            elif dlen > edtl or dlen > self.first_burst:
                cmd.fail(FAIL_INCORRECT_DATA_AMOUNT)
        received = cmd.received = min(dlen, edtl)
        cmd.next_r2t_offset = received
        end = received
        if not pdu.final:
            # Unsolicited Data-Out follows, up to FirstBurstLength in all.
            end = min(edtl, self.first_burst)
            if self.initial_r2t or end <= received:
                cmd.fail(FAIL_UNEXPECTED_UNSOLICITED)
                # Take what comes anyway so its Data-Out is not an unknown task.
                end = max(end, received)
        buf = None
        if received and cmd.failed is None:
            if end == received:  # the whole burst came with the command: one copy, no zero-fill
                buf = bytearray(pdu.data)
            else:
                buf = bytearray(end)  # the unsolicited burst, immediate data first
                buf[:received] = pdu.data
        if end > received:
            cmd.seqs[RESERVED_TAG] = seq = Seq(0, end, RESERVED_TAG, buf)
            seq.next_offset = received
            cmd.next_r2t_offset = end
        elif buf is not None:
            cmd.parts.append((0, buf))
        return cmd

    def _activate(self, cmd: Cmd) -> None:
        """ARRIVED -> ACTIVE: its CmdSN turn came (or it is immediate).  Solicit its data or run it."""
        self.session.created_ops += 1
        cmd.state = ACTIVE
        if cmd.failed is None:
            if not cmd.write:
                self._submit(cmd)  # nothing to gather
                return
            self._send_r2ts(cmd)
        self._maybe_submit(cmd)

    def _send_r2ts(self, cmd: Cmd) -> None:
        open_r2t = len(cmd.seqs) - (RESERVED_TAG in cmd.seqs)
        s = self.session
        while cmd.next_r2t_offset < cmd.edtl and open_r2t < self.max_r2t:
            off = cmd.next_r2t_offset
            n = min(self.max_burst, cmd.edtl - off)
            ttt = self._next_ttt()
            cmd.seqs[ttt] = Seq(off, off + n, ttt)
            cmd.next_r2t_offset = off + n
            encoders.r2t(self.output, cmd.raw_lun, cmd.itt, ttt, self.statsn, s.exp_cmdsn, s.max_cmdsn, cmd.r2tsn,
                         off, n)
            cmd.r2tsn += 1
            open_r2t += 1

    def _maybe_submit(self, cmd: Cmd) -> None:
        if cmd.state != ACTIVE or cmd.seqs:
            return
        failed = cmd.failed
        if failed is None and cmd.write and cmd.next_r2t_offset < cmd.edtl:
            return  # more R2Ts to come
        if failed is not None:
            s = self.session
            encoders.scsi_response(self.output, cmd.itt, failed.status, failed.sense, 0, 0, 0, self._take_statsn(),
                                   s.exp_cmdsn, s.max_cmdsn, cmd.datasn + cmd.r2tsn)
            if failed.sense:
                self._sense_sent(cmd, failed.sense)
            self._finish(cmd)
            return
        self._submit(cmd)

    def _submit(self, cmd: Cmd) -> None:
        """ACTIVE -> SUBMITTED: all data is in; build the ScsiTask and hand it to the SCSI layer."""
        s = self.session
        nexus, device = s.nexus, s.device
        assert nexus is not None and device is not None  # a discovery session rejects SCSI commands
        attr = _ATTRS[cmd.attr] if cmd.attr < len(_ATTRS) else TaskAttr.SIMPLE
        data_out: DataOutPayload | None = None
        if cmd.write:
            parts = cmd.parts
            if len(parts) == 1:
                data_out = memoryview(parts[0][1])
            elif parts:
                parts.sort(key=_offset)
                data_out = [memoryview(b) for _off, b in parts]
            else:
                data_out = b""
        task = ScsiTask(
            nexus,
            cmd.lun,
            cmd.cdb,
            cmd.itt,
            attr,
            expected_len=cmd.edtl,
            data_out=data_out,
            on_done=self._on_done,
            bidi_read_len=cmd.bidi_len,
        )
        task.transport_ref = cmd
        cmd.task = task
        cmd.state = SUBMITTED
        try:
            device.submit(task)
        except Exception:  # noqa: BLE001 - a SCSI layer bug must not kill the connection
            log.exception("%s: SCSI layer failed on CDB %s", self.peer, cmd.cdb.hex())
            if cmd.state == SUBMITTED:
                task.status = CHECK_CONDITION
                task.sense = SENSE_INTERNAL_FAILURE
                task.data_in = []
                task.data_in_len = 0
                self._on_done(task)

    def _finish(self, cmd: Cmd) -> None:
        """-> DONE: answered, failed or aborted; its slot and write buffer are free."""
        cmd.state = DONE
        self.session.release(cmd)

    def _on_done(self, task: ScsiTask) -> None:
        cmd = task.transport_ref
        if not isinstance(cmd, Cmd) or cmd.state != SUBMITTED:
            return  # exactly-once guard
        # Break the Cmd <-> ScsiTask cycle so both are freed by refcounting right away:
        # leaving one cycle per command to the cyclic GC costs more than the rest of it.
        cmd.task = None
        task.transport_ref = None
        self._finish(cmd)
        if task.aborted or cmd.aborted or self.closed or cmd.conn is not self:
            return  # aborted tasks get no response (RFC 7143 4.2.3.1); a dead link neither
        in_batch = bool(self.output.buffers)
        self._complete(cmd, task)
        if not in_batch:
            self.notify()

    def _complete(self, cmd: Cmd, task: ScsiTask) -> None:
        status = task.status
        sense = task.sense
        flags = residual = bidi_flags = bidi_residual = 0
        send = 0
        if cmd.read:
            # Read residuals: what the SCSI layer produced against what the initiator expects.
            exp_in = cmd.bidi_len if cmd.write else cmd.edtl
            have = task.data_in_len
            send = min(have, exp_in)
            if send:
                # Never trust a length over the buffers actually handed back.
                bufs = task.data_in
                avail = len(bufs[0]) if len(bufs) == 1 else sum(len(b) for b in bufs)
                if avail < send:
                    log.error("%s: CDB %s: data_in_len %d but %d bytes of data", self.peer, cmd.cdb[:1].hex(),
                              have, avail)
                    send = avail
            if have > exp_in:
                rflags, rres = encoders.OVERFLOW, have - exp_in
            elif have < exp_in:
                rflags, rres = encoders.UNDERFLOW, exp_in - have
            else:
                rflags, rres = 0, 0
            if cmd.write:
                bidi_flags, bidi_residual = rflags << encoders.BIDI_SHIFT, rres
            else:
                flags, residual = rflags, rres
        if cmd.write:
            xfer = task.xfer_len
            if xfer > cmd.edtl:
                flags, residual = encoders.OVERFLOW, xfer - cmd.edtl
            elif xfer < cmd.edtl:
                flags, residual = encoders.UNDERFLOW, cmd.edtl - xfer
        elif not cmd.read:
            # No data expected: whatever the CDB asked to move is an overflow.
            asked = max(task.xfer_len, task.data_in_len)
            if asked:
                flags, residual = encoders.OVERFLOW, asked
        s = self.session
        # Observability, inline (this runs for every command): the LUN's bytes, errors and
        # latency histogram (stats.py); a LUN the engine does not map has no entry.
        st = s.io_stats.get(cmd.lun)
        if st is not None:
            if cmd.write:
                op = st.write
                op.bytes += xfer if xfer < cmd.edtl else cmd.edtl
            else:
                op = st.read if cmd.read else st.other
                op.bytes += send
            lat = clock_ns() - cmd.t0
            op.latency_ns += lat
            op.hist[(lat >> 10).bit_length()] += 1  # wide enough for any ns count; commands = its sum
            if status:
                op.errors += 1
        if sense:
            self._sense_sent(cmd, sense)
        if send and not sense and not cmd.write:
            # Phase collapse: status in the last Data-In.
            cmd.datasn = encoders.data_in(self.output, cmd.itt, task.data_in, send, cmd.datasn, self.max_xmit,
                                          self.max_burst, s.exp_cmdsn, s.max_cmdsn, status, flags, residual,
                                          self._take_statsn())
            return
        if send:
            cmd.datasn = encoders.data_in(self.output, cmd.itt, task.data_in, send, cmd.datasn, self.max_xmit,
                                          self.max_burst, s.exp_cmdsn, s.max_cmdsn)
        encoders.scsi_response(self.output, cmd.itt, status, sense, flags | bidi_flags, residual, bidi_residual,
                               self._take_statsn(), s.exp_cmdsn, s.max_cmdsn, cmd.datasn + cmd.r2tsn)

    def _sense_sent(self, cmd: Cmd, sense: bytes) -> None:
        """A CHECK CONDITION: if the initiator caused it, the rule goes in the report."""
        rule = V.scsi_rule(sense, cmd.cdb)
        if rule is not None:
            key, asc, ascq, _sks = V.parse_sense(sense) or (0, 0, 0, b"")
            self.violation(rule, f"CHECK CONDITION {key:02x}/{asc:02x}/{ascq:02x}",
                           f"CDB {bytes(cmd.cdb[:16]).hex()} LUN {cmd.lun} ITT {cmd.itt:#x}")

    # --- Data-Out -----------------------------------------------------------------------

    def _data_out(self, pdu: DataOut, failed: Failure | None = None) -> None:
        self._ack_statsn(pdu.expstatsn)
        cmd = self.session.tasks.get(pdu.itt)
        if cmd is None or cmd.conn is not self or cmd.state >= SUBMITTED:
            if pdu.itt in self._aborted_itts:
                return  # data still in flight for an aborted task: discarded silently
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.DATA_OUT_NO_TASK)
            return
        seq = cmd.seqs.get(pdu.ttt)
        if seq is None:
            # Unsolicited data not allowed, or a TTT we never issued (or already closed).
            unsolicited = pdu.ttt == RESERVED_TAG
            if unsolicited:
                self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.UNSOLICITED_NOT_ALLOWED)
            else:
                self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.DATA_OUT_UNKNOWN_TTT)
            cmd.fail(FAIL_UNEXPECTED_UNSOLICITED if unsolicited else FAIL_INCORRECT_DATA_AMOUNT)
            self._maybe_submit(cmd)
            return
        n = len(pdu.data) if failed is None else 0
        if failed is not None:
            cmd.fail(failed)
            # The digest-failed PDU is taken as received: ERL 0 has no recovery for it.
            seq.exp_datasn = (pdu.datasn + 1) & SERIAL_MASK
            if pdu.offset >= seq.next_offset:
                seq.next_offset = pdu.offset
        elif cmd.failed is not None:
            # Already doomed: absorb the rest of its data quietly, one Reject was enough.
            seq.exp_datasn = (pdu.datasn + 1) & SERIAL_MASK
        elif pdu.datasn != seq.exp_datasn or pdu.offset != seq.next_offset or pdu.offset + n > seq.end:
            # Sequence error: DataSN or buffer offset out of order, or data beyond the burst.
            log.info("%s: Data-Out ITT %#x DataSN %d/%d offset %d/%d len %d: sequence error", self.peer,
                     pdu.itt, pdu.datasn, seq.exp_datasn, pdu.offset, seq.next_offset, n)
            self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.DATA_OUT_OUT_OF_ORDER)
            cmd.fail(FAIL_INCORRECT_DATA_AMOUNT)
            seq.exp_datasn = (pdu.datasn + 1) & SERIAL_MASK
        else:
            if n:
                buf = seq.buf
                if buf is None:
                    buf = seq.buf = bytearray(seq.end - seq.start)  # the burst's memory, as its data comes
                pos = pdu.offset - seq.start
                buf[pos : pos + n] = pdu.data  # the one copy of write data
            seq.next_offset += n
            seq.exp_datasn += 1
        if pdu.final:
            if failed is None and cmd.failed is None and seq.next_offset != seq.end:
                # F bit before the burst is complete.
                self.reject(RejectReason.PROTOCOL_ERROR, pdu, V.DATA_OUT_SHORT_BURST)
                cmd.fail(FAIL_INCORRECT_DATA_AMOUNT)
            del cmd.seqs[seq.ttt]
            if seq.buf is not None and cmd.failed is None:
                cmd.parts.append((seq.start, seq.buf))
            cmd.received += seq.end - seq.start
            if cmd.state == ACTIVE:
                if cmd.failed is None:
                    self._send_r2ts(cmd)
                self._maybe_submit(cmd)

    # --- NOP ----------------------------------------------------------------------------

    def _nop_out(self, pdu: NopOut) -> None:
        self.session.counters.nop_outs += 1
        if pdu.itt == RESERVED_TAG:
            if pdu.ttt != RESERVED_TAG:
                if pdu.ttt == self.ping_ttt:
                    self.ping_ttt = None
                elif self.session.strict:
                    self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.NOP_UNKNOWN_TTT)
                else:
                    log.debug("%s: NOP-Out answers unknown TTT %#x", self.peer, pdu.ttt)
            return
        if pdu.ttt != RESERVED_TAG:
            # An initiator ping must carry TTT 0xffffffff (RFC 7143 11.18.2).
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.NOP_PING_WITH_TTT)
            return
        # Echo the data: the receive buffer is reused after this batch.
        self._send_status_pdu(NopIn(itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun, data=bytes(pdu.data)))

    def ping(self) -> bool:
        """Queue a target NOP-In ping; False if the previous one was never answered."""
        if self.ping_ttt is not None:
            return False
        self.ping_ttt = self._next_ttt()
        self._send_status_pdu(NopIn(itt=RESERVED_TAG, ttt=self.ping_ttt, lun=0), advance=False)
        return True

    # --- Task management ----------------------------------------------------------------

    def _tmf(self, pdu: TaskMgmtRequest) -> None:
        fn = pdu.function
        lun = lun_to_int(pdu.lun)
        s = self.session
        s.counters.count(s.counters.tmfs, fn)
        dev, nexus = s.device, s.nexus
        assert dev is not None and nexus is not None  # a discovery session rejects TMFs
        cold = False
        resp: TmfResponse
        if fn == TmfFunction.ABORT_TASK:
            resp = self._abort_task(pdu, lun)
        elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            scope = [s] if fn == TmfFunction.ABORT_TASK_SET else list(s.peers())
            for sess in scope:
                if sess.connection is not None:
                    sess.connection.abort_local(lun)
            if fn == TmfFunction.ABORT_TASK_SET:
                r = dev.abort_task_set(nexus, lun)
            elif fn == TmfFunction.CLEAR_TASK_SET:
                r = dev.clear_task_set(nexus, lun)
            else:
                r = dev.lun_reset(nexus, lun)
            for sess in scope:
                if sess.connection is not None:
                    sess.connection.reap_aborted()
            resp = _TMF_MAP.get(r, TmfResponse.REJECTED)
        elif fn == TmfFunction.CLEAR_ACA:
            resp = _TMF_MAP.get(dev.clear_aca(nexus, lun), TmfResponse.REJECTED)
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET) and not (
            s.resets.cold if fn == TmfFunction.TARGET_COLD_RESET else s.resets.warm
        ):
            # A reset ends every task of every initiator on the target (a cold one every
            # session too): refused unless the target allows it (RFC 7143 11.6.1 response 6).
            _REFUSALS.log(log, logging.INFO, self.peer.rpartition(":")[0], "%s: %s from %s refused (not allowed on %s)",
                          self.peer, TmfFunction(fn).name, s.initiator_name, s.target.iqn if s.target else "?")
            resp = TmfResponse.AUTHORIZATION_FAILED
        elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            cold = fn == TmfFunction.TARGET_COLD_RESET
            peers = list(s.peers())
            for sess in peers:
                if sess.connection is not None:
                    sess.connection.abort_local(None)
            r = dev.target_reset(nexus, cold)
            for sess in peers:
                if sess.connection is not None:
                    sess.connection.reap_aborted()
            resp = _TMF_MAP.get(r, TmfResponse.REJECTED)
        elif fn == TmfFunction.TASK_REASSIGN:
            # Only meaningful with connection recovery (ERL 2); we run at ERL 0.
            resp = TmfResponse.REASSIGNMENT_UNSUPPORTED
        else:
            resp = TmfResponse.NOT_SUPPORTED

        def respond() -> None:
            if self.closed:
                return
            in_batch = bool(self.output.buffers)
            self._send_status_pdu(TaskMgmtResponse(response=resp, itt=pdu.itt))
            if not in_batch:
                self.notify()  # answered later than the request's batch: flush it
            if cold and resp == TmfResponse.COMPLETE:
                # A cold reset ends every connection of the target after this response.
                self.on_event(Notice.COLD_RESET, self)

        if fn in (TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            dev.when_settled(respond)  # a reset answers once it reached every gateway of the LU
        else:
            respond()

    def _abort_task(self, pdu: TaskMgmtRequest, lun: int) -> TmfResponse:
        s = self.session
        cmd = s.tasks.get(pdu.rtt)
        if cmd is None or cmd.conn is not self:
            # Not here.  If its CmdSN is still ahead of us the command has not arrived:
            # answer "function complete" and drop it when it comes (RFC 7143 11.5.1).
            ref = pdu.refcmdsn
            if s.in_window(ref) and ref not in s.held:
                s.discard_cmdsn.add(ref)
                return TmfResponse.COMPLETE
            return TmfResponse.NO_SUCH_TASK
        if cmd.lun != lun:
            return TmfResponse.NO_SUCH_TASK
        if cmd.state < SUBMITTED:
            self._abort_cmd(cmd)
            return TmfResponse.COMPLETE
        if cmd.state == DONE:
            return TmfResponse.NO_SUCH_TASK
        assert s.device is not None and s.nexus is not None
        r = s.device.abort_task(s.nexus, lun, cmd.itt)
        if r == TmfResult.COMPLETE:
            self._abort_cmd(cmd)
        return _TMF_MAP.get(r, TmfResponse.REJECTED)

    def _abort_cmd(self, cmd: Cmd) -> None:
        cmd.aborted = True
        if cmd.task is not None:
            cmd.task.aborted = True
        self._aborted_itts.add(cmd.itt)
        if len(self._aborted_itts) > 4096:
            self._aborted_itts.clear()
            self._aborted_itts.add(cmd.itt)
        s = self.session
        held = [sn for sn, it in s.held.items() if it is cmd]
        for sn in held:
            s.held[sn] = None  # the CmdSN still has to be consumed in order
        cmd.seqs.clear()
        self._finish(cmd)

    def abort_local(self, lun: int | None) -> None:
        """Abort commands of ``lun`` (None: all) still at the iSCSI layer (awaiting data/order)."""
        for cmd in list(self.session.tasks.values()):
            if cmd.conn is self and cmd.state < SUBMITTED and (lun is None or cmd.lun == lun):
                self._abort_cmd(cmd)

    def reap_aborted(self) -> None:
        """After a SCSI-layer TMF: forget submitted commands the SCSI layer aborted."""
        for cmd in list(self.session.tasks.values()):
            if cmd.conn is self and cmd.state == SUBMITTED and cmd.task is not None and cmd.task.aborted:
                self._abort_cmd(cmd)

    def abort_all(self) -> None:
        """Connection gone (or reinstated): every task of it ends without a response."""
        s = self.session
        for cmd in list(s.tasks.values()):
            if cmd.conn is not self:
                continue
            if cmd.state == SUBMITTED and cmd.task is not None:
                if s.device is not None and s.nexus is not None and not cmd.task.aborted:
                    try:
                        s.device.abort_task(s.nexus, cmd.lun, cmd.itt)
                    except Exception:  # noqa: BLE001 - cleanup must go on
                        log.exception("%s: abort of ITT %#x failed", self.peer, cmd.itt)
                cmd.task.aborted = True
            self._abort_cmd(cmd)

    # --- Text ---------------------------------------------------------------------------

    def _text_req(self, pdu: TextRequest) -> None:
        """Text exchange (SendTargets, redeclarations): the TextHandler does the keys,
        continuation and splitting; we stamp and send."""
        th = self._text_handler
        if th is None:
            s = self.session
            th = self._text_handler = TextHandler(
                self.policy,
                session_type="Discovery" if s.discovery else "Normal",
                initiator_name=s.initiator_name,
                target_iqn=s.target.iqn if s.target else None,
                params=self.conn_params,
            )
        pdu.data = bytes(pdu.data)
        self.session.counters.texts += 1
        for rsp in th.receive(pdu):
            self._send_status_pdu(rsp)
            if isinstance(rsp, Reject) and th.rule is not None:
                s = self.session
                s.counters.count(s.counters.rejects, rsp.reason)
                self.violation(th.rule, f"Reject ({RejectReason(rsp.reason).name.lower().replace('_', ' ')})",
                               repr(pdu), logging.INFO)
        self.max_xmit = self.conn_params.max_xmit_dsl  # MaxRecvDataSegmentLength may be redeclared

    # --- Logout / async -----------------------------------------------------------------

    def _logout(self, pdu: LogoutRequest) -> None:
        reason = pdu.reason
        if reason == LogoutReason.CLOSE_SESSION or (reason == LogoutReason.CLOSE_CONNECTION and pdu.cid == self.cid):
            resp = LogoutOutcome.SUCCESS
        elif reason == LogoutReason.CLOSE_CONNECTION:
            resp = LogoutOutcome.CID_NOT_FOUND  # we run one connection per session
        elif reason == LogoutReason.REMOVE_FOR_RECOVERY:
            resp = LogoutOutcome.RECOVERY_UNSUPPORTED  # connection recovery needs ERL 2
        else:
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu, V.LOGOUT_REASON)
            return
        t2w = self.session.params.default_time2wait if resp == LogoutOutcome.RECOVERY_UNSUPPORTED else 0
        self._send_status_pdu(LogoutResponse(response=resp, itt=pdu.itt, time2wait=t2w, time2retain=0))
        if resp == LogoutOutcome.SUCCESS:
            # Closing the only connection ends the session; tasks still running are aborted.
            self.abort_all()
            self._transition(CLOSING)
            self.on_event(Notice.LOGOUT, self)

    def request_logout(self, within: int = 5) -> None:
        """Async Message event 1: the initiator should log out within ``within`` seconds."""
        if self.closing:
            return
        self.send_async(AsyncEvent.LOGOUT_REQUEST, param3=within)

    def announce_drop(self) -> None:
        """Async Message event 3: every connection of the session is about to be dropped
        (with MaxConnections=1 that is this one); Time2Wait/Time2Retain tell the initiator
        when it may come back and how long task state would be kept."""
        if self.closed:
            return
        p = self.session.params
        self.send_async(AsyncEvent.DROP_ALL_CONNECTIONS, param2=p.default_time2wait, param3=p.default_time2retain)

    def send_async(self, event: AsyncEvent, param1: int = 0, param2: int = 0, param3: int = 0,
                   data: bytes = b"") -> None:
        """Asynchronous Message (RFC 7143 11.9): StatSN advances, as for any status."""
        c = self.session.counters
        c.count(c.async_messages, event)
        self._send_status_pdu(AsyncMessage(event=event, lun=0, param1=param1, param2=param2, param3=param3,
                                           data=data))

    # --- lifecycle ----------------------------------------------------------------------

    def drop(self) -> None:
        """Fatal error: stop processing input, close after what is queued is written."""
        self._transition(CLOSING)
        self.on_event(Notice.DROP, self)

    def take_output(self) -> list[Payload]:
        return self.output.take()

    def connection_lost(self) -> None:
        if not self._transition(CLOSED):
            return
        self.abort_all()
        self.output.buffers = []
        self._text_handler = None

