"""A small synchronous raw-PDU iSCSI initiator for negative and robustness tests.

It uses the project's PDU codec for framing but implements the initiator side (login
state machine, CHAP responder and mutual-CHAP challenger, CmdSN/StatSN bookkeeping,
R2T-driven writes) independently of the target's code, so a test can drive the target
through correct exchanges and then deviate anywhere: send arbitrary PDUs or bytes,
corrupt digests, stop half-way.

    c = RawClient("127.0.0.1", port)
    r = c.login(target=DEMO_IQN)                    # -> LoginOutcome (status, keys, params)
    st = c.scsi(read10(0, 8), read_len=4096)        # -> ScsiResult(status, data, sense)
    c.logout()
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from pyscsi_target.iscsi import pdu as P

INITIATOR = "iqn.2026-11.org.pyscsi-target.test:rawclient"
CHAP_ALGS = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}


class ConnectionClosed(Exception):  # noqa: N818 - an event, not a bug
    """The target closed (FIN or RST) the connection."""


class ProtocolViolation(AssertionError):
    """The target answered something the RFC does not allow at this point."""


@dataclass
class LoginOutcome:
    status_class: int
    status_detail: int
    keys: dict[str, str] = field(default_factory=dict)  # every key the target sent during login
    responses: list[P.LoginResponse] = field(default_factory=list)
    tsih: int = 0

    @property
    def status(self) -> int:
        return (self.status_class << 8) | self.status_detail

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass
class ScsiResult:
    status: int
    data: bytes = b""
    sense: bytes = b""
    response: int = 0
    residual: int = 0
    underflow: bool = False
    overflow: bool = False
    pdus: list[P.PDU] = field(default_factory=list)

    @property
    def sense_key(self) -> int | None:
        return self.sense[2] & 0x0F if len(self.sense) >= 3 else None

    @property
    def asc_ascq(self) -> tuple[int, int] | None:
        return (self.sense[12], self.sense[13]) if len(self.sense) >= 14 else None


def chap_response(alg: int, ident: int, secret: bytes, challenge: bytes) -> bytes:
    h = hashlib.new(CHAP_ALGS[alg])
    h.update(bytes([ident & 0xFF]) + secret + challenge)
    return h.digest()


def _hexval(v: str) -> bytes:
    if v[:2].lower() == "0x":
        return bytes.fromhex(v[2:])
    if v[:2].lower() == "0b":
        import base64

        return base64.b64decode(v[2:])
    raise ValueError(f"binary value without 0x/0b prefix: {v!r}")


def _int_value(v: str) -> int:
    """A numeric key value: decimal, or 0x hex (RFC 7143 5.1); decimal may have leading zeros."""
    return int(v[2:], 16) if v[:2].lower() == "0x" else int(v, 10)


def isid_random() -> bytes:
    # Type 0x80 (random) qualifier, as RFC 7143 10.12.5 allows.
    return bytes([0x80]) + os.urandom(5)


class RawClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0, initiator: str = INITIATOR,
                 isid: bytes | None = None, source: str | None = None) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self.initiator = initiator
        self.isid = isid or isid_random()
        # ``source``: the local address to connect from (e.g. another 127.0.0.x, so that the
        # target's per-address CHAP backoff sees another host).
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = P.PDUReader(max_data=P.MAX_DSL)
        self.header_digest = False
        self.data_digest = False
        self.pending: list[Any] = []
        self.itt = 0x1000
        self.cmdsn = 1
        self.expstatsn = 0
        self.tsih = 0
        self.maxcmdsn = 0
        self.params: dict[str, str] = {}  # negotiated (our offer overridden by the target's answers)
        self.max_xmit = 8192  # the target's MaxRecvDataSegmentLength
        self.async_events: list[P.AsyncMessage] = []
        self.closed = False

    # --- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0xFFFFFFFF
        if self.itt == P.RESERVED_TAG:
            self.itt = 1
        return self.itt

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def encode(self, pdu: P.PDU, *, header_digest: bool | None = None, data_digest: bool | None = None) -> bytes:
        hd = self.header_digest if header_digest is None else header_digest
        dd = self.data_digest if data_digest is None else data_digest
        return pdu.to_bytes(hd, dd)

    def send(self, pdu: P.PDU, **kw: Any) -> None:
        self.send_bytes(self.encode(pdu, **kw))

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no PDU from target")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            raise TimeoutError("no PDU from target") from None
        except ConnectionResetError as e:
            raise ConnectionClosed("connection reset by target") from e
        if not chunk:
            raise ConnectionClosed("target closed the connection")
        self.pending.extend(self.reader.feed(chunk))

    def recv_event(self, timeout: float | None = None) -> Any:
        """Next PDU (or codec event such as DigestError) from the target, with no filtering."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.pending:
            self._fill(deadline)
        ev = self.pending.pop(0)
        if isinstance(ev, P.PDU):
            self._track(ev)
        return ev

    def recv(self, timeout: float | None = None, *, answer_pings: bool = True) -> P.PDU:
        """Next PDU, answering target NOP-In pings and recording Async Messages on the way."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            ev = self.recv_event(max(0.001, deadline - time.monotonic()))
            if not isinstance(ev, P.PDU):
                raise ProtocolViolation(f"undecodable PDU from target: {ev!r}")
            if answer_pings and isinstance(ev, P.NopIn) and ev.ttt != P.RESERVED_TAG:
                self.send(P.NopOut(itt=P.RESERVED_TAG, ttt=ev.ttt, lun=ev.lun, cmdsn=self.cmdsn,
                                   expstatsn=self.expstatsn, immediate=True))
                continue
            if isinstance(ev, P.AsyncMessage):
                self.async_events.append(ev)
                continue
            return ev

    def expect(self, cls: type[P.PDU], timeout: float | None = None) -> Any:
        pdu = self.recv(timeout)
        if not isinstance(pdu, cls):
            raise ProtocolViolation(f"expected {cls.__name__}, got {pdu!r}")
        return pdu

    def wait_closed(self, timeout: float = 10.0) -> list[P.PDU]:
        """Wait until the target drops the connection; return PDUs received meanwhile.

        Raises TimeoutError if the connection is still open after ``timeout``."""
        got: list[P.PDU] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                while self.pending:
                    ev = self.pending.pop(0)
                    if isinstance(ev, P.PDU):
                        got.append(ev)
                self._fill(deadline)
        except ConnectionClosed:
            return got
        except P.PduError:
            return got

    def _track(self, pdu: P.PDU) -> None:
        # StatSN advances only on PDUs carrying status (RFC 7143 11.x); R2T, Data-In without S
        # and target-initiated NOP-In carry the current value without consuming it.
        carries = isinstance(pdu, (P.ScsiResponse, P.TextResponse, P.LogoutResponse, P.TaskMgmtResponse,
                                   P.Reject, P.LoginResponse, P.AsyncMessage))
        if isinstance(pdu, P.DataIn) and pdu.has_status:
            carries = True
        if isinstance(pdu, P.NopIn) and pdu.itt != P.RESERVED_TAG:
            carries = True
        if carries:
            self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
        if isinstance(pdu, P.LoginResponse):
            if pdu.transit and pdu.nsg == 3 and pdu.status_class == 0:
                self.maxcmdsn = pdu.maxcmdsn
        elif hasattr(pdu, "maxcmdsn"):
            self.maxcmdsn = pdu.maxcmdsn

    # --- login ------------------------------------------------------------------------

    def login_pdu(self, pairs: list[tuple[str, str]], *, csg: int, nsg: int, transit: bool,
                  itt: int | None = None, cont: bool = False) -> P.LoginRequest:
        return P.LoginRequest(transit=int(transit), cont=int(cont), csg=csg, nsg=nsg, isid=self.isid,
                              tsih=self.tsih, itt=self.itt if itt is None else itt, cid=0, cmdsn=self.cmdsn,
                              expstatsn=self.expstatsn, data=P.build_text(pairs))

    def login_exchange(self, pairs: list[tuple[str, str]], *, csg: int, nsg: int, transit: bool) -> P.LoginResponse:
        self.send(self.login_pdu(pairs, csg=csg, nsg=nsg, transit=transit))
        rsp = self.recv()
        if not isinstance(rsp, P.LoginResponse):
            raise ProtocolViolation(f"expected Login Response, got {rsp!r}")
        return rsp

    def login(
        self,
        target: str | None = None,
        *,
        discovery: bool = False,
        chap: tuple[str, str] | None = None,
        mutual: tuple[str, str] | None = None,
        chap_algs: str = "5",
        header_digest: str = "None",
        data_digest: str = "None",
        initiator: str | None = None,
        send_initiator_name: bool = True,
        operational: dict[str, str] | None = None,
        security_extra: list[tuple[str, str]] | None = None,
    ) -> LoginOutcome:
        """Full login (security stage if CHAP, then operational) to FFP.  Never raises on a
        login reject: check ``outcome.status`` (0 on success)."""
        self.next_itt()
        out = LoginOutcome(0, 0)
        first: list[tuple[str, str]] = []
        if send_initiator_name:
            first.append(("InitiatorName", initiator or self.initiator))
        first.append(("SessionType", "Discovery" if discovery else "Normal"))
        if not discovery and target is not None:
            first.append(("TargetName", target))
        first.append(("AuthMethod", "CHAP,None" if chap else "None"))
        first += security_extra or []

        def take(rsp: P.LoginResponse) -> dict[str, str]:
            out.responses.append(rsp)
            out.status_class, out.status_detail = rsp.status_class, rsp.status_detail
            keys = dict(P.parse_text(rsp.data))
            out.keys.update(keys)
            return keys

        # Security stage.
        rsp = self.login_exchange(first, csg=0, nsg=1, transit=not chap)
        keys = take(rsp)
        if not out.ok:
            return out
        if chap and keys.get("AuthMethod") == "CHAP":
            rsp = self.login_exchange([("CHAP_A", chap_algs)], csg=0, nsg=1, transit=False)
            keys = take(rsp)
            if not out.ok:
                return out
            alg = int(keys["CHAP_A"])
            ident = _int_value(keys["CHAP_I"])
            challenge = _hexval(keys["CHAP_C"])
            answer = [("CHAP_N", chap[0]),
                      ("CHAP_R", "0x" + chap_response(alg, ident, chap[1].encode(), challenge).hex())]
            my_ident, my_challenge = secrets.randbelow(256), secrets.token_bytes(16)
            if mutual:
                answer += [("CHAP_I", str(my_ident)), ("CHAP_C", "0x" + my_challenge.hex())]
            rsp = self.login_exchange(answer, csg=0, nsg=1, transit=True)
            keys = take(rsp)
            if not out.ok:
                return out
            if mutual:
                expected = chap_response(alg, my_ident, mutual[1].encode(), my_challenge)
                if keys.get("CHAP_N") != mutual[0] or _hexval(keys.get("CHAP_R", "0x")) != expected:
                    raise ProtocolViolation(f"target failed mutual CHAP: {keys}")
        # Wait for the target to agree to leave the security stage.
        while not (rsp.transit and rsp.nsg == 1 or rsp.transit and rsp.nsg == 3):
            rsp = self.login_exchange([], csg=0, nsg=1, transit=True)
            take(rsp)
            if not out.ok:
                return out
        # Operational stage.
        offer = {"HeaderDigest": header_digest, "DataDigest": data_digest}
        if not discovery:
            offer.update({"MaxRecvDataSegmentLength": "262144", "InitialR2T": "Yes", "ImmediateData": "Yes",
                          "FirstBurstLength": "65536", "MaxBurstLength": "262144", "MaxOutstandingR2T": "1",
                          "ErrorRecoveryLevel": "0", "MaxConnections": "1", "DefaultTime2Wait": "0",
                          "DefaultTime2Retain": "0", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes"})
        else:
            offer["MaxRecvDataSegmentLength"] = "262144"
        offer.update(operational or {})
        self.params = dict(offer)
        pairs = list(offer.items())
        while True:
            rsp = self.login_exchange(pairs, csg=1, nsg=3, transit=True)
            keys = take(rsp)
            if not out.ok:
                return out
            self.params.update({k: v for k, v in keys.items() if k in self.params})
            if rsp.transit and rsp.nsg == 3:
                break
            pairs = []
        self.tsih = out.tsih = rsp.tsih
        self.cmdsn = rsp.expcmdsn
        self.max_xmit = int(out.keys.get("MaxRecvDataSegmentLength", "8192"))
        self.header_digest = self.params.get("HeaderDigest") == "CRC32C"
        self.data_digest = self.params.get("DataDigest") == "CRC32C"
        self.reader.header_digest = self.header_digest
        self.reader.data_digest = self.data_digest
        return out

    # --- full feature phase -----------------------------------------------------------

    def _cmd_sn(self, immediate: bool) -> int:
        sn = self.cmdsn
        if not immediate:
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return sn

    def scsi_pdu(self, cdb: bytes, *, lun: int = 0, read_len: int = 0, write_len: int = 0,
                 immediate_data: bytes = b"", itt: int | None = None) -> P.ScsiCommand:
        cdb16 = cdb[:16].ljust(16, b"\0")
        cmd = P.ScsiCommand(final=1, read=int(read_len > 0), write=int(write_len > 0), attr=1,
                            lun=P.int_to_lun(lun), itt=self.next_itt() if itt is None else itt,
                            edtl=read_len or write_len, cmdsn=self._cmd_sn(False), expstatsn=self.expstatsn,
                            cdb=cdb16, data=immediate_data)
        if len(cdb) > 16:
            ext = cdb[16:]
            cmd.ahs = [(P.AhsType.EXTENDED_CDB, b"\0" + ext)]
        return cmd

    def scsi(self, cdb: bytes, *, lun: int = 0, read_len: int = 0, data: bytes = b"",
             timeout: float | None = None) -> ScsiResult:
        """Run one command to completion: immediate data, then R2T-solicited Data-Out."""
        immediate = b""
        if data and self.params.get("ImmediateData", "Yes") == "Yes":
            first_burst = int(self.params.get("FirstBurstLength", "65536"))
            immediate = data[: min(first_burst, self.max_xmit)]
        cmd = self.scsi_pdu(cdb, lun=lun, read_len=read_len, write_len=len(data), immediate_data=immediate)
        self.send(cmd)
        return self.complete(cmd, data, timeout=timeout)

    def complete(self, cmd: P.ScsiCommand, data: bytes = b"", *, timeout: float | None = None) -> ScsiResult:
        buf = bytearray(cmd.edtl if cmd.read else 0)
        got = 0
        res = ScsiResult(status=-1)
        while True:
            pdu = self.recv(timeout)
            res.pdus.append(pdu)
            if getattr(pdu, "itt", None) != cmd.itt:
                raise ProtocolViolation(f"unexpected PDU while waiting for itt {cmd.itt:#x}: {pdu!r}")
            if isinstance(pdu, P.R2T):
                off, length = pdu.offset, pdu.desired_length
                if off + length > len(data):
                    raise ProtocolViolation(f"R2T beyond EDTL: {pdu!r}")
                self.send_data_out(cmd, data, off, length, ttt=pdu.ttt)
            elif isinstance(pdu, P.DataIn):
                chunk = bytes(pdu.data)
                buf[pdu.offset : pdu.offset + len(chunk)] = chunk
                got = max(got, pdu.offset + len(chunk))
                if pdu.has_status:
                    res.status, res.residual = pdu.status, pdu.residual
                    res.underflow, res.overflow = bool(pdu.underflow), bool(pdu.overflow)
                    res.data = bytes(buf[:got])
                    return res
            elif isinstance(pdu, P.ScsiResponse):
                res.status, res.response, res.residual = pdu.status, pdu.response, pdu.residual
                res.underflow, res.overflow = bool(pdu.underflow), bool(pdu.overflow)
                if len(pdu.data) >= 2:
                    slen = struct.unpack_from(">H", pdu.data)[0]
                    res.sense = bytes(pdu.data[2 : 2 + slen])
                res.data = bytes(buf[:got])
                return res
            else:
                raise ProtocolViolation(f"unexpected PDU for a SCSI command: {pdu!r}")

    def scsi_many(self, cmds: list[tuple[bytes, int, bytes]], *, lun: int = 0,
                  timeout: float | None = None) -> list[ScsiResult]:
        """Run several commands at once (all sent, then answered in any order, R2Ts served as
        they come): ``cmds`` is [(cdb, read_len, data)], the results come in the same order."""
        first = min(self.max_xmit, int(self.params.get("FirstBurstLength", "65536")))
        immediate_ok = self.params.get("ImmediateData", "Yes") == "Yes"
        sent: dict[int, tuple[int, P.ScsiCommand, bytes, bytearray]] = {}
        wire = []
        for i, (cdb, read_len, data) in enumerate(cmds):
            cmd = self.scsi_pdu(cdb, lun=lun, read_len=read_len, write_len=len(data),
                                immediate_data=data[:first] if immediate_ok else b"")
            sent[cmd.itt] = (i, cmd, data, bytearray(read_len))
            wire.append(self.encode(cmd))
        self.send_bytes(b"".join(wire))
        results: list[ScsiResult | None] = [None] * len(cmds)
        while any(r is None for r in results):
            pdu = self.recv(timeout)
            entry = sent.get(getattr(pdu, "itt", -1))
            if entry is None:
                raise ProtocolViolation(f"PDU for no command of ours: {pdu!r}")
            i, cmd, data, buf = entry
            if isinstance(pdu, P.R2T):
                self.send_data_out(cmd, data, pdu.offset, pdu.desired_length, ttt=pdu.ttt)
            elif isinstance(pdu, P.DataIn):
                buf[pdu.offset : pdu.offset + len(pdu.data)] = bytes(pdu.data)
                if pdu.has_status:
                    results[i] = ScsiResult(pdu.status, bytes(buf), residual=pdu.residual,
                                            underflow=bool(pdu.underflow), overflow=bool(pdu.overflow))
            elif isinstance(pdu, P.ScsiResponse):
                sense = b""
                if len(pdu.data) >= 2:
                    sense = bytes(pdu.data[2 : 2 + struct.unpack_from(">H", pdu.data)[0]])
                results[i] = ScsiResult(pdu.status, bytes(buf), sense, pdu.response, pdu.residual,
                                        bool(pdu.underflow), bool(pdu.overflow))
            else:
                raise ProtocolViolation(f"unexpected PDU for a SCSI command: {pdu!r}")
        return [r for r in results if r is not None]

    def clear_unit_attentions(self, lun: int = 0, tries: int = 8) -> None:
        """TEST UNIT READY until GOOD: consumes POWER ON/RESET and similar UAs of a new nexus."""
        for _ in range(tries):
            r = self.scsi(tur(), lun=lun)
            if r.status == 0:
                return
            if r.sense_key != 0x6:
                raise AssertionError(f"TEST UNIT READY failed: status {r.status:#x} sense {r.sense.hex()}")
        raise AssertionError("unit attentions did not clear")

    def send_data_out(self, cmd: P.ScsiCommand, data: bytes, offset: int, length: int, *,
                      ttt: int = P.RESERVED_TAG) -> None:
        datasn = 0
        end = offset + length
        out = []
        while offset < end:
            n = min(self.max_xmit, end - offset)
            pdu = P.DataOut(final=int(offset + n == end), lun=cmd.lun, itt=cmd.itt, ttt=ttt,
                            expstatsn=self.expstatsn, datasn=datasn, offset=offset, data=data[offset : offset + n])
            out.append(self.encode(pdu))
            offset += n
            datasn += 1
        self.send_bytes(b"".join(out))

    def nop(self, payload: bytes = b"", timeout: float | None = None) -> P.NopIn:
        itt = self.next_itt()
        self.send(P.NopOut(itt=itt, cmdsn=self._cmd_sn(True), expstatsn=self.expstatsn, immediate=True,
                           data=payload))
        rsp = self.expect(P.NopIn, timeout)
        if rsp.itt != itt:
            raise ProtocolViolation(f"NOP-In for wrong ITT: {rsp!r}")
        return rsp

    def text(self, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
        itt = self.next_itt()
        self.send(P.TextRequest(final=1, itt=itt, cmdsn=self._cmd_sn(False), expstatsn=self.expstatsn,
                                data=P.build_text(pairs)))
        data = b""
        while True:
            rsp = self.expect(P.TextResponse)
            data += bytes(rsp.data)
            if rsp.final:
                break
            self.send(P.TextRequest(final=1, itt=itt, ttt=rsp.ttt, cmdsn=self.cmdsn, expstatsn=self.expstatsn))
        out: dict[str, list[str]] = {}
        for k, v in P.parse_text(data):
            out.setdefault(k, []).append(v)
        return out

    def tmf(self, function: int, *, lun: int = 0, rtt: int = P.RESERVED_TAG, refcmdsn: int = 0) -> P.TaskMgmtResponse:
        itt = self.next_itt()
        self.send(P.TaskMgmtRequest(function=function, lun=P.int_to_lun(lun), itt=itt, rtt=rtt,
                                    cmdsn=self._cmd_sn(True), expstatsn=self.expstatsn, refcmdsn=refcmdsn,
                                    immediate=True))
        return self.expect(P.TaskMgmtResponse)

    def logout(self, reason: int = 0) -> P.LogoutResponse:
        itt = self.next_itt()
        self.send(P.LogoutRequest(reason=reason, itt=itt, cid=0, cmdsn=self._cmd_sn(False),
                                  expstatsn=self.expstatsn))
        rsp = self.expect(P.LogoutResponse)
        self.close()
        return rsp


# --- CDB builders ------------------------------------------------------------------------


def inquiry(alloc: int = 96, evpd: int = 0, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def tur() -> bytes:
    return bytes(6)


def read_capacity10() -> bytes:
    return bytes([0x25]) + bytes(9)


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def report_luns(alloc: int = 4096) -> bytes:
    return struct.pack(">BBBBBBIBB", 0xA0, 0, 0, 0, 0, 0, alloc, 0, 0)


def login_session(host: str, port: int, target: str, **kw: Any) -> RawClient:
    """Connect and log in; raises if the login does not succeed."""
    c = RawClient(host, port)
    out = c.login(target, **kw)
    if not out.ok:
        c.close()
        raise AssertionError(f"login failed with status {out.status:#06x}: {out.keys}")
    if not kw.get("discovery"):
        c.clear_unit_attentions()
    return c
