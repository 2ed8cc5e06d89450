"""RbdBackstore on a real (loopback, memstore) Ceph cluster, through the backstore contract: data,
zeroes, allocation, resize, compare-and-write, two clients on one image, fencing, cephx settings."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import ceph as ceph_support
from support.ceph import GATEWAY_ID, CephCluster, Image

from pyscsi_target.backstore.librbd import Image as RbdImage
from pyscsi_target.backstore.librbd import mismatch_offset
from pyscsi_target.backstore.rbd import RbdBackstore, RbdSpec
from pyscsi_target.cluster.rados import ClusterSettings, RadosError

# the cluster fixtures (tests/conftest.py does not know them)
ceph_cluster = ceph_support.ceph_cluster
ceph_cephx_cluster = ceph_support.ceph_cephx_cluster
rbd_image = ceph_support.rbd_image

MiB = 1 << 20
OBJ = 4 * MiB  # the default object size


def settings(cluster: CephCluster, **kw: Any) -> ClusterSettings:
    return ClusterSettings(conf=str(cluster.conf), **kw)


def spec(image: Image, **kw: Any) -> RbdSpec:
    return RbdSpec(image.pool, image.name, cluster=settings(image.cluster, **kw))


class Runner:
    """An event loop with the backstore attached; ``call(fn, *args)`` starts one async call
    (its last argument is the completion) and waits, bounded, for its outcome."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def call(self, fn: Callable[..., None], *args: Any, timeout: float = 20.0) -> BaseException | None:
        async def go() -> BaseException | None:
            fut: asyncio.Future[BaseException | None] = self.loop.create_future()
            fn(*args, fut.set_result)
            return await asyncio.wait_for(fut, timeout)

        return self.loop.run_until_complete(go())

    def ok(self, fn: Callable[..., None], *args: Any) -> None:
        exc = self.call(fn, *args)
        assert exc is None, exc

    def read(self, bs: RbdBackstore, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.ok(bs.submit_read, buf, offset)
        return bytes(buf)

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


@pytest.fixture
def bs(rbd_image: Image, runner: Runner) -> Iterator[RbdBackstore]:
    b = RbdBackstore(spec(rbd_image))
    b.attach(runner.loop)
    yield b
    b.close()


def test_spec_parse() -> None:
    assert RbdSpec.parse("rbd/disk1") == RbdSpec("rbd", "disk1")
    assert RbdSpec.parse("rbd/tenant/disk1").namespace == "tenant"
    assert RbdSpec.parse("rbd/tenant/disk1").name == "rbd/tenant/disk1"
    for bad in ("disk1", "rbd/", "/disk1", "a/b/c/d", "rbd//disk"):
        with pytest.raises(ValueError):
            RbdSpec.parse(bad)


def test_mismatch_offset_forms() -> None:
    # Pacific: object start + offset within the compared range; later releases: image offset.
    assert mismatch_offset(100, 8192, OBJ) == 100
    assert mismatch_offset(OBJ + 300, OBJ, OBJ) == 300
    assert mismatch_offset(OBJ + 100, OBJ + 8192, OBJ) == 100
    assert mismatch_offset(OBJ + 8192 + 100, OBJ + 8192, OBJ) == 100


def test_geometry(bs: RbdBackstore, rbd_image: Image) -> None:
    assert bs.size == rbd_image.size
    assert bs.object_size == OBJ
    assert bs.discard_granularity == bs.unmap_granularity == OBJ
    assert bs.discard_zeroes_granularity == 64 << 10  # rbd_skip_partial_discard on, 64 KiB chunks
    assert bs.thin and not bs.cached  # gateways run with rbd_cache off


def test_random_round_trips(bs: RbdBackstore, runner: Runner) -> None:
    rng = random.Random(7)
    model = bytearray(bs.size)
    for _ in range(40):
        length = rng.choice([512, 4096, 65536, 3 * 4096, MiB + 512])
        offset = rng.randrange(0, bs.size - length) & ~511
        data = bytearray(rng.randbytes(length))
        if rng.random() < 0.5:  # several buffers go as one iovec write
            cut = rng.randrange(1, length) & ~511 or 512
            parts: list[bytes | bytearray | memoryview] = [memoryview(data)[:cut], bytes(data[cut:])]
        else:
            parts = [data]
        runner.ok(bs.submit_write, parts, offset, rng.random() < 0.3)
        model[offset:offset + length] = data
    runner.ok(bs.submit_flush)
    for _ in range(40):
        length = rng.choice([512, 4096, 128 << 10])
        offset = rng.randrange(0, bs.size - length) & ~511
        assert runner.read(bs, offset, length) == model[offset:offset + length]
    # the whole image through the blocking path (what copy/sanitize use from a thread)
    whole = bytearray(bs.size)
    bs.read_into(whole, 0)
    assert whole == model


def test_empty_requests_complete_without_librbd(bs: RbdBackstore, runner: Runner) -> None:
    # librbd aborts the whole process on an empty read: they must never reach it
    runner.ok(bs.submit_read, bytearray(0), 0)
    runner.ok(bs.submit_write, [bytearray(0), b""], 4096, True)
    bs.discard(0, 0)
    bs.write_zeroes(0, 0)
    assert bs.compare_and_write(b"", b"", 0, False) == -1
    bs.read_into(bytearray(0), 0)
    bs.write([b""], 0)
    assert bs.inflight == 0


def test_many_reads_in_flight(bs: RbdBackstore, runner: Runner) -> None:
    data = os.urandom(8 * MiB)
    bs.write([data], 0)
    bufs = [bytearray(4096) for _ in range(64)]
    offsets = [random.randrange(0, 2048) * 4096 for _ in range(64)]

    async def all_reads() -> list[BaseException | None]:
        futs = []
        for buf, off in zip(bufs, offsets, strict=True):
            fut: asyncio.Future[BaseException | None] = runner.loop.create_future()
            bs.submit_read(buf, off, fut.set_result)
            futs.append(fut)
        return await asyncio.wait_for(asyncio.gather(*futs), 20)

    assert runner.loop.run_until_complete(all_reads()) == [None] * 64
    for buf, off in zip(bufs, offsets, strict=True):
        assert buf == data[off:off + 4096]
    assert bs.image is not None and bs.image.inflight == 0
    # every completion came through the eventfd, several per wake-up when they pile up
    assert bs.image.reaped == 64 and 1 <= bs.image.wakeups <= 64


def test_discard_and_write_zeroes_read_back_zeroes(bs: RbdBackstore, runner: Runner) -> None:
    fill = b"\xa5" * (12 * MiB)
    bs.write([fill], 0)
    # the contract's discard leaves zeroes at any size (a plain rbd discard skips partial chunks)
    bs.discard(8 * MiB + 4096, 4096)
    assert runner.read(bs, 8 * MiB, 3 * 4096) == fill[:4096] + bytes(4096) + fill[:4096]
    bs.discard(OBJ, OBJ)
    assert runner.read(bs, OBJ, OBJ) == bytes(OBJ)
    # write zeroes is exact at any size
    bs.write_zeroes(8 * MiB + 512, 1024)
    got = runner.read(bs, 8 * MiB, 4096)
    assert got == fill[:512] + bytes(1024) + fill[:4096 - 1536]
    # and keeps the rest of the image
    assert runner.read(bs, 0, 128 << 10) == fill[:128 << 10]


def test_block_status_after_writes_and_discards(bs: RbdBackstore, runner: Runner) -> None:
    assert bs.block_status(0, bs.size) == [(0, bs.size, False)]  # a new image maps nothing
    runner.ok(bs.submit_write, [os.urandom(4096)], OBJ + 4096, False)
    runner.ok(bs.submit_write, [os.urandom(4096)], 3 * OBJ, False)
    runs = bs.block_status(0, bs.size)
    assert runs == [(0, OBJ, False), (OBJ, OBJ, True), (2 * OBJ, OBJ, False), (3 * OBJ, OBJ, True),
                    (4 * OBJ, bs.size - 4 * OBJ, False)]
    # a range starting mid-object, and the run limit
    assert bs.block_status(OBJ + 512, OBJ, 1) == [(OBJ + 512, OBJ - 512, True)]
    bs.discard(OBJ, OBJ)  # a whole object is deallocated
    assert bs.block_status(0, 4 * OBJ) == [(0, 3 * OBJ, False), (3 * OBJ, OBJ, True)]
    bs.discard(3 * OBJ + 4096, 4096)  # part of an object: zeroed, still allocated
    assert bs.block_status(3 * OBJ, OBJ) == [(3 * OBJ, OBJ, True)]
    # zeroes written without UNMAP keep a whole object mapped
    bs.write_zeroes(5 * OBJ, OBJ)
    assert bs.block_status(5 * OBJ, OBJ) == [(5 * OBJ, OBJ, True)]
    assert runner.read(bs, 5 * OBJ, 4096) == bytes(4096)
    bs.discard(3 * OBJ, 3 * OBJ)
    assert bs.block_status(0, bs.size) == [(0, bs.size, False)]
    assert bs.allocated_bytes() == 0


def test_block_status_without_object_map(ceph_cluster: CephCluster, runner: Runner) -> None:
    image = ceph_cluster.create_image(16 * MiB, features="layering")
    b = RbdBackstore(spec(image))
    try:
        b.attach(runner.loop)
        runner.ok(b.submit_write, [os.urandom(8192)], OBJ + 4096, False)
        runs = b.block_status(0, b.size)
        mapped = [r for r in runs if r.mapped]
        # without the object map librbd lists the object's real extent
        assert mapped and mapped[0].offset <= OBJ + 4096 and mapped[-1].offset + mapped[-1].length >= OBJ + 12288
        assert all(OBJ <= r.offset < 2 * OBJ for r in mapped)
    finally:
        b.close()
        ceph_cluster.remove_image(image)


def test_compare_and_write(bs: RbdBackstore, runner: Runner) -> None:
    for offset in (8192, OBJ, OBJ + 8192, 5 * OBJ + 512):
        old = os.urandom(512)
        bs.write([old], offset)
        new = os.urandom(512)
        bad = bytearray(old)
        bad[137] ^= 0x40
        assert bs.compare_and_write(bytes(bad), new, offset, False) == 137, offset
        assert runner.read(bs, offset, 512) == old  # nothing written
        assert bs.compare_and_write(old, new, offset, True) == -1
        assert runner.read(bs, offset, 512) == new


def test_compare_and_write_beyond_one_sector(bs: RbdBackstore, runner: Runner) -> None:
    offset, old = OBJ - 4096, os.urandom(8192)  # 4 KiB blocks, across an object boundary
    assert not bs.caw_atomic(offset, len(old))
    bs.write([old], offset)
    bad = bytearray(old)
    bad[5000] ^= 1
    assert bs.compare_and_write(bytes(bad), bytes(8192), offset, False) == 5000
    assert bs.compare_and_write(old, b"\x11" * 8192, offset, False) == -1
    assert runner.read(bs, offset, 8192) == b"\x11" * 8192
    # the data path still takes the lock by itself (librbd keeps the handle that held it explicitly
    # from ever doing so again: the backstore used a handle of its own for that)
    runner.ok(bs.submit_write, [b"\x22" * 8192], offset, False)
    assert runner.read(bs, offset, 8192) == b"\x22" * 8192
    assert bs.compare_and_write(b"\x22" * 8192, b"\x33" * 8192, offset, False) == -1
    runner.ok(bs.submit_write, [b"\x44" * 4096], 0, True)


def second_client(image: Image) -> RbdBackstore:
    """Another librados client on the same image (different options: a second client instance),
    as a second gateway process would have."""
    return RbdBackstore(spec(image, options=(("client_mount_timeout", "14"),)))


def test_two_clients_share_one_image(rbd_image: Image, runner: Runner) -> None:
    a = RbdBackstore(spec(rbd_image))
    b = second_client(rbd_image)
    try:
        assert a.rados is not None and b.rados is not None
        assert a.rados is not b.rados and a.rados.instance_id != b.rados.instance_id
        a.attach(runner.loop)
        b.attach(runner.loop)
        for k in range(6):  # writes alternate: the exclusive lock moves between the clients
            writer, reader = (a, b) if k % 2 == 0 else (b, a)
            data = os.urandom(65536)
            runner.ok(writer.submit_write, [data], k * 65536, False)
            assert runner.read(reader, k * 65536, 65536) == data
        # compare-and-write from both: the cluster compares, so exactly one of two racing
        # writers with the same expectation wins.
        base = os.urandom(512)
        runner.ok(a.submit_write, [base], 0, False)

        async def race() -> list[int]:
            loop = asyncio.get_running_loop()
            return list(await asyncio.wait_for(asyncio.gather(
                loop.run_in_executor(None, a.compare_and_write, base, b"A" * 512, 0, False),
                loop.run_in_executor(None, b.compare_and_write, base, b"B" * 512, 0, False)), 20))

        results = runner.loop.run_until_complete(race())
        assert sorted(results) == [-1, 0], results
        winner = b"A" if results[0] == -1 else b"B"
        assert runner.read(a, 0, 512) == winner * 512 == runner.read(b, 0, 512)
        # a compare-and-write beyond one sector holds the lock only while it runs
        assert a.compare_and_write(runner.read(a, 0, 4096), b"C" * 4096, 0, False) == -1
        assert runner.read(b, 0, 4096) == b"C" * 4096
        runner.ok(b.submit_write, [b"D" * 4096], 0, False)
        assert runner.read(a, 0, 4096) == b"D" * 4096
    finally:
        a.close()
        b.close()


def test_peer_writes_wait_for_an_explicit_lock_holder(rbd_image: Image, runner: Runner) -> None:
    """While one client holds the lock explicitly (a multi-sector COMPARE AND WRITE), the other's
    writes are refused by librbd (EROFS); the backstore retries them, so they land once the lock
    is given back instead of failing."""
    a = RbdBackstore(spec(rbd_image))
    b = second_client(rbd_image)
    assert a.io is not None
    holder = RbdImage(a.io, rbd_image.name)  # what a compare-and-write of several sectors does
    try:
        a.attach(runner.loop)
        b.attach(runner.loop)
        holder.lock_acquire()

        async def held_then_released() -> BaseException | None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[BaseException | None] = loop.create_future()
            b.submit_write([b"E" * 4096], 0, False, fut.set_result)
            await asyncio.sleep(0.3)
            assert not fut.done()  # still waiting for the lock
            assert await loop.run_in_executor(None, holder.read, 0, 4096) == bytes(4096)
            await loop.run_in_executor(None, holder.lock_release)
            return await asyncio.wait_for(fut, 20)

        assert runner.loop.run_until_complete(held_then_released()) is None
        assert runner.read(a, 0, 4096) == b"E" * 4096
    finally:
        holder.close()
        a.close()
        b.close()


def test_a_fenced_client_is_told(rbd_image: Image, runner: Runner) -> None:
    """Another client breaks this one's lock (blocklisting it): its next write fails with
    ESHUTDOWN, lands nowhere, and ``on_fenced`` runs once on the loop."""
    a = RbdBackstore(spec(rbd_image))
    b = second_client(rbd_image)
    try:
        a.attach(runner.loop)
        b.attach(runner.loop)
        fenced: list[bool] = []
        a.on_fenced = lambda: fenced.append(True)
        runner.ok(a.submit_write, [b"a" * 4096], 0, False)
        assert b.lock_owners() == [a.client_address]
        b.break_lock(a.client_address)
        exc = runner.call(a.submit_write, [b"x" * 4096], 0, False)
        assert isinstance(exc, OSError) and exc.errno == errno.ESHUTDOWN
        runner.loop.run_until_complete(asyncio.sleep(0.01))
        assert fenced == [True] and a.fenced
        runner.ok(b.submit_write, [b"b" * 4096], 4096, False)
        assert runner.read(b, 0, 8192) == b"a" * 4096 + b"b" * 4096
        # the next image opened with these settings gets a new client instance
        c = RbdBackstore(spec(rbd_image))
        try:
            assert c.rados is not a.rados
            c.attach(runner.loop)
            runner.ok(c.submit_write, [b"c" * 512], 0, False)
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_resize_seen_by_second_opener(rbd_image: Image, runner: Runner) -> None:
    a = RbdBackstore(spec(rbd_image))
    b = second_client(rbd_image)
    try:
        seen: list[int] = []
        a.attach(runner.loop)
        b.attach(runner.loop)
        b.on_size_change = seen.append
        new_size = rbd_image.size + 8 * MiB
        a.resize(new_size)
        assert a.size == new_size

        async def wait_seen() -> None:
            for _ in range(200):
                if seen:
                    return
                await asyncio.sleep(0.025)

        runner.loop.run_until_complete(wait_seen())
        assert seen == [new_size] and b.size == new_size
        data = os.urandom(4096)  # the new end is usable from the other client
        runner.ok(b.submit_write, [data], new_size - 4096, False)
        assert runner.read(a, new_size - 4096, 4096) == data
        # a read past the end fails instead of inventing data
        exc = runner.call(a.submit_read, bytearray(4096), new_size)
        assert isinstance(exc, OSError) and exc.errno == errno.EINVAL
    finally:
        a.close()
        b.close()


def test_read_only_open(rbd_image: Image, runner: Runner) -> None:
    b = RbdBackstore(spec(rbd_image), read_only=True)
    try:
        b.attach(runner.loop)
        assert runner.read(b, 0, 4096) == bytes(4096)
        with pytest.raises(OSError) as e:
            b.submit_write([b"x" * 512], 0, False, lambda _e: None)
        assert e.value.errno == errno.EROFS
    finally:
        b.close()


def test_namespace(ceph_cluster: CephCluster, runner: Runner) -> None:
    ceph_cluster.create_namespace("tenant1")
    image = ceph_cluster.create_image(8 * MiB, namespace="tenant1")
    b = RbdBackstore(RbdSpec(image.pool, image.name, "tenant1", settings(ceph_cluster)))
    try:
        b.attach(runner.loop)
        runner.ok(b.submit_write, [b"n" * 4096], 0, False)
        assert runner.read(b, 0, 4096) == b"n" * 4096
    finally:
        b.close()
        ceph_cluster.remove_image(image, namespace="tenant1")
    with pytest.raises(RadosError) as e:  # not in the default namespace
        RbdBackstore(RbdSpec(image.pool, image.name, "", settings(ceph_cluster)))
    assert e.value.errno == errno.ENOENT


def test_missing_image_and_pool(ceph_cluster: CephCluster) -> None:
    with pytest.raises(RadosError) as e:
        RbdBackstore(RbdSpec("rbd", "no-such-image", cluster=settings(ceph_cluster)))
    assert e.value.errno == errno.ENOENT and "no-such-image" in str(e.value)
    with pytest.raises(RadosError) as e:
        RbdBackstore(RbdSpec("nopool", "x", cluster=settings(ceph_cluster)))
    assert e.value.errno == errno.ENOENT and "nopool" in str(e.value)


def test_cephx_client_id_and_keyring(ceph_cephx_cluster: CephCluster, runner: Runner) -> None:
    image = ceph_cephx_cluster.create_image(8 * MiB)
    try:
        gw = ClusterSettings(str(ceph_cephx_cluster.conf), GATEWAY_ID, str(ceph_cephx_cluster.gateway_keyring))
        b = RbdBackstore(RbdSpec(image.pool, image.name, cluster=gw))
        try:
            b.attach(runner.loop)
            runner.ok(b.submit_write, [b"k" * 4096], 0, False)
            assert runner.read(b, 0, 4096) == b"k" * 4096
        finally:
            b.close()
        # the gateway's key under another client name is refused, with an error that says so
        wrong = ClusterSettings(str(ceph_cephx_cluster.conf), "intruder", str(ceph_cephx_cluster.gateway_keyring),
                                (("client_mount_timeout", "5"),))
        with pytest.raises(RadosError) as e:
            RbdBackstore(RbdSpec(image.pool, image.name, cluster=wrong))
        assert e.value.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ENOTCONN)
        assert "connecting" in str(e.value)
    finally:
        ceph_cephx_cluster.remove_image(image)
