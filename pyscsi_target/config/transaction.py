"""The commit-and-apply path every configuration change takes.

Changes run one at a time under an asyncio lock (two concurrent creates of the same name
give one success and one conflict):

    edit a copy of the model inside one SQLite transaction (validate, allocate ids)
    -> commit -> ``await engine.apply(model.copy())`` -> the new model is current.

If the edit raises, the transaction rolls back and nothing changed.  If the engine cannot
apply the result (a portal address bound by another program, say), the database and the
in-memory model are put back, the old model is re-applied and the change's undo actions
run, so that the persisted state and the running target never disagree.

Gateways of a cluster share one configuration (cluster/shared_config.py, the ``publisher``):
a committed change is published there before the engine applies it.  When another gateway
published first, this change is rolled back, theirs is installed, and the edit runs again on
it; a change made elsewhere arrives through ``install``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from pyscsi_target.config.errors import ConflictError, NotFoundError, ValidationError
from pyscsi_target.config.model import (
    AuthCredential,
    ConfigModel,
    Extent,
    InitiatorGroup,
    LunMap,
    PortalGroup,
    Target,
    TargetGroup,
)
from pyscsi_target.config.store import ConfigStore, StoreTransaction

log = logging.getLogger(__name__)

T = TypeVar("T")


class HasId(Protocol):
    """A model object: a dataclass with an id."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    id: int


O = TypeVar("O", bound=HasId)  # noqa: E741


class EngineLike(Protocol):
    """The engine as the configuration uses it."""

    async def apply(self, model: ConfigModel) -> None: ...

    def session_count(self, target_id: int) -> int: ...


@dataclass(frozen=True)
class SharedModel:
    """A configuration committed to the cluster: the model and its id sequences."""

    model: ConfigModel
    id_sequences: dict[str, int]


class Publisher(Protocol):
    """Where every change must land before it takes effect (the cluster's configuration)."""

    async def publish(self, old: ConfigModel, new: ConfigModel) -> SharedModel | None:
        """Make ``new`` the shared configuration in place of ``old``: None once done, or the
        shared configuration another gateway committed since ``old`` (nothing published)."""
        ...


#: How often a change is edited again on a newer shared configuration before giving up.
PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class Kind(Generic[O]):
    """One object collection of the model: its ConfigModel attribute (= store table)."""

    attr: str
    cls: type[O]

    def of(self, model: ConfigModel) -> dict[int, O]:
        return cast(dict[int, O], getattr(model, self.attr))


PORTAL_GROUPS = Kind("portal_groups", PortalGroup)
INITIATOR_GROUPS = Kind("initiator_groups", InitiatorGroup)
AUTH_CREDENTIALS = Kind("auth_credentials", AuthCredential)
TARGETS = Kind("targets", Target)
TARGET_GROUPS = Kind("target_groups", TargetGroup)
EXTENTS = Kind("extents", Extent)
LUN_MAPS = Kind("lun_maps", LunMap)


def lookup(model: ConfigModel, kind: Kind[O], obj_id: object, label: str) -> O:
    """The object ``obj_id`` (an int or a decimal string) of ``kind``; NotFoundError if none."""
    objs = kind.of(model)
    key: int | None = None
    if isinstance(obj_id, int | float | str) and not isinstance(obj_id, bool):
        try:
            key = int(obj_id)
        except (ValueError, OverflowError):
            pass
    if key is None or key not in objs:
        raise NotFoundError(f"{label} {obj_id} does not exist.")
    return objs[key]


class Draft:
    """A change in progress: a copy of the model to edit, new ids, undo actions."""

    def __init__(self, model: ConfigModel, tx: StoreTransaction) -> None:
        self.model = model
        self._tx = tx
        self.undo: list[Callable[[], None]] = []
        self.done: list[Callable[[], None]] = []

    def new_id(self, kind: Kind[Any]) -> int:
        """The next never-used id of ``kind`` (rolled back with the transaction)."""
        return self._tx.new_id(kind.attr)

    def add(self, kind: Kind[O], obj: O) -> O:
        obj.id = self.new_id(kind)
        kind.of(self.model)[obj.id] = obj
        return obj

    @property
    def store(self) -> StoreTransaction:
        """The store transaction the change is written in (for what the model does not hold:
        id sequences, API keys)."""
        return self._tx

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run ``action`` if the change does not take effect (a file created for it, say)."""
        self.undo.append(action)

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the change has taken effect (still under the change lock)."""
        self.done.append(action)


class Changes:
    """Owns the current model and runs every change through the commit-and-apply path."""

    def __init__(self, store: ConfigStore, engine: EngineLike | None) -> None:
        self.store = store
        self.engine = engine
        self.lock = asyncio.Lock()
        self.model = store.load()
        self.publisher: Publisher | None = None

    async def run(self, edit: Callable[[Draft], T]) -> T:
        """Apply ``edit`` to a copy of the model; returns what ``edit`` returned."""

        # Shielded: a client hanging up must not leave a change persisted but half-applied.
        async def locked() -> T:
            async with self.lock:
                return await self._commit(edit)

        return await asyncio.shield(asyncio.ensure_future(locked()))

    async def apply_current(self) -> None:
        """Hand the current model to the engine again (start-up)."""
        async with self.lock:
            if self.engine is not None:
                await self.engine.apply(self.model.copy())

    async def _commit(self, edit: Callable[[Draft], T]) -> T:
        for _attempt in range(PUBLISH_ATTEMPTS):
            old = self.model
            draft: Draft | None = None
            try:
                with self.store.transaction() as tx:
                    draft = Draft(old.copy(), tx)
                    result = edit(draft)
                    tx.sync(old, draft.model)
                self.model = draft.model
                if self.publisher is not None and not await self._publish(old, draft.model):
                    for action in reversed(draft.undo):
                        action()
                    continue  # another gateway's change came first: edit again on top of it
                if self.engine is not None:
                    await self._apply(old, draft.model)
                for action in draft.done:
                    action()
            except BaseException:
                for action in reversed(draft.undo if draft is not None else []):
                    action()
                raise
            return result
        raise ConflictError({"__all__": ["The configuration kept changing on other gateways; try again."]})

    async def _publish(self, old: ConfigModel, new: ConfigModel) -> bool:
        """Publish a committed change; False when another gateway's change came first (this
        one is then rolled back and theirs installed)."""
        assert self.publisher is not None
        try:
            newer = await self.publisher.publish(old, new)
        except BaseException:
            self._restore(new, old)
            raise
        if newer is None:
            return True
        self._restore(new, old)
        await self.install(newer)
        return False

    def _restore(self, current: ConfigModel, previous: ConfigModel) -> None:
        with self.store.transaction() as tx:
            tx.sync(current, previous)
        self.model = previous

    async def install(self, shared: SharedModel) -> None:
        """Make a configuration committed by another gateway the current one: stored, then
        applied.  The caller holds ``lock``."""
        with self.store.transaction() as tx:
            tx.sync(self.model, shared.model)
            for kind, last in shared.id_sequences.items():
                tx.raise_id_sequence(kind, last)
        self.model = shared.model
        if self.engine is not None:
            try:
                await self.engine.apply(shared.model.copy())
            except Exception:  # noqa: BLE001 - the configuration stands; what failed is logged
                log.exception("the engine could not apply the configuration of the cluster")

    async def _apply(self, old: ConfigModel, new: ConfigModel) -> None:
        assert self.engine is not None
        try:
            await self.engine.apply(new.copy())
        except Exception as exc:
            log.exception("engine could not apply the new configuration; reverting it")
            self._restore(new, old)
            if self.publisher is not None:
                try:
                    await self.publisher.publish(new, old)
                except Exception:  # noqa: BLE001 - the local revert stands
                    log.exception("could not revert the shared configuration")
            try:
                await self.engine.apply(old.copy())
            except Exception:
                log.exception("engine could not re-apply the previous configuration either")
            raise ValidationError(f"The running target could not apply this change: {exc}") from exc


def copy_of(obj: O) -> O:
    """A detached copy of a model object (callers must not edit the service's model)."""
    return dataclasses.replace(obj)
