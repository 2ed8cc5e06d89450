"""A RADOS object that every gateway watches and acts on: the pattern the shared configuration
and the gateway membership share.

``round()`` runs on the event loop whenever the object is notified, when the watch was lost
(notifies may have been missed: it is registered again), and every ``period`` seconds
otherwise; rounds never overlap.  ``announce()`` notifies the other watchers in the
background: a dead gateway's watch would hold a notify until its timeout, so nobody waits
for the acknowledgements.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

from pyscsi_target.cluster.rados import IoCtx, Notification, Watch

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT_MS = 1000


class Follower(ABC):
    def __init__(self, io: IoCtx, oid: str, period: float) -> None:
        self.io = io
        self.oid = oid
        self.period = period
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._rewatch = False
        self._round_lock = asyncio.Lock()
        self._notifies: set[asyncio.Task[Any]] = set()

    @abstractmethod
    async def round(self) -> None:
        """Read the object and act on it (called with no other round running)."""

    async def run_round(self) -> None:
        async with self._round_lock:
            await self.round()

    def wake(self) -> None:
        """Run a round soon."""
        self._wakeup.set()

    async def follow(self) -> None:
        """Watch the object and start the rounds (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._watch = await asyncio.to_thread(self.io.watch, self.oid, self._notified, self._watch_lost, loop)
        self._task = loop.create_task(self._run())

    async def unfollow(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._notifies):
            task.cancel()
        if self._watch is not None:
            watch, self._watch = self._watch, None
            await asyncio.to_thread(watch.close)

    def announce(self, payload: bytes) -> None:
        """Notify the other watchers, in the background."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.io.notify, self.oid, payload, NOTIFY_TIMEOUT_MS))
        self._notifies.add(task)
        task.add_done_callback(self._announced)

    def _announced(self, task: asyncio.Task[Any]) -> None:
        self._notifies.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("notifying the watchers of %s failed: %s", self.oid, task.exception())

    def _notified(self, _n: Notification) -> bytes:
        self._wakeup.set()
        return b""

    def _watch_lost(self, err: int) -> None:
        log.warning("the watch on %s was lost (%d): watching it again", self.oid, err)
        self._rewatch = True
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.period)
            except TimeoutError:
                pass
            self._wakeup.clear()
            try:
                if self._rewatch and self._watch is not None:
                    self._rewatch = False
                    old = self._watch
                    self._watch = await asyncio.to_thread(self.io.watch, self.oid, self._notified, self._watch_lost,
                                                          asyncio.get_running_loop())
                    await asyncio.to_thread(old.close)
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("a round on %s failed", self.oid)
