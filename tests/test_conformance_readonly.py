"""A write-protected extent (``iscsi_target_extent_ro``): libiscsi's ReadOnly suite passes and
writes are refused with DATA PROTECT / WRITE PROTECTED (issue 3, point 2)."""

from __future__ import annotations

import struct

import pytest
from conformance_support import (
    TARGET_IQN,
    assert_no_daemon_errors,
    conformance_target,
    failure_excerpts,
    log_file,
    run_testcu,
)
from support.rawclient import login_session, read10, write10

WRITE_PROTECTED = (0x27, 0x00)


def _mode_sense6_wp(c) -> bool:  # type: ignore[no-untyped-def]
    r = c.scsi(struct.pack(">BBBBBB", 0x1A, 0x08, 0x3F, 0, 255, 0), read_len=255)  # DBD, all pages
    assert r.status == 0, r
    return bool(r.data[2] & 0x80)  # device-specific parameter: WP


def test_testcu_readonly_suite_on_ro_extent(tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("confro")
    log = log_file("testcu-readonly")
    with conformance_target(state, paths=1, size="64MB", ro=True) as t:
        assert t.extent["iscsi_target_extent_ro"] is True
        run = run_testcu(t.urls(), "ALL.ReadOnly", log, flags=("-d",))
        assert_no_daemon_errors(t.daemon)
    assert run.results, f"ReadOnly suite did not run: {log}"
    not_passed = [n for n, v in run.results.items() if v != "pass"]
    assert not not_passed, f"{run.summary()}\n" + failure_excerpts(run, not_passed)


def test_ro_toggle_via_rest_protects_writes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """PUT ro=true on a live extent: WP shows in MODE SENSE and writes get DATA PROTECT; reads
    still work; PUT ro=false lifts it."""
    with conformance_target(tmp_path_factory.mktemp("confro2"), paths=1, size="16MB") as t:
        d = t.daemon
        c = login_session("127.0.0.1", t.ports[0], TARGET_IQN)
        try:
            block = b"\xa5" * 512
            assert c.scsi(write10(10, 1), data=block).status == 0
            assert not _mode_sense6_wp(c)

            d.rest("PUT", f"extent/{t.extent['id']}/", {"iscsi_target_extent_ro": True})
            c.clear_unit_attentions()  # a toggle may raise a UA (e.g. MODE PARAMETERS CHANGED)
            assert _mode_sense6_wp(c)
            r = c.scsi(write10(10, 1), data=b"\x5a" * 512)
            assert (r.status, r.sense_key, r.asc_ascq) == (0x02, 0x07, WRITE_PROTECTED), r
            r = c.scsi(read10(10, 1), read_len=512)
            assert r.status == 0 and r.data == block, "read of a write-protected LU failed or data changed"

            d.rest("PUT", f"extent/{t.extent['id']}/", {"iscsi_target_extent_ro": False})
            c.clear_unit_attentions()
            assert not _mode_sense6_wp(c)
            assert c.scsi(write10(10, 1), data=b"\x5a" * 512).status == 0
        finally:
            c.close()
        assert_no_daemon_errors(d)
