"""Durable LU state off the event loop (scsi/persistence.py): commits happen in order on
one thread, a PR OUT is acknowledged only after its state is committed, the loop keeps
serving commands while a commit is slow, and unchanged state costs no commit."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

from test_scsi_support import Harness, MemoryPrStore, nexus, pr_in, pr_out

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.persistence import StateWriter
from pyscsi_target.scsi.task import ScsiTask, TaskAttr

GOOD, CC = 0x00, 0x02
REGISTER = 0x00


class SlowStore(MemoryPrStore):
    """A store whose commits take ``delay`` seconds on whichever thread calls them."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.saves: list[tuple[str, bytes | None]] = []
        self.threads: set[int] = set()
        self.fail = False
        self.fail_errno = errno.EIO

    def save(self, key: str, data: bytes | None) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail:
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        super().save(key, data)
        self.saves.append((key, data))


def test_state_writer_commits_in_order_and_completes_after_commit() -> None:
    async def main() -> None:
        store = SlowStore(0.005)
        w = StateWriter(store)
        order: list[int] = []
        seen: list[bytes | None] = []

        def done_for(i: int, key: str) -> Any:
            def done(exc: BaseException | None) -> None:
                assert exc is None
                order.append(i)
                seen.append(store.data.get(key))  # the value is in the store already

            return done

        for i in range(30):
            key = f"k{i % 3}"
            w.save(key, b"%d" % i, done_for(i, key))
        assert w.load("k0") == b"27"  # queued values are visible at once
        for _ in range(500):
            if len(order) == 30:
                break
            await asyncio.sleep(0.01)
        assert order == list(range(30))
        # each completion saw its own value or a newer one of the same key, never an older one
        for i, value in enumerate(seen):
            assert value is not None and int(value) >= i and int(value) % 3 == i % 3
        assert store.data == {"k0": b"27", "k1": b"28", "k2": b"29"}
        assert threading.get_ident() not in store.threads  # never on the loop thread
        # an unchanged value needs no commit and completes at once
        n = len(store.saves)
        hits: list[BaseException | None] = []
        w.save("k0", b"27", hits.append)
        assert hits == [None] and len(store.saves) == n
        w.close()

    asyncio.run(main())


def test_pr_out_burst_acks_in_order_after_commit_without_blocking_the_loop(tmp_path: Path) -> None:
    store = SlowStore(0.02)

    async def main() -> None:
        h = Harness(tmp_path, store=store)
        try:
            initiators = [nexus(f"iqn.1994-05.com.example:burst{i}", 0x23D000000100 + i) for i in range(8)]
            await h.clear_ua(h.a)
            for n in initiators:
                h.dev.add_nexus(n)
                await h.clear_ua(n)
            acks: list[tuple[int, int, bytes | None]] = []
            loop = asyncio.get_running_loop()
            all_done = loop.create_future()

            def acked(i: int) -> Any:
                def done(t: ScsiTask) -> None:
                    acks.append((i, t.status, store.data.get(h.lu.naa.hex())))
                    if len(acks) == len(initiators) and not all_done.done():
                        all_done.set_result(None)

                return done

            for i, n in enumerate(initiators):
                cdb, data = pr_out(REGISTER, 0, 0x1000 + i, flags=0x01)  # APTPL
                h.dev.submit(ScsiTask(n, 0, cdb.ljust(16, b"\0"), 900 + i, TaskAttr.SIMPLE, len(data), data,
                                      acked(i)))
            assert not acks, "a durable PR OUT was acknowledged before its commit"
            # commits on the loop would all be done by now (each takes 20 ms)
            assert len(store.saves) < len(initiators)
            # the loop serves other commands while the commits run: READ KEYS sees every key
            r = await h.cmd(pr_in(0x00))
            assert r.status == GOOD and len(r.data) == 8 + 8 * len(initiators)
            await asyncio.wait_for(all_done, 10)
            assert [i for i, _s, _d in acks] == list(range(len(initiators)))
            assert all(status == GOOD for _i, status, _d in acks)
            for i, _s, record in acks:  # when i was acknowledged, its registration was stored
                assert record is not None
                keys = {r["key"] for r in json.loads(record)["registrations"]}
                assert 0x1000 + i in keys
            final = json.loads(store.data[h.lu.naa.hex()])
            assert sorted(r["key"] for r in final["registrations"]) == [0x1000 + i for i in range(len(initiators))]
            assert final["generation"] == h.lu.pr.generation
            # fewer commits than PR OUTs: a batch writes only the newest record
            assert 1 <= sum(1 for k, _ in store.saves if k == h.lu.naa.hex()) <= len(initiators)
            assert threading.get_ident() not in store.threads
        finally:
            h.close()

    asyncio.run(main())


def test_pr_out_without_aptpl_costs_no_commit(tmp_path: Path) -> None:
    store = SlowStore()

    async def main() -> None:
        h = Harness(tmp_path, store=store)
        try:
            await h.clear_ua(h.a)
            cdb, data = pr_out(REGISTER, 0, 0x77)
            task_done: list[ScsiTask] = []
            h.dev.submit(ScsiTask(h.a, 0, cdb.ljust(16, b"\0"), 1, TaskAttr.SIMPLE, 24, data, task_done.append))
            assert task_done and task_done[0].status == GOOD  # completed inline
            cdb, data = pr_out(0x01, 0x77, 0, rtype=1)  # RESERVE
            assert (await h.cmd(cdb, data)).status == GOOD
            assert [k for k, _ in store.saves if k == h.lu.naa.hex()] == []
        finally:
            h.close()

    asyncio.run(main())


def test_failed_commit_fails_the_pr_out(tmp_path: Path) -> None:
    store = SlowStore()

    async def main() -> None:
        h = Harness(tmp_path, store=store)
        try:
            await h.clear_ua(h.a)
            store.fail = True
            cdb, data = pr_out(REGISTER, 0, 0x99, flags=0x01)
            r = await h.cmd(cdb, data)
            assert r.status == CC and r.key_asc == (S.MEDIUM_ERROR, *S.WRITE_ERROR)
            assert await _keys(h) == (0, [])  # not saved, so not in effect either
            store.fail = False
            # the next change commits again (the store's content is unknown after a failure)
            cdb, data = pr_out(REGISTER, 0, 0x9A, flags=0x01)
            assert (await h.cmd(cdb, data)).status == GOOD
            assert json.loads(store.data[h.lu.naa.hex()])["registrations"][0]["key"] == 0x9A
            assert await _keys(h) == (1, [0x9A])
        finally:
            h.close()

    asyncio.run(main())


async def _keys(h: Harness) -> tuple[int, list[int]]:
    """PR IN READ KEYS: the generation and the registered keys."""
    r = await h.cmd(pr_in(0x00))
    assert r.status == GOOD, r
    gen, length = struct.unpack_from(">II", r.data)
    return gen, [struct.unpack_from(">Q", r.data, 8 + i)[0] for i in range(0, length, 8)]


def test_full_state_disk_refuses_the_pr_out_and_keeps_the_saved_state(tmp_path: Path) -> None:
    """A PR OUT whose state cannot be saved for lack of space: ILLEGAL REQUEST / INSUFFICIENT
    REGISTRATION RESOURCES (05/55/04), and the reservation state stays what is saved."""
    store = SlowStore()

    async def main() -> None:
        h = Harness(tmp_path, store=store)
        try:
            await h.clear_ua(h.a)
            await h.clear_ua(h.b)
            cdb, data = pr_out(REGISTER, 0, 0x11, flags=0x01)
            assert (await h.cmd(cdb, data)).status == GOOD
            cdb, data = pr_out(0x01, 0x11, 0, rtype=1)  # RESERVE, write exclusive
            assert (await h.cmd(cdb, data)).status == GOOD
            saved = store.data[h.lu.naa.hex()]
            store.fail, store.fail_errno = True, errno.ENOSPC
            for sa, key, sark, rtype in ((REGISTER, 0x11, 0x12, 0), (0x02, 0x11, 0, 1), (0x03, 0x11, 0, 0)):
                cdb, data = pr_out(sa, key, sark, rtype=rtype, flags=0x01 if sa == REGISTER else 0)
                r = await h.cmd(cdb, data)  # change key, RELEASE, CLEAR: none can be saved
                assert (r.status, r.key_asc) == (CC, (S.ILLEGAL_REQUEST, *S.INSUFFICIENT_REGISTRATION_RESOURCES)), r
                assert await _keys(h) == (1, [0x11])
                assert h.lu.pr.reservation is not None and h.lu.pr.reservation.type == 1
            r = await h.cmd(bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), bytes(512), nx=h.b)
            assert r.status == 0x18  # the reservation still holds against the other nexus
            assert store.data[h.lu.naa.hex()] == saved
            store.fail = False
            cdb, data = pr_out(0x02, 0x11, 0, rtype=1)  # space again: the RELEASE goes through
            assert (await h.cmd(cdb, data)).status == GOOD
            assert h.lu.pr.reservation is None
        finally:
            h.close()

    asyncio.run(main())


def test_mode_select_saved_pages_are_durable_before_good(tmp_path: Path) -> None:
    store = SlowStore(0.05)

    async def main() -> None:
        h = Harness(tmp_path, store=store)
        try:
            await h.clear_ua(h.a)
            r = await h.cmd(bytes((0x1A, 0x08, 0x0A, 0, 255, 0)))  # control mode page
            page = bytearray(r.data[4:])
            page[2] |= 0x04  # D_SENSE
            data = bytes(4) + bytes(page)
            assert (await h.cmd(bytes((0x15, 0x11, 0, 0, len(data), 0)), data)).status == GOOD  # PF, SP
            assert h.lu.modes_key in store.data  # committed before GOOD
        finally:
            h.close()

    asyncio.run(main())
