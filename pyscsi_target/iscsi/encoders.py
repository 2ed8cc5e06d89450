"""Fast encoders of the PDUs on the data path: Data-In, R2T and SCSI Response.

No PDU objects here: one precompiled ``struct`` packs the whole BHS of these three
opcodes into a fresh 48-byte bytearray, and the header goes out through the
connection's ``WireOutput`` with the payload as views of the SCSI layer's buffers (no
copy).  Data-In is cut at the initiator's MaxRecvDataSegmentLength and at MaxBurstLength
(the F bit closes each burst); status rides in the last Data-In (phase collapse) when
the caller passes one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .pdu import BHS_LEN, RESERVED_TAG, Op, Payload, WireOutput

# One layout covers the BHS of Data-In, R2T and SCSI Response:
# opcode, flags, byte2, byte3, (TotalAHSLength << 24 | DataSegmentLength), LUN, ITT,
# TTT/SNACK tag, StatSN, ExpCmdSN, MaxCmdSN, DataSN/R2TSN/ExpDataSN, offset/bidi residual,
# residual/desired length.
_HDR = struct.Struct(">BBBBIQIIIIIIII")

# Data-In and SCSI Response flags (RFC 7143 11.4.1, 11.7.1)
FINAL = 0x80
OVERFLOW = 0x04
UNDERFLOW = 0x02
STATUS = 0x01
# The bidirectional read residual flags sit two bits above the O/U flags.
BIDI_SHIFT = 2

_DATA_IN = Op.DATA_IN.value
_R2T = Op.R2T.value
_SCSI_RSP = Op.SCSI_RSP.value


def r2t(out: WireOutput, lun: int, itt: int, ttt: int, statsn: int, expcmdsn: int, maxcmdsn: int,
        r2tsn: int, offset: int, length: int) -> None:
    hdr = bytearray(BHS_LEN)
    _HDR.pack_into(hdr, 0, _R2T, FINAL, 0, 0, 0, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset, length)
    out.emit(hdr)


def scsi_response(out: WireOutput, itt: int, status: int, sense: bytes | None, flags: int, residual: int,
                  bidi_residual: int, statsn: int, expcmdsn: int, maxcmdsn: int, expdatasn: int) -> None:
    """SCSI Response; sense data travels with its 2-byte length (RFC 7143 11.4.7.2)."""
    hdr = bytearray(BHS_LEN)
    if sense:
        data = len(sense).to_bytes(2, "big") + sense
        dlen = len(data)
    else:
        data, dlen = b"", 0
    _HDR.pack_into(hdr, 0, _SCSI_RSP, FINAL | flags, 0, status, dlen, 0, itt, 0, statsn, expcmdsn, maxcmdsn,
                   expdatasn, bidi_residual, residual)
    out.emit(hdr, (data,), dlen)


def data_in(out: WireOutput, itt: int, bufs: Sequence[Payload], total: int, datasn: int, max_xmit: int,
            max_burst: int, expcmdsn: int, maxcmdsn: int, status: int | None = None, flags: int = 0,
            residual: int = 0, statsn: int = 0) -> int:
    """The Data-In PDUs carrying the first ``total`` bytes of ``bufs``; returns the next DataSN.

    With ``status`` the last PDU carries it (S bit, ``flags`` O/U, ``residual``, ``statsn``)."""
    if len(bufs) == 1 and total <= max_xmit and total <= max_burst:
        # One buffer, one PDU: the common small read.
        b = bufs[0]
        part = b if len(b) == total else memoryview(b)[:total]
        hdr = bytearray(BHS_LEN)
        if status is not None:
            _HDR.pack_into(hdr, 0, _DATA_IN, FINAL | STATUS | flags, 0, status, total, 0, itt, RESERVED_TAG,
                           statsn, expcmdsn, maxcmdsn, datasn, 0, residual)
        else:
            _HDR.pack_into(hdr, 0, _DATA_IN, FINAL, 0, 0, total, 0, itt, RESERVED_TAG, 0, expcmdsn, maxcmdsn,
                           datasn, 0, 0)
        out.emit(hdr, (part,), total)
        return datasn + 1
    bi = 0
    boff = 0
    views = [b if isinstance(b, memoryview) else memoryview(b) for b in bufs]
    offset = 0
    while offset < total:
        n = min(max_xmit, total - offset, max_burst - (offset % max_burst))
        parts: list[Payload] = []
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
        hdr = bytearray(BHS_LEN)
        if offset == total and status is not None:
            _HDR.pack_into(hdr, 0, _DATA_IN, FINAL | STATUS | flags, 0, status, n, 0, itt, RESERVED_TAG, statsn,
                           expcmdsn, maxcmdsn, datasn, offset - n, residual)
        else:
            last_of_burst = offset == total or offset % max_burst == 0
            _HDR.pack_into(hdr, 0, _DATA_IN, FINAL if last_of_burst else 0, 0, 0, n, 0, itt, RESERVED_TAG, 0,
                           expcmdsn, maxcmdsn, datasn, offset - n, 0)
        datasn += 1
        out.emit(hdr, parts, n)
    return datasn
