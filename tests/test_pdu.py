"""PDU codec: round trips of every opcode, digests, AHS, framing under fragmentation."""

from __future__ import annotations

from typing import Annotated

import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscsi_target.iscsi import pdu as P


def test_crc32c_rfc_vectors() -> None:
    # RFC 7143 appendix B.4 test vectors, as the bytes that travel on the wire.
    vectors = {
        bytes(32): "aa36918a",
        b"\xff" * 32: "43aba862",
        bytes(range(32)): "4e79dd46",
        bytes(range(31, -1, -1)): "5cdb3f11",
    }
    for data, wire in vectors.items():
        assert P._DIGEST.pack(P.digest(data)).hex() == wire


@given(st.binary(max_size=4096), st.integers(0, 4096))
@settings(max_examples=200, deadline=None)
def test_crc32c_matches_reference_and_chains(data: bytes, cut: int) -> None:
    ref = crcmod.predefined.mkCrcFun("crc-32c")
    assert P.digest(data) == ref(data)
    assert P.digest(data[:cut], data[cut:]) == ref(data)


ALL = [
    P.NopOut(itt=1, ttt=0xFFFFFFFF, cmdsn=5, expstatsn=6, lun=P.int_to_lun(2), data=b"ping"),
    P.ScsiCommand(read=1, write=0, attr=2, itt=9, edtl=512, cmdsn=7, expstatsn=1, cdb=b"\x28" + bytes(15)),
    P.TaskMgmtRequest(function=1, itt=3, rtt=9, cmdsn=8, expstatsn=2, refcmdsn=7, expdatasn=0),
    P.LoginRequest(transit=1, cont=0, csg=1, nsg=3, isid=b"\x80\x12\x34\x56\x00\x01", tsih=0, itt=1, cid=2,
                   cmdsn=1, expstatsn=0, data=P.build_text({"InitiatorName": "iqn.x"})),
    P.TextRequest(itt=4, cmdsn=2, expstatsn=3, data=P.build_text({"SendTargets": "All"})),
    P.DataOut(final=1, itt=9, ttt=0x10, expstatsn=2, datasn=1, offset=8192, data=b"x" * 100),
    P.LogoutRequest(reason=0, itt=5, cid=2, cmdsn=9, expstatsn=4),
    P.SnackRequest(type=1, itt=5, begrun=2, runlength=3),
    P.NopIn(itt=1, statsn=3, expcmdsn=4, maxcmdsn=40, data=b"pong"),
    P.ScsiResponse(underflow=1, response=0, status=2, itt=9, statsn=4, expcmdsn=8, maxcmdsn=72, expdatasn=1,
                   residual=100, data=b"\x00\x12" + bytes(18)),
    P.TaskMgmtResponse(response=1, itt=3, statsn=5, expcmdsn=9, maxcmdsn=70),
    P.LoginResponse(transit=1, csg=1, nsg=3, isid=b"\x80\x12\x34\x56\x00\x01", tsih=7, itt=1, statsn=1,
                    expcmdsn=1, maxcmdsn=64, status_class=2, status_detail=1),
    P.TextResponse(itt=4, statsn=2, expcmdsn=3, maxcmdsn=66, data=b"TargetName=iqn.t\0"),
    P.DataIn(final=1, has_status=1, status=0, itt=9, datasn=3, offset=12288, residual=0, data=b"\xaa" * 513),
    P.LogoutResponse(response=0, itt=5, statsn=6, expcmdsn=10, maxcmdsn=73, time2wait=2, time2retain=20),
    P.R2T(itt=9, ttt=0x10, statsn=3, expcmdsn=8, maxcmdsn=71, r2tsn=1, offset=65536, desired_length=262144),
    P.AsyncMessage(event=1, statsn=9, expcmdsn=9, maxcmdsn=72, param3=2),
    P.Reject(reason=P.RejectReason.COMMAND_NOT_SUPPORTED, statsn=3, expcmdsn=4, maxcmdsn=5, data=bytes(48)),
]


def _fields(pdu: P.PDU) -> dict:
    names = type(pdu).FIELD_NAMES
    return {n: getattr(pdu, n) for n in names} | {"immediate": pdu.immediate, "data": bytes(pdu.data)}


@pytest.mark.parametrize("pdu", ALL, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
def test_round_trip_every_opcode(pdu: P.PDU, hd: bool, dd: bool) -> None:
    wire = pdu.to_bytes(hd, dd)
    assert len(wire) % 4 == 0
    back = P.decode(wire, hd, dd)
    assert type(back) is type(pdu)
    assert _fields(back) == _fields(pdu)


def test_opcode_and_flags_on_the_wire() -> None:
    wire = P.LoginRequest(transit=1, csg=1, nsg=3).to_bytes()
    assert wire[0] == 0x43  # immediate + login
    assert wire[1] == 0x87
    cmd = P.ScsiCommand(read=1, attr=1, edtl=4096).to_bytes()
    assert cmd[1] == 0xC1
    assert P.NopIn().to_bytes()[1] == 0x80  # F bit always set


def test_extended_cdb_and_bidi_ahs() -> None:
    cdb32 = bytes(range(32))
    cmd = P.ScsiCommand(cdb=cdb32[:16])
    cmd.ahs = [
        (P.AhsType.EXTENDED_CDB, b"\0" + cdb32[16:]),
        (P.AhsType.BIDI_READ_LENGTH, b"\0" + (4096).to_bytes(4, "big")),
    ]
    wire = cmd.to_bytes(True, False)
    assert wire[4] == (20 + 8) // 4  # 3+17 padded to 20, 3+5 padded to 8
    back = P.decode(wire, True, False)
    assert isinstance(back, P.ScsiCommand)
    assert back.full_cdb() == cdb32
    assert back.bidi_read_length() == 4096


def test_lun_encoding() -> None:
    for lun in (0, 1, 255, 256, 16383):
        assert P.lun_to_int(P.int_to_lun(lun)) == lun
    assert P.int_to_lun(5) == 0x0005000000000000
    assert P.int_to_lun(300) == 0x412C000000000000
    assert P.lun_to_int(0xC101000000000000) == P.WLUN_REPORT_LUNS
    assert P.int_to_lun(P.WLUN_REPORT_LUNS) == 0xC101000000000000


def test_digest_errors_are_reported() -> None:
    wire = bytearray(P.DataOut(itt=1, data=b"hello world").to_bytes(True, True))
    wire[60] ^= 1  # inside the data segment
    (ev,) = P.PDUReader(True, True).feed(bytes(wire))
    assert isinstance(ev, P.DigestError) and ev.kind == "data" and ev.pdu.itt == 1
    wire = bytearray(P.NopOut(itt=1).to_bytes(True, True))
    wire[20] ^= 1  # inside the BHS
    reader = P.PDUReader(True, True)
    (ev,) = reader.feed(bytes(wire) + P.NopOut().to_bytes(True, True))
    assert isinstance(ev, P.DigestError) and ev.kind == "header" and ev.pdu is None
    assert reader.broken  # nothing after a bad header can be framed


def test_oversized_data_segment_is_skipped_and_reported() -> None:
    reader = P.PDUReader(max_data=16)
    stream = P.NopOut(itt=1, data=b"y" * 64).to_bytes() + P.NopOut(itt=2).to_bytes()
    evs = list(reader.feed(stream))
    assert isinstance(evs[0], P.OversizedPDU) and evs[0].length == 64
    assert isinstance(evs[1], P.NopOut) and evs[1].itt == 2


def test_unknown_opcode_decodes_for_reject() -> None:
    raw = bytes([0x1E, 0x80]) + bytes(14) + (77).to_bytes(4, "big") + bytes(28)
    pdu = P.decode(raw)
    assert isinstance(pdu, P.UnknownPDU) and pdu.raw_opcode == 0x1E and pdu.itt == 77


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.booleans(), st.booleans())
@settings(max_examples=60, deadline=None)
def test_framing_survives_any_fragmentation(cuts: list[int], hd: bool, dd: bool) -> None:
    pdus = [P.DataOut(itt=i, offset=i * 7, data=bytes([i]) * (i * 37 % 1000)) for i in range(30)]
    stream = b"".join(p.to_bytes(hd, dd) for p in pdus)
    reader = P.PDUReader(hd, dd, max_data=1 << 16, bufsize=4096)
    got, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        i += 1
        buf = reader.get_buffer()
        n = min(n, len(buf), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        got.extend((ev.itt, bytes(ev.data)) for ev in reader.buffer_updated(n))
    assert got == [(p.itt, bytes(p.data)) for p in pdus]


def test_receive_buffer_grows_when_filled_and_shrinks_when_idle() -> None:
    """An idle connection keeps a small buffer; receives that fill it double it (a busy one soon
    takes many PDUs per receive); payloads handed out earlier survive every reallocation."""
    reader = P.PDUReader(max_data=1 << 16, bufsize=4096, max_bufsize=64 * 1024)
    pdus = [P.DataOut(itt=i, data=bytes([i % 251]) * 1000) for i in range(300)]
    stream = b"".join(p.to_bytes() for p in pdus)
    got: list[P.PDU] = []
    sizes = []
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer()
        sizes.append(len(buf))
        n = min(len(buf), len(stream) - pos)  # a receive that fills what it is offered
        buf[:n] = stream[pos:pos + n]
        pos += n
        got.extend(ev for ev in reader.buffer_updated(n) if isinstance(ev, P.PDU))
    assert sizes[0] == 4096 and max(sizes) > 32 * 1024 and max(sizes) <= 64 * 1024
    assert [(g.itt, bytes(g.data)) for g in got] == [(p.itt, bytes(p.data)) for p in pdus]
    reader.shrink(4096)
    assert len(reader.get_buffer()) == 4096
    assert [(g.itt, bytes(g.data)) for g in got] == [(p.itt, bytes(p.data)) for p in pdus]
    # Receives that leave room do not grow it; a pending partial PDU keeps it from shrinking.
    wire = P.NopOut(itt=1).to_bytes()
    for _ in range(20):
        buf = reader.get_buffer()
        buf[:len(wire)] = wire
        assert [ev.itt for ev in reader.buffer_updated(len(wire))] == [1]
    buf = reader.get_buffer()
    assert len(buf) == 4096
    buf[:10] = wire[:10]
    assert list(reader.buffer_updated(10)) == []
    reader.shrink(1024)
    assert len(reader.get_buffer()) > 1024 - 10


@given(st.binary(min_size=0, max_size=2000))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise_anything_unexpected(junk: bytes) -> None:
    reader = P.PDUReader(max_data=8192)
    try:
        for ev in reader.feed(junk):
            assert isinstance(ev, P.PDU | P.DigestError | P.OversizedPDU)
    except P.PduError:
        pass


def test_text_parsing() -> None:
    assert P.parse_text(b"A=1\0B=x=y\0\0") == [("A", "1"), ("B", "x=y")]
    with pytest.raises(ValueError):
        P.parse_text(b"novalue\0")
    assert P.build_text([("A", "1"), ("B", "2")]) == b"A=1\0B=2\0"


def test_fields_are_declared_once_and_checked() -> None:
    """The annotations are the field table: slots, defaults, keyword-only constructor."""
    c = P.ScsiCommand(itt=7)
    assert c.final is True and c.itt == 7 and c.cdb == bytes(16)  # class defaults
    assert P.DataOut().ttt == P.RESERVED_TAG and P.LoginRequest().immediate
    assert not hasattr(c, "__dict__")  # slots only
    with pytest.raises(TypeError):
        P.ScsiCommand(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        P.ScsiCommand(7)  # type: ignore[misc]
    with pytest.raises(TypeError, match="overlaps"):

        class Clash(P.PDU, opcode=0x3E):
            a: P.Itt = 0
            b: Annotated[int, P.U16(18)] = 0
    assert P.ScsiCommand.FIELD_NAMES[:4] == ("final", "read", "write", "attr")
