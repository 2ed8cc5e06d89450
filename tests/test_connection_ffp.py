"""Sans-IO tests of the full-feature-phase machine: feed PDUs, assert the PDUs sent back."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.connection import Connection, ConnState
from pyscsi_target.iscsi.events import ABORT_TASKS, ANNOUNCE_DROP, LINK_LOST, PING, RequestLogout
from pyscsi_target.iscsi.params import LoginResult, SessionParams, TargetInfo, TargetResets
from pyscsi_target.iscsi.session import Session
from pyscsi_target.iscsi.write_budget import WriteBudget
from pyscsi_target.scsi.command import data_out_view
from pyscsi_target.scsi.task import Nexus, ScsiTask, TmfResult

BS = 512
IQN = "iqn.2026-11.org.pyscsi-target:t"


class FakeDevice:
    """A minimal block device honouring the ScsiDevice contract (task.py)."""

    def __init__(self, blocks: int = 2048) -> None:
        self.store = bytearray(blocks * BS)
        self.submitted: list[ScsiTask] = []
        self.pending: list[ScsiTask] = []
        self.hold = False  # keep tasks pending (complete them with finish())
        self.tmf: list[tuple[str, Any]] = []

    def submit(self, task: ScsiTask) -> None:
        self.submitted.append(task)
        if self.hold:
            self.pending.append(task)
            return
        self.run(task)

    def run(self, task: ScsiTask) -> None:
        op = task.cdb[0]
        if op == 0x28:  # READ(10)
            lba, n = struct.unpack_from(">IxH", task.cdb, 2)
            task.data_in = [memoryview(self.store)[lba * BS : (lba + n) * BS]]
            task.data_in_len = n * BS
        elif op == 0x2A:  # WRITE(10)
            lba, n = struct.unpack_from(">IxH", task.cdb, 2)
            task.xfer_len = n * BS
            data = bytes(data_out_view(task))[: n * BS]
            self.store[lba * BS : lba * BS + len(data)] = data
        elif op == 0x12:  # INQUIRY
            alloc = struct.unpack_from(">H", task.cdb, 3)[0]
            inq = bytes([0, 0, 6, 2, 31]) + bytes(31)
            task.data_in = [inq[:alloc]]
            task.data_in_len = len(inq)
        elif op == 0x00:  # TEST UNIT READY
            pass
        else:
            task.status = 2
            task.sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
        task.on_done(task)

    def finish(self) -> None:
        pend, self.pending = self.pending, []
        for t in pend:
            if not t.aborted:
                self.run(t)

    def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResult:
        self.tmf.append(("abort_task", tag))
        for t in self.pending:
            if t.tag == tag and not t.aborted:
                t.aborted = True
                return TmfResult.COMPLETE
        return TmfResult.NO_SUCH_TASK

    def _abort_lun(self, name: str, lun: int | None) -> TmfResult:
        self.tmf.append((name, lun))
        for t in self.pending:
            if lun is None or t.lun == lun:
                t.aborted = True
        return TmfResult.COMPLETE

    def abort_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        return self._abort_lun("abort_task_set", lun)

    def clear_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        return self._abort_lun("clear_task_set", lun)

    def lun_reset(self, nexus: Nexus, lun: int) -> TmfResult:
        if lun != 0:
            return TmfResult.NO_SUCH_LUN
        return self._abort_lun("lun_reset", lun)

    def clear_aca(self, nexus: Nexus, lun: int) -> TmfResult:
        self.tmf.append(("clear_aca", lun))
        return TmfResult.COMPLETE

    def target_reset(self, nexus: Nexus, cold: bool) -> TmfResult:
        return self._abort_lun("cold" if cold else "warm", None)

    def when_settled(self, done: Callable[[], None]) -> None:
        done()


class Harness:
    def __init__(self, budget: WriteBudget | None = None, resets: TargetResets | None = None,
                 **params: Any) -> None:
        self.params = SessionParams(**params)
        res = LoginResult(
            session_type="Normal", initiator_name="iqn.1994-05.com.example:i", initiator_alias=None,
            target=TargetInfo(1, IQN, None, "None", []), isid=0x23D000000001, tsih=0, cid=1, cmdsn=10,
            statsn=100, params=self.params,
        )
        self.dev = FakeDevice()
        nexus = Nexus(1, res.initiator_name, res.isid, IQN, 1)
        self.session = Session(res, 1, nexus, self.dev, queue_depth=16,
                               writes=budget.account() if budget is not None else None, resets=resets)
        self.events: list[str] = []
        self.conn = Connection(self.session, 1, 100, on_event=lambda e, c: self.events.append(e))
        self.reader = P.PDUReader(self.params.header_digest, self.params.data_digest, max_data=self.params.max_recv_dsl)
        self.cmdsn = 10
        self.itt = 0x1000

    def wire(self, pdu: P.PDU) -> bytes:
        return pdu.to_bytes(self.params.header_digest, self.params.data_digest)

    def send_bytes(self, data: bytes) -> list[P.PDU]:
        for ev in self.reader.feed(data):
            self.conn.handle(ev)
        return self.output()

    def send(self, *pdus: P.PDU) -> list[P.PDU]:
        return self.send_bytes(b"".join(self.wire(p) for p in pdus))

    def output(self) -> list[P.PDU]:
        raw = b"".join(bytes(b) for b in self.conn.take_output())
        rd = P.PDUReader(self.params.header_digest, self.params.data_digest, max_data=P.MAX_DSL)
        out = list(rd.feed(raw))
        assert all(isinstance(p, P.PDU) for p in out), out
        return out  # type: ignore[return-value]

    def cmd(self, cdb: bytes, *, read: bool = False, write: bool = False, edtl: int = 0, data: bytes = b"",
            final: bool = True, immediate: bool = False, cmdsn: int | None = None, lun: int = 0) -> P.ScsiCommand:
        self.itt += 1
        if cmdsn is None:
            cmdsn = self.cmdsn
            if not immediate:
                self.cmdsn += 1
        c = P.ScsiCommand(itt=self.itt, cmdsn=cmdsn, edtl=edtl, read=int(read), write=int(write),
                          final=int(final), attr=1, cdb=cdb.ljust(16, b"\0"), lun=P.int_to_lun(lun))
        c.immediate = immediate
        c.data = data
        return c


def rw10(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, n, 0)


def data_out(itt: int, ttt: int, datasn: int, offset: int, data: bytes, final: bool) -> P.DataOut:
    d = P.DataOut(itt=itt, ttt=ttt, datasn=datasn, offset=offset, final=int(final))
    d.data = data
    return d


# --- CmdSN window ----------------------------------------------------------------------


def test_cmdsn_in_order_and_window() -> None:
    h = Harness()
    (rsp,) = h.send(h.cmd(bytes(6)))
    assert isinstance(rsp, P.ScsiResponse) and rsp.status == 0
    assert rsp.statsn == 100 and rsp.expcmdsn == 11 and rsp.maxcmdsn == 11 + 15


def test_cmdsn_out_of_order_is_held_until_gap_filled() -> None:
    h = Harness()
    a = h.cmd(bytes(6))
    b = h.cmd(bytes(6))
    c = h.cmd(bytes(6))
    assert h.send(c) == [] and h.send(b) == []
    assert h.session.exp_cmdsn == 10
    out = h.send(a)
    assert [p.itt for p in out] == [a.itt, b.itt, c.itt]
    assert [p.statsn for p in out] == [100, 101, 102]
    assert out[-1].expcmdsn == 13


def test_cmdsn_outside_window_ignored() -> None:
    h = Harness()
    too_high = h.cmd(bytes(6), cmdsn=h.session.max_cmdsn + 1)
    too_low = h.cmd(bytes(6), cmdsn=9)
    assert h.send(too_high) == []
    assert h.send(too_low) == []
    assert h.session.exp_cmdsn == 10
    (rsp,) = h.send(h.cmd(bytes(6)))
    assert rsp.status == 0


def test_immediate_command_does_not_advance_cmdsn() -> None:
    h = Harness()
    (rsp,) = h.send(h.cmd(bytes(6), immediate=True))
    assert rsp.status == 0 and rsp.expcmdsn == 10
    assert h.session.exp_cmdsn == 10


def test_max_cmdsn_reflects_outstanding_commands() -> None:
    h = Harness()
    h.dev.hold = True
    for _ in range(4):
        assert h.send(h.cmd(bytes(6))) == []
    assert h.session.max_cmdsn == 10 + 15  # never shrinks
    h.dev.finish()
    out = h.output()
    assert len(out) == 4 and out[-1].maxcmdsn == 14 + 15


# --- Data-In ----------------------------------------------------------------------------


def test_read_split_by_max_xmit_dsl_with_phase_collapse() -> None:
    h = Harness(max_xmit_dsl=1024, max_burst_length=2048)
    h.dev.store[: 8 * BS] = bytes(range(256)) * 16
    out = h.send(h.cmd(rw10(0x28, 0, 8), read=True, edtl=8 * BS))
    assert all(isinstance(p, P.DataIn) for p in out) and len(out) == 4
    assert [p.datasn for p in out] == [0, 1, 2, 3]
    assert [p.offset for p in out] == [0, 1024, 2048, 3072]
    assert [p.final for p in out] == [0, 1, 0, 1]  # F closes each MaxBurstLength sequence
    assert [p.has_status for p in out] == [0, 0, 0, 1]
    assert out[-1].statsn == 100 and out[-1].status == 0 and not out[-1].underflow
    assert b"".join(bytes(p.data) for p in out) == bytes(h.dev.store[: 8 * BS])


def test_read_underflow_and_overflow_residuals() -> None:
    h = Harness()
    out = h.send(h.cmd(rw10(0x28, 0, 1), read=True, edtl=10000))
    (d,) = out
    assert d.has_status and d.underflow and d.residual == 10000 - BS and len(d.data) == BS
    out = h.send(h.cmd(rw10(0x28, 0, 2), read=True, edtl=200))
    (d,) = out
    assert d.has_status and d.overflow and d.residual == 2 * BS - 200 and len(d.data) == 200


def test_check_condition_goes_in_scsi_response_with_sense() -> None:
    h = Harness()
    (rsp,) = h.send(h.cmd(b"\xff", read=True, edtl=64))
    assert isinstance(rsp, P.ScsiResponse) and rsp.status == 2
    slen = int.from_bytes(rsp.data[:2], "big")
    assert slen == 18 and rsp.data[2 + 12] == 0x20
    assert rsp.underflow and rsp.residual == 64


# --- Data-Out ---------------------------------------------------------------------------


def test_immediate_data_write() -> None:
    h = Harness(initial_r2t=True, immediate_data=True)
    payload = bytes([7]) * BS
    (rsp,) = h.send(h.cmd(rw10(0x2A, 4, 1), write=True, edtl=BS, data=payload))
    assert isinstance(rsp, P.ScsiResponse) and rsp.status == 0 and not rsp.underflow
    assert h.dev.store[4 * BS : 5 * BS] == payload


def test_unsolicited_data_out_then_r2t() -> None:
    h = Harness(initial_r2t=False, immediate_data=True, first_burst_length=1024, max_burst_length=1024,
                max_outstanding_r2t=1)
    payload = bytes(range(256)) * 12  # 3072 bytes = 6 blocks
    c = h.cmd(rw10(0x2A, 0, 6), write=True, edtl=3072, data=payload[:512], final=False)
    out = h.send(c)
    # R2T for the part beyond FirstBurstLength, one at a time (MaxOutstandingR2T=1)
    assert len(out) == 1 and isinstance(out[0], P.R2T)
    r2t = out[0]
    assert r2t.offset == 1024 and r2t.desired_length == 1024 and r2t.r2tsn == 0
    assert h.send(data_out(c.itt, P.RESERVED_TAG, 0, 512, payload[512:1024], True)) == []
    out = h.send(data_out(c.itt, r2t.ttt, 0, 1024, payload[1024:2048], True))
    assert len(out) == 1 and out[0].r2tsn == 1 and out[0].offset == 2048
    out = h.send(data_out(c.itt, out[0].ttt, 0, 2048, payload[2048:], True))
    (rsp,) = out
    assert rsp.status == 0 and rsp.expdatasn == 2
    assert h.dev.store[:3072] == payload


def test_r2t_honours_max_outstanding_and_burst() -> None:
    h = Harness(initial_r2t=True, immediate_data=False, max_burst_length=1024, max_outstanding_r2t=2)
    c = h.cmd(rw10(0x2A, 0, 8), write=True, edtl=4096)
    out = h.send(c)
    assert [(p.offset, p.desired_length, p.r2tsn) for p in out] == [(0, 1024, 0), (1024, 1024, 1)]
    # answer the first in two PDUs
    assert h.send(data_out(c.itt, out[0].ttt, 0, 0, bytes(512), False)) == []
    more = h.send(data_out(c.itt, out[0].ttt, 1, 512, bytes(512), True))
    assert [(p.offset, p.r2tsn) for p in more] == [(2048, 2)]


def test_write_residuals_follow_xfer_len() -> None:
    h = Harness(initial_r2t=True, immediate_data=True)
    (rsp,) = h.send(h.cmd(rw10(0x2A, 0, 1), write=True, edtl=0))
    assert rsp.status == 0 and rsp.overflow and rsp.residual == BS
    (rsp,) = h.send(h.cmd(rw10(0x2A, 0, 1), write=True, edtl=200, data=bytes(200)))
    assert rsp.overflow and rsp.residual == BS - 200


def test_datasn_error_rejects_and_fails_command() -> None:
    h = Harness(initial_r2t=False, immediate_data=False, first_burst_length=65536)
    c = h.cmd(rw10(0x2A, 0, 2), write=True, edtl=2 * BS, final=False)
    assert h.send(c) == []
    assert h.send(data_out(c.itt, P.RESERVED_TAG, 0, 0, bytes(BS), False)) == []
    out = h.send(data_out(c.itt, P.RESERVED_TAG, 0, BS, bytes(BS), True))
    assert isinstance(out[0], P.Reject) and out[0].reason == P.RejectReason.PROTOCOL_ERROR
    assert isinstance(out[1], P.ScsiResponse) and out[1].status == 2
    assert out[1].data[2 + 2] == 0x0B and out[1].data[2 + 12] == 0x0C  # ABORTED COMMAND
    assert h.dev.submitted == []


def test_buffer_offset_error() -> None:
    h = Harness(initial_r2t=True, immediate_data=False)
    c = h.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS)
    (r2t,) = h.send(c)
    out = h.send(data_out(c.itt, r2t.ttt, 0, 100, bytes(BS - 100), True))
    assert out[0].reason == P.RejectReason.PROTOCOL_ERROR
    assert out[1].status == 2


def test_unknown_ttt_is_invalid_field() -> None:
    h = Harness(initial_r2t=True, immediate_data=False)
    c = h.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS)
    (r2t,) = h.send(c)
    out = h.send(data_out(c.itt, r2t.ttt + 77, 0, 0, bytes(BS), True))
    assert out[0].reason == P.RejectReason.INVALID_PDU_FIELD


def test_data_digest_error_on_data_out_ends_with_crc_error_sense() -> None:
    h = Harness(initial_r2t=True, immediate_data=False, data_digest=True)
    c = h.cmd(rw10(0x2A, 0, 2), write=True, edtl=2 * BS)
    (r2t,) = h.send(c)
    good = h.wire(data_out(c.itt, r2t.ttt, 0, 0, bytes(BS), False))
    bad = bytearray(h.wire(data_out(c.itt, r2t.ttt, 1, BS, bytes(BS), True)))
    bad[-1] ^= 0xFF
    out = h.send_bytes(good + bytes(bad))
    assert out[0].reason == P.RejectReason.DATA_DIGEST_ERROR
    assert out[1].status == 2 and out[1].data[2 + 12 : 2 + 14] == b"\x47\x05"


def test_header_digest_error_drops_connection() -> None:
    h = Harness(header_digest=True)
    w = bytearray(h.wire(h.cmd(bytes(6))))
    w[48] ^= 1
    assert h.send_bytes(bytes(w)) == []
    assert h.conn.closing and "drop" in h.events


# --- NOP / Text / Logout / Reject / SNACK --------------------------------------------------


def test_nop_out_ping_echoes_data() -> None:
    h = Harness()
    n = P.NopOut(itt=0x55, cmdsn=h.cmdsn)
    n.immediate = True
    n.data = b"hello"
    (rsp,) = h.send(n)
    assert isinstance(rsp, P.NopIn) and rsp.itt == 0x55 and rsp.ttt == P.RESERVED_TAG and bytes(rsp.data) == b"hello"
    assert rsp.statsn == 100


def test_target_ping_and_answer() -> None:
    h = Harness()
    assert h.conn.ping()
    (nop,) = h.output()
    assert nop.itt == P.RESERVED_TAG and nop.ttt != P.RESERVED_TAG and nop.statsn == 100
    assert not h.conn.ping()  # one outstanding
    ans = P.NopOut(itt=P.RESERVED_TAG, ttt=nop.ttt, cmdsn=h.cmdsn)
    ans.immediate = True
    assert h.send(ans) == []
    assert h.conn.ping_ttt is None


def test_unknown_opcode_rejected_not_supported() -> None:
    h = Harness()
    raw = bytearray(48)
    raw[0] = 0x1C
    (rej,) = h.send_bytes(bytes(raw))
    assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED
    assert bytes(rej.data[:1]) == b"\x1c"


def test_snack_rejected_at_erl0() -> None:
    h = Harness()
    (rej,) = h.send(P.SnackRequest(itt=1))
    assert rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED


def test_oversized_pdu_rejected() -> None:
    h = Harness(max_recv_dsl=1024)
    n = P.NopOut(itt=0x9, cmdsn=h.cmdsn)
    n.immediate = True
    n.data = bytes(2048)
    (rej,) = h.send(n)
    assert rej.reason == P.RejectReason.PROTOCOL_ERROR


def test_logout_close_session() -> None:
    h = Harness()
    (rsp,) = h.send(P.LogoutRequest(reason=0, itt=0x77, cid=1, cmdsn=h.cmdsn))
    assert isinstance(rsp, P.LogoutResponse) and rsp.response == 0 and rsp.itt == 0x77
    assert h.conn.closing and "logout" in h.events


def test_logout_recovery_not_supported() -> None:
    h = Harness()
    (rsp,) = h.send(P.LogoutRequest(reason=2, itt=0x78, cid=1, cmdsn=h.cmdsn))
    assert rsp.response == 2 and not h.conn.closing


def test_text_unknown_key_not_understood() -> None:
    h = Harness()
    t = P.TextRequest(itt=0x31, cmdsn=h.cmdsn)
    t.data = P.build_text([("X-Foo", "bar")])
    (rsp,) = h.send(t)
    assert P.parse_text(rsp.data) == [("X-Foo", "NotUnderstood")]


# --- Task management ----------------------------------------------------------------------


def tmf(h: Harness, fn: int, rtt: int = P.RESERVED_TAG, refcmdsn: int = 0, lun: int = 0) -> P.TaskMgmtRequest:
    t = P.TaskMgmtRequest(function=fn, itt=0x9000 + fn, rtt=rtt, refcmdsn=refcmdsn, cmdsn=h.cmdsn,
                          lun=P.int_to_lun(lun))
    t.immediate = True
    return t


def test_abort_task_waiting_for_data_out() -> None:
    h = Harness(initial_r2t=True, immediate_data=False)
    c = h.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS)
    (r2t,) = h.send(c)
    (rsp,) = h.send(tmf(h, 1, c.itt, c.cmdsn))
    assert isinstance(rsp, P.TaskMgmtResponse) and rsp.response == 0
    # Data for the aborted task is discarded silently; no SCSI response ever comes.
    assert h.send(data_out(c.itt, r2t.ttt, 0, 0, bytes(BS), True)) == []
    assert h.dev.submitted == []


def test_abort_task_in_scsi_layer_no_response() -> None:
    h = Harness()
    h.dev.hold = True
    c = h.cmd(bytes(6))
    assert h.send(c) == []
    (rsp,) = h.send(tmf(h, 1, c.itt, c.cmdsn))
    assert rsp.response == 0
    h.dev.finish()
    assert h.output() == []


def test_abort_task_completed_is_no_such_task() -> None:
    h = Harness()
    c = h.cmd(bytes(6))
    h.send(c)
    (rsp,) = h.send(tmf(h, 1, c.itt, c.cmdsn))
    assert rsp.response == 1


def test_abort_task_not_yet_received_then_discarded() -> None:
    h = Harness()
    c = h.cmd(bytes(6))  # CmdSN 10, not sent yet
    (rsp,) = h.send(tmf(h, 1, c.itt, c.cmdsn))
    assert rsp.response == 0
    assert h.send(c) == []  # discarded on arrival, CmdSN consumed
    assert h.session.exp_cmdsn == 11


@pytest.mark.parametrize("fn,name", [(2, "abort_task_set"), (4, "clear_task_set"), (5, "lun_reset"),
                                     (6, "warm"), (7, "cold"), (3, "clear_aca")])
def test_tmf_functions(fn: int, name: str) -> None:
    h = Harness(resets=TargetResets(warm=True, cold=True))
    h.dev.hold = True
    c = h.cmd(bytes(6))
    h.send(c)
    (rsp,) = h.send(tmf(h, fn))
    assert rsp.response == 0
    assert h.dev.tmf[-1][0] == name
    if fn != 3:
        h.dev.finish()
        assert h.output() == []  # the task was aborted
    assert ("cold_reset" in h.events) == (fn == 7)


@pytest.mark.parametrize("fn", [6, 7])
def test_target_resets_refused_unless_allowed(fn: int) -> None:
    h = Harness(resets=TargetResets(warm=fn == 7, cold=fn == 6))  # the other one allowed only
    h.dev.hold = True
    c = h.cmd(bytes(6))
    h.send(c)
    (rsp,) = h.send(tmf(h, fn))
    assert rsp.response == P.TmfResponse.AUTHORIZATION_FAILED
    assert h.dev.tmf == [] and h.events == []  # nothing reset, nothing closed
    h.dev.finish()
    (done,) = h.output()
    assert done.itt == c.itt and done.status == 0  # the task went on


def test_lun_reset_unknown_lun() -> None:
    h = Harness()
    (rsp,) = h.send(tmf(h, 5, lun=7))
    assert rsp.response == 2


def test_task_reassign_unsupported_and_unknown_function() -> None:
    h = Harness()
    (rsp,) = h.send(tmf(h, 8, 0x1))
    assert rsp.response == 4
    (rsp,) = h.send(tmf(h, 14))
    assert rsp.response == 5


def test_async_logout_request() -> None:
    h = Harness()
    h.conn.request_logout(3)
    (msg,) = h.output()
    assert isinstance(msg, P.AsyncMessage) and msg.event == 1 and msg.param3 == 3 and msg.statsn == 100


def test_data_in_gathers_across_scsi_buffers() -> None:
    h = Harness(max_xmit_dsl=700, max_burst_length=262144)

    def run(task: ScsiTask) -> None:
        task.data_in = [b"a" * 300, bytearray(b"b" * 1000), memoryview(b"c" * 200)]
        task.data_in_len = 1500
        task.on_done(task)

    h.dev.run = run  # type: ignore[method-assign]
    out = h.send(h.cmd(rw10(0x28, 0, 3), read=True, edtl=1536))
    assert [len(p.data) for p in out] == [700, 700, 100]
    assert b"".join(bytes(p.data) for p in out) == b"a" * 300 + b"b" * 1000 + b"c" * 200
    assert out[-1].has_status and out[-1].underflow and out[-1].residual == 36


def test_bidi_command_residuals() -> None:
    h = Harness(initial_r2t=True, immediate_data=True)

    def run(task: ScsiTask) -> None:
        assert task.bidi_read_len == 100 and bytes(data_out_view(task)) == b"x" * 512
        task.xfer_len = 512
        task.data_in = [b"r" * 64]
        task.data_in_len = 64
        task.on_done(task)

    h.dev.run = run  # type: ignore[method-assign]
    c = h.cmd(b"\x53", read=True, write=True, edtl=512, data=b"x" * 512)
    c.ahs = [(P.AhsType.BIDI_READ_LENGTH, b"\0" + (100).to_bytes(4, "big"))]
    out = h.send(c)
    assert isinstance(out[0], P.DataIn) and not out[0].has_status and len(out[0].data) == 64
    rsp = out[1]
    assert isinstance(rsp, P.ScsiResponse) and rsp.bidi_underflow and rsp.bidi_residual == 36
    assert not rsp.underflow and not rsp.overflow and rsp.expdatasn == 1


def test_extended_cdb_ahs_reaches_scsi_layer() -> None:
    h = Harness()
    seen: list[bytes] = []

    def run(task: ScsiTask) -> None:
        seen.append(task.cdb)
        task.on_done(task)

    h.dev.run = run  # type: ignore[method-assign]
    c = h.cmd(bytes(16))
    c.cdb = bytes([0x7F]) + bytes(15)
    c.ahs = [(P.AhsType.EXTENDED_CDB, b"\0" + bytes(range(1, 17)))]
    (rsp,) = h.send(c)
    assert rsp.status == 0 and seen[0] == bytes([0x7F]) + bytes(15) + bytes(range(1, 17))


def test_non_scsi_pdus_held_in_cmdsn_order() -> None:
    h = Harness()
    a = h.cmd(bytes(6))
    n = P.NopOut(itt=0x66, cmdsn=h.cmdsn)
    h.cmdsn += 1
    n.data = b"later"
    assert h.send(n) == []  # CmdSN 11 before 10 arrived
    out = h.send(a)
    assert [type(p).__name__ for p in out] == ["ScsiResponse", "NopIn"]
    assert bytes(out[1].data) == b"later"


def test_duplicate_itt_rejected_and_cmdsn_consumed() -> None:
    h = Harness()
    h.dev.hold = True
    a = h.cmd(bytes(6))
    h.send(a)
    dup = h.cmd(bytes(6))
    dup.itt = a.itt
    (rej,) = h.send(dup)
    assert rej.reason == P.RejectReason.INVALID_PDU_FIELD
    assert h.session.exp_cmdsn == 12


def test_unsolicited_data_when_initial_r2t_yes_fails_command() -> None:
    h = Harness(initial_r2t=True, immediate_data=True)
    c = h.cmd(rw10(0x2A, 0, 2), write=True, edtl=2 * BS, data=bytes(BS), final=False)
    out = h.send(c)
    # No R2T: the command is doomed; its announced unsolicited burst is absorbed first.
    assert out == []
    (rsp,) = h.send(data_out(c.itt, P.RESERVED_TAG, 0, BS, bytes(BS), True))
    assert rsp.status == 2 and rsp.data[2 + 12 : 2 + 14] == b"\x0c\x0c"


def test_session_ends_tasks_on_connection_loss() -> None:
    h = Harness()
    h.dev.hold = True
    h.send(h.cmd(bytes(6)))
    assert len(h.session.tasks) == 1
    h.conn.connection_lost()
    assert h.session.tasks == {} and h.dev.pending[0].aborted
    h.dev.finish()
    assert h.conn.take_output() == []


def test_adapter_events_go_through_handle() -> None:
    """What the adapter feeds (events.py) takes the same input path as PDUs."""
    h = Harness()
    h.conn.handle(PING)
    (nop,) = h.output()
    assert isinstance(nop, P.NopIn) and nop.ttt == h.conn.ping_ttt and nop.statsn == 100
    h.conn.handle(RequestLogout(7))
    (msg,) = h.output()
    assert isinstance(msg, P.AsyncMessage) and msg.event == P.AsyncEvent.LOGOUT_REQUEST and msg.param3 == 7
    h.dev.hold = True
    h.send(h.cmd(bytes(6)))
    h.conn.handle(ANNOUNCE_DROP)
    (msg,) = h.output()
    assert isinstance(msg, P.AsyncMessage) and msg.event == P.AsyncEvent.DROP_ALL_CONNECTIONS
    h.conn.handle(ABORT_TASKS)
    assert h.session.tasks == {} and h.dev.pending[0].aborted and not h.conn.closing
    h.conn.handle(LINK_LOST)
    assert h.conn.state is ConnState.CLOSED and h.conn.closing and h.conn.closed
    h.conn.handle(PING)  # nothing goes out on a closed connection
    assert h.conn.take_output() == []


def test_fuzzed_pdus_never_crash_and_keep_window_accounting() -> None:
    """Random (well framed) PDUs of every initiator opcode, with random fields, digests,
    sequence numbers and a device that completes late: the machine must answer each
    with a response, a Reject or a drop, never raise, and keep its counters exact."""
    import logging
    import random

    logging.getLogger("pyscsi_target.iscsi.connection").setLevel(logging.CRITICAL)
    ops = [0, 1, 2, 4, 5, 6, 0x10, 0x1C, 3, 0x21]
    for seed in range(200):
        rnd = random.Random(seed)
        h = Harness(initial_r2t=rnd.random() < 0.5, immediate_data=rnd.random() < 0.5,
                    max_burst_length=rnd.choice([512, 4096, 65536]), first_burst_length=rnd.choice([512, 4096, 65536]),
                    max_outstanding_r2t=rnd.choice([1, 2, 4]), max_xmit_dsl=rnd.choice([512, 8192]),
                    data_digest=rnd.random() < 0.3, header_digest=rnd.random() < 0.3)
        h.dev.hold = rnd.random() < 0.3
        itts = [rnd.randrange(1, 20) for _ in range(5)]
        for _ in range(60):
            bhs = bytearray(rnd.randbytes(48))
            bhs[0] = rnd.choice(ops) | (0x40 if rnd.random() < 0.3 else 0)
            bhs[4] = 0
            dlen = rnd.choice([0, 0, 0, 1, 100, 512, 513, 9000])  # 9000 > MaxRecvDataSegmentLength
            bhs[5:8] = dlen.to_bytes(3, "big")
            if rnd.random() < 0.8:
                struct.pack_into(">I", bhs, 16, rnd.choice(itts))
            if rnd.random() < 0.7:
                struct.pack_into(">I", bhs, 24, (h.session.exp_cmdsn + rnd.randrange(-2, 4)) & 0xFFFFFFFF)
            if rnd.random() < 0.5:
                struct.pack_into(">I", bhs, 20, rnd.choice([0xFFFFFFFF, rnd.randrange(0, 5), rnd.randrange(0, 4096)]))
            if bhs[0] & 0x3F == 1:
                bhs[32] = rnd.choice([0, 0x28, 0x2A, 0x12, 0xFF])
                bhs[1] = rnd.choice([0x80, 0xA0, 0xC0, 0x20, 0xE0, 0x81])
            if bhs[0] & 0x3F == 5 and rnd.random() < 0.5:
                struct.pack_into(">II", bhs, 36, rnd.randrange(0, 3), rnd.choice([0, 512, 1024, 100]))
            if rnd.random() < 0.1:
                h.dev.finish()
            pdu = P.decode_bhs(bytes(bhs))
            if isinstance(pdu, P.UnknownPDU):
                wire = bytes(bhs)
                if h.params.header_digest:
                    wire += struct.pack("<I", P.digest(bhs))
                if dlen:
                    body = rnd.randbytes(dlen) + bytes(P.pad_len(dlen))
                    wire += body + (struct.pack("<I", P.digest(body)) if h.params.data_digest else b"")
                h.send_bytes(wire)
                if h.conn.closing:
                    break
                continue
            pdu.data = rnd.randbytes(dlen)
            w = bytearray(h.wire(pdu))
            if rnd.random() < 0.05:
                w[-1] ^= 1
            for ev in h.reader.feed(bytes(w)):
                h.conn.handle(ev)
            h.output()
            if h.conn.closing:
                break
        h.dev.finish()
        h.output()
        s = h.session
        assert s.active == sum(1 for c in s.tasks.values() if c.counted) >= 0, seed
        assert s.writes.used == sum(c.reserved for c in s.tasks.values()), seed


def test_oversized_unknown_opcode_rejected() -> None:
    h = Harness(max_recv_dsl=1024)
    raw = bytearray(48)
    raw[0] = 0x1E
    raw[5:8] = (4096).to_bytes(3, "big")
    (rej,) = h.send_bytes(bytes(raw) + bytes(4096))
    assert rej.reason == P.RejectReason.PROTOCOL_ERROR and bytes(rej.data[:1]) == b"\x1e"
    assert not h.conn.closing


def test_write_buffer_budget_gives_task_set_full() -> None:
    h = Harness(initial_r2t=True, immediate_data=False, budget=WriteBudget(3 * BS, floor=0))
    a = h.cmd(rw10(0x2A, 0, 2), write=True, edtl=2 * BS)
    (r2t,) = h.send(a)
    (rsp,) = h.send(h.cmd(rw10(0x2A, 8, 2), write=True, edtl=2 * BS))
    assert isinstance(rsp, P.ScsiResponse) and rsp.status == 0x28 and not rsp.data
    out = h.send(data_out(a.itt, r2t.ttt, 0, 0, bytes(2 * BS), True))
    assert out[0].status == 0 and h.session.writes.used == 0
    (r2t2,) = h.send(h.cmd(rw10(0x2A, 8, 2), write=True, edtl=2 * BS))  # budget free again
    assert isinstance(r2t2, P.R2T)


def test_data_digest_error_on_immediate_data_consumes_cmdsn_and_fails() -> None:
    h = Harness(initial_r2t=True, immediate_data=True, data_digest=True)
    c = h.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS, data=bytes(BS))
    w = bytearray(h.wire(c))
    w[-1] ^= 0xFF
    out = h.send_bytes(bytes(w))
    assert out[0].reason == P.RejectReason.DATA_DIGEST_ERROR
    assert out[1].status == 2 and out[1].data[2 + 12 : 2 + 14] == b"\x47\x05"
    assert h.session.exp_cmdsn == 11 and h.dev.submitted == []
    (rsp,) = h.send(h.cmd(bytes(6)))  # the window moved on
    assert rsp.status == 0


def test_task_set_scope_abort_vs_clear() -> None:
    """ABORT TASK SET reaches this session's commands only; CLEAR TASK SET (and LUN RESET)
    also the commands other sessions still hold at the iSCSI layer (waiting for data)."""
    a = Harness(initial_r2t=True, immediate_data=False)
    b = Harness(initial_r2t=True, immediate_data=False)
    b.dev = a.dev
    b.session.device = a.dev
    both = [a.session, b.session]
    a.session._peers = b.session._peers = lambda: both
    wa = a.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS)
    wb = b.cmd(rw10(0x2A, 8, 1), write=True, edtl=BS)
    (r2ta,) = a.send(wa)
    (r2tb,) = b.send(wb)
    (rsp,) = a.send(tmf(a, 2))  # ABORT TASK SET
    assert rsp.response == 0 and wa.itt not in a.session.tasks and wb.itt in b.session.tasks
    wa2 = a.cmd(rw10(0x2A, 0, 1), write=True, edtl=BS)
    a.send(wa2)
    (rsp,) = a.send(tmf(a, 4))  # CLEAR TASK SET
    assert rsp.response == 0 and a.session.tasks == {} and b.session.tasks == {}
    assert b.send(data_out(wb.itt, r2tb.ttt, 0, 0, bytes(BS), True)) == []  # discarded quietly
