"""File and block backstores: sparse creation, holes, discard, NOWAIT paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyscsi_target.backstore.block import BlockBackstore
from pyscsi_target.backstore.file import FileBackstore, create_sparse, parse_size


def test_parse_size() -> None:
    assert parse_size("0") == 0
    assert parse_size("4096") == 4096
    assert parse_size("10MB") == 10 << 20
    assert parse_size("2 GiB") == 2 << 30
    assert parse_size("1T") == 1 << 40
    with pytest.raises(ValueError):
        parse_size("ten")


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


@pytest.mark.skipif(not os.path.exists("/dev/loop-control") or os.geteuid() != 0, reason="needs loop devices")
def test_block_backstore_on_loop_device(tmp_path: Path) -> None:
    import subprocess

    p = tmp_path / "loop.img"
    create_sparse(str(p), 32 << 20)
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(p)], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("losetup unavailable")
    try:
        b = BlockBackstore(dev)
        try:
            assert b.size == 32 << 20
            b.write([b"q" * 4096], 8192, fua=True)
            b.discard(8192, 4096)
            got = bytearray(4096)
            b.read_into(got, 8192)
            assert got == bytes(4096)
        finally:
            b.close()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
