"""The configuration every gateway of a cluster serves, kept in one RADOS object.

The object ``pyscsi-target.config`` (in the cluster's pool and namespace) holds two omap
keys: ``version``, a counter, and ``model``, the whole configuration as JSON (every object
with its id, the global settings, and the id sequences, so that no gateway hands out an id
another one used).  Each gateway's SQLite store stays its local copy; API keys and the
admin password stay per gateway.

- A change made on any gateway is committed locally, then published with one omap
  compare-and-swap on ``version`` (the OSD applies it only if nobody published since this
  gateway's version), then applied by the engine; the other gateways are notified.  A
  refused CAS means another gateway's change came first: it is installed and the change
  is edited again on top of it (config/transaction.py).
- Every gateway watches the object.  A notify (delivered in about a millisecond, measured
  in docs/ceph.md), a lost watch, or the periodic check makes it read the object and
  install a newer version through the same reconcile path as a local change, so a REST
  change on one gateway is served by the others within a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
from collections.abc import Mapping
from typing import Any

from pyscsi_target.cluster.follower import Follower
from pyscsi_target.cluster.rados import IoCtx, RadosError
from pyscsi_target.config.errors import ValidationError
from pyscsi_target.config.model import (
    AuthCredential,
    ConfigModel,
    Extent,
    GlobalConfig,
    InitiatorGroup,
    LunMap,
    PortalGroup,
    Target,
    TargetGroup,
)
from pyscsi_target.config.store import ConfigStore
from pyscsi_target.config.transaction import Changes, SharedModel

log = logging.getLogger(__name__)

CONFIG_OID = "pyscsi-target.config"
FORMAT = 1
#: Seconds between checks of the shared version without a notify (a missed one, a lost watch).
RECHECK = 5.0

_KINDS: dict[str, type] = {
    "portal_groups": PortalGroup,
    "initiator_groups": InitiatorGroup,
    "auth_credentials": AuthCredential,
    "targets": Target,
    "target_groups": TargetGroup,
    "extents": Extent,
    "lun_maps": LunMap,
}


def encode(model: ConfigModel, id_sequences: Mapping[str, int]) -> bytes:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "global_config": dataclasses.asdict(model.global_config),
        "service_enabled": model.service_enabled,
        "id_sequences": dict(id_sequences),
    }
    for kind in _KINDS:
        objs = getattr(model, kind)
        doc[kind] = [dataclasses.asdict(objs[k]) for k in sorted(objs)]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _build(cls: type, row: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in names})  # fields of a newer release are dropped


def decode(data: bytes) -> SharedModel:
    doc = json.loads(data)
    if doc.get("format") != FORMAT:
        raise ValueError(f"shared configuration format {doc.get('format')!r} is not {FORMAT}")
    model = ConfigModel(global_config=_build(GlobalConfig, doc["global_config"]),
                        service_enabled=bool(doc["service_enabled"]))
    for kind, cls in _KINDS.items():
        objs = getattr(model, kind)
        for row in doc[kind]:
            obj = _build(cls, row)
            objs[obj.id] = obj
    return SharedModel(model, {k: int(v) for k, v in doc["id_sequences"].items()})


class SharedConfig(Follower):
    """This gateway's side of the shared configuration: publisher of its changes (installed
    as ``Changes.publisher``) and installer of the others'."""

    def __init__(self, io: IoCtx, changes: Changes, store: ConfigStore) -> None:
        super().__init__(io, CONFIG_OID, RECHECK)
        self.changes = changes
        self.store = store
        self.version = 0  # the shared version this gateway holds (0: none yet)

    # --- reading ---------------------------------------------------------------------------

    def read(self) -> tuple[int, SharedModel | None]:
        """(version, configuration) as the cluster holds them now (blocking)."""
        try:
            values = self.io.omap_get(CONFIG_OID)
        except RadosError as exc:
            if exc.errno == errno.ENOENT:  # no gateway has published yet
                return 0, None
            raise
        if not values.get("version"):
            return 0, None
        return int(values["version"]), decode(values["model"])

    # --- start-up ----------------------------------------------------------------------------

    async def join(self) -> None:
        """Before the engine serves anything: take the cluster's configuration if there is one
        (the local store is then only a copy of it)."""
        version, shared = await asyncio.to_thread(self.read)
        async with self.changes.lock:
            if shared is not None:
                await self.changes.install(shared)
                self.version = version
                log.info("joined the cluster configuration at version %d", version)
            self.changes.publisher = self

    async def start(self) -> None:
        """Publish the local configuration if the cluster has none yet (the first gateway),
        then follow the others' changes."""
        async with self.changes.lock:
            if self.version == 0:
                newer = await self.publish(ConfigModel(), self.changes.model)
                if newer is not None:
                    await self.changes.install(newer)
                else:
                    log.info("published this gateway's configuration as the cluster's first")
        await self.follow()

    # --- publishing (Changes.publisher) --------------------------------------------------------

    async def publish(self, old: ConfigModel, new: ConfigModel) -> SharedModel | None:
        data = encode(new, self.store.id_sequences())
        base = str(self.version).encode() if self.version else b""
        try:
            done = await asyncio.to_thread(self.io.omap_cas, CONFIG_OID, {"version": base},
                                           {"version": str(self.version + 1).encode(), "model": data}, (), True)
        except RadosError as exc:  # nothing changed anywhere: say why
            raise ValidationError(f"The change was not made: the cluster holding the configuration did not "
                                  f"take it ({exc}).") from exc
        if done:
            self.version += 1
            self.announce(str(self.version).encode())
            return None
        version, shared = await asyncio.to_thread(self.read)
        if shared is None:
            raise RadosError(errno.EIO, "the shared configuration vanished while it was being changed")
        self.version = version
        return shared

    # --- following the others ---------------------------------------------------------------------

    async def round(self) -> None:
        await self.refresh()

    async def refresh(self) -> bool:
        """Install the shared configuration if it is newer than this gateway's; True if it was."""
        async with self.changes.lock:
            version, shared = await asyncio.to_thread(self.read)
            if shared is None or version <= self.version:
                return False
            log.info("installing the cluster configuration version %d (had %d)", version, self.version)
            self.version = version
            await self.changes.install(shared)
            return True
