"""The librados primitives the multi-gateway work stands on, on a real cluster: omap
compare-and-swap under races, watch/notify delivery to an event loop, and taking over a dead
gateway's exclusive lock with blocklisting."""

from __future__ import annotations

import asyncio
import errno
import json
import statistics
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from support import ceph as ceph_support
from support.ceph import CephCluster, Image

from pyscsi_target.backstore.librbd import Image as RbdImage
from pyscsi_target.cluster.rados import ClusterSettings, IoCtx, Notification, Rados, RadosError, parse_notify_reply

ceph_cluster = ceph_support.ceph_cluster
rbd_image = ceph_support.rbd_image


def connect(cluster: CephCluster) -> Rados:
    return Rados(ClusterSettings(conf=str(cluster.conf)))


@pytest.fixture
def two_clients(ceph_cluster: CephCluster) -> Iterator[tuple[IoCtx, IoCtx]]:
    a, b = connect(ceph_cluster), connect(ceph_cluster)
    ia, ib = a.open_ioctx("rbd"), b.open_ioctx("rbd")
    yield ia, ib
    ia.close()
    ib.close()
    a.shutdown()
    b.shutdown()


def test_omap_cas_semantics(two_clients: tuple[IoCtx, IoCtx]) -> None:
    io, _ = two_clients
    oid = f"cas-{uuid.uuid4().hex}"
    with pytest.raises(RadosError) as e:  # no object, no create: nothing happens
        io.omap_cas(oid, {"gen": b""}, {"gen": b"1"})
    assert e.value.errno == errno.ENOENT
    assert io.omap_cas(oid, {"gen": b""}, {"gen": b"1", "a": b"x"}, create=True)  # first version
    assert not io.omap_cas(oid, {"gen": b""}, {"gen": b"1"}, create=True)  # only once
    assert not io.omap_cas(oid, {"gen": b"7"}, {"a": b"lost"})
    assert io.omap_get(oid) == {"gen": b"1", "a": b"x"}
    assert io.omap_cas(oid, {"gen": b"1", "a": b"x"}, {"gen": b"2"}, remove_keys=["a"])
    assert io.omap_get(oid) == {"gen": b"2"}
    # binary values, prefixes, and more keys than one listing returns
    assert io.omap_cas(oid, {"gen": b"2"}, {f"reg/{k:04d}": bytes([k % 256, 0, 255]) for k in range(300)})
    regs = io.omap_get(oid, prefix="reg/", max_return=128)
    assert len(regs) == 300 and regs["reg/0257"] == b"\x01\x00\xff"
    io.remove(oid)


def test_omap_cas_race_loses_no_update(two_clients: tuple[IoCtx, IoCtx]) -> None:
    """Two clients increment one counter 40 times each by read + compare-and-swap: every
    increment lands exactly once, and the losers of a race saw their CAS refused."""
    oid = f"counter-{uuid.uuid4().hex}"
    two_clients[0].omap_cas(oid, {"n": b""}, {"n": b"0"}, create=True)
    retries = [0, 0]
    deadline = time.monotonic() + 60

    def worker(k: int, io: IoCtx) -> None:
        for _ in range(40):
            while time.monotonic() < deadline:
                cur = io.omap_get(oid)["n"]
                if io.omap_cas(oid, {"n": cur}, {"n": str(int(cur) + 1).encode(), f"by{k}": cur}):
                    break
                retries[k] += 1

    threads = [threading.Thread(target=worker, args=(k, io)) for k, io in enumerate(two_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(70)
    assert two_clients[1].omap_get(oid)["n"] == b"80"
    print(f"CAS retries under contention: {retries}")
    two_clients[0].remove(oid)


def test_watch_notify_reaches_the_loop(two_clients: tuple[IoCtx, IoCtx]) -> None:
    watcher_io, notifier_io = two_clients
    oid = f"config-{uuid.uuid4().hex}"
    watcher_io.write_full(oid, b"")
    loop = asyncio.new_event_loop()
    got: list[tuple[float, Notification, bool]] = []

    def on_notify(n: Notification) -> bytes:
        on_loop = threading.get_ident() == loop_thread
        got.append((time.perf_counter(), n, on_loop))
        return b"applied " + n.data

    loop_thread = threading.get_ident()
    watch = watcher_io.watch(oid, on_notify, loop=loop)
    try:
        latencies = []
        for k in range(20):
            sent = time.perf_counter()
            fut = loop.run_in_executor(None, notifier_io.notify, oid, f"gen {k}".encode(), 5000)
            result = loop.run_until_complete(asyncio.wait_for(fut, 10))
            assert got[-1][1].data == f"gen {k}".encode() and got[-1][2]
            latencies.append(got[-1][0] - sent)
            assert result.timeouts == []
            assert list(result.acks.values()) == [f"applied gen {k}".encode()]
            (gid, _cookie), = result.acks
            assert gid == watcher_io.rados.instance_id
        assert got[0][1].notifier_id == notifier_io.rados.instance_id
        assert watch.check() >= 0
        print(f"notify -> watcher on the loop: median {statistics.median(latencies) * 1e3:.2f} ms, "
              f"max {max(latencies) * 1e3:.2f} ms")
        assert statistics.median(latencies) < 0.25  # the issue measured ~1 ms; a loaded box is slower
    finally:
        watch.close()
        loop.close()
    # without the watch, nobody acknowledges and the notify returns at once with no acks
    assert notifier_io.notify(oid, b"x", 2000).acks == {}
    watcher_io.remove(oid)


def test_notify_lists_a_watcher_that_does_not_answer(two_clients: tuple[IoCtx, IoCtx]) -> None:
    watcher_io, notifier_io = two_clients
    oid = f"slow-{uuid.uuid4().hex}"
    watcher_io.write_full(oid, b"")
    loop = asyncio.new_event_loop()  # never run: the notification waits there, unacknowledged
    watch = watcher_io.watch(oid, lambda n: b"", loop=loop)
    try:
        t0 = time.monotonic()
        result = notifier_io.notify(oid, b"x", 300)  # rounded up to 1 s
        assert time.monotonic() - t0 < 5
        assert result.acks == {} and [gid for gid, _ in result.timeouts] == [watcher_io.rados.instance_id]
    finally:
        loop.run_until_complete(asyncio.sleep(0))  # deliver (and ack) the late notification
        watch.close()
        loop.close()
    watcher_io.remove(oid)


def test_parse_notify_reply() -> None:
    reply = (b"\x02\x00\x00\x00" + (5).to_bytes(8, "little") + (9).to_bytes(8, "little") + b"\x02\x00\x00\x00ok"
             + (6).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"\x00\x00\x00\x00"
             + b"\x01\x00\x00\x00" + (7).to_bytes(8, "little") + (3).to_bytes(8, "little"))
    r = parse_notify_reply(reply)
    assert r.acks == {(5, 9): b"ok", (6, 1): b""} and r.timeouts == [(7, 3)]


def test_lock_break_blocklists_the_dead_owner(ceph_cluster: CephCluster, rbd_image: Image) -> None:
    """Gateway A holds the exclusive lock and stops answering; gateway B breaks the lock (which
    blocklists A), writes, and A can write nothing afterwards."""
    ra, rb = connect(ceph_cluster), connect(ceph_cluster)
    ia, ib = ra.open_ioctx("rbd"), rb.open_ioctx("rbd")
    a = RbdImage(ia, rbd_image.name)
    b = RbdImage(ib, rbd_image.name)
    a_addr = ra.addrs
    try:
        a.write(b"A" * 4096, 0)
        a.lock_acquire()  # explicit: A refuses to hand the lock over on request
        assert a.is_lock_owner() and not b.is_lock_owner()
        owners = b.lock_owners()
        assert len(owners) == 1 and owners[0].split("/")[-1] == a_addr.split("/")[-1], (owners, a_addr)
        t0 = time.perf_counter()
        b.lock_break(owners[0])
        t_break = time.perf_counter() - t0
        b.write(b"B" * 4096, 0)  # takes the now free lock
        t_write = time.perf_counter() - t0
        assert b.is_lock_owner()
        print(f"lock_break (blocklist + break) {t_break * 1e3:.1f} ms, first write by the new owner "
              f"{t_write * 1e3:.1f} ms after the break began")
        out, _ = rb.mon_command({"prefix": "osd blocklist ls", "format": "json"})
        listed, _end = json.JSONDecoder().raw_decode(out.decode())  # address entries, then ranges
        assert any(e["addr"].split("/")[-1] == a_addr.split("/")[-1] for e in listed)
        with pytest.raises(RadosError) as e:  # fenced: A's write fails, it does not land
            a.write(b"Z" * 4096, 0)
        assert e.value.errno == errno.ESHUTDOWN  # Ceph's EBLOCKLISTED
        assert b.read(0, 4096) == b"B" * 4096
    finally:
        for img in (a, b):
            try:
                img.close()
            except RadosError:
                pass  # A is fenced
        ia.close()
        ib.close()
        ra.shutdown()
        rb.mon_command({"prefix": "osd blocklist", "blocklistop": "rm", "addr": a_addr.strip("[]").split(",")[0]
                        .removeprefix("v2:")})
        rb.shutdown()
