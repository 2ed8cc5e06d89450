"""iSNSP codec: header, TLV attributes, framing, messages and the sans-IO client connection.

Layouts are pinned with bytes written out from RFC 4171 (5.1 header, 5.5 TLV padding,
6.3.1 IPv4-mapped addresses), not with the encoder's own output.  The fuzz tests feed
random and mutated server bytes to the client connection: the only exception allowed
out is ``IsnsProtocolError``.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscsi_target.isns import plan
from pyscsi_target.isns.connection import ClientConnection, IsnsProtocolError
from pyscsi_target.isns.messages import DELIMITER, Request, Response, ServerRequest, decode_message
from pyscsi_target.isns.registration import Node, Portal, Registration
from pyscsi_target.isns.wire import (
    Attribute,
    Flags,
    Function,
    Header,
    IsnsFormatError,
    PduReader,
    RawMessage,
    Status,
    Tag,
    decode_attrs,
    encode_attrs,
)


def pdu(function: int, flags: int, xid: int, payload: bytes, seq: int = 0, version: int = 1) -> bytes:
    return (version.to_bytes(2, "big") + function.to_bytes(2, "big") + len(payload).to_bytes(2, "big")
            + flags.to_bytes(2, "big") + xid.to_bytes(2, "big") + seq.to_bytes(2, "big") + payload)


def tlv(tag: int, value: bytes) -> bytes:
    return tag.to_bytes(4, "big") + len(value).to_bytes(4, "big") + value


def response(function: int, xid: int, status: int, *attrs: bytes, flags: int = 0x4C00) -> bytes:
    return pdu(function | 0x8000, flags, xid, status.to_bytes(4, "big") + b"".join(attrs))


# --- header and attributes ------------------------------------------------------------------


def test_refresh_query_bytes_follow_rfc_layout() -> None:
    req = Request(Function.DEV_ATTR_QRY, "iqn.x", (Attribute(Tag.ENTITY_IDENTIFIER, "e1"),),
                  (Attribute(Tag.ENTITY_IDENTIFIER), Attribute(Tag.REGISTRATION_PERIOD)))
    expected = bytes.fromhex(
        "0001 0002 0034 8c00 0007 0000"  # version 1, DevAttrQry, 52 bytes, client|last|first, xid 7, seq 0
        "00000020 00000008 69716e2e 78000000"  # source: iSCSI Name "iqn.x" NUL-terminated, padded to 8
        "00000001 00000004 65310000"  # message key: EID "e1"
        "00000000 00000000"  # delimiter
        "00000001 00000000 00000006 00000000"  # operating: EID and Registration Period, zero-length
    )
    assert req.encode(7) == expected


def test_header_round_trip() -> None:
    h = Header(0x8001, 123, Flags.SERVER | Flags.FIRST_PDU | Flags.LAST_PDU, 0xBEEF, 3)
    raw = h.encode()
    assert raw == bytes.fromhex("0001 8001 007b 4c00 beef 0003")
    assert Header.decode(raw) == h


@pytest.mark.parametrize(("text", "raw"), [
    ("abc", b"abc\0"),
    ("abcd", b"abcd\0\0\0\0"),  # the NUL needs a word of its own
    ("", b"\0\0\0\0"),
    ("é", b"\xc3\xa9\0\0"),
])
def test_string_values_are_nul_terminated_and_padded(text: str, raw: bytes) -> None:
    a = Attribute(Tag.ISCSI_ALIAS, text)
    assert a.encode() == tlv(34, raw)
    assert decode_attrs(a.encode()) == [a]


def test_ipv4_is_stored_as_mapped_ipv6_and_comes_back_as_ipv4() -> None:
    a = Attribute(Tag.PORTAL_IP_ADDRESS, ipaddress.IPv4Address("192.0.2.7"))
    assert a.encode() == tlv(16, bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7]))
    assert decode_attrs(a.encode()) == [a]
    v6 = Attribute(Tag.PG_PORTAL_IP_ADDRESS, ipaddress.IPv6Address("2001:db8::1"))
    assert decode_attrs(v6.encode()) == [v6]


def test_integer_and_nil_round_trips() -> None:
    attrs = [Attribute(Tag.PORTAL_PORT, 3260), Attribute(Tag.PG_TAG, None), Attribute(Tag.TIMESTAMP, 2**40 + 5),
             Attribute(Tag.ISCSI_NODE_TYPE, 1), Attribute(999, b"\x01\x02\x03\x04")]
    raw = encode_attrs(attrs)
    assert raw[:12] == tlv(17, (3260).to_bytes(4, "big"))
    assert raw[12:20] == tlv(51, b"")  # a NULL PGT is a zero-length value
    assert decode_attrs(raw) == attrs


@pytest.mark.parametrize("raw", [
    tlv(17, b"\0\0\x0c"),  # length not a multiple of 4
    tlv(17, b"\0\0\x0c\xbc")[:-1],  # truncated value
    b"\0\0\0\x11\0\0",  # truncated header
    tlv(17, bytes(8)),  # a uint32 attribute 8 bytes long
    tlv(16, bytes(4)),  # an IP address must be 16 bytes
    tlv(4, bytes(4)),  # the timestamp is 64-bit
    tlv(32, b"\xff\xfe\0\0"),  # not UTF-8
    tlv(17, bytes(4)) + b"\0",  # trailing garbage
])
def test_malformed_attributes_are_format_errors(raw: bytes) -> None:
    with pytest.raises(IsnsFormatError):
        decode_attrs(raw)


# --- framing ------------------------------------------------------------------------------


def test_reader_takes_a_stream_in_any_pieces() -> None:
    data = response(Function.DEV_DEREG, 5, 0) + response(Function.DEV_ATTR_QRY, 6, 9)
    reader = PduReader()
    out: list[RawMessage] = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    assert [(m.function, m.xid, m.payload[:4]) for m in out] == [
        (0x8004, 5, bytes(4)), (0x8002, 6, (9).to_bytes(4, "big"))]


def test_reader_reassembles_multi_pdu_messages() -> None:
    body = (0).to_bytes(4, "big") + tlv(1, b"ent\0") + tlv(0, b"") + tlv(6, (900).to_bytes(4, "big"))
    parts = [body[:6], body[6:17], body[17:]]
    data = (pdu(0x8002, 0x4400, 9, parts[0], seq=0) + pdu(0x8002, 0x4000, 9, parts[1], seq=1)
            + pdu(0x8002, 0x4800, 9, parts[2], seq=2))
    conn = ClientConnection(first_xid=9)
    conn.send(Request(Function.DEV_ATTR_QRY, "iqn.x"))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Response) and event.ok
    assert event.key == (Attribute(Tag.ENTITY_IDENTIFIER, "ent"),)
    assert event.operating == (Attribute(Tag.REGISTRATION_PERIOD, 900),)


@pytest.mark.parametrize("data", [
    pdu(0x8002, 0x4000, 9, bytes(4), seq=1),  # continuation without a first PDU
    pdu(0x8002, 0x4400, 9, bytes(4)) + pdu(0x8002, 0x4000, 9, bytes(4), seq=2),  # sequence gap
    pdu(0x8002, 0x4400, 9, bytes(4)) + pdu(0x8002, 0x4400, 9, bytes(4)),  # two first PDUs
    pdu(0x8002, 0x4C00, 9, bytes(4), version=2),  # unknown iSNSP version
])
def test_reader_refuses_broken_framing(data: bytes) -> None:
    with pytest.raises(IsnsFormatError):
        PduReader().feed(data)


def test_reader_bounds_reassembly() -> None:
    reader = PduReader()
    reader.feed(pdu(0x8002, 0x4400, 1, bytes(60000)))
    with pytest.raises(IsnsFormatError):
        for seq in range(1, 40):
            reader.feed(pdu(0x8002, 0x4000, 1, bytes(60000), seq=seq))


# --- messages -------------------------------------------------------------------------------


def test_error_response_with_unparsable_tail_keeps_its_status() -> None:
    msg = decode_message(RawMessage(0x8001, Flags.SERVER, 3, (3).to_bytes(4, "big") + b"\x01\x02"))
    assert isinstance(msg, Response) and msg.status == Status.INVALID_REGISTRATION and not msg.ok


def test_success_response_with_unparsable_tail_is_an_error() -> None:
    with pytest.raises(IsnsFormatError):
        decode_message(RawMessage(0x8001, Flags.SERVER, 3, bytes(4) + b"\x01\x02"))


def test_esi_is_echoed_and_scn_answered_with_its_destination() -> None:
    esi_attrs = tlv(1, b"ent\0") + tlv(16, bytes(10) + b"\xff\xff\x7f\0\0\1") + tlv(17, (3260).to_bytes(4, "big"))
    conn = ClientConnection()
    conn.receive_data(pdu(Function.ESI, 0x4C00, 77, esi_attrs))
    esi = conn.next_event()
    assert isinstance(esi, ServerRequest)
    assert esi.reply() == pdu(0x800D, 0x8C00, 77, bytes(4) + esi_attrs)

    scn_attrs = tlv(32, b"iqn.a\0\0\0") + tlv(4, (1).to_bytes(8, "big")) + tlv(32, b"iqn.b\0\0\0")
    conn.receive_data(pdu(Function.SCN, 0x4C00, 78, scn_attrs))
    scn = conn.next_event()
    assert isinstance(scn, ServerRequest)
    assert scn.reply() == pdu(0x8008, 0x8C00, 78, bytes(4) + tlv(32, b"iqn.a\0\0\0"))

    conn.receive_data(pdu(Function.DD_REG, 0x4C00, 79, b""))
    other = conn.next_event()
    assert isinstance(other, ServerRequest)
    assert other.reply() == pdu(0x8009, 0x8C00, 79, (Status.MESSAGE_NOT_SUPPORTED).to_bytes(4, "big"))


def test_connection_matches_responses_to_requests() -> None:
    conn = ClientConnection(first_xid=0xFFFF)
    xid, _ = conn.send(Request(Function.DEV_ATTR_REG, "iqn.x"))
    xid2, _ = conn.send(Request(Function.DEV_DEREG, "iqn.x"))
    assert (xid, xid2) == (0xFFFF, 1)  # wraps and skips 0
    conn.receive_data(response(Function.DEV_DEREG, xid2, 0) + response(Function.DEV_ATTR_REG, xid, 0))
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, Response) and first.function == Function.DEV_DEREG
    assert isinstance(second, Response) and second.function == Function.DEV_ATTR_REG
    assert conn.next_event() is None and conn.outstanding == 0


@pytest.mark.parametrize("data", [
    response(Function.DEV_ATTR_REG, 99, 0),  # nobody asked
    response(Function.DEV_DEREG, 1, 0),  # asked DevAttrReg, answered DevDereg
    response(0x0044, 1, 0),  # no such function
    pdu(0x8001, 0x4C00, 1, b"\0\0"),  # no status code
])
def test_connection_refuses_what_was_not_asked(data: bytes) -> None:
    conn = ClientConnection(first_xid=1)
    conn.send(Request(Function.DEV_ATTR_REG, "iqn.x"))
    with pytest.raises(IsnsProtocolError):
        conn.receive_data(data)


# --- fuzz -----------------------------------------------------------------------------------

_P1, _P2 = Portal("192.0.2.1", 3260), Portal("2001:db8::2", 3261)
_REG = Registration("entity", (_P1, _P2), (Node("iqn.2026-11.org.example:a", "A", ((_P1, 1),)),
                                           Node("iqn.2026-11.org.example:b", "", ((_P1, 1), (_P2, 2)))))
_FULL = plan.register_all(_REG)[0]
_VALID = [
    response(Function.DEV_ATTR_REG, 1, 0, encode_attrs((*_FULL.key, DELIMITER, *_FULL.operating))),
    response(Function.DEV_ATTR_REG, 1, 0, tlv(1, b"entity\0\0"), tlv(0, b""), tlv(6, (900).to_bytes(4, "big"))),
    pdu(Function.ESI, 0x4C00, 5, tlv(1, b"entity\0\0") + tlv(17, (3260).to_bytes(4, "big"))),
]


def _feed(data: bytes, chunk: int) -> None:
    conn = ClientConnection(first_xid=1)
    conn.send(Request(Function.DEV_ATTR_REG, "iqn.x"))
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i:i + chunk])
            while (event := conn.next_event()) is not None:
                if isinstance(event, ServerRequest):
                    event.reply()
    except IsnsProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_fuzz_random_bytes_only_raise_protocol_errors(data: bytes, chunk: int) -> None:
    _feed(data, chunk)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.integers(0, 400), st.integers(1, 64))
def test_fuzz_mutated_responses_only_raise_protocol_errors(base: bytes, flips: list[tuple[int, int]], cut: int,
                                                           chunk: int) -> None:
    data = bytearray(base)
    for pos, value in flips:
        data[pos % len(data)] = value
    _feed(bytes(data[:len(data) - cut % len(data)]), chunk)
