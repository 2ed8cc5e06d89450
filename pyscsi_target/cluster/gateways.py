"""Gateways of one cluster: who is alive, which gateway owns each RBD logical unit, the ALUA
states that follow, and failover.

State in RADOS, the omap of ``pyscsi-target.gateways``:

- ``gw/<name>``: a gateway's heartbeat record ``{"tags", "luns", "clients", "beat"}``: the
  portal group tags (= target port groups) it serves, the NAA designators of the RBD LUs it
  has open, the addresses of its librados clients (as lock owners appear), and a counter it
  bumps every ``heartbeat`` seconds.  Clocks of different
  hosts are never compared: a gateway is dead when its counter has not moved for
  ``timeout`` seconds of the observer's own clock, or gone when its record was removed (a
  clean stop).
- ``lun/<naa>``: ``{"owner": name, "epoch": n}``, the gateway whose target port groups are
  active/optimized for that LU.  It changes only by omap compare-and-swap on the exact
  previous value, so two survivors cannot both take a LU over.

ALUA (implicit, one group per gateway): the owner's groups are active/optimized (and
preferred), the groups of the other live gateways active/non-optimized, those of dead or
absent gateways unavailable.  Any change raises ASYMMETRIC ACCESS STATE CHANGED on the LU.

The first gateway to open a LU owns it.  The owner does not hold the image's exclusive
lock explicitly: a non-optimized gateway still serves I/O (the lock moves, transparently),
because an explicitly held lock would make its writes fail.  When the owner dies, the first
live gateway (by name) serving the LU takes it over: CAS on the owner record, then it breaks
the dead owner's lock, which blocklists the dead owner's client (rbd_blocklist_on_break_lock),
so that a gateway which only looked dead can land no more writes.  Its writes fail with
ESHUTDOWN: it reports its groups unavailable (commands fail over to other paths), reopens
the image with a new client instance, and serves on as non-optimized.

Every gateway watches the object; an ownership change or a clean stop is notified, so the
others react at once instead of at their next heartbeat.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pyscsi_target.backstore.rbd import RbdBackstore
from pyscsi_target.cluster.follower import Follower
from pyscsi_target.cluster.rados import IoCtx, RadosError
from pyscsi_target.cluster.reservations import ClusterReservations
from pyscsi_target.scsi.alua import (
    ANO,
    AO,
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    CLUSTER_SUPPORTED,
    TRANSITIONING,
    UNAVAILABLE,
)
from pyscsi_target.scsi.lu import LogicalUnit

log = logging.getLogger(__name__)

GATEWAYS_OID = "pyscsi-target.gateways"
HEARTBEAT = 1.0
TIMEOUT = 4.0


@dataclass
class Peer:
    name: str
    tags: frozenset[int]
    luns: frozenset[str]
    clients: frozenset[str]
    beat: int
    moved: float  # observer's monotonic time when ``beat`` last changed (or it was first seen)
    confirmed: bool = False  # ``beat`` was seen moving: alive for sure, not just a record

    def alive(self, now: float, timeout: float) -> bool:
        return now - self.moved <= timeout


@dataclass
class Failover:
    """One takeover, timed (monotonic seconds) for the log and the tests."""

    naa: str
    dead: str
    detected: float
    owned: float = 0.0  # owner record changed to this gateway
    broken: float = 0.0  # the dead owner's lock broken (and it blocklisted)
    broke: list[str] = field(default_factory=list)


class GatewayCluster(Follower):
    """This gateway's membership; it manages the RBD LUs of ``lus()``."""

    def __init__(self, io: IoCtx, name: str, tags: frozenset[int],
                 lus: Callable[[], list[LogicalUnit]], *, heartbeat: float = HEARTBEAT, timeout: float = TIMEOUT,
                 reopen: Callable[[LogicalUnit], Awaitable[None]] | None = None) -> None:
        super().__init__(io, GATEWAYS_OID, heartbeat)
        self.name = name
        self.tags = tags
        self._lus = lus
        self.timeout = timeout
        self.reopen = reopen  # gives a fenced LU a new backstore (LogicalUnits.reopen_rbd)
        self.beat = 0
        self.peers: dict[str, Peer] = {}
        self.owners: dict[str, dict[str, Any]] = {}  # naa hex -> owner record
        self.failovers: list[Failover] = []
        self.fenced: set[str] = set()  # naa hex of LUs whose client was blocklisted, until reopened
        self._checked_dead: dict[str, set[tuple[str, int]]] = {}  # naa -> dead gateways whose lock was checked
        self._known: dict[str, LogicalUnit] = {}  # the LUs of the last round

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.run_round()
        await self.follow()

    async def stop(self) -> None:
        """Stop heartbeats and leave: the record is removed, so the others take this gateway's
        LUs over at once (call after the engine closed its LUs: their locks are released)."""
        await self.unfollow()
        for lu in self._known.values():  # unwatched now, or the others' notifies would wait for them
            if isinstance(lu.pr, ClusterReservations):
                await lu.pr.close()
        self._known.clear()
        try:
            await asyncio.to_thread(self.io.omap_cas, GATEWAYS_OID, None, None, [f"gw/{self.name}"])
            await asyncio.to_thread(self.io.notify, GATEWAYS_OID, b"left", 1000)
        except RadosError as exc:
            log.warning("leaving the gateway cluster: %s", exc)

    # --- one round -------------------------------------------------------------------------------

    def _rbd_lus(self) -> dict[str, LogicalUnit]:
        return {lu.naa.hex(): lu for lu in self._lus() if isinstance(lu.backstore, RbdBackstore) and not lu.closed}

    async def round(self) -> None:
        lus = self._rbd_lus()
        for lu in lus.values():
            lu.alua.supported = CLUSTER_SUPPORTED
            bs = lu.backstore
            assert isinstance(bs, RbdBackstore)
            if bs.on_fenced is None:
                bs.on_fenced = functools.partial(self._fenced, lu)
        self.beat += 1
        clients = sorted({lu.backstore.client_address for lu in lus.values()
                          if isinstance(lu.backstore, RbdBackstore) and lu.backstore.rados is not None})
        record = json.dumps({"tags": sorted(self.tags), "luns": sorted(lus), "clients": clients,
                             "beat": self.beat}).encode()
        values = await asyncio.to_thread(self._beat_and_read, record)
        now = time.monotonic()
        self._update_peers(values, now)
        self.owners = {k[4:]: json.loads(v) for k, v in values.items() if k.startswith("lun/")}
        changed = False
        for naa in lus:
            changed |= await self._settle_owner(naa, lus[naa], now)
            await self._free_dead_holder(naa, lus[naa], now)
        ready = {naa: lu for naa, lu in lus.items() if await self._load_reservations(naa, lu, now)}
        for naa, lu in ready.items():
            self._apply_alua(naa, lu, now)
        for naa in set(self._known) - set(lus):
            pr = self._known.pop(naa).pr
            if isinstance(pr, ClusterReservations):
                await pr.close()
        self._known.update(lus)
        if changed:
            self.announce(b"owner")

    async def _load_reservations(self, naa: str, lu: LogicalUnit, now: float) -> bool:
        """Load a newly opened LU's shared reservation state; False while that must wait (its
        groups stay transitioning): a record of another gateway serving the LU has not been
        seen alive or dead yet, and whether state without APTPL survives depends on it."""
        pr = lu.pr
        if not isinstance(pr, ClusterReservations) or pr.loaded:
            return True
        others = [p for n, p in self.peers.items() if n != self.name and naa in p.luns and p.alive(now, self.timeout)]
        if any(not p.confirmed for p in others):
            return False
        await pr.load(alone=not others)
        return True

    def _beat_and_read(self, record: bytes) -> dict[str, bytes]:
        self.io.omap_cas(GATEWAYS_OID, None, {f"gw/{self.name}": record}, (), True)
        return self.io.omap_get(GATEWAYS_OID)

    def _update_peers(self, values: dict[str, bytes], now: float) -> None:
        present: set[str] = set()
        for key, raw in values.items():
            if not key.startswith("gw/"):
                continue
            name = key[3:]
            present.add(name)
            rec = json.loads(raw)
            old = self.peers.get(name)
            beat = int(rec["beat"])
            moved = now if old is None or old.beat != beat or name == self.name else old.moved
            confirmed = name == self.name or (old is not None and (old.confirmed or old.beat != beat))
            self.peers[name] = Peer(name, frozenset(rec["tags"]), frozenset(rec["luns"]),
                                    frozenset(rec.get("clients", ())), beat, moved, confirmed)
        for name in list(self.peers):
            if name not in present:
                del self.peers[name]  # left cleanly: its LUs are free at once

    def _live(self, name: str, now: float) -> bool:
        if name == self.name:
            return True
        peer = self.peers.get(name)
        return peer is not None and peer.alive(now, self.timeout)

    async def _settle_owner(self, naa: str, lu: LogicalUnit, now: float) -> bool:
        """Claim an unowned LU, or take over one whose owner is dead when this gateway is next
        in line; True when the owner record changed."""
        rec = self.owners.get(naa)
        if rec is None:
            new = {"owner": self.name, "epoch": 1}
            return await self._cas_owner(naa, b"", new)
        owner = str(rec["owner"])
        holder = self.peers.get(owner)
        serving = owner == self.name or (holder is not None and naa in holder.luns)
        if naa in self.fenced or (serving and self._live(owner, now)):
            return False
        # Survivors serving this LU, in name order: the first takes it over.
        candidates = sorted(n for n, p in self.peers.items() if self._live(n, now) and naa in p.luns)
        if self.name not in candidates or candidates[0] != self.name:
            return False
        failover = Failover(naa, owner, now)
        new = {"owner": self.name, "epoch": int(rec.get("epoch", 0)) + 1}
        if not await self._cas_owner(naa, json.dumps(rec, sort_keys=True).encode(), new):
            return False
        failover.owned = time.monotonic()
        if not serving and holder is not None:
            log.info("LU %s: %s no longer serves it; this gateway owns it now", lu.name, owner)
            return True
        # Fence the dead owner before anything is written here: break its lock (librbd
        # blocklists it first), so none of its writes can land after ours.
        self._set_local(lu, TRANSITIONING)
        bs = lu.backstore
        assert isinstance(bs, RbdBackstore)
        live_clients = set().union(*(p.clients for n, p in self.peers.items() if self._live(n, now)))
        try:
            failover.broke = await asyncio.to_thread(self._break_dead_lock, bs, live_clients)
        except RadosError as exc:
            log.error("LU %s: breaking the lock of %s failed: %s", lu.name, owner, exc)
        failover.broken = time.monotonic()
        self.failovers.append(failover)
        log.log(logging.WARNING if holder is not None else logging.INFO,
                "took LU %s over from %s (%s): owner record after %.0f ms, lock broken (%s) after %.0f ms",
                lu.name, owner, "dead" if holder is not None else "left",
                1000 * (failover.owned - failover.detected), ", ".join(failover.broke) or "none",
                1000 * (failover.broken - failover.detected))
        return True

    async def _free_dead_holder(self, naa: str, lu: LogicalUnit, now: float) -> None:
        """A non-optimized gateway may die holding the lock (it wrote last): the owner breaks it,
        or the owner's writes would wait for librbd to notice (the dead client's watch expiring,
        30 s).  Checked once per dead gateway."""
        if str(self.owners.get(naa, {}).get("owner")) != self.name or naa in self.fenced:
            return
        dead = {(p.name, p.beat) for p in self.peers.values()
                if p.name != self.name and naa in p.luns and not p.alive(now, self.timeout)}
        new = dead - self._checked_dead.get(naa, set())
        if not new:
            return
        self._checked_dead[naa] = dead
        bs = lu.backstore
        assert isinstance(bs, RbdBackstore)
        live_clients = set().union(*(p.clients for n, p in self.peers.items() if self._live(n, now)))
        try:
            broke = await asyncio.to_thread(self._break_dead_lock, bs, live_clients)
        except RadosError as exc:
            log.error("LU %s: breaking a dead gateway's lock failed: %s", lu.name, exc)
            return
        if broke:
            log.warning("LU %s: broke the lock %s left by %s (dead)", lu.name, ", ".join(broke),
                        ", ".join(sorted(n for n, _b in new)))

    @staticmethod
    def _break_dead_lock(bs: RbdBackstore, live_clients: set[str]) -> list[str]:
        """Break the image's lock unless a live gateway's client holds it (that one moves the
        lock on request, like any write): breaking it would fence a healthy gateway."""
        broken = []
        for owner in bs.lock_owners():
            if owner not in live_clients:
                bs.break_lock(owner)
                broken.append(owner)
        return broken

    async def _cas_owner(self, naa: str, expected: bytes, new: dict[str, Any]) -> bool:
        key = f"lun/{naa}"
        value = json.dumps(new, sort_keys=True).encode()
        done = await asyncio.to_thread(self.io.omap_cas, GATEWAYS_OID, {key: expected}, {key: value}, (), True)
        if done:
            self.owners[naa] = new
        return bool(done)

    def _states(self, naa: str, lu: LogicalUnit, now: float) -> tuple[dict[int, int], frozenset[int]]:
        owner = str(self.owners.get(naa, {}).get("owner", ""))
        tags: set[int] = set()
        for dev in lu.registry.devices_mapping(lu):
            tags.update(dev.portal_group_tags())
        serving: dict[int, str] = {}
        for peer in self.peers.values():
            for tag in peer.tags:
                serving[tag] = peer.name
        for tag in self.tags:
            serving[tag] = self.name
        states: dict[int, int] = {}
        preferred: set[int] = set()
        for tag in tags:
            gw = serving.get(tag)
            if gw is None or not self._live(gw, now):
                states[tag] = UNAVAILABLE
            elif gw == self.name and naa in self.fenced:
                states[tag] = UNAVAILABLE
            elif gw == owner:
                states[tag] = AO
                preferred.add(tag)
            else:
                states[tag] = ANO
        return states, frozenset(preferred)

    def _apply_alua(self, naa: str, lu: LogicalUnit, now: float) -> None:
        states, preferred = self._states(naa, lu, now)
        if lu.alua.set_states(states, preferred):
            log.info("LU %s: ALUA states %s", lu.name,
                     ", ".join(f"{t}:{_STATE_NAMES.get(s, s)}" for t, s in sorted(states.items())))
            lu.add_ua_all(ASYMMETRIC_ACCESS_STATE_CHANGED)

    def _set_local(self, lu: LogicalUnit, state: int) -> None:
        states = dict(lu.alua.states)
        for tag in self.tags:
            states[tag] = state
        if lu.alua.set_states(states, lu.alua.preferred):
            lu.add_ua_all(ASYMMETRIC_ACCESS_STATE_CHANGED)

    # --- fencing ---------------------------------------------------------------------------------

    def _fenced(self, lu: LogicalUnit) -> None:
        """This gateway's client of ``lu``'s image was blocklisted: another gateway took it over.
        Its groups go unavailable (initiators move to another path), and the image is reopened
        with a new client instance, after which it serves as non-optimized."""
        naa = lu.naa.hex()
        if naa in self.fenced:
            return
        self.fenced.add(naa)
        log.error("LU %s: fenced by another gateway; reopening the image with a new client", lu.name)
        self._set_local(lu, UNAVAILABLE)
        if self.reopen is not None:
            asyncio.get_running_loop().create_task(self._reopen(lu, naa))

    async def _reopen(self, lu: LogicalUnit, naa: str) -> None:
        assert self.reopen is not None
        try:
            await self.reopen(lu)
        except Exception:  # noqa: BLE001 - stays unavailable; the next fencing check retries
            log.exception("LU %s: reopening after fencing failed", lu.name)
            return
        self.fenced.discard(naa)
        self.wake()


_STATE_NAMES = {AO: "active/optimized", ANO: "active/non-optimized", UNAVAILABLE: "unavailable",
                TRANSITIONING: "transitioning"}
