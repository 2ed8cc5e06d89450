"""One write queue per backstore, drained in batches by the shared writer workers (the
default ``Backstore.submit_write`` of every backstore whose writes block).

Why not the loop's executor: with a future and a pool-thread wake-up per 4 KiB write,
the hand-off cost more than the write (ext4 refuses buffered RWF_NOWAIT writes, so every
write leaves the loop), and six pool threads only queued up on the file's inode lock,
which serialises buffered writes to one file anyway.  Here the loop appends to a list;
a worker takes everything queued for the backstore, writes it, and hands the whole batch
back with one ``call_soon_threadsafe``; one backstore's queue is run by one worker at a
time, in order (batch_queue.py), and a few workers serve every backstore.  Writes needing
durability (FUA, WCE=0) share one fdatasync issued after every write of the batch: group
commit, each such write still reaching stable storage before its completion runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from pyscsi_target.backstore.batch_queue import BatchQueue, writer_workers

# Completion: called on the loop thread with None or the exception the write raised.
Done = Callable[[BaseException | None], None]


class BlockingStorage(Protocol):
    """What the writer thread calls: the blocking half of a Backstore."""

    name: str

    def write(self, data: Sequence[Any], offset: int, fua: bool = False) -> None: ...

    def flush(self) -> None: ...


Write = tuple[int, Sequence[Any], bool, Done]  # offset, buffers, sync, completion

#: A run of adjacent writes is cut at this many buffers (IOV_MAX is 1024) or bytes.
MAX_IOVECS = 512
MAX_RUN_BYTES = 8 << 20


def _end(w: Write) -> int:
    return w[0] + sum(memoryview(b).nbytes for b in w[1])


class WriteQueue(BatchQueue[Write]):
    def __init__(self, backstore: BlockingStorage, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(f"writer:{backstore.name}", loop, writer_workers())
        self.backstore = backstore

    def submit(self, offset: int, data: Sequence[Any], sync: bool, done: Done) -> None:
        """Queue a write (loop thread).  ``data`` must stay unchanged until ``done`` runs."""
        self.put((offset, data, sync, done))

    def process(self, batch: list[Write]) -> Callable[[], None]:
        results: list[BaseException | None] = []
        need_flush = False
        i = 0
        while i < len(batch):
            # Writes that follow on from each other (a sequential stream) go down in one pwritev:
            # one syscall, and one return to the GIL, for the run instead of one per write.
            j, end, nbufs = i + 1, _end(batch[i]), len(batch[i][1])
            while (j < len(batch) and batch[j][0] == end and nbufs + len(batch[j][1]) <= MAX_IOVECS
                   and end - batch[i][0] < MAX_RUN_BYTES):
                end, nbufs, j = _end(batch[j]), nbufs + len(batch[j][1]), j + 1
            run = batch[i:j]
            try:
                if len(run) == 1:
                    self.backstore.write(run[0][1], run[0][0], False)
                else:
                    self.backstore.write([b for item in run for b in item[1]], run[0][0], False)
                results.extend([None] * len(run))
            except Exception as exc:  # noqa: BLE001 - reported to that write's task
                if len(run) == 1:
                    results.append(exc)
                else:  # write them one by one, so that each task gets its own outcome
                    for offset, data, _sync, _done in run:
                        try:
                            self.backstore.write(data, offset, False)
                            results.append(None)
                        except Exception as one:  # noqa: BLE001
                            results.append(one)
            need_flush |= any(item[2] for item, r in zip(run, results[i:j], strict=True) if r is None)
            i = j
        if need_flush:
            try:
                self.backstore.flush()
            except Exception as exc:  # noqa: BLE001 - every durable write of the batch fails
                results = [exc if r is None and item[2] else r for r, item in zip(results, batch, strict=True)]
        return partial(_complete, batch, results)


def _complete(batch: list[Write], results: list[BaseException | None]) -> None:
    for (_off, _data, _sync, done), exc in zip(batch, results, strict=True):
        done(exc)
