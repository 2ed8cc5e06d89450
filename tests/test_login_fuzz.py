"""Hypothesis fuzz: random login/text traffic only ever yields handled results."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.static_policy import StaticPolicy

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.login import LoginMachine
from pyscsi_target.iscsi.negotiation import KEYS, Negotiator, encode_pairs
from pyscsi_target.iscsi.params import ChapCredential, SessionParams, TargetInfo
from pyscsi_target.iscsi.text import TextHandler

TGT = "iqn.2026-11.org.pyscsi-target:disk1"
KEY_NAMES = [*KEYS, "X-foo", "X#bar", "Unknown", "InitiatorName", "TargetName", "SessionType"]
VALUES = ["Yes", "No", "None", "CRC32C", "CRC32C,None", "CHAP,None", "CHAP", "None,CHAP", "5", "7,5", "0",
          "1", "512", "8192", "262144", "16777216", "0x10", "0bAAAA", "Discovery", "Normal", "All", "",
          "Reject", "Irrelevant", "NotUnderstood", TGT, "iqn.1994-05.com.redhat:x", "x" * 300]

keys = st.one_of(st.sampled_from(KEY_NAMES), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                        min_size=1, max_size=70).filter(lambda s: "=" not in s))
values = st.one_of(st.sampled_from(VALUES), st.text(max_size=40))
pairs = st.lists(st.tuples(keys, values), max_size=8)


def policy(method: str) -> StaticPolicy:
    cred = ChapCredential("u", "initsecret1234", "t", "tgtsecret12345")
    return StaticPolicy([TargetInfo(1, TGT, "a", method, [cred])], discovery_method=method,
                        discovery_credentials=[cred])


request = st.builds(
    dict,
    pairs=pairs,
    raw=st.one_of(st.none(), st.binary(max_size=200)),
    csg=st.integers(0, 3), nsg=st.integers(0, 3), transit=st.integers(0, 1), cont=st.integers(0, 1),
    vmin=st.sampled_from([0, 0, 0, 1, 255]), vmax=st.sampled_from([0, 0, 1, 255]),
    tsih=st.sampled_from([0, 0, 0, 1, 0xFFFF]), other=st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["None", "CHAP", "CHAP Mutual", "Auto", "Bogus"]), st.lists(request, min_size=1, max_size=6))
def test_login_never_raises(method, reqs):
    m = LoginMachine(policy(method))
    for r in reqs:
        if r["other"] and r["raw"] is not None:
            pdu: P.PDU = P.NopOut(itt=1)
        else:
            pdu = P.LoginRequest(isid=b"\x80\0\0\0\0\1", tsih=r["tsih"], csg=r["csg"], nsg=r["nsg"],
                                 transit=r["transit"], cont=r["cont"], version_min=r["vmin"], version_max=r["vmax"])
        pdu.data = r["raw"] if r["raw"] is not None else encode_pairs(r["pairs"])
        was_over = m.done or m.failed
        out = m.receive(P.decode(pdu.to_bytes()))
        if was_over:
            assert out == []
            continue
        assert len(out) == 1 and isinstance(out[0], P.LoginResponse)
        rsp = out[0]
        rsp.to_bytes()  # encodable
        if rsp.status_class:
            assert m.failed and not m.done and rsp.transit == 0
        else:
            assert not m.failed and len(rsp.data) <= 8192
        if m.done:
            assert m.result is not None and 1 <= m.result.tsih <= 0xFFFF
            # Security property: random traffic never gets past a CHAP requirement.
            assert method not in ("CHAP", "CHAP Mutual"), m.result


@settings(max_examples=300, deadline=None)
@given(pairs, st.booleans(), st.booleans())
def test_negotiator_never_raises(ps, discovery, ffp):
    n = Negotiator(session_type="Discovery" if discovery else "Normal")
    for k, v in n.respond(ps, ffp=ffp):
        assert k in dict(ps)
        assert isinstance(v, str)
    p = n.session_params()
    assert 512 <= p.max_xmit_dsl < 1 << 24 and p.first_burst_length <= p.max_burst_length


text_request = st.builds(
    dict, pairs=pairs, raw=st.one_of(st.none(), st.binary(max_size=100)), final=st.integers(0, 1),
    cont=st.integers(0, 1), ttt=st.sampled_from([P.RESERVED_TAG, P.RESERVED_TAG, 1, 2, 77]), itt=st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(text_request, min_size=1, max_size=8), st.sampled_from([512, 8192]))
def test_text_handler_never_raises(reqs, mx):
    h = TextHandler(policy("None"), session_type="Discovery", initiator_name="iqn.1994-05.com.redhat:x",
                    target_iqn=None, params=SessionParams(max_xmit_dsl=mx))
    for r in reqs:
        pdu = P.TextRequest(itt=r["itt"], ttt=r["ttt"], final=r["final"], cont=r["cont"])
        pdu.data = r["raw"] if r["raw"] is not None else encode_pairs(r["pairs"])
        out = h.receive(P.decode(pdu.to_bytes()))
        assert len(out) == 1 and isinstance(out[0], (P.TextResponse, P.Reject))
        rsp = out[0]
        assert len(rsp.data) <= max(mx, 48)
        if isinstance(rsp, P.TextResponse):
            assert (rsp.final == 1) == (rsp.ttt == P.RESERVED_TAG)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([5, 6, 7, 8]), st.integers(0, 255), st.booleans())
def test_any_altered_chap_response_fails(alg, bit, mutual):
    import hashlib

    from pyscsi_target.iscsi.chap import chap_digest, decode_binary

    m = LoginMachine(policy("CHAP Mutual" if mutual else "CHAP"))
    base = dict(isid=b"\x80\0\0\0\0\1", csg=0, nsg=1)

    def send(pairs, **kw):
        q = P.LoginRequest(**base, **kw)
        q.data = encode_pairs(pairs)
        (r,) = m.receive(P.decode(q.to_bytes()))
        return r, dict(kv.split("=", 1) for kv in bytes(r.data).decode().split("\0") if kv)

    send([("InitiatorName", "iqn.1994-05.com.redhat:x"), ("TargetName", TGT), ("AuthMethod", "CHAP")])
    _r, d = send([("CHAP_A", str(alg))])
    good = chap_digest(alg, int(d["CHAP_I"]), b"initsecret1234", decode_binary(d["CHAP_C"]))
    bad = bytearray(good)
    bad[(bit // 8) % len(bad)] ^= 1 << (bit % 8)
    pairs = [("CHAP_N", "u"), ("CHAP_R", "0x" + bad.hex())]
    if mutual:
        pairs += [("CHAP_I", "1"), ("CHAP_C", "0x" + hashlib.md5(b"x").hexdigest())]
    r, _d = send(pairs, transit=1)
    assert (r.status_class, r.status_detail) == (2, 1) and m.failed and not m.done
