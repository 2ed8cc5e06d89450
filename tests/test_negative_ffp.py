"""Full-feature-phase abuse against the real daemon, each with its RFC 7143 answer, while a
parallel session keeps doing verified I/O; and 100 concurrent sessions doing I/O.

RFC 7143 references: 7.8 (digest errors: header -> the PDU cannot be trusted, drop the
connection at ERL 0; data -> Reject "data digest error" and, for Data-Out, end the task with
CHECK CONDITION / "protocol service CRC error" 0x47/0x05), 11.17.1 (Reject reasons: 0x05
command not supported, 0x04 protocol error, 0x09 invalid PDU field).
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import rawclient as R
from support.background import BackgroundIO
from support.daemon import Daemon

P = R.P


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("negative-ffp")).start()
    bg = None
    try:
        bg = BackgroundIO(d.host, d.port, d.iqn).start()
        yield d, bg
        bg.stop()
        assert not bg.errors, bg.errors
    finally:
        if bg is not None:
            bg.stop()
        d.stop()


@pytest.fixture
def target(env) -> Daemon:
    return env[0]


@pytest.fixture(autouse=True)
def parallel_session_keeps_working(env):
    d, bg = env
    before, mark = bg.ops, d.log_mark()
    yield
    bg.check(before)
    errors = d.errors_since(mark)
    assert not errors, "daemon logged errors during this test:\n" + "\n".join(errors[:30])


def session(d: Daemon, **kw: object) -> R.RawClient:
    return R.login_session(d.host, d.port, d.iqn, **kw)  # type: ignore[arg-type]


def still_usable(c: R.RawClient) -> None:
    assert bytes(c.nop(b"alive").data) == b"alive"
    r = c.scsi(R.read10(0, 8), read_len=4096)
    assert r.status == 0 and len(r.data) == 4096


def test_data_digest_error_on_data_out(target: Daemon) -> None:
    with session(target, data_digest="CRC32C", operational={"ImmediateData": "No"}) as c:
        assert c.data_digest
        data = os.urandom(8192)
        cmd = c.scsi_pdu(R.write10(2048, 16), write_len=len(data))
        c.send(cmd)
        r2t = c.expect(P.R2T)
        assert (r2t.offset, r2t.desired_length) == (0, 8192)
        first = P.DataOut(final=0, lun=cmd.lun, itt=cmd.itt, ttt=r2t.ttt, expstatsn=c.expstatsn, datasn=0,
                          offset=0, data=data[:4096])
        bad = bytearray(c.encode(first))
        bad[-1] ^= 0x5A  # corrupt the data digest
        last = P.DataOut(final=1, lun=cmd.lun, itt=cmd.itt, ttt=r2t.ttt, expstatsn=c.expstatsn, datasn=1,
                         offset=4096, data=data[4096:])
        c.send_bytes(bytes(bad) + c.encode(last))
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.DATA_DIGEST_ERROR
        assert bytes(rej.data[:1])[0] & 0x3F == P.Op.DATA_OUT  # the rejected PDU's header comes back
        rsp = c.expect(P.ScsiResponse)
        assert rsp.itt == cmd.itt and rsp.status == 0x02
        sense = bytes(rsp.data[2:])
        assert sense[2] & 0x0F == 0x0B and sense[12:14] == b"\x47\x05", sense.hex()  # ABORTED COMMAND, CRC error
        still_usable(c)
        c.logout()


def test_data_digest_error_on_immediate_data(target: Daemon) -> None:
    with session(target, data_digest="CRC32C") as c:
        data = os.urandom(4096)
        cmd = c.scsi_pdu(R.write10(2100, 8), write_len=len(data), immediate_data=data)
        bad = bytearray(c.encode(cmd))
        bad[-1] ^= 0x01
        c.send_bytes(bytes(bad))
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.DATA_DIGEST_ERROR
        # The command part is still processed (RFC 7143 7.8): the target either solicits the
        # data again with an R2T or ends the task with the CRC-error CHECK CONDITION.
        nxt = c.recv()
        if isinstance(nxt, P.R2T):
            assert nxt.itt == cmd.itt and nxt.offset == 0 and nxt.desired_length == len(data)
            c.send_data_out(cmd, data, 0, len(data), ttt=nxt.ttt)
            rsp = c.expect(P.ScsiResponse)
            assert rsp.status == 0
            r = c.scsi(R.read10(2100, 8), read_len=len(data))
            assert r.data == data
        else:
            assert isinstance(nxt, P.ScsiResponse) and nxt.itt == cmd.itt and nxt.status == 0x02, nxt
            assert bytes(nxt.data[2:])[12:14] == b"\x47\x05"
        still_usable(c)
        c.logout()


def test_header_digest_error_drops_connection(target: Daemon) -> None:
    c = session(target, header_digest="CRC32C")
    assert c.header_digest
    wire = bytearray(c.encode(c.scsi_pdu(R.read10(0, 1), read_len=512)))
    wire[48] ^= 0xFF  # the header digest
    c.send_bytes(bytes(wire))
    got = c.wait_closed(timeout=10)
    assert not any(isinstance(p, P.DataIn | P.ScsiResponse) for p in got), got
    c.close()


def test_header_digest_error_on_bhs_drops_connection(target: Daemon) -> None:
    c = session(target, header_digest="CRC32C")
    wire = bytearray(c.encode(P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True)))
    wire[20] ^= 0x10  # flip a bit inside the BHS: the digest no longer matches
    c.send_bytes(bytes(wire))
    assert not any(isinstance(p, P.NopIn) for p in c.wait_closed(timeout=10))
    c.close()


def test_unknown_opcode_is_rejected_command_not_supported(target: Daemon) -> None:
    with session(target) as c:
        bhs = bytearray(48)
        bhs[0] = 0x1C  # an initiator opcode RFC 7143 does not define
        bhs[16:20] = (0xABCD).to_bytes(4, "big")
        c.send_bytes(bytes(bhs))
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED
        assert bytes(rej.data[:48]) == bytes(bhs)
        still_usable(c)
        c.logout()


def test_snack_at_erl0_is_rejected(target: Daemon) -> None:
    with session(target) as c:
        c.send(P.SnackRequest(type=0, itt=c.next_itt(), expstatsn=c.expstatsn))
        rej = c.expect(P.Reject)
        assert rej.reason in (P.RejectReason.COMMAND_NOT_SUPPORTED, P.RejectReason.PROTOCOL_ERROR)
        still_usable(c)
        c.logout()


def test_data_segment_beyond_max_recv_dsl(target: Daemon) -> None:
    with session(target) as c:
        limit = int(c.params.get("MaxRecvDataSegmentLength", "0"))
        declared = c.max_xmit  # what the target declared it accepts
        assert declared >= 512 and limit
        c.send(P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True,
                        data=os.urandom(declared + 4096)))
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.PROTOCOL_ERROR
        assert bytes(rej.data[:1])[0] & 0x3F == P.Op.NOP_OUT
        still_usable(c)  # the oversized segment was skipped: framing is intact
        c.logout()


def test_data_out_for_unknown_task_is_rejected(target: Daemon) -> None:
    with session(target) as c:
        c.send(P.DataOut(final=1, itt=0x7777777, ttt=0x1234, expstatsn=c.expstatsn, datasn=0, offset=0,
                         data=bytes(512)))
        rej = c.expect(P.Reject)
        assert rej.reason in (P.RejectReason.INVALID_PDU_FIELD, P.RejectReason.PROTOCOL_ERROR)
        still_usable(c)
        c.logout()


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_in_full_feature_phase(target: Daemon, seed: int) -> None:
    c = session(target)
    c.send_bytes(random.Random(seed).randbytes(64 * 1024))
    # Garbage opcodes are Rejected; a garbage DataSegmentLength may make the target skip
    # up to 16 MiB.  Either way no data is served and closing is handled quietly.
    try:
        got = []
        while True:
            got.append(c.recv_event(timeout=1.5))
    except (TimeoutError, R.ConnectionClosed):
        pass
    assert all(isinstance(p, P.Reject | P.NopIn | P.AsyncMessage) for p in got), got
    c.close()


def test_half_sent_pdu_then_close(target: Daemon) -> None:
    c = session(target)
    wire = c.encode(c.scsi_pdu(R.write10(3000, 8), write_len=4096, immediate_data=os.urandom(4096)))
    c.send_bytes(wire[:30])  # inside the BHS
    time.sleep(0.2)
    c.close()
    c = session(target)
    wire = c.encode(c.scsi_pdu(R.write10(3000, 8), write_len=4096, immediate_data=os.urandom(4096)))
    c.send_bytes(wire[:48 + 1000])  # whole header, part of the immediate data
    time.sleep(0.2)
    c.close()


def test_connection_dropped_mid_write_and_mid_read(target: Daemon) -> None:
    c = session(target)
    data = os.urandom(1 << 20)
    cmd = c.scsi_pdu(R.write10(4096, 2048), write_len=len(data), immediate_data=data[:65536])
    c.send(cmd)
    r2t = c.expect(P.R2T)
    c.send_data_out(cmd, data, r2t.offset, r2t.desired_length // 2, ttt=r2t.ttt)  # half a burst, no F bit
    c.close()
    c = session(target)
    c.send(c.scsi_pdu(R.read10(0, 16384), read_len=8 << 20))  # 8 MiB read, then vanish
    c.close()
    # The same blocks are writable and readable by a new session straight away.
    with session(target) as c:
        w = c.scsi(R.write10(4096, 2048), data=data)
        assert w.status == 0
        r = c.scsi(R.read10(4096, 2048), read_len=len(data))
        assert r.status == 0 and r.data == data
        c.logout()


def test_reset_connection_mid_command(target: Daemon) -> None:
    import socket
    import struct

    c = session(target)
    c.send(c.scsi_pdu(R.write10(6000, 2048), write_len=1 << 20))
    c.expect(P.R2T)
    # RST instead of FIN.
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_hundred_concurrent_sessions_do_io(target: Daemon) -> None:
    n, rounds, blocks = 100, 4, 64
    barrier = threading.Barrier(n, timeout=60)

    def one(i: int) -> int:
        c = R.RawClient(target.host, target.port, timeout=60,
                        initiator=f"iqn.2026-11.org.pyscsi-target.test:many-{i}")
        try:
            out = c.login(target.iqn)
            assert out.ok, f"session {i}: login status {out.status:#06x}"
            c.clear_unit_attentions()
            barrier.wait()  # all 100 logged in at once before any I/O
            base = 200_000 + i * blocks * rounds
            done = 0
            for k in range(rounds):
                data = os.urandom(blocks * 512)
                assert c.scsi(R.write10(base + k * blocks, blocks), data=data).status == 0
                r = c.scsi(R.read10(base + k * blocks, blocks), read_len=len(data))
                assert r.status == 0 and r.data == data, f"session {i} round {k}: data mismatch"
                done += 1
            assert c.logout().response == 0
            return done
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=n) as ex:
        results = list(ex.map(one, range(n)))
    assert results == [rounds] * n
