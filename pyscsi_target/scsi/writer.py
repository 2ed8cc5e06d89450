"""One writer thread per logical unit, draining queued writes in batches.

Why not the loop's executor: with a future and a pool-thread wake-up per 4 KiB write,
the hand-off cost more than the write (ext4 refuses buffered RWF_NOWAIT writes, so every
write leaves the loop), and six pool threads only queued up on the file's inode lock,
which serialises buffered writes to one file anyway.  Here the loop appends to a list;
the thread takes everything queued, writes it, and hands the whole batch back with one
``call_soon_threadsafe``.  Writes needing durability (FUA, WCE=0) share one fdatasync
issued after every write of the batch: group commit, each such write still reaching
stable storage before its completion runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pyscsi_target.backstore.base import Backstore

# Completion: called on the loop thread with None or the exception the write raised.
Done = Callable[[BaseException | None], None]


class WriteQueue:
    def __init__(self, backstore: Backstore, loop: asyncio.AbstractEventLoop) -> None:
        self.backstore = backstore
        self.loop = loop
        self._cv = threading.Condition()
        self._queue: list[tuple[int, Sequence[Any], bool, Done]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"writer:{backstore.path}", daemon=True)
        self._thread.start()

    def submit(self, offset: int, data: Sequence[Any], sync: bool, done: Done) -> None:
        """Queue a write (loop thread).  ``data`` must stay unchanged until ``done`` runs."""
        with self._cv:
            self._queue.append((offset, data, sync, done))
            if len(self._queue) == 1:
                self._cv.notify()

    def stop(self) -> None:
        """Write what is queued, then end the thread (before the backstore is closed)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            results: list[BaseException | None] = []
            need_flush = False
            for offset, data, sync, _done in batch:
                try:
                    self.backstore.write(data, offset, False)
                except Exception as exc:  # noqa: BLE001 - reported to that write's task
                    results.append(exc)
                else:
                    results.append(None)
                    need_flush |= sync
            if need_flush:
                try:
                    self.backstore.flush()
                except Exception as exc:  # noqa: BLE001 - every durable write of the batch fails
                    results = [exc if r is None and item[2] else r for r, item in zip(results, batch, strict=True)]
            try:
                self.loop.call_soon_threadsafe(_complete, batch, results)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def _complete(batch: list[tuple[int, Sequence[Any], bool, Done]], results: list[BaseException | None]) -> None:
    for (_off, _data, _sync, done), exc in zip(batch, results, strict=True):
        done(exc)
