"""Fuzz targets of the sans-IO core: each takes one input (bytes) and drives one layer with
it, raising only when the layer broke a rule (an unexpected exception, or a broken
invariant checked here).  ``support.fuzz`` runs them under atheris (coverage-guided);
tests/test_fuzz_corpus.py replays the kept corpus and every past crash through them.

- ``pdu``: the framer (``PDUReader``) and codec: whatever bytes arrive, framing yields
  PDUs, digest errors or an oversized-PDU notice, or raises ``PduError``; a decoded PDU
  encodes, and what it encodes to decodes and encodes to the same bytes.
- ``login``: a login conversation (``LoginMachine`` with None, CHAP or mutual CHAP): every
  request gets one Login Response (or nothing once the login is over).
- ``text``: text exchanges after login (``TextHandler``, discovery and normal sessions).
- ``connection``: a full-feature-phase connection (``Connection``) over the real SCSI
  layer on an in-memory LU: commands, Data-Out, task management, NOP, logout, SNACK...
- ``scsi``: the SCSI layer alone (``ScsiDevice.submit``): CDB parsing and parameter data
  of every command on an in-memory LU, every task completes exactly once.

The first input byte picks the variant (digests, auth method, session type); the rest is
the byte stream an initiator would send.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence

from pyscsi_target.backstore.base import Backstore, Buffer
from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.chap import chap_digest
from pyscsi_target.iscsi.connection import Connection
from pyscsi_target.iscsi.login import LoginMachine
from pyscsi_target.iscsi.negotiation import encode_pairs
from pyscsi_target.iscsi.params import ChapCredential, LoginResult, SessionParams, TargetInfo
from pyscsi_target.iscsi.session import Session
from pyscsi_target.iscsi.text import TextHandler
from pyscsi_target.scsi.device import ScsiDevice
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.registry import ScsiRegistry
from pyscsi_target.scsi.reservations import PersistentReservations
from pyscsi_target.scsi.settings import LuSettings
from pyscsi_target.scsi.task import Nexus, ScsiTask, TaskAttr
from support.static_policy import StaticPolicy

TGT = "iqn.2026-11.org.pyscsi-target:fuzz"
INITIATOR = "iqn.1994-05.com.example:fuzz"
CRED = ChapCredential("user", "initsecret1234", "tuser", "tgtsecret12345")
METHODS = ("None", "CHAP", "CHAP Mutual", "Auto")
LU_BYTES = 1 << 20
BLOCK = 512
MAX_PDUS = 64  # per input: bounds the work one input can ask for
# Executor work (COMPARE AND WRITE, WRITE SAME, UNMAP) on a loaded machine can take a while;
# a task still open after this long is a hang (libFuzzer's own -timeout is 10 s).
SETTLE_SECONDS = 5.0


class Invariant(AssertionError):
    """A layer broke one of its own rules (not merely refused the input)."""


def _frames(data: bytes, header_digest: bool = False, data_digest: bool = False,
            max_data: int = 8192) -> list[P.Framed]:
    reader = P.PDUReader(header_digest, data_digest, max_data=max_data)
    out: list[P.Framed] = []
    try:
        for framed in reader.feed(data):
            out.append(framed)
            if len(out) >= MAX_PDUS:
                break
    except P.PduError:
        pass  # the stream can no longer be framed: the adapter drops the connection
    return out


# --- pdu ------------------------------------------------------------------------------------


def pdu(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    hd, dd = bool(mode & 1), bool(mode & 2)
    max_data = (512, 8192, 65536, 1 << 24)[(mode >> 2) & 3]
    for framed in _frames(data[1:], hd, dd, max_data):
        if not isinstance(framed, P.PDU):
            continue
        wire = framed.to_bytes(hd, dd)
        again = _frames(wire, hd, dd, max(max_data, len(framed.data)))
        if len(again) != 1 or not isinstance(again[0], P.PDU):
            raise Invariant(f"{type(framed).__name__} did not frame again: {again!r}")
        if again[0].to_bytes(hd, dd) != wire:
            raise Invariant(f"{type(framed).__name__} changed in a decode/encode round trip")


# --- login ----------------------------------------------------------------------------------


def _policy(method: str) -> StaticPolicy:
    return StaticPolicy([TargetInfo(1, TGT, "fuzz", method, [CRED])], discovery_method=method,
                        discovery_credentials=[CRED])


def login(data: bytes) -> None:
    if not data:
        return
    m = LoginMachine(_policy(METHODS[data[0] & 3]), random_bytes=lambda n: bytes(range(n)))
    for framed in _frames(data[1:]):
        if not isinstance(framed, P.PDU):
            continue
        over = m.done or m.failed
        out = m.receive(framed)
        if over:
            if out:
                raise Invariant("a login that is over answered again")
            continue
        if len(out) != 1 or not isinstance(out[0], P.LoginResponse | P.Reject):
            raise Invariant(f"a login request got {out!r}")
        out[0].to_bytes()  # every answer must encode


# --- text -----------------------------------------------------------------------------------


def text(data: bytes) -> None:
    if not data:
        return
    discovery = bool(data[0] & 1)
    params = SessionParams()
    handler = TextHandler(_policy("None"), session_type="Discovery" if discovery else "Normal",
                          initiator_name=INITIATOR, target_iqn=None if discovery else TGT, params=params)
    for framed in _frames(data[1:]):
        if not isinstance(framed, P.TextRequest):
            continue
        for answer in handler.receive(framed):
            answer.to_bytes()


# --- the SCSI layer on an in-memory LU ------------------------------------------------------


class MemoryBackstore(Backstore):
    """A bytearray; every I/O completes inline (no threads: inputs replay the same way)."""

    def __init__(self, size: int) -> None:
        super().__init__("fuzz", size)
        self.thin = True
        self.data = bytearray(size)

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> bool:
        self.read_into(buf, offset)
        return True

    def write_nowait(self, data: Sequence[Buffer], offset: int) -> bool:
        self.write(data, offset)
        return True

    def submit_read(self, buf: bytearray | memoryview, offset: int,
                    done: Callable[[BaseException | None], None]) -> None:
        self.read_into(buf, offset)
        done(None)

    def submit_write(self, data: Sequence[Buffer], offset: int, sync: bool,
                     done: Callable[[BaseException | None], None]) -> None:
        self.write(data, offset)
        done(None)

    def submit_flush(self, done: Callable[[BaseException | None], None]) -> None:
        done(None)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        chunk = self.data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        view[len(chunk) :] = bytes(len(view) - len(chunk))

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        pos = offset
        for d in data:
            view = memoryview(d).cast("B")
            if pos + len(view) > self.size:
                raise Invariant(f"write past the end of the LU: {pos}+{len(view)} > {self.size}")
            self.data[pos : pos + len(view)] = view
            pos += len(view)

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise Invariant(f"discard past the end of the LU: {offset}+{length}")
        self.data[offset : offset + length] = bytes(length)

    def allocated_bytes(self) -> int:
        return self.size // 2

    def free_bytes(self) -> int:
        return self.size

    def release(self) -> None:
        pass


class ScsiWorld:
    """One registry, one LU and one device, made once per process (a new LU per input
    would cost more than the input); each input starts from a reset LU."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.registry = ScsiRegistry()
        settings = LuSettings(name="fuzz", naa=bytes.fromhex("6589cfc000000001"), serial="fuzz", avail_threshold=50)
        self.backstore = MemoryBackstore(LU_BYTES)
        self.lu = LogicalUnit(settings, self.backstore, self.registry)
        self.device = ScsiDevice(TGT, self.registry)
        self.device.set_luns({0: self.lu})
        self.nexus_id = 0

    def nexus(self) -> Nexus:
        self.nexus_id += 1
        return Nexus(self.nexus_id, INITIATOR, 0x23D000000001 + self.nexus_id, TGT, 1)

    def forget(self, nexus: Nexus) -> None:
        """Back to a fresh LU for the next input (reservations, UAs, mode pages, copies)."""
        self.device.nexus_lost(nexus)
        self.lu.reset((0x29, 0x00))
        self.lu.pr = PersistentReservations(self.lu)
        self.lu.ua.clear()
        self.lu.nexuses.clear()
        self.lu.copy_results.clear()
        self.lu.sanitize_failed = self.lu.sanitizing = False

    def settle(self) -> None:
        """Let what the input started finish (executor work of exclusive commands)."""
        async def drain() -> None:
            deadline = self.loop.time() + SETTLE_SECONDS
            while self.loop.time() < deadline:
                await asyncio.sleep(0)
                lu = self.lu
                if not lu.tasks and not lu.excl_active and not lu.excl_waiters and not lu.sanitizing:
                    return  # (a SANITIZE with IMMED runs on after its task: wait for it too)
                await asyncio.sleep(0.001)
            raise Invariant(f"tasks never completed: {list(self.lu.tasks)} (sanitizing: {self.lu.sanitizing})")

        self.loop.run_until_complete(drain())


_world: ScsiWorld | None = None


def world() -> ScsiWorld:
    global _world
    if _world is None:
        _world = ScsiWorld()
    return _world


def scsi(data: bytes) -> None:
    """Records of [attr|lun, cdb length, cdb, data length (2 bytes), data] submitted to the device."""
    w = world()
    nexus = w.nexus()
    w.device.add_nexus(nexus)
    w.lu.ua.clear()  # not every input has to spend its first command on POWER ON RESET
    done: dict[int, int] = {}

    def finished(task: ScsiTask) -> None:
        done[task.tag] = done.get(task.tag, 0) + 1

    async def run() -> None:
        pos, tag = 0, 0
        while pos + 2 <= len(data) and tag < MAX_PDUS:
            attr = TaskAttr(data[pos] & 3)
            lun = data[pos] >> 2 & 1  # LUN 1 does not exist
            n = min(16, max(1, data[pos + 1] & 31))
            cdb = bytes(data[pos + 2 : pos + 2 + n]).ljust(16, b"\0")
            pos += 2 + n
            dlen = int.from_bytes(data[pos : pos + 2], "big") if pos + 2 <= len(data) else 0
            payload = bytes(data[pos + 2 : pos + 2 + dlen])
            pos += 2 + len(payload)
            tag += 1
            expected = len(payload) if payload else 1 << 16
            task = ScsiTask(nexus, lun, cdb, tag, attr, expected, payload or None, finished)
            w.device.submit(task)
            await asyncio.sleep(0)

    try:
        w.loop.run_until_complete(run())
        w.settle()
        for tag, count in done.items():
            if count != 1:
                raise Invariant(f"task {tag} completed {count} times")
    finally:
        w.forget(nexus)


# --- connection -----------------------------------------------------------------------------


def connection(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    w = world()
    params = SessionParams(
        initial_r2t=bool(mode & 1), immediate_data=bool(mode & 2), header_digest=bool(mode & 4),
        data_digest=bool(mode & 8), max_recv_dsl=(512, 8192)[mode >> 4 & 1],
        max_xmit_dsl=(512, 8192)[mode >> 5 & 1], first_burst_length=(512, 65536)[mode >> 6 & 1],
        max_burst_length=(4096, 262144)[mode >> 7 & 1])
    res = LoginResult(session_type="Normal", initiator_name=INITIATOR, initiator_alias=None,
                      target=TargetInfo(1, TGT, None, "None", []), isid=0x23D000000001, tsih=1, cid=1, cmdsn=1,
                      statsn=1, params=params)
    nexus = w.nexus()
    session = Session(res, 1, nexus, w.device, queue_depth=16)
    w.device.add_nexus(nexus)  # as the session registry does (server/sessions.py)
    w.lu.ua.clear()
    conn = Connection(session, 1, 1, policy=_policy("None"))
    frames = _frames(data[1:], params.header_digest, params.data_digest, params.max_recv_dsl)

    async def run() -> None:
        for framed in frames:
            conn.handle(framed)
            for buf in conn.take_output():
                bytes(buf)
            await asyncio.sleep(0)

    try:
        w.loop.run_until_complete(run())
        w.settle()
        for buf in conn.take_output():
            bytes(buf)
    finally:
        w.forget(nexus)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pdu": pdu, "login": login, "text": text, "connection": connection, "scsi": scsi,
}


# --- seeds: valid conversations the fuzzer starts from ----------------------------------------


def _login_seed(method: str, keys: list[tuple[str, str]], csg: int = 0, nsg: int = 1) -> bytes:
    pairs = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", TGT),
             ("AuthMethod", method), *keys]
    req = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=csg, nsg=nsg, transit=True, itt=1)
    req.data = encode_pairs(pairs)
    op = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=1, nsg=3, transit=True, itt=1)
    op.data = encode_pairs([("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536"),
                            ("ImmediateData", "Yes"), ("InitialR2T", "No"), ("MaxBurstLength", "262144")])
    return req.to_bytes() + op.to_bytes()


def _cmd(itt: int, cmdsn: int, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False,
         data: bytes = b"", final: bool = True) -> bytes:
    c = P.ScsiCommand(itt=itt, cmdsn=cmdsn, edtl=edtl, read=read, write=write, final=final, attr=1,
                      cdb=cdb.ljust(16, b"\0"))
    c.data = data
    return c.to_bytes()


def _ffp_seed() -> bytes:
    rd = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    wr = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, 2, 0)
    nop = P.NopOut(itt=9, cmdsn=5, data=b"ping")
    tmf = P.TaskMgmtRequest(itt=10, function=1, rtt=3, cmdsn=6, refcmdsn=3)
    text = P.TextRequest(itt=11, cmdsn=7, data=encode_pairs([("SendTargets", "All")]))
    logout = P.LogoutRequest(itt=12, cmdsn=8, reason=0)
    return b"".join([
        _cmd(1, 1, bytes((0x12, 0, 0, 0, 96, 0)), edtl=96, read=True),
        _cmd(2, 2, rd, edtl=4096, read=True),
        _cmd(3, 3, wr, edtl=1024, write=True, data=b"w" * 512, final=False),
        P.DataOut(itt=3, ttt=P.RESERVED_TAG, offset=512, datasn=0, final=True, data=b"d" * 512).to_bytes(),
        _cmd(4, 4, wr, edtl=1024, write=True),
        nop.to_bytes(), tmf.to_bytes(), text.to_bytes(), logout.to_bytes(),
    ])


def _record(cdb: bytes, data: bytes = b"", attr: int = 1) -> bytes:
    return bytes((attr, len(cdb))) + cdb + len(data).to_bytes(2, "big") + data


def _scsi_seed() -> list[bytes]:
    pr_register = struct.pack(">BBBxxIB", 0x5F, 0, 0, 24, 0)
    unmap = struct.pack(">HH4xQI4x", 22, 16, 8, 8)
    out = [
        _record(bytes((0x12, 1, 0xB0, 0, 64, 0))) + _record(bytes((0x12, 0, 0, 0, 96, 0))),
        _record(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), b"x" * 512)
        + _record(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)),
        _record(struct.pack(">BBQIBB", 0x89, 0, 0, 1, 0, 0), b"\0" * 512 + b"c" * 512),  # COMPARE AND WRITE
        _record(struct.pack(">BBQIBB", 0x93, 0x08, 0, 8, 0, 0), b"\0" * 512),  # WRITE SAME(16) UNMAP
        _record(struct.pack(">BBxxxxxHB", 0x42, 0, len(unmap), 0), unmap),
        _record(pr_register, struct.pack(">QQ4xBxH", 0, 0x1234, 0, 0)),
        _record(bytes((0x5A, 0, 0x3F, 0, 0, 0, 0, 0x10, 0, 0))) + _record(bytes((0x1A, 0, 0x3F, 0, 255, 0))),
        _record(struct.pack(">BBxxxxxxxxxIxx", 0xA3, 0x0C, 512)),  # REPORT SUPPORTED OPCODES
        _record(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
        + _record(bytes((0x4D, 0, 0x4C, 0, 0, 0, 0, 0, 64, 0))),
        _record(bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0))),  # REPORT LUNS
    ]
    return out


def _chap_login_seed(method: str, mutual: bool) -> bytes:
    """A whole CHAP login that succeeds against ``login``'s machine: the target's challenge
    is deterministic there (random_bytes counts up), so the response can be computed."""
    m = LoginMachine(_policy(method), random_bytes=lambda n: bytes(range(n)))
    wire = []

    def send(pdu: P.LoginRequest) -> dict[str, str]:
        wire.append(pdu.to_bytes())
        (rsp,) = m.receive(P.decode(pdu.to_bytes()))
        return dict(P.parse_text(bytes(rsp.data)))

    first = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=0, nsg=1, itt=1)
    first.data = encode_pairs([("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", TGT),
                               ("AuthMethod", "CHAP,None")])
    send(first)
    second = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=0, nsg=1, itt=1)
    second.data = encode_pairs([("CHAP_A", "5")])
    keys = send(second)
    ident, challenge = int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:])
    answer = [("CHAP_N", CRED.user),
              ("CHAP_R", "0x" + chap_digest(5, ident, CRED.secret.encode(), challenge).hex())]
    if mutual:
        answer += [("CHAP_I", "7"), ("CHAP_C", "0x" + bytes(range(16, 32)).hex())]
    third = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=0, nsg=1, transit=True, itt=1)
    third.data = encode_pairs(answer)
    send(third)
    op = P.LoginRequest(isid=b"\x80\0\0\0\0\1", csg=1, nsg=3, transit=True, itt=1)
    op.data = encode_pairs([("HeaderDigest", "CRC32C,None"), ("MaxRecvDataSegmentLength", "65536")])
    wire.append(op.to_bytes())
    return b"".join(wire)


def _pr_seed() -> bytes:
    """REGISTER, RESERVE, READ KEYS / RESERVATION, REGISTER AND MOVE-less PREEMPT, RELEASE, CLEAR."""
    def out(sa: int, key: int, sark: int, rtype: int = 0, flags: int = 0) -> bytes:
        cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, 24, 0)
        return _record(cdb, struct.pack(">QQ4xBxH", key, sark, flags, 0))

    def pr_in(sa: int) -> bytes:
        return _record(struct.pack(">BBxxxxxHB", 0x5E, sa, 256, 0))

    return b"".join([out(0, 0, 0x11, flags=0x01), out(1, 0x11, 0, rtype=5), pr_in(0), pr_in(1), pr_in(2), pr_in(3),
                     out(6, 0, 0x22), out(4, 0x22, 0x11, rtype=1), out(2, 0x22, 0, rtype=1), out(3, 0x22, 0)])


def _xcopy_seed() -> bytes:
    """EXTENDED COPY (LID1) of 8 blocks within the LU, then RECEIVE COPY RESULTS."""
    target = bytes((0xE4, 0, 0, 0, 0x01, 0x03, 0, 8)) + bytes.fromhex("6589cfc000000001") + bytes(12)
    target += bytes((0, 0, 2, 0))  # disk block length 512
    segment = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 0, 8, 0, 64)
    param = struct.pack(">BBHIII", 1, 0, len(target), 0, len(segment), 0) + target + segment
    xcopy = struct.pack(">B9xIxB", 0x83, len(param), 0)
    status = struct.pack(">BBB7xIxB", 0x84, 0x00, 1, 64, 0)  # COPY STATUS of list 1
    operating = struct.pack(">BBB7xIxB", 0x84, 0x03, 0, 64, 0)  # OPERATING PARAMETERS
    return _record(xcopy, param) + _record(status) + _record(operating)


def _mode_select_seed() -> bytes:
    """MODE SELECT(10) of the caching page (WCE off, then on) and the control page."""
    caching = bytes((0x08, 0x12, 0x00)) + bytes(17)
    control = bytes((0x0A, 0x0A, 0x02)) + bytes(9)
    records = b""
    for page in (caching, bytes((0x08, 0x12, 0x04)) + bytes(17), control):
        param = bytes(8) + page
        records += _record(struct.pack(">BBxxxxxHB", 0x55, 0x10, len(param), 0), param)
    return records + _record(bytes((0x5A, 0, 0x08, 0, 0, 0, 0, 0, 64, 0)))


def seeds(target: str) -> list[bytes]:
    if target == "pdu":
        return [b"\x00" + _ffp_seed(), b"\x03" + _ffp_seed(), b"\x00" + _login_seed("None", [])]
    if target == "login":
        return [b"\x00" + _login_seed("None", []), b"\x01" + _login_seed("CHAP", [("CHAP_A", "5")]),
                b"\x02" + _login_seed("CHAP", [("CHAP_A", "5")]), b"\x01" + _chap_login_seed("CHAP", False),
                b"\x02" + _chap_login_seed("CHAP Mutual", True)]
    if target == "text":
        req = P.TextRequest(itt=1, data=encode_pairs([("SendTargets", "All")]))
        neg = P.TextRequest(itt=2, data=encode_pairs([("MaxRecvDataSegmentLength", "4096"), ("X-foo", "1")]))
        return [b"\x01" + req.to_bytes(), b"\x00" + neg.to_bytes() + req.to_bytes()]
    if target == "connection":
        return [bytes((m,)) + _ffp_seed() for m in (0x02, 0x03, 0xF2)]
    if target == "scsi":
        return [*_scsi_seed(), _pr_seed(), _xcopy_seed(), _mode_select_seed()]
    raise KeyError(target)
