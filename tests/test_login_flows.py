"""Login machine flows driven with LoginRequest PDUs (no sockets)."""

from __future__ import annotations

import base64
import hashlib
import logging

import pytest
from support.static_policy import StaticPolicy

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.login import MAX_LOGIN_TEXT, LoginMachine
from pyscsi_target.iscsi.negotiation import encode_pairs, parse_pairs
from pyscsi_target.iscsi.params import ChapCredential, LoginReject, TargetInfo
from pyscsi_target.values import LoginStatus

INI = "iqn.1994-05.com.redhat:client1"
TGT = "iqn.2026-11.org.pyscsi-target:disk1"
ISID = bytes.fromhex("800000000001")
SECRET = "initiatorsecret1"
PEERSECRET = "targetsecret123"
HASH = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}


def cred(user: str = "alice", secret: str = SECRET, peeruser: str = "tgt", peersecret: str = PEERSECRET):
    return ChapCredential(user=user, secret=secret, peeruser=peeruser, peersecret=peersecret)


def policy(method: str = "None", creds: list[ChapCredential] | None = None, **kw) -> StaticPolicy:
    t = TargetInfo(target_id=1, iqn=TGT, alias="disk one", auth_method=method,
                   credentials=[cred()] if creds is None else creds)
    return StaticPolicy([t], portal_group_tag=7, **kw)


class Client:
    """Minimal initiator side: builds requests, decodes responses."""

    def __init__(self, machine: LoginMachine, *, isid: bytes = ISID, tsih: int = 0, expstatsn: int = 1000,
                 cmdsn: int = 77) -> None:
        self.m = machine
        self.isid, self.tsih, self.cmdsn, self.expstatsn = isid, tsih, cmdsn, expstatsn

    def send(self, pairs=(), *, csg: int, nsg: int = 0, transit: int = 0, cont: int = 0, data: bytes | None = None,
             **kw) -> P.LoginResponse:
        req = P.LoginRequest(isid=self.isid, tsih=self.tsih, itt=0x1234, cid=3, cmdsn=self.cmdsn,
                             expstatsn=self.expstatsn, csg=csg, nsg=nsg, transit=transit, cont=cont, **kw)
        req.data = encode_pairs(list(pairs)) if data is None else data
        # Round-trip through the wire format so the codec is exercised too.
        req = P.decode(req.to_bytes())
        out = self.m.receive(req)
        assert len(out) == 1
        rsp = P.decode(out[0].to_bytes())
        assert isinstance(rsp, P.LoginResponse)
        if rsp.status_class == 0:
            self.expstatsn = (rsp.statsn + 1) & 0xFFFFFFFF
        return rsp


def kv(rsp: P.PDU) -> dict[str, str]:
    return dict(parse_pairs(rsp.data))


def first_keys(**extra: str) -> list[tuple[str, str]]:
    keys = [("InitiatorName", INI), ("InitiatorAlias", "client"), ("SessionType", "Normal"), ("TargetName", TGT)]
    return keys + list(extra.items())


def status(rsp: P.LoginResponse) -> int:
    return rsp.status_class << 8 | rsp.status_detail


def do_chap(c: Client, alg: int, *, secret: str = SECRET, user: str = "alice", offer: str | None = None,
            mutual_challenge: bytes | None = None, encoding: str = "hex"):
    r = c.send([("CHAP_A", offer or str(alg))], csg=0)
    assert status(r) == 0 and r.transit == 0
    d = kv(r)
    assert d["CHAP_A"] == str(alg)
    ident = int(d["CHAP_I"])
    challenge = bytes.fromhex(d["CHAP_C"][2:])
    assert len(challenge) >= max(16, hashlib.new(HASH[alg]).digest_size)
    digest = hashlib.new(HASH[alg], bytes([ident]) + secret.encode() + challenge).digest()
    rv = "0x" + digest.hex() if encoding == "hex" else "0b" + base64.b64encode(digest).decode()
    pairs = [("CHAP_N", user), ("CHAP_R", rv)]
    if mutual_challenge is not None:
        pairs += [("CHAP_I", "42"), ("CHAP_C", "0x" + mutual_challenge.hex())]
    return c.send(pairs, csg=0, nsg=1, transit=1), challenge


# --- successful logins ------------------------------------------------------------------


def test_no_auth_two_stages_fields_and_result():
    pol = policy()
    m = LoginMachine(pol, cmdsn_window=16)
    c = Client(m)
    r = c.send(first_keys(AuthMethod="None"), csg=0, nsg=1, transit=1)
    assert status(r) == 0 and r.transit == 1 and r.csg == 0 and r.nsg == 1
    assert r.version_max == 0 and r.version_active == 0 and r.isid == ISID and r.itt == 0x1234 and r.tsih == 0
    assert r.statsn == 1000 and r.expcmdsn == 77 and r.maxcmdsn == 77 + 15
    d = kv(r)
    assert d == {"TargetPortalGroupTag": "7", "TargetAlias": "disk one", "AuthMethod": "None"}
    r = c.send([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536"),
                ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "65536"), ("MaxOutstandingR2T", "8"), ("ErrorRecoveryLevel", "0")],
               csg=1, nsg=3, transit=1)
    assert status(r) == 0 and r.transit == 1 and r.csg == 1 and r.nsg == 3 and r.statsn == 1001
    assert r.tsih == 1
    d = kv(r)
    assert d["HeaderDigest"] == "CRC32C" and d["DataDigest"] == "None" and d["InitialR2T"] == "No"
    assert d["MaxRecvDataSegmentLength"] == "262144" and d["MaxBurstLength"] == "1048576"
    assert d["MaxOutstandingR2T"] == "8"
    assert m.done and not m.failed and m.status == LoginStatus.SUCCESS
    res = m.result
    assert res is not None and res.tsih == 1 and res.session_type == "Normal" and res.leading
    assert res.initiator_name == INI and res.initiator_alias == "client" and res.target.iqn == TGT
    assert res.isid == int.from_bytes(ISID, "big") and res.cid == 3 and res.cmdsn == 77 and res.statsn == 1002
    p = res.params
    assert p.header_digest and not p.data_digest and p.max_xmit_dsl == 65536 and p.max_recv_dsl == 262144
    assert not p.initial_r2t and p.immediate_data and p.max_burst_length == 1048576
    assert p.first_burst_length == 65536 and p.max_outstanding_r2t == 8 and p.max_connections == 1
    assert pol.completed == [res]
    assert m.receive(P.LoginRequest()) == []  # finished: nothing more to say


def test_skip_security_stage_when_no_auth_required():
    m = LoginMachine(policy())
    r = Client(m).send(first_keys(), csg=1, nsg=3, transit=1)
    assert status(r) == 0 and r.transit and r.nsg == 3 and m.done
    assert kv(r)["MaxRecvDataSegmentLength"] == "262144"
    assert m.result.params.max_xmit_dsl == 8192  # nothing declared: the RFC default


def test_security_to_ffp_directly():
    m = LoginMachine(policy())
    r = Client(m).send(first_keys(AuthMethod="None"), csg=0, nsg=3, transit=1)
    assert status(r) == 0 and r.nsg == 3 and r.tsih == 1 and m.done
    assert "MaxRecvDataSegmentLength" in kv(r)


def test_transit_not_requested_keeps_stage():
    m = LoginMachine(policy())
    c = Client(m)
    r = c.send(first_keys(), csg=0)
    assert status(r) == 0 and r.transit == 0
    r = c.send([("AuthMethod", "None")], csg=0, nsg=1, transit=1)
    assert status(r) == 0 and r.transit == 1
    r = c.send([("MaxConnections", "4")], csg=1)
    assert kv(r) == {"MaxConnections": "1", "MaxRecvDataSegmentLength": "262144"} and r.transit == 0
    r = c.send([], csg=1, nsg=3, transit=1)
    assert r.transit == 1 and m.done and kv(r) == {}


@pytest.mark.parametrize("alg", [5, 6, 7, 8])
@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_chap_every_algorithm(alg, encoding):
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    r = c.send(first_keys(AuthMethod="CHAP,None"), csg=0, nsg=1, transit=1)
    assert status(r) == 0 and r.transit == 0 and kv(r)["AuthMethod"] == "CHAP"
    r, _ = do_chap(c, alg, encoding=encoding)
    assert status(r) == 0 and r.transit == 1 and r.nsg == 1 and kv(r) == {}
    r = c.send([], csg=1, nsg=3, transit=1)
    assert status(r) == 0 and m.done


@pytest.mark.parametrize("offer,chosen", [("7,5", 7), ("8,6,5", 8), ("99,6", 6), ("0x5", 5)])
def test_chap_algorithm_first_supported_of_initiator_list(offer, chosen):
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, chosen, offer=offer)
    assert status(r) == 0 and r.transit == 1


def test_chap_no_supported_algorithm():
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r = c.send([("CHAP_A", "1,2,99")], csg=0)
    assert status(r) == 0x0201 and m.failed


def test_mutual_chap():
    m = LoginMachine(policy("CHAP Mutual"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    ours = bytes(range(100, 132))
    r, _ = do_chap(c, 7, mutual_challenge=ours)
    assert status(r) == 0 and r.transit == 1
    d = kv(r)
    assert d["CHAP_N"] == "tgt"
    assert d["CHAP_R"] == "0x" + hashlib.sha256(bytes([42]) + PEERSECRET.encode() + ours).hexdigest()
    r = c.send([], csg=1, nsg=3, transit=1)
    assert m.done


def test_mutual_optional_under_chap_and_auto():
    for method in ("CHAP", "Auto"):
        m = LoginMachine(policy(method))
        c = Client(m)
        c.send(first_keys(AuthMethod="CHAP,None"), csg=0)
        r, _ = do_chap(c, 5, mutual_challenge=b"\x01" * 16)
        assert status(r) == 0 and kv(r)["CHAP_N"] == "tgt"


def test_mutual_required_but_not_requested():
    m = LoginMachine(policy("CHAP Mutual"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 5)
    assert status(r) == 0x0201 and m.failed


def test_mutual_without_peer_credentials():
    m = LoginMachine(policy("CHAP", creds=[cred(peeruser="", peersecret="")]))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 5, mutual_challenge=b"\x02" * 16)
    assert status(r) == 0x0201


def test_mutual_same_secret_both_directions_refused():
    m = LoginMachine(policy("CHAP", creds=[cred(peersecret=SECRET)]))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 5, mutual_challenge=b"\x02" * 16)
    assert status(r) == 0x0201


def test_wrong_secret_is_auth_failure_and_not_logged(caplog):
    caplog.set_level(logging.DEBUG)
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 7, secret="wrong-secret-xyz")
    assert status(r) == 0x0201 and r.transit == 0 and m.failed and m.status == LoginStatus.AUTHENTICATION_FAILURE
    assert "alice" in caplog.text and "0201" in caplog.text
    assert SECRET not in caplog.text and "wrong-secret-xyz" not in caplog.text
    assert m.receive(P.LoginRequest()) == []


def test_unknown_chap_user():
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 5, user="mallory")
    assert status(r) == 0x0201


def test_second_credential_of_group_accepted():
    creds = [cred(), cred(user="bob", secret="bobsecret12345")]
    m = LoginMachine(policy("CHAP", creds=creds))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 6, user="bob", secret="bobsecret12345")
    assert status(r) == 0


def test_reflected_challenge_refused():
    m = LoginMachine(policy("CHAP Mutual"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r = c.send([("CHAP_A", "5")], csg=0)
    d = kv(r)
    challenge = bytes.fromhex(d["CHAP_C"][2:])
    digest = hashlib.md5(bytes([int(d["CHAP_I"])]) + SECRET.encode() + challenge).digest()
    r = c.send([("CHAP_N", "alice"), ("CHAP_R", "0x" + digest.hex()), ("CHAP_I", d["CHAP_I"]),
                ("CHAP_C", d["CHAP_C"])], csg=0, nsg=1, transit=1)
    assert status(r) == 0x0201 and "reflected" in m.reason


@pytest.mark.parametrize("pairs", [
    [("CHAP_R", "0x00")],  # response before CHAP_A
    [("CHAP_A", "5"), ("CHAP_N", "alice")],
])
def test_chap_keys_out_of_order(pairs):
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    assert status(c.send(pairs, csg=0)) == 0x0201


def test_malformed_chap_r():
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    c.send([("CHAP_A", "5")], csg=0)
    r = c.send([("CHAP_N", "alice"), ("CHAP_R", "0xZZ")], csg=0)
    assert status(r) == 0x0201


def test_chap_required_but_transit_without_auth():
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    r = c.send(first_keys(), csg=0, nsg=1, transit=1)  # no AuthMethod offered at all
    assert status(r) == 0x0201


def test_chap_in_progress_holds_transit():
    m = LoginMachine(policy("CHAP"))
    c = Client(m)
    r = c.send(first_keys(AuthMethod="CHAP"), csg=0, nsg=1, transit=1)
    assert r.transit == 0
    r = c.send([("CHAP_A", "5")], csg=0, nsg=1, transit=1)
    assert r.transit == 0 and status(r) == 0
    r = c.send([], csg=0, nsg=1, transit=1)  # still no response: keep waiting
    assert r.transit == 0 and status(r) == 0


def test_chap_required_but_security_stage_skipped():
    m = LoginMachine(policy("CHAP"))
    r = Client(m).send(first_keys(), csg=1, nsg=3, transit=1)
    assert status(r) == 0x0201


@pytest.mark.parametrize("method,creds,offer,expect", [
    ("None", None, "CHAP,None", "None"),
    ("None", None, "CHAP", 0x0201),
    ("CHAP", None, "None", 0x0201),
    ("CHAP", None, "KRB5,SRP,CHAP", "CHAP"),
    ("CHAP Mutual", None, "None,CHAP", "CHAP"),
    ("Auto", None, "None,CHAP", "None"),
    ("Auto", None, "CHAP,None", "CHAP"),
    ("Auto", [], "CHAP,None", "None"),  # nothing to check CHAP against
    ("Auto", [], "CHAP", 0x0201),
])
def test_auth_method_selection(method, creds, offer, expect):
    m = LoginMachine(policy(method, creds=creds))
    r = Client(m).send(first_keys(AuthMethod=offer), csg=0)
    if isinstance(expect, int):
        assert status(r) == expect
    else:
        assert status(r) == 0 and kv(r)["AuthMethod"] == expect


# --- discovery ----------------------------------------------------------------------------


def test_discovery_no_auth():
    pol = policy("CHAP")  # the target's auth does not apply to discovery
    m = LoginMachine(pol)
    c = Client(m)
    r = c.send([("InitiatorName", INI), ("SessionType", "Discovery"), ("AuthMethod", "None")],
               csg=0, nsg=1, transit=1)
    assert status(r) == 0 and "TargetPortalGroupTag" not in kv(r)
    r = c.send([("HeaderDigest", "None"), ("MaxBurstLength", "4096"), ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "32768"), ("ErrorRecoveryLevel", "0")], csg=1, nsg=3, transit=1)
    d = kv(r)
    assert d["MaxBurstLength"] == "Irrelevant" and d["ImmediateData"] == "Irrelevant"
    assert d["HeaderDigest"] == "None" and d["ErrorRecoveryLevel"] == "0"
    assert m.done and m.result.session_type == "Discovery" and m.result.target is None
    assert m.result.params.max_xmit_dsl == 32768


def test_discovery_with_chap():
    m = LoginMachine(policy(discovery_method="CHAP Mutual", discovery_credentials=[cred(user="disc")]))
    c = Client(m)
    r = c.send([("InitiatorName", INI), ("SessionType", "Discovery"), ("AuthMethod", "None,CHAP")], csg=0,
               nsg=1, transit=1)
    assert kv(r)["AuthMethod"] == "CHAP"
    r, _ = do_chap(c, 8, user="disc", mutual_challenge=b"\x07" * 32)
    assert status(r) == 0 and kv(r)["CHAP_N"] == "tgt"
    c.send([], csg=1, nsg=3, transit=1)
    assert m.done


def test_discovery_chap_required_none_offered():
    m = LoginMachine(policy(discovery_method="CHAP", discovery_credentials=[cred()]))
    r = Client(m).send([("InitiatorName", INI), ("SessionType", "Discovery"), ("AuthMethod", "None")], csg=0)
    assert status(r) == 0x0201


# --- rejects ------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs,expect", [
    ([("TargetName", TGT)], 0x0207),
    ([("InitiatorName", INI)], 0x0207),
    ([("InitiatorName", INI), ("TargetName", "iqn.2026-11.org.other:nope")], 0x0203),
    ([("InitiatorName", INI), ("TargetName", "iqn." + "x" * 300)], 0x0203),
    ([("InitiatorName", INI), ("TargetName", TGT), ("SessionType", "Boot")], 0x0209),
    ([("InitiatorName", "not an iqn"), ("TargetName", TGT)], 0x0200),
    ([("InitiatorName", INI), ("TargetName", TGT), ("TargetName", TGT)], 0x0200),
])
def test_first_request_rejects(pairs, expect):
    m = LoginMachine(policy())
    r = Client(m).send(pairs, csg=0, nsg=1, transit=1)
    assert status(r) == expect and m.failed and r.transit == 0


def test_forbidden_initiator():
    m = LoginMachine(policy(allowed={TGT: {"iqn.1994-05.com.redhat:other"}}))
    r = Client(m).send(first_keys(), csg=0, nsg=1, transit=1)
    assert status(r) == 0x0202


@pytest.mark.parametrize("vmin,vmax", [(1, 1), (2, 0x10)])
def test_unsupported_version(vmin, vmax):
    m = LoginMachine(policy())
    r = Client(m).send(first_keys(), csg=0, version_min=vmin, version_max=vmax)
    assert status(r) == 0x0205 and r.version_max == 0 and r.statsn == 1000


def test_version_range_including_zero_accepted():
    m = LoginMachine(policy())
    r = Client(m).send(first_keys(), csg=0, version_min=0, version_max=3)
    assert status(r) == 0


def test_unknown_tsih_session_does_not_exist():
    m = LoginMachine(policy())
    c = Client(m, tsih=0x55)
    r = c.send(first_keys(MaxConnections="2"), csg=1, nsg=3, transit=1)
    assert status(r) == 0x020A
    assert "TargetPortalGroupTag" not in kv(r)


def test_add_connection_to_existing_session_is_not_leading():
    pol = policy()
    m = LoginMachine(pol)
    Client(m).send(first_keys(), csg=1, nsg=3, transit=1)
    tsih = m.result.tsih
    m2 = LoginMachine(pol)
    c2 = Client(m2, tsih=tsih)
    r = c2.send(first_keys(MaxBurstLength="4096", HeaderDigest="CRC32C"), csg=1, nsg=3, transit=1)
    d = kv(r)
    assert status(r) == 0 and d["MaxBurstLength"] == "Irrelevant" and d["HeaderDigest"] == "CRC32C"
    assert "TargetPortalGroupTag" not in d
    assert r.tsih == tsih and not m2.result.leading and m2.result.params.header_digest


def test_non_login_pdu_during_login():
    m = LoginMachine(policy())
    out = m.receive(P.TextRequest(itt=9, cmdsn=4))
    assert len(out) == 1 and out[0].status_class == 2 and out[0].status_detail == 0x0B and m.failed
    assert out[0].itt == 9


@pytest.mark.parametrize("first,second", [
    (dict(csg=0), dict(csg=1)),                               # stage changed without transit
    (dict(csg=0), dict(csg=0, isid=b"\x80\0\0\0\0\2")),       # ISID changed
    (dict(csg=0), dict(csg=0, transit=1, cont=1, nsg=1)),     # T and C both set
    (dict(csg=0), dict(csg=0, transit=1, nsg=2)),             # reserved NSG
    (dict(csg=0, transit=1, nsg=1), dict(csg=1, transit=1, nsg=1)),  # NSG not beyond CSG
    (dict(csg=0), dict(csg=2)),
])
def test_sequencing_errors(first, second):
    m = LoginMachine(policy())
    c = Client(m)
    assert status(c.send(first_keys(), **first)) == 0
    if "isid" in second:
        c.isid = second.pop("isid")
    r = c.send([], **second)
    assert status(r) == 0x0200 and m.failed


def test_first_only_keys_later_and_duplicates_across_pdus():
    for later in ([("SessionType", "Discovery")], [("HeaderDigest", "None"), ("HeaderDigest", "None")],
                  [("InitiatorName", INI + "x")], [("TargetName", TGT + "x")], [("X-k", "1"), ("X-k", "1")]):
        m = LoginMachine(policy())
        c = Client(m)
        c.send([("InitiatorName", INI), ("TargetName", TGT), ("InitiatorAlias", "x")], csg=0)
        assert status(c.send(later, csg=0)) == 0x0200


def test_informational_declaratives_may_repeat():
    m = LoginMachine(policy())
    c = Client(m)
    c.send(first_keys(MaxRecvDataSegmentLength="4096"), csg=0)
    r = c.send([("InitiatorAlias", "renamed"), ("MaxRecvDataSegmentLength", "16384")], csg=0, nsg=3, transit=1)
    assert status(r) == 0 and m.result.initiator_alias == "renamed" and m.result.params.max_xmit_dsl == 16384


def test_identical_identity_repeat_tolerated_like_libiscsi():
    # libiscsi with credentials against a portal whose discovery needs no auth: the target
    # picks AuthMethod=None and libiscsi repeats InitiatorName/SessionType in the next stage.
    m = LoginMachine(policy())
    c = Client(m)
    ident = [("InitiatorName", INI), ("SessionType", "Discovery")]
    r = c.send([*ident, ("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=1)
    assert kv(r) == {"AuthMethod": "None"} and r.transit == 1
    r = c.send([*ident, ("HeaderDigest", "None")], csg=1, nsg=3, transit=1)
    assert status(r) == 0 and m.done and kv(r) == {"HeaderDigest": "None", "MaxRecvDataSegmentLength": "262144"}
    # SessionType absent at first means Normal; repeating "Normal" later is the same declaration.
    m = LoginMachine(policy())
    c = Client(m)
    c.send([("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "None")], csg=0, nsg=1, transit=1)
    r = c.send([("SessionType", "Normal"), ("TargetName", TGT)], csg=1, nsg=3, transit=1)
    assert status(r) == 0 and m.done


def test_security_key_in_operational_stage():
    m = LoginMachine(policy())
    c = Client(m)
    c.send(first_keys(AuthMethod="None"), csg=0, nsg=1, transit=1)
    assert status(c.send([("AuthMethod", "None")], csg=1)) == 0x0200


@pytest.mark.parametrize("data", [b"InitiatorName=" + INI.encode(), b"novalue\0", b"=x\0",
                                  b"K" * 64 + b"=1\0", b"Bad Key=1\0", b"InitiatorName=\xff\xfe\0"])
def test_malformed_text(data):
    m = LoginMachine(policy())
    r = Client(m).send(csg=0, data=data)
    assert status(r) == 0x0200


def test_login_text_cap():
    m = LoginMachine(policy())
    c = Client(m)
    chunk = b"X-a=" + b"b" * 8000 + b"\0"
    for _ in range(MAX_LOGIN_TEXT // len(chunk)):
        r = c.send(csg=0, cont=1, data=chunk)
        assert status(r) == 0 and r.transit == 0 and r.cont == 0 and not r.data
    r = c.send(csg=0, cont=1, data=chunk)
    assert status(r) == 0x0200


def test_policy_errors():
    class Broken(StaticPolicy):
        def lookup_target(self, name):
            raise RuntimeError("db gone")

    m = LoginMachine(Broken([]))
    assert status(Client(m).send(first_keys(), csg=0)) == 0x0300

    class Unavailable(StaticPolicy):
        def lookup_target(self, name):
            raise LoginReject(LoginStatus.SERVICE_UNAVAILABLE, "shutting down")

    m = LoginMachine(Unavailable([]))
    assert status(Client(m).send(first_keys(), csg=0)) == 0x0301

    class TooMany(StaticPolicy):
        def complete_login(self, result):
            raise LoginReject(LoginStatus.TOO_MANY_CONNECTIONS, "too many connections")

    pol = policy()
    m = LoginMachine(TooMany(list(pol.targets.values())))
    assert status(Client(m).send(first_keys(), csg=1, nsg=3, transit=1)) == 0x0206

    class BadTsih(StaticPolicy):
        def complete_login(self, result):
            return 0

    m = LoginMachine(BadTsih(list(pol.targets.values())))
    assert status(Client(m).send(first_keys(), csg=1, nsg=3, transit=1)) == 0x0300


# --- multi-PDU text (C bit) ---------------------------------------------------------------


def test_multi_pdu_request_text():
    m = LoginMachine(policy())
    c = Client(m)
    text = encode_pairs(first_keys(AuthMethod="None"))
    pieces = [text[:10], text[10:33], text[33:]]
    for p in pieces[:-1]:
        r = c.send(csg=0, nsg=1, cont=1, data=p)
        assert status(r) == 0 and r.transit == 0 and r.cont == 0 and r.data == b""
    r = c.send(csg=0, nsg=1, transit=1, data=pieces[-1])
    assert status(r) == 0 and r.transit == 1 and kv(r)["AuthMethod"] == "None"


def test_long_response_split_with_c_bit():
    m = LoginMachine(policy())
    c = Client(m)
    c.send(first_keys(AuthMethod="None"), csg=0, nsg=1, transit=1)
    keys = [(f"X-com.example.k{i:04d}", "v") for i in range(700)]
    text = encode_pairs(keys)
    for off in range(0, len(text) - 8192, 8192):
        assert status(c.send(csg=1, cont=1, data=text[off:off + 8192])) == 0
    rest = text[(len(text) - 1) // 8192 * 8192:]
    r = c.send(csg=1, nsg=3, transit=1, data=rest)
    got = bytearray(r.data)
    pieces = 1
    while r.cont:
        assert r.transit == 0 and len(r.data) == 8192 and not m.done
        r = c.send(csg=1, nsg=3)  # empty request fetches the next piece
        got += r.data
        pieces += 1
    assert pieces >= 2 and r.transit == 1 and r.nsg == 3 and m.done
    d = dict(parse_pairs(bytes(got)))
    assert all(d[k] == "NotUnderstood" for k, _ in keys)
    assert r.tsih == m.result.tsih


def test_data_while_fetching_long_response_is_error():
    m = LoginMachine(policy())
    c = Client(m)
    keys = [("InitiatorName", INI), ("TargetName", TGT)] + [(f"X-k{i:04d}", "v") for i in range(700)]
    text = encode_pairs(keys)
    for off in range(0, len(text) - 8192, 8192):
        c.send(csg=0, cont=1, data=text[off:off + 8192])
    r = c.send(csg=0, data=text[(len(text) - 1) // 8192 * 8192:])
    assert r.cont == 1
    assert status(c.send([("X-more", "1")], csg=0)) == 0x0200


def test_statsn_sequence_follows_expstatsn():
    m = LoginMachine(policy())
    c = Client(m, expstatsn=0xFFFFFFFF)
    r1 = c.send(first_keys(), csg=0)
    r2 = c.send([("AuthMethod", "None")], csg=0, nsg=1, transit=1)
    r3 = c.send([], csg=1, nsg=3, transit=1)
    assert (r1.statsn, r2.statsn, r3.statsn) == (0xFFFFFFFF, 0, 1)
    assert m.result.statsn == 2


def test_policy_redirect_carries_target_address():
    class Redirect(StaticPolicy):
        def lookup_target(self, name):
            raise LoginReject(LoginStatus.TARGET_MOVED_TEMPORARILY, "moved",
                              pairs=[("TargetAddress", "192.0.2.9:3260,2")])

    m = LoginMachine(Redirect([]))
    r = Client(m).send(first_keys(), csg=0)
    assert status(r) == 0x0101 and kv(r) == {"TargetAddress": "192.0.2.9:3260,2"} and m.failed


def test_identity_keys_never_answered_on_non_leading_connection():
    pol = policy()
    m = LoginMachine(pol)
    Client(m).send(first_keys(), csg=1, nsg=3, transit=1)
    m2 = LoginMachine(pol)
    r = Client(m2, tsih=m.result.tsih).send(first_keys(), csg=1, nsg=3, transit=1)
    assert status(r) == 0 and kv(r) == {"MaxRecvDataSegmentLength": "262144"}


def test_overlong_security_value():
    m = LoginMachine(policy("CHAP"))
    r = Client(m).send(first_keys(AuthMethod="CHAP," * 100), csg=0)
    assert status(r) == 0x0200


def test_oversized_login_pdu_is_initiator_error():
    m = LoginMachine(policy())
    reader = P.PDUReader(max_data=8192)
    req = P.LoginRequest(isid=ISID, csg=0, itt=3, expstatsn=5)
    req.data = encode_pairs(first_keys()) + b"X-pad=" + b"p" * 9000 + b"\0"
    (ev,) = list(reader.feed(req.to_bytes()))
    assert isinstance(ev, P.OversizedPDU)
    (r,) = m.oversized(ev.pdu, ev.length)
    assert (r.status_class, r.status_detail) == (2, 0) and r.itt == 3 and r.statsn == 5 and m.failed
    assert m.oversized(ev.pdu, ev.length) == []


def test_extension_keys_through_the_wire():
    m = LoginMachine(policy())
    c = Client(m)
    r = c.send(first_keys(**{"X#NodeArchitecture": "Linux/6.1,open-iscsi/2.1", "X-com.example.Opt": "1",
                             "X#org.example.Thing": "y"}), csg=1, nsg=3, transit=1)
    assert status(r) == 0 and m.done
    d = kv(r)
    assert "X#NodeArchitecture" not in d  # declarative: recorded, not answered
    assert d["X-com.example.Opt"] == "NotUnderstood" and d["X#org.example.Thing"] == "NotUnderstood"
    assert m.result.params.extra["X#NodeArchitecture"] == "Linux/6.1,open-iscsi/2.1"
