"""The file backstore's hole map (backstore/hole_map.py): reads of known holes are answered with
zeroes and no syscall, and the map never claims a hole where data is.

A wrong map returns zeroes for real data, so the LU-level test is model based: hypothesis drives
random WRITEs, UNMAPs, WRITE SAMEs (zero, pattern, UNMAP bit), resizes and restarts (the map rebuilt
from SEEK_HOLE/SEEK_DATA) through the SCSI layer, and every READ, and every range the map holds, is
checked against a reference copy of the LU's bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_scsi_support import Harness, make_extent

from pyscsi_target.backstore import file as file_backstore
from pyscsi_target.backstore.file import FileBackstore, create_sparse
from pyscsi_target.backstore.hole_map import HoleMap
from pyscsi_target.server import logical_units

KIB, MIB = 1 << 10, 1 << 20


# --- the map alone, against a brute-force model -------------------------------------------


def _check_against(m: HoleMap, zero: bytearray) -> None:
    for s, e in m.ranges():
        assert all(zero[s:e]), f"hole [{s}, {e}) covers data"
    starts = [s for s, _ in m.ranges()]
    assert starts == sorted(starts) and all(e > s for s, e in m.ranges())
    assert all(a[1] < b[0] for a, b in zip(m.ranges(), m.ranges()[1:], strict=False)), "holes touch or overlap"


def test_map_never_claims_data_under_random_operations() -> None:
    rnd = random.Random(14)
    size = 4096
    for max_ranges in (3, 8, 1 << 16):  # small limits exercise the forgetting paths
        m = HoleMap(max_ranges)
        zero = bytearray(b"\1" * size)  # 1 = reads as zero
        m.add(0, size)
        for _ in range(3000):
            a = rnd.randrange(size)
            b = min(size, a + rnd.randrange(1, 300))
            op = rnd.random()
            if op < 0.5:
                m.written(a, b)
                zero[a:b] = bytes(b - a)  # data (of any value: the map cannot know it is zero)
            elif op < 0.8:
                with m.zeroing(a, b):
                    if rnd.random() < 0.3:  # a write lands in the middle of the deallocation
                        c = rnd.randrange(a, b)
                        m.written(c, c + 1)
                        zero[c] = 0
                    else:
                        zero[a:b] = b"\1" * (b - a)
            else:
                assert not m.covers(a, b) or all(zero[a:b])
            _check_against(m, zero)
        if max_ranges == 1 << 16:  # without a limit the map is exact: every zero run is known
            runs = []
            pos = 0
            while pos < size:
                if zero[pos]:
                    end = zero.find(0, pos)
                    end = size if end < 0 else end
                    runs.append((pos, end))
                    pos = end
                else:
                    pos += 1
            assert m.ranges() == runs


def test_failed_deallocation_adds_nothing() -> None:
    m = HoleMap()
    try:
        with m.zeroing(0, 4096):
            raise OSError("EIO")
    except OSError:
        pass
    assert not m.covers(0, 1) and len(m) == 0


# --- the file backstore ---------------------------------------------------------------------


def test_scan_finds_the_holes_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    create_sparse(str(path), 8 * MIB)
    with open(path, "r+b") as f:
        f.seek(1 * MIB)
        f.write(os.urandom(64 * KIB))
        f.seek(5 * MIB)
        f.write(os.urandom(4 * KIB))
    b = FileBackstore(str(path))
    try:
        assert b.holes.ranges() == [(0, MIB), (MIB + 64 * KIB, 5 * MIB), (5 * MIB + 4 * KIB, 8 * MIB)]
    finally:
        b.close()


def test_hole_reads_make_no_syscall(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "big.img"
    create_sparse(str(path), 1 << 40)  # 1 TiB, never written
    b = FileBackstore(str(path))
    calls = []
    real = os.preadv
    monkeypatch.setattr(file_backstore.os, "preadv", lambda *a: calls.append(a) or real(*a))
    try:
        for off in (0, 4096 * 12345, (1 << 40) - 4096):
            buf = bytearray(b"\xff" * 4096)  # the hole path must zero it, not assume it
            assert b.read_nowait(buf, off) and buf == bytes(4096)
            buf2 = memoryview(bytearray(b"\xee" * 8192))
            b.read_into(buf2, off - 4096 if off else 0)
            assert bytes(buf2) == bytes(8192)
        assert calls == []
        data = os.urandom(4096)
        b.write([data], 4096 * 12345)
        buf = bytearray(4096)
        assert b.read_nowait(buf, 4096 * 12345) or (b.read_into(buf, 4096 * 12345) is None)
        assert buf == data and calls  # a written block is read from the file
    finally:
        b.close()


def test_grown_file_adds_only_what_the_backstore_created(tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    create_sparse(str(path), MIB)
    b = FileBackstore(str(path))
    try:
        b.write([os.urandom(4096)], MIB - 4096)
        b.resize(4 * MIB)  # grown by the backstore: the new range is a hole
        assert b.holes.covers(MIB, 4 * MIB)
        with open(path, "r+b") as f:  # grown by someone else (an extent-resize job writes zeroes)
            f.truncate(6 * MIB)
        b.resize(0)
        assert b.size == 6 * MIB and not b.holes.covers(4 * MIB, 4 * MIB + 512)
    finally:
        b.close()


def test_write_racing_a_punch_keeps_its_data(tmp_path: Path) -> None:
    """A write landing while a discard runs (the SCSI layer serialises them; the map does not rely
    on it) leaves its range out of the map, whatever the order the kernel applied them in."""
    path = tmp_path / "r.img"
    create_sparse(str(path), MIB)
    b = FileBackstore(str(path))
    real = file_backstore.fallocate
    data = os.urandom(4096)
    started, finish = threading.Event(), threading.Event()

    def slow_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        real(fd, mode, offset, length)
        started.set()
        finish.wait(5)

    try:
        b.write([os.urandom(64 * KIB)], 0)
        file_backstore.fallocate = slow_fallocate  # type: ignore[assignment]
        t = threading.Thread(target=b.discard, args=(0, 64 * KIB))
        t.start()
        assert started.wait(5)
        b.write([data], 8192)  # after the punch, before the discard returns
        finish.set()
        t.join(5)
        buf = bytearray(4096)
        b.read_into(buf, 8192)
        assert buf == data and not b.holes.covers(8192, 8192 + 4096)
    finally:
        file_backstore.fallocate = real  # type: ignore[assignment]
        finish.set()
        b.close()


# --- the model-based test through the SCSI layer ---------------------------------------------

BS = 512
START_BLOCKS = 4 * MIB // BS
MAX_BLOCKS = 12 * MIB // BS


def _cdb_rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def _run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


class LuModel(RuleBasedStateMachine):
    """An LU on a sparse file and a bytearray holding what it must contain."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"holes-{os.getpid()}-{id(self)}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.h: Harness | None = None
        self.ref = bytearray()

    @initialize()
    def start(self) -> None:
        self.ext = make_extent(self.tmp, size=START_BLOCKS * BS, blocksize=BS)
        self.ref = bytearray(START_BLOCKS * BS)
        self._open()

    def _open(self) -> None:
        async def opened() -> Harness:
            h = Harness(self.tmp, extent=self.ext)
            await h.clear_ua(h.a)
            return h

        self.h = _run(self.loop, opened())

    @property
    def blocks(self) -> int:
        return len(self.ref) // BS

    def _cmd(self, cdb: bytes, data: bytes | None = None, expected_len: int | None = None) -> Any:
        assert self.h is not None
        r = _run(self.loop, self.h.cmd(cdb, data, expected_len=expected_len))
        if r.status != 0:
            self.h and _run(self.loop, self.h.clear_ua(self.h.a))
            r = _run(self.loop, self.h.cmd(cdb, data, expected_len=expected_len))
        assert r.status == 0, r
        return r

    def _span(self, data: st.DataObject, most: int) -> tuple[int, int]:
        lba = data.draw(st.integers(0, self.blocks - 1), label="lba")
        n = data.draw(st.integers(1, min(most, self.blocks - lba)), label="blocks")
        return lba, n

    @rule(data=st.data(), fill=st.sampled_from(["random", "zero"]))
    def write(self, data: st.DataObject, fill: str) -> None:
        lba, n = self._span(data, 256)
        payload = os.urandom(n * BS) if fill == "random" else bytes(n * BS)  # zeroes written are data too
        self._cmd(_cdb_rw16(0x8A, lba, n), payload)
        self.ref[lba * BS:(lba + n) * BS] = payload

    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        descs = [self._span(data, 2048) for _ in range(data.draw(st.integers(1, 3), label="descriptors"))]
        body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
        param = struct.pack(">HH4x", 6 + len(body), len(body)) + body
        self._cmd(struct.pack(">BBxxxxxHB", 0x42, 0, len(param), 0), param)
        for lba, n in descs:
            self.ref[lba * BS:(lba + n) * BS] = bytes(n * BS)

    @rule(data=st.data(), kind=st.sampled_from(["unmap", "zero", "pattern", "ndob"]))
    def write_same(self, data: st.DataObject, kind: str) -> None:
        lba, n = self._span(data, 1024)
        pattern = os.urandom(BS) if kind == "pattern" else bytes(BS)
        flags = {"unmap": 0x08, "zero": 0, "pattern": 0, "ndob": 0x01}[kind]
        cdb = _cdb_rw16(0x93, lba, n, flags)
        if kind == "ndob":
            self._cmd(cdb, None, expected_len=0)
        else:
            self._cmd(cdb, pattern)
        self.ref[lba * BS:(lba + n) * BS] = pattern * n

    @precondition(lambda self: len(self.ref) // BS < MAX_BLOCKS)
    @rule(grow=st.integers(1, 2048))
    def resize(self, grow: int) -> None:
        assert self.h is not None
        blocks = min(MAX_BLOCKS, self.blocks + grow)
        self.ext.filesize = str(blocks * BS)
        logical_units.reconfigure(self.h.lu, self.ext)
        _run(self.loop, self.h.clear_ua(self.h.a))
        self.ref.extend(bytes(blocks * BS - len(self.ref)))

    @rule()
    def restart(self) -> None:
        assert self.h is not None
        self.h.close()
        self._open()

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        lba, n = self._span(data, 2048)
        r = self._cmd(_cdb_rw16(0x88, lba, n), expected_len=n * BS)
        assert r.data == self.ref[lba * BS:(lba + n) * BS], f"READ({lba}, {n}) differs from the reference"

    @invariant()
    def holes_hold_zeroes(self) -> None:
        if self.h is None:
            return
        b = self.h.lu.backstore
        assert isinstance(b, FileBackstore)
        for s, e in b.holes.ranges():
            e = min(e, len(self.ref))
            assert self.ref[s:e] == bytes(e - s), f"the map calls [{s}, {e}) a hole; it holds data"
            assert os.pread(b.fd, e - s, s) == bytes(e - s)

    def teardown(self) -> None:
        if self.h is not None:
            self.h.close()
        self.loop.close()
        for p in self.tmp.iterdir():
            p.unlink()
        self.tmp.rmdir()


TestLuModel = LuModel.TestCase
TestLuModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
