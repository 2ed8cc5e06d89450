"""iscsi-test-cu ALL, multipath, against a thin file extent with 4096-byte logical blocks
(issue 3, point 3): no test may fail.  Counts are printed for the closing note.

The six ProutReserve.Access* tests check that a registrant may write with libiscsi's
verify_write_works, which writes one "block" of 512 bytes whatever the LU's block size: here
that is a partial-block WRITE, refused with INVALID FIELD IN COMMAND INFORMATION UNIT since
issue 10 (it used to be answered GOOD with nothing written).  They are excused as a libiscsi
defect only with that exact signature, once the refusal is proven and the same tests pass
on a 512-byte LU (conformance_support.reverify_defects).

Marked slow: with 4 KiB blocks the suite moves 8x the data of the 512-byte run (its transfers
are counted in blocks) and takes 2-3.5 minutes here against about one."""

from __future__ import annotations

import struct

import pytest
from conformance_support import (
    ALLOWED_SKIPS,
    BLOCK4K_SKIPS,
    TARGET_IQN,
    assert_no_daemon_errors,
    conformance_target,
    disallowed_skips,
    failure_excerpts,
    lbppb_exponent,
    log_file,
    reverify_defects,
    run_testcu,
)
from support.rawclient import login_session, read_capacity10


@pytest.mark.slow
def test_testcu_all_multipath_thin_4096(tmp_path_factory: pytest.TempPathFactory) -> None:
    log = log_file("testcu-all-4096")
    with conformance_target(tmp_path_factory.mktemp("conf4k"), paths=2, size="256MB", blocksize=4096) as t:
        assert t.extent["iscsi_target_extent_blocksize"] == 4096
        with login_session("127.0.0.1", t.ports[0], TARGET_IQN) as c:
            r = c.scsi(read_capacity10(), read_len=8)
            last_lba, block_len = struct.unpack(">II", r.data)
        assert (block_len, (last_lba + 1) * block_len) == (4096, 256 << 20), r
        lbppbe = lbppb_exponent(t)
        run = run_testcu(t.urls(), "ALL", log)
        assert_no_daemon_errors(t.daemon)
    assert "MultipathIO.Simple" in run.results, f"MultipathIO did not run; log: {log}"
    assert len(run.results) >= 230, f"the suite ran fewer tests than libiscsi 1.19's 230: {run.summary()}"
    failed = run.names("fail")
    assert lbppbe == 0, "4 KiB logical blocks are whole 4 KiB physical blocks"
    excused, refused = reverify_defects(run, tmp_path_factory, lbppbe=lbppbe, multipath=True, blocksize=4096)
    for name, why in excused.items():
        print(f"excused libiscsi defect {name}: {why}")
    real = [f for f in failed if f not in excused]
    print(f"4096-byte multipath run: {run.summary()}; excused {sorted(excused)}; skips: {run.names('skip')}")
    assert not real, (f"{len(real)} failures: {real}\nnot excused: {refused}\n{run.summary()}\n"
                      + failure_excerpts(run, real))
    extra = disallowed_skips(run, ALLOWED_SKIPS + BLOCK4K_SKIPS)
    assert not extra, f"skips outside ALLOWED_SKIPS + BLOCK4K_SKIPS: {extra}\n" + failure_excerpts(run, extra, tail=4)
