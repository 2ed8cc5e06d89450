"""The LU on a backstore with no file descriptor whose I/O completes on a foreign thread
(the shape of the RBD backstore): every data-path command works through the Backstore
interface alone, and reads, writes and flushes go through submit_* with no executor job."""

from __future__ import annotations

import asyncio
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.memory_backstore import ThreadCompletedBackstore
from test_scsi_support import Harness, MemoryPrStore, Scsi, nexus, rw10, rw16

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.settings import LuSettings

GOOD, CC = 0x00, 0x02


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(2)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def test_lu_on_a_thread_completed_backstore(tmp_path: Path) -> None:
    async def main() -> None:
        executor = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        bs = ThreadCompletedBackstore(8 << 20)
        assert not hasattr(bs, "fd")
        scsi = Scsi(MemoryPrStore())
        lu = LogicalUnit(LuSettings("mem", bytes.fromhex("3000000000000042"), "mem"), bs, scsi.registry, scsi.state)
        h = Harness.__new__(Harness)
        h.scsi, h.lu, h.dev = scsi, lu, scsi.device()
        h.dev.set_luns({0: lu})
        h.a = h.b = nexus()
        h.dev.add_nexus(h.a)
        try:
            await h.clear_ua()
            data = os.urandom(8 * 512)
            assert (await h.cmd(rw10(0x2A, 16, 8), data)).status == GOOD
            assert (await h.cmd(rw10(0x28, 16, 8))).data == data
            assert (await h.cmd(rw16(0x8A, 100, 1, 0x08), b"f" * 512)).status == GOOD  # FUA
            flushes = bs.flushes
            assert flushes >= 1
            assert (await h.cmd(rw10(0x35, 0, 0))).status == GOOD  # SYNCHRONIZE CACHE
            assert bs.flushes == flushes + 1
            assert executor.jobs == 0, "the data path used the executor"
            assert bs.submitted == ["write", "read", "write", "flush"]
            # WRITE AND VERIFY, VERIFY with BYTCHK: submitted write, then read
            assert (await h.cmd(rw10(0x2E, 200, 1), b"v" * 512)).status == GOOD
            assert (await h.cmd(rw10(0x2F, 200, 1, 0x02), b"v" * 512)).status == GOOD
            # blocking operations run in the executor on the same interface
            caw = struct.pack(">BBQxxxBxx", 0x89, 0, 100, 1)
            assert (await h.cmd(caw, b"f" * 512 + b"g" * 512)).status == GOOD
            r = await h.cmd(caw, b"f" * 512 + b"h" * 512)
            assert r.status == CC and r.key_asc == (S.MISCOMPARE, *S.MISCOMPARE_DURING_VERIFY)
            assert (await h.cmd(rw10(0x28, 100, 1))).data == b"g" * 512
            unmap = struct.pack(">HH4xQI4x", 22, 16, 16, 8)
            assert (await h.cmd(struct.pack(">BxxxxxxHB", 0x42, len(unmap), 0), unmap)).status == GOOD
            assert (await h.cmd(rw10(0x28, 16, 8))).data == bytes(8 * 512)
            r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, 16, 64, 0, 0))
            assert struct.unpack_from(">QIB", r.data, 8) == (16, 100 - 16, 1)  # deallocated up to the FUA write
            ws = struct.pack(">BBQIBB", 0x93, 0, 300, 4, 0, 0)
            assert (await h.cmd(ws, b"w" * 512)).status == GOOD
            assert (await h.cmd(rw10(0x28, 300, 4))).data == b"w" * 2048
            # the block limits page advertises the unit the backstore really deallocates
            bs.discard_granularity = 4 << 20  # an RBD object
            r = await h.cmd(bytes((0x12, 1, 0xB0, 0, 64, 0)))
            assert struct.unpack_from(">I", r.data, 28)[0] == (4 << 20) // 512
            # a live resize raises CAPACITY DATA HAS CHANGED
            lu.resize(16 << 20)
            r = await h.cmd(bytes(6))
            assert r.key_asc == (S.UNIT_ATTENTION, *S.CAPACITY_DATA_HAS_CHANGED)
            r = await h.cmd(bytes((0x25,)) + bytes(9))
            assert struct.unpack(">II", r.data) == ((16 << 20) // 512 - 1, 512)
        finally:
            h.close()
        assert bs.closed

    asyncio.run(main())
