"""The commit-and-apply path every configuration change takes.

Changes are serialised (two concurrent creates of the same name give one success and one
conflict) and *group-committed*: every change queued while a commit is in flight joins the
next batch, which costs one SQLite transaction and one fsync however many changes it holds.
For each batch:

    each change edits a copy of the model as its predecessor left it (validate, allocate
    ids in memory); a change whose edit raises is dropped alone, its ids and undo actions
    rolled back
    -> the rows that changed, and the id sequences, are committed in the commit thread
       (the fsync never runs on the event loop)
    -> ``await engine.apply(model.copy())``, which reconciles only what changed
    -> every change of the batch gets its result.

A model copy shares its objects (they are sealed once an edit returns: config/model.py), so
a change costs in proportion to what it changes, not to the size of the configuration.  If
the commit fails, every change of the batch fails and nothing changed.  If the engine cannot
apply the result (a portal address bound by another program, say), the database and the
in-memory model are put back and the old model is re-applied; a lone change then fails, a
batch is retried one change at a time, so that only the culprit fails and the persisted state
and the running target never disagree.

Gateways of a cluster share one configuration (cluster/shared_config.py, the ``publisher``):
a committed batch is published there before the engine applies it.  When another gateway
published first, the batch is rolled back, theirs is installed, and the batch's edits run
again on it; a change made elsewhere arrives through ``install``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    Sealable,
    Target,
    TargetGroup,
    copy_object,
)
from pyscsi_target.config.store import KINDS, ConfigStore, StoreTransaction

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


class IdAllocator:
    """The next id of every object kind, handed out in memory and persisted (sqlite_sequence)
    with the commit that uses them; ids are never handed out twice, as with AUTOINCREMENT."""

    def __init__(self, last: dict[str, int]) -> None:
        self.last = {kind: last.get(kind, 0) for kind in KINDS}

    def new(self, kind: str) -> int:
        if kind not in self.last:
            raise KeyError(kind)
        self.last[kind] += 1
        return self.last[kind]

    def raise_to(self, kind: str, last: int) -> None:
        self.last[kind] = max(self.last[kind], last)

    def snapshot(self) -> dict[str, int]:
        return dict(self.last)

    def restore(self, snapshot: dict[str, int]) -> None:
        self.last = dict(snapshot)


StoreOp = Callable[[StoreTransaction], None]


class DeferredStore:
    """What an edit may ask of the store besides model rows, done in its batch's commit."""

    def __init__(self, ids: IdAllocator, ops: list[StoreOp]) -> None:
        self._ids = ids
        self._ops = ops

    def raise_id_sequence(self, kind: str, last: int) -> None:
        """Never hand out an id of ``kind`` up to ``last`` again."""
        self._ids.raise_to(kind, last)
        self._ops.append(lambda tx: tx.raise_id_sequence(kind, last))

    def replace_api_keys(self, rows: list[dict[str, Any]]) -> None:
        self._ops.append(lambda tx: tx.replace_api_keys(rows))


class Draft:
    """A change in progress: a copy of the model to edit, new ids, undo actions.

    The copy shares the committed objects, which are sealed: to change one, take your own
    copy with ``own`` (or build a new object and put it in place)."""

    def __init__(self, model: ConfigModel, ids: IdAllocator) -> None:
        self.model = model
        self._ids = ids
        self.ops: list[StoreOp] = []
        self.undo: list[Callable[[], None]] = []
        self.done: list[Callable[[], None]] = []

    def new_id(self, kind: Kind[Any]) -> int:
        """The next never-used id of ``kind`` (given back if the change does not commit)."""
        return self._ids.new(kind.attr)

    def add(self, kind: Kind[O], obj: O) -> O:
        obj.id = self.new_id(kind)
        kind.of(self.model)[obj.id] = obj
        return obj

    def own(self, kind: Kind[O], obj: O) -> O:
        """This draft's own, assignable copy of ``obj``, put in its place in the model."""
        objs = kind.of(self.model)
        current = objs[obj.id]
        if not cast(Sealable, current)._sealed:
            return current
        mine = copy_object(cast(Any, current))
        objs[obj.id] = mine
        return cast(O, mine)

    @property
    def store(self) -> DeferredStore:
        """The store beyond the model rows (id sequences, API keys), written with the change."""
        return DeferredStore(self._ids, self.ops)

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run ``action`` if the change does not take effect (a file created for it, say)."""
        self.undo.append(action)

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the change has taken effect (still under the change lock)."""
        self.done.append(action)


#: Changes committed together at most (a batch's edits run back to back on the loop).
MAX_BATCH = 256


@dataclass(eq=False)
class _Change:
    edit: Callable[[Draft], Any]
    future: asyncio.Future[Any]
    alone: bool = False  # retried on its own after its batch could not be applied
    attempts: int = 0  # times another gateway's change came first (cluster)
    draft: Draft | None = None
    result: Any = None


def _run_undo(draft: Draft | None) -> None:
    for action in reversed(draft.undo if draft is not None else []):
        try:
            action()
        except Exception:  # noqa: BLE001 - the others must run
            log.exception("undo action of a failed configuration change")


def _settle(ch: _Change, exc: BaseException | None) -> None:
    if ch.future.done():
        return
    if exc is None:
        ch.future.set_result(ch.result)
    else:
        ch.future.set_exception(exc)


class Changes:
    """Owns the current model and runs every change through the commit-and-apply path."""

    def __init__(self, store: ConfigStore, engine: EngineLike | None) -> None:
        self.store = store
        self.engine = engine
        self.lock = asyncio.Lock()
        self.model = store.load()
        self.model.seal()
        self.ids = IdAllocator(store.id_sequences())
        self._queue: list[_Change] = []
        self._worker: asyncio.Task[None] | None = None
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="config-commit")
        self.publisher: Publisher | None = None

    def adopt(self, model: ConfigModel) -> None:
        """Make ``model``, just written to the store by the caller, current (seeding)."""
        model.seal()
        self.model = model
        self.ids = IdAllocator(self.store.id_sequences())

    async def run(self, edit: Callable[[Draft], T]) -> T:
        """Apply ``edit`` to a copy of the model; returns what ``edit`` returned.

        A client hanging up does not cancel the change: once queued it is committed or
        refused like any other."""
        loop = asyncio.get_running_loop()
        ch = _Change(edit, loop.create_future())
        ch.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        self._queue.append(ch)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain(), name="config-changes")
        return cast(T, await asyncio.shield(ch.future))

    async def apply_current(self) -> None:
        """Hand the current model to the engine again (start-up)."""
        async with self.lock:
            if self.engine is not None:
                await self.engine.apply(self.model.copy())

    async def _drain(self) -> None:
        while self._queue:
            if self._queue[0].alone:
                batch = [self._queue.pop(0)]
            else:
                n = 0
                while n < len(self._queue) and n < MAX_BATCH and not self._queue[n].alone:
                    n += 1
                batch, self._queue = self._queue[:n], self._queue[n:]
            try:
                async with self.lock:
                    await self._commit(batch)
            except BaseException as exc:  # a bug or a cancellation: nobody may wait forever
                for ch in batch:
                    _settle(ch, exc if isinstance(exc, Exception) else RuntimeError("configuration change aborted"))
                if not isinstance(exc, Exception):
                    raise
                log.exception("configuration batch failed")

    async def _commit(self, batch: list[_Change]) -> None:
        base = self.model
        ids_before = self.ids.snapshot()
        current = base
        accepted: list[_Change] = []
        for ch in batch:
            ids = self.ids.snapshot()
            draft = Draft(current.copy(), self.ids)
            try:
                ch.result = ch.edit(draft)
            except Exception as exc:
                self.ids.restore(ids)
                _run_undo(draft)
                _settle(ch, exc)
                continue
            draft.model.seal()  # what it created or copied: shared from now on
            ch.draft = draft
            current = draft.model
            accepted.append(ch)
        if not accepted:
            return
        loop = asyncio.get_running_loop()
        sequences = self.ids.snapshot()
        ops = [op for ch in accepted for op in (ch.draft.ops if ch.draft else [])]
        try:
            await loop.run_in_executor(self._commit_thread, self._persist, base, current, sequences, ops)
        except Exception as exc:
            self.ids.restore(ids_before)
            for ch in reversed(accepted):
                _run_undo(ch.draft)
                _settle(ch, exc)
            return
        self.model = current
        if self.publisher is not None and not await self._publish(base, current, ids_before, accepted):
            return
        if self.engine is not None and not await self._apply(base, current, accepted):
            return
        for ch in accepted:
            for action in ch.draft.done if ch.draft else []:
                action()
            _settle(ch, None)

    def _persist(self, old: ConfigModel, new: ConfigModel, sequences: dict[str, int], ops: list[StoreOp]) -> None:
        """The commit thread: one transaction, one fsync, for the whole batch."""
        with self.store.transaction() as tx:
            tx.sync(old, new)
            for kind, last in sequences.items():
                if last:
                    tx.raise_id_sequence(kind, last)
            for op in ops:
                op(tx)

    async def _revert(self, current: ConfigModel, previous: ConfigModel) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._commit_thread, self._persist, current, previous, {}, [])
        self.model = previous

    async def _publish(self, old: ConfigModel, new: ConfigModel, ids_before: dict[str, int],
                       batch: list[_Change]) -> bool:
        """Publish a committed batch to the cluster; False when it did not take effect (another
        gateway's change came first: theirs is installed and the batch edited again on it)."""
        assert self.publisher is not None
        failure: Exception | None = None
        try:
            newer = await self.publisher.publish(old, new)
        except Exception as exc:
            newer, failure = None, exc
        else:
            if newer is None:
                return True
        await self._revert(new, old)
        self.ids.restore(ids_before)
        for ch in reversed(batch):
            _run_undo(ch.draft)
        if failure is not None:
            for ch in batch:
                _settle(ch, failure)
            return False
        assert newer is not None
        await self.install(newer)
        retry = []
        for ch in batch:
            if ch.attempts + 1 >= PUBLISH_ATTEMPTS:
                _settle(ch, ConflictError({"__all__": [
                    "The configuration kept changing on other gateways; try again."]}))
            else:
                retry.append(_Change(ch.edit, ch.future, alone=ch.alone, attempts=ch.attempts + 1))
        self._queue[:0] = retry
        return False

    async def install(self, shared: SharedModel) -> None:
        """Make a configuration committed by another gateway the current one: stored, then
        applied.  The caller holds ``lock``."""
        shared.model.seal()
        sequences = {kind: last for kind, last in shared.id_sequences.items() if kind in self.ids.last}
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._commit_thread, self._persist, self.model, shared.model, sequences, [])
        for kind, last in sequences.items():
            self.ids.raise_to(kind, last)
        self.model = shared.model
        if self.engine is not None:
            try:
                await self.engine.apply(shared.model.copy())
            except Exception:  # noqa: BLE001 - the configuration stands; what failed is logged
                log.exception("the engine could not apply the configuration of the cluster")

    async def _apply(self, old: ConfigModel, new: ConfigModel, batch: list[_Change]) -> bool:
        """Put ``new`` into effect; on failure restore ``old`` and settle ``batch``."""
        assert self.engine is not None
        try:
            await self.engine.apply(new.copy())
            return True
        except Exception as exc:
            log.exception("engine could not apply the new configuration; reverting it")
            await self._revert(new, old)
            if self.publisher is not None:
                try:
                    await self.publisher.publish(new, old)
                except Exception:  # noqa: BLE001 - the local revert stands
                    log.exception("could not revert the shared configuration")
            try:
                await self.engine.apply(old.copy())
            except Exception:
                log.exception("engine could not re-apply the previous configuration either")
            for ch in reversed(batch):
                _run_undo(ch.draft)
            if len(batch) == 1:
                _settle(batch[0], ValidationError(f"The running target could not apply this change: {exc}"))
            else:  # find the culprit: each change again, on its own
                retry = [_Change(ch.edit, ch.future, alone=True) for ch in batch]
                self._queue[:0] = retry
            return False


def copy_of(obj: O) -> O:
    """A detached copy of a model object (callers must not edit the service's model)."""
    return cast(O, copy_object(cast(Any, obj)))
