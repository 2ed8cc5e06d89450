"""The session registry: every live session, by TSIH and by I_T nexus identity.

A login completes here (``bind``): a leading login gets a new TSIH and an I_T nexus on
the target's SCSI layer; one with the initiator name, ISID and target of a live session
first ends that session (session reinstatement, RFC 7143 6.3.5); one naming a live TSIH
replaces the session's connection (connection reinstatement at ErrorRecoveryLevel 0:
the old connection's tasks end, the session stays).  MaxConnections is 1, so a second
connection with another CID is refused.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..iscsi.connection import Connection
from ..iscsi.events import ABORT_TASKS, ANNOUNCE_DROP
from ..iscsi.params import LoginReject, LoginResult, TargetResets
from ..iscsi.scsi_layer import ScsiLayer
from ..iscsi.session import Session, SessionInfo
from ..iscsi.stats import IoStats, SessionCounters
from ..iscsi.write_budget import WriteBudget
from ..scsi.task import Nexus
from ..values import LoginStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TargetPort:
    """What a Normal session's I_T nexus binds to: the target node through one portal group."""

    iqn: str
    device: ScsiLayer
    portal_group_tag: int
    read_only: bool  # the access config admitted this initiator read-only
    resets: TargetResets  # the target's reset permissions (the engine's, updated in place)
    io_stats: dict[int, IoStats] = field(default_factory=dict)  # the target's per-LUN counters


def _isid_key(initiator_name: str, isid: int, target_iqn: str) -> tuple[str, int, str]:
    return initiator_name.lower(), isid, target_iqn.lower()  # iSCSI names compare case-insensitively


class SessionRegistry:
    def __init__(self, queue_depth: int, close_connection: Callable[[Connection], None],
                 write_budget: WriteBudget | None = None) -> None:
        self.queue_depth = queue_depth
        # Every Normal session's write buffers come out of this one daemon-wide budget.
        self.write_budget = write_budget if write_budget is not None else WriteBudget()
        self._close_connection = close_connection  # the adapter flushes and closes the socket
        self.by_tsih: dict[int, Session] = {}
        self._by_isid: dict[tuple[str, int, str], Session] = {}
        self._tsih = itertools.count(1)
        self._nexus_ids = itertools.count(1)
        # Daemon-wide counts (metrics): sessions begun, and the rare-event counters of the
        # sessions that ended (those of live sessions are added when read: totals()).
        self.started: dict[str, int] = {}  # session type -> count
        self._retired = SessionCounters()

    def bind(self, result: LoginResult, port: TargetPort | None) -> Session:
        """complete_login: a new session, a reinstated one, or connection reinstatement.
        ``port`` is None for a Discovery session and for a login naming a TSIH."""
        target_iqn = result.target.iqn if result.target else ""
        if result.tsih:
            s = self.by_tsih.get(result.tsih)
            if s is None or s.initiator_name != result.initiator_name or s.isid != result.isid or (
                (s.target.iqn if s.target else "") != target_iqn
            ):
                raise LoginReject(LoginStatus.SESSION_DOES_NOT_EXIST, "session does not exist")
            conn = s.connection
            if conn is not None and conn.cid != result.cid:
                raise LoginReject(LoginStatus.TOO_MANY_CONNECTIONS, "too many connections")  # MaxConnections=1
            if conn is not None:
                s.connection = None
                conn.handle(ABORT_TASKS)
                self._close_connection(conn)
            return s
        if result.session_type == "Normal":
            old = self._by_isid.get(_isid_key(result.initiator_name, result.isid, target_iqn))
            if old is not None:
                # Session reinstatement: the old I_T nexus is gone with all its tasks.
                log.info("reinstating session of %s isid %012x", result.initiator_name, result.isid)
                self.close(old, announce=False)
        tsih = self._new_tsih()
        nexus = device = resets = None
        if port is not None:
            resets = port.resets
            nexus = Nexus(
                nexus_id=next(self._nexus_ids),
                initiator_name=result.initiator_name,
                isid=result.isid,
                target_name=port.iqn,
                portal_group_tag=port.portal_group_tag,
                read_only=port.read_only,
            )
            device = port.device
            device.add_nexus(nexus)
        s = Session(result, tsih, nexus, device, queue_depth=self.queue_depth,
                    peers=functools.partial(self.of_target, target_iqn),
                    io_stats=port.io_stats if port is not None else None,
                    writes=self.write_budget.account() if port is not None else None, resets=resets)
        self.by_tsih[tsih] = s
        self.started[result.session_type] = self.started.get(result.session_type, 0) + 1
        if result.session_type == "Normal":
            self._by_isid[_isid_key(result.initiator_name, result.isid, target_iqn)] = s
        return s

    def _new_tsih(self) -> int:
        while True:
            t = next(self._tsih) & 0xFFFF
            if t and t not in self.by_tsih:
                return t
            if t == 0xFFFF:
                self._tsih = itertools.count(1)

    def of_target(self, iqn: str) -> list[Session]:
        return [s for s in self.by_tsih.values() if s.target is not None and s.target.iqn == iqn]

    def close(self, s: Session, announce: bool) -> None:
        """End a session: its connection goes, its tasks are aborted, the nexus is lost."""
        conn = s.connection
        if conn is not None:
            if announce:
                conn.handle(ANNOUNCE_DROP)
            conn.handle(ABORT_TASKS)
            self._close_connection(conn)
        self.ended(s)

    def ended(self, s: Session) -> None:
        if s.closed:
            return
        s.closed = True
        self._retired.add(s.counters)
        s.writes.close()
        if self.by_tsih.get(s.tsih) is s:
            del self.by_tsih[s.tsih]
        key = _isid_key(s.initiator_name, s.isid, s.target.iqn if s.target else "")
        if self._by_isid.get(key) is s:
            del self._by_isid[key]
        if s.device is not None and s.nexus is not None:
            try:
                s.device.nexus_lost(s.nexus)
            except Exception:  # noqa: BLE001
                log.exception("nexus_lost failed")

    def connection_closed(self, conn: Connection) -> None:
        s = conn.session
        if s.connection is conn:
            # MaxConnections=1: losing the connection ends the session at ERL 0.
            s.connection = None
            self.ended(s)

    def cold_reset(self, iqn: str) -> None:
        """After TARGET COLD RESET: every connection of the target is dropped."""
        for s in self.of_target(iqn):
            if s.connection is not None:
                self._close_connection(s.connection)

    def end_all(self) -> None:
        for s in list(self.by_tsih.values()):
            self.ended(s)

    def describe(self) -> list[SessionInfo]:
        return [s.describe() for s in self.by_tsih.values()]

    def totals(self) -> SessionCounters:
        """Every session's rare-event counters, ended ones included."""
        out = SessionCounters()
        out.add(self._retired)
        for s in self.by_tsih.values():
            out.add(s.counters)
        return out
