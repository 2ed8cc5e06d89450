"""Table-driven tests of every key's result function (RFC 7143 section 13)."""

from __future__ import annotations

import pytest

from pyscsi_target.iscsi.negotiation import (
    DEFAULTS,
    KEYS,
    Kind,
    Negotiator,
    TextError,
    check_duplicates,
    encode_pairs,
    parse_number,
    parse_pairs,
)
from pyscsi_target.iscsi.params import SessionParams, TargetValues

# (key, offer, expected answer; None = no answer) with the default TargetValues.
CASES = [
    # numerical minimum
    ("MaxConnections", "4", "1"), ("MaxConnections", "1", "1"), ("MaxConnections", "0", "Reject"),
    ("MaxConnections", "65536", "Reject"),
    ("MaxBurstLength", "1048576", "1048576"), ("MaxBurstLength", "16777215", "16777215"),
    ("MaxBurstLength", "16777216", "Reject"), ("MaxBurstLength", "511", "Reject"),
    ("MaxBurstLength", "512", "512"),
    ("FirstBurstLength", "65536", "65536"), ("FirstBurstLength", "16777215", "262144"),
    ("FirstBurstLength", "100", "Reject"),
    ("DefaultTime2Retain", "5", "5"), ("DefaultTime2Retain", "60", "20"), ("DefaultTime2Retain", "3601", "Reject"),
    ("MaxOutstandingR2T", "64", "16"), ("MaxOutstandingR2T", "4", "4"), ("MaxOutstandingR2T", "0", "Reject"),
    ("ErrorRecoveryLevel", "2", "0"), ("ErrorRecoveryLevel", "0", "0"), ("ErrorRecoveryLevel", "3", "Reject"),
    ("iSCSIProtocolLevel", "2", "1"), ("iSCSIProtocolLevel", "0", "0"), ("iSCSIProtocolLevel", "32", "Reject"),
    # numerical maximum
    ("DefaultTime2Wait", "0", "2"), ("DefaultTime2Wait", "10", "10"), ("DefaultTime2Wait", "3600", "3600"),
    ("DefaultTime2Wait", "3601", "Reject"),
    # number syntax: decimal and 0x hex only
    ("MaxBurstLength", "0x10000", "65536"), ("MaxBurstLength", "0X200", "512"), ("MaxBurstLength", "+4096", "Reject"),
    ("MaxBurstLength", " 4096", "Reject"), ("MaxBurstLength", "4_096", "Reject"), ("MaxBurstLength", "", "Reject"),
    ("MaxBurstLength", "0b AAA=", "Reject"), ("MaxBurstLength", "99999999999999999999999", "Reject"),
    # boolean OR (ours: InitialR2T No, DataPDUInOrder/DataSequenceInOrder Yes)
    ("InitialR2T", "No", "No"), ("InitialR2T", "Yes", "Yes"), ("InitialR2T", "yes", "Reject"),
    ("DataPDUInOrder", "No", "Yes"), ("DataPDUInOrder", "Yes", "Yes"),
    ("DataSequenceInOrder", "No", "Yes"), ("DataSequenceInOrder", "Maybe", "Reject"),
    # boolean AND (ours: ImmediateData Yes, RDMAExtensions No)
    ("ImmediateData", "Yes", "Yes"), ("ImmediateData", "No", "No"), ("ImmediateData", "1", "Reject"),
    ("RDMAExtensions", "Yes", "No"), ("RDMAExtensions", "No", "No"),
    # lists: first of the initiator's list that we support
    ("HeaderDigest", "CRC32C,None", "CRC32C"), ("HeaderDigest", "None,CRC32C", "None"),
    ("HeaderDigest", "MD5,None", "None"), ("HeaderDigest", "MD5", "Reject"), ("HeaderDigest", "crc32c", "Reject"),
    ("DataDigest", "CRC32C", "CRC32C"), ("DataDigest", "None", "None"),
    ("TaskReporting", "FastAbort,RFC3720", "RFC3720"), ("TaskReporting", "ResponseFence", "Reject"),
    # declaratives: no answer; bad values rejected
    ("MaxRecvDataSegmentLength", "65536", None), ("MaxRecvDataSegmentLength", "511", "Reject"),
    ("MaxRecvDataSegmentLength", "16777216", "Reject"), ("MaxRecvDataSegmentLength", "x", "Reject"),
    ("InitiatorAlias", "my host", None),
    # target-only keys sent by the initiator
    ("TargetAlias", "x", "Reject"), ("TargetAddress", "1.2.3.4:3260,1", "Reject"),
    ("TargetPortalGroupTag", "1", "Reject"),
    # FFP-only key during login
    ("SendTargets", "All", "Irrelevant"),
    # obsolete markers (RFC 7143 13.25): never NotUnderstood
    ("IFMarker", "No", "No"), ("OFMarker", "Yes", "No"), ("OFMarker", "bogus", "Reject"),
    ("IFMarkInt", "2048~8192", "Reject"), ("OFMarkInt", "1", "Reject"),
    # iSER keys without RDMAExtensions
    ("TargetRecvDataSegmentLength", "8192", "Irrelevant"), ("InitiatorRecvDataSegmentLength", "8192", "Irrelevant"),
    ("MaxAHSLength", "256", "Irrelevant"), ("TaggedBufferForSolicitedDataOnly", "No", "Irrelevant"),
    ("iSERHelloRequired", "No", "Irrelevant"),
    # extensions and unknown keys
    ("X-com.example.Foo", "1", "NotUnderstood"), ("X#org.example.bar", "1", "NotUnderstood"),
    ("SomethingNew", "1", "NotUnderstood"),
    # RFC 7143 13.26: a declarative, informational key
    ("X#NodeArchitecture", "ExampleOS/v1234,ExampleInc_SW_Initiator/1.05a", None),
    # a reply constant is no offer: ignored
    ("MaxBurstLength", "NotUnderstood", None), ("ImmediateData", "Irrelevant", None),
]


@pytest.mark.parametrize("key,offer,expect", CASES)
def test_key_answer(key, offer, expect):
    n = Negotiator()
    out = n.respond([(key, offer)])
    assert out == ([] if expect is None else [(key, expect)])


def test_every_table_key_has_a_case_or_is_security():
    covered = {k for k, _o, _e in CASES} | {"TargetName", "InitiatorName", "SessionType"}
    for name, kd in KEYS.items():
        assert kd.kind is Kind.SECURITY or name in covered, name


def test_result_stored_in_session_params():
    n = Negotiator()
    n.respond([("MaxBurstLength", "1048576"), ("FirstBurstLength", "524288"), ("InitialR2T", "No"),
               ("ImmediateData", "No"), ("MaxOutstandingR2T", "4"), ("DefaultTime2Wait", "5"),
               ("DefaultTime2Retain", "0"), ("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"),
               ("MaxRecvDataSegmentLength", "131072"), ("X-a", "b")])
    p = n.session_params()
    assert p == SessionParams(max_connections=1, initial_r2t=False, immediate_data=False, max_burst_length=1048576,
                              first_burst_length=262144, default_time2wait=5, default_time2retain=0,
                              max_outstanding_r2t=4, header_digest=True, data_digest=True, max_recv_dsl=262144,
                              max_xmit_dsl=131072, extra={"X-a": "b"})


def test_unnegotiated_keys_keep_rfc_defaults():
    p = Negotiator().session_params()
    assert p == SessionParams(max_recv_dsl=262144)
    assert DEFAULTS["MaxBurstLength"] == str(p.max_burst_length)


def test_first_burst_clamped_by_max_burst_in_same_request():
    n = Negotiator()
    out = dict(n.respond([("FirstBurstLength", "131072"), ("MaxBurstLength", "65536")]))
    assert out == {"FirstBurstLength": "65536", "MaxBurstLength": "65536"}


def test_first_burst_irrelevant_without_unsolicited_data():
    n = Negotiator()
    out = n.respond([("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "No")])
    assert out[0] == ("FirstBurstLength", "Irrelevant")
    # response order follows the request even though FirstBurstLength is decided last
    assert [k for k, _ in out] == ["FirstBurstLength", "InitialR2T", "ImmediateData"]


def test_our_values_are_configurable():
    ours = TargetValues(max_burst_length=65536, max_outstanding_r2t=1, initial_r2t=True, immediate_data=False,
                        header_digests=("None",))
    n = Negotiator(ours)
    out = dict(n.respond([("MaxBurstLength", "262144"), ("MaxOutstandingR2T", "8"), ("InitialR2T", "No"),
                          ("ImmediateData", "Yes"), ("HeaderDigest", "CRC32C,None")]))
    assert out == {"MaxBurstLength": "65536", "MaxOutstandingR2T": "1", "InitialR2T": "Yes",
                   "ImmediateData": "No", "HeaderDigest": "None"}
    assert n.declarations() == [("MaxRecvDataSegmentLength", "262144")]


DISCOVERY_IRRELEVANT = ["MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "TaskReporting",
                        "iSCSIProtocolLevel"]


@pytest.mark.parametrize("key", DISCOVERY_IRRELEVANT)
def test_session_keys_irrelevant_in_discovery(key):
    n = Negotiator(session_type="Discovery")
    assert n.respond([(key, "1")]) == [(key, "Irrelevant")]


@pytest.mark.parametrize("key,offer,expect", [("HeaderDigest", "CRC32C", "CRC32C"),
                                              ("ErrorRecoveryLevel", "1", "0"),
                                              ("DefaultTime2Wait", "1", "2")])
def test_connection_keys_relevant_in_discovery(key, offer, expect):
    assert Negotiator(session_type="Discovery").respond([(key, offer)]) == [(key, expect)]


@pytest.mark.parametrize("key", [k for k, kd in KEYS.items() if kd.use.name == "LO" and kd.sender != "T"
                                 and kd.kind not in (Kind.DECLARATIVE, Kind.SECURITY)])
def test_leading_only_keys_irrelevant_on_other_connections(key):
    assert Negotiator(leading=False).respond([(key, "1")]) == [(key, "Irrelevant")]


@pytest.mark.parametrize("key,offer,expect", [
    ("MaxRecvDataSegmentLength", "16384", None),
    ("InitiatorAlias", "renamed", None),
    ("HeaderDigest", "None", "Reject"),  # login-only keys are not renegotiable
    ("MaxBurstLength", "4096", "Reject"),
    ("X-foo", "1", "NotUnderstood"),
])
def test_ffp_renegotiation(key, offer, expect):
    n = Negotiator()
    out = n.respond([(key, offer)], ffp=True)
    assert out == ([] if expect is None else [(key, expect)])


def test_ffp_declaration_recorded():
    n = Negotiator()
    n.respond([("MaxRecvDataSegmentLength", "16384")], ffp=True)
    assert n.session_params().max_xmit_dsl == 16384


def test_value_length_limits():
    n = Negotiator()
    assert n.respond([("InitiatorAlias", "a" * 256)]) == [("InitiatorAlias", "Reject")]
    assert n.respond([("InitiatorAlias", "a" * 255)]) == []
    assert n.respond([("HeaderDigest", "None," * 60)]) == [("HeaderDigest", "Reject")]


def test_extra_keys_bounded():
    n = Negotiator()
    n.respond([(f"X-k{i}", "v" * 300) for i in range(100)])
    assert len(n.extra) == 32 and all(len(v) == 255 for v in n.extra.values())


# --- text parsing -------------------------------------------------------------------------


def test_parse_pairs_roundtrip_and_empty_items():
    pairs = [("A", "1"), ("B.c-d+e@f_g", ""), ("C", "x=y")]
    assert parse_pairs(encode_pairs(pairs)) == pairs
    assert parse_pairs(b"A=1\0\0\0B=2\0") == [("A", "1"), ("B", "2")]
    assert parse_pairs(b"") == []
    assert parse_pairs(b"X#NodeArchitecture=a\0X-com.example.k=b\0") == [("X#NodeArchitecture", "a"),
                                                                         ("X-com.example.k", "b")]


@pytest.mark.parametrize("data", [b"A=1", b"A\0", b"=1\0", b"K" * 64 + b"=1\0", b"A B=1\0", b"A=\xc3\0",
                                  b"\xc3\xa9=1\0"])
def test_parse_pairs_errors(data):
    with pytest.raises(TextError):
        parse_pairs(data)


def test_key_name_63_bytes_ok():
    assert parse_pairs(b"K" * 63 + b"=1\0") == [("K" * 63, "1")]


def test_duplicates():
    seen: set[str] = set()
    check_duplicates([("A", "1"), ("B", "2")], seen)
    with pytest.raises(TextError):
        check_duplicates([("A", "3")], seen)
    check_duplicates([("MaxRecvDataSegmentLength", "8192"), ("MaxRecvDataSegmentLength", "4096")], seen)


@pytest.mark.parametrize("text,value", [("0", 0), ("42", 42), ("0x2A", 42), ("0xffffffffffffffff", 2**64 - 1),
                                        ("18446744073709551616", None), ("-1", None), ("0x", None), ("4.0", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value
