"""A minimal blocking iSCSI initiator for the scaling rows: login, SendTargets, idle sessions.

Independent of pyscsi_target's own codec on purpose: the bench must measure tgtd with the same
client, and a bug in our codec must not hide itself by being on both ends.  Only what the
bench needs is here: Login (security -> operational -> full feature, no auth), Text
SendTargets=All with continuation, NOP-In answers, Logout.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

# op, flags, b2, b3, ahslen, dslen, isid, tsih, itt, cid, rsvd, cmdsn, expstatsn
_BHS = struct.Struct(">BBBBB3s6sHIHHII")
HDR = 48
OP_NOP_OUT, OP_SCSI_CMD, OP_TEXT_REQ, OP_LOGIN_REQ, OP_LOGOUT_REQ = 0x00, 0x01, 0x04, 0x03, 0x06
OP_NOP_IN, OP_SCSI_RSP, OP_TEXT_RSP, OP_LOGIN_RSP, OP_LOGOUT_RSP, OP_DATA_IN, OP_REJECT = (
    0x20, 0x21, 0x24, 0x23, 0x26, 0x25, 0x3F)
IMMEDIATE = 0x40
FINAL = 0x80
CONT = 0x40
NO_TAG = 0xFFFFFFFF


class IscsiError(RuntimeError):
    pass


def _pad(n: int) -> int:
    return (-n) & 3


def _keys(pairs: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def _parse_keys(data: bytes) -> list[tuple[str, str]]:
    out = []
    for item in data.split(b"\0"):
        if item:
            k, _, v = item.decode("utf-8", "replace").partition("=")
            out.append((k, v))
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise IscsiError("connection closed by target")
        buf += chunk
    return bytes(buf)


@dataclass
class Pdu:
    bhs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.bhs[1]

    def u32(self, off: int) -> int:
        return struct.unpack_from(">I", self.bhs, off)[0]


def read_pdu(sock: socket.socket) -> Pdu:
    bhs = _recv_exact(sock, HDR)
    ahs = bhs[4] * 4
    dlen = int.from_bytes(bhs[5:8], "big")
    rest = _recv_exact(sock, ahs + dlen + _pad(dlen)) if ahs + dlen else b""
    return Pdu(bhs, rest[ahs:ahs + dlen])


def _bhs(op: int, flags: int, b2: int, b3: int, dlen: int, isid_or_lun: bytes, tsih: int, itt: int,
         cid: int, rsvd: int, cmdsn: int, expstatsn: int) -> bytearray:
    b = bytearray(HDR)
    _BHS.pack_into(b, 0, op, flags, b2, b3, 0, dlen.to_bytes(3, "big"), isid_or_lun[:6], tsih, itt, cid, rsvd,
                   cmdsn, expstatsn)
    if len(isid_or_lun) == 8:  # LUN field occupies bytes 8..15 (isid + tsih slots)
        b[8:16] = isid_or_lun
    return b


@dataclass
class Session:
    """One logged-in single-connection session."""

    sock: socket.socket
    tsih: int
    cmdsn: int
    statsn: int
    itt: int = 1
    negotiated: dict[str, str] = field(default_factory=dict)

    def _send(self, bhs: bytearray, data: bytes = b"") -> None:
        self.sock.sendall(bytes(bhs) + data + b"\0" * _pad(len(data)))

    def send_targets(self, what: str = "All") -> list[tuple[str, str]]:
        """SendTargets=<what>; follows C-bit continuation; returns the key/value list."""
        payload = _keys([("SendTargets", what)])
        ttt = NO_TAG
        acc = b""
        itt = self._next_itt()
        while True:
            bhs = _bhs(OP_TEXT_REQ | IMMEDIATE, FINAL, 0, 0, len(payload), bytes(8), 0, itt, 0, 0, self.cmdsn,
                       self.statsn + 1)
            struct.pack_into(">I", bhs, 20, ttt)
            self._send(bhs, payload)
            rsp = self._read_skip_nops()
            if rsp.opcode != OP_TEXT_RSP:
                raise IscsiError(f"expected Text Response, got opcode {rsp.opcode:#x}")
            self.statsn = rsp.u32(24)
            acc += rsp.data
            if rsp.flags & FINAL and not rsp.flags & CONT:
                return _parse_keys(acc)
            ttt = rsp.u32(20)
            payload = b""

    def inquiry(self, lun: int = 0, alloc: int = 96) -> int:
        """A standard INQUIRY to ``lun`` (single-level LUN); returns the SCSI status."""
        itt = self._next_itt()
        bhs = _bhs(OP_SCSI_CMD, FINAL | 0x40 | 1, 0, 0, 0, struct.pack(">HHI", lun & 0x3FFF, 0, 0), 0, itt, 0, 0,
                   self.cmdsn, self.statsn + 1)
        struct.pack_into(">I", bhs, 20, alloc)  # ExpectedDataTransferLength
        struct.pack_into(">II", bhs, 24, self.cmdsn, self.statsn + 1)
        bhs[32:38] = bytes((0x12, 0, 0, alloc >> 8, alloc & 0xFF, 0))
        self._send(bhs)
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        while True:
            pdu = self._read_skip_nops()
            if pdu.opcode == OP_DATA_IN and pdu.flags & 0x01:  # the status came with the data
                self.statsn = pdu.u32(24)
                return pdu.bhs[3]
            if pdu.opcode == OP_SCSI_RSP:
                self.statsn = pdu.u32(24)
                return pdu.bhs[3]
            if pdu.opcode != OP_DATA_IN:
                raise IscsiError(f"expected Data-In or SCSI Response, got opcode {pdu.opcode:#x}")

    def _next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0x7FFFFFFF
        return self.itt

    def _read_skip_nops(self) -> Pdu:
        while True:
            pdu = read_pdu(self.sock)
            if pdu.opcode == OP_NOP_IN:
                self.answer_nop(pdu)
                continue
            if pdu.opcode == OP_REJECT:
                raise IscsiError(f"target sent Reject reason {pdu.bhs[2]:#x}")
            return pdu

    def answer_nop(self, nop: Pdu) -> None:
        self.statsn = nop.u32(24)
        ttt = nop.u32(20)
        if ttt == NO_TAG:
            return  # unsolicited NOP-In that wants no answer
        bhs = _bhs(OP_NOP_OUT | IMMEDIATE, FINAL, 0, 0, 0, nop.bhs[8:16], 0, NO_TAG, 0, 0, self.cmdsn,
                   self.statsn + 1)
        struct.pack_into(">I", bhs, 20, ttt)
        self._send(bhs)

    def logout(self) -> None:
        try:
            bhs = _bhs(OP_LOGOUT_REQ | IMMEDIATE, FINAL, 0, 0, 0, bytes(6), 0, self._next_itt(), 0, 0, self.cmdsn,
                       self.statsn + 1)
            self._send(bhs)
            self.sock.settimeout(5)
            self._read_skip_nops()
        except (OSError, IscsiError):
            pass
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


def login(host: str, port: int, target: str | None, *, initiator: str = "iqn.2026-11.org.pyscsi-target:bench",
          isid: bytes | None = None, timeout: float = 10.0, header_digest: str = "None") -> Session:
    """Log in a normal session to ``target`` (or a discovery session when ``target`` is None)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    isid = isid or (b"\x80" + os.urandom(5))  # random-qualifier format, unique per session
    cmdsn, statsn, expstatsn = 1, 0, 0
    itt = 0
    security = [("InitiatorName", initiator), ("SessionType", "Discovery" if target is None else "Normal"),
                ("AuthMethod", "None")]
    if target is not None:
        security.append(("TargetName", target))
    operational = [("HeaderDigest", header_digest), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "262144"),
                   ("DefaultTime2Wait", "0"), ("DefaultTime2Retain", "0"), ("ErrorRecoveryLevel", "0")]
    if target is not None:
        operational += [("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "1048576"),
                        ("FirstBurstLength", "262144"), ("MaxConnections", "1"), ("MaxOutstandingR2T", "1"),
                        ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes")]
    negotiated: dict[str, str] = {}
    csg, payload, tsih = 0, _keys(security), 0
    try:
        for _ in range(16):  # bounded: a target that never transits is an error, not a hang
            nsg = 1 if csg == 0 else 3
            bhs = _bhs(OP_LOGIN_REQ | IMMEDIATE, FINAL | (csg << 2) | nsg, 0, 0, len(payload), isid, tsih, itt,
                       0, 0, cmdsn, expstatsn)
            sock.sendall(bytes(bhs) + payload + b"\0" * _pad(len(payload)))
            rsp = read_pdu(sock)
            if rsp.opcode != OP_LOGIN_RSP:
                raise IscsiError(f"expected Login Response, got opcode {rsp.opcode:#x}")
            status = (rsp.bhs[36] << 8) | rsp.bhs[37]
            if status:
                raise IscsiError(f"login failed with status {status:#06x}")
            statsn = rsp.u32(24)
            expstatsn = (statsn + 1) & 0xFFFFFFFF
            tsih = struct.unpack_from(">H", rsp.bhs, 14)[0]
            negotiated.update(_parse_keys(rsp.data))
            transit, rsp_nsg = rsp.flags & FINAL, rsp.flags & 3
            if transit and rsp_nsg == 3:
                sock.settimeout(None)
                return Session(sock, tsih, rsp.u32(28), statsn, negotiated=negotiated)
            if transit:
                csg, payload = rsp_nsg, _keys(operational)
            else:
                payload = b""  # target asked to continue in this stage
        raise IscsiError("login did not reach full feature phase")
    except BaseException:
        sock.close()
        raise


def discover(host: str, port: int, **kw) -> list[str]:
    """TargetName values from a discovery session's SendTargets=All."""
    s = login(host, port, None, **kw)
    try:
        return [v for k, v in s.send_targets("All") if k == "TargetName"]
    finally:
        s.logout()


class IdleSessions:
    """Holds N logged-in idle sessions open and answers the target's NOP-In pings."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self._sel = selectors.DefaultSelector()

    def open(self, host: str, port: int, target: str, n: int, **kw) -> None:
        for _ in range(n):
            s = login(host, port, target, **kw)
            s.sock.setblocking(False)
            self._sel.register(s.sock, selectors.EVENT_READ, s)
            self.sessions.append(s)

    def serve(self, seconds: float) -> None:
        """Answer pings for ``seconds`` (an idle session that ignores NOP-In gets dropped)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in self._sel.select(timeout=min(left, 0.2)):
                s: Session = key.data
                s.sock.setblocking(True)
                s.sock.settimeout(5)
                try:
                    pdu = read_pdu(s.sock)
                    if pdu.opcode == OP_NOP_IN:
                        s.answer_nop(pdu)
                except (OSError, IscsiError) as e:
                    raise IscsiError(f"idle session lost: {e}") from e
                finally:
                    s.sock.setblocking(False)

    def close(self) -> None:
        for s in self.sessions:
            try:
                self._sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            s.sock.setblocking(True)
            s.logout()
        self.sessions.clear()
        self._sel.close()

    def __enter__(self) -> IdleSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
