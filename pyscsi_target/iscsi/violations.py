"""The rules an initiator can break, each with the section of the standard that states it.

Every Reject the connection sends, every login it refuses and every CHECK CONDITION the
initiator caused names one ``Rule``: the daemon log line carries it, and so does the
session's violation report (``Violations``, shown by the API).  Strict mode (per target)
refuses what the default mode tolerates for interoperability; the rules that only strict
mode enforces are marked ``strict``.

RFC section numbers are RFC 7143's; the SCSI rules' are SAM-5/SPC-4/SBC-3's
(``scsi_rule`` maps a sense key and additional sense code to one).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypedDict

from ..values import LoginStatus


@dataclass(frozen=True, slots=True)
class Rule:
    """One requirement of a standard: where it is written and what it says."""

    section: str  # e.g. "RFC 7143 11.3.1"
    text: str  # the requirement, in one line
    strict: bool = False  # enforced only on targets in strict mode

    def __str__(self) -> str:
        return f"{self.section}: {self.text}"


def _r(section: str, text: str, strict: bool = False) -> Rule:
    return Rule(f"RFC 7143 {section}", text, strict)


# --- full feature phase: what a Reject answers ----------------------------------------------

ITT_IN_USE = _r("11.2.1.8", "the Initiator Task Tag must identify one task session-wide and must not be 0xffffffff")
UNSOLICITED_WITHOUT_WRITE = _r("11.3.1", "F=0 announces unsolicited Data-Out, which only a write (W=1) can carry")
RESERVED_TASK_ATTRIBUTE = _r("11.3.1", "task attributes 5-7 are reserved", strict=True)
SNACK_AT_ERL0 = _r("11.16", "SNACK asks for retransmission, which ErrorRecoveryLevel 0 does not provide (13.20)")
UNKNOWN_OPCODE = _r("11.2.1.2", "the opcode is not one an initiator may send")
NOT_IN_FULL_FEATURE_PHASE = _r("11.2.1.2", "a target opcode, or a Login Request after the login phase")
DISCOVERY_ONLY_TEXT = _r("13.21", "a Discovery session carries only Text (SendTargets), NOP and Logout requests")
DATA_OUT_NO_TASK = _r("11.7.4", "a Data-Out must name a command that is still waiting for data")
UNSOLICITED_NOT_ALLOWED = _r("13.10", "unsolicited Data-Out needs InitialR2T=No, and stops at FirstBurstLength "
                                      "(13.14)")
DATA_OUT_UNKNOWN_TTT = _r("11.7.4", "the Target Transfer Tag must be the one of an R2T still open")
DATA_OUT_OUT_OF_ORDER = _r("11.7.5", "DataSN and Buffer Offset must continue the sequence in order, within the "
                                     "burst (DataPDUInOrder=Yes, 13.18)")
DATA_OUT_SHORT_BURST = _r("11.7.1", "F=1 closes a sequence only after all the data the R2T (or FirstBurstLength) "
                                    "asked for")
OVERSIZED_SEGMENT = _r("13.12", "a data segment must not exceed the receiver's MaxRecvDataSegmentLength")
DATA_DIGEST = _r("7.8", "the data digest (CRC32C) did not match the data segment")
HEADER_DIGEST = _r("7.8", "the header digest (CRC32C) did not match: the byte stream cannot be trusted")
NOP_PING_WITH_TTT = _r("11.18.2", "an initiator's own NOP-Out (ITT set) carries TTT 0xffffffff")
NOP_UNKNOWN_TTT = _r("11.18.2", "a NOP-Out with a TTT must answer a NOP-In ping that carried it", strict=True)
NOP_REPLY_NOT_IMMEDIATE = _r("11.18.1", "a NOP-Out with ITT 0xffffffff must have the I bit set", strict=True)
LOGOUT_REASON = _r("11.14.1", "the reason code must be 0, 1 or 2")
TEXT_F_AND_C = _r("11.10.2", "the F and C bits of a Text Request must not both be 1")
TEXT_UNKNOWN_TTT = _r("11.10.4", "a Text Request continuing an exchange must echo the TTT the target sent")
TEXT_CONTINUATION = _r("11.10.2", "a request fetching the rest of a long answer must be empty")
TEXT_MALFORMED = _r("6.1", "text is key=value pairs, NUL-terminated, each key offered once per negotiation (6.3)")
TEXT_TOO_LONG = _r("6.1", "the text of one negotiation exceeds what the target accepts (64 KiB)")

# --- login: what a Login reject answers --------------------------------------------------------

LOGIN_NOT_LOGIN_PDU = _r("6.2", "only Login Requests are valid before the login completes")
LOGIN_VERSION = _r("11.12.4", "Version-min/Version-max must include version 0x00")
LOGIN_IDENTITY_CHANGED = _r("6.3", "ISID, TSIH and CID stay the same over one login")
LOGIN_T_AND_C = _r("11.12.2", "the T and C bits must not both be 1")
LOGIN_STAGE = _r("11.12.3", "CSG must be the current stage, and T=1 may only move forward to NSG 1 or 3")
LOGIN_TOO_LONG = _r("6.1", "the login text is limited (64 KiB here), each data segment to 8192 bytes (13.12)")
LOGIN_CONTINUATION = _r("11.12.2", "a request fetching the rest of a long login response must be empty")
LOGIN_REDECLARED = _r("6.3", "a key may not be declared or negotiated twice in one login")
LOGIN_IDENTITY_REPEATED = _r("6.3", "InitiatorName, TargetName and SessionType are declared once, in the first "
                                    "request (13.4, 13.5, 13.21)", strict=True)
LOGIN_REDECLARED_STRICT = _r("6.3", "a declarative key may not be declared again in one login", strict=True)
LOGIN_NO_INITIATOR_NAME = _r("13.5", "the first Login Request must carry InitiatorName")
LOGIN_NO_TARGET_NAME = _r("13.4", "the first Login Request of a Normal session must carry TargetName")
LOGIN_BAD_NAME = _r("4.2.7", "an iSCSI name is iqn.yyyy-mm.reversed-domain[:id], eui. + 16 or naa. + 16/32 hex "
                             "digits")
LOGIN_BAD_NAME_STRICT = _r("4.2.7", "an iSCSI name is in the normalised form: lower case, "
                                    "iqn.yyyy-mm.reversed-domain[:id], eui. + 16 or naa. + 16/32 hex digits",
                           strict=True)
LOGIN_ISID_RESERVED = _r("11.12.5", "ISID type 11b (T field of its first byte) is reserved", strict=True)
LOGIN_SESSION_TYPE = _r("13.21", "SessionType is Normal or Discovery")
LOGIN_SECURITY_KEY_LATE = _r("6.3.2", "security keys belong to the security stage (CSG 0)")
LOGIN_KEY_TOO_LONG = _r("6.1", "a key's value is at most 255 bytes (CHAP_C and CHAP_R: 8192)")
LOGIN_AUTH_REQUIRED = _r("6.3.2", "this target requires authentication, which the initiator did not offer or skipped")
LOGIN_AUTH_FAILED = _r("12.1.3", "the CHAP exchange failed")
LOGIN_NOT_AUTHORIZED = _r("11.13.5", "the initiator is not allowed access to this target (0x0202)")
LOGIN_TARGET_NOT_FOUND = _r("11.13.5", "no target of that name is served through this portal (0x0203)")
LOGIN_TARGET_REMOVED = _r("11.13.5", "the target has been removed (0x0204)")
LOGIN_NO_SUCH_SESSION = _r("11.13.5", "a login naming a TSIH must join a session that exists, with the same "
                                    "initiator, ISID and target")
LOGIN_TOO_MANY_CONNECTIONS = _r("13.2", "MaxConnections is 1: a session has one connection")

# The initiator-caused login statuses and the rule each names when the refusal gave none.
_LOGIN_DEFAULTS: dict[int, Rule] = {
    LoginStatus.INITIATOR_ERROR: _r("11.13.5", "the login request broke the protocol (0x0200)"),
    LoginStatus.AUTHENTICATION_FAILURE: LOGIN_AUTH_FAILED,
    LoginStatus.AUTHORIZATION_FAILURE: LOGIN_NOT_AUTHORIZED,
    LoginStatus.NOT_FOUND: LOGIN_TARGET_NOT_FOUND,
    LoginStatus.TARGET_REMOVED: LOGIN_TARGET_REMOVED,
    LoginStatus.UNSUPPORTED_VERSION: LOGIN_VERSION,
    LoginStatus.TOO_MANY_CONNECTIONS: LOGIN_TOO_MANY_CONNECTIONS,
    LoginStatus.MISSING_PARAMETER: _r("11.13.5", "a required key is missing (0x0207)"),
    LoginStatus.CANT_INCLUDE_IN_SESSION: _r("11.13.5", "this connection cannot join that session (0x0208)"),
    LoginStatus.SESSION_TYPE_NOT_SUPPORTED: LOGIN_SESSION_TYPE,
    LoginStatus.SESSION_DOES_NOT_EXIST: LOGIN_NO_SUCH_SESSION,
    LoginStatus.INVALID_DURING_LOGIN: LOGIN_NOT_LOGIN_PDU,
}


def login_rule(status: int, rule: Rule | None) -> Rule | None:
    """The rule a Login reject cites: the refusal's own, else the status's (None for a
    redirect or a target error: those are not the initiator's doing)."""
    return rule if rule is not None else _LOGIN_DEFAULTS.get(status)


# --- SCSI: CHECK CONDITIONs the initiator caused ------------------------------------------------

ILLEGAL_REQUEST = 0x5
ABORTED_COMMAND = 0xB

_SCSI: dict[tuple[int, int, int], Rule] = {
    (ILLEGAL_REQUEST, 0x20, 0x00): Rule("SPC-4 4.5.6", "INVALID COMMAND OPERATION CODE: the logical unit does not "
                                                      "implement this operation code (REPORT SUPPORTED OPERATION "
                                                      "CODES lists those it does)"),
    (ILLEGAL_REQUEST, 0x21, 0x00): Rule("SBC-3 4.5", "LOGICAL BLOCK ADDRESS OUT OF RANGE: the blocks addressed "
                                                    "must lie within the capacity READ CAPACITY reports"),
    (ILLEGAL_REQUEST, 0x24, 0x00): Rule("SPC-4 4.5.2.4.2", "INVALID FIELD IN CDB"),
    (ILLEGAL_REQUEST, 0x25, 0x00): Rule("SAM-5 4.7", "LOGICAL UNIT NOT SUPPORTED: no logical unit at this LUN "
                                                    "(REPORT LUNS lists them)"),
    (ILLEGAL_REQUEST, 0x26, 0x00): Rule("SPC-4 4.5.2.4.2", "INVALID FIELD IN PARAMETER LIST"),
    (ILLEGAL_REQUEST, 0x26, 0x02): Rule("SPC-4 4.5.6", "PARAMETER VALUE INVALID"),
    (ILLEGAL_REQUEST, 0x1A, 0x00): Rule("SPC-4 4.5.6", "PARAMETER LIST LENGTH ERROR: the parameter list length "
                                                      "does not fit the parameter data the command defines"),
    (ILLEGAL_REQUEST, 0x49, 0x00): Rule("SAM-5 5.9.2", "INVALID MESSAGE ERROR: the ACA task attribute (or NACA=1) "
                                                      "with no ACA condition, which is never established here"),
    (ILLEGAL_REQUEST, 0x2C, 0x00): Rule("SPC-4 4.5.6", "COMMAND SEQUENCE ERROR: the command is out of sequence "
                                                      "with the ones before it"),
    (ABORTED_COMMAND, 0x0C, 0x0C): Rule("RFC 7143 11.4.7.2", "UNEXPECTED UNSOLICITED DATA: data sent that the "
                                                            "target did not solicit and may not accept (13.10, "
                                                            "13.11)"),
    (ABORTED_COMMAND, 0x0C, 0x0D): Rule("RFC 7143 11.4.7.2", "NOT ENOUGH UNSOLICITED DATA: the data sent does not "
                                                            "add up to what the command announced"),
    (ABORTED_COMMAND, 0x47, 0x05): Rule("RFC 7143 11.4.7.2", "PROTOCOL SERVICE CRC ERROR: a data digest failed, "
                                                            "and ErrorRecoveryLevel 0 cannot recover the data"),
    (ABORTED_COMMAND, 0x4E, 0x00): Rule("SAM-5 5.9.3", "OVERLAPPED COMMANDS ATTEMPTED: a task tag still in use "
                                                      "on this I_T nexus"),
}


def parse_sense(sense: bytes) -> tuple[int, int, int, bytes] | None:
    """(key, asc, ascq, sense-key-specific bytes or b"") of fixed or descriptor sense data."""
    if len(sense) < 4:
        return None
    if sense[0] & 0x7F in (0x72, 0x73):
        sks = b""
        off = 8
        while off + 2 <= len(sense):
            dtype, dlen = sense[off], sense[off + 1]
            if dtype == 0x02 and dlen >= 6 and off + 7 <= len(sense):
                sks = sense[off + 4 : off + 7]
            off += 2 + dlen
        return sense[1] & 0xF, sense[2], sense[3], sks
    if len(sense) < 14:
        return None
    return sense[2] & 0xF, sense[12], sense[13], sense[15:18] if len(sense) >= 18 else b""


def scsi_rule(sense: bytes, cdb: bytes = b"") -> Rule | None:
    """The rule behind a CHECK CONDITION the initiator caused; None for conditions of the
    logical unit itself (unit attentions, medium errors, not ready...)."""
    parsed = parse_sense(sense)
    if parsed is None:
        return None
    key, asc, ascq, sks = parsed
    rule = _SCSI.get((key, asc, ascq))
    if rule is None:
        if key != ILLEGAL_REQUEST:
            return None
        rule = Rule("SPC-4 4.5.6", f"ILLEGAL REQUEST, ASC/ASCQ {asc:02x}h/{ascq:02x}h")
    if len(sks) == 3 and sks[0] & 0x80 and asc in (0x20, 0x24, 0x26):
        # The sense-key-specific field pointer says which byte (and bit) was wrong.
        where = "CDB" if sks[0] & 0x40 else "parameter list"
        byte = int.from_bytes(sks[1:3], "big")
        bit = f" bit {sks[0] & 7}" if sks[0] & 0x08 else ""
        value = f" (= {cdb[byte]:#04x})" if where == "CDB" and byte < len(cdb) else ""
        rule = Rule(rule.section, f"{rule.text}: {where} byte {byte}{bit}{value}")
    return rule


# --- the per-session report --------------------------------------------------------------------


class ViolationInfo(TypedDict):
    time: float  # Unix time
    section: str
    rule: str
    strict: bool
    action: str  # what the target did: "Reject (protocol error)", "CHECK CONDITION 05/24/00", "login 0x0200"
    pdu: str  # the offending PDU or command, briefly


@dataclass(frozen=True, slots=True)
class Violation:
    rule: Rule
    action: str
    pdu: str
    at: float

    def info(self) -> ViolationInfo:
        return {"time": self.at, "section": self.rule.section, "rule": self.rule.text, "strict": self.rule.strict,
                "action": self.action, "pdu": self.pdu}


class Violations:
    """The last ``limit`` violations of one session (or of the daemon's logins), and a count of all."""

    __slots__ = ("_recent", "total")

    def __init__(self, limit: int = 64) -> None:
        self._recent: deque[Violation] = deque(maxlen=limit)
        self.total = 0

    def add(self, rule: Rule, action: str, pdu: str) -> Violation:
        v = Violation(rule, action, pdu, time.time())
        self._recent.append(v)
        self.total += 1
        return v

    def __iter__(self) -> Iterator[Violation]:
        return iter(self._recent)

    def __len__(self) -> int:
        return len(self._recent)
