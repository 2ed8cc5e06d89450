"""iscsi-test-cu ALL, multipath, against a thin file extent with 4096-byte logical blocks
(issue 3, point 3): no test may fail.  Counts are printed for the closing note."""

from __future__ import annotations

import struct

import pytest
from conformance_support import (
    TARGET_IQN,
    assert_no_daemon_errors,
    conformance_target,
    disallowed_skips,
    failure_excerpts,
    run_testcu,
)
from support.rawclient import login_session, read_capacity10


def test_testcu_all_multipath_thin_4096(tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("conf4k")
    log = tmp_path_factory.mktemp("testcu") / "testcu-all-4096.log"
    with conformance_target(state, paths=2, size="256MB", blocksize=4096) as t:
        assert t.extent["iscsi_target_extent_blocksize"] == 4096
        with login_session("127.0.0.1", t.ports[0], TARGET_IQN) as c:
            r = c.scsi(read_capacity10(), read_len=8)
            last_lba, block_len = struct.unpack(">II", r.data)
        assert (block_len, (last_lba + 1) * block_len) == (4096, 256 << 20), r
        run = run_testcu(t.urls(), "ALL", log)
        assert_no_daemon_errors(t.daemon)
    assert "MultipathIO.Simple" in run.results, f"MultipathIO did not run; log: {log}"
    failed = run.names("fail")
    print("skips:", run.names("skip"), "outside the allowed list:", disallowed_skips(run))
    assert not failed, f"{len(failed)} failures: {failed}\n{run.summary()}\n" + failure_excerpts(run, failed)
    assert run.counts["pass"] >= 200, run.summary()
