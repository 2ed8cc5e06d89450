"""Shared batch workers (issue 10, defect 9): a bounded number of threads serves any number of
queues, each queue in order and never by two workers at once; idle workers end; and the
daemon with a thousand LUNs, each written, runs a bounded number of threads (1,005 before)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from functools import partial

from support import rawclient as R
from support.daemon import Daemon

from pyscsi_target.backstore.batch_queue import BatchQueue, BatchWorkers


class Recorder(BatchQueue[int]):
    """Records each batch with the thread that ran it; optionally slow."""

    def __init__(self, name: str, workers: BatchWorkers, delay: float = 0.0) -> None:
        super().__init__(name, workers=workers)
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.running = 0
        self.overlap = False
        self.delay = delay
        self.done: list[int] = []

    def process(self, batch: list[int]) -> Callable[[], None]:
        self.running += 1
        self.overlap |= self.running > 1
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        self.batches.append(batch)
        self.running -= 1
        return partial(self.done.extend, batch)


def test_many_queues_few_threads_each_in_order() -> None:
    async def main() -> None:
        workers = BatchWorkers("t", 3)
        queues = [Recorder(f"q{i}", workers, delay=0.002) for i in range(40)]
        for n in range(25):
            for q in queues:
                q.put(n)
            await asyncio.sleep(0)
            assert workers.threads <= 3
        for q in queues:
            q.stop()
        await asyncio.sleep(0.05)  # the last completions run on the loop
        for q in queues:
            assert [x for b in q.batches for x in b] == list(range(25)), q.name  # in order, each once
            assert q.done == list(range(25)) and not q.overlap
        assert sum(len(q.batches) for q in queues) < 40 * 25  # batching happened

    asyncio.run(main())


def test_idle_workers_end_and_come_back() -> None:
    async def main() -> None:
        workers = BatchWorkers("idle", 2, idle=0.1)
        q = Recorder("q", workers)
        q.put(1)
        await asyncio.sleep(0.05)
        assert workers.threads == 1
        await asyncio.sleep(0.3)
        assert workers.threads == 0  # ended after 0.1 s without work
        q.put(2)
        q.stop()
        assert [x for b in q.batches for x in b] == [1, 2]

    asyncio.run(main())


def test_stop_waits_for_the_queued_items() -> None:
    async def main() -> None:
        workers = BatchWorkers("s", 1)
        q = Recorder("q", workers, delay=0.05)
        for i in range(3):
            q.put(i)
        q.stop()
        assert [x for b in q.batches for x in b] == [0, 1, 2]
        try:
            q.put(9)
            raise AssertionError("a stopped queue took an item")
        except RuntimeError:
            pass

    asyncio.run(main())


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_thousand_written_luns_bounded_threads(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory()
    d.add_luns(999)
    assert d.proc is not None
    with R.login_session(d.host, d.port, d.iqn) as c:
        for lun in range(1000):  # one WRITE to every LU (after its POWER ON unit attention)
            c.scsi(R.tur(), lun=lun)
            assert c.scsi(R.write10(0, 1), lun=lun, data=bytes([lun & 0xFF]) * 512).status == 0
        threads = thread_count(d.proc.pid)
        assert c.scsi(R.read10(0, 1), lun=999, read_len=512).data == bytes([999 & 0xFF]) * 512
        c.logout()
    print(f"threads with 1000 LUNs, each written: {threads}")
    assert threads <= 40, threads  # main + default executor + writer workers + state writer + API/misc
