"""Drive a ScsiDevice directly with ScsiTask objects (no iSCSI) for the SCSI unit tests."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyscsi_target.backstore.file import create_sparse
from pyscsi_target.config.model import Extent
from pyscsi_target.scsi.device import ScsiDevice
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.persistence import StateStore, StateWriter
from pyscsi_target.scsi.registry import ScsiRegistry
from pyscsi_target.scsi.sense import sense_key_asc
from pyscsi_target.scsi.task import Nexus, ScsiTask, TaskAttr
from pyscsi_target.server import logical_units

_ids = itertools.count(1)
_tags = itertools.count(1)
TARGET = "iqn.2026-11.org.pyscsi-target:unit"


class MemoryPrStore:
    """A StateStore on a dict (the daemon's lives in SQLite)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def load(self, key: str) -> bytes | None:
        return self.data.get(key)

    def save(self, key: str, data: bytes | None) -> None:
        if data is None:
            self.data.pop(key, None)
        else:
            self.data[key] = data


@dataclass
class Result:
    status: int
    data: bytes
    sense: bytes | None
    task: ScsiTask

    @property
    def key_asc(self) -> tuple[int, int, int] | None:
        return sense_key_asc(self.sense) if self.sense else None


def make_extent(tmp: Path, size: int = 64 << 20, blocksize: int = 512, name: str = "e", **kw: object) -> Extent:
    path = tmp / f"{name}.img"
    create_sparse(str(path), size)
    ext = Extent(id=next(_ids), name=name, path=str(path), filesize=str(size), blocksize=blocksize, **kw)
    return ext


def nexus(initiator: str = "iqn.1994-05.com.example:a", isid: int = 0x23D000000001, tpg: int = 1,
          target: str = TARGET) -> Nexus:
    return Nexus(next(_ids), initiator, isid, target, tpg)


class Scsi:
    """What the engine owns for the SCSI layer: the registry and the state writer."""

    def __init__(self, store: StateStore | None = None) -> None:
        self.registry = ScsiRegistry()
        self.state = StateWriter(store) if store is not None else None

    def open(self, ext: Extent) -> LogicalUnit:
        """Open an extent as the engine does (server/logical_units.py)."""
        return logical_units.open_logical_unit(ext, self.registry, self.state)

    def device(self, target: str = TARGET) -> ScsiDevice:
        return ScsiDevice(target, self.registry)

    def close(self) -> None:
        if self.state is not None:
            self.state.close()


class Harness:
    def __init__(self, tmp: Path, store: MemoryPrStore | None = None, extent: Extent | None = None,
                 **ext_kw: object) -> None:
        self.store = store if store is not None else MemoryPrStore()
        self.scsi = Scsi(self.store)
        self.ext = extent if extent is not None else make_extent(tmp, **ext_kw)  # type: ignore[arg-type]
        self.lu: LogicalUnit = self.scsi.open(self.ext)
        self.dev = self.scsi.device()
        self.dev.set_luns({0: self.lu})
        self.a = nexus()
        self.b = nexus("iqn.1994-05.com.example:b", 0x23D000000002)
        for n in (self.a, self.b):
            self.dev.add_nexus(n)

    def close(self) -> None:
        self.dev.close()
        self.lu.close()
        self.scsi.close()

    def reconfigure(self, ext: Extent) -> None:
        """Apply a changed extent as the engine does."""
        logical_units.reconfigure(self.lu, ext)

    async def cmd(
        self,
        cdb: bytes,
        data_out: bytes | None = None,
        nx: Nexus | None = None,
        lun: int = 0,
        expected_len: int | None = None,
        attr: TaskAttr = TaskAttr.SIMPLE,
    ) -> Result:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ScsiTask] = loop.create_future()
        if expected_len is None:
            expected_len = len(data_out) if data_out is not None else 1 << 24
        task = ScsiTask(nx or self.a, lun, cdb.ljust(16, b"\0") if len(cdb) < 6 else cdb, next(_tags), attr,
                        expected_len, data_out, lambda t: fut.set_result(t))
        self.dev.submit(task)
        t = await asyncio.wait_for(fut, 10)
        data = b"".join(bytes(b) for b in t.data_in)[: min(t.data_in_len, expected_len)]
        return Result(t.status, data, t.sense, t)

    async def clear_ua(self, nx: Nexus | None = None, lun: int = 0) -> None:
        for _ in range(10):
            r = await self.cmd(bytes(6), nx=nx, lun=lun)
            if r.status == 0:
                return
        raise AssertionError("unit attentions do not clear")


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def pr_out(sa: int, key: int, sark: int, rtype: int = 0, flags: int = 0) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, 24, 0)
    data = struct.pack(">QQ4xBxxx", key, sark, flags)
    return cdb, data


def pr_in(sa: int, alloc: int = 1024) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, sa, alloc, 0)


def run(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async test body on a fresh loop with a Harness built from tmp_path."""

    def wrapper(tmp_path: Path) -> None:
        async def main() -> None:
            h = Harness(tmp_path)
            try:
                await h.clear_ua(h.a)
                await h.clear_ua(h.b)
                await fn(h)
            finally:
                h.close()

        asyncio.run(main())

    wrapper.__name__ = fn.__name__
    return wrapper
