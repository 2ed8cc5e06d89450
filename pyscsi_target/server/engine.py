"""The engine: reconciles the running target against a ConfigModel.

``Engine.apply(model)`` opens one LogicalUnit per extent (shared by every target mapping
it), creates one ScsiDevice per target node with its LUN map, and binds the portals
(portal_groups.py).  The model is kept for the next logins: who may log in, with what
authentication (initiator_access.py), and what SendTargets shows (send_targets.py), are
decided from it at login time.  Sessions live in the session registry (sessions.py).
``shutdown`` asks every initiator to log out, then closes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..cluster.rados import ClusterSettings
from ..config import model as M
from ..config.delta import ModelDelta
from ..iscsi.auth_backoff import AuthBackoff
from ..iscsi.connection import Connection
from ..iscsi.params import TargetResets
from ..iscsi.session import SessionInfo
from ..iscsi.stats import IoStats
from ..iscsi.write_budget import DEFAULT_TOTAL as DEFAULT_WRITE_BUDGET
from ..iscsi.write_budget import WriteBudget
from ..scsi.device import ScsiDevice
from ..scsi.lu import LogicalUnit
from ..scsi.persistence import StateStore
from ..scsi.registry import ScsiRegistry
from ..workbench import Workbench
from .admission import Admission
from .initiator_access import PortalPolicy
from .logical_units import LogicalUnits
from .model_index import ModelIndex
from .portal_groups import EngineError, Listener, Portals
from .protocol import IscsiProtocol
from .send_targets import send_targets
from .sessions import SessionRegistry

__all__ = ["Engine", "EngineError", "TargetRuntime", "tune_malloc"]

log = logging.getLogger(__name__)

# How many removed target names are remembered (a login naming one gets TARGET REMOVED).
REMEMBERED_REMOVALS = 1024


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


def _before_and_after(old: Mapping[int, object], new: Mapping[int, object], ids: set[int], attr: str) -> set[int]:
    """``attr`` (a target or extent id) of the objects ``ids`` as they were and as they are."""
    out: set[int] = set()
    for i in ids:
        for obj in (old.get(i), new.get(i)):
            if obj is not None:
                out.add(getattr(obj, attr))
    return out


@dataclass
class TargetRuntime:
    target_id: int
    iqn: str
    device: ScsiDevice
    luns: dict[int, LogicalUnit] = field(default_factory=dict)  # lun -> LogicalUnit as last given to the device
    resets: TargetResets = field(default_factory=TargetResets)  # shared with its sessions, set on apply
    # The transport's I/O counters per LUN (iscsi/stats.py), shared by the target's sessions.
    # An entry outlives its LUN's unmapping so the target's totals never go backwards.
    io_stats: dict[int, IoStats] = field(default_factory=dict)


class Engine:
    """The running target: portals, target nodes, logical units and sessions."""

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
        ceph: ClusterSettings | None = None,
        write_budget: int = DEFAULT_WRITE_BUDGET,
    ) -> None:
        if tune_allocator:
            tune_malloc()
        self.state_dir = Path(state_dir)
        self.queue_depth = queue_depth
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.model = M.ConfigModel()
        self.index = ModelIndex()  # target groups and LUN maps by target / extent, of self.model
        # Who may connect: descriptors kept for the API, caps on connections still in login.
        self.admission = Admission()
        self.portals = Portals(lambda listener: IscsiProtocol(self, listener), self.admission)
        self._targets: dict[int, TargetRuntime] = {}
        self._by_iqn: dict[str, TargetRuntime] = {}
        self._removed: dict[str, None] = {}  # lower-case IQNs of removed targets, oldest first
        self.scsi = ScsiRegistry()  # devices, LUs and I_T nexuses, for the SCSI layer
        self.logical_units = LogicalUnits(self.scsi, pr_store, ceph)
        self.write_budget = WriteBudget(write_budget)
        self.auth_backoff = AuthBackoff()  # CHAP failures by initiator name and address (counters for /metrics)
        self.session_registry = SessionRegistry(queue_depth, self._close_connection, self.write_budget)
        self.connections: set[IscsiProtocol] = set()
        self.workbench = Workbench(self)  # fault injection, captures, strict mode
        self._lock = asyncio.Lock()
        self.shutting_down = False
        # Called after every apply, even one where a portal could not bind (iSNS registration).
        self.on_applied: list[Callable[[], None]] = []
        # A gateway of a cluster listens on its own portal groups only (None: on every one).
        self.portal_tags: frozenset[int] | None = None

    # --- reconcile ----------------------------------------------------------------------

    async def apply(self, model: M.ConfigModel) -> None:
        """Make ``model`` the running configuration, touching only what differs from the
        current one (found by identity: the model's objects are sealed and shared)."""
        async with self._lock:
            await self.logical_units.open_remote(model)  # RBD images: in threads
            model.seal()  # whoever handed it over cannot change it behind our back now
            old, self.model = self.model, model
            delta = ModelDelta.between(old, model)
            self.index.update(old, model, delta)
            extents = delta.extents | _before_and_after(old.lun_maps, model.lun_maps, delta.lun_maps, "extent")
            for tid in delta.targets:
                extents.update(m.extent for m in self.index.maps_by_target.get(tid, {}).values())
            reopened = self.logical_units.apply(model, self.index, extents, self._detach_lu)
            if delta.basename or delta.portal_groups:
                targets = set(self._targets) | set(model.targets)  # every IQN or portal group tag may change
            else:
                targets = (delta.targets
                           | _before_and_after(old.target_groups, model.target_groups, delta.target_groups, "target")
                           | _before_and_after(old.lun_maps, model.lun_maps, delta.lun_maps, "target"))
                for eid in reopened:
                    targets |= self.index.targets_of_extent(eid)
            self._apply_targets(model, targets)
            try:
                await self.portals.apply(model, model.service_enabled and not self.shutting_down, self.portal_tags)
            finally:
                for observer in self.on_applied:
                    observer()

    def _detach_lu(self, lu: LogicalUnit) -> None:
        for rt in self._targets.values():
            if any(v is lu for v in rt.luns.values()):
                rt.luns = {k: v for k, v in rt.luns.items() if v is not lu}
                rt.device.set_luns(rt.luns)

    def _apply_targets(self, model: M.ConfigModel, target_ids: set[int]) -> None:
        """Reconcile the runtime of these targets: removals (and renames) first, so that a
        name given up by one target can be taken by another in the same change."""
        for tid in target_ids:
            old = self._targets.get(tid)
            t = model.targets.get(tid)
            if old is not None and (t is None or model.target_iqn(t) != old.iqn):
                self._remove_target(old)
        for tid in sorted(target_ids):
            t = model.targets.get(tid)
            if t is None:
                continue
            rt = self._targets.get(tid)
            if rt is None:
                iqn = model.target_iqn(t)
                rt = TargetRuntime(tid, iqn, ScsiDevice(iqn, self.scsi))
                self._targets[tid] = rt
                self._by_iqn[iqn] = rt
            luns = {}
            for lun, ext in self.index.luns_of(model, tid).items():
                lu = self.logical_units.get(ext.id)
                if lu is not None:
                    luns[lun] = lu
            tags = sorted({model.portal_groups[g.portal_group].tag for g in self.index.groups_of(tid)
                           if g.portal_group in model.portal_groups})
            rt.device.set_portal_groups(tags)
            rt.resets.warm, rt.resets.cold = t.allow_warm_reset, t.allow_cold_reset
            # Compare LU identity, not extent ids: a reopened extent is a new LogicalUnit.
            if luns.keys() != rt.luns.keys() or any(rt.luns[k] is not v for k, v in luns.items()):
                rt.device.set_luns(luns)
                rt.luns = luns
            for lun in luns:
                if lun not in rt.io_stats:
                    rt.io_stats[lun] = IoStats()

    def _remove_target(self, rt: TargetRuntime) -> None:
        log.info("target %s removed", rt.iqn)
        self._targets.pop(rt.target_id, None)
        if self._by_iqn.get(rt.iqn) is rt:
            del self._by_iqn[rt.iqn]
        self._removed.pop(rt.iqn.lower(), None)
        self._removed[rt.iqn.lower()] = None
        if len(self._removed) > REMEMBERED_REMOVALS:
            del self._removed[next(iter(self._removed))]
        for s in self.session_registry.of_target(rt.iqn):
            self.session_registry.close(s, announce=True)
        try:
            rt.device.close()
        except Exception:  # noqa: BLE001
            log.exception("closing device of %s failed", rt.iqn)

    def bound_portals(self) -> dict[tuple[str, int], tuple[str, int]]:
        """Each listen address of the model -> the (host, port) bound for it (port 0 resolved)."""
        return self.portals.bound()

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Actual (host, port) of every listener (port 0 in the model resolves here)."""
        return self.portals.addresses()

    # --- lookups ------------------------------------------------------------------------

    def target_by_iqn(self, iqn: str) -> TargetRuntime | None:
        rt = self._by_iqn.get(iqn)
        if rt is None:  # iSCSI names compare case-insensitively (RFC 3722 normalisation)
            low = iqn.lower()
            for cand in self._by_iqn.values():
                if cand.iqn.lower() == low:
                    return cand
        return rt

    def was_removed(self, iqn: str) -> bool:
        """A target of that name existed and was removed (and has not come back)."""
        return iqn.lower() in self._removed and self.target_by_iqn(iqn) is None

    def targets_by_id(self) -> list[TargetRuntime]:
        return sorted(self._targets.values(), key=lambda r: r.target_id)

    def groups_of(self, target_id: int) -> list[M.TargetGroup]:
        """The target groups exporting a target, in id order."""
        return self.index.groups_of(target_id)

    def make_policy(self, listener: Listener, peer_ip: str, local_ip: str, local_port: int) -> PortalPolicy:
        return PortalPolicy(self, listener, peer_ip, local_ip, local_port)

    def send_targets(self, policy: PortalPolicy, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        return send_targets(self, policy, initiator_name, which)

    # --- connections and sessions -------------------------------------------------------

    def _close_connection(self, conn: Connection) -> None:
        for proto in list(self.connections):
            if proto.conn is conn:
                proto.close()

    def connection_closed(self, proto: IscsiProtocol) -> None:
        """The adapter's connection is gone (logout, drop, peer close)."""
        self.connections.discard(proto)
        self.admission.closed(proto)
        if proto.conn is not None:
            self.session_registry.connection_closed(proto.conn)

    def target_cold_reset(self, iqn: str) -> None:
        """After TARGET COLD RESET: every connection of the target is dropped."""
        self.session_registry.cold_reset(iqn)

    def session_count(self, target_id: int) -> int:
        rt = self._targets.get(target_id)
        if rt is None:
            return 0
        return len(self.session_registry.of_target(rt.iqn))

    def sessions(self) -> list[SessionInfo]:
        return self.session_registry.describe()

    # --- shutdown -----------------------------------------------------------------------

    async def shutdown(self, grace: float = 3.0) -> None:
        """Ask every initiator to log out, wait briefly, then close everything."""
        self.shutting_down = True
        async with self._lock:
            await self.portals.stop()
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
        self.session_registry.end_all()
        await self.logical_units.close()
        self._targets.clear()
        self._by_iqn.clear()
