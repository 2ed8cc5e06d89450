"""A backstore without a file descriptor whose submitted I/O completes on a thread of its
own, handing each completion to the loop with call_soon_threadsafe: the shape of a librbd
aio backstore, on a bytearray."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence

from pyscsi_target.backstore.base import Backstore, Buffer, Done, Extent, RangeSet


class ThreadCompletedBackstore(Backstore):
    def __init__(self, size: int) -> None:
        super().__init__("memory", size)
        self.thin = True
        self.data = bytearray(size)
        self.deallocated = RangeSet()
        self.deallocated.add(0, size)
        self.lock = threading.Lock()
        self.submitted: list[str] = []  # kinds of operations submitted from the loop
        self.flushes = 0
        self._jobs: queue.Queue[tuple[Callable[[], None], Done, asyncio.AbstractEventLoop] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._complete, name="memory-aio", daemon=True)
        self._thread.start()

    def _complete(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done, loop = job
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - handed to the submitter
                loop.call_soon_threadsafe(done, exc)
            else:
                loop.call_soon_threadsafe(done, None)

    def _submit(self, kind: str, fn: Callable[[], None], done: Done) -> None:
        self.submitted.append(kind)
        self._jobs.put((fn, done, asyncio.get_running_loop()))

    def submit_read(self, buf: bytearray | memoryview, offset: int, done: Done) -> None:
        self._submit("read", lambda: self.read_into(buf, offset), done)

    def submit_write(self, data: Sequence[Buffer], offset: int, sync: bool, done: Done) -> None:
        self._submit("write", lambda: self.write(data, offset, sync), done)

    def submit_flush(self, done: Done) -> None:
        self._submit("flush", self.flush, done)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        with self.lock:
            memoryview(buf).cast("B")[:] = self.data[offset : offset + len(buf)]

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        with self.lock:
            pos = offset
            for d in data:
                view = memoryview(d).cast("B")
                self.data[pos : pos + len(view)] = view
                pos += len(view)
            self.deallocated.remove(offset, pos)
        if fua:
            self.flush()

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        with self.lock:
            self.data[offset : offset + length] = bytes(length)
            self.deallocated.add(offset, offset + length)

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        return self.deallocated.runs(offset, min(self.size, offset + length), max_runs)

    def resize(self, size: int) -> None:
        with self.lock:
            if size > self.size:
                self.data.extend(bytes(size - self.size))
                self.deallocated.add(self.size, size)
            self.size = size

    def release(self) -> None:
        self._jobs.put(None)
        self._thread.join()
