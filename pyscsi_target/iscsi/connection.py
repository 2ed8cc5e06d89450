"""Sans-IO full-feature-phase machine for one iSCSI connection (RFC 7143).

``Connection.handle(event)`` takes what ``PDUReader`` yields (PDU, DigestError,
OversizedPDU) and appends the wire form of every PDU the target sends to ``out`` (a
list for ``transport.writelines``).  Completions that arrive later (the SCSI layer's
``on_done`` on the loop) append too and call ``notify`` so the adapter flushes once.
No sockets, no timers: the adapter calls ``ping()`` when the link has been idle.

Data path choices (issue 5):
- Data-In, R2T and SCSI Response headers are packed with one precompiled ``struct``
  into a fresh 48-byte bytearray; no PDU objects on that path.
- Read payload goes out as memoryview slices of the SCSI layer's buffers (no copy).
- Write payload is copied once, from the receive buffer into one bytearray per command
  allocated at the command's arrival (ExpectedDataTransferLength).
- Status rides in the final Data-In (phase collapse) unless there is sense data.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from crc32c import crc32c

from ..scsi.task import MAX_TRANSFER_BYTES, ScsiTask, TaskAttr, TmfResult
from . import pdu as P
from .params import SessionParams
from .pdu import (
    PDU,
    RESERVED_TAG,
    DigestError,
    Op,
    OversizedPDU,
    RejectReason,
    lun_to_int,
)
from .session import SERIAL_MASK, Session, sn_le, sn_lt

log = logging.getLogger(__name__)

# One layout covers the BHS of Data-In, R2T and SCSI Response:
# opcode, flags, byte2, byte3, (TotalAHSLength << 24 | DataSegmentLength), LUN, ITT,
# TTT/SNACK tag, StatSN, ExpCmdSN, MaxCmdSN, DataSN/R2TSN/ExpDataSN, offset/bidi residual,
# residual/desired length.
_HDR = struct.Struct(">BBBBIQIIIIIIII")
_CRC = struct.Struct("<I")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")

# Data-In flags
_F = 0x80
_O = 0x04
_U = 0x02
_S = 0x01

# Task management functions (RFC 7143 11.5.1) and responses (11.6.1)
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8

TMF_RSP_COMPLETE = 0
TMF_RSP_NO_TASK = 1
TMF_RSP_NO_LUN = 2
TMF_RSP_REASSIGN_UNSUPPORTED = 4
TMF_RSP_NOT_SUPPORTED = 5
TMF_RSP_REJECTED = 255

_TMF_MAP = {
    TmfResult.COMPLETE: TMF_RSP_COMPLETE,
    TmfResult.NO_SUCH_TASK: TMF_RSP_NO_TASK,
    TmfResult.NO_SUCH_LUN: TMF_RSP_NO_LUN,
    TmfResult.NOT_SUPPORTED: TMF_RSP_NOT_SUPPORTED,
    TmfResult.REJECTED: TMF_RSP_REJECTED,
}

# Sense the transport itself raises: (key, asc, ascq), key ABORTED COMMAND
SENSE_UNEXPECTED_UNSOLICITED = (0x0B, 0x0C, 0x0C)
SENSE_INCORRECT_DATA_AMOUNT = (0x0B, 0x0C, 0x0D)
SENSE_PROTOCOL_CRC_ERROR = (0x0B, 0x47, 0x05)
SENSE_INVALID_FIELD_IN_CDB = (0x05, 0x24, 0x00)

CHECK_CONDITION = 0x02
TASK_SET_FULL = 0x28
# Not a sense key: ``Cmd.failed`` marker for "answer TASK SET FULL status, no sense".
FAIL_TASK_SET_FULL = (0x100, 0, 0)
_ATTRS = tuple(TaskAttr)  # task attribute codes 0..4, looked up without an enum call

# The largest ExpectedDataTransferLength we preallocate a write buffer for: the SCSI layer's
# MAXIMUM TRANSFER LENGTH (scsi.task contract), so the two cannot drift apart.  And the most
# write-buffer memory one session may hold at once (always room for one maximal command).
MAX_WRITE_BUFFER = MAX_TRANSFER_BYTES
MAX_SESSION_WRITE_BUFFERS = max(256 * 1024 * 1024, MAX_WRITE_BUFFER)


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """SPC-4 fixed-format sense data (response code 0x70, current error)."""
    s = bytearray(18)
    s[0] = 0x70
    s[2] = key
    s[7] = 10
    s[12] = asc
    s[13] = ascq
    return bytes(s)


class Seq:
    """One Data-Out sequence: the unsolicited burst or the answer to one R2T."""

    __slots__ = ("start", "end", "next_offset", "exp_datasn", "ttt")

    def __init__(self, start: int, end: int, ttt: int) -> None:
        self.start = start
        self.end = end
        self.next_offset = start
        self.exp_datasn = 0
        self.ttt = ttt


class Cmd:
    """Transport state of one SCSI command (ScsiTask.transport_ref points here)."""

    __slots__ = (
        "itt", "cmdsn", "lun", "raw_lun", "cdb", "attr", "read", "write", "edtl", "bidi_len",
        "immediate", "buf", "received", "seqs", "next_r2t_offset", "r2tsn", "datasn",
        "failed", "state", "counted", "aborted", "task", "conn",
    )

    SETUP, ACTIVE, SUBMITTED, DONE = range(4)

    def __init__(self, pdu: P.ScsiCommand, conn: Connection) -> None:
        self.itt = pdu.itt
        self.cmdsn = pdu.cmdsn
        self.raw_lun = pdu.lun
        raw = pdu.lun
        # Most initiators address LUN 0..255 with peripheral addressing: decode inline.
        self.lun = raw >> 48 if raw & 0xFF00FFFFFFFFFFFF == 0 else lun_to_int(raw)
        self.cdb = pdu.full_cdb() if pdu.ahs else pdu.cdb
        self.attr = pdu.attr
        self.read = bool(pdu.read)
        self.write = bool(pdu.write)
        self.edtl = pdu.edtl
        self.bidi_len = (pdu.bidi_read_length() or 0) if (self.read and self.write) else 0
        self.immediate = pdu.immediate
        self.buf: bytearray | None = None
        self.received = 0  # Data-Out bytes accounted for (immediate + sequences closed)
        self.seqs: dict[int, Seq] = {}  # TTT (RESERVED_TAG: unsolicited) -> open sequence
        self.next_r2t_offset = 0
        self.r2tsn = 0
        self.datasn = 0  # Data-In PDUs sent
        self.failed: tuple[int, int, int] | None = None  # sense to end with once data is in
        self.state = Cmd.SETUP
        self.counted = False
        self.aborted = False
        self.task: ScsiTask | None = None
        self.conn = conn


class Connection:
    """One connection in full feature phase."""

    def __init__(
        self,
        session: Session,
        cid: int,
        statsn: int,
        policy: Any = None,
        peer: str = "",
        notify: Callable[[], None] | None = None,
        on_event: Callable[[str, Connection], None] | None = None,
        conn_params: SessionParams | None = None,
    ) -> None:
        self.session = session
        self.cid = cid
        self.statsn = statsn & SERIAL_MASK  # StatSN of the next status we send
        self.exp_statsn = statsn
        self.policy = policy  # the engine's LoginPolicy for this connection (SendTargets)
        self.peer = peer
        self.notify = notify or (lambda: None)
        self.on_event = on_event or (lambda _ev, _c: None)
        self._text_handler: Any = None
        p = session.params
        # Digests and data segment sizes are per connection (a reinstated connection
        # negotiates its own); the rest is session-wide.
        cp = self.conn_params = conn_params or p
        self.hd = cp.header_digest
        self.dd = cp.data_digest
        self.max_xmit = cp.max_xmit_dsl
        self.max_burst = p.max_burst_length
        self.first_burst = p.first_burst_length
        self.initial_r2t = p.initial_r2t
        self.immediate_data = p.immediate_data
        self.max_r2t = max(1, p.max_outstanding_r2t)
        self.out: list[Any] = []
        self.closing = False  # close once ``out`` has been written (logout, fatal error)
        self.closed = False
        self._ttt = 0
        self.ping_ttt: int | None = None  # outstanding target NOP-In ping
        self._aborted_itts: set[int] = set()
        session.connection = self

    # --- small helpers ----------------------------------------------------------------

    def _next_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        return self._ttt

    def _take_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & SERIAL_MASK
        return sn

    def _send_pdu(self, pdu: PDU) -> None:
        self.out.extend(pdu.to_buffers(self.hd, self.dd))

    def _stamp(self, pdu: Any, advance: bool = True) -> Any:
        """Fill StatSN/ExpCmdSN/MaxCmdSN of a response PDU object."""
        s = self.session
        pdu.statsn = self._take_statsn() if advance else self.statsn
        pdu.expcmdsn = s.exp_cmdsn
        pdu.maxcmdsn = s.max_cmdsn
        return pdu

    def _emit(self, hdr: bytearray, parts: list[Any] | None = None, dlen: int = 0) -> None:
        """Append one fast-path PDU: header (digest added here), payload parts, padding."""
        out = self.out
        if self.hd:
            hdr += _CRC.pack(crc32c(hdr))
        out.append(hdr)
        if not dlen or parts is None:
            return
        out.extend(parts)
        pad = _PADS[dlen & 3]
        if self.dd:
            crc = 0
            for p in parts:
                crc = crc32c(p, crc)
            if pad:
                crc = crc32c(pad, crc)
            out.append(pad + _CRC.pack(crc))
        elif pad:
            out.append(pad)

    def reject(self, reason: int, bad: PDU | None, raw_header: bytes | None = None) -> None:
        """Reject PDU carrying the offending header (RFC 7143 11.17)."""
        r = self._stamp(P.Reject(reason=reason, datasn=0))
        if raw_header is None and isinstance(bad, P.UnknownPDU):
            raw_header = bad.bhs  # type: ignore[attr-defined]
        if raw_header is None and bad is not None:
            try:
                raw_header = bytes(bad.encode_header(0, len(bad.data))[: P.BHS_LEN])
            except Exception:  # noqa: BLE001 - an unencodable header still deserves a Reject
                raw_header = bytes(P.BHS_LEN)
        r.data = raw_header or bytes(P.BHS_LEN)
        self._send_pdu(r)

    # --- input ------------------------------------------------------------------------

    def handle(self, ev: PDU | DigestError | OversizedPDU) -> None:
        if self.closed:
            return
        if isinstance(ev, PDU):
            self._handle_pdu(ev)
        elif isinstance(ev, DigestError):
            self._digest_error(ev)
        else:
            self._oversized(ev)

    def _handle_pdu(self, pdu: PDU) -> None:
        s = self.session
        if type(pdu) is P.ScsiCommand and not pdu.immediate and pdu.cmdsn == s.exp_cmdsn and not (
            s.discovery or s.discard_cmdsn
        ):
            # Fast path: the next SCSI command in CmdSN order (almost every PDU under load).
            if pdu.expstatsn != self.exp_statsn:
                self._ack_statsn(pdu.expstatsn)
            itt = pdu.itt
            if not pdu.write and pdu.final and not pdu.data and itt not in s.tasks and itt != RESERVED_TAG:
                # A read or no-data command: nothing to gather, straight to the SCSI layer.
                cmd = Cmd(pdu, self)
                s.tasks[itt] = cmd
                if self._aborted_itts:
                    self._aborted_itts.discard(itt)
                cmd.counted = True
                s.active += 1
                s.advance()
                s.created_ops += 1
                cmd.state = Cmd.ACTIVE
                self._submit(cmd)
            else:
                cmd = self._setup_cmd(pdu)
                if cmd is None:
                    self._consume_in_order(pdu.cmdsn)
                    return
                cmd.counted = True
                s.active += 1
                s.advance()
                self._activate(cmd)
            if s.held:
                self._drain_held()
            return
        op = pdu.opcode if not isinstance(pdu, P.UnknownPDU) else -1
        if op == Op.DATA_OUT:  # not CmdSN-numbered
            self._data_out(pdu)  # type: ignore[arg-type]
            return
        if op == Op.SNACK:
            # ErrorRecoveryLevel 0: no retransmission service (RFC 7143 11.16)
            self.reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu)
            return
        if op not in (Op.NOP_OUT, Op.SCSI_CMD, Op.TMF_REQ, Op.TEXT_REQ, Op.LOGOUT_REQ):
            if op == -1:
                self.reject(RejectReason.COMMAND_NOT_SUPPORTED, None, getattr(pdu, "bhs", None))
            else:  # a target opcode or a login request after login
                self.reject(RejectReason.PROTOCOL_ERROR, pdu)
            return
        self._ack_statsn(pdu.expstatsn)  # type: ignore[attr-defined]
        if s.discovery and op in (Op.SCSI_CMD, Op.TMF_REQ):
            self.reject(RejectReason.PROTOCOL_ERROR, pdu)
            if not pdu.immediate and s.in_window(pdu.cmdsn):  # type: ignore[attr-defined]
                self._consume_in_order(pdu.cmdsn)  # type: ignore[attr-defined]
            return
        if op == Op.NOP_OUT and pdu.itt == RESERVED_TAG:  # type: ignore[attr-defined]
            # A ping answer or a one-way NOP: no CmdSN consumed (must be immediate).
            self._nop_out(pdu)  # type: ignore[arg-type]
            return
        if pdu.immediate:
            if op == Op.SCSI_CMD:
                cmd = self._setup_cmd(pdu)  # type: ignore[arg-type]
                if cmd is not None:
                    self._activate(cmd)
            else:
                self._dispatch(pdu)
            return
        sn = pdu.cmdsn  # type: ignore[attr-defined]
        if not s.in_window(sn):
            # Outside [ExpCmdSN, MaxCmdSN]: silently ignored (RFC 7143 4.2.2.1).
            log.debug("CmdSN %d outside window [%d, %d], ignored", sn, s.exp_cmdsn, s.max_cmdsn)
            return
        if sn in s.held:
            log.debug("duplicate CmdSN %d ignored", sn)
            return
        if op == Op.SCSI_CMD:
            if sn in s.discard_cmdsn:  # aborted before it arrived
                s.discard_cmdsn.discard(sn)
                self._aborted_itts.add(pdu.itt)  # type: ignore[attr-defined]
                self._consume_in_order(sn)
                return
            cmd = self._setup_cmd(pdu)  # type: ignore[arg-type]
            if cmd is None:
                self._consume_in_order(sn)
                return
            cmd.counted = True
            s.active += 1
            item: Any = cmd
        else:
            item = pdu
        if sn == s.exp_cmdsn:
            s.advance()
            self._deliver(item)
            self._drain_held()
        else:
            if not isinstance(item, Cmd):
                pdu.data = bytes(pdu.data)  # outlives the receive buffer
            s.held[sn] = item
            s.update_window()

    def _consume_in_order(self, sn: int) -> None:
        """A command that was rejected or discarded still uses up its CmdSN."""
        s = self.session
        if sn == s.exp_cmdsn:
            s.advance()
            self._drain_held()
        else:
            s.held[sn] = None

    def _drain_held(self) -> None:
        s = self.session
        while s.held and s.exp_cmdsn in s.held:
            item = s.held.pop(s.exp_cmdsn)
            s.advance()
            if item is not None:
                self._deliver(item)

    def _deliver(self, item: Any) -> None:
        if isinstance(item, Cmd):
            if not item.aborted:
                self._activate(item)
        else:
            self._dispatch(item)

    def _dispatch(self, pdu: PDU) -> None:
        op = pdu.opcode
        if op == Op.NOP_OUT:
            self._nop_out(pdu)  # type: ignore[arg-type]
        elif op == Op.TMF_REQ:
            self._tmf(pdu)  # type: ignore[arg-type]
        elif op == Op.TEXT_REQ:
            self._text_req(pdu)  # type: ignore[arg-type]
        elif op == Op.LOGOUT_REQ:
            self._logout(pdu)  # type: ignore[arg-type]

    def _ack_statsn(self, exp_statsn: int) -> None:
        if sn_lt(self.exp_statsn, exp_statsn) and sn_le(exp_statsn, self.statsn):
            self.exp_statsn = exp_statsn

    def _digest_error(self, ev: DigestError) -> None:
        if ev.pdu is None:  # header digest: the byte stream cannot be trusted any more
            log.warning("%s: header digest error, dropping connection", self.peer)
            self.drop()
            return
        pdu = ev.pdu
        # Data digest: the PDU is discarded with a Reject (RFC 7143 7.8 / 11.17.1).
        self.reject(RejectReason.DATA_DIGEST_ERROR, pdu)
        op = getattr(pdu, "opcode", -1)  # an UnknownPDU has none
        if op == Op.DATA_OUT:
            # ERL 0: the data cannot be recovered; account for it so the command ends
            # with PROTOCOL SERVICE CRC ERROR once the rest of its data has arrived.
            self._data_out(pdu, failed=SENSE_PROTOCOL_CRC_ERROR)  # type: ignore[arg-type]
        elif op == Op.SCSI_CMD:
            self._bad_command(pdu, SENSE_PROTOCOL_CRC_ERROR)  # type: ignore[arg-type]
        elif not pdu.immediate and op in (Op.NOP_OUT, Op.TEXT_REQ) and pdu.itt != RESERVED_TAG:  # type: ignore[attr-defined]
            # The command is gone; its CmdSN must not block the window.
            if self.session.in_window(pdu.cmdsn):  # type: ignore[attr-defined]
                self._consume_in_order(pdu.cmdsn)  # type: ignore[attr-defined]

    def _oversized(self, ev: OversizedPDU) -> None:
        """DataSegmentLength above our MaxRecvDataSegmentLength: protocol error."""
        pdu = ev.pdu
        log.info("%s: PDU %s with %d data bytes > MaxRecvDataSegmentLength", self.peer, pdu, ev.length)
        self.reject(RejectReason.PROTOCOL_ERROR, pdu)
        op = getattr(pdu, "opcode", -1)  # an UnknownPDU has none
        if op == Op.DATA_OUT:
            cmd = self.session.tasks.get(pdu.itt)  # type: ignore[attr-defined]
            if cmd is not None and cmd.conn is self:
                self._fail(cmd, SENSE_INCORRECT_DATA_AMOUNT)
                self._close_seq_for(cmd, pdu)  # type: ignore[arg-type]
        elif op == Op.SCSI_CMD:
            self._bad_command(pdu, SENSE_INCORRECT_DATA_AMOUNT)  # type: ignore[arg-type]
        elif op in (Op.NOP_OUT, Op.TEXT_REQ, Op.TMF_REQ, Op.LOGOUT_REQ):
            if not pdu.immediate and self.session.in_window(pdu.cmdsn):  # type: ignore[attr-defined]
                self._consume_in_order(pdu.cmdsn)  # type: ignore[attr-defined]

    def _bad_command(self, pdu: P.ScsiCommand, sense: tuple[int, int, int]) -> None:
        """A SCSI Command whose immediate data was lost: it completes with ``sense``."""
        pdu.data = b""
        s = self.session
        if pdu.immediate:
            cmd = self._setup_cmd(pdu)
            if cmd is not None:
                self._fail(cmd, sense)
                self._activate(cmd)
            return
        if not s.in_window(pdu.cmdsn) or pdu.cmdsn in s.held:
            return
        cmd = self._setup_cmd(pdu)
        if cmd is None:
            self._consume_in_order(pdu.cmdsn)
            return
        self._fail(cmd, sense)
        cmd.counted = True
        s.active += 1
        if pdu.cmdsn == s.exp_cmdsn:
            s.advance()
            self._activate(cmd)
            self._drain_held()
        else:
            s.held[pdu.cmdsn] = cmd

    # --- SCSI Command -------------------------------------------------------------------

    def _setup_cmd(self, pdu: P.ScsiCommand) -> Cmd | None:
        """Create the command and take its immediate data (the one copy)."""
        s = self.session
        if pdu.itt == RESERVED_TAG or pdu.itt in s.tasks:
            # A reserved or duplicate ITT is an invalid field (RFC 7143 11.17.1).
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu)
            return None
        if not pdu.final and not pdu.write:
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu)
            return None
        cmd = Cmd(pdu, self)
        s.tasks[cmd.itt] = cmd
        if self._aborted_itts:
            self._aborted_itts.discard(cmd.itt)  # the ITT is live again
        dlen = len(pdu.data)
        if not cmd.write:
            if dlen:
                # Data with a non-write command: nothing can take it.
                self._fail(cmd, SENSE_UNEXPECTED_UNSOLICITED)
            return cmd
        edtl = cmd.edtl
        if edtl > MAX_WRITE_BUFFER:
            self._fail(cmd, SENSE_INVALID_FIELD_IN_CDB)
        elif s.write_buffered + edtl > MAX_SESSION_WRITE_BUFFERS:
            # Write buffers are allocated up front; a session may not pin unbounded memory.
            self._fail(cmd, FAIL_TASK_SET_FULL)
        else:
            cmd.buf = bytearray(edtl)
            s.write_buffered += edtl
        if dlen:
            if not self.immediate_data:
                self._fail(cmd, SENSE_UNEXPECTED_UNSOLICITED)
            elif dlen > edtl or dlen > self.first_burst:
                self._fail(cmd, SENSE_INCORRECT_DATA_AMOUNT)
            elif cmd.buf is not None:
                cmd.buf[:dlen] = pdu.data
        cmd.received = min(dlen, edtl)
        cmd.next_r2t_offset = cmd.received
        if not pdu.final:
            # Unsolicited Data-Out follows, up to FirstBurstLength in all.
            end = min(edtl, self.first_burst)
            if self.initial_r2t or end <= cmd.received:
                self._fail(cmd, SENSE_UNEXPECTED_UNSOLICITED)
                # Take what comes anyway so its Data-Out is not an unknown task.
                end = max(end, cmd.received)
            if end > cmd.received:
                cmd.seqs[RESERVED_TAG] = Seq(cmd.received, end, RESERVED_TAG)
                cmd.next_r2t_offset = end
        return cmd

    def _fail(self, cmd: Cmd, sense: tuple[int, int, int]) -> None:
        if cmd.failed is None:
            cmd.failed = sense

    def _activate(self, cmd: Cmd) -> None:
        """The command is in CmdSN order: solicit its data or run it."""
        s = self.session
        s.created_ops += 1
        cmd.state = Cmd.ACTIVE
        if cmd.failed is None and cmd.write:
            self._send_r2ts(cmd)
        self._maybe_submit(cmd)

    def _send_r2ts(self, cmd: Cmd) -> None:
        open_r2t = len(cmd.seqs) - (RESERVED_TAG in cmd.seqs)
        while cmd.next_r2t_offset < cmd.edtl and open_r2t < self.max_r2t:
            off = cmd.next_r2t_offset
            n = min(self.max_burst, cmd.edtl - off)
            ttt = self._next_ttt()
            cmd.seqs[ttt] = Seq(off, off + n, ttt)
            cmd.next_r2t_offset = off + n
            s = self.session
            hdr = bytearray(P.BHS_LEN)
            _HDR.pack_into(hdr, 0, Op.R2T, 0x80, 0, 0, 0, cmd.raw_lun, cmd.itt, ttt, self.statsn,
                           s.exp_cmdsn, s.max_cmdsn, cmd.r2tsn, off, n)
            cmd.r2tsn += 1
            self._emit(hdr)
            open_r2t += 1

    def _maybe_submit(self, cmd: Cmd) -> None:
        if cmd.state != Cmd.ACTIVE or cmd.seqs:
            return
        if cmd.failed is None and cmd.write and cmd.next_r2t_offset < cmd.edtl:
            return  # more R2Ts to come
        if cmd.failed is not None:
            key, asc, ascq = cmd.failed
            cmd.state = Cmd.DONE
            if key == FAIL_TASK_SET_FULL[0]:
                self._send_response(cmd, TASK_SET_FULL, None, 0, 0)
            else:
                self._send_response(cmd, CHECK_CONDITION, fixed_sense(key, asc, ascq), 0, 0)
            self.session.task_finished(cmd)
            return
        self._submit(cmd)

    def _submit(self, cmd: Cmd) -> None:
        """All data is in: build the ScsiTask and hand it to the SCSI layer."""
        s = self.session
        attr = _ATTRS[cmd.attr] if cmd.attr < len(_ATTRS) else TaskAttr.SIMPLE
        data_out: Any = None
        if cmd.write:
            data_out = memoryview(cmd.buf) if cmd.buf is not None else b""
        task = ScsiTask(
            s.nexus,  # type: ignore[arg-type]
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
        cmd.state = Cmd.SUBMITTED
        try:
            s.device.submit(task)
        except Exception:  # noqa: BLE001 - a SCSI layer bug must not kill the connection
            log.exception("%s: SCSI layer failed on CDB %s", self.peer, cmd.cdb.hex())
            if cmd.state == Cmd.SUBMITTED:
                task.status = CHECK_CONDITION
                task.sense = fixed_sense(0x04, 0x44, 0x00)  # HARDWARE ERROR / INTERNAL TARGET FAILURE
                task.data_in = []
                task.data_in_len = 0
                self._on_done(task)

    def _on_done(self, task: ScsiTask) -> None:
        cmd: Cmd | None = task.transport_ref  # type: ignore[assignment]
        if cmd is None or cmd.state != Cmd.SUBMITTED:
            return  # exactly-once guard
        cmd.state = Cmd.DONE
        # Break the Cmd <-> ScsiTask cycle so both are freed by refcounting right away:
        # leaving one cycle per command to the cyclic GC costs more than the rest of it.
        cmd.task = None
        task.transport_ref = None
        self.session.task_finished(cmd)
        if task.aborted or cmd.aborted or self.closed or cmd.conn is not self:
            return  # aborted tasks get no response (RFC 7143 4.2.3.1); a dead link neither
        in_batch = bool(self.out)
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
                rflags, rres = _O, have - exp_in
            elif have < exp_in:
                rflags, rres = _U, exp_in - have
            else:
                rflags, rres = 0, 0
            if cmd.write:
                bidi_flags, bidi_residual = rflags << 2, rres  # O/U -> o/u (bits 4/3)
            else:
                flags, residual = rflags, rres
        if cmd.write:
            xfer = task.xfer_len
            if xfer > cmd.edtl:
                flags, residual = _O, xfer - cmd.edtl
            elif xfer < cmd.edtl:
                flags, residual = _U, cmd.edtl - xfer
        elif not cmd.read:
            # No data expected: whatever the CDB asked to move is an overflow.
            asked = max(task.xfer_len, task.data_in_len)
            if asked:
                flags, residual = _O, asked
        if send and not sense and not cmd.write:
            # Phase collapse: status in the last Data-In.
            self._send_data_in(cmd, task.data_in, send, status, flags, residual)
            return
        if send:
            self._send_data_in(cmd, task.data_in, send, None, 0, 0)
        self._send_response(cmd, status, sense, flags | bidi_flags, residual, bidi_residual)

    def _send_data_in(self, cmd: Cmd, bufs: list[Any], total: int, status: int | None,
                      sflags: int, residual: int) -> None:
        s = self.session
        mx = self.max_xmit
        mb = self.max_burst
        if len(bufs) == 1 and total <= mx and total <= mb:
            # One buffer, one PDU: the common small read.
            b = bufs[0]
            part = b if len(b) == total else memoryview(b)[:total]
            hdr = bytearray(P.BHS_LEN)
            if status is not None:
                _HDR.pack_into(hdr, 0, Op.DATA_IN, _F | _S | sflags, 0, status, total, 0, cmd.itt, RESERVED_TAG,
                               self._take_statsn(), s.exp_cmdsn, s.max_cmdsn, cmd.datasn, 0, residual)
            else:
                _HDR.pack_into(hdr, 0, Op.DATA_IN, _F, 0, 0, total, 0, cmd.itt, RESERVED_TAG, 0,
                               s.exp_cmdsn, s.max_cmdsn, cmd.datasn, 0, 0)
            cmd.datasn += 1
            self._emit(hdr, [part], total)
            return
        bi = 0
        boff = 0
        views = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
        offset = 0
        datasn = cmd.datasn
        while offset < total:
            n = min(mx, total - offset, mb - (offset % mb))
            parts: list[Any] = []
            need = n
            while need:
                v = views[bi]
                avail = len(v) - boff
                if avail <= 0:
                    bi += 1
                    boff = 0
                    continue
                take = avail if avail < need else need
                parts.append(v if (boff == 0 and take == len(v)) else v[boff : boff + take])
                boff += take
                need -= take
            offset += n
            last = offset == total
            hdr = bytearray(P.BHS_LEN)
            if last and status is not None:
                flags = _F | _S | sflags
                statsn = self._take_statsn()
                st = status
                res = residual
            else:
                flags = _F if (last or offset % mb == 0) else 0
                statsn = 0
                st = 0
                res = 0
            _HDR.pack_into(hdr, 0, Op.DATA_IN, flags, 0, st, n, 0, cmd.itt, RESERVED_TAG, statsn,
                           s.exp_cmdsn, s.max_cmdsn, datasn, offset - n, res)
            datasn += 1
            self._emit(hdr, parts, n)
        cmd.datasn = datasn

    def _send_response(self, cmd: Cmd, status: int, sense: bytes | None, flags: int, residual: int,
                       bidi_residual: int = 0) -> None:
        s = self.session
        if sense:
            data: Any = len(sense).to_bytes(2, "big") + bytes(sense)
            dlen = len(data)
        else:
            data, dlen = None, 0
        hdr = bytearray(P.BHS_LEN)
        _HDR.pack_into(hdr, 0, Op.SCSI_RSP, 0x80 | flags, 0, status, dlen, 0, cmd.itt, 0, self._take_statsn(),
                       s.exp_cmdsn, s.max_cmdsn, cmd.datasn + cmd.r2tsn, bidi_residual, residual)
        self._emit(hdr, [data] if data else None, dlen)

    # --- Data-Out -----------------------------------------------------------------------

    def _data_out(self, pdu: P.DataOut, failed: tuple[int, int, int] | None = None) -> None:
        self._ack_statsn(pdu.expstatsn)
        cmd = self.session.tasks.get(pdu.itt)
        if cmd is None or cmd.conn is not self or cmd.state >= Cmd.SUBMITTED:
            if pdu.itt in self._aborted_itts:
                return  # data still in flight for an aborted task: discarded silently
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu)
            return
        seq = cmd.seqs.get(pdu.ttt)
        if seq is None:
            # Unsolicited data not allowed, or a TTT we never issued (or already closed).
            self.reject(RejectReason.INVALID_PDU_FIELD if pdu.ttt != RESERVED_TAG else RejectReason.PROTOCOL_ERROR,
                        pdu)
            self._fail(cmd, SENSE_UNEXPECTED_UNSOLICITED if pdu.ttt == RESERVED_TAG else SENSE_INCORRECT_DATA_AMOUNT)
            self._maybe_submit(cmd)
            return
        n = len(pdu.data) if failed is None else 0
        if failed is not None:
            self._fail(cmd, failed)
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
            self.reject(RejectReason.PROTOCOL_ERROR, pdu)
            self._fail(cmd, SENSE_INCORRECT_DATA_AMOUNT)
            seq.exp_datasn = (pdu.datasn + 1) & SERIAL_MASK
        else:
            if cmd.buf is not None and n:
                cmd.buf[pdu.offset : pdu.offset + n] = pdu.data  # the one copy of write data
            seq.next_offset += n
            seq.exp_datasn += 1
        if pdu.final:
            if failed is None and cmd.failed is None and seq.next_offset != seq.end:
                # F bit before the burst is complete.
                self.reject(RejectReason.PROTOCOL_ERROR, pdu)
                self._fail(cmd, SENSE_INCORRECT_DATA_AMOUNT)
            del cmd.seqs[seq.ttt]
            cmd.received += seq.end - seq.start
            if cmd.state == Cmd.ACTIVE:
                if cmd.failed is None:
                    self._send_r2ts(cmd)
                self._maybe_submit(cmd)

    def _close_seq_for(self, cmd: Cmd, pdu: P.DataOut) -> None:
        seq = cmd.seqs.get(pdu.ttt)
        if seq is not None and pdu.final:
            del cmd.seqs[seq.ttt]
        self._maybe_submit(cmd)

    # --- NOP ----------------------------------------------------------------------------

    def _nop_out(self, pdu: P.NopOut) -> None:
        if pdu.itt == RESERVED_TAG:
            if pdu.ttt != RESERVED_TAG:
                if pdu.ttt == self.ping_ttt:
                    self.ping_ttt = None
                else:
                    log.debug("%s: NOP-Out answers unknown TTT %#x", self.peer, pdu.ttt)
            return
        if pdu.ttt != RESERVED_TAG:
            # An initiator ping must carry TTT 0xffffffff (RFC 7143 11.18.3).
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu)
            return
        nop = self._stamp(P.NopIn(itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun))
        nop.data = bytes(pdu.data)  # echo: the receive buffer is reused after this batch
        self._send_pdu(nop)

    def ping(self) -> bool:
        """Queue a target NOP-In ping; False if the previous one was never answered."""
        if self.ping_ttt is not None:
            return False
        self.ping_ttt = self._next_ttt()
        nop = self._stamp(P.NopIn(itt=RESERVED_TAG, ttt=self.ping_ttt, lun=0), advance=False)
        self._send_pdu(nop)
        return True

    # --- Task management ----------------------------------------------------------------

    def _tmf(self, pdu: P.TaskMgmtRequest) -> None:
        fn = pdu.function
        lun = lun_to_int(pdu.lun)
        s = self.session
        cold = False
        if fn == TMF_ABORT_TASK:
            resp = self._abort_task(pdu, lun)
        elif fn in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET):
            scope = [s] if fn == TMF_ABORT_TASK_SET else list(s.peers())
            for sess in scope:
                if sess.connection is not None:
                    sess.connection.abort_local(lun)
            dev = s.device
            if fn == TMF_ABORT_TASK_SET:
                r = dev.abort_task_set(s.nexus, lun)
            elif fn == TMF_CLEAR_TASK_SET:
                r = dev.clear_task_set(s.nexus, lun)
            else:
                r = dev.lun_reset(s.nexus, lun)
            for sess in scope:
                if sess.connection is not None:
                    sess.connection.reap_aborted()
            resp = _TMF_MAP.get(r, TMF_RSP_REJECTED)
        elif fn == TMF_CLEAR_ACA:
            resp = _TMF_MAP.get(s.device.clear_aca(s.nexus, lun), TMF_RSP_REJECTED)
        elif fn in (TMF_TARGET_WARM_RESET, TMF_TARGET_COLD_RESET):
            cold = fn == TMF_TARGET_COLD_RESET
            peers = list(s.peers())
            for sess in peers:
                if sess.connection is not None:
                    sess.connection.abort_local(None)
            r = s.device.target_reset(s.nexus, cold)
            for sess in peers:
                if sess.connection is not None:
                    sess.connection.reap_aborted()
            resp = _TMF_MAP.get(r, TMF_RSP_REJECTED)
        elif fn == TMF_TASK_REASSIGN:
            # Only meaningful with connection recovery (ERL 2); we run at ERL 0.
            resp = TMF_RSP_REASSIGN_UNSUPPORTED
        else:
            resp = TMF_RSP_NOT_SUPPORTED
        self._send_pdu(self._stamp(P.TaskMgmtResponse(response=resp, itt=pdu.itt)))
        if cold and resp == TMF_RSP_COMPLETE:
            # A cold reset ends every connection of the target after this response.
            self.on_event("cold_reset", self)

    def _abort_task(self, pdu: P.TaskMgmtRequest, lun: int) -> int:
        s = self.session
        cmd = s.tasks.get(pdu.rtt)
        if cmd is None or cmd.conn is not self:
            # Not here.  If its CmdSN is still ahead of us the command has not arrived:
            # answer "function complete" and drop it when it comes (RFC 7143 11.5.1).
            ref = pdu.refcmdsn
            if s.in_window(ref) and ref not in s.held:
                s.discard_cmdsn.add(ref)
                return TMF_RSP_COMPLETE
            return TMF_RSP_NO_TASK
        if cmd.lun != lun:
            return TMF_RSP_NO_TASK
        if cmd.state < Cmd.SUBMITTED:
            self._abort_cmd(cmd)
            return TMF_RSP_COMPLETE
        if cmd.state == Cmd.DONE:
            return TMF_RSP_NO_TASK
        r = s.device.abort_task(s.nexus, lun, cmd.itt)
        if r == TmfResult.COMPLETE:
            self._abort_cmd(cmd)
        return _TMF_MAP.get(r, TMF_RSP_REJECTED)

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
        cmd.state = Cmd.DONE
        cmd.seqs.clear()
        s.task_finished(cmd)

    def abort_local(self, lun: int | None) -> None:
        """Abort commands of ``lun`` (None: all) still at the iSCSI layer (awaiting data/order)."""
        for cmd in list(self.session.tasks.values()):
            if cmd.conn is self and cmd.state < Cmd.SUBMITTED and (lun is None or cmd.lun == lun):
                self._abort_cmd(cmd)

    def reap_aborted(self) -> None:
        """After a SCSI-layer TMF: forget submitted commands the SCSI layer aborted."""
        for cmd in list(self.session.tasks.values()):
            if cmd.conn is self and cmd.state == Cmd.SUBMITTED and cmd.task is not None and cmd.task.aborted:
                self._abort_cmd(cmd)

    def abort_all(self) -> None:
        """Connection gone (or reinstated): every task of it ends without a response."""
        s = self.session
        for cmd in list(s.tasks.values()):
            if cmd.conn is not self:
                continue
            if cmd.state == Cmd.SUBMITTED and cmd.task is not None:
                if s.device is not None and not cmd.task.aborted:
                    try:
                        s.device.abort_task(s.nexus, cmd.lun, cmd.itt)
                    except Exception:  # noqa: BLE001 - cleanup must go on
                        log.exception("%s: abort of ITT %#x failed", self.peer, cmd.itt)
                cmd.task.aborted = True
            self._abort_cmd(cmd)

    # --- Text ---------------------------------------------------------------------------

    def _text_req(self, pdu: P.TextRequest) -> None:
        """Text exchange (SendTargets, redeclarations): the login engineer's TextHandler
        does the keys, continuation and splitting; we stamp and send."""
        th = self._text_handler
        if th is None:
            from .text import TextHandler

            s = self.session
            th = self._text_handler = TextHandler(
                self.policy,
                session_type="Discovery" if s.discovery else "Normal",
                initiator_name=s.initiator_name,
                target_iqn=s.target.iqn if s.target else None,
                params=self.conn_params,
            )
        if isinstance(pdu.data, memoryview):
            pdu.data = bytes(pdu.data)
        for rsp in th.receive(pdu):
            self._send_pdu(self._stamp(rsp))
        self.max_xmit = self.conn_params.max_xmit_dsl  # MaxRecvDataSegmentLength may be redeclared

    # --- Logout / async -----------------------------------------------------------------

    def _logout(self, pdu: P.LogoutRequest) -> None:
        reason = pdu.reason
        if reason == 0 or (reason == 1 and pdu.cid == self.cid):
            resp = 0
        elif reason == 1:
            resp = 1  # CID not found: we run one connection per session
        elif reason == 2:
            resp = 2  # connection recovery is not supported at ERL 0
        else:
            self.reject(RejectReason.INVALID_PDU_FIELD, pdu)
            return
        t2w = t2r = 0
        if resp == 2:
            t2w = self.session.params.default_time2wait
        self._send_pdu(self._stamp(P.LogoutResponse(response=resp, itt=pdu.itt, time2wait=t2w, time2retain=t2r)))
        if resp == 0:
            # Closing the only connection ends the session; tasks still running are aborted.
            self.abort_all()
            self.closing = True
            self.on_event("logout", self)

    def request_logout(self, within: int = 5) -> None:
        """Async Message event 1: the initiator should log out within ``within`` seconds."""
        if self.closing or self.closed:
            return
        msg = self._stamp(P.AsyncMessage(event=1, lun=0, param1=0, param2=0, param3=within))
        self._send_pdu(msg)

    def announce_drop(self) -> None:
        """Async Message event 3: every connection of the session is about to be dropped
        (with MaxConnections=1 that is this one); Time2Wait/Time2Retain tell the initiator
        when it may come back and how long task state would be kept."""
        if self.closed:
            return
        p = self.session.params
        msg = self._stamp(P.AsyncMessage(event=3, param1=0, param2=p.default_time2wait,
                                         param3=p.default_time2retain))
        self._send_pdu(msg)

    # --- lifecycle ----------------------------------------------------------------------

    def drop(self) -> None:
        """Fatal error: stop processing input, close after what is queued is written."""
        self.closing = True
        self.on_event("drop", self)

    def take_output(self) -> list[Any]:
        out = self.out
        self.out = []
        return out

    def connection_lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.abort_all()
        self.out = []
        self._text_handler = None
