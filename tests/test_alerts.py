"""Space thresholds do what they say: an alert (API, log, metrics counters) once per crossing,
and for thin File LUs the THIN PROVISIONING SOFT THRESHOLD REACHED unit attention (06/38/07),
once per crossing, re-armed when the free space is back above the threshold.  A threshold
is FreeNAS's "percentage of free space that should remain": it is reached when the free
share falls to it or below."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.rawclient import login_session, tur, write10
from support.rest_harness import FN, aio, harness
from support.small_fs import fill, small_fs

from pyscsi_target.alerts import AlertBoard, SpaceMonitor
from pyscsi_target.config.model import ConfigModel, Extent, GlobalConfig

MIB = 1 << 20
ALERTS = "/api/v1.0/system/alert/"
THIN_THRESHOLD_UA = (0x38, 0x07)


def _file(path: Path, size: int, allocated: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"\xa5" * allocated)
        f.flush()
        os.fsync(f.fileno())


def _punch(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.truncate(fd, 0)  # no fallocate() in os: drop the blocks by truncating and regrowing
        os.truncate(fd, MIB)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_board_raises_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    board = AlertBoard(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pyscsi_target.alerts"):
        assert board.raise_("extent:1", "WARNING", "first")
        assert not board.raise_("extent:1", "WARNING", "refreshed")  # still the same crossing
    [alert] = board.active()
    assert alert.message == "refreshed" and alert.since == 100.0 and board.crossings == {"extent": 1}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["alert: first"]
    first_id = alert.id
    assert board.dismiss(first_id) and board.active()[0].dismissed
    assert board.dismiss(first_id, False) and not board.active()[0].dismissed
    assert not board.dismiss("nope")
    assert board.clear("extent:1", "test") and board.active() == []
    now[0] = 200.0
    board.raise_("extent:1", "WARNING", "again")
    assert board.active()[0].id != first_id and board.crossings == {"extent": 2}


@aio
async def test_monitor_extent_and_pool_thresholds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "extents"
    root.mkdir()
    model = ConfigModel()
    watched = root / "thin.img"
    _file(watched, MIB, 512 << 10)  # half allocated
    model.extents[1] = Extent(id=1, name="thin", path=str(watched), avail_threshold=50)
    model.extents[2] = Extent(id=2, name="quiet", path=str(root / "quiet.img"), avail_threshold=None)
    model.extents[3] = Extent(id=3, name="disk", type="Disk", path="/dev/sdz", disk="sdz", avail_threshold=10)
    monitor = SpaceMonitor(lambda: model, lambda: [root])
    with caplog.at_level(logging.INFO, logger="pyscsi_target.alerts"):
        [alert] = await monitor.check()
        assert alert.key == "extent:1" and alert.level == "WARNING"
        assert alert.message == (
            'iSCSI extent "thin" can allocate 0.5 MiB more of its 1.0 MiB, at or below its free space threshold of 50%.'
        )
        await monitor.check()
        _punch(watched)
        assert await monitor.check() == []
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("alert: ") for m in lines) == 1  # once per crossing, not per check
    assert sum(m.startswith("alert cleared") for m in lines) == 1
    assert sum("avail_threshold 10% is not watched" in m for m in lines) == 1  # a Disk: said once

    # The pool: the filesystem holding the extent root, its free share at or below the threshold.
    st = os.statvfs(root)
    free = st.f_bavail * 100 // ((st.f_blocks - st.f_bfree) + st.f_bavail)
    assert 1 <= free <= 98, "the test needs a filesystem neither full nor empty"
    model.global_config = GlobalConfig(pool_avail_threshold=free + 1)
    [alert] = await monitor.check()
    assert alert.key == f"pool:{root}" and f"iSCSI pool threshold of {free + 1}%" in alert.message
    assert f"has {free}% free space" in alert.message
    model.global_config.pool_avail_threshold = free  # rounded down: free is a bit above it
    free_exact = st.f_bavail * 100 / ((st.f_blocks - st.f_bfree) + st.f_bavail)
    if free_exact > free + 0.01:
        assert await monitor.check() == []
    assert monitor.board.crossings == {"extent": 1, "pool": 1}


@aio
async def test_thresholds_follow_freenas_meaning(tmp_path: Path) -> None:
    """10 % means "warn when 10 % free remains", not "when 10 % is used": a tenth allocated
    raises nothing, nine tenths do - on the extent and on a small pool alike."""
    with small_fs(tmp_path / "pool", 8 * MIB) as root:
        model = ConfigModel()
        img = root / "e.img"
        _file(img, 4 * MIB, 410 << 10)  # a tenth of the extent allocated
        model.extents[1] = Extent(id=1, name="e", path=str(img), avail_threshold=10)
        model.global_config = GlobalConfig(pool_avail_threshold=10)
        monitor = SpaceMonitor(lambda: model, lambda: [root])
        assert await monitor.check() == []
        _file(img, 4 * MIB, 3700 << 10)  # nine tenths: 396 KiB left of 4 MiB
        [alert] = await monitor.check()
        assert alert.key == "extent:1" and "at or below its free space threshold of 10%" in alert.message
        fill(root / "other.bin")  # the pool's free space gone: the extent can allocate nothing
        alerts = await monitor.check()
        assert [a.key for a in alerts] == ["extent:1", f"pool:{root}"]
        assert "can allocate 0.0 MiB more" in alerts[0].message
        os.unlink(root / "other.bin")
        _punch(img)
        assert await monitor.check() == []


@aio
async def test_system_alert_resource(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, _ = await h.call("GET", ALERTS)
        assert status == 200 and body == []
        ext = {"iscsi_target_extent_name": "e1", "iscsi_target_extent_path": "e1.img"}
        ext.update(iscsi_target_extent_filesize="1MB", iscsi_target_extent_avail_threshold=50)
        assert (await h.call("POST", f"{FN}/extent/", ext))[0] == 201
        _file(tmp_path / "extents" / "e1.img", MIB, 600 << 10)
        status, body, _ = await h.call("GET", ALERTS)
        assert status == 200 and len(body) == 1
        alert = body[0]
        assert set(alert) == {"id", "level", "message", "dismissed", "timestamp"}  # FreeNAS 11.3's fields
        assert alert["level"] == "WARNING" and alert["dismissed"] is False and '"e1"' in alert["message"]
        ts = alert["timestamp"]
        assert (await h.call("GET", f"{ALERTS}?timestamp__gte={ts}"))[1] == body
        assert (await h.call("GET", f"{ALERTS}?timestamp__lte={ts - 1}"))[1] == []
        assert (await h.call("GET", f"{ALERTS}?timestamp=x"))[0] == 400
        # Dismiss and restore, as FreeNAS's PUT system/alert/dismiss/ (202).
        status, _, _ = await h.call("PUT", f"{ALERTS}dismiss/", {"id": alert["id"], "dismiss": True})
        assert status == 202 and (await h.call("GET", ALERTS))[1][0]["dismissed"] is True
        status, _, _ = await h.call("PUT", f"{ALERTS}dismiss/", {"id": alert["id"], "dismiss": False})
        assert status == 202 and (await h.call("GET", ALERTS))[1][0]["dismissed"] is False
        assert (await h.call("PUT", f"{ALERTS}dismiss/", {"id": "0" * 32, "dismiss": True}))[0] == 404
        status, body, _ = await h.call("PUT", f"{ALERTS}dismiss/", {"dismiss": "maybe"})
        assert status == 400 and set(body) == {"id", "dismiss"}
        # The threshold removed (or the extent deleted): the alert goes.
        status, _, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_avail_threshold": ""})
        assert status == 200 and (await h.call("GET", ALERTS))[1] == []
        assert (await h.call("GET", ALERTS, auth=False))[0] == 401


def _unmap_all(blocks: int) -> tuple[bytes, bytes]:
    param = struct.pack(">HH4xQI4x", 6 + 16, 16, 0, blocks)
    return struct.pack(">BB4xBHB", 0x42, 0, 0, len(param), 0), param


def test_thin_threshold_end_to_end(tmp_path: Path) -> None:
    """A real initiator writes a thin File LU past its avail_threshold: it gets the unit
    attention once (not on the next commands), the API shows the alert and the log says it
    once; UNMAP brings the allocation back under the threshold, which re-arms both."""
    with Daemon(tmp_path / "state", demo=False) as d:
        iqn = d.basename() + ":thin"
        target = d.rest("POST", "target/", {"iscsi_target_name": "thin"})
        d.rest("POST", "targetgroup/", {"iscsi_target": target["id"], "iscsi_target_portalgroup": 1})
        ext = {"iscsi_target_extent_name": "thin0", "iscsi_target_extent_path": "thin0.img",
               "iscsi_target_extent_filesize": "1MB", "iscsi_target_extent_avail_threshold": 50}
        extent = d.rest("POST", "extent/", ext)
        d.rest("POST", "targettoextent/", {"iscsi_target": target["id"], "iscsi_extent": extent["id"]})
        c = login_session(d.host, d.port, iqn)
        try:
            chunk = 128  # blocks of 512 bytes: 64 KiB a write

            def write_half(start: int) -> list[tuple[int, int] | None]:
                """Write 9 x 64 KiB (past 50% of 1 MiB); the ASC/ASCQ of each CHECK CONDITION."""
                out = []
                for i in range(9):
                    r = c.scsi(write10(start + i * chunk, chunk), data=b"\x5a" * (chunk * 512))
                    out.append(r.asc_ascq if r.status == 2 else None)
                    assert r.status in (0, 2), r
                return out

            def tur_sense() -> tuple[int, int] | None:
                r = c.scsi(tur())
                return r.asc_ascq if r.status == 2 else None

            def ua_count(results: list[tuple[int, int] | None]) -> int:
                return sum(1 for r in results if r == THIN_THRESHOLD_UA)

            seen = write_half(0) + [tur_sense() for _ in range(3)]
            assert ua_count(seen) == 1 and all(s in (None, THIN_THRESHOLD_UA) for s in seen), seen
            alerts = d.rest("GET", "system/alert/", prefix="/api/v1.0")
            assert [a["level"] for a in alerts] == ["WARNING"] and '"thin0"' in alerts[0]["message"]
            assert d.rest("GET", "system/alert/", prefix="/api/v1.0") == alerts
            assert d.log_text().count("WARNING pyscsi_target.alerts: alert:") == 1

            # UNMAP everything: the allocation falls under the threshold, the UA re-arms.
            cdb, param = _unmap_all(2048)
            assert c.scsi(cdb, data=param).status == 0
            assert d.rest("GET", "system/alert/", prefix="/api/v1.0") == []
            seen = write_half(0) + [tur_sense() for _ in range(3)]
            assert ua_count(seen) == 1 and all(s in (None, THIN_THRESHOLD_UA) for s in seen), seen
            again = d.rest("GET", "system/alert/", prefix="/api/v1.0")
            assert len(again) == 1 and again[0]["id"] != alerts[0]["id"]  # a new crossing, a new alert
            assert d.log_text().count("WARNING pyscsi_target.alerts: alert:") == 2
        finally:
            c.close()
