"""Several gateways exporting one RBD image (a real loopback cluster, real daemons): the
shared configuration, one LU identity, implicit ALUA with one active/optimized gateway, and
failover when the optimized gateway dies."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ceph as ceph_support
from support import rawclient as R
from support.ceph import CephCluster, Image
from support.gateways import IQN, Gateways, gateways, wait_for

ceph_cluster = ceph_support.ceph_cluster
rbd_image = ceph_support.rbd_image

AO, ANO, UNAVAILABLE = 0x0, 0x1, 0x3
# Gateways.export's probe logs in until each gateway serves the target (refused before that).
PROBE_REJECTED = r"login rejected \(status 0x0203\) initiator \S+:probe"
MiB = 1 << 20


@pytest.fixture
def gws(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[Gateways]:
    with gateways(ceph_cluster, tmp_path) as g:
        yield g
    for d in g.daemons:  # nothing went wrong on the way: no WARNING, ERROR or traceback
        d.assert_clean_log(allow=[PROBE_REJECTED])


def rtpg(c: R.RawClient) -> dict[int, tuple[int, bool]]:
    """REPORT TARGET PORT GROUPS: {group id: (state, preferred)}; unit attentions (the state
    change announced) are consumed first."""
    for _ in range(8):
        r = c.scsi(struct.pack(">BBxxxxIxB", 0xA3, 0x0A, 1024, 0), read_len=1024)
        if r.status != 2 or r.sense_key != 0x6:
            break
    assert r.status == 0, r
    n = struct.unpack_from(">I", r.data)[0]
    out = {}
    pos = 4
    while pos < 4 + n:
        b0, _sup, tpg, _r, _st, _vs, count = struct.unpack_from(">BBHBBBB", r.data, pos)
        out[tpg] = (b0 & 0x0F, bool(b0 & 0x80))
        pos += 8 + 4 * count
    return out


def scsi_ok(c: R.RawClient, cdb: bytes, **kw: object) -> R.ScsiResult:
    """A command, sent again while it meets unit attentions (ALUA changes announced)."""
    for _ in range(8):
        r = c.scsi(cdb, **kw)  # type: ignore[arg-type]
        if r.status != 2 or r.sense_key != 0x6:
            return r
    return r


def naa_of(c: R.RawClient) -> bytes:
    r = c.scsi(R.inquiry(255, evpd=1, page=0x83), read_len=255)
    assert r.status == 0
    return r.data[8:16]  # the first designator: the LU's NAA


def session(gws: Gateways, k: int, initiator: str = "iqn.2026-11.org.pyscsi-target.test:gwtest") -> R.RawClient:
    d = gws[k]
    c = R.RawClient(d.host, d.port, initiator=initiator)
    out = c.login(IQN)
    assert out.ok, f"login to gateway {k + 1}: {out.status:#06x}"
    c.clear_unit_attentions()
    return c


def test_a_rest_change_on_one_gateway_is_served_by_the_other_within_a_second(gws: Gateways) -> None:
    a, b = gws[0], gws[1]
    # both gateways' portal groups are in the one configuration
    assert sorted(pg["iscsi_target_portal_tag"] for pg in b.rest("GET", "portal/")) == [1, 2]
    t0 = time.monotonic()
    created = a.rest("POST", "target/", {"iscsi_target_name": "shared-change", "iscsi_target_alias": "made on A"})
    took = wait_for(lambda: any(t["iscsi_target_name"] == "shared-change" for t in b.rest("GET", "target/")), 5,
                    "gateway B to show the target")
    assert took < 1.0, f"B showed A's change after {took:.3f}s"
    # and the change is live in B's engine: B's portal discovers it once it has a target group
    pgs = {pg["iscsi_target_portal_tag"]: pg["id"] for pg in b.rest("GET", "portal/")}
    a.rest("POST", "targetgroup/", {"iscsi_target": created["id"], "iscsi_target_portalgroup": pgs[2],
                                    "iscsi_target_authtype": "None"})

    def discovered() -> bool:
        with R.RawClient(b.host, b.port) as c:
            assert c.login(None, discovery=True).ok
            names = c.text([("SendTargets", "All")]).get("TargetName", [])
            return any(name.endswith(":shared-change") for name in names)

    took = wait_for(discovered, 5, "B to list the target in SendTargets")
    print(f"change on A served by B: REST {time.monotonic() - t0:.3f}s after the create")
    # a change on B is seen on A the same way; concurrent creates of one name: one wins
    b.rest("PUT", f"target/{created['id']}/", {"iscsi_target_alias": "changed on B"})
    wait_for(lambda: next(t for t in a.rest("GET", "target/") if t["id"] == created["id"])["iscsi_target_alias"]
             == "changed on B", 1.0, "A to show B's change")
    # File extents have no place in a cluster: each gateway would have its own file
    with pytest.raises(Exception) as e:
        a.rest("POST", "extent/", {"iscsi_target_extent_type": "File", "iscsi_target_extent_name": "f",
                                   "iscsi_target_extent_path": "f.img", "iscsi_target_extent_filesize": "1MB"})
    assert "RBD extents only" in str(e.value)


def test_one_lu_two_paths_alua(rbd_image: Image, gws: Gateways) -> None:  # the image outlives the gateways
    gws.export(rbd_image)
    with session(gws, 0) as ca, session(gws, 1) as cb:
        assert naa_of(ca) == naa_of(cb)  # one LU for multipath
        states_a, states_b = rtpg(ca), rtpg(cb)
        assert states_a == states_b, (states_a, states_b)
        assert sorted(states_a) == [1, 2]
        assert sorted(s for s, _pref in states_a.values()) == [AO, ANO]  # one optimized gateway
        owner = next(tpg for tpg, (s, _p) in states_a.items() if s == AO)
        assert states_a[owner][1]  # PREF on the owner's group
        # both paths serve I/O, and see each other's writes
        data = os.urandom(64 * 1024)
        assert ca.scsi(R.write10(100, 128), data=data).status == 0
        r = cb.scsi(R.read10(100, 128), read_len=len(data))
        assert r.status == 0 and r.data == data
        data2 = os.urandom(4096)
        assert cb.scsi(R.write10(2000, 8), data=data2).status == 0
        assert ca.scsi(R.read10(2000, 8), read_len=4096).data == data2


def test_failover_when_the_optimized_gateway_dies(ceph_cluster: CephCluster, rbd_image: Image, tmp_path: Path) -> None:
    with gateways(ceph_cluster, tmp_path, timeout=2.0) as gws:
        gws.export(rbd_image)
        with session(gws, 0) as c0, session(gws, 1) as c1:
            owner = next(tpg for tpg, (s, _p) in rtpg(c0).items() if s == AO)
            survivor_k = 2 - owner  # index of the other gateway
            survivor = c1 if survivor_k == 1 else c0
            dead = c0 if survivor is c1 else c1
            data = os.urandom(4096)
            assert dead.scsi(R.write10(10, 8), data=data).status == 0  # the owner holds the lock now
            t_kill = time.monotonic()
            gws.kill(owner - 1)
            dead.close()
            # a write through the survivor waits for the dead owner's lock until it is broken
            data2 = os.urandom(4096)
            r = survivor.scsi(R.write10(20, 8), data=data2, timeout=30)
            t_written = time.monotonic()
            # the ALUA change is announced, then the survivor is active/optimized
            while r.status == 2 and r.sense_key == 0x6:
                r = survivor.scsi(R.write10(20, 8), data=data2, timeout=30)
            assert r.status == 0, r
            wait_for(lambda: rtpg(survivor)[survivor_k + 1][0] == AO, 5, "the survivor to be optimized")
            t_optimized = time.monotonic()
            states = rtpg(survivor)
            assert states[survivor_k + 1] == (AO, True) and states[owner][0] == UNAVAILABLE, states
            assert survivor.scsi(R.read10(10, 8), read_len=4096).data == data
            assert survivor.scsi(R.read10(20, 8), read_len=4096).data == data2
            print(f"failover: kill -> write completed on the other gateway {t_written - t_kill:.2f}s, "
                  f"-> reported optimized {t_optimized - t_kill:.2f}s")
            assert t_written - t_kill < 15
        log = gws[survivor_k].log_text()
        assert "took LU" in log and "dead" in log, gws[survivor_k].log_tail()


def pr_session(gws: Gateways, k: int, who: str) -> R.RawClient:
    from test_conformance_pr import NAMES

    name, isid = NAMES[who]
    d = gws[k]
    c = R.RawClient(d.host, d.port, initiator=name, isid=isid)
    assert c.login(IQN).ok
    c.clear_unit_attentions()
    return c


def test_reservations_hold_across_gateways(rbd_image: Image, gws: Gateways) -> None:
    """Registrations, the reservation and the unit attentions a PR OUT raises hold for I_T
    nexuses on the other gateway: kept in RADOS, updated by compare-and-swap."""
    from test_conformance_pr import (
        KEY_A,
        KEY_B,
        PREEMPT,
        REGISTER,
        REGISTRATIONS_PREEMPTED,
        RESERVATION_CONFLICT,
        RESERVE,
        WE,
        prout,
        read_keys,
        read_reservation,
    )

    gws.export(rbd_image)
    with pr_session(gws, 0, "A") as a, pr_session(gws, 1, "B") as b:
        assert prout(a, REGISTER, sakey=KEY_A).status == 0
        gen, keys = read_keys(b)  # through the other gateway, at once
        assert keys == [KEY_A], keys
        assert prout(a, RESERVE, key=KEY_A, rtype=WE).status == 0
        assert read_reservation(b) == (KEY_A, WE)
        # B is not registered: its writes conflict on its own gateway
        r = b.scsi(R.write10(0, 1), data=bytes(512))
        assert r.status == RESERVATION_CONFLICT, r
        assert b.scsi(R.read10(0, 1), read_len=512).status == 0  # WE: reads pass
        assert a.scsi(R.write10(0, 1), data=b"a" * 512).status == 0
        # B registers and preempts A: A's nexus (on gateway 1) gets REGISTRATIONS PREEMPTED
        assert prout(b, REGISTER, sakey=KEY_B).status == 0
        assert prout(b, PREEMPT, key=KEY_B, sakey=KEY_A, rtype=WE).status == 0
        r = a.scsi(R.tur())
        assert r.status == 2 and r.sense_key == 0x6 and r.asc_ascq == REGISTRATIONS_PREEMPTED, r
        assert read_keys(a)[1] == [KEY_B] and read_reservation(a) == (KEY_B, WE)
        assert a.scsi(R.write10(0, 1), data=bytes(512)).status == RESERVATION_CONFLICT
        assert read_keys(a)[0] > gen


def test_qemu_img_round_trip_through_each_gateway(rbd_image: Image, gws: Gateways, tmp_path: Path) -> None:
    """Random data written by qemu-img through one gateway reads back byte-identical through the
    other, both ways."""
    import hashlib

    from support.tools import qemu_iscsi, qemu_json, run

    gws.export(rbd_image)
    size = rbd_image.size
    for writer, reader in ((0, 1), (1, 0)):
        src, dst = tmp_path / f"src{writer}.raw", tmp_path / f"dst{reader}.raw"
        src.write_bytes(os.urandom(size))
        w = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                qemu_json(qemu_iscsi(gws[writer].portal, IQN, 0)), timeout=300)
        assert w.returncode == 0, f"write through gateway {writer + 1}: {w.stderr}"
        r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", qemu_json(qemu_iscsi(gws[reader].portal, IQN, 0),
                                                                           size=size), str(dst), timeout=300)
        assert r.returncode == 0, f"read through gateway {reader + 1}: {r.stderr}"
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert hashlib.file_digest(a, "sha256").digest() == hashlib.file_digest(b, "sha256").digest(), \
                f"written through gateway {writer + 1}, read through {reader + 1}: the data differs"


def test_aptpl_survives_the_whole_cluster_restarting(rbd_image: Image, gws: Gateways) -> None:
    """Reservations with APTPL outlive every gateway stopping; without APTPL they outlive one
    gateway restarting while another serves the LU, but not all of them stopping (the device
    powered off as a whole)."""
    from test_conformance_pr import KEY_A, KEY_B, REGISTER, RESERVE, WE, prout, read_keys, read_reservation

    gws.export(rbd_image)
    with pr_session(gws, 0, "A") as a:
        assert prout(a, REGISTER, sakey=KEY_A, aptpl=True).status == 0
        assert prout(a, RESERVE, key=KEY_A, rtype=WE).status == 0
    gws.stop()
    gws.start()
    with pr_session(gws, 1, "B") as b:
        assert read_keys(b)[1] == [KEY_A] and read_reservation(b) == (KEY_A, WE)
        assert b.scsi(R.write10(0, 1), data=bytes(512)).status == 0x18  # still reserved
    with pr_session(gws, 0, "A") as a:  # the same initiator port still holds it
        assert a.scsi(R.write10(0, 1), data=bytes(512)).status == 0
        assert prout(a, REGISTER, key=KEY_A, sakey=KEY_B, aptpl=False).status == 0  # APTPL off now
    # one gateway restarts while the other serves: the state stays
    gws[0].stop()
    gws[0].start()
    gws.wait_serving()
    with pr_session(gws, 0, "A") as a:
        wait_for(lambda: read_keys(a)[1] == [KEY_B], 10, "the registration after one gateway restarted")
    # every gateway stops: without APTPL the reservation state is gone
    gws.stop()
    gws.start()
    with pr_session(gws, 1, "B") as b:
        assert read_keys(b)[1] == [] and read_reservation(b) is None


def test_a_gateway_that_only_looked_dead_is_fenced(ceph_cluster: CephCluster, rbd_image: Image,
                                                    tmp_path: Path) -> None:
    """The optimized gateway stops (SIGSTOP) long enough to be taken over; when it wakes, its client
    is blocklisted: its next write lands nowhere and fails as NOT READY (a path problem, retried on
    another path by a multipath initiator), then it reopens the image with a new client and serves on
    as active/non-optimized."""
    import signal

    with gateways(ceph_cluster, tmp_path, timeout=2.0) as gws:
        gws.export(rbd_image)
        with session(gws, 0) as c0, session(gws, 1) as c1:
            owner = next(tpg for tpg, (s, _p) in rtpg(c0).items() if s == AO)
            stale, fresh = (c0, c1) if owner == 1 else (c1, c0)
            d_owner = gws[owner - 1]
            assert stale.scsi(R.write10(50, 8), data=b"x" * 4096).status == 0  # the owner holds the lock
            assert d_owner.proc is not None
            d_owner.proc.send_signal(signal.SIGSTOP)
            try:
                r = fresh.scsi(R.write10(50, 8), data=b"y" * 4096, timeout=30)  # waits for the takeover
                while r.status == 2 and r.sense_key == 0x6:
                    r = fresh.scsi(R.write10(50, 8), data=b"y" * 4096, timeout=30)
                assert r.status == 0, r
            finally:
                d_owner.proc.send_signal(signal.SIGCONT)
            r = stale.scsi(R.write10(50, 8), data=b"z" * 4096, timeout=30)
            assert r.status == 2 and r.sense_key == 0x2 and r.asc_ascq in ((0x04, 0x0C), (0x04, 0x0A)), r
            # the stale write landed nowhere
            assert scsi_ok(fresh, R.read10(50, 8), read_len=4096).data == b"y" * 4096

            def stale_serves_again() -> bool:
                return scsi_ok(stale, R.write10(60, 8), data=b"w" * 4096, timeout=30).status == 0

            wait_for(stale_serves_again, 15, "the fenced gateway to serve again")
            assert scsi_ok(fresh, R.read10(60, 8), read_len=4096).data == b"w" * 4096
            states = rtpg(stale)
            assert states[owner][0] == ANO and states[3 - owner][0] == AO, states
        log = d_owner.log_text()
        assert "fenced by another gateway" in log and "image reopened with a new client" in log, d_owner.log_tail()


def test_the_owner_frees_a_lock_left_by_a_dead_non_optimized_gateway(ceph_cluster: CephCluster, rbd_image: Image,
                                                                      tmp_path: Path) -> None:
    """A non-optimized gateway that wrote last holds the image's lock when it dies: the owner breaks it
    once the gateway is seen dead, instead of its writes waiting ~30 s for the dead client's watch to
    expire."""
    with gateways(ceph_cluster, tmp_path, timeout=2.0) as gws:
        gws.export(rbd_image)
        with session(gws, 0) as c0, session(gws, 1) as c1:
            owner = next(tpg for tpg, (s, _p) in rtpg(c0).items() if s == AO)
            (optimized, other) = (c0, c1) if owner == 1 else (c1, c0)
            assert other.scsi(R.write10(70, 8), data=b"o" * 4096).status == 0  # the lock moves to the other
            t_kill = time.monotonic()
            gws.kill(2 - owner)
            other.close()
            r = scsi_ok(optimized, R.write10(80, 8), data=b"p" * 4096, timeout=40)
            took = time.monotonic() - t_kill
            assert r.status == 0, r
            assert took < 10, f"the owner's write waited {took:.1f}s for the dead gateway's lock"
            assert scsi_ok(optimized, R.read10(70, 8), read_len=4096).data == b"o" * 4096
        assert "broke the lock" in gws[owner - 1].log_text(), gws[owner - 1].log_tail()
