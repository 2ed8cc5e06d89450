"""FFP Text requests: SendTargets outputs, C-bit/TTT continuation, renegotiation, rejects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from support.static_policy import StaticPolicy

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.negotiation import Negotiator, TextError, encode_pairs, parse_pairs
from pyscsi_target.iscsi.params import SessionParams, TargetInfo
from pyscsi_target.iscsi.text import TextHandler, answer_text, ffp_text_handler

INI = "iqn.1994-05.com.redhat:client1"
T1 = "iqn.2026-11.org.pyscsi-target:disk1"
T2 = "iqn.2026-11.org.pyscsi-target:disk2"
T3 = "iqn.2026-11.org.pyscsi-target:secret"


def make_policy(addresses=None) -> StaticPolicy:
    targets = [TargetInfo(i, iqn, None, "None", []) for i, iqn in enumerate((T1, T2, T3), 1)]
    return StaticPolicy(targets, portal_group_tag=1, allowed={T3: {"iqn.1994-05.com.redhat:other"}},
                        addresses=addresses or ["192.0.2.1:3260,1", "[2001:db8::1]:3260,1"])


def answer(pairs, session_type="Discovery", target_iqn=None, policy=None):
    return answer_text(pairs, policy=policy or make_policy(), session_type=session_type, initiator_name=INI,
                       target_iqn=target_iqn, negotiator=Negotiator(session_type=session_type))


ADDRS = [("TargetAddress", "192.0.2.1:3260,1"), ("TargetAddress", "[2001:db8::1]:3260,1")]


def test_send_targets_all_lists_visible_targets_with_every_portal():
    assert answer([("SendTargets", "All")]) == [("TargetName", T1), *ADDRS, ("TargetName", T2), *ADDRS]


def test_send_targets_named():
    assert answer([("SendTargets", T2)]) == [("TargetName", T2), *ADDRS]
    assert answer([("SendTargets", T3)]) == []  # not visible to this initiator
    assert answer([("SendTargets", "iqn.2026-11.org.nope:x")]) == []
    assert answer([("SendTargets", "iqn." + "x" * 300)]) == [("SendTargets", "Reject")]


def test_send_targets_empty_value():
    assert answer([("SendTargets", "")], session_type="Normal", target_iqn=T1) == [("TargetName", T1), *ADDRS]
    assert answer([("SendTargets", "")]) == []  # a discovery session has no target of its own


def test_normal_session_reports_only_its_own_target():
    for value in ("All", "", T1):
        assert answer([("SendTargets", value)], session_type="Normal", target_iqn=T1) == [("TargetName", T1), *ADDRS]
    assert answer([("SendTargets", T2)], session_type="Normal", target_iqn=T1) == []


def test_other_keys_in_text():
    out = answer([("MaxRecvDataSegmentLength", "16384"), ("HeaderDigest", "None"), ("X-foo", "1")])
    assert out == [("HeaderDigest", "Reject"), ("X-foo", "NotUnderstood")]
    with pytest.raises(TextError):
        answer([("SendTargets", "All"), ("SendTargets", "All")])


# --- the connection.py hook ---------------------------------------------------------------


def fake_conn(discovery=True):
    params = SessionParams()
    session = SimpleNamespace(discovery=discovery, initiator_name=INI, params=params,
                              target=None if discovery else SimpleNamespace(iqn=T1))
    return SimpleNamespace(session=session, policy=make_policy(), max_xmit=params.max_xmit_dsl)


def test_ffp_text_handler():
    conn = fake_conn()
    out = ffp_text_handler(conn, [("SendTargets", "All"), ("MaxRecvDataSegmentLength", "65536"),
                                  ("SendTargets", "All")])
    assert out[0] == ("TargetName", T1) and out[-1] == ("SendTargets", "Reject")
    assert conn.max_xmit == 65536 and conn.session.params.max_xmit_dsl == 65536
    conn = fake_conn(discovery=False)
    assert ffp_text_handler(conn, [("SendTargets", "")]) == [("TargetName", T1), *ADDRS]


# --- PDU level ----------------------------------------------------------------------------


def handler(max_xmit=8192, session_type="Discovery", policy=None) -> TextHandler:
    return TextHandler(policy or make_policy(), session_type=session_type, initiator_name=INI, target_iqn=None,
                       params=SessionParams(max_xmit_dsl=max_xmit))


def req(pairs=(), *, itt=5, ttt=P.RESERVED_TAG, final=1, cont=0, data=None) -> P.TextRequest:
    r = P.TextRequest(itt=itt, ttt=ttt, final=final, cont=cont, lun=0, cmdsn=1)
    r.data = encode_pairs(list(pairs)) if data is None else data
    return P.decode(r.to_bytes())


def one(h: TextHandler, r: P.TextRequest) -> P.PDU:
    out = h.receive(r)
    assert len(out) == 1
    return P.decode(out[0].to_bytes())


def test_single_pdu_send_targets():
    h = handler()
    r = one(h, req([("SendTargets", "All")]))
    assert isinstance(r, P.TextResponse) and r.final == 1 and r.cont == 0 and r.ttt == P.RESERVED_TAG
    assert r.itt == 5 and parse_pairs(r.data)[0] == ("TargetName", T1)


def big_policy() -> StaticPolicy:
    targets = [TargetInfo(i, f"iqn.2026-11.org.pyscsi-target:t{i:03d}", None, "None", []) for i in range(60)]
    return StaticPolicy(targets, addresses=[f"192.0.2.{i}:3260,1" for i in range(1, 6)])


def test_long_response_split_and_fetched_with_ttt():
    pol = big_policy()
    targets = list(pol.targets.values())
    h = handler(max_xmit=512, policy=pol)
    r = one(h, req([("SendTargets", "All")]))
    body = bytearray()
    pieces = 0
    while True:
        pieces += 1
        assert len(r.data) <= 512
        body += r.data
        if r.final:
            assert r.ttt == P.RESERVED_TAG and r.cont == 0
            break
        assert r.cont == 1 and r.ttt != P.RESERVED_TAG
        r = one(h, req(ttt=r.ttt))
    assert pieces > 10
    names = [v for k, v in parse_pairs(bytes(body)) if k == "TargetName"]
    assert names == [t.iqn for t in targets]


def test_multi_pdu_request_with_c_bit():
    h = handler()
    data = encode_pairs([("SendTargets", "All")])
    r = one(h, req(data=data[:5], final=0, cont=1))
    assert r.final == 0 and r.cont == 0 and r.data == b"" and r.ttt != P.RESERVED_TAG
    r = one(h, req(data=data[5:], ttt=r.ttt))
    assert r.final == 1 and parse_pairs(r.data)[0] == ("TargetName", T1)


def test_f0_request_answered_with_f0_then_closed():
    h = handler()
    r = one(h, req([("X-a", "1")], final=0))
    assert r.final == 0 and r.ttt != P.RESERVED_TAG and parse_pairs(r.data) == [("X-a", "NotUnderstood")]
    r = one(h, req(ttt=r.ttt))
    assert r.final == 1 and r.data == b"" and r.ttt == P.RESERVED_TAG


def test_renegotiated_mrdsl_applies_after_exchange():
    h = handler()
    r = one(h, req([("MaxRecvDataSegmentLength", "16384")]))
    assert r.final == 1 and r.data == b"" and h.params.max_xmit_dsl == 16384


def test_new_request_resets_pending_exchange():
    h = handler(max_xmit=512, policy=big_policy())
    r = one(h, req([("SendTargets", "All")]))
    assert r.final == 0
    r = one(h, req([("SendTargets", "iqn.2026-11.org.pyscsi-target:t001")], itt=6))
    assert r.final == 1 and r.itt == 6 and r.data
    # the old TTT is gone
    assert isinstance(one(h, req(ttt=1)), P.Reject)


@pytest.mark.parametrize("request_,reason", [
    (dict(final=1, cont=1, data=b"A=1\0"), P.RejectReason.PROTOCOL_ERROR),
    (dict(data=b"garbage"), P.RejectReason.PROTOCOL_ERROR),
    (dict(data=b"A=1\0A=2\0"), P.RejectReason.PROTOCOL_ERROR),
    (dict(ttt=77), P.RejectReason.INVALID_PDU_FIELD),
])
def test_rejects(request_, reason):
    h = handler()
    r = one(h, req(**request_))
    assert isinstance(r, P.Reject) and r.reason == reason and r.itt == P.RESERVED_TAG
    assert len(r.data) == 48 and r.data[0] & 0x3F == P.Op.TEXT_REQ


def test_data_while_fetching_pieces_rejected():
    h = handler(max_xmit=512, policy=big_policy())
    r = one(h, req([("SendTargets", "All")]))
    r = one(h, req([("X-a", "1")], ttt=r.ttt))
    assert isinstance(r, P.Reject)


def test_request_size_cap():
    h = handler()
    chunk = b"X-a=" + b"b" * 8000
    r = None
    for _ in range(9):
        r = one(h, req(data=chunk, final=0, cont=1, ttt=r.ttt if r is not None else P.RESERVED_TAG))
        if isinstance(r, P.Reject):
            break
    assert isinstance(r, P.Reject)
