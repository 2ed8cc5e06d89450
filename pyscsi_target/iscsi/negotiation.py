"""Text-key negotiation (RFC 7143 sections 5-6 and 13), sans-IO.

``KEYS`` is the table of every key the target knows, each with its result function,
where it may be used and its valid range.  ``Negotiator`` answers one connection's
offers in login (and renegotiation in full feature phase) and produces the typed
``SessionParams`` the engine runs with.

Answering rules implemented here (RFC 7143 6.2-6.6, 13):

- numerical keys: result = min/max(initiator's offer, our value); bad syntax or out of
  range -> ``Reject`` (the RFC default then stays in force);
- boolean keys: AND / OR of the offer with our value; anything but Yes/No -> Reject;
- list keys: the first value of the initiator's list that we support; none -> Reject;
- declarative keys: no answer (we record them); the target declares its own
  MaxRecvDataSegmentLength (``declarations``);
- unknown keys, X- and X# extension keys -> ``NotUnderstood``, except the RFC's own
  declarative X#NodeArchitecture (13.26), which is recorded in ``extra``;
- keys irrelevant in the context (session keys of a Discovery session, leading-only
  keys on a non-leading connection, FFP-only keys in login, iSER keys without
  RDMAExtensions, FirstBurstLength with InitialR2T=Yes and ImmediateData=No) ->
  ``Irrelevant``;
- login-only keys offered in full feature phase and target-only keys sent by the
  initiator -> ``Reject``;
- obsoleted RFC 3720 markers (RFC 7143 13.25): IFMarker/OFMarker -> ``No`` (the RFC's
  permitted alternative to Reject that RFC 3720 initiators understand best),
  IFMarkInt/OFMarkInt -> ``Reject``; never NotUnderstood;
- a key name longer than 63 bytes or with characters outside [A-Za-z0-9.-+@_#], a pair
  without '=', a text that is not NUL-terminated, and a key offered twice in one login
  (or one text negotiation; only the declaratives in ``REDECLARABLE`` may repeat) are
  protocol errors (``TextError``): login answers 0x0200, a Text request gets a Reject PDU;
- values longer than 255 bytes (CHAP_C/CHAP_R: 8192) -> Reject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..values import MAX_ISCSI_NAME
from .params import SessionParams, TargetValues

MAX_KEY_NAME = 63
MAX_VALUE = 255
MAX_LARGE_VALUE = 8192
# RFC 7143 13.10-13.14: the numerical range of the data-segment and burst lengths.
MIN_DSL, MAX_DSL = 512, (1 << 24) - 1

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"
_ANSWER_CONSTANTS = (NOT_UNDERSTOOD, IRRELEVANT, REJECT)

# standard-label characters plus '#' for the X#/Y#/Z# public extension formats (RFC 7143 6.1, 13.22).
_KEY_RE = re.compile(rb"[A-Za-z0-9.\-+@_#]+")
_DEC_RE = re.compile(r"[0-9]{1,20}")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]{1,16}")


class TextError(Exception):
    """A malformed text segment or a protocol violation in the key exchange."""


class Kind(Enum):
    DECLARATIVE = "declarative"
    MIN = "numerical minimum"
    MAX = "numerical maximum"
    AND = "boolean AND"
    OR = "boolean OR"
    LIST = "list"
    SECURITY = "security"  # AuthMethod and the CHAP keys: the login machine answers them
    MARKER = "obsolete marker"  # IFMarker / OFMarker
    MARKINT = "obsolete marker interval"  # IFMarkInt / OFMarkInt
    ISER = "iSER only"  # meaningful only with RDMAExtensions=Yes, which we never accept


class Use(Enum):
    IO = "login only"  # RFC 'IO': initialize only
    LO = "leading connection login only"
    ALL = "login and full feature phase"
    FFPO = "full feature phase only"


@dataclass(frozen=True)
class KeyDef:
    name: str
    kind: Kind
    use: Use
    sender: str = "IT"  # "I": initiator only, "T": target only, "IT": both
    lo: int = 0
    hi: int = 0
    values: tuple[str, ...] = ()  # list keys: the values we support
    discovery_irrelevant: bool = False
    max_len: int = MAX_VALUE


_D, _LO, _IO, _ALL = Kind.DECLARATIVE, Use.LO, Use.IO, Use.ALL
KEYS: dict[str, KeyDef] = {
    k.name: k
    for k in (
        # RFC 7143 13.1-13.26 (and 12 for the security keys).
        KeyDef("X#NodeArchitecture", _D, _LO),
        KeyDef("HeaderDigest", Kind.LIST, _IO),
        KeyDef("DataDigest", Kind.LIST, _IO),
        KeyDef("MaxConnections", Kind.MIN, _LO, lo=1, hi=65535, discovery_irrelevant=True),
        KeyDef("SendTargets", _D, Use.FFPO, sender="I"),
        KeyDef("TargetName", _D, _IO, sender="I", max_len=MAX_ISCSI_NAME),
        KeyDef("InitiatorName", _D, _IO, sender="I", max_len=MAX_ISCSI_NAME),
        KeyDef("TargetAlias", _D, _ALL, sender="T"),
        KeyDef("InitiatorAlias", _D, _ALL, sender="I"),
        KeyDef("TargetAddress", _D, _ALL, sender="T"),
        KeyDef("TargetPortalGroupTag", _D, _IO, sender="T", lo=0, hi=65535),
        KeyDef("InitialR2T", Kind.OR, _LO, discovery_irrelevant=True),
        KeyDef("ImmediateData", Kind.AND, _LO, discovery_irrelevant=True),
        KeyDef("MaxRecvDataSegmentLength", _D, _ALL, lo=MIN_DSL, hi=MAX_DSL),
        KeyDef("MaxBurstLength", Kind.MIN, _LO, lo=MIN_DSL, hi=MAX_DSL, discovery_irrelevant=True),
        KeyDef("FirstBurstLength", Kind.MIN, _LO, lo=MIN_DSL, hi=MAX_DSL, discovery_irrelevant=True),
        KeyDef("DefaultTime2Wait", Kind.MAX, _LO, lo=0, hi=3600),
        KeyDef("DefaultTime2Retain", Kind.MIN, _LO, lo=0, hi=3600),
        KeyDef("MaxOutstandingR2T", Kind.MIN, _LO, lo=1, hi=65535, discovery_irrelevant=True),
        KeyDef("DataPDUInOrder", Kind.OR, _LO, discovery_irrelevant=True),
        KeyDef("DataSequenceInOrder", Kind.OR, _LO, discovery_irrelevant=True),
        KeyDef("ErrorRecoveryLevel", Kind.MIN, _LO, lo=0, hi=2),
        KeyDef("SessionType", _D, _LO, sender="I"),
        KeyDef("TaskReporting", Kind.LIST, _LO, values=("RFC3720",), discovery_irrelevant=True),
        KeyDef("iSCSIProtocolLevel", Kind.MIN, _LO, lo=0, hi=31, discovery_irrelevant=True),
        KeyDef("IFMarker", Kind.MARKER, _IO),
        KeyDef("OFMarker", Kind.MARKER, _IO),
        KeyDef("IFMarkInt", Kind.MARKINT, _IO),
        KeyDef("OFMarkInt", Kind.MARKINT, _IO),
        # RFC 7145 (iSER): RDMAExtensions is a boolean AND we always answer No.
        KeyDef("RDMAExtensions", Kind.AND, _LO),
        KeyDef("TargetRecvDataSegmentLength", Kind.ISER, _IO),
        KeyDef("InitiatorRecvDataSegmentLength", Kind.ISER, _IO),
        KeyDef("MaxAHSLength", Kind.ISER, _LO),
        KeyDef("TaggedBufferForSolicitedDataOnly", Kind.ISER, _LO),
        KeyDef("iSERHelloRequired", Kind.ISER, _LO),
        # Security stage (RFC 7143 12): answered by login.py / chap.py.
        KeyDef("AuthMethod", Kind.SECURITY, _IO, sender="I"),
        KeyDef("CHAP_A", Kind.SECURITY, _IO),
        KeyDef("CHAP_I", Kind.SECURITY, _IO),
        KeyDef("CHAP_C", Kind.SECURITY, _IO, max_len=MAX_LARGE_VALUE),
        KeyDef("CHAP_N", Kind.SECURITY, _IO),
        KeyDef("CHAP_R", Kind.SECURITY, _IO, max_len=MAX_LARGE_VALUE),
    )
}

# The RFC 7143 default of each operational key, for `results` lookups.
DEFAULTS: dict[str, str] = {
    "HeaderDigest": "None", "DataDigest": "None", "MaxConnections": "1", "InitialR2T": "Yes",
    "ImmediateData": "Yes", "MaxRecvDataSegmentLength": "8192", "MaxBurstLength": "262144",
    "FirstBurstLength": "65536", "DefaultTime2Wait": "2", "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": "1", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": "0", "TaskReporting": "RFC3720", "iSCSIProtocolLevel": "1",
    "RDMAExtensions": "No",
}

# Login identity declaratives: never answered, whatever the connection.
_IDENTITY_KEYS = frozenset(("InitiatorName", "TargetName", "SessionType"))
# We implement RFC 7143 (iSCSIProtocolLevel 1): no FastAbort/ResponseFence (RFC 7144 level 2).
OUR_PROTOCOL_LEVEL = 1
# Cap on extension/unknown keys kept in SessionParams.extra (observability only).
_MAX_EXTRA = 32


def is_security_key(key: str) -> bool:
    kd = KEYS.get(key)
    return kd is not None and kd.kind is Kind.SECURITY


def parse_pairs(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Split a complete text/login data segment into (key, value) pairs (RFC 7143 6.1).

    Raises TextError for anything malformed: missing terminating NUL, an item without
    '=', an empty or over-long key name, characters outside the key-name alphabet, or a
    value that is not UTF-8.  Empty items (consecutive NULs) are ignored."""
    raw = bytes(data)
    if not raw:
        return []
    if raw[-1] != 0:
        raise TextError("text data is not NUL-terminated")
    out: list[tuple[str, str]] = []
    for item in raw[:-1].split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise TextError(f"text item without '=': {item[:64]!r}")
        if len(key) > MAX_KEY_NAME or not _KEY_RE.fullmatch(key):
            raise TextError(f"invalid key name {key[:80]!r}")
        try:
            sval = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"value of {key.decode()} is not UTF-8") from e
        out.append((key.decode("ascii"), sval))
    return out


def encode_pairs(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(k.encode() + b"=" + v.encode() + b"\0" for k, v in pairs)


def parse_number(value: str) -> int | None:
    """numerical-value of RFC 7143 5.1: decimal or 0x-hex, below 2**64; None if invalid."""
    if _DEC_RE.fullmatch(value):
        n = int(value, 10)
    elif _HEX_RE.fullmatch(value):
        n = int(value[2:], 16)
    else:
        return None
    return n if n < (1 << 64) else None


class Negotiator:
    """One connection's operational negotiation (login) or one session's FFP renegotiation.

    ``respond(pairs)`` answers a complete set of offers and returns the response pairs
    (declaratives get none).  Security keys must be filtered out by the caller;
    InitiatorName/TargetName/SessionType are validated by the login machine (here they
    are only recorded).  ``session_params()`` turns the results into SessionParams."""

    def __init__(self, ours: TargetValues | None = None, *, leading: bool = True,
                 session_type: str = "Normal") -> None:
        self.ours = ours or TargetValues()
        self.leading = leading
        self.session_type = session_type
        self.results: dict[str, str] = {}  # agreed values of negotiated keys
        self.declared: dict[str, str] = {}  # the initiator's declarations
        self.extra: dict[str, str] = {}

    # -- helpers --
    def value(self, key: str) -> str:
        return self.results.get(key, self.declared.get(key, DEFAULTS.get(key, "")))

    def _our_number(self, key: str) -> int:
        o = self.ours
        return {
            "MaxConnections": o.max_connections,
            "MaxBurstLength": o.max_burst_length,
            "FirstBurstLength": o.first_burst_length,
            "DefaultTime2Wait": o.default_time2wait,
            "DefaultTime2Retain": o.default_time2retain,
            "MaxOutstandingR2T": o.max_outstanding_r2t,
            "ErrorRecoveryLevel": o.error_recovery_level,
            "iSCSIProtocolLevel": OUR_PROTOCOL_LEVEL,
        }[key]

    def _our_bool(self, key: str) -> bool:
        o = self.ours
        return {
            "InitialR2T": o.initial_r2t,
            "ImmediateData": o.immediate_data,
            "DataPDUInOrder": o.data_pdu_in_order,
            "DataSequenceInOrder": o.data_sequence_in_order,
            "RDMAExtensions": False,
        }[key]

    def _our_list(self, kd: KeyDef) -> tuple[str, ...]:
        if kd.name == "HeaderDigest":
            return self.ours.header_digests
        if kd.name == "DataDigest":
            return self.ours.data_digests
        return kd.values

    # -- answering --
    def respond(self, pairs: list[tuple[str, str]], *, ffp: bool = False) -> list[tuple[str, str]]:
        """Answer the offers in ``pairs`` (in order); FirstBurstLength is decided last
        because its relevance and bound depend on InitialR2T/ImmediateData/MaxBurstLength."""
        answers: list[tuple[str, str | None]] = []
        fbl_at = -1
        for key, value in pairs:
            if key == "FirstBurstLength" and fbl_at < 0:
                fbl_at = len(answers)
                answers.append((key, None))
                fbl_value = value
                continue
            answers.append((key, self._answer(key, value, ffp)))
        if fbl_at >= 0:
            answers[fbl_at] = ("FirstBurstLength", self._answer("FirstBurstLength", fbl_value, ffp))
        return [(k, v) for k, v in answers if v is not None]

    def _answer(self, key: str, value: str, ffp: bool) -> str | None:
        kd = KEYS.get(key)
        if kd is None:
            # Unknown, X- and X# extension keys (RFC 7143 6.2, 13.22).
            if len(self.extra) < _MAX_EXTRA:
                self.extra[key] = value[:MAX_VALUE]
            return NOT_UNDERSTOOD
        if value in _ANSWER_CONSTANTS:
            return None  # a reply constant is no offer (we offered nothing to reply to)
        if kd.kind is Kind.SECURITY:
            return IRRELEVANT  # only reachable outside the security stage via text
        if kd.sender == "T":
            return REJECT  # the initiator may not send target-only keys
        if key in _IDENTITY_KEYS:
            # Validated by the login machine; never answered (declaratives), not renegotiable.
            if ffp:
                return REJECT
            self.declared[key] = value
            return None
        if ffp and kd.use not in (Use.ALL, Use.FFPO):
            return REJECT
        if not ffp and kd.use is Use.FFPO:
            return IRRELEVANT
        if self.session_type == "Discovery" and kd.discovery_irrelevant:
            return IRRELEVANT
        if kd.use is Use.LO and not self.leading:
            return None if kd.kind is Kind.DECLARATIVE else IRRELEVANT
        if len(value.encode()) > kd.max_len:
            return REJECT
        kind = kd.kind
        if kind is Kind.DECLARATIVE:
            return self._declare(kd, value)
        if kind is Kind.MIN or kind is Kind.MAX:
            n = parse_number(value)
            if n is None or not kd.lo <= n <= kd.hi:
                return REJECT
            ours = self._our_number(key)
            res = min(n, ours) if kind is Kind.MIN else max(n, ours)
            if key == "FirstBurstLength":
                if self.value("InitialR2T") == "Yes" and self.value("ImmediateData") == "No":
                    return IRRELEVANT
                # RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
                res = min(res, int(self.value("MaxBurstLength")))
            self.results[key] = str(res)
            return str(res)
        if kind is Kind.AND or kind is Kind.OR:
            if value not in ("Yes", "No"):
                return REJECT
            offer = value == "Yes"
            ours_b = self._our_bool(key)
            res_b = (offer and ours_b) if kind is Kind.AND else (offer or ours_b)
            self.results[key] = "Yes" if res_b else "No"
            return self.results[key]
        if kind is Kind.LIST:
            supported = self._our_list(kd)
            for item in value.split(","):
                if item in supported:
                    self.results[key] = item
                    return item
            return REJECT
        if kind is Kind.MARKER:
            return "No" if value in ("Yes", "No") else REJECT
        if kind is Kind.MARKINT:
            return REJECT
        # Kind.ISER: RDMAExtensions is never Yes here.
        return IRRELEVANT

    def _declare(self, kd: KeyDef, value: str) -> str | None:
        key = kd.name
        if key == "MaxRecvDataSegmentLength":
            n = parse_number(value)
            if n is None or not kd.lo <= n <= kd.hi:
                return REJECT
            self.declared[key] = str(n)
            return None
        if key == "X#NodeArchitecture" and len(self.extra) < _MAX_EXTRA:
            self.extra[key] = value  # informational (RFC 7143 13.26)
        self.declared[key] = value  # InitiatorAlias, X#NodeArchitecture
        return None

    def declarations(self) -> list[tuple[str, str]]:
        """What the target declares in operational negotiation."""
        return [("MaxRecvDataSegmentLength", str(self.ours.max_recv_dsl))]

    def session_params(self) -> SessionParams:
        v = self.value
        mbl = int(v("MaxBurstLength"))
        return SessionParams(
            max_connections=int(v("MaxConnections")),
            initial_r2t=v("InitialR2T") == "Yes",
            immediate_data=v("ImmediateData") == "Yes",
            max_burst_length=mbl,
            first_burst_length=min(int(v("FirstBurstLength")), mbl),
            default_time2wait=int(v("DefaultTime2Wait")),
            default_time2retain=int(v("DefaultTime2Retain")),
            max_outstanding_r2t=int(v("MaxOutstandingR2T")),
            data_pdu_in_order=v("DataPDUInOrder") == "Yes",
            data_sequence_in_order=v("DataSequenceInOrder") == "Yes",
            error_recovery_level=int(v("ErrorRecoveryLevel")),
            header_digest=v("HeaderDigest") == "CRC32C",
            data_digest=v("DataDigest") == "CRC32C",
            max_recv_dsl=self.ours.max_recv_dsl,
            max_xmit_dsl=int(v("MaxRecvDataSegmentLength")),
            extra=dict(self.extra),
        )


# Declaratives that may be re-declared (the last value counts): the UNH/Calsoft reading of
# RFC 7143 6.3's "except for ... keys that explicitly allow repeated key declarations", plus
# the purely informational ones.  Negotiated keys offered twice stay a protocol error.
REDECLARABLE = frozenset(("MaxRecvDataSegmentLength", "InitiatorAlias", "X#NodeArchitecture"))


def check_duplicates(pairs: list[tuple[str, str]], seen: set[str]) -> None:
    """RFC 7143 6.3: a key may be offered once per login / text negotiation."""
    for key, _v in pairs:
        if key in seen and key not in REDECLARABLE:
            raise TextError(f"key {key} offered twice")
        seen.add(key)
