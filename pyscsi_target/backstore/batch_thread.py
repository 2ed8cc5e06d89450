"""A worker thread that drains a queue in batches and hands each batch's completion back
to the event loop in one ``call_soon_threadsafe`` (the backstore writer, the state writer).

The loop appends and notifies only when the queue was empty, so a busy producer costs one
lock round per item and the thread wakes once per batch, not per item.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchThread(ABC, Generic[T]):
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.thread_name = name
        self.loop = loop
        self._cv = threading.Condition()
        self._queue: list[T] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> None:
        """Queue ``item`` (loop thread); the thread starts with the first one."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        with self._cv:
            if self._stopping:
                raise RuntimeError(f"{self.thread_name} is stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()
            self._queue.append(item)
            if len(self._queue) == 1:
                self._cv.notify()

    def stop(self) -> None:
        """Process what is queued, then end the thread (blocks until it has)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    @abstractmethod
    def process(self, batch: list[T]) -> Callable[[], None]:
        """Do a batch's work on the thread; return what completes it on the loop."""

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            complete = self.process(batch)
            assert self.loop is not None
            try:
                self.loop.call_soon_threadsafe(complete)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
