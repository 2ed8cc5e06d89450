"""Fault injection rules: what to break, for whom, how often and until when.

A rule has a kind (``KINDS``), a scope (target, initiator, session, LUN, SCSI opcode,
LBA range, and for transport faults the PDU kind it acts on), a trigger (skip the first
``after`` matches, fire at most ``count`` times, each time with ``probability``) and an
expiry.  The workbench's hooks (hooks.py) ask a rule whether it fires for a PDU or a
command; every firing is counted on the rule and by kind, logged, and kept in a short
log the API shows.

Where each kind acts (hooks.py):

- on input PDUs, before ``Connection.handle``: ``drop`` (an input ``pdu`` kind: the
  connection is dropped when the PDU arrives, the PDU unprocessed), ``delay`` (an input
  kind: handled ``delay_ms`` later; later input of the same task waits behind it),
  ``reject`` (answered with a Reject instead of being handled; its CmdSN is consumed),
  ``async`` (an Async Message goes out when the PDU arrives);
- on output PDUs, in ``WireOutput.emit``: ``drop`` (an output kind: the connection is
  dropped once the PDU is written), ``drop_mid_pdu`` (part of the PDU is written, then the
  connection is closed), ``delay`` (an output kind: sent ``delay_ms`` later; later output
  of the same task waits behind it, other PDUs go on), ``withhold`` (never sent),
  ``corrupt_header_digest`` / ``corrupt_data_digest`` (one bit of the digest flipped;
  only on connections that negotiated that digest), ``reorder_data_in`` (a command's
  Data-In PDUs go out last first), ``ignore_nop`` (the NOP-In answering an initiator's
  NOP-Out ping is never sent);
- on SCSI commands, at the session's SCSI layer: ``status`` (the command ends at once
  with ``status`` and, for CHECK CONDITION, the sense key/ASC/ASCQ: scoped to an LBA
  range, a bad-sector simulator), ``latency`` (the command reaches the logical unit
  ``delay_ms`` late, as if the backstore were that slow), ``hold`` (the command is kept
  until a task management function aborts it, or the session ends).
"""

from __future__ import annotations

import itertools
import logging
import random
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from ..iscsi.pdu import AsyncEvent, Op, RejectReason
from ..scsi.sbc import lba_len
from ..scsi.sense import BUSY, CHECK_CONDITION, RESERVATION_CONFLICT, TASK_SET_FULL, build_sense

log = logging.getLogger(__name__)

# PDU kinds by name: what an initiator sends, and what the target sends.
INPUT_PDUS: dict[str, int] = {
    "nop-out": Op.NOP_OUT, "scsi-command": Op.SCSI_CMD, "tmf": Op.TMF_REQ, "text": Op.TEXT_REQ,
    "data-out": Op.DATA_OUT, "logout": Op.LOGOUT_REQ, "snack": Op.SNACK,
}
OUTPUT_PDUS: dict[str, int] = {
    "nop-in": Op.NOP_IN, "scsi-response": Op.SCSI_RSP, "tmf-response": Op.TMF_RSP, "login-response": Op.LOGIN_RSP,
    "text-response": Op.TEXT_RSP, "data-in": Op.DATA_IN, "logout-response": Op.LOGOUT_RSP, "r2t": Op.R2T,
    "async": Op.ASYNC, "reject": Op.REJECT,
}
PDU_NAMES = {**{v: k for k, v in INPUT_PDUS.items()}, **{v: k for k, v in OUTPUT_PDUS.items()}, Op.LOGIN_REQ: "login"}

INPUT, OUTPUT, SCSI = "input", "output", "scsi"


@dataclass(frozen=True)
class KindSpec:
    seat: str  # INPUT, OUTPUT, SCSI, or "pdu" (decided by the rule's pdu kind)
    default_pdu: str | None  # the PDU kind when the rule names none
    pdus: tuple[str, ...]  # the PDU kinds it may act on
    default_count: int | None  # firings when ``count`` is not given (None: unlimited)
    doc: str


_ANY = tuple(INPUT_PDUS) + tuple(OUTPUT_PDUS)
KINDS: dict[str, KindSpec] = {
    "drop": KindSpec("pdu", "scsi-command", _ANY, 1, "drop the connection when a PDU of the kind arrives, or once "
                     "one is sent (how: reset or close)"),
    "drop_mid_pdu": KindSpec(OUTPUT, "data-in", tuple(OUTPUT_PDUS), 1, "write part of an outgoing PDU, then close the "
                             "connection"),
    "delay": KindSpec("pdu", "scsi-response", _ANY, None, "hold PDUs of the kind for delay_ms (input: before "
                      "handling it; output: before sending it)"),
    "withhold": KindSpec(OUTPUT, "scsi-response", tuple(OUTPUT_PDUS), None, "never send PDUs of the kind "
                         "(scsi-response also means a Data-In carrying status)"),
    "corrupt_header_digest": KindSpec(OUTPUT, "scsi-response", tuple(OUTPUT_PDUS), 1, "flip a bit of the header "
                                      "digest of an outgoing PDU (HeaderDigest=CRC32C connections)"),
    "corrupt_data_digest": KindSpec(OUTPUT, "data-in", tuple(OUTPUT_PDUS), 1, "flip a bit of the data digest of an "
                                    "outgoing PDU with data (DataDigest=CRC32C connections)"),
    "reorder_data_in": KindSpec(OUTPUT, "data-in", ("data-in",), None, "send the Data-In PDUs of a command in "
                                "reverse order"),
    "reject": KindSpec(INPUT, "scsi-command", tuple(INPUT_PDUS), 1, "answer an incoming PDU with a Reject instead "
                       "of handling it"),
    "ignore_nop": KindSpec(OUTPUT, "nop-in", ("nop-in",), None, "never answer an initiator's NOP-Out ping"),
    "status": KindSpec(SCSI, None, (), None, "end SCSI commands at once with a chosen status and sense (by LBA "
                       "range: a bad-sector simulator)"),
    "latency": KindSpec(SCSI, None, (), None, "SCSI commands reach the logical unit delay_ms late (a slow "
                        "backstore)"),
    "hold": KindSpec(SCSI, None, (), 1, "keep a SCSI command until it is aborted"),
    "async": KindSpec(INPUT, None, tuple(INPUT_PDUS), 1, "send an Async Message (event) when a PDU arrives (any "
                      "PDU when no pdu kind is given)"),
}

STATUSES = {"check_condition": CHECK_CONDITION, "busy": BUSY, "task_set_full": TASK_SET_FULL,
            "reservation_conflict": RESERVATION_CONFLICT}
ASYNC_EVENTS = {"logout": AsyncEvent.LOGOUT_REQUEST, "drop_connection": AsyncEvent.DROP_CONNECTION,
                "drop_all": AsyncEvent.DROP_ALL_CONNECTIONS, "renegotiate": AsyncEvent.RENEGOTIATE}
REJECT_REASONS = {r.name.lower(): r for r in RejectReason}
DROP_HOW = ("reset", "close")
MAX_RULES = 1000
MAX_DELAY_MS = 3_600_000
LOG_LENGTH = 256

# SCSI opcodes whose CDB lba_len reads as (LBA, blocks), and COMPARE AND WRITE's own layout.
_LBA_OPCODES = frozenset((0x08, 0x0A, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x41, 0x88, 0x8A, 0x8B, 0x8E, 0x8F, 0x90,
                          0x91, 0x93, 0xA8, 0xAA, 0xAE, 0xAF))
COMPARE_AND_WRITE = 0x89


def cdb_range(cdb: bytes) -> tuple[int, int] | None:
    """(first LBA, number of blocks) a CDB addresses, or None for a command without one."""
    if not cdb:
        return None
    op = cdb[0]
    try:
        if op in _LBA_OPCODES:
            return lba_len(cdb)
        if op == COMPARE_AND_WRITE:
            return struct.unpack_from(">Q", cdb, 2)[0], cdb[13]
    except (struct.error, IndexError):
        return None
    return None


class FaultError(ValueError):
    """A rule that cannot be: ``field`` names the offending field."""

    def __init__(self, fld: str, message: str) -> None:
        super().__init__(f"{fld}: {message}")
        self.field = fld
        self.message = message


@dataclass
class Scope:
    target: str | None = None  # target IQN, lower case
    initiator: str | None = None  # initiator name, lower case
    session: int | None = None  # TSIH
    lun: int | None = None
    opcode: int | None = None
    lba_first: int | None = None
    lba_last: int | None = None

    def matches_nexus(self, target: str | None, initiator: str | None, tsih: int | None) -> bool:
        """Could this scope include a connection of that identity?  An identity not yet known
        (None: early in the login) matches for now; the hooks ask again once it is."""
        if self.target is not None and target is not None and self.target != target.lower():
            return False
        if self.initiator is not None and initiator is not None and self.initiator != initiator.lower():
            return False
        return self.session is None or tsih is None or self.session == tsih

    def identity_known(self, target: str | None, initiator: str | None, tsih: int | None) -> bool:
        return not ((self.target is not None and target is None) or (self.initiator is not None and initiator is None)
                    or (self.session is not None and tsih is None))

    def matches_command(self, lun: int | None, cdb: bytes | None) -> bool:
        """LUN, opcode and LBA range, for a command (None: no command context: only a scope
        without these matches)."""
        if self.lun is not None and lun != self.lun:
            return False
        if self.opcode is not None and (not cdb or cdb[0] != self.opcode):
            return False
        if self.lba_first is not None:
            rng = cdb_range(cdb) if cdb else None
            if rng is None:
                return False
            first, n = rng
            last = self.lba_last if self.lba_last is not None else self.lba_first
            if first > last or first + max(n, 1) - 1 < self.lba_first:
                return False
        return True

    @property
    def needs_command(self) -> bool:
        return self.lun is not None or self.opcode is not None or self.lba_first is not None


_ids = itertools.count(1)


@dataclass
class FaultRule:
    kind: str
    scope: Scope
    pdu: str | None = None  # the PDU kind it acts on (transport kinds)
    after: int = 0  # matches to let pass before firing
    count: int | None = None  # firings at most (None: unlimited)
    probability: float = 1.0
    expires_at: float | None = None  # time.monotonic() deadline
    delay_ms: int = 0
    how: str = "reset"  # drop: TCP reset or an orderly close
    status: int = CHECK_CONDITION
    sense_key: int = 0
    asc: int = 0
    ascq: int = 0
    reason: RejectReason = RejectReason.PROTOCOL_ERROR
    event: AsyncEvent = AsyncEvent.LOGOUT_REQUEST
    wait: int = 5  # async: seconds given to log out / Time2Wait
    comment: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.time)
    matched: int = 0
    fired: int = 0
    last_fired: float | None = None

    @property
    def seat(self) -> str:
        spec = KINDS[self.kind]
        if spec.seat != "pdu":
            return spec.seat
        return INPUT if self.pdu in INPUT_PDUS else OUTPUT

    @property
    def opcode(self) -> int | None:
        """The iSCSI opcode of the PDU kind it acts on (None: any)."""
        if self.pdu is None:
            return None
        return INPUT_PDUS.get(self.pdu, OUTPUT_PDUS.get(self.pdu))

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now if now is not None else time.monotonic()) >= self.expires_at

    @property
    def spent(self) -> bool:
        return self.count is not None and self.fired >= self.count

    @property
    def active(self) -> bool:
        return not self.spent and not self.expired()

    def trigger(self) -> bool:
        """One matching PDU or command: does the rule fire for it?"""
        if not self.active:
            return False
        self.matched += 1
        if self.matched <= self.after:
            return False
        if self.probability < 1.0 and random.random() >= self.probability:  # noqa: S311 - not cryptographic
            return False
        self.fired += 1
        self.last_fired = time.time()
        return True

    def sense(self, cdb: bytes) -> bytes | None:
        """Fixed-format sense for CHECK CONDITION; scoped to an LBA range, the INFORMATION
        field holds the first LBA of the command inside the range (as a medium error reports
        the failing block)."""
        if self.status != CHECK_CONDITION:
            return None
        info = None
        rng = cdb_range(cdb) if self.scope.lba_first is not None else None
        if rng is not None and self.scope.lba_first is not None:
            info = max(rng[0], self.scope.lba_first)
        return build_sense(self.sense_key, (self.asc, self.ascq), False, info)

    def describe(self) -> dict[str, Any]:
        sc = self.scope
        out: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "pdu": self.pdu, "target": sc.target, "initiator": sc.initiator,
            "session": sc.session, "lun": sc.lun, "opcode": sc.opcode, "lba_first": sc.lba_first,
            "lba_last": sc.lba_last, "after": self.after, "count": self.count, "probability": self.probability,
            "expires_in": None if self.expires_at is None else max(0.0, round(self.expires_at - time.monotonic(), 3)),
            "delay_ms": self.delay_ms, "comment": self.comment, "created": self.created, "matched": self.matched,
            "fired": self.fired, "last_fired": self.last_fired,
            "state": "expired" if self.expired() else "spent" if self.spent else "active",
        }
        if self.kind == "drop":
            out["how"] = self.how
        if self.kind == "status":
            out["status"] = next((k for k, v in STATUSES.items() if v == self.status), self.status)
            if self.status == CHECK_CONDITION:
                out.update(sense_key=self.sense_key, asc=self.asc, ascq=self.ascq)
        if self.kind == "reject":
            out["reason"] = self.reason.name.lower()
        if self.kind == "async":
            out["event"] = next(k for k, v in ASYNC_EVENTS.items() if v == self.event)
            out["wait"] = self.wait
        return out

    def __str__(self) -> str:
        sc = self.scope
        parts = [f"#{self.id} {self.kind}"]
        for name in ("pdu",):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        for name in ("target", "initiator", "session", "lun", "opcode", "lba_first", "lba_last"):
            v = getattr(sc, name)
            if v is not None:
                parts.append(f"{name}={v:#04x}" if name == "opcode" else f"{name}={v}")
        return " ".join(parts)


# --- building a rule from a request ---------------------------------------------------------


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip():
        text = value.strip().lower()
        try:
            value = int(text, 16) if text.startswith("0x") else int(text)
        except ValueError:
            raise FaultError(name, "Enter a whole number.") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultError(name, "Enter a whole number.")
    if not lo <= value <= hi:
        raise FaultError(name, f"Enter a number from {lo} to {hi}.")
    return value


def _choice(body: dict[str, Any], name: str, choices: dict[str, Any] | tuple[str, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value.lower() not in choices:
        raise FaultError(name, f"Choose one of {', '.join(choices)}.")
    return choices[value.lower()] if isinstance(choices, dict) else value.lower()


FIELDS = ("kind", "pdu", "target", "initiator", "session", "lun", "opcode", "lba_first", "lba_last", "after",
          "count", "probability", "expires_in", "delay_ms", "how", "status", "sense_key", "asc", "ascq", "reason",
          "event", "wait", "comment")


def rule_from_request(body: dict[str, Any], resolve_target: Any = None) -> FaultRule:
    """A rule from the API's JSON (or the CLI's options); raises FaultError.

    ``resolve_target(name) -> iqn | None`` maps a target's short name to its IQN."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise FaultError(unknown[0], f"Unknown field; the fields are {', '.join(FIELDS)}.")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise FaultError("kind", f"Choose one of {', '.join(KINDS)}.")
    spec = KINDS[kind]
    pdu = body.get("pdu")
    if pdu is None:
        pdu = spec.default_pdu
    elif spec.seat == SCSI:
        raise FaultError("pdu", f"A {kind} rule acts on SCSI commands, not on a PDU kind.")
    elif not isinstance(pdu, str) or pdu.lower() not in spec.pdus:
        raise FaultError("pdu", f"A {kind} rule acts on one of {', '.join(spec.pdus)}.")
    else:
        pdu = pdu.lower()
    scope = Scope()
    target = body.get("target")
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise FaultError("target", "Enter a target name or IQN.")
        iqn = resolve_target(target.strip()) if resolve_target is not None else target.strip()
        if iqn is None:
            raise FaultError("target", f"No target {target.strip()!r}.")
        scope.target = iqn.lower()
    initiator = body.get("initiator")
    if initiator is not None:
        if not isinstance(initiator, str) or not initiator.strip():
            raise FaultError("initiator", "Enter an initiator name.")
        scope.initiator = initiator.strip().lower()
    scope.session = _int(body, "session", 1, 0xFFFF)
    scope.lun = _int(body, "lun", 0, 16383)
    scope.opcode = _int(body, "opcode", 0, 0xFF)
    scope.lba_first = _int(body, "lba_first", 0, (1 << 64) - 1)
    scope.lba_last = _int(body, "lba_last", 0, (1 << 64) - 1)
    if scope.lba_last is not None and scope.lba_first is None:
        raise FaultError("lba_first", "An LBA range needs its first LBA.")
    if scope.lba_first is not None and scope.lba_last is not None and scope.lba_last < scope.lba_first:
        raise FaultError("lba_last", "The last LBA comes before the first.")
    seat = KINDS[kind].seat if KINDS[kind].seat != "pdu" else (INPUT if pdu in INPUT_PDUS else OUTPUT)
    if scope.needs_command and seat != SCSI and pdu not in ("scsi-command", "data-out", "data-in", "r2t",
                                                               "scsi-response"):
        raise FaultError("pdu", "LUN, opcode and LBA scope a rule acting on SCSI commands or their PDUs.")
    rule = FaultRule(kind=kind, scope=scope, pdu=pdu)
    rule.after = _int(body, "after", 0, 1 << 32, 0) or 0
    count = _int(body, "count", 0, 1 << 32, spec.default_count)
    rule.count = count or None  # 0: unlimited
    prob = body.get("probability", 1.0)
    if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0.0 < float(prob) <= 1.0:
        raise FaultError("probability", "Enter a probability above 0 and at most 1.")
    rule.probability = float(prob)
    expires = body.get("expires_in")
    if expires is not None:
        if isinstance(expires, bool) or not isinstance(expires, int | float) or not 0 < expires <= 86400 * 7:
            raise FaultError("expires_in", "Enter seconds, above 0 and at most a week.")
        rule.expires_at = time.monotonic() + float(expires)
    delay = _int(body, "delay_ms", 0, MAX_DELAY_MS)
    if kind in ("delay", "latency"):
        if not delay:
            raise FaultError("delay_ms", f"A {kind} rule needs delay_ms (1 to {MAX_DELAY_MS}).")
        rule.delay_ms = delay
    elif delay is not None:
        raise FaultError("delay_ms", f"Only delay and latency rules take delay_ms, not {kind}.")
    if kind == "drop":
        rule.how = _choice(body, "how", DROP_HOW, "reset")
    if kind == "status":
        rule.status = _choice(body, "status", STATUSES, CHECK_CONDITION)
        if rule.status == CHECK_CONDITION:
            for name in ("sense_key", "asc"):
                if body.get(name) is None:
                    raise FaultError(name, "CHECK CONDITION needs sense_key and asc (ascq defaults to 0).")
            rule.sense_key = _int(body, "sense_key", 0, 0xF) or 0
            rule.asc = _int(body, "asc", 0, 0xFF) or 0
            rule.ascq = _int(body, "ascq", 0, 0xFF, 0) or 0
    if kind == "reject":
        rule.reason = _choice(body, "reason", REJECT_REASONS, RejectReason.PROTOCOL_ERROR)
    if kind == "async":
        rule.event = _choice(body, "event", ASYNC_EVENTS, AsyncEvent.LOGOUT_REQUEST)
        rule.wait = _int(body, "wait", 0, 3600, 5) or 0
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > 256:
        raise FaultError("comment", "At most 256 characters.")
    rule.comment = comment
    for name, kinds in (("how", ("drop",)), ("status", ("status",)), ("sense_key", ("status",)), ("asc", ("status",)),
                        ("ascq", ("status",)), ("reason", ("reject",)), ("event", ("async",)), ("wait", ("async",))):
        if body.get(name) is not None and kind not in kinds:
            raise FaultError(name, f"A {kind} rule takes no {name}.")
    return rule


# --- the rules in force and what they did --------------------------------------------------------


@dataclass(frozen=True)
class Firing:
    at: float
    rule: int
    kind: str
    session: int | None
    initiator: str | None
    target: str | None
    what: str

    def describe(self) -> dict[str, Any]:
        return {"time": self.at, "rule": self.rule, "kind": self.kind, "session": self.session,
                "initiator": self.initiator, "target": self.target, "what": self.what}


class FaultBoard:
    """The rules in force, and every firing (counted by kind; the last ones kept)."""

    def __init__(self) -> None:
        self.rules: dict[int, FaultRule] = {}
        self.fired_by_kind: Counter[str] = Counter()
        self.firings: deque[Firing] = deque(maxlen=LOG_LENGTH)

    def add(self, rule: FaultRule) -> FaultRule:
        if len(self.rules) >= MAX_RULES:
            raise FaultError("kind", f"At most {MAX_RULES} rules; remove some first.")
        self.rules[rule.id] = rule
        log.info("fault rule added: %s", rule)
        return rule

    def remove(self, rule_id: int) -> FaultRule | None:
        rule = self.rules.pop(rule_id, None)
        if rule is not None:
            log.info("fault rule removed: %s (fired %d times)", rule, rule.fired)
        return rule

    def clear(self) -> int:
        n = len(self.rules)
        self.rules.clear()
        if n:
            log.info("all %d fault rules removed", n)
        return n

    def active(self) -> list[FaultRule]:
        return [r for r in self.rules.values() if r.active]

    def next_expiry(self) -> float | None:
        times = [r.expires_at for r in self.rules.values() if r.expires_at is not None and r.active]
        return min(times) if times else None

    def fired(self, rule: FaultRule, session: int | None, initiator: str | None, target: str | None,
              what: str) -> None:
        self.fired_by_kind[rule.kind] += 1
        self.firings.append(Firing(time.time(), rule.id, rule.kind, session, initiator, target, what))
        log.info("fault #%d %s fired (%d/%s): session %s initiator %s: %s", rule.id, rule.kind, rule.fired,
                    rule.count if rule.count is not None else "-", session if session is not None else "-",
                    initiator or "-", what)
