"""Engine end to end on loopback: a real asyncio server, the real login machine and SCSI
layer, and a raw-PDU client speaking over TCP."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pyscsi_target.config import model as M
from pyscsi_target.iscsi import pdu as P
from pyscsi_target.server.engine import Engine, EngineError

INITIATOR = "iqn.1994-05.com.example:loop"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def make_model(tmp: Path, listen: list[str], **target_kw: Any) -> M.ConfigModel:
    img = tmp / "lun0.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(16 << 20)
    m = M.ConfigModel()
    m.portal_groups[1] = M.PortalGroup(1, 1, listen)
    m.targets[1] = M.Target(1, "loop", **target_kw)
    m.target_groups[1] = M.TargetGroup(1, 1, 1)
    m.extents[1] = M.Extent(1, "loop", "File", str(img), naa="0x6589cfc000000042", serial="loop42")
    m.lun_maps[1] = M.LunMap(1, 1, 1, 0)
    return m


class Client:
    """A minimal initiator: raw PDUs over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.cmdsn = 1
        self.statsn = 0
        self.itt = 0
        self.hd = self.dd = False  # digests, on once login negotiated them

    @classmethod
    async def connect(cls, host: str, port: int) -> Client:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def send(self, pdu: P.PDU) -> None:
        self.w.write(pdu.to_bytes(self.hd, self.dd))
        await self.w.drain()

    async def recv(self, timeout: float = 5.0) -> P.PDU:
        hdr = await asyncio.wait_for(self.r.readexactly(48), timeout)
        ahs = hdr[4] * 4
        dsl = int.from_bytes(hdr[5:8], "big")
        extra = (4 if self.hd else 0) + (4 if self.dd and dsl else 0)
        rest = await asyncio.wait_for(self.r.readexactly(ahs + dsl + P.pad_len(dsl) + extra), timeout)
        pdu = P.decode(hdr + rest, self.hd, self.dd)  # raises if a digest is wrong
        if hasattr(pdu, "statsn") and not isinstance(pdu, P.DataIn | P.R2T):
            self.statsn = (pdu.statsn + 1) & 0xFFFFFFFF
        return pdu

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    async def login(self, target: str | None, isid: int = 0x400000000001, tsih: int = 0,
                    digest: str = "None") -> P.LoginResponse:
        keys = [("InitiatorName", INITIATOR)]
        if target is None:
            keys.append(("SessionType", "Discovery"))
        else:
            keys += [("TargetName", target), ("SessionType", "Normal")]
        keys += [("HeaderDigest", digest), ("DataDigest", digest), ("MaxRecvDataSegmentLength", "65536"),
                 ("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
                 ("FirstBurstLength", "65536"), ("ErrorRecoveryLevel", "0")]
        req = P.LoginRequest(transit=1, csg=1, nsg=3, isid=isid.to_bytes(6, "big"), tsih=tsih,
                             itt=self.next_itt(), cid=0, cmdsn=self.cmdsn, expstatsn=0)
        req.data = P.build_text(keys)
        await self.send(req)
        rsp = await self.recv()
        assert isinstance(rsp, P.LoginResponse)
        if rsp.status_class == 0 and rsp.nsg == 3:
            got = dict(P.parse_text(rsp.data))
            self.hd = got.get("HeaderDigest") == "CRC32C"
            self.dd = got.get("DataDigest") == "CRC32C"
        return rsp

    async def scsi(self, cdb: bytes, *, read: int = 0, data: bytes = b"", edtl: int | None = None) -> list[P.PDU]:
        itt = self.next_itt()
        cmd = P.ScsiCommand(itt=itt, cmdsn=self.cmdsn, expstatsn=self.statsn, read=int(bool(read)),
                            write=int(bool(data)), edtl=read or (len(data) if edtl is None else edtl),
                            attr=1, cdb=cdb.ljust(16, b"\0"))
        cmd.data = data
        self.cmdsn += 1
        await self.send(cmd)
        out = []
        while True:
            p = await self.recv()
            out.append(p)
            if isinstance(p, P.ScsiResponse) or (isinstance(p, P.DataIn) and p.has_status):
                return out

    async def close(self) -> None:
        self.w.close()
        try:
            await self.w.wait_closed()
        except (ConnectionError, OSError):
            pass


def run(tmp: Path, body: Callable[[Engine, int], Awaitable[None]], listen: str = "127.0.0.1:0",
        **target_kw: Any) -> None:
    async def main() -> None:
        eng = Engine(tmp, nop_interval=30, login_timeout=5)
        await eng.apply(make_model(tmp, [listen], **target_kw))
        port = eng.listen_addresses()[0][1]
        try:
            await asyncio.wait_for(body(eng, port), 30)
        finally:
            await eng.shutdown(grace=0.5)

    uvloop.run(main())  # the daemon's loop


IQN = f"{M.DEFAULT_BASENAME}:loop"


def test_discovery_and_io(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        rsp = await c.login(None)
        assert rsp.status_class == 0 and rsp.transit and rsp.nsg == 3
        t = P.TextRequest(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn)
        t.data = P.build_text([("SendTargets", "All")])
        c.cmdsn += 1
        await c.send(t)
        txt = await c.recv()
        assert isinstance(txt, P.TextResponse)
        assert P.parse_text(txt.data) == [("TargetName", IQN), ("TargetAddress", f"127.0.0.1:{port},1")]
        await c.send(P.LogoutRequest(reason=0, itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn))
        lo = await c.recv()
        assert isinstance(lo, P.LogoutResponse) and lo.response == 0
        await c.close()

        c = await Client.connect("127.0.0.1", port)
        rsp = await c.login(IQN)
        assert rsp.status_class == 0 and rsp.tsih != 0
        assert eng.session_count(1) == 1
        # NOP-Out ping with data comes back
        nop = P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn)
        nop.immediate = True
        nop.data = b"ping!"
        await c.send(nop)
        nin = await c.recv()
        assert isinstance(nin, P.NopIn) and bytes(nin.data) == b"ping!"
        # INQUIRY: drain unit attentions first (TEST UNIT READY until GOOD)
        for _ in range(4):
            (r,) = await c.scsi(bytes(6))
            if r.status == 0:
                break
        out = await c.scsi(bytes([0x12, 0, 0, 0, 96, 0]), read=96)
        assert isinstance(out[-1], P.DataIn) and out[-1].status == 0
        assert out[0].data[0] & 0x1F == 0  # direct access block device
        # WRITE(10) one block with immediate data, READ(10) it back
        block = bytes(range(256)) * 2
        (w,) = await c.scsi(struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 1, 0), data=block)
        assert isinstance(w, P.ScsiResponse) and w.status == 0
        rd = await c.scsi(struct.pack(">BBIBHB", 0x28, 0, 8, 0, 1, 0), read=512)
        assert b"".join(bytes(p.data) for p in rd) == block
        # an unknown opcode gets a Reject; the session goes on
        bad = bytearray(48)
        bad[0] = 0x1D
        c.w.write(bytes(bad))
        rej = await c.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED
        (r,) = await c.scsi(bytes(6))
        assert r.status == 0
        await c.send(P.LogoutRequest(reason=0, itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn))
        assert (await c.recv()).response == 0
        await c.close()
        for _ in range(50):
            if eng.session_count(1) == 0:
                break
            await asyncio.sleep(0.02)
        assert eng.session_count(1) == 0

    run(tmp_path, body)


def test_session_reinstatement_and_unknown_target(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        a = await Client.connect("127.0.0.1", port)
        assert (await a.login(IQN)).status_class == 0
        b = await Client.connect("127.0.0.1", port)
        rsp = await b.login(IQN)  # same ISID, TSIH 0: the old session is closed
        assert rsp.status_class == 0
        assert await a.r.read() == b"" or a.r.at_eof()
        assert eng.session_count(1) == 1
        (r,) = await b.scsi(bytes(6))
        assert r.status in (0, 2)
        c = await Client.connect("127.0.0.1", port)
        rsp = await c.login(IQN + "x")
        assert (rsp.status_class, rsp.status_detail) == (2, 3)
        d = await Client.connect("127.0.0.1", port)
        rsp = await d.login(IQN, tsih=0x7777)  # no such session
        assert (rsp.status_class, rsp.status_detail) == (2, 0x0A)
        for cl in (b, c, d, a):
            await cl.close()

    run(tmp_path, body)


def test_access_config_forbidden(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        rsp = await c.login(IQN)
        assert (rsp.status_class, rsp.status_detail) == (2, 2)
        await c.close()

    run(tmp_path, body, access_config="10.0.0.0/8")


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_portal(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("::1", port)
        assert (await c.login(IQN)).status_class == 0
        (r,) = await c.scsi(bytes(6))
        assert r.status in (0, 2)
        await c.close()

    run(tmp_path, body, listen="[::1]:0")


def test_bind_failure_is_clear(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            eng = Engine(tmp_path)
            with pytest.raises(EngineError, match=f"127.0.0.1:{port}"):
                await eng.apply(make_model(tmp_path, [f"127.0.0.1:{port}"]))
            await eng.shutdown(grace=0.1)

    asyncio.run(main())


def test_digests_and_data_digest_error(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        assert (await c.login(IQN, digest="CRC32C")).status_class == 0
        assert c.hd and c.dd
        for _ in range(4):
            (r,) = await c.scsi(bytes(6))
            if r.status == 0:
                break
        block = bytes(range(256)) * 8  # 4 blocks
        (w,) = await c.scsi(struct.pack(">BBIBHB", 0x2A, 0, 16, 0, 4, 0), data=block)
        assert w.status == 0
        rd = await c.scsi(struct.pack(">BBIBHB", 0x28, 0, 16, 0, 4, 0), read=len(block))
        assert b"".join(bytes(p.data) for p in rd) == block
        # A write whose only Data-Out has a bad data digest: Reject, then CHECK CONDITION
        # ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR (ERL 0 recovery).
        itt = c.next_itt()
        cmd = P.ScsiCommand(itt=itt, cmdsn=c.cmdsn, expstatsn=c.statsn, write=1, final=1, edtl=512, attr=1,
                            cdb=struct.pack(">BBIBHB", 0x2A, 0, 40, 0, 1, 0).ljust(16, b"\0"))
        c.cmdsn += 1
        await c.send(cmd)
        r2t = await c.recv()
        assert isinstance(r2t, P.R2T) and r2t.desired_length == 512
        d = P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=1)
        d.data = bytes(512)
        wire = bytearray(d.to_bytes(True, True))
        wire[-1] ^= 0x5A
        c.w.write(bytes(wire))
        rej = await c.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.DATA_DIGEST_ERROR
        rsp = await c.recv()
        assert isinstance(rsp, P.ScsiResponse) and rsp.status == 2
        assert bytes(rsp.data[2 + 12 : 2 + 14]) == b"\x47\x05" and rsp.data[2 + 2] == 0x0B
        (r,) = await c.scsi(bytes(6))  # the session goes on
        assert r.status == 0
        # A header digest error drops the connection.
        bad = bytearray(P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn).to_bytes(True, True))
        bad[50] ^= 1
        c.w.write(bytes(bad))
        assert await asyncio.wait_for(c.r.read(), 5) == b""
        await c.close()

    run(tmp_path, body)


def test_malformed_before_login_dropped_parallel_session_unharmed(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        good = await Client.connect("127.0.0.1", port)
        assert (await good.login(IQN)).status_class == 0
        # A PDU other than Login before login: Login reject 0x020b, then the connection closes.
        bad = await Client.connect("127.0.0.1", port)
        await bad.send(P.NopOut(itt=1, cmdsn=1))
        rej = await bad.recv()
        assert isinstance(rej, P.LoginResponse) and (rej.status_class, rej.status_detail) == (2, 0x0B)
        assert await asyncio.wait_for(bad.r.read(), 5) == b""
        # Random bytes: a reject or a drop, and the connection ends.
        rnd = await Client.connect("127.0.0.1", port)
        rnd.w.write(bytes((i * 37 + 11) & 0xFF for i in range(4096)))
        data = await asyncio.wait_for(rnd.r.read(), 5)
        assert data == b"" or data[0] == P.Op.LOGIN_RSP
        # A data segment over 8192 bytes during login: Login reject 0x0200.
        big = await Client.connect("127.0.0.1", port)
        req = P.LoginRequest(transit=1, csg=1, nsg=3, isid=bytes(6), itt=1)
        req.data = bytes(9000)
        await big.send(req)
        rej = await big.recv()
        assert isinstance(rej, P.LoginResponse) and (rej.status_class, rej.status_detail) == (2, 0)
        # A half-sent PDU then a close: nothing breaks.
        half = await Client.connect("127.0.0.1", port)
        half.w.write(P.NopOut(itt=1, cmdsn=1).to_bytes()[:20])
        await half.close()
        # Full feature phase: a data segment beyond our MaxRecvDataSegmentLength (262144)
        # gets a protocol-error Reject; a write dropped mid-command leaves nothing behind.
        ffp = await Client.connect("127.0.0.1", port)
        assert (await ffp.login(IQN, isid=0x400000000077)).status_class == 0
        nop = P.NopOut(itt=ffp.next_itt(), cmdsn=ffp.cmdsn, expstatsn=ffp.statsn)
        nop.immediate = True
        nop.data = bytes(300000)
        await ffp.send(nop)
        rej = await ffp.recv()
        assert isinstance(rej, P.Reject) and rej.reason == P.RejectReason.PROTOCOL_ERROR
        cmd = P.ScsiCommand(itt=ffp.next_itt(), cmdsn=ffp.cmdsn, expstatsn=ffp.statsn, write=1, edtl=65536,
                            attr=1, cdb=struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 128, 0).ljust(16, b"\0"))
        await ffp.send(cmd)
        assert isinstance(await ffp.recv(), P.R2T)
        await ffp.close()  # gone with the write half done
        for _ in range(4):
            (r,) = await good.scsi(bytes(6))
            if r.status == 0:
                break
        assert r.status == 0
        for _ in range(50):
            if eng.session_count(1) == 1:
                break
            await asyncio.sleep(0.02)
        assert eng.session_count(1) == 1
        for cl in (bad, rnd, big, good):
            await cl.close()

    run(tmp_path, body)


def test_shutdown_requests_logout(tmp_path: Path) -> None:
    async def main() -> None:
        eng = Engine(tmp_path, login_timeout=5)
        await eng.apply(make_model(tmp_path, ["127.0.0.1:0"]))
        port = eng.listen_addresses()[0][1]
        c = await Client.connect("127.0.0.1", port)
        assert (await c.login(IQN)).status_class == 0
        assert len(eng.sessions()) == 1
        stop = asyncio.create_task(eng.shutdown(grace=3))
        msg = await c.recv()
        assert isinstance(msg, P.AsyncMessage) and msg.event == 1 and msg.param3 == 3
        await c.send(P.LogoutRequest(reason=0, itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn))
        assert (await c.recv()).response == 0
        await asyncio.wait_for(stop, 5)
        assert eng.sessions() == [] and eng.listen_addresses() == []
        await c.close()

    asyncio.run(main())


def test_connection_reinstatement_keeps_session(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        a = await Client.connect("127.0.0.1", port)
        rsp = await a.login(IQN)
        tsih = rsp.tsih
        assert rsp.status_class == 0 and tsih
        b = await Client.connect("127.0.0.1", port)
        b.cmdsn = a.cmdsn
        rsp = await b.login(IQN, tsih=tsih)  # same ISID, TSIH and CID: connection reinstatement
        assert rsp.status_class == 0 and rsp.tsih == tsih
        assert await asyncio.wait_for(a.r.read(), 5) == b""
        assert eng.session_count(1) == 1 and eng.sessions()[0]["tsih"] == tsih
        for _ in range(4):
            (r,) = await b.scsi(bytes(6))
            if r.status == 0:
                break
        assert r.status == 0
        for cl in (a, b):
            await cl.close()

    run(tmp_path, body)


def test_keepalive_pings_idle_and_drops_dead(tmp_path: Path) -> None:
    async def main() -> None:
        eng = Engine(tmp_path, nop_interval=0.2, nop_timeout=0.3, login_timeout=5)
        await eng.apply(make_model(tmp_path, ["127.0.0.1:0"]))
        port = eng.listen_addresses()[0][1]
        try:
            alive = await Client.connect("127.0.0.1", port)
            assert (await alive.login(IQN)).status_class == 0
            dead = await Client.connect("127.0.0.1", port)
            assert (await dead.login(IQN, isid=0x400000000002)).status_class == 0
            # The live one answers every ping for a while.
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.2
            pings = 0
            while loop.time() < end:
                try:
                    p = await alive.recv(timeout=end - loop.time())
                except TimeoutError:
                    break
                assert isinstance(p, P.NopIn) and p.itt == P.RESERVED_TAG and p.ttt != P.RESERVED_TAG
                pings += 1
                ans = P.NopOut(itt=P.RESERVED_TAG, ttt=p.ttt, cmdsn=alive.cmdsn, expstatsn=alive.statsn, lun=p.lun)
                ans.immediate = True
                await alive.send(ans)
            assert pings >= 2
            # The silent one got a ping, never answered, and was dropped.
            data = await asyncio.wait_for(dead.r.read(), 5)
            assert data == b"" or data[0] & 0x3F == P.Op.NOP_IN
            assert eng.session_count(1) == 1
            for cl in (alive, dead):
                await cl.close()
        finally:
            await eng.shutdown(grace=0.2)

    asyncio.run(main())


async def _tmf(c: Client, fn: int, lun: int = 0) -> int:
    t = P.TaskMgmtRequest(function=fn, itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn, lun=P.int_to_lun(lun))
    t.immediate = True
    await c.send(t)
    r = await c.recv()
    assert isinstance(r, P.TaskMgmtResponse) and r.itt == t.itt
    return r.response


def test_target_resets_refused_by_default(tmp_path: Path) -> None:
    # TARGET WARM/COLD RESET would end every task (and, cold, every session) of every
    # initiator: without the target's allow_*_reset they get "function authorization failed".
    async def body(eng: Engine, port: int) -> None:
        a = await Client.connect("127.0.0.1", port)
        assert (await a.login(IQN)).status_class == 0
        b = await Client.connect("127.0.0.1", port)
        assert (await b.login(IQN, isid=0x400000000009)).status_class == 0
        for c in (a, b):
            for _ in range(4):  # each new nexus's POWER ON unit attention
                (r,) = await c.scsi(bytes(6))
                if r.status == 0:
                    break
        assert await _tmf(a, 6) == P.TmfResponse.AUTHORIZATION_FAILED
        assert await _tmf(a, 7) == P.TmfResponse.AUTHORIZATION_FAILED
        (r,) = await b.scsi(bytes(6))
        assert r.status == 0  # no reset happened: no unit attention for the other nexus
        assert eng.session_count(1) == 2
        (r,) = await a.scsi(bytes(6))  # the asking session goes on too
        assert r.status == 0
        # Allowed later, live: the same sessions may now reset.
        m = eng.model.copy()  # the engine's objects are sealed: edit copies
        m.targets[1] = M.copy_object(m.targets[1])
        m.targets[1].allow_warm_reset = True
        await eng.apply(m)
        assert await _tmf(a, 6) == 0
        assert await _tmf(a, 7) == P.TmfResponse.AUTHORIZATION_FAILED
        for cl in (a, b):
            await cl.close()

    run(tmp_path, body)


def test_tmf_over_the_wire_and_cold_reset_drops(tmp_path: Path) -> None:
    async def body(eng: Engine, port: int) -> None:
        a = await Client.connect("127.0.0.1", port)
        assert (await a.login(IQN)).status_class == 0
        b = await Client.connect("127.0.0.1", port)
        assert (await b.login(IQN, isid=0x400000000009)).status_class == 0

        assert await _tmf(a, 5) == 0  # LUN RESET
        assert await _tmf(a, 5, lun=9) == 2  # no such LUN
        assert await _tmf(a, 8) == 4  # TASK REASSIGN at ERL 0
        assert await _tmf(a, 6) == 0  # TARGET WARM RESET: sessions stay
        (r,) = await b.scsi(bytes(6))
        assert r.status == 2  # a unit attention (power on / reset) is pending for the other nexus
        assert await _tmf(a, 7) == 0  # TARGET COLD RESET: then every connection goes
        assert await asyncio.wait_for(a.r.read(), 5) == b""
        assert await asyncio.wait_for(b.r.read(), 5) == b""
        for _ in range(50):
            if eng.session_count(1) == 0:
                break
            await asyncio.sleep(0.02)
        assert eng.session_count(1) == 0
        for cl in (a, b):
            await cl.close()

    run(tmp_path, body, allow_warm_reset=True, allow_cold_reset=True)


def test_hundred_concurrent_sessions_do_io(tmp_path: Path) -> None:
    async def one(port: int, i: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        assert (await c.login(IQN, isid=0x410000000000 + i)).status_class == 0
        for _ in range(4):
            (r,) = await c.scsi(bytes(6))
            if r.status == 0:
                break
        block = bytes([i]) * 4096
        lba = i * 8
        for _ in range(5):
            (w,) = await c.scsi(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, 8, 0), data=block)
            assert w.status == 0
            rd = await c.scsi(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), read=4096)
            assert b"".join(bytes(p.data) for p in rd) == block
        await c.send(P.LogoutRequest(reason=0, itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn))
        assert (await c.recv()).response == 0
        await c.close()

    async def body(eng: Engine, port: int) -> None:
        await asyncio.gather(*(one(port, i) for i in range(100)))

    run(tmp_path, body)


def test_backlog_of_immediate_commands_pauses_reading(tmp_path: Path) -> None:
    """Immediate commands are not bound by MaxCmdSN: past 2x the queue depth of work in
    progress the adapter stops reading, and resumes once the backlog drains."""

    class Holding:
        def __init__(self) -> None:
            self.held: list[Any] = []

        def submit(self, task: Any) -> None:
            self.held.append(task)

    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        assert (await c.login(IQN)).status_class == 0
        (sess,) = eng.session_registry.by_tsih.values()
        (proto,) = [p for p in eng.connections if p.conn is not None]
        dev = Holding()
        real = sess.device
        sess.device = dev
        for _ in range(2 * eng.queue_depth + 40):
            t = P.ScsiCommand(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn, attr=1, cdb=bytes(16))
            t.immediate = True
            c.w.write(t.to_bytes())
        await c.w.drain()
        for _ in range(100):
            if proto._paused_reading:
                break
            await asyncio.sleep(0.02)
        assert proto._paused_reading and len(dev.held) >= 2 * eng.queue_depth
        sess.device = real
        for task in dev.held:
            task.on_done(task)
        for _ in range(100):
            if not proto._paused_reading and len(dev.held) == 2 * eng.queue_depth + 40:
                break
            await asyncio.sleep(0.02)
        assert not proto._paused_reading
        await c.close()

    run(tmp_path, body)


def test_a_partly_received_large_pdu_waits_for_its_rest(tmp_path: Path) -> None:
    """While a WRITE's data segment is only partly in, the connection asks the kernel (SO_RCVLOWAT)
    to wake it once the rest is there instead of per segment; once complete it is back to 1."""

    async def body(eng: Engine, port: int) -> None:
        c = await Client.connect("127.0.0.1", port)
        assert (await c.login(IQN)).status_class == 0
        await c.scsi(bytes(6))  # the power-on unit attention
        (proto,) = eng.connections
        assert proto._lowat == 1
        data = bytes(range(256)) * 256  # 64 KiB: the FirstBurstLength of this session, as immediate data
        cmd = P.ScsiCommand(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.statsn, write=1, edtl=len(data), attr=1,
                            cdb=struct.pack(">BBIBHB", 0x2A, 0, 100, 0, len(data) // 512, 0).ljust(16, b"\0"))
        cmd.data = data
        c.cmdsn += 1
        wire = cmd.to_bytes()
        c.w.write(wire[:48 + 4096])  # the header and the first 4 KiB
        await c.w.drain()
        for _ in range(100):
            if proto._lowat != 1:
                break
            await asyncio.sleep(0.01)
        assert proto._lowat == len(wire) - 48 - 4096
        assert proto._sock is not None
        assert proto._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == proto._lowat
        c.w.write(wire[48 + 4096:])
        await c.w.drain()
        rsp = await c.recv()
        assert isinstance(rsp, P.ScsiResponse) and rsp.status == 0
        assert proto._lowat == 1 and proto._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        r = await c.scsi(struct.pack(">BBIBHB", 0x28, 0, 100, 0, len(data) // 512, 0), read=len(data))
        assert b"".join(bytes(p.data) for p in r if isinstance(p, P.DataIn)) == data
        await c.close()

    run(tmp_path, body)
