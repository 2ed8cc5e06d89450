"""A Disk extent's block device grown underneath (zvol volsize, lvextend; here a loop device
with `losetup -c`): the LU adopts the new size at READ CAPACITY, on the daemon's periodic
rescan and on SIGHUP (`systemctl reload`, FreeNAS's `ctld reload`), and the other initiators
hear CAPACITY DATA HAS CHANGED."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
from pathlib import Path

from support.loop_device import grow, loop_device
from test_scsi_support import Harness

from pyscsi_target.config.model import Extent
from pyscsi_target.scsi import sense as S

MIB = 1 << 20
READ_CAPACITY10 = bytes((0x25,)) + bytes(9)


def test_read_capacity_sees_a_grown_device(tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    with loop_device(backing, 16 * MIB) as dev:

        async def body() -> None:
            h = Harness(tmp_path, extent=Extent(id=7, name="zvol", type="Disk", path=dev))
            try:
                await h.clear_ua(h.a)
                await h.clear_ua(h.b)
                r = await h.cmd(READ_CAPACITY10)
                assert struct.unpack(">II", r.data) == (16 * MIB // 512 - 1, 512)
                grow(dev, backing, 48 * MIB)
                r = await h.cmd(READ_CAPACITY10)  # no reload needed: asked, the size is re-read
                assert r.status == 0 and struct.unpack(">II", r.data)[0] == 48 * MIB // 512 - 1
                r = await h.cmd(bytes(6), nx=h.b)  # the other nexus is told
                assert r.status == 0x02 and r.key_asc == (S.UNIT_ATTENTION, *S.CAPACITY_DATA_HAS_CHANGED)
                r = await h.cmd(bytes((0x28, 0, 0, 0, 0x17, 0xFF, 0, 0, 1, 0)))  # a block past the old end
                assert r.status == 0 and r.data == bytes(512)
                assert h.lu.refresh_size() is False  # unchanged since: nothing new to announce
            finally:
                h.close()

        asyncio.run(body())


def test_file_extent_keeps_its_configured_size(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path, size=16 * MIB)
        try:
            await h.clear_ua(h.a)
            os.truncate(h.ext.path, 64 * MIB)  # a file grown by someone else
            assert h.lu.refresh_size() is False
            r = await h.cmd(READ_CAPACITY10)
            assert struct.unpack(">II", r.data)[0] == 16 * MIB // 512 - 1
        finally:
            h.close()

    asyncio.run(body())


def test_sighup_rescans_device_sizes(tmp_path: Path) -> None:
    """democratic-csi's expansion on a Linux box: the zvol grows, then a reload; the initiator's
    next command gets CAPACITY DATA HAS CHANGED and READ CAPACITY the new size."""
    from support.daemon import Daemon, wait_for
    from support.rawclient import login_session

    backing = tmp_path / "disk.img"
    with loop_device(backing, 16 * MIB) as dev, Daemon(tmp_path / "state", demo=False) as d:
        assert d.proc is not None
        target = d.rest("POST", "target/", {"iscsi_target_name": "grow"})
        d.rest("POST", "targetgroup/", {"iscsi_target": target["id"], "iscsi_target_portalgroup": 1})
        extent = d.rest("POST", "extent/", {"iscsi_target_extent_name": "vol", "iscsi_target_extent_type": "Disk",
                                            "iscsi_target_extent_disk": dev.removeprefix("/dev/")})
        d.rest("POST", "targettoextent/", {"iscsi_target": target["id"], "iscsi_extent": extent["id"]})
        c = login_session(d.host, d.port, d.basename() + ":grow")
        try:
            c.clear_unit_attentions()
            grow(dev, backing, 32 * MIB)
            mark = d.log_mark()
            d.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "SIGHUP: device sizes re-read, 1 LU(s) changed (vol)" in d.log_text()[mark:])
            r = c.scsi(bytes(6))
            assert (r.sense_key, r.asc_ascq) == (S.UNIT_ATTENTION, S.CAPACITY_DATA_HAS_CHANGED)
            r = c.scsi(READ_CAPACITY10, read_len=8)
            assert struct.unpack(">II", r.data)[0] == 32 * MIB // 512 - 1
        finally:
            c.close()
        assert d.alive()
        d.assert_clean_log(since=mark)
