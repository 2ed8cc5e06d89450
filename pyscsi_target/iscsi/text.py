"""Full-feature-phase Text requests (RFC 7143 6.2, 11.10-11.11, Appendix C), sans-IO.

Three entry points, from the key level up:

``answer_text(pairs, policy=..., session_type=..., initiator_name=..., target_iqn=...,
negotiator=...) -> pairs``
    Answers one complete request's keys.  In a Discovery session ``SendTargets=All`` lists
    every target the initiator may see, ``SendTargets=<iqn>`` that target (nothing if it is
    not visible) and ``SendTargets=`` nothing.  In a Normal session every form reports only
    the session's own target (RFC 3720 appendix D, kept by RFC 7143: an operational session
    MUST NOT return other targets), and a foreign name gets nothing.  Each target gives
    ``TargetName=`` then one ``TargetAddress=addr:port,tpgt`` per portal, from
    ``policy.send_targets``.  Other keys go through ``Negotiator.respond(ffp=True)``:
    MaxRecvDataSegmentLength and InitiatorAlias may be redeclared, login-only keys get
    ``Reject``, unknown/X- keys ``NotUnderstood``.  A key repeated within one negotiation
    raises ``TextError`` (protocol error).

``ffp_text_handler(conn, pairs) -> pairs``
    The keys of one single-PDU request of a connection (``TextConnection``: its session,
    policy and max_xmit; the connection frames, splits and stamps).  Never raises: a repeated key is
    answered ``Reject``.  A redeclared MaxRecvDataSegmentLength updates
    ``conn.session.params.max_xmit_dsl`` and ``conn.max_xmit``.

``TextHandler(policy, session_type=..., initiator_name=..., target_iqn=..., params=...)``
    The whole PDU-level exchange for one connection::

        rsps = handler.receive(text_request)   # -> [TextResponse] or [Reject]

    The caller stamps StatSN/ExpCmdSN/MaxCmdSN on the returned PDU (exactly one per
    request, so one StatSN each) and does the CmdSN bookkeeping.  Handled here: C=1
    requests are acknowledged with an empty F=0 response carrying a TTT and accumulated
    (64 KiB cap); answers longer than ``params.max_xmit_dsl`` go out in pieces with C=1,
    F=0 and a TTT, each fetched by an empty request echoing that TTT; an answer to an
    F=0 request is sent with F=0 and a TTT (RFC 7143 11.11.1: F=1 only answers F=1); a
    new request with TTT 0xffffffff resets a pending exchange; an unknown TTT -> Reject
    (invalid PDU field); F and C both set, malformed text, a repeated key or an
    oversized request -> Reject (protocol error).  A redeclared MaxRecvDataSegmentLength
    is applied to ``params.max_xmit_dsl`` when the exchange completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..values import MAX_ISCSI_NAME
from . import violations as V
from .negotiation import (
    REJECT,
    Negotiator,
    TextError,
    check_duplicates,
    encode_pairs,
    parse_pairs,
)
from .params import LoginPolicy, SessionParams, TargetInfo, TargetValues
from .pdu import RESERVED_TAG, Reject, RejectReason, TextRequest, TextResponse

MAX_TEXT = 64 * 1024


def send_targets_pairs(policy: LoginPolicy | None, initiator_name: str, which: str) -> list[tuple[str, str]]:
    """TargetName/TargetAddress pairs of what ``policy`` shows (nothing without a policy)."""
    out: list[tuple[str, str]] = []
    if policy is None:
        return out
    for iqn, addrs in policy.send_targets(initiator_name, which):
        out.append(("TargetName", iqn))
        out.extend(("TargetAddress", a) for a in addrs)
    return out


def answer_text(pairs: list[tuple[str, str]], *, policy: LoginPolicy | None, session_type: str, initiator_name: str,
                target_iqn: str | None, negotiator: Negotiator,
                seen: set[str] | None = None) -> list[tuple[str, str]]:
    """Answer one complete Text request (see the module docstring)."""
    check_duplicates(pairs, seen if seen is not None else set())
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key != "SendTargets":
            out += negotiator.respond([(key, value)], ffp=True)
            continue
        if len(value.encode()) > MAX_ISCSI_NAME:
            out.append((key, REJECT))
            continue
        if session_type == "Discovery":
            if value == "":
                continue  # a discovery session has no target of its own to describe
            which = value  # "All" or one target name
        else:
            # RFC 3720 App. D / RFC 7143: an operational session reports only the target it
            # is logged in to, whatever it asks ("All", its own name or nothing).
            if not target_iqn or value not in ("", "All", target_iqn):
                continue
            which = target_iqn
        out += send_targets_pairs(policy, initiator_name, which)
    return out


class _TextSession(Protocol):
    discovery: bool
    initiator_name: str
    params: SessionParams
    target: TargetInfo | None


class TextConnection(Protocol):
    """What ``ffp_text_handler`` reads and updates of a connection."""

    @property
    def session(self) -> _TextSession: ...

    policy: LoginPolicy | None
    max_xmit: int


def ffp_text_handler(conn: TextConnection, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A connection's text hook (see the module docstring)."""
    s = conn.session
    discovery = s.discovery
    neg = Negotiator(TargetValues(), session_type="Discovery" if discovery else "Normal")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        if key in seen:
            out.append((key, REJECT))  # offered twice in one request: refuse the repeat
            continue
        seen.add(key)
        target = s.target
        out += answer_text([(key, value)], policy=conn.policy, session_type="Discovery" if discovery else "Normal",
                           initiator_name=s.initiator_name, target_iqn=target.iqn if target else None,
                           negotiator=neg)
    mrdsl = neg.declared.get("MaxRecvDataSegmentLength")
    if mrdsl is not None:
        s.params.max_xmit_dsl = int(mrdsl)
        conn.max_xmit = int(mrdsl)
    return out


@dataclass
class _Exchange:
    itt: int
    ttt: int = RESERVED_TAG
    rx: bytearray = field(default_factory=bytearray)
    tx_rest: bytes = b""
    tx_final: bool = True  # the F bit of the last piece of the current answer
    seen: set[str] = field(default_factory=set)


class TextHandler:
    """One connection's FFP text exchanges at PDU level (see the module docstring)."""

    def __init__(self, policy: LoginPolicy | None, *, session_type: str, initiator_name: str, target_iqn: str | None,
                 params: SessionParams, values: TargetValues | None = None) -> None:
        self.policy = policy
        self.session_type = session_type
        self.initiator_name = initiator_name
        self.target_iqn = target_iqn
        self.params = params
        self.values = values or TargetValues()
        self._ex: _Exchange | None = None
        self._neg: Negotiator | None = None
        self._ttt = 0
        self.rule: V.Rule | None = None

    def _next_ttt(self) -> int:
        self._ttt = (self._ttt + 1) & 0x7FFFFFFF or 1
        return self._ttt

    def _reject(self, pdu: TextRequest, reason: RejectReason, rule: V.Rule) -> list[TextResponse | Reject]:
        self._ex = None
        self.rule = rule
        return [Reject(reason=reason, data=pdu.raw_header())]

    def receive(self, pdu: TextRequest) -> list[TextResponse | Reject]:
        """One Text Request in, one TextResponse (or Reject) out, unstamped.  After a Reject,
        ``rule`` is the requirement the request broke."""
        self.rule = None
        try:
            return self._receive(pdu)
        except TextError:
            return self._reject(pdu, RejectReason.PROTOCOL_ERROR, V.TEXT_MALFORMED)

    def _receive(self, pdu: TextRequest) -> list[TextResponse | Reject]:
        if pdu.final and pdu.cont:
            return self._reject(pdu, RejectReason.PROTOCOL_ERROR, V.TEXT_F_AND_C)
        ex = self._ex
        if pdu.ttt != RESERVED_TAG:
            if ex is None or ex.itt != pdu.itt or ex.ttt != pdu.ttt:
                return self._reject(pdu, RejectReason.INVALID_PDU_FIELD, V.TEXT_UNKNOWN_TTT)
        elif ex is not None and not (ex.itt == pdu.itt and ex.rx):
            ex = None  # a new request (TTT 0xffffffff) resets the pending negotiation
        if ex is None:
            ex = self._ex = _Exchange(itt=pdu.itt)
            self._neg = Negotiator(self.values, session_type=self.session_type)
        if ex.tx_rest:
            if pdu.data or pdu.cont:
                return self._reject(pdu, RejectReason.PROTOCOL_ERROR, V.TEXT_CONTINUATION)
            return [self._next_piece(pdu, ex)]
        if len(ex.rx) + len(pdu.data) > MAX_TEXT:
            return self._reject(pdu, RejectReason.PROTOCOL_ERROR, V.TEXT_TOO_LONG)
        ex.rx += pdu.data
        if pdu.cont:
            ex.ttt = self._next_ttt()
            return [self._piece(pdu, ex, b"", more=True)]
        pairs = parse_pairs(bytes(ex.rx))
        ex.rx.clear()
        assert self._neg is not None
        answer = answer_text(pairs, policy=self.policy, session_type=self.session_type,
                             initiator_name=self.initiator_name, target_iqn=self.target_iqn,
                             negotiator=self._neg, seen=ex.seen)
        ex.tx_rest = encode_pairs(answer)
        ex.tx_final = bool(pdu.final)
        return [self._next_piece(pdu, ex)]

    def _next_piece(self, pdu: TextRequest, ex: _Exchange) -> TextResponse:
        size = max(512, self.params.max_xmit_dsl)
        chunk, ex.tx_rest = ex.tx_rest[:size], ex.tx_rest[size:]
        more = bool(ex.tx_rest)
        if more or not ex.tx_final:
            ex.ttt = self._next_ttt()
            return self._piece(pdu, ex, chunk, more=more)
        # The negotiation is over: apply what the initiator redeclared.
        self._ex = None
        if self._neg is not None:
            mrdsl = self._neg.declared.get("MaxRecvDataSegmentLength")
            if mrdsl is not None:
                self.params.max_xmit_dsl = int(mrdsl)
        return TextResponse(final=True, cont=False, itt=pdu.itt, ttt=RESERVED_TAG, lun=pdu.lun, data=chunk)

    def _piece(self, pdu: TextRequest, ex: _Exchange, chunk: bytes, *, more: bool) -> TextResponse:
        # F=0 pieces carry a TTT the initiator echoes to continue (RFC 7143 11.11.4).
        return TextResponse(final=False, cont=more and bool(chunk), itt=pdu.itt, ttt=ex.ttt, lun=pdu.lun, data=chunk)
