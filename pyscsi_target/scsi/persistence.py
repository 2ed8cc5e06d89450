"""Durable LU state (persistent reservations with APTPL, saved mode pages, an unfinished
SANITIZE) kept in a StateStore without blocking the event loop.

The state itself changes in memory on the loop, as the command runs; ``StateWriter.save``
queues the new value and a thread of its own commits the queue to the store in order.
The command's completion is the ``done`` callback, run on the loop once its value (or a
later value of the same key) is committed: an acknowledged PERSISTENT RESERVE OUT is on
stable storage, and acknowledgements come in the order the changes were made.

A value equal to the one the store already holds needs no commit: ``done`` then runs at
once (after the commit of an equal value still queued, if there is one).  So the PR OUTs
of a LU without APTPL cost no fsync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from pyscsi_target.backstore.batch_queue import BatchQueue

log = logging.getLogger(__name__)

#: Called on the loop thread with None once committed, or with what the store raised.
Committed = Callable[[BaseException | None], None]

class StateStore(Protocol):
    """Durable key/value records (the state database).  ``save`` of None deletes; a
    ``save`` that returns has reached stable storage.  Called from one thread at a time."""

    def load(self, key: str) -> bytes | None: ...

    def save(self, key: str, data: bytes | None) -> None: ...


class _Commit:
    __slots__ = ("key", "data", "waiters")

    def __init__(self, key: str, data: bytes | None) -> None:
        self.key = key
        self.data = data
        self.waiters: list[Committed] = []


class StateWriter(BatchQueue[_Commit]):
    """Reads a StateStore at once and commits to it in order on its own thread."""

    def __init__(self, store: StateStore) -> None:
        super().__init__("state-writer")
        self.store = store
        # Loop-thread bookkeeping: the newest commit queued per key, and the value the
        # store is known to hold per key (loaded or committed).
        self._pending: dict[str, _Commit] = {}
        self._known: dict[str, bytes | None] = {}

    def load(self, key: str) -> bytes | None:
        """The current value of ``key``, including a queued one not yet committed."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending.data
        if key in self._known:
            return self._known[key]
        data = self.store.load(key)
        self._known[key] = data
        return data

    def save(self, key: str, data: bytes | None, done: Committed | None = None) -> None:
        """Queue ``data`` for ``key`` (loop thread); ``done`` runs once it is durable."""
        data = bytes(data) if data is not None else None
        pending = self._pending.get(key)
        if pending is not None:
            if pending.data == data:
                if done is not None:
                    pending.waiters.append(done)
                return
        elif key in self._known and self._known[key] == data:
            if done is not None:
                done(None)
            return
        item = _Commit(key, data)
        if done is not None:
            item.waiters.append(done)
        self._pending[key] = item
        self.put(item)

    def close(self) -> None:
        """Commit what is queued, then end the thread (blocking; before the store closes)."""
        self.stop()

    def process(self, batch: list[_Commit]) -> Callable[[], None]:
        # Within a batch only the newest value of a key is written: it supersedes the
        # older ones, whose waiters complete with it.
        newest = {item.key: i for i, item in enumerate(batch)}
        errors: dict[str, BaseException] = {}
        for i, item in enumerate(batch):
            if newest[item.key] != i:
                continue
            try:
                self.store.save(item.key, item.data)
            except Exception as exc:  # noqa: BLE001 - reported to every waiter of the key
                log.error("saving state %s failed: %r", item.key, exc)
                errors[item.key] = exc
        return partial(self._committed, batch, errors)

    def _committed(self, batch: list[_Commit], errors: dict[str, BaseException]) -> None:
        for item in batch:
            exc = errors.get(item.key)
            if self._pending.get(item.key) is item:
                del self._pending[item.key]
                if exc is None:
                    self._known[item.key] = item.data
                else:
                    self._known.pop(item.key, None)  # unknown now: the next save commits
            for done in item.waiters:
                try:
                    done(exc)
                except Exception:  # noqa: BLE001 - one waiter must not starve the others
                    log.exception("state commit callback of %s", item.key)
