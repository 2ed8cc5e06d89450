"""ConfigService: the one Python API that changes the configuration.

Each method validates with the resource's validator (``config/<resource>.py``, rules in
its field table) and runs the change through ``transaction.Changes``: one SQLite
transaction, then ``engine.apply``, undone if the engine refuses it.  Errors are
``ConfigError``s keyed by model field names; the REST façades map them to their own.

Inputs are mappings keyed by model field names, with values as clients send them (the
validators coerce them: ids as strings, rpm as a number, ...).  Results are detached
copies: the service's model changes only through these methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from pyscsi_target.cluster.rados import ClusterSettings
from pyscsi_target.config.auth_credentials import DEFAULT_TAG, build_auth_credential
from pyscsi_target.config.errors import ConflictError, ValidationError
from pyscsi_target.config.extent_files import ExtentRoots
from pyscsi_target.config.extents import build_extent
from pyscsi_target.config.global_settings import build_global
from pyscsi_target.config.initiator_groups import build_initiator_group
from pyscsi_target.config.lun_maps import build_lun_map
from pyscsi_target.config.model import (
    DEFAULT_BASENAME,
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
from pyscsi_target.config.portal_groups import build_portal_group
from pyscsi_target.config.rbd_images import discard_image, prepare_image
from pyscsi_target.config.store import ConfigStore
from pyscsi_target.config.target_groups import build_target_group
from pyscsi_target.config.targets import build_target
from pyscsi_target.config.transaction import (
    AUTH_CREDENTIALS,
    EXTENTS,
    INITIATOR_GROUPS,
    LUN_MAPS,
    PORTAL_GROUPS,
    TARGET_GROUPS,
    TARGETS,
    Changes,
    Draft,
    EngineLike,
    HasId,
    Kind,
    copy_of,
    lookup,
)
from pyscsi_target.values import parse_listen

log = logging.getLogger(__name__)

T = TypeVar("T")
O = TypeVar("O", bound=HasId)  # noqa: E741
Fields = Mapping[str, object]

DEMO_SIZE = 1 << 30


class ConfigService:
    """Owns the ConfigModel; the REST façades and the daemon change it only through here."""

    def __init__(
        self,
        store: ConfigStore,
        engine: EngineLike | None,
        extent_roots: Iterable[Path | str] | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self._changes = Changes(store, engine)
        self.roots = self._roots(extent_roots)
        #: How RBD extents reach their cluster when they leave a setting empty (daemon options).
        self.ceph = ClusterSettings()
        #: A gateway of a cluster serves RBD images only (a file or disk differs per gateway).
        self.rbd_only = False

    def _roots(self, roots: Iterable[Path | str] | None) -> ExtentRoots:
        return ExtentRoots(list(roots or []) or [self.store.state_dir / "extents"])

    def set_extent_roots(self, roots: Iterable[Path | str] | None) -> None:
        self.roots = self._roots(roots)

    @property
    def extent_roots(self) -> list[Path]:
        return self.roots.roots

    @property
    def changes(self) -> Changes:
        """The commit-and-apply path (the cluster's shared configuration hooks into it)."""
        return self._changes

    @property
    def model(self) -> ConfigModel:
        """The current model.  Read-only for callers: change it through the methods below."""
        return self._changes.model

    async def change(self, edit: Callable[[Draft], T]) -> T:
        """Run ``edit`` on a draft of the model as one change (for views such as the
        Hitachi one that change several objects at once)."""
        return await self._changes.run(edit)

    # --- start-up ----------------------------------------------------------------------

    async def start(self, *, default_portals: Iterable[str] = ("0.0.0.0:3260",), demo: bool = False) -> None:
        """Seed an empty state dir, optionally add the demo target, then apply to the engine.

        The demo (a LUN open to every initiator on every portal group) is added only to a
        state dir that was empty: on a restart, ``--demo`` must not re-export it on portal
        groups the administrator created since, nor bring it back once deleted."""
        async with self._changes.lock:
            fresh = self.store.is_empty()
            if fresh:
                model = ConfigModel(global_config=GlobalConfig(basename=DEFAULT_BASENAME))
                listen = [str(parse_listen(entry, allow_zero=True)) for entry in default_portals]
                with self.store.transaction() as tx:
                    if listen:
                        pg = PortalGroup(id=tx.new_id(PORTAL_GROUPS.attr), tag=1, listen=listen, comment="default")
                        model.portal_groups[pg.id] = pg
                    tx.sync(ConfigModel(), model)
                self._changes.adopt(model)
                log.info("initialised a new configuration in %s", self.store.path)
        if demo and fresh:
            await self.ensure_demo()
        else:
            if demo:
                log.info("--demo: not added, the state dir %s already has a configuration", self.store.state_dir)
            await self._changes.apply_current()

    async def ensure_demo(self, size: int = DEMO_SIZE) -> None:
        """The ``--demo`` target: a sparse 1 GiB file, target ``demo``, LUN 0, open to all."""
        extent = next((e for e in self.model.extents.values() if e.name == "demo"), None)
        if extent is None:
            demo = {"name": "demo", "type": "File", "path": "demo.img", "filesize": str(size)}
            extent = await self.create_extent(demo)
        target = next((t for t in self.model.targets.values() if t.name == "demo"), None)
        if target is None:
            target = await self.create_target({"name": "demo"})
        for pg_id in sorted(self.model.portal_groups):
            if not any(g.portal_group == pg_id for g in self.model.groups_of_target(target.id)):
                await self.create_target_group({"target": target.id, "portal_group": pg_id})
        if not any(m.target == target.id and m.extent == extent.id for m in self.model.lun_maps.values()):
            await self.create_lun_map({"target": target.id, "extent": extent.id, "lunid": None})
        await self._changes.apply_current()

    # --- helpers for the common shapes of change ---------------------------------------

    async def _update(self, kind: Kind[O], label: str, obj_id: object, build: Callable[[ConfigModel, O], O]) -> O:
        def edit(draft: Draft) -> O:
            current = lookup(draft.model, kind, obj_id, label)
            obj = build(draft.model, copy_of(current))
            kind.of(draft.model)[current.id] = obj
            return copy_of(obj)

        return await self._changes.run(edit)

    async def _delete(
        self, kind: Kind[O], label: str, obj_id: object, cascade: Callable[[ConfigModel, O], None]
    ) -> None:
        def edit(draft: Draft) -> None:
            obj = lookup(draft.model, kind, obj_id, label)
            del kind.of(draft.model)[obj.id]
            cascade(draft.model, obj)

        return await self._changes.run(edit)

    async def _create(self, kind: Kind[O], build: Callable[[ConfigModel], O]) -> O:
        def edit(draft: Draft) -> O:
            return copy_of(draft.add(kind, build(draft.model)))

        return await self._changes.run(edit)

    # --- global configuration ----------------------------------------------------------

    async def update_global(self, changes: Fields) -> GlobalConfig:
        def edit(draft: Draft) -> GlobalConfig:
            return dataclasses.replace(build_global(draft.model, changes))

        return await self._changes.run(edit)

    async def set_service_enabled(self, enabled: bool) -> bool:
        def edit(draft: Draft) -> bool:
            draft.model.service_enabled = bool(enabled)
            return draft.model.service_enabled

        return await self._changes.run(edit)

    # --- portal groups -----------------------------------------------------------------

    async def create_portal_group(self, fields: Fields) -> PortalGroup:
        def build(model: ConfigModel) -> PortalGroup:
            tag = max((p.tag for p in model.portal_groups.values()), default=0) + 1
            return build_portal_group(model, fields, PortalGroup(id=0, tag=tag))

        return await self._create(PORTAL_GROUPS, build)

    async def update_portal_group(self, pg_id: object, changes: Fields) -> PortalGroup:
        return await self._update(
            PORTAL_GROUPS, "Portal", pg_id, lambda model, pg: build_portal_group(model, changes, pg)
        )

    async def delete_portal_group(self, pg_id: object) -> None:
        def cascade(model: ConfigModel, pg: PortalGroup) -> None:
            # Django's CASCADE, as FreeNAS: the targets stop being exported on this portal.
            _delete_where(model.target_groups, lambda g: g.portal_group == pg.id)

        await self._delete(PORTAL_GROUPS, "Portal", pg_id, cascade)

    # --- initiator groups --------------------------------------------------------------

    async def create_initiator_group(self, fields: Fields) -> InitiatorGroup:
        def build(model: ConfigModel) -> InitiatorGroup:
            tag = max((i.tag for i in model.initiator_groups.values()), default=0) + 1
            return build_initiator_group(fields, InitiatorGroup(id=0, tag=tag))

        return await self._create(INITIATOR_GROUPS, build)

    async def update_initiator_group(self, ig_id: object, changes: Fields) -> InitiatorGroup:
        return await self._update(
            INITIATOR_GROUPS, "Authorized initiator", ig_id, lambda model, ig: build_initiator_group(changes, ig)
        )

    async def delete_initiator_group(self, ig_id: object) -> None:
        def cascade(model: ConfigModel, ig: InitiatorGroup) -> None:
            # Fail closed: a target group that was restricted by this group is removed rather
            # than silently opened to every initiator.
            _delete_where(model.target_groups, lambda g: g.initiator_group == ig.id)

        await self._delete(INITIATOR_GROUPS, "Authorized initiator", ig_id, cascade)

    # --- auth credentials --------------------------------------------------------------

    async def create_auth_credential(self, fields: Fields) -> AuthCredential:
        return await self._create(
            AUTH_CREDENTIALS,
            lambda model: build_auth_credential(fields, AuthCredential(id=0, tag=DEFAULT_TAG, user="", secret="")),
        )

    async def update_auth_credential(self, ac_id: object, changes: Fields) -> AuthCredential:
        return await self._update(
            AUTH_CREDENTIALS, "Auth credential", ac_id, lambda model, ac: build_auth_credential(changes, ac)
        )

    async def delete_auth_credential(self, ac_id: object) -> None:
        # Target groups keep their CHAP requirement: with no credential left, logins fail
        # (closed) instead of becoming unauthenticated.
        await self._delete(AUTH_CREDENTIALS, "Auth credential", ac_id, lambda model, ac: None)

    # --- targets -----------------------------------------------------------------------

    async def create_target(self, fields: Fields) -> Target:
        return await self._create(TARGETS, lambda model: build_target(model, fields, Target(id=0, name="")))

    async def update_target(self, target_id: object, changes: Fields) -> Target:
        return await self._update(TARGETS, "Target", target_id, lambda model, t: build_target(model, changes, t))

    async def delete_target(self, target_id: object) -> None:
        def cascade(model: ConfigModel, t: Target) -> None:
            count = self.engine.session_count(t.id) if self.engine is not None else 0
            if count > 0:
                raise ConflictError("Target is in use")
            _delete_where(model.target_groups, lambda g: g.target == t.id)
            _delete_where(model.lun_maps, lambda m: m.target == t.id)

        await self._delete(TARGETS, "Target", target_id, cascade)

    # --- target groups -----------------------------------------------------------------

    async def create_target_group(self, fields: Fields) -> TargetGroup:
        return await self._create(
            TARGET_GROUPS,
            lambda model: build_target_group(model, fields, TargetGroup(id=0, target=0, portal_group=0)),
        )

    async def update_target_group(self, tg_id: object, changes: Fields) -> TargetGroup:
        return await self._update(
            TARGET_GROUPS, "Target group", tg_id, lambda model, g: build_target_group(model, changes, g)
        )

    async def delete_target_group(self, tg_id: object) -> None:
        await self._delete(TARGET_GROUPS, "Target group", tg_id, lambda model, g: None)

    # --- extents -----------------------------------------------------------------------

    async def create_extent(self, fields: Fields) -> Extent:
        def edit(draft: Draft) -> Extent:
            e, size = build_extent(draft.model, self.roots, fields, Extent(id=0, name="", filesize=""), None)
            if e.type == "File" and size is not None and self.roots.realise(e.path, size):
                draft.on_undo(lambda: self.roots.remove(e.path))
            return copy_of(draft.add(EXTENTS, e))

        preview = build_extent(self.model.copy(), self.roots, fields, Extent(id=0, name="", filesize=""), None)[0]
        return await self._with_rbd_image(preview, None, lambda: self._changes.run(edit))

    async def update_extent(self, extent_id: object, changes: Fields) -> Extent:
        def build(model: ConfigModel, current: Extent) -> Extent:
            old = model.extents[current.id]
            e, size = build_extent(model, self.roots, changes, current, old)
            if e.type == "File" and size is not None:
                self.roots.realise(e.path, size)
            return e

        model = self.model.copy()
        current = lookup(model, EXTENTS, extent_id, "Extent")
        preview = build_extent(model, self.roots, changes, copy_of(current), current)[0]
        return await self._with_rbd_image(preview, current,
                                          lambda: self._update(EXTENTS, "Extent", extent_id, build))

    async def _with_rbd_image(self, e: Extent, old: Extent | None, change: Callable[[], Awaitable[T]]) -> T:
        """Run ``change`` once an RBD extent's image exists with its size (created or grown in a
        thread: that waits for the cluster); an image made for a change that fails is removed."""
        if self.rbd_only and e.type != "RBD":
            raise ValidationError({"type": ["Gateways of a cluster serve RBD extents only: a File or Disk extent "
                                            "would hold different data on each gateway."]})
        if e.type != "RBD" or (old is not None and (old.type, old.path, old.filesize, old.ceph_conf)
                                == (e.type, e.path, e.filesize, e.ceph_conf)):
            return await change()
        prepared = await asyncio.to_thread(prepare_image, e, self.ceph)
        try:
            return await change()
        except BaseException:
            await asyncio.to_thread(discard_image, prepared)
            raise

    async def delete_extent(self, extent_id: object, delete_file: bool = False) -> None:
        def edit(draft: Draft) -> None:
            e = lookup(draft.model, EXTENTS, extent_id, "Extent")
            del draft.model.extents[e.id]
            _delete_where(draft.model.lun_maps, lambda m: m.extent == e.id)
            if delete_file and e.type == "File":
                draft.on_commit(lambda: self.roots.remove(e.path))

        await self._changes.run(edit)

    # --- LUN maps ----------------------------------------------------------------------

    async def create_lun_map(self, fields: Fields) -> LunMap:
        return await self._create(
            LUN_MAPS,
            lambda model: build_lun_map(model, fields, LunMap(id=0, target=0, extent=0, lunid=0), auto_lun=True),
        )

    async def update_lun_map(self, map_id: object, changes: Fields) -> LunMap:
        return await self._update(
            LUN_MAPS, "Target to extent", map_id, lambda model, m: build_lun_map(model, changes, m, auto_lun=False)
        )

    async def delete_lun_map(self, map_id: object) -> None:
        await self._delete(LUN_MAPS, "Target to extent", map_id, lambda model, m: None)


def _delete_where(objs: dict[int, T], doomed: Callable[[T], bool]) -> None:
    for key in [k for k, v in objs.items() if doomed(v)]:
        del objs[key]
