"""Queues drained in batches by a few shared worker threads, each batch's completion handed
back to the event loop in one ``call_soon_threadsafe`` (the backstore writers, the state
writer).

The loop appends to a queue and schedules the queue on its ``BatchWorkers`` only when it
was idle, so a busy producer costs one lock round per item and a worker wakes once per
batch, not per item.  A worker takes everything a queue holds, processes it, and puts the
queue back at the end of the ready line if more came meanwhile: one queue is never run by
two workers at once (its items are processed in order, batch after batch), and a busy
queue cannot starve the others.

Why shared workers: a thread per queue meant a thread per LU ever written (1,005 threads
with 1,000 LUNs, issue 10).  Workers start on demand up to ``size`` and end after ``idle``
seconds without work, so the thread count is bounded and falls back when writes stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

IDLE_EXIT = 30.0  # seconds a worker waits for work before it ends


class BatchWorkers:
    """Up to ``size`` threads running ready BatchQueues, one batch at a time."""

    def __init__(self, name: str, size: int, idle: float = IDLE_EXIT) -> None:
        self.name = name
        self.size = max(1, size)
        self.idle = idle
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)  # a queue became ready
        self.drained = threading.Condition(self.lock)  # a queue went idle (stop() waits on it)
        self._ready: deque[BatchQueue[Any]] = deque()
        self.threads = 0  # running worker threads
        self._waiting = 0  # of which waiting for work
        self._started = 0

    def schedule(self, q: BatchQueue[Any]) -> None:
        """Put ``q`` in the ready line (lock held)."""
        self._ready.append(q)
        if self._waiting > len(self._ready) - 1:
            self._work.notify()
        elif self.threads < self.size:
            self.threads += 1
            self._started += 1
            threading.Thread(target=self._run, name=f"{self.name}-{self._started}", daemon=True).start()

    def _run(self) -> None:
        lock = self.lock
        while True:
            with lock:
                while not self._ready:
                    self._waiting += 1
                    woke = self._work.wait(self.idle)
                    self._waiting -= 1
                    if not woke and not self._ready:
                        self.threads -= 1
                        return
                q = self._ready.popleft()
                batch, q.items = q.items, []
            q.run(batch)
            with lock:
                if q.items:
                    self._ready.append(q)  # more came meanwhile: after the others waiting
                else:
                    q.scheduled = False
                    self.drained.notify_all()


def _default_size() -> int:
    return max(4, min(16, 2 * (os.cpu_count() or 1)))


_WRITERS: BatchWorkers | None = None


def writer_workers() -> BatchWorkers:
    """The process's shared workers for backstore writes."""
    global _WRITERS
    if _WRITERS is None:
        _WRITERS = BatchWorkers("writer", _default_size())
    return _WRITERS


class BatchQueue(ABC, Generic[T]):
    """Items queued on the loop, processed in order in batches by ``workers``."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None,
                 workers: BatchWorkers | None = None) -> None:
        self.name = name
        self.loop = loop
        self.workers = workers if workers is not None else BatchWorkers(name, 1)
        self.items: list[T] = []
        self.scheduled = False  # in the ready line or being run
        self._stopping = False

    def put(self, item: T) -> None:
        """Queue ``item`` (loop thread)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        w = self.workers
        with w.lock:
            if self._stopping:
                raise RuntimeError(f"{self.name} is stopped")
            self.items.append(item)
            if not self.scheduled:
                self.scheduled = True
                w.schedule(self)

    def stop(self) -> None:
        """Process what is queued, then refuse more (blocks until it has been processed)."""
        w = self.workers
        with w.lock:
            self._stopping = True
            while self.scheduled:
                w.drained.wait()

    @abstractmethod
    def process(self, batch: list[T]) -> Callable[[], None]:
        """Do a batch's work on a worker thread; return what completes it on the loop."""

    def run(self, batch: list[T]) -> None:
        """One batch, on a worker: process it and hand its completion to the loop."""
        try:
            complete = self.process(batch)
        except Exception:  # noqa: BLE001 - process() reports per item; a bug here must not kill a worker
            log.exception("%s: batch of %d failed", self.name, len(batch))
            return
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(complete)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
