"""File and block backstores: sparse creation, holes, discard, NOWAIT paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyscsi_target.backstore.base import Extent, RangeSet
from pyscsi_target.backstore.block import BlockBackstore
from pyscsi_target.backstore.file import FileBackstore, create_sparse


def test_create_sparse_allocates_nothing(tmp_path: Path) -> None:
    p = tmp_path / "s.img"
    create_sparse(str(p), 256 << 20)
    st = os.stat(p)
    assert st.st_size == 256 << 20 and st.st_blocks == 0


def test_existing_file_size_when_zero(tmp_path: Path) -> None:
    p = tmp_path / "e.img"
    create_sparse(str(p), 8 << 20)
    b = FileBackstore(str(p), 0)
    try:
        assert b.size == 8 << 20 and b.thin
    finally:
        b.close()


def test_io_discard_and_block_status(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    b = FileBackstore(str(p), 16 << 20)
    try:
        st = b.block_status(0, b.size)
        assert [(e.offset, e.length, e.mapped) for e in st] == [(0, 16 << 20, False)]
        buf = bytearray(4096)
        assert b.read_nowait(buf, 0) and buf == bytes(4096)  # a hole reads from cache as zeroes
        data = os.urandom(64 << 10)
        b.write([data], 1 << 20, fua=True)
        got = bytearray(len(data))
        b.read_into(got, 1 << 20)
        assert got == data
        b.discard((1 << 20) + 8192, 16384)
        runs = [(e.offset, e.length, e.mapped) for e in b.block_status(1 << 20, 64 << 10)]
        assert runs == [(1 << 20, 8192, True), ((1 << 20) + 8192, 16384, False),
                        ((1 << 20) + 24576, (64 << 10) - 24576, True)]
        b.read_into(got, 1 << 20)
        assert got[8192:24576] == bytes(16384) and got[:8192] == data[:8192]
        before = b.allocated_bytes()
        b.discard(0, b.size)
        assert b.allocated_bytes() < before
        b.write_zeroes(0, 8192)
        b.read_into(got, 0)
        assert got[:8192] == bytes(8192)
    finally:
        b.close()


def test_write_nowait_falls_back(tmp_path: Path) -> None:
    """Buffered RWF_NOWAIT writes are unsupported on ext4 here: the flag then stays off."""
    b = FileBackstore(str(tmp_path / "n.img"), 1 << 20)
    try:
        ok = b.write_nowait([b"x" * 4096], 0)
        if not ok:
            assert b.nowait_write is False
            b.write([b"x" * 4096], 0)
        got = bytearray(4096)
        b.read_into(got, 0)
        assert got == b"x" * 4096
    finally:
        b.close()


def test_resize_grows(tmp_path: Path) -> None:
    b = FileBackstore(str(tmp_path / "r.img"), 1 << 20)
    try:
        b.resize(4 << 20)
        assert b.size == 4 << 20 and os.fstat(b.fd).st_size == 4 << 20
    finally:
        b.close()


def test_block_backstore_refuses_regular_file(tmp_path: Path) -> None:
    p = tmp_path / "f.img"
    create_sparse(str(p), 1 << 20)
    with pytest.raises(OSError):
        BlockBackstore(str(p))


def test_range_set() -> None:
    r = RangeSet()
    assert not r and r.runs(0, 100, 10) == [Extent(0, 100, True)]
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 25)  # touching merges
    assert (r.starts, r.ends) == ([10, 30], [25, 40])
    assert r.runs(0, 50, 10) == [Extent(0, 10, True), Extent(10, 15, False), Extent(25, 5, True),
                                 Extent(30, 10, False), Extent(40, 10, True)]
    assert r.runs(12, 35, 2) == [Extent(12, 13, False), Extent(25, 5, True)]
    r.remove(12, 14)  # split
    assert (r.starts, r.ends) == ([10, 14, 30], [12, 25, 40])
    r.remove(0, 35)
    assert (r.starts, r.ends) == ([35], [40])
    r.add(0, 100)
    assert (r.starts, r.ends) == ([0], [100])
    r.remove(0, 100)
    assert not r
    small = RangeSet(max_ranges=2)
    small.add(0, 1)
    small.add(5, 6)
    small.add(10, 11)  # a third entry is not recorded: the set never over-reports
    small.add(1, 5)  # merging needs no new entry
    assert (small.starts, small.ends) == ([0], [6])


@pytest.fixture
def loop_dev(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a 32 MiB sparse file (removed again afterwards)."""
    import subprocess

    if not os.path.exists("/dev/loop-control") or os.geteuid() != 0:
        pytest.skip("needs loop devices (root)")
    p = tmp_path / "loop.img"
    create_sparse(str(p), 32 << 20)
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(p)], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("losetup unavailable")
    try:
        yield dev, p
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        p.unlink(missing_ok=True)


def test_block_backstore_on_loop_device(loop_dev: tuple[str, Path]) -> None:
    dev, backing = loop_dev
    b = BlockBackstore(dev)
    try:
        assert b.size == 32 << 20 and b.thin
        assert b.block_status(0, b.size) == [Extent(0, b.size, True)]  # unknown = mapped
        b.write([b"q" * (1 << 20)], 1 << 20, fua=True)
        allocated = os.stat(backing).st_blocks * 512
        assert allocated >= 1 << 20
        b.discard(1 << 20, 1 << 20)
        got = bytearray(4096)
        b.read_into(got, (1 << 20) + 8192)
        assert got == bytes(4096)
        # the device's own deallocation really freed the space (no re-allocating zero-out)
        assert os.stat(backing).st_blocks * 512 <= allocated - (1 << 20)
        assert b.block_status(0, 3 << 20) == [Extent(0, 1 << 20, True), Extent(1 << 20, 1 << 20, False),
                                              Extent(2 << 20, 1 << 20, True)]
        # any write maps again: WRITE, write-zeroes (WRITE SAME without UNMAP)
        b.write([b"w" * 4096], (1 << 20) + 4096)
        b.write_zeroes((2 << 20) - 4096, 4096)
        assert b.block_status(1 << 20, 1 << 20) == [
            Extent(1 << 20, 4096, False), Extent((1 << 20) + 4096, 4096, True),
            Extent((1 << 20) + 8192, (1 << 20) - 12288, False), Extent((2 << 20) - 4096, 4096, True)]
        b.read_into(got, (2 << 20) - 4096)
        assert got == bytes(4096)
    finally:
        b.close()
