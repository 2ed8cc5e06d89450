"""Logical units on RBD images (a real loopback cluster), opened as the engine opens an RBD
extent: what SBC commands do on an image, and what the LU advertises from it."""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from support import ceph as ceph_support
from support.ceph import CephCluster, Image
from test_scsi_support import Harness, rw10, rw16

from pyscsi_target.backstore.rbd import RbdBackstore, RbdSpec
from pyscsi_target.cluster.rados import ClusterSettings
from pyscsi_target.config.model import Extent
from pyscsi_target.scsi import sense as S

ceph_cluster = ceph_support.ceph_cluster
rbd_image = ceph_support.rbd_image

GOOD, CC = 0x00, 0x02
MiB = 1 << 20
OBJ = 4 * MiB
_ids = itertools.count(1000)


def rbd_extent(image: Image, blocksize: int = 512, **kw: object) -> Extent:
    return Extent(id=next(_ids), name=image.name, type="RBD", path=f"{image.pool}/{image.name}", filesize="0",
                  blocksize=blocksize, ceph_conf=str(image.cluster.conf), **kw)  # type: ignore[arg-type]


def run_with(extent: Extent, tmp_path: Path, test: Callable[[Harness], Awaitable[None]]) -> None:
    """Open the extent's LU on a running loop, as the engine does, and run ``test`` on it."""
    async def main() -> None:
        h = Harness(tmp_path, extent=extent)
        try:
            await test(h)
        finally:
            h.close()

    asyncio.run(main())


def ws16(lba: int, n: int, unmap: bool = False, ndob: bool = False) -> bytes:
    return struct.pack(">BBQIBB", 0x93, (0x08 if unmap else 0) | (0x01 if ndob else 0), lba, n, 0, 0)


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    n = (struct.unpack_from(">I", data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(n)]


def test_io_vpd_and_capacity(rbd_image: Image, tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        await h.clear_ua()
        blocks = rbd_image.size // 512
        r = await h.cmd(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2))
        last, bs, _, _, flags = struct.unpack_from(">QIBBH", r.data)
        assert (last + 1, bs) == (blocks, 512)
        assert flags & 0xC000 == 0xC000  # LBPME, LBPRZ
        # Block limits: OPTIMAL UNMAP GRANULARITY = one RBD object, aligned at 0
        r = await h.cmd(bytes((0x12, 0x01, 0xB0, 0, 0xFF, 0)))
        gran, align = struct.unpack_from(">II", r.data, 28)
        assert gran == OBJ // 512 and align == 0x80000000
        data = os.urandom(64 * 512)
        assert (await h.cmd(rw10(0x2A, 100, 64), data)).status == GOOD
        assert (await h.cmd(rw10(0x28, 100, 64))).data == data
        assert (await h.cmd(rw16(0x8A, blocks - 8, 8, flags=0x08), data[:4096])).status == GOOD  # FUA
        assert (await h.cmd(rw16(0x88, blocks - 8, 8))).data == data[:4096]
        assert (await h.cmd(bytes((0x35,)) + bytes(9))).status == GOOD  # SYNCHRONIZE CACHE
        r = await h.cmd(rw10(0x28, blocks - 4, 8))
        assert r.status == CC and r.key_asc == (S.ILLEGAL_REQUEST, 0x21, 0x00)

    run_with(rbd_extent(rbd_image), tmp_path, test)


def test_write_same_unmap_and_lba_status(rbd_image: Image, tmp_path: Path) -> None:
    per_obj = OBJ // 512

    async def test(h: Harness) -> None:
        await h.clear_ua()
        r = await h.cmd(get_lba_status(0))
        assert lba_status(r.data)[0] == (0, h.lu.num_blocks, 1)  # nothing mapped yet
        pattern = b"\x5a" * 512
        assert (await h.cmd(ws16(per_obj, 2 * per_obj), pattern)).status == GOOD
        assert (await h.cmd(rw10(0x28, per_obj + 5, 1))).data == pattern
        assert lba_status((await h.cmd(get_lba_status(0))).data)[:3] == [
            (0, per_obj, 1), (per_obj, 2 * per_obj, 0), (3 * per_obj, h.lu.num_blocks - 3 * per_obj, 1)]
        # WRITE SAME of zeroes without UNMAP: zeroes, still mapped
        assert (await h.cmd(ws16(per_obj, per_obj, ndob=True), expected_len=0)).status == GOOD
        assert (await h.cmd(rw10(0x28, per_obj, 8))).data == bytes(4096)
        assert lba_status((await h.cmd(get_lba_status(per_obj))).data)[0] == (per_obj, 2 * per_obj, 0)
        # WRITE SAME with UNMAP: zeroes at once; the whole object is deallocated
        assert (await h.cmd(ws16(per_obj, per_obj, unmap=True, ndob=True), expected_len=0)).status == GOOD
        assert lba_status((await h.cmd(get_lba_status(per_obj))).data)[:2] == [
            (per_obj, per_obj, 1), (2 * per_obj, per_obj, 0)]
        # UNMAP of part of an object: those blocks read zeroes, the object stays allocated
        desc = struct.pack(">HH4xQI4x", 22, 16, 2 * per_obj + 8, 16)
        assert (await h.cmd(bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">H", 24) + b"\0", desc)).status == GOOD
        got = (await h.cmd(rw10(0x28, 2 * per_obj, 32))).data
        assert got == pattern * 8 + bytes(16 * 512) + pattern * 8
        assert lba_status((await h.cmd(get_lba_status(2 * per_obj))).data)[0] == (2 * per_obj, per_obj, 0)

    run_with(rbd_extent(rbd_image), tmp_path, test)


def test_compare_and_write_sense(rbd_image: Image, tmp_path: Path) -> None:
    async def test(h: Harness) -> None:
        await h.clear_ua()
        old, new = os.urandom(512), os.urandom(512)
        assert (await h.cmd(rw10(0x2A, 7, 1), old)).status == GOOD
        bad = bytearray(old)
        bad[300] ^= 1
        caw = struct.pack(">BBQ3xBBB", 0x89, 0, 7, 1, 0, 0)
        r = await h.cmd(caw, bytes(bad) + new)
        assert r.status == CC and r.key_asc == (S.MISCOMPARE, 0x1D, 0x00)
        assert r.sense is not None and struct.unpack_from(">I", r.sense, 3)[0] == 300  # INFORMATION
        assert (await h.cmd(rw10(0x28, 7, 1))).data == old
        assert (await h.cmd(caw, old + new)).status == GOOD
        assert (await h.cmd(rw10(0x28, 7, 1))).data == new

    run_with(rbd_extent(rbd_image), tmp_path, test)


def test_capacity_change_by_another_client(rbd_image: Image, tmp_path: Path) -> None:
    """Another client grows the image: the LU learns it from the image header, and every I_T
    nexus gets CAPACITY DATA HAS CHANGED."""
    async def test(h: Harness) -> None:
        await h.clear_ua()
        await h.clear_ua(h.b)
        other = RbdBackstore(RbdSpec(rbd_image.pool, rbd_image.name,
                                     cluster=ClusterSettings(str(rbd_image.cluster.conf),
                                                             options=(("client_mount_timeout", "14"),))))
        try:
            await asyncio.to_thread(other.resize, rbd_image.size + 8 * MiB)
        finally:
            await asyncio.to_thread(other.close)
        for _ in range(200):
            if h.lu.num_blocks != rbd_image.size // 512:
                break
            await asyncio.sleep(0.025)
        assert h.lu.num_blocks == (rbd_image.size + 8 * MiB) // 512
        for nx in (h.a, h.b):
            r = await h.cmd(bytes(6), nx=nx)
            assert r.status == CC and r.key_asc == (S.UNIT_ATTENTION, 0x2A, 0x09), nx
        r = await h.cmd(bytes((0x25,)) + bytes(9))
        assert struct.unpack(">I", r.data[:4])[0] == (rbd_image.size + 8 * MiB) // 512 - 1

    run_with(rbd_extent(rbd_image), tmp_path, test)


def test_4k_blocks_compare_and_write_under_the_lock(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    image = ceph_cluster.create_image(16 * MiB)

    async def test(h: Harness) -> None:
        await h.clear_ua()
        old, new = os.urandom(8192), os.urandom(8192)
        assert (await h.cmd(rw10(0x2A, 3, 2), old)).status == GOOD
        caw = struct.pack(">BBQ3xBBB", 0x89, 0, 3, 2, 0, 0)
        bad = bytearray(old)
        bad[4100] ^= 0x80
        r = await h.cmd(caw, bytes(bad) + new)
        assert r.status == CC and r.key_asc == (S.MISCOMPARE, 0x1D, 0x00)
        assert r.sense is not None and struct.unpack_from(">I", r.sense, 3)[0] == 4100
        assert (await h.cmd(caw, old + new)).status == GOOD
        assert (await h.cmd(rw10(0x28, 3, 2))).data == new
        # plain writes go on after it (the locked compare used a handle of its own)
        assert (await h.cmd(rw10(0x2A, 3, 1), old[:4096])).status == GOOD
        assert (await h.cmd(rw10(0x28, 3, 1))).data == old[:4096]

    try:
        run_with(rbd_extent(image, blocksize=4096), tmp_path, test)
    finally:
        ceph_cluster.remove_image(image)
