"""A daemon as one gateway of a cluster: what ``serve --cluster`` adds to the daemon.

Start-up, in the daemon's order:

1. ``connect``: a librados client of its own for the shared state (the images have theirs,
   so fencing an image client never cuts the heartbeats), on the cluster's pool/namespace.
2. ``join`` (before the configuration service starts): the cluster's configuration, if
   there is one, replaces the local copy; the engine will listen on this gateway's portal
   group only, and extents must be RBD images.
3. ``start`` (after the service applied the configuration): publish it if this is the first
   gateway, make sure this gateway's portal group exists (created with its ``--portal``
   addresses), then heartbeats and LU ownership (cluster/gateways.py).

``stop`` runs after the engine has closed its LUs (their locks released), so that the other
gateways take them over at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pyscsi_target.backstore.rbd import RbdBackstore
from pyscsi_target.cluster.gateways import HEARTBEAT, TIMEOUT, GatewayCluster
from pyscsi_target.cluster.rados import ClusterSettings, IoCtx, Rados
from pyscsi_target.cluster.reservations import ClusterReservations
from pyscsi_target.cluster.shared_config import SharedConfig
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from pyscsi_target.scsi.alua import CLUSTER_SUPPORTED, TRANSITIONING
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.server.engine import Engine
from pyscsi_target.values import format_listen

log = logging.getLogger(__name__)

# The shared-state client must fail rather than hang when the cluster does not answer.
_CONTROL_OPTIONS = (("rados_osd_op_timeout", "10"), ("rados_mon_op_timeout", "10"))


@dataclass(frozen=True)
class GatewayOptions:
    pool: str  # where the shared objects live
    namespace: str
    name: str  # this gateway, unique in the cluster
    portal_group: int  # its portal group tag = its target port group
    heartbeat: float = HEARTBEAT
    timeout: float = TIMEOUT


class ClusterMember:
    def __init__(self, opts: GatewayOptions, ceph: ClusterSettings) -> None:
        self.opts = opts
        self.ceph = ceph
        self.rados: Rados | None = None
        self.io: IoCtx | None = None
        self.shared: SharedConfig | None = None
        self.gateways: GatewayCluster | None = None

    async def connect(self) -> None:
        settings = ClusterSettings(self.ceph.conf, self.ceph.client_id, self.ceph.keyring,
                                   _CONTROL_OPTIONS + self.ceph.options)
        self.rados = await asyncio.to_thread(Rados, settings)
        self.io = await asyncio.to_thread(self.rados.open_ioctx, self.opts.pool, self.opts.namespace)

    async def join(self, service: ConfigService, store: ConfigStore, engine: Engine) -> None:
        assert self.io is not None
        engine.portal_tags = frozenset((self.opts.portal_group,))
        engine.logical_units.on_open.append(self._lu_opened)
        service.rbd_only = True
        self.shared = SharedConfig(self.io, service.changes, store)
        await self.shared.join()

    def _lu_opened(self, lu: LogicalUnit) -> None:
        """An RBD LU shares its reservations with the other gateways, and its groups are
        transitioning until the gateway round has loaded them and settled its owner."""
        if not isinstance(lu.backstore, RbdBackstore):
            return
        assert self.io is not None
        tags = frozenset((self.opts.portal_group,))
        lu.pr = ClusterReservations(lu, self.io, tags)
        lu.on_reset = lu.pr.spread_reset
        lu.alua.supported = CLUSTER_SUPPORTED
        lu.alua.set_states(dict.fromkeys(tags, TRANSITIONING))
        if self.gateways is not None:
            self.gateways.wake()

    async def start(self, service: ConfigService, engine: Engine, portals: list[tuple[str, int]]) -> None:
        assert self.io is not None and self.shared is not None
        await self.shared.start()
        tag = self.opts.portal_group
        if not any(pg.tag == tag for pg in service.model.portal_groups.values()):
            listen = [format_listen(h, p) for h, p in portals]
            await service.create_portal_group({"tag": tag, "listen": listen, "comment": f"gateway {self.opts.name}"})
            log.info("created portal group %d for gateway %s on %s", tag, self.opts.name, ", ".join(listen))
        self.gateways = GatewayCluster(self.io, self.opts.name, frozenset((tag,)), engine.logical_units.all,
                                       heartbeat=self.opts.heartbeat, timeout=self.opts.timeout,
                                       reopen=engine.logical_units.reopen_rbd)
        engine.on_applied.append(self.gateways.wake)  # LUs opened or closed: a round now
        await self.gateways.start()
        log.info("gateway %s serves portal group %d in the cluster (%s)", self.opts.name, tag,
                 "/".join(p for p in (self.opts.pool, self.opts.namespace) if p))

    async def stop(self) -> None:
        if self.gateways is not None:
            await self.gateways.stop()
        if self.shared is not None:
            await self.shared.unfollow()
        if self.io is not None:
            self.io.close()
        if self.rados is not None:
            await asyncio.to_thread(self.rados.shutdown)
