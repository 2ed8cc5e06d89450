"""Sans-IO iSCSI PDU codec (RFC 7143 section 11).

Every opcode both ways, Additional Header Segments, padding and CRC32C digests.  Each
PDU class declares its Basic Header Segment fields once; a precompiled ``struct`` per
class decodes or encodes the whole BHS in one call (construct is 25-75x slower and
is kept off this path).

``PDUReader`` is the incremental framer for an ``asyncio.BufferedProtocol``: the
transport receives straight into its buffer (one recv per batch) and it yields whole
PDUs whose ``data`` is a *memoryview into that buffer*.  Such a view is valid only until
the next ``get_buffer`` call: a consumer that keeps payload must copy it (a Data-Out
handler copies into the command's buffer, which is the one copy a write needs).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import Any, ClassVar

from crc32c import crc32c  # hardware CRC32C (SSE4.2): 17-26 GB/s here, crcmod manages 0.44 GB/s

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF
# A hard ceiling independent of negotiation: DataSegmentLength is 24 bits.
MAX_DSL = (1 << 24) - 1


class Op(IntEnum):
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TMF_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TMF_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class AhsType(IntEnum):
    EXTENDED_CDB = 1
    BIDI_READ_LENGTH = 2


def digest(*bufs: Any) -> int:
    """CRC32C over consecutive buffers (header digest: BHS+AHS; data digest: data+pad)."""
    crc = 0
    for b in bufs:
        crc = crc32c(b, value=crc)
    return crc


_DIGEST = struct.Struct("<I")  # RFC 7143 B.4: CRC32C of 32 zero bytes travels as aa 36 91 8a
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad_len(n: int) -> int:
    return -n & 3


# --- LUN encoding (SAM-5 4.7) --------------------------------------------------------


RAW_LUN_FLAG = 1 << 64
WLUN_REPORT_LUNS = (0xC101 << 48) | RAW_LUN_FLAG


def lun_to_int(raw: int) -> int:
    """Decode the 8-byte LUN field to a LUN number (single level, peripheral or flat).

    Any other form (second levels, logical unit or extended addressing, well-known LUNs
    such as REPORT LUNS 0xC101) comes back as ``raw | RAW_LUN_FLAG`` so the SCSI layer
    can recognise a well-known LUN or answer LOGICAL UNIT NOT SUPPORTED."""
    b0 = raw >> 56
    method = b0 >> 6
    if raw & 0x0000FFFFFFFFFFFF == 0:
        if method == 0 and b0 == 0:  # peripheral device addressing, bus 0
            return (raw >> 48) & 0xFF
        if method == 1:  # flat space addressing
            return (raw >> 48) & 0x3FFF
    return raw | RAW_LUN_FLAG


def int_to_lun(lun: int) -> int:
    if lun & RAW_LUN_FLAG:
        return lun & 0xFFFFFFFFFFFFFFFF
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48


# --- PDU classes ---------------------------------------------------------------------


class PDU:
    """Base class: one iSCSI PDU.  Subclasses declare FIELDS and FLAGS."""

    opcode: ClassVar[int]
    # (attribute, struct code, byte offset) of BHS fields after byte 3, and bytes 2/3.
    FIELDS: ClassVar[tuple[tuple[str, str, int], ...]] = ()
    # (attribute, mask, shift) packed into byte 1.
    FLAGS: ClassVar[tuple[tuple[str, int, int], ...]] = ()
    # Bits of byte 1 always set (the F bit of PDUs that have no other use of it).
    FIXED_FLAGS: ClassVar[int] = 0
    _struct: ClassVar[struct.Struct]
    _attrs: ClassVar[tuple[str, ...]]

    __slots__ = ("immediate", "ahs", "data")

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        fmt, pos, attrs = ">", 0, []
        for name, code, off in sorted(cls.FIELDS, key=lambda f: f[2]):
            if off < pos:
                raise TypeError(f"{cls.__name__}.{name} overlaps")
            fmt += "x" * (off - pos) + code
            pos = off + struct.calcsize(">" + code)
            attrs.append(name)
        fmt += "x" * (BHS_LEN - pos)
        cls._struct = struct.Struct(fmt)
        cls._attrs = tuple(attrs)
        cls._from_bhs = _make_decoder(cls)  # type: ignore[method-assign]
        if "opcode" in cls.__dict__:
            _REGISTRY[cls.opcode] = cls

    def __init__(self, **kw: Any) -> None:
        self.immediate = False
        self.ahs: list[tuple[int, bytes]] = []
        self.data: bytes | bytearray | memoryview = b""
        for name, _code, _off in self.FIELDS:
            setattr(self, name, 0)
        for name, _mask, _shift in self.FLAGS:
            setattr(self, name, 0)
        self._defaults()
        for k, v in kw.items():
            setattr(self, k, v)

    def _defaults(self) -> None:
        """Per-class default values beyond zero."""

    # -- decoding --
    @staticmethod
    def _from_bhs(bhs: memoryview | bytes) -> PDU:  # replaced per class by _make_decoder
        raise NotImplementedError

    # -- encoding --
    def encode_header(self, ahs_len: int, dsl: int) -> bytearray:
        hdr = bytearray(BHS_LEN + ahs_len)
        self._struct.pack_into(hdr, 0, *[getattr(self, a) for a in self._attrs])
        flags = self.FIXED_FLAGS
        for name, mask, shift in self.FLAGS:
            flags |= (int(getattr(self, name)) << shift) & mask
        hdr[0] = self.opcode | (0x40 if self.immediate else 0)
        hdr[1] = flags
        hdr[4] = ahs_len >> 2
        hdr[5:8] = dsl.to_bytes(3, "big")
        off = BHS_LEN
        for typ, payload in self.ahs:
            # payload starts with the type's reserved byte; AHSLength counts it (RFC 7143 11.2.2).
            seg_len = len(payload)
            hdr[off : off + 3] = struct.pack(">HB", seg_len, typ)
            hdr[off + 3 : off + 3 + seg_len] = payload
            off += 3 + seg_len + pad_len(3 + seg_len)
        return hdr

    def _ahs_len(self) -> int:
        return sum(3 + len(p) + pad_len(3 + len(p)) for _t, p in self.ahs)

    def to_buffers(self, header_digest: bool = False, data_digest: bool = False) -> list[Any]:
        """Wire form as a list for ``transport.writelines`` (the payload is not copied)."""
        data = self.data
        dsl = len(data)
        hdr = self.encode_header(self._ahs_len(), dsl)
        if header_digest:
            hdr += _DIGEST.pack(crc32c(hdr))
        if not dsl:
            return [hdr]
        pad = _PADS[dsl & 3]
        if data_digest:
            tail = pad + _DIGEST.pack(crc32c(pad, value=crc32c(data)))
            return [hdr, data, tail]
        return [hdr, data, pad] if pad else [hdr, data]

    def to_bytes(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        return b"".join(bytes(b) for b in self.to_buffers(header_digest, data_digest))

    def __repr__(self) -> str:
        parts = [f"{n}={getattr(self, n)!r}" for n, _m, _s in self.FLAGS]
        for n in self._attrs:
            v = getattr(self, n)
            parts.append(f"{n}=0x{v:x}" if isinstance(v, int) and v > 9 else f"{n}={v!r}")
        if self.immediate:
            parts.insert(0, "immediate")
        return f"{type(self).__name__}({', '.join(parts)}, dsl={len(self.data)})"


_REGISTRY: dict[int, type[PDU]] = {}


def _make_decoder(cls: type[PDU]) -> Any:
    """Generate a straight-line BHS decoder for ``cls``: one unpack, no per-field loop.

    A loop of setattr calls cost 1.16 us per PDU, this 0.66 us: it runs for every PDU."""
    lines = [
        "def _from_bhs(bhs):",
        "    pdu = _new(_cls)",
        "    pdu.immediate = (bhs[0] & 0x40) != 0",
        "    pdu.ahs = []",
        "    pdu.data = b''",
    ]
    if cls.FLAGS:
        lines.append("    f = bhs[1]")
        lines += [f"    pdu.{name} = (f & {mask}) >> {shift}" for name, mask, shift in cls.FLAGS]
    if cls._attrs:
        targets = ", ".join(f"pdu.{a}" for a in cls._attrs)
        lines.append(f"    {targets}, = _unpack(bhs)")
    lines.append("    return pdu")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_unpack": cls._struct.unpack_from}
    exec("\n".join(lines), scope)  # noqa: S102 - code built only from the class's own field table
    return staticmethod(scope["_from_bhs"])

# Offsets shared by many PDUs.
_LUN = ("lun", "Q", 8)
_ITT = ("itt", "I", 16)
_TTT = ("ttt", "I", 20)
_CMDSN = ("cmdsn", "I", 24)
_EXPSTATSN = ("expstatsn", "I", 28)
_STATSN = ("statsn", "I", 24)
_EXPCMDSN = ("expcmdsn", "I", 28)
_MAXCMDSN = ("maxcmdsn", "I", 32)
_FINAL = (("final", 0x80, 7),)


# Initiator -> target


class NopOut(PDU):
    opcode = Op.NOP_OUT
    FIXED_FLAGS = 0x80
    FIELDS = (_LUN, _ITT, _TTT, _CMDSN, _EXPSTATSN)
    __slots__ = ("lun", "itt", "ttt", "cmdsn", "expstatsn")

    def _defaults(self) -> None:
        self.ttt = RESERVED_TAG


class ScsiCommand(PDU):
    opcode = Op.SCSI_CMD
    FLAGS = (("final", 0x80, 7), ("read", 0x40, 6), ("write", 0x20, 5), ("attr", 0x07, 0))
    FIELDS = (_LUN, _ITT, ("edtl", "I", 20), _CMDSN, _EXPSTATSN, ("cdb", "16s", 32))
    __slots__ = ("final", "read", "write", "attr", "lun", "itt", "edtl", "cmdsn", "expstatsn", "cdb")

    def _defaults(self) -> None:
        self.final = 1
        self.cdb = bytes(16)

    def full_cdb(self) -> bytes:
        """The CDB with an Extended CDB AHS appended (RFC 7143 11.3.6)."""
        for typ, payload in self.ahs:
            if typ == AhsType.EXTENDED_CDB:
                return bytes(self.cdb) + bytes(payload[1:])
        return bytes(self.cdb)

    def bidi_read_length(self) -> int | None:
        for typ, payload in self.ahs:
            if typ == AhsType.BIDI_READ_LENGTH and len(payload) >= 5:
                return int.from_bytes(payload[1:5], "big")
        return None


class TaskMgmtRequest(PDU):
    opcode = Op.TMF_REQ
    FIXED_FLAGS = 0x80
    FLAGS = (("function", 0x7F, 0),)
    FIELDS = (_LUN, _ITT, ("rtt", "I", 20), _CMDSN, _EXPSTATSN, ("refcmdsn", "I", 32), ("expdatasn", "I", 36))
    __slots__ = ("function", "lun", "itt", "rtt", "cmdsn", "expstatsn", "refcmdsn", "expdatasn")

    def _defaults(self) -> None:
        self.rtt = RESERVED_TAG


class LoginRequest(PDU):
    opcode = Op.LOGIN_REQ
    FLAGS = (("transit", 0x80, 7), ("cont", 0x40, 6), ("csg", 0x0C, 2), ("nsg", 0x03, 0))
    FIELDS = (
        ("version_max", "B", 2), ("version_min", "B", 3), ("isid", "6s", 8), ("tsih", "H", 14), _ITT,
        ("cid", "H", 20), _CMDSN, _EXPSTATSN,
    )
    __slots__ = ("transit", "cont", "csg", "nsg", "version_max", "version_min", "isid", "tsih", "itt",
                 "cid", "cmdsn", "expstatsn")

    def _defaults(self) -> None:
        self.immediate = True
        self.isid = bytes(6)


class TextRequest(PDU):
    opcode = Op.TEXT_REQ
    FLAGS = (("final", 0x80, 7), ("cont", 0x40, 6))
    FIELDS = (_LUN, _ITT, _TTT, _CMDSN, _EXPSTATSN)
    __slots__ = ("final", "cont", "lun", "itt", "ttt", "cmdsn", "expstatsn")

    def _defaults(self) -> None:
        self.final = 1
        self.ttt = RESERVED_TAG


class DataOut(PDU):
    opcode = Op.DATA_OUT
    FLAGS = _FINAL
    FIELDS = (_LUN, _ITT, _TTT, _EXPSTATSN, ("datasn", "I", 36), ("offset", "I", 40))
    __slots__ = ("final", "lun", "itt", "ttt", "expstatsn", "datasn", "offset")

    def _defaults(self) -> None:
        self.ttt = RESERVED_TAG


class LogoutRequest(PDU):
    opcode = Op.LOGOUT_REQ
    FIXED_FLAGS = 0x80
    FLAGS = (("reason", 0x7F, 0),)
    FIELDS = (_ITT, ("cid", "H", 20), _CMDSN, _EXPSTATSN)
    __slots__ = ("reason", "itt", "cid", "cmdsn", "expstatsn")


class SnackRequest(PDU):
    opcode = Op.SNACK
    FIXED_FLAGS = 0x80
    FLAGS = (("type", 0x0F, 0),)
    FIELDS = (_LUN, _ITT, _TTT, _EXPSTATSN, ("begrun", "I", 40), ("runlength", "I", 44))
    __slots__ = ("type", "lun", "itt", "ttt", "expstatsn", "begrun", "runlength")


# Target -> initiator


class NopIn(PDU):
    opcode = Op.NOP_IN
    FIXED_FLAGS = 0x80
    FIELDS = (_LUN, _ITT, _TTT, _STATSN, _EXPCMDSN, _MAXCMDSN)
    __slots__ = ("lun", "itt", "ttt", "statsn", "expcmdsn", "maxcmdsn")

    def _defaults(self) -> None:
        self.itt = RESERVED_TAG
        self.ttt = RESERVED_TAG


class ScsiResponse(PDU):
    opcode = Op.SCSI_RSP
    FIXED_FLAGS = 0x80
    FLAGS = (("bidi_overflow", 0x10, 4), ("bidi_underflow", 0x08, 3), ("overflow", 0x04, 2),
             ("underflow", 0x02, 1))
    FIELDS = (
        ("response", "B", 2), ("status", "B", 3), _ITT, ("snacktag", "I", 20), _STATSN, _EXPCMDSN,
        _MAXCMDSN, ("expdatasn", "I", 36), ("bidi_residual", "I", 40), ("residual", "I", 44),
    )
    __slots__ = ("bidi_overflow", "bidi_underflow", "overflow", "underflow", "response", "status", "itt",
                 "snacktag", "statsn", "expcmdsn", "maxcmdsn", "expdatasn", "bidi_residual", "residual")


class TaskMgmtResponse(PDU):
    opcode = Op.TMF_RSP
    FIXED_FLAGS = 0x80
    FIELDS = (("response", "B", 2), _ITT, _STATSN, _EXPCMDSN, _MAXCMDSN)
    __slots__ = ("response", "itt", "statsn", "expcmdsn", "maxcmdsn")


class LoginResponse(PDU):
    opcode = Op.LOGIN_RSP
    FLAGS = (("transit", 0x80, 7), ("cont", 0x40, 6), ("csg", 0x0C, 2), ("nsg", 0x03, 0))
    FIELDS = (
        ("version_max", "B", 2), ("version_active", "B", 3), ("isid", "6s", 8), ("tsih", "H", 14), _ITT,
        _STATSN, _EXPCMDSN, _MAXCMDSN, ("status_class", "B", 36), ("status_detail", "B", 37),
    )
    __slots__ = ("transit", "cont", "csg", "nsg", "version_max", "version_active", "isid", "tsih", "itt",
                 "statsn", "expcmdsn", "maxcmdsn", "status_class", "status_detail")

    def _defaults(self) -> None:
        self.isid = bytes(6)


class TextResponse(PDU):
    opcode = Op.TEXT_RSP
    FLAGS = (("final", 0x80, 7), ("cont", 0x40, 6))
    FIELDS = (_LUN, _ITT, _TTT, _STATSN, _EXPCMDSN, _MAXCMDSN)
    __slots__ = ("final", "cont", "lun", "itt", "ttt", "statsn", "expcmdsn", "maxcmdsn")

    def _defaults(self) -> None:
        self.final = 1
        self.ttt = RESERVED_TAG


class DataIn(PDU):
    opcode = Op.DATA_IN
    FLAGS = (("final", 0x80, 7), ("ack", 0x40, 6), ("overflow", 0x04, 2), ("underflow", 0x02, 1),
             ("has_status", 0x01, 0))
    FIELDS = (
        ("status", "B", 3), _LUN, _ITT, _TTT, _STATSN, _EXPCMDSN, _MAXCMDSN, ("datasn", "I", 36),
        ("offset", "I", 40), ("residual", "I", 44),
    )
    __slots__ = ("final", "ack", "overflow", "underflow", "has_status", "status", "lun", "itt", "ttt",
                 "statsn", "expcmdsn", "maxcmdsn", "datasn", "offset", "residual")

    def _defaults(self) -> None:
        self.ttt = RESERVED_TAG


class LogoutResponse(PDU):
    opcode = Op.LOGOUT_RSP
    FIXED_FLAGS = 0x80
    FIELDS = (("response", "B", 2), _ITT, _STATSN, _EXPCMDSN, _MAXCMDSN, ("time2wait", "H", 40),
              ("time2retain", "H", 42))
    __slots__ = ("response", "itt", "statsn", "expcmdsn", "maxcmdsn", "time2wait", "time2retain")


class R2T(PDU):
    opcode = Op.R2T
    FIXED_FLAGS = 0x80
    FIELDS = (_LUN, _ITT, _TTT, _STATSN, _EXPCMDSN, _MAXCMDSN, ("r2tsn", "I", 36), ("offset", "I", 40),
              ("desired_length", "I", 44))
    __slots__ = ("lun", "itt", "ttt", "statsn", "expcmdsn", "maxcmdsn", "r2tsn", "offset", "desired_length")


class AsyncMessage(PDU):
    opcode = Op.ASYNC
    FIXED_FLAGS = 0x80
    FIELDS = (_LUN, ("itt", "I", 16), _STATSN, _EXPCMDSN, _MAXCMDSN, ("event", "B", 36), ("vcode", "B", 37),
              ("param1", "H", 38), ("param2", "H", 40), ("param3", "H", 42))
    __slots__ = ("lun", "itt", "statsn", "expcmdsn", "maxcmdsn", "event", "vcode", "param1", "param2", "param3")

    def _defaults(self) -> None:
        self.itt = RESERVED_TAG


class Reject(PDU):
    opcode = Op.REJECT
    FIXED_FLAGS = 0x80
    FIELDS = (("reason", "B", 2), ("itt", "I", 16), _STATSN, _EXPCMDSN, _MAXCMDSN, ("datasn", "I", 36))
    __slots__ = ("reason", "itt", "statsn", "expcmdsn", "maxcmdsn", "datasn")

    def _defaults(self) -> None:
        self.itt = RESERVED_TAG


class UnknownPDU(PDU):
    """A BHS with an opcode this codec does not know; kept raw so it can be Rejected."""

    FIELDS = (_ITT,)
    __slots__ = ("raw_opcode", "bhs", "itt")


# --- decoding ------------------------------------------------------------------------


class PduError(Exception):
    """Raised for a PDU that cannot be framed at all (the connection must be dropped)."""


def decode_bhs(bhs: memoryview | bytes) -> PDU:
    op = bhs[0] & 0x3F
    cls = _REGISTRY.get(op)
    if cls is None:
        pdu = UnknownPDU._from_bhs(bhs)
        pdu.raw_opcode = op  # type: ignore[attr-defined]
        pdu.bhs = bytes(bhs[:BHS_LEN])  # type: ignore[attr-defined]
        return pdu
    return cls._from_bhs(bhs)


def decode_ahs(buf: memoryview | bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 4 <= len(buf):
        seg_len, typ = struct.unpack_from(">HB", buf, off)
        if seg_len == 0 or off + 3 + seg_len > len(buf):
            raise PduError("malformed AHS")
        # Keep the reserved byte so payload[1:] is the type-specific data.
        out.append((typ, bytes(buf[off + 3 : off + 3 + seg_len])))
        off += 3 + seg_len + pad_len(3 + seg_len)
    return out


def decode(wire: bytes, header_digest: bool = False, data_digest: bool = False) -> PDU:
    """Decode one whole PDU from bytes (tests and tools; the server uses PDUReader)."""
    reader = PDUReader(header_digest=header_digest, data_digest=data_digest, max_data=MAX_DSL)
    events = list(reader.feed(wire))
    if len(events) != 1 or not isinstance(events[0], PDU):
        raise PduError(f"not exactly one PDU: {events!r}")
    pdu = events[0]
    pdu.data = bytes(pdu.data)
    return pdu


class DigestError:
    """A PDU whose header (``pdu`` None: the stream can't be trusted) or data digest failed."""

    __slots__ = ("kind", "pdu")

    def __init__(self, kind: str, pdu: PDU | None) -> None:
        self.kind = kind
        self.pdu = pdu

    def __repr__(self) -> str:
        return f"DigestError({self.kind}, {self.pdu!r})"


class OversizedPDU:
    """A PDU whose DataSegmentLength exceeds what we declared; its data was skipped."""

    __slots__ = ("pdu", "length")

    def __init__(self, pdu: PDU, length: int) -> None:
        self.pdu = pdu
        self.length = length

    def __repr__(self) -> str:
        return f"OversizedPDU({self.pdu!r}, {self.length})"


class PDUReader:
    """Incremental framer.  Use ``get_buffer``/``buffer_updated`` (BufferedProtocol) or ``feed``.

    Yields PDU objects, DigestError or OversizedPDU.  Raises PduError when the byte
    stream can no longer be framed (header digest failure is reported as DigestError
    first; the caller drops the connection).
    """

    def __init__(self, header_digest: bool = False, data_digest: bool = False,
                 max_data: int = 8192, bufsize: int = 256 * 1024) -> None:
        self.header_digest = header_digest
        self.data_digest = data_digest
        self.max_data = max_data  # our MaxRecvDataSegmentLength
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._skip = 0  # bytes of an oversized data segment still to discard
        self.broken = False

    # BufferedProtocol side
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        free = len(self._buf) - self._end
        if free < 4096 or (self._start and free < len(self._buf) // 4):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> Iterator[PDU | DigestError | OversizedPDU]:
        self._end += nbytes
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[PDU | DigestError | OversizedPDU]:
        out: list[PDU | DigestError | OversizedPDU] = []
        mv = memoryview(data)
        while mv:
            buf = self.get_buffer()
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            for ev in self.buffer_updated(n):
                # feed() callers may hold PDUs across later reads: detach the payload.
                if isinstance(ev, PDU) and isinstance(ev.data, memoryview):
                    ev.data = bytes(ev.data)
                out.append(ev)
        return iter(out)

    def _compact(self, need: int = 0) -> None:
        pending = self._end - self._start
        size = len(self._buf)
        if need > size:
            # A new buffer: payload views of the old one handed out earlier stay valid.
            size = max(need, size * 2)
            new = bytearray(size)
            new[:pending] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        elif self._start:
            # Fresh buffer rather than an in-place move: earlier payload views
            # (memoryviews of the old buffer) must not see their bytes change.
            new = bytearray(size)
            new[:pending] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, pending

    def _parse(self) -> Iterator[PDU | DigestError | OversizedPDU]:
        view = self._view
        hd = DIGEST_LEN if self.header_digest else 0
        dd = DIGEST_LEN if self.data_digest else 0
        while True:
            if self._skip:
                n = min(self._skip, self._end - self._start)
                self._start += n
                self._skip -= n
                if self._skip:
                    return
            avail = self._end - self._start
            if avail < BHS_LEN or self.broken:
                return
            s = self._start
            ahs_len = view[s + 4] * 4
            dsl = int.from_bytes(view[s + 5 : s + 8], "big")
            hlen = BHS_LEN + ahs_len + hd
            dlen = dsl + pad_len(dsl) + (dd if dsl else 0)
            oversized = dsl > self.max_data
            # An oversized PDU is framed from its header alone; its data is skipped.
            total = hlen if oversized else hlen + dlen
            if avail < total:
                self._ensure(total)
                return
            if hd and _DIGEST.unpack_from(view, s + BHS_LEN + ahs_len)[0] != crc32c(view[s : s + BHS_LEN + ahs_len]):
                self.broken = True
                yield DigestError("header", None)
                return
            pdu = decode_bhs(view[s : s + BHS_LEN])
            if oversized:
                self._start = s + hlen
                self._skip = dlen
                yield OversizedPDU(pdu, dsl)
                continue
            if ahs_len:
                try:
                    pdu.ahs = decode_ahs(view[s + BHS_LEN : s + BHS_LEN + ahs_len])
                except PduError:
                    self.broken = True
                    raise
            self._start = s + total
            if dsl:
                d0 = s + hlen
                if dd and _DIGEST.unpack_from(view, d0 + dsl + pad_len(dsl))[0] != crc32c(
                    view[d0 : d0 + dsl + pad_len(dsl)]
                ):
                    yield DigestError("data", pdu)
                    continue
                pdu.data = view[d0 : d0 + dsl]
            yield pdu

    def _ensure(self, total: int) -> None:
        """Make room so a PDU of ``total`` bytes fits once it arrives."""
        if self._start + total > len(self._buf):
            self._compact(total)


# --- text data segments (RFC 7143 6.1) ---------------------------------------------------


def parse_text(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Split a text/login data segment into (key, value) pairs, in order.

    Raises ValueError for a pair without '=' (the caller answers with a Reject or an
    initiator-error login status)."""
    out = []
    raw = bytes(data)
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise ValueError(f"text item without '=': {item[:64]!r}")
        out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return out


def build_text(pairs: list[tuple[str, str]] | dict[str, str]) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)
