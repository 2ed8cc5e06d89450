"""CHAP primitives and the target-side exchange (RFC 7143 12.1.3, RFC 1994)."""

from __future__ import annotations

import hashlib

import pytest

from pyscsi_target.iscsi.chap import (
    ALGORITHMS,
    ChapError,
    ChapServer,
    chap_digest,
    decode_binary,
    encode_hex,
    select_algorithm,
)
from pyscsi_target.iscsi.params import ChapCredential


def test_algorithm_table():
    assert {a: n for a, (n, _l) in ALGORITHMS.items()} == {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}
    for name, length in ALGORITHMS.values():
        assert hashlib.new(name).digest_size == length


def test_md5_known_answer():
    # RFC 1994 layout: MD5(identifier || secret || challenge)
    expect = hashlib.md5(b"\x01" + b"secret" + bytes.fromhex("0011223344")).digest()
    assert chap_digest(5, 1, b"secret", bytes.fromhex("0011223344")) == expect
    assert expect.hex() == hashlib.md5(bytes.fromhex("01") + b"secret\x00\x11\x22\x33\x44").hexdigest()


@pytest.mark.parametrize("text,data", [
    ("0x00ff", b"\x00\xff"), ("0XABCD", b"\xab\xcd"), ("0xabc", b"\x0a\xbc"),
    ("0bAAEC", b"\x00\x01\x02"), ("0BAAECAw==", b"\x00\x01\x02\x03"),
])
def test_decode_binary(text, data):
    assert decode_binary(text) == data


@pytest.mark.parametrize("text", ["", "00ff", "0x", "0xgg", "0b@@@", "0bAAE", "1234"])
def test_decode_binary_errors(text):
    with pytest.raises(ValueError):
        decode_binary(text)


def test_encode_hex_roundtrip():
    assert decode_binary(encode_hex(b"\x01\x02")) == b"\x01\x02"


@pytest.mark.parametrize("offer,alg", [("5", 5), ("7,5", 7), ("1,8", 8), ("x,6", 6), ("0x07", 7), ("", None),
                                       ("4", None)])
def test_select_algorithm(offer, alg):
    assert select_algorithm(offer) == alg


def _server(**kw) -> ChapServer:
    creds = [ChapCredential("u", "initsecret1234", "t", "tgtsecret12345")]
    return ChapServer(creds, random_bytes=lambda n: bytes(range(n)), **kw)


def test_challenge_length_and_identifier():
    for alg, (_n, length) in ALGORITHMS.items():
        s = _server(mutual_required=False)
        out = dict(s.step({"CHAP_A": str(alg)}))
        assert out["CHAP_I"] == "0"
        assert len(decode_binary(out["CHAP_C"])) == max(16, length)


def test_full_exchange_with_mutual():
    s = _server(mutual_required=True)
    out = dict(s.step({"CHAP_A": "6"}))
    c = decode_binary(out["CHAP_C"])
    r = chap_digest(6, int(out["CHAP_I"]), b"initsecret1234", c)
    ans = dict(s.step({"CHAP_N": "u", "CHAP_R": encode_hex(r), "CHAP_I": "0x10", "CHAP_C": "0b" + "QUFBQQ=="}))
    assert ans["CHAP_N"] == "t"
    assert decode_binary(ans["CHAP_R"]) == chap_digest(6, 16, b"tgtsecret12345", b"AAAA")
    assert s.done and s.mutual and s.user == "u"
    assert s.step({}) == []
    with pytest.raises(ChapError):
        s.step({"CHAP_A": "5"})


@pytest.mark.parametrize("extra,msg", [
    ({"CHAP_I": "300", "CHAP_C": "0x01"}, "CHAP_I"),
    ({"CHAP_I": "1"}, "both"),
    ({"CHAP_I": "1", "CHAP_C": "0x" + "00" * 1025}, "length"),
    ({"CHAP_I": "1", "CHAP_C": "zz"}, "CHAP_C"),
])
def test_bad_mutual_requests(extra, msg):
    s = _server(mutual_required=False)
    out = dict(s.step({"CHAP_A": "5"}))
    r = chap_digest(5, int(out["CHAP_I"]), b"initsecret1234", decode_binary(out["CHAP_C"]))
    with pytest.raises(ChapError, match=msg):
        s.step({"CHAP_N": "u", "CHAP_R": encode_hex(r), **extra})


def test_wrong_length_response_fails_without_leaking():
    s = _server(mutual_required=False)
    s.step({"CHAP_A": "7"})
    with pytest.raises(ChapError) as ei:
        s.step({"CHAP_N": "u", "CHAP_R": "0x00"})
    assert "initsecret" not in str(ei.value) and "0x00" not in str(ei.value)


def test_no_credentials_configured():
    s = ChapServer([], mutual_required=False)
    out = dict(s.step({"CHAP_A": "5"}))
    with pytest.raises(ChapError):
        s.step({"CHAP_N": "u", "CHAP_R": encode_hex(chap_digest(5, int(out["CHAP_I"]), b"x", b"y"))})


def test_challenges_are_random():
    seen = set()
    for _ in range(20):
        s = ChapServer([], mutual_required=False)
        seen.add(dict(s.step({"CHAP_A": "5"}))["CHAP_C"])
    assert len(seen) == 20


def test_empty_secret_never_authenticates():
    s = ChapServer([ChapCredential("u", "")], mutual_required=False)
    out = dict(s.step({"CHAP_A": "5"}))
    r = chap_digest(5, int(out["CHAP_I"]), b"", decode_binary(out["CHAP_C"]))
    with pytest.raises(ChapError):
        s.step({"CHAP_N": "u", "CHAP_R": encode_hex(r)})
