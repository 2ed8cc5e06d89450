"""The Linux kernel initiator (iscsi_tcp + open-iscsi 2.1.8 in a qemu guest) against the daemon.

Each mode starts pyscsi-target with a fresh state dir, configures it through the REST API and runs
the open-iscsi flow of ``support.guest.interop`` in a guest: discovery, login, negotiated parameters,
the LUN's disk, O_DIRECT write, read-back checks, mkfs.ext4 + fsck, logout.  Every step must pass,
and the daemon must log no WARNING/ERROR while the guest runs.  The modes reach the target through
qemu's user-mode network (a forwarded loopback portal); the last test goes through a tap device in a
network namespace, the target listening inside it.  A guest run takes 20-60 s under TCG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from support.daemon import Daemon
from support.guest import GuestRun, TapNetwork, UserNetwork
from support.guest.interop import InteropOptions, missing_steps, run_interop

USER, SECRET = "vm-initiator", "vmsecret-123456"
PEER, PEER_SECRET = "pyscsi-target", "tgtsecret-65432"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest image is built with apt-get, which needs root"),
]


@dataclass
class Mode:
    name: str
    flow: dict[str, Any] = field(default_factory=dict)  # InteropOptions fields besides the portal
    auth: str = "None"  # the demo target's auth type
    discovery_chap: bool = False
    luns: list[tuple[int, int, int]] | None = None  # a separate target with these LUNs, else the demo
    timeout: int = 300


CHAP = {"chap_user": USER, "chap_secret": SECRET}
MODES = [
    Mode("no-auth"),
    Mode("chap", CHAP, auth="CHAP"),
    Mode("mutual-chap", {**CHAP, "mutual_user": PEER, "mutual_secret": PEER_SECRET}, auth="CHAP Mutual"),
    Mode("discovery-chap", {**CHAP, "discovery_chap": True}, auth="CHAP", discovery_chap=True),
    Mode("digests-crc32c", {"header_digest": "CRC32C", "data_digest": "CRC32C"}),
    Mode("block-4096", luns=[(0, 256 << 20, 4096)]),
    Mode("three-luns-lun2", {"lun": 2}, luns=[(0, 64 << 20, 512), (1, 64 << 20, 512), (2, 128 << 20, 512)]),
    Mode("data-256mib", {"size_mib": 256}, timeout=900),
]


def configure(d: Daemon, mode: Mode) -> dict[str, Any]:
    """The REST configuration of ``mode``; returns the flow options it implies (the target's IQN)."""
    if mode.auth != "None" or mode.discovery_chap:
        d.add_auth(1, USER, SECRET, PEER, PEER_SECRET)
    if mode.auth != "None":
        d.set_target_auth("demo", mode.auth, 1)
    if mode.discovery_chap:
        d.set_discovery_auth("CHAP", 1)
    if mode.luns:
        return {"iqn": d.add_target(mode.name, luns=mode.luns)}
    return {}


def report(mode: str, run: GuestRun, options: InteropOptions, record_property: Any) -> list[str]:
    missing = missing_steps(run, options)
    record_property("seconds", round(run.seconds, 1))
    record_property("boot_seconds", run.boot_seconds)
    print(f"\n[{mode}] {run.summary()}; data: {run.data}")
    return missing


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_open_iscsi_guest(mode: Mode, tmp_path: Path, record_property: Any) -> None:
    d = Daemon(tmp_path / "state").start()
    try:
        flow = configure(d, mode)
        mark = d.log_mark()  # configuration is done: from here on only the guest's traffic
        net = UserNetwork([d.portal])
        options = InteropOptions(portal=net.guest_portal(0), **{**mode.flow, **flow}).validate()
        run = run_interop(net, options, timeout=mode.timeout, run_dir=tmp_path / "guest")
    finally:
        rc = d.stop()
    missing = report(mode.name, run, options, record_property)
    assert not missing and run.ok, f"{mode.name}: steps not passed: {missing}\n{run.describe()}\n" \
                                   f"--- daemon log ---\n{d.log_tail(60)}"
    assert rc == 0, f"daemon exit status {rc} after SIGTERM"
    d.assert_clean_log(since=mark)
    data = run.data
    assert data["disk.vendor"] == "PYSCSI"
    if mode.name == "three-luns-lun2":
        assert data["disk.lun"] == "2" and data["disk.bytes"] == str(128 << 20), data
    if mode.name == "block-4096":
        assert data["disk.lbs"] == "4096", data
    if mode.name == "digests-crc32c":
        assert (data["negotiated.HeaderDigest"], data["negotiated.DataDigest"]) == ("CRC32C", "CRC32C"), data
    if mode.auth != "None":
        assert data["login.auth"].startswith("mutual CHAP" if "Mutual" in mode.auth else "CHAP"), data


def test_open_iscsi_through_a_tap_device_in_a_namespace(tmp_path: Path, record_property: Any) -> None:
    """The kernel initiator on a tap link (virtio-net), the target inside a namespace of its own: login,
    O_DIRECT write and read-back, logout; nothing listens or connects outside the namespace."""
    with TapNetwork() as net:
        with net.entered():
            d = Daemon(tmp_path / "state", host=net.target_address).start()
        try:
            assert d.portal.startswith(net.target_address + ":")
            options = replace(InteropOptions(portal=net.guest_portal(d.port)), size_mib=16, fs=False).validate()
            run = run_interop(net, options, timeout=240, run_dir=tmp_path / "guest")
        finally:
            rc = d.stop()
    missing = report("tap", run, options, record_property)
    assert not missing and run.ok, f"steps not passed: {missing}\n{run.describe()}\n--- daemon log ---\n" \
                                   f"{d.log_tail(60)}"
    assert rc == 0
    assert run.data["discovery.address"] == d.portal  # the target's own address is the one the guest uses
    assert "virtio-net-pci,netdev=n0" in (run.run_dir / "qemu.cmd").read_text()
    d.assert_clean_log()

