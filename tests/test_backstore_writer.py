"""The backstore writer thread: FIFO order, batching, group commit, errors reach their own task."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pyscsi_target.backstore.writer import WriteQueue


class FakeBackstore:
    name = "fake"

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_offsets: set[int] = set()
        self.fail_flush = False

    def write(self, data: Any, offset: int, fua: bool = False) -> None:
        self.gate.wait(5)
        if offset in self.fail_offsets:
            raise OSError(28, "No space left on device")
        self.events.append(("write", offset, bytes(data[0]), fua))

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(5, "Input/output error")
        self.events.append("flush")


async def _submit_all(q: WriteQueue, items: list[tuple[int, bool]]) -> list[BaseException | None]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in items]
    threads_seen: set[int] = set()

    def done_for(fut: asyncio.Future[BaseException | None]) -> Any:
        def done(exc: BaseException | None) -> None:
            threads_seen.add(threading.get_ident())
            fut.set_result(exc)

        return done

    for (off, sync), fut in zip(items, futs, strict=True):
        q.submit(off, [bytes([off & 0xFF]) * 4], sync, done_for(fut))
    results = await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert threads_seen == {threading.get_ident()}  # completions run on the loop thread
    return list(results)


def test_batch_is_written_in_order_with_one_flush_for_its_durable_writes() -> None:
    async def main() -> None:
        bs = FakeBackstore()
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        try:
            bs.gate.clear()  # hold the first write so the rest queue up behind it
            first = asyncio.ensure_future(_submit_all(q, [(0, False)]))
            await asyncio.sleep(0.05)
            rest = asyncio.ensure_future(_submit_all(q, [(512, True), (1024, False), (1536, True)]))
            await asyncio.sleep(0.05)
            bs.gate.set()
            assert await first == [None]
            assert await rest == [None, None, None]
            writes = [e[1] for e in bs.events if e != "flush"]
            assert writes == [0, 512, 1024, 1536]
            # The three queued writes were one batch: one fdatasync after all of them.
            assert bs.events[-1] == "flush" and bs.events.count("flush") == 1
            assert all(e[3] is False for e in bs.events if e != "flush")
        finally:
            q.stop()

    asyncio.run(main())


def test_no_flush_without_durable_writes() -> None:
    async def main() -> None:
        bs = FakeBackstore()
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        try:
            assert await _submit_all(q, [(0, False), (8, False)]) == [None, None]
            assert "flush" not in bs.events
        finally:
            q.stop()

    asyncio.run(main())


def test_a_failed_write_fails_only_its_own_completion() -> None:
    async def main() -> None:
        bs = FakeBackstore()
        bs.fail_offsets = {512}
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        try:
            res = await _submit_all(q, [(0, False), (512, True), (1024, False)])
            assert res[0] is None and res[2] is None
            assert isinstance(res[1], OSError) and res[1].errno == 28
        finally:
            q.stop()

    asyncio.run(main())


def test_a_failed_flush_fails_every_durable_write_of_the_batch() -> None:
    async def main() -> None:
        bs = FakeBackstore()
        bs.fail_flush = True
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        try:
            bs.gate.clear()
            held = asyncio.ensure_future(_submit_all(q, [(0, False)]))
            await asyncio.sleep(0.05)
            batch = asyncio.ensure_future(_submit_all(q, [(512, True), (1024, False), (1536, True)]))
            await asyncio.sleep(0.05)
            bs.gate.set()
            assert await held == [None]
            res = await batch
            assert res[1] is None  # not durable: its write succeeded
            assert isinstance(res[0], OSError) and isinstance(res[2], OSError)
        finally:
            q.stop()

    asyncio.run(main())


def test_stop_writes_what_is_queued_first() -> None:
    async def main() -> None:
        bs = FakeBackstore()
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        bs.gate.clear()
        for off in (0, 512, 1024):
            q.submit(off, [b"x"], False, lambda exc: None)
        threading.Timer(0.05, bs.gate.set).start()
        q.stop()
        assert [e[1] for e in bs.events] == [0, 512, 1024]

    asyncio.run(main())


def test_adjacent_writes_of_a_batch_go_down_together() -> None:
    """A sequential stream costs one write call (one pwritev) per run of adjacent writes; a run
    that fails is written again one write at a time, so that only the failing write fails."""

    class Recording(FakeBackstore):
        def write(self, data: Any, offset: int, fua: bool = False) -> None:
            self.gate.wait(5)
            blob = b"".join(bytes(d) for d in data)
            if any(offset <= f < offset + len(blob) for f in self.fail_offsets):
                raise OSError(28, "No space left on device")
            self.events.append(("write", offset, blob, fua))

    async def main() -> None:
        bs = Recording()
        q = WriteQueue(bs, asyncio.get_running_loop())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        try:
            async def submit(items: list[tuple[int, bytes]]) -> list[BaseException | None]:
                futs = [loop.create_future() for _ in items]
                for (off, data), fut in zip(items, futs, strict=True):
                    q.submit(off, [data], False, fut.set_result)
                return list(await asyncio.wait_for(asyncio.gather(*futs), 5))

            bs.gate.clear()
            held = asyncio.ensure_future(submit([(0, b"h" * 4)]))
            await asyncio.sleep(0.05)
            # 100..112 adjacent (three writes), then a gap, then 200..208 adjacent (two writes).
            stream = [(100, b"a" * 4), (104, b"b" * 4), (108, b"c" * 4), (200, b"d" * 4), (204, b"e" * 4)]
            batch = asyncio.ensure_future(submit(stream))
            await asyncio.sleep(0.05)
            bs.gate.set()
            assert await held == [None] and await batch == [None] * 5
            assert bs.events[1:] == [("write", 100, b"aaaabbbbcccc", False), ("write", 200, b"ddddeeee", False)]
            bs.events.clear()
            bs.fail_offsets = {305}
            bs.gate.clear()
            held = asyncio.ensure_future(submit([(0, b"h" * 4)]))
            await asyncio.sleep(0.05)
            batch = asyncio.ensure_future(submit([(300, b"x" * 4), (304, b"y" * 4), (308, b"z" * 4)]))
            await asyncio.sleep(0.05)
            bs.gate.set()
            assert await held == [None]
            res = await batch
            assert res[0] is None and isinstance(res[1], OSError) and res[2] is None
            assert [e[1] for e in bs.events[1:]] == [300, 308]
        finally:
            q.stop()

    asyncio.run(main())
