"""Contract between login/negotiation and the full-feature-phase machine and engine.

The login machine (login.py) is sans-IO: it takes LoginRequest PDUs and returns
LoginResponse PDUs.  What it needs from the outside world (which targets exist, who
may log in, CHAP secrets, TSIH assignment) it asks a ``LoginPolicy``, which the engine
implements per accepted connection.  On success it leaves a ``LoginResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..values import LoginStatus
from .violations import Rule


class LoginReject(Exception):  # noqa: N818 - it is a status, not only an error
    """Ends a login with a status other than success (RFC 7143 11.13.5).  ``rule`` is the
    requirement the initiator broke (None: the status's generic one, or not its doing)."""

    def __init__(self, status: LoginStatus, reason: str = "", pairs: list[tuple[str, str]] | None = None,
                 rule: Rule | None = None) -> None:
        super().__init__(reason or f"login status {status:#06x}")
        self.status = status
        # Keys sent with the reject, e.g. TargetAddress for a redirect (class 0x01).
        self.pairs = pairs or []
        self.rule = rule


@dataclass(frozen=True, slots=True)
class ChapCredential:
    """One CHAP credential of an auth group: the initiator's user/secret and, for mutual
    CHAP, the name/secret the target answers with."""

    user: str
    secret: str
    peeruser: str = ""
    peersecret: str = ""


@dataclass
class SessionParams:
    """Negotiated operational values (RFC 7143 section 13), typed.  Defaults are the RFC's."""

    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    # Connection-scoped
    header_digest: bool = False
    data_digest: bool = False
    max_recv_dsl: int = 8192  # what we declared: the largest data segment we accept
    max_xmit_dsl: int = 8192  # the initiator's MaxRecvDataSegmentLength: the largest we may send
    # Extensions many initiators send; kept for observability.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class TargetResets:
    """Which target-wide resets the target's initiators may ask for (TARGET WARM / COLD RESET
    task management).  The engine keeps one per target and changes it in place, so a live
    session follows the configuration."""

    warm: bool = False
    cold: bool = False


@dataclass
class TargetInfo:
    """What the engine tells the login machine about one target node."""

    target_id: int
    iqn: str
    alias: str | None
    auth_method: str  # "None", "Auto", "CHAP", "CHAP Mutual" (of the target group serving this portal)
    credentials: list[ChapCredential]  # the auth group's credentials (CHAP user/secret, peer user/secret)
    # Strict mode: refuse what the default mode tolerates for interoperability (violations.py).
    strict: bool = False


@dataclass
class LoginResult:
    session_type: str  # "Normal" or "Discovery"
    initiator_name: str
    initiator_alias: str | None
    target: TargetInfo | None  # None for discovery
    isid: int
    tsih: int
    cid: int
    cmdsn: int  # the CmdSN the first FFP command will carry
    statsn: int  # the StatSN of the next response the target sends
    params: SessionParams
    # False when the login added/reinstated a connection of an existing session (TSIH != 0):
    # then only the connection-scoped fields of ``params`` were negotiated and the
    # session-wide ones must be taken from the existing session.
    leading: bool = True


@dataclass
class TargetValues:
    """What this target offers/declares in operational negotiation (our side of each key).

    The negotiated result is in ``SessionParams``; these are only our bounds:
    numerical-min keys end at min(initiator, ours), DefaultTime2Wait at max(...),
    InitialR2T (OR) and ImmediateData (AND) follow the initiator because we allow both.
    The FFP engine must size its receive path for ``max_recv_dsl`` (declared to every
    initiator as MaxRecvDataSegmentLength) and accept up to ``first_burst_length`` bytes of
    unsolicited data per command."""

    max_recv_dsl: int = 262144
    max_burst_length: int = 16 * 1024 * 1024
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 16
    max_connections: int = 1  # no MC/S: always negotiated down to 1
    initial_r2t: bool = False  # we accept unsolicited data if the initiator wants it
    immediate_data: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    data_pdu_in_order: bool = True  # we need in-order Data-Out PDUs and sequences
    data_sequence_in_order: bool = True
    header_digests: tuple[str, ...] = ("CRC32C", "None")  # values we accept, any order
    data_digests: tuple[str, ...] = ("CRC32C", "None")


class LoginPolicy(Protocol):
    """Implemented by the engine for each accepted connection (peer address known there)."""

    portal_group_tag: int

    def lookup_target(self, name: str) -> TargetInfo | None:
        """None -> 0x0203 target not found (not served on this portal group either)."""

    def initiator_allowed(self, target: TargetInfo, initiator_name: str) -> bool:
        """Initiator group (names + networks) and access config; False -> 0x0202."""

    def discovery_auth(self) -> tuple[str, list[ChapCredential]]:
        """The portal group's discovery auth method and its auth group's credentials."""

    def complete_login(self, result: LoginResult) -> int:
        """Bind the new session (reinstating one with the same ISID) or add a connection.

        Called just before the final login response; returns the TSIH to put in it, or
        raises LoginReject (e.g. 0x020a session does not exist, 0x0206 too many
        connections)."""

    def send_targets(self, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        """SendTargets: (iqn, ["addr:port,tpgt", ...]) for each target visible to the initiator.

        ``which`` is "All", a target name, or "" (the session's own target)."""
