"""The engine: reconciles the running target against a ConfigModel.

``Engine.apply(model)`` starts/stops portal listeners, creates one ScsiDevice per target
node with its LUN map, opens one LogicalUnit per extent (shared by every target mapping
it) and keeps the model for the next logins: who may log in, with what authentication,
and what SendTargets shows, are all decided from the model at login time.

Sessions live here too: TSIH assignment, session reinstatement (same initiator name,
ISID and target) and connection reinstatement (same TSIH and CID, ERL 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import model as M
from ..iscsi.params import LoginReject, LoginResult, TargetInfo
from ..iscsi.session import Session
from ..scsi.device import ScsiDevice
from ..scsi.lu import LogicalUnit
from ..scsi.persistence import StateStore
from ..scsi.registry import ScsiRegistry
from ..scsi.task import Nexus
from ..values import format_listen, parse_access_config, parse_initiator_names, parse_listen, parse_networks
from .logical_units import LogicalUnits

if TYPE_CHECKING:
    from .protocol import IscsiProtocol

log = logging.getLogger(__name__)

DEFAULT_PORT = 3260


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed I/O buffers in the heap instead of handing them back to the kernel.

    Every READ allocates its Data-In buffer and every WRITE its Data-Out buffer (tens or
    hundreds of KiB).  With glibc's defaults a freed chunk at the top of the heap is
    trimmed and the next allocation faults its pages in again: profiled here, that was
    20% of the CPU of 128 KiB sequential reads and cut their throughput by more than
    half.  Allocations up to 4 MiB stay in the heap and up to 64 MiB of free heap is
    kept.  glibc only; elsewhere this does nothing."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = bool(libc.mallopt(m_mmap_threshold, 4 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


class EngineError(OSError):
    """A configuration the engine cannot put into effect (e.g. a portal that cannot bind).

    An OSError so that callers treating bind failures as such (the daemon) see it."""


@dataclass
class TargetRuntime:
    target_id: int
    iqn: str
    device: ScsiDevice
    luns: dict[int, LogicalUnit] = field(default_factory=dict)  # as last given to the device


class Listener:
    """One listening socket of a portal group."""

    def __init__(self, engine: Engine, host: str, port: int, pg_id: int) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self.pg_id = pg_id
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        from .protocol import IscsiProtocol

        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: IscsiProtocol(self.engine, self),
                self.host or None,
                self.port,
                reuse_address=True,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_UNSPEC,
            )
        except OSError as e:
            raise EngineError(f"cannot listen on {format_listen(self.host, self.port)}: {e.strerror or e}") from e
        if self.port == 0 and self.server.sockets:
            self.port = self.server.sockets[0].getsockname()[1]
        log.info("listening on %s (portal group %d)", format_listen(self.host, self.port), self.pg_id)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            self.server = None
            log.info("stopped listening on %s", format_listen(self.host, self.port))


class PortalPolicy:
    """LoginPolicy for one accepted connection (RFC 7143 login decisions from the model)."""

    def __init__(self, engine: Engine, listener: Listener, peer_ip: str, local_ip: str, local_port: int) -> None:
        self.engine = engine
        self.listener = listener
        self.peer_ip = peer_ip
        self.local_ip = local_ip
        self.local_port = local_port
        pg = engine.model.portal_groups.get(listener.pg_id)
        self.portal_group_tag = pg.tag if pg else 1
        self.read_only = False
        self.session: Session | None = None

    # -- model views --
    def _model(self) -> M.ConfigModel:
        return self.engine.model

    def _target_groups_here(self, target_id: int) -> list[M.TargetGroup]:
        return [g for g in self._model().groups_of_target(target_id) if g.portal_group == self.listener.pg_id]

    def group_allows(self, tg: M.TargetGroup, initiator_name: str, peer_ip: str) -> bool:
        if tg.initiator_group is None:
            return True
        ig = self._model().initiator_groups.get(tg.initiator_group)
        if ig is None:
            return False  # a dangling reference admits nobody
        return parse_initiator_names(ig.initiators).allows(initiator_name) and parse_networks(
            ig.auth_network
        ).allows(peer_ip)

    # -- LoginPolicy --
    def lookup_target(self, name: str) -> TargetInfo | None:
        m = self._model()
        if not m.service_enabled:
            return None
        rt = self.engine.target_by_iqn(name)
        if rt is None:
            return None
        t = m.targets.get(rt.target_id)
        groups = self._target_groups_here(rt.target_id)
        if t is None or not groups:
            return None
        tg = groups[0]
        return TargetInfo(
            target_id=t.id,
            iqn=rt.iqn,
            alias=t.alias,
            auth_method=tg.auth_type or "None",
            credentials=m.auth_group(tg.auth_group),
        )

    def initiator_allowed(self, target: TargetInfo, initiator_name: str) -> bool:
        t = self._model().targets.get(target.target_id)
        if t is None:
            return False
        if not any(self.group_allows(g, initiator_name, self.peer_ip) for g in self._target_groups_here(t.id)):
            return False
        access = parse_access_config(t.access_config).decide(self.peer_ip)
        if access is None:
            return False
        self.read_only = access == "ro"
        return True

    def discovery_auth(self) -> tuple[str, list[M.AuthCredential]]:
        m = self._model()
        pg = m.portal_groups.get(self.listener.pg_id)
        if pg is None:
            return "None", []
        return pg.discovery_auth_method or "None", m.auth_group(pg.discovery_auth_group)

    def complete_login(self, result: LoginResult) -> int:
        self.session = self.engine.bind_session(self, result)
        return self.session.tsih

    def send_targets(self, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        return self.engine.send_targets(self, initiator_name, which)


class Engine:
    """The running target: listeners, target nodes, logical units and sessions."""

    def __init__(
        self,
        state_dir: Path,
        pr_store: StateStore | None = None,
        *,
        queue_depth: int = 128,
        nop_interval: float = 30.0,
        nop_timeout: float = 30.0,
        login_timeout: float = 30.0,
        tune_allocator: bool = True,
    ) -> None:
        if tune_allocator:
            tune_malloc()
        self.state_dir = Path(state_dir)
        self.queue_depth = queue_depth
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.model = M.ConfigModel()
        self._listeners: dict[tuple[str, int], Listener] = {}
        self._targets: dict[int, TargetRuntime] = {}
        self._by_iqn: dict[str, TargetRuntime] = {}
        self.scsi = ScsiRegistry()  # devices, LUs and I_T nexuses, for the SCSI layer
        self.logical_units = LogicalUnits(self.scsi, pr_store)
        self._sessions: dict[int, Session] = {}  # TSIH -> session
        self._by_isid: dict[tuple[str, int, str], Session] = {}
        self.connections: set[IscsiProtocol] = set()
        self._tsih = itertools.count(1)
        self._nexus_ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.shutting_down = False

    # --- reconcile ----------------------------------------------------------------------

    async def apply(self, model: M.ConfigModel) -> None:
        async with self._lock:
            self.model = model
            self.logical_units.apply(model, self._detach_lu)
            self._apply_targets(model)
            await self._apply_listeners(model)

    def _detach_lu(self, lu: LogicalUnit) -> None:
        for rt in self._targets.values():
            if any(v is lu for v in rt.luns.values()):
                rt.luns = {k: v for k, v in rt.luns.items() if v is not lu}
                rt.device.set_luns(rt.luns)

    def _apply_targets(self, model: M.ConfigModel) -> None:
        for tid in list(self._targets):
            rt = self._targets[tid]
            t = model.targets.get(tid)
            if t is None or model.target_iqn(t) != rt.iqn:
                self._remove_target(rt)
        for tid, t in model.targets.items():
            iqn = model.target_iqn(t)
            rt = self._targets.get(tid)
            if rt is None:
                rt = TargetRuntime(tid, iqn, ScsiDevice(iqn, self.scsi))
                self._targets[tid] = rt
                self._by_iqn[iqn] = rt
            luns = {}
            for lun, ext in model.luns_of_target(tid).items():
                lu = self.logical_units.get(ext.id)
                if lu is not None:
                    luns[lun] = lu
            tags = sorted({model.portal_groups[g.portal_group].tag for g in model.groups_of_target(tid)
                           if g.portal_group in model.portal_groups})
            rt.device.set_portal_groups(tags)
            # Compare LU identity, not extent ids: a reopened extent is a new LogicalUnit.
            if luns.keys() != rt.luns.keys() or any(rt.luns[k] is not v for k, v in luns.items()):
                rt.device.set_luns(luns)
                rt.luns = luns

    def _remove_target(self, rt: TargetRuntime) -> None:
        log.info("target %s removed", rt.iqn)
        self._targets.pop(rt.target_id, None)
        if self._by_iqn.get(rt.iqn) is rt:
            del self._by_iqn[rt.iqn]
        for s in list(self._sessions.values()):
            if s.target is not None and s.target.iqn == rt.iqn:
                self._close_session(s, announce=True)
        try:
            rt.device.close()
        except Exception:  # noqa: BLE001
            log.exception("closing device of %s failed", rt.iqn)

    async def _apply_listeners(self, model: M.ConfigModel) -> None:
        wanted: dict[tuple[str, int], int] = {}
        if model.service_enabled and not self.shutting_down:
            for pg in model.portal_groups.values():
                for addr in pg.listen:
                    a = parse_listen(addr, allow_zero=True)
                    wanted[(a.host, a.port)] = pg.id
        for key in list(self._listeners):
            if key not in wanted:
                await self._listeners.pop(key).stop()
        failures = []
        for key, pg_id in wanted.items():
            lst = self._listeners.get(key)
            if lst is not None:
                lst.pg_id = pg_id
                continue
            lst = Listener(self, key[0], key[1], pg_id)
            try:
                await lst.start()
            except EngineError as e:
                failures.append(str(e))
                continue
            self._listeners[key] = lst
        if failures:
            raise EngineError("; ".join(failures))

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Actual (host, port) of every listener (port 0 in the model resolves here)."""
        return [(lst.host, lst.port) for lst in self._listeners.values()]

    # --- lookups ------------------------------------------------------------------------

    def target_by_iqn(self, iqn: str) -> TargetRuntime | None:
        rt = self._by_iqn.get(iqn)
        if rt is None:  # iSCSI names compare case-insensitively (RFC 3722 normalisation)
            low = iqn.lower()
            for cand in self._by_iqn.values():
                if cand.iqn.lower() == low:
                    return cand
        return rt

    def make_policy(self, listener: Listener, peer_ip: str, local_ip: str, local_port: int) -> PortalPolicy:
        return PortalPolicy(self, listener, peer_ip, local_ip, local_port)

    def send_targets(self, policy: PortalPolicy, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        m = self.model
        if not m.service_enabled:
            return []
        if which in ("All",):
            candidates = sorted(self._targets.values(), key=lambda r: r.target_id)
        else:
            name = which or (policy.session.target.iqn if policy.session and policy.session.target else "")
            rt = self.target_by_iqn(name) if name else None
            candidates = [rt] if rt is not None else []
        out = []
        for rt in candidates:
            t = m.targets.get(rt.target_id)
            if t is None or parse_access_config(t.access_config).decide(policy.peer_ip) is None:
                continue
            addrs: list[str] = []
            for tg in m.groups_of_target(t.id):
                if not policy.group_allows(tg, initiator_name, policy.peer_ip):
                    continue
                pg = m.portal_groups.get(tg.portal_group)
                if pg is None:
                    continue
                for addr in pg.listen:
                    a = parse_listen(addr, allow_zero=True)
                    host, port = a.host, a.port
                    lst = self._listeners.get((host, port))
                    if lst is not None:
                        port = lst.port
                    if host in ("0.0.0.0", "::", ""):
                        # A wildcard listener: report the address this connection came in on.
                        host = policy.local_ip
                    entry = f"{format_listen(host, port)},{pg.tag}"
                    if entry not in addrs:
                        addrs.append(entry)
            if addrs:
                out.append((rt.iqn, addrs))
        return out

    # --- sessions -----------------------------------------------------------------------

    def bind_session(self, policy: PortalPolicy, result: LoginResult) -> Session:
        """complete_login: a new session, a reinstated one, or connection reinstatement."""
        if self.shutting_down:
            raise LoginReject(0x03, 0x01, "target shutting down")  # service unavailable
        target_iqn = result.target.iqn if result.target else ""
        if result.tsih:
            s = self._sessions.get(result.tsih)
            if s is None or s.initiator_name != result.initiator_name or s.isid != result.isid or (
                (s.target.iqn if s.target else "") != target_iqn
            ):
                raise LoginReject(0x02, 0x0A, "session does not exist")
            conn = s.connection
            if conn is not None and conn.cid != result.cid:
                raise LoginReject(0x02, 0x06, "too many connections")  # MaxConnections=1
            # Connection reinstatement (ERL 0): the old connection's tasks end, the session stays.
            if conn is not None:
                old = conn
                s.connection = None
                old.abort_all()
                self._close_protocol_of(old)
            return s
        if result.session_type == "Normal":
            key = (result.initiator_name.lower(), result.isid, target_iqn.lower())
            old_s = self._by_isid.get(key)
            if old_s is not None:
                # Session reinstatement: the old I_T nexus is gone with all its tasks.
                log.info("reinstating session of %s isid %012x", result.initiator_name, result.isid)
                self._close_session(old_s, announce=False)
        tsih = self._new_tsih()
        nexus = device = None
        if result.session_type == "Normal" and result.target is not None:
            rt = self.target_by_iqn(target_iqn)
            if rt is None:
                raise LoginReject(0x02, 0x03, "target removed")
            nexus = Nexus(
                nexus_id=next(self._nexus_ids),
                initiator_name=result.initiator_name,
                isid=result.isid,
                target_name=rt.iqn,
                portal_group_tag=policy.portal_group_tag,
                read_only=policy.read_only,
            )
            device = rt.device
            device.add_nexus(nexus)
        s = Session(
            result, tsih, nexus, device, queue_depth=self.queue_depth,
            peers=(lambda iqn=target_iqn: self._sessions_of(iqn)),
        )
        self._sessions[tsih] = s
        if result.session_type == "Normal":
            self._by_isid[(result.initiator_name.lower(), result.isid, target_iqn.lower())] = s
        return s

    def _new_tsih(self) -> int:
        while True:
            t = next(self._tsih) & 0xFFFF
            if t and t not in self._sessions:
                return t
            if t == 0xFFFF:
                self._tsih = itertools.count(1)

    def _sessions_of(self, iqn: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.target is not None and s.target.iqn == iqn]

    def _close_protocol_of(self, conn: Any) -> None:
        for proto in list(self.connections):
            if proto.conn is conn:
                proto.close()

    def _close_session(self, s: Session, announce: bool) -> None:
        """End a session: its connection goes, its tasks are aborted, the nexus is lost."""
        conn = s.connection
        if conn is not None:
            if announce and not conn.closed:
                conn.announce_drop()
            conn.abort_all()
            self._close_protocol_of(conn)
        self.session_ended(s)

    def session_ended(self, s: Session) -> None:
        if s.closed:
            return
        s.closed = True
        if self._sessions.get(s.tsih) is s:
            del self._sessions[s.tsih]
        key = (s.initiator_name.lower(), s.isid, (s.target.iqn if s.target else "").lower())
        if self._by_isid.get(key) is s:
            del self._by_isid[key]
        if s.device is not None and s.nexus is not None:
            try:
                s.device.nexus_lost(s.nexus)
            except Exception:  # noqa: BLE001
                log.exception("nexus_lost failed")

    def connection_closed(self, proto: IscsiProtocol) -> None:
        """The adapter's connection is gone (logout, drop, peer close)."""
        self.connections.discard(proto)
        conn = proto.conn
        if conn is None:
            return
        s = conn.session
        if s.connection is conn:
            # MaxConnections=1: losing the connection ends the session at ERL 0.
            s.connection = None
            self.session_ended(s)

    def target_cold_reset(self, iqn: str) -> None:
        """After TARGET COLD RESET: every connection of the target is dropped."""
        for s in self._sessions_of(iqn):
            if s.connection is not None:
                self._close_protocol_of(s.connection)

    def session_count(self, target_id: int) -> int:
        rt = self._targets.get(target_id)
        if rt is None:
            return 0
        return len(self._sessions_of(rt.iqn))

    def sessions(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._sessions.values()]

    # --- shutdown -----------------------------------------------------------------------

    async def shutdown(self, grace: float = 3.0) -> None:
        """Ask every initiator to log out, wait briefly, then close everything."""
        self.shutting_down = True
        async with self._lock:
            for lst in list(self._listeners.values()):
                await lst.stop()
            self._listeners.clear()
        asked = len(self.connections)
        if asked:
            log.info("asking %d connection(s) to log out within %.0fs", asked, grace)
        for proto in list(self.connections):
            proto.request_logout(max(1, int(grace)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.info("dropping %d connection(s) that did not log out", len(self.connections))
        elif asked:
            log.info("all connections closed after %.2fs", loop.time() - start)
        for proto in list(self.connections):
            proto.close(abort_tasks=True, announce=True)
        for s in list(self._sessions.values()):
            self.session_ended(s)
        await self.logical_units.close()
        self._targets.clear()
        self._by_iqn.clear()
