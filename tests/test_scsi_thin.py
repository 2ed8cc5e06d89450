"""Thin provisioning on a real full filesystem (issue 10, defect 4): a write the storage
cannot allocate is DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07), not a
medium error; the soft-threshold unit attention (06/38/07) comes first when a threshold is
set; the log says it once, not once per command; writes succeed again when space returns.
And the threshold's meaning is FreeNAS's: the percentage of free space that remains."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest
from support.small_fs import fill, small_fs
from test_scsi_support import Harness, rw10

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi import thin

MIB = 1 << 20
CHUNK = 256  # blocks of 512 bytes: 128 KiB a WRITE(10)
GOOD, CC = 0x00, 0x02
NO_SPACE = (S.DATA_PROTECT, *S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
SOFT_THRESHOLD = (S.UNIT_ATTENTION, *S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)


def test_reached_is_free_space_remaining() -> None:
    # FreeNAS: "when the specified percentage of free space is reached" - 10 % of 100 left.
    assert not thin.reached(100, 89, None, 10)
    assert thin.reached(100, 90, None, 10)
    assert thin.reached(100, 95, None, 10)
    # the filesystem under the LU can run out first
    assert not thin.reached(100, 0, 11, 10) and thin.reached(100, 0, 10, 10)
    assert thin.available(100, 30, None) == 70 and thin.available(100, 30, 5) == 5
    assert thin.available(100, 130, 5) == 0


def test_sampling_is_not_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a sample, the LU's own writes are counted against the headroom: no sample is
    due until they could have reached the threshold (or the period ran out)."""
    now = [0.0]
    monkeypatch.setattr(thin, "monotonic", lambda: now[0])
    t = thin.SoftThreshold()
    assert t.due(512)  # never sampled
    assert not t.sample(100 * MIB, 0, None, 10)  # 90 MiB of headroom
    writes = 0
    while not t.due(128 << 10):
        writes += 1
    assert writes == 90 * 8 - 1
    assert t.sample(100 * MIB, 91 * MIB, None, 10)  # a new crossing: report it
    assert not t.due(1 << 30) and not t.sample(100 * MIB, 95 * MIB, None, 10)  # once only
    now[0] += thin.SAMPLE_PERIOD
    assert t.due(0)  # the period samples space others freed (or took)
    assert not t.sample(100 * MIB, 10 * MIB, None, 10) and t.armed  # re-armed


async def _write_until_check(h: Harness, start: int, limit: int) -> tuple[int, list[tuple[int, int, int]]]:
    """WRITE 128 KiB chunks from block ``start`` (a failed one is retried, as an initiator
    does) until three fail in a row; (chunks written, the sense of every failure)."""
    lba = start
    senses: list[tuple[int, int, int]] = []
    in_a_row = 0
    for _ in range(limit):
        r = await h.cmd(rw10(0x2A, lba, CHUNK), b"\x5a" * (CHUNK * 512))
        if r.status == GOOD:
            lba += CHUNK
            in_a_row = 0
            continue
        assert r.status == CC, r
        senses.append(r.key_asc)
        in_a_row += 1
        if in_a_row == 3:
            return (lba - start) // CHUNK, senses
    raise AssertionError("the filesystem never filled")


def test_full_filesystem_is_space_allocation_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No threshold: 07/27/07 on every write once full, one log line, and writes work again
    once space is freed."""
    with small_fs(tmp_path / "fs", 4 * MIB) as fs:

        async def body() -> None:
            h = Harness(fs, size=64 * MIB)
            try:
                await h.clear_ua(h.a)
                with caplog.at_level(logging.INFO, logger="pyscsi_target.scsi.lu"):
                    written, senses = await _write_until_check(h, 0, 64)
                    assert senses == [NO_SPACE] * 3
                    assert (await h.cmd(rw10(0x28, 0, CHUNK))).status == GOOD  # reads still work
                lines = [r for r in caplog.records if r.name == "pyscsi_target.scsi.lu"]
                assert len(lines) == 1 and lines[0].levelno == logging.WARNING, lines
                assert "is full" in lines[0].getMessage()
                assert 16 <= written <= 32  # ~4 MiB of 128 KiB writes
                # UNMAP the first half: the filesystem has room again, writes succeed.
                param = bytes((0, 22, 0, 16)) + bytes(4) + (0).to_bytes(8, "big") + (2048).to_bytes(4, "big")
                param += bytes(4)
                r = await h.cmd(bytes((0x42, 0, 0, 0, 0, 0, 0, 0, len(param), 0)), param)
                assert r.status == GOOD, r
                r = await h.cmd(rw10(0x2A, 0, CHUNK), b"\x33" * (CHUNK * 512))
                assert r.status == GOOD, r
                assert (await h.cmd(rw10(0x28, 0, 1))).data == b"\x33" * 512
            finally:
                h.close()

        asyncio.run(body())


def test_soft_threshold_comes_before_space_failure(tmp_path: Path) -> None:
    """A threshold set: the initiator sees 06/38/07 once, then 07/27/07 when full."""
    with small_fs(tmp_path / "fs", 4 * MIB) as fs:

        async def body() -> None:
            # 64 MiB LU, 1 % threshold: ~655 KiB left to allocate crosses it.
            h = Harness(fs, size=64 * MIB, avail_threshold=1)
            try:
                await h.clear_ua(h.a)
                _, senses = await _write_until_check(h, 0, 64)
                # the UA ends a write that then succeeds on retry, or the first write that found
                # the storage full (scsi/thin.py: a failed allocation samples at once)
                assert senses[0] == SOFT_THRESHOLD and senses[1:] == [NO_SPACE] * (len(senses) - 1), senses
                assert len(senses) >= 3
            finally:
                h.close()

        asyncio.run(body())


def test_space_taken_by_others_reports_threshold_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filesystem fills from outside between two samples: the write that finds it full
    ends with the threshold UA (its retry with the allocation failure), so the order holds
    without a system call per write."""
    monkeypatch.setattr(thin, "SAMPLE_PERIOD", 3600.0)
    with small_fs(tmp_path / "fs", 4 * MIB) as fs:

        async def body() -> None:
            h = Harness(fs, size=64 * MIB, avail_threshold=1)
            try:
                await h.clear_ua(h.a)
                await h.clear_ua(h.b)
                r = await h.cmd(rw10(0x2A, 0, CHUNK), b"\x01" * (CHUNK * 512))
                assert r.status == GOOD and h.lu.threshold.armed  # sampled, far from the threshold
                fill(fs / "other.bin")
                allocated = os.stat(fs / "e.img").st_blocks
                r = await h.cmd(rw10(0x2A, 4096, CHUNK), b"\x02" * (CHUNK * 512))
                assert r.status == CC and r.key_asc == SOFT_THRESHOLD, r
                r = await h.cmd(rw10(0x2A, 4096, CHUNK), b"\x02" * (CHUNK * 512))
                assert r.status == CC and r.key_asc == NO_SPACE, r
                # the other nexus hears of the crossing on its next command
                r = await h.cmd(bytes(6), nx=h.b)
                assert r.status == CC and r.key_asc == SOFT_THRESHOLD, r
                assert os.stat(fs / "e.img").st_blocks == allocated
                os.unlink(fs / "other.bin")
                r = await h.cmd(rw10(0x2A, 4096, CHUNK), b"\x02" * (CHUNK * 512))
                assert r.status == GOOD, r
            finally:
                h.close()

        asyncio.run(body())


def test_full_extent_root_over_iscsi(tmp_path: Path) -> None:
    """What an initiator sees through the daemon: a thin LU on a full filesystem answers
    07/27/07 (after the threshold's 06/38/07), and the daemon logs it once."""
    from support.daemon import Daemon
    from support.rawclient import login_session, write10

    with small_fs(tmp_path / "extents", 4 * MIB) as root, \
            Daemon(tmp_path / "state", demo=False, extra_args=["--extent-root", str(root)]) as d:
        target = d.rest("POST", "target/", {"iscsi_target_name": "full"})
        d.rest("POST", "targetgroup/", {"iscsi_target": target["id"], "iscsi_target_portalgroup": 1})
        extent = d.rest("POST", "extent/", {"iscsi_target_extent_name": "thin", "iscsi_target_extent_path": "thin.img",
                                            "iscsi_target_extent_filesize": "64MB",
                                            "iscsi_target_extent_avail_threshold": 1})
        d.rest("POST", "targettoextent/", {"iscsi_target": target["id"], "iscsi_extent": extent["id"]})
        c = login_session(d.host, d.port, d.basename() + ":full")
        try:
            c.clear_unit_attentions()
            senses = []
            for i in range(48):
                r = c.scsi(write10(i * CHUNK, CHUNK), data=b"\x77" * (CHUNK * 512))
                if r.status == CC:
                    senses.append((r.sense_key, *r.asc_ascq))
            assert senses[0] == SOFT_THRESHOLD and set(senses[1:]) == {NO_SPACE} and len(senses) >= 8, senses
        finally:
            c.close()
        log = d.log_text()
        assert log.count("is full (No space left on device)") == 1, log[-3000:]
        assert "MEDIUM" not in log and "Traceback" not in log


def test_io_errors_name_the_direction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EIO from the storage is MEDIUM ERROR with UNRECOVERED READ ERROR on a READ or
    VERIFY, WRITE ERROR on a WRITE (a failed read is never reported as a write)."""

    def eio(*_args: object) -> bool:
        raise OSError(errno.EIO, "Input/output error")

    async def body() -> None:
        h = Harness(tmp_path)
        try:
            await h.clear_ua(h.a)
            monkeypatch.setattr(h.lu.backstore, "read_nowait", eio)
            monkeypatch.setattr(h.lu.backstore, "submit_read", eio)
            monkeypatch.setattr(h.lu.backstore, "write_nowait", eio)
            monkeypatch.setattr(h.lu.backstore, "submit_write", eio)
            read_error = (S.MEDIUM_ERROR, *S.UNRECOVERED_READ_ERROR)
            write_error = (S.MEDIUM_ERROR, *S.WRITE_ERROR)
            r = await h.cmd(rw10(0x28, 0, 8))
            assert (r.status, r.key_asc) == (CC, read_error)
            r = await h.cmd(bytes((0x2F, 0x00, 0, 0, 0, 0, 0, 0, 8, 0)))  # VERIFY(10), BYTCHK 0
            assert (r.status, r.key_asc) == (CC, read_error)
            r = await h.cmd(rw10(0x2A, 0, 8), b"\x11" * 4096)
            assert (r.status, r.key_asc) == (CC, write_error)
        finally:
            h.close()

    asyncio.run(body())
