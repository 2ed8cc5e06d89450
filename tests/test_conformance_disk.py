"""iscsi-test-cu ALL, multipath, against a Disk extent: a loop device over a sparse file
(issue 3: "Disk extents use the block device's own discard where it exists").

Same rules as the file-extent run (test_conformance_testcu.py): no failure except a libiscsi
defect proven harmless on a Disk extent, only the allowed skips.  Needs loop devices (root);
without them the test is skipped, saying why.
"""

from __future__ import annotations

import pytest
from conformance_support import (
    ALLOWED_SKIPS,
    LBPPB1_SKIPS,
    assert_no_daemon_errors,
    disallowed_skips,
    disk_target,
    failure_excerpts,
    lbppb_exponent,
    log_file,
    reverify_defects,
    run_testcu,
)


def test_testcu_all_multipath_disk_extent_on_loop_device(tmp_path_factory: pytest.TempPathFactory) -> None:
    with disk_target(tmp_path_factory.mktemp("disk"), paths=2, size="256MB") as t:
        assert t.extent["iscsi_target_extent_type"] == "Disk" and t.extent_path.is_block_device(), t.extent
        lbppbe = lbppb_exponent(t)
        run = run_testcu(t.urls(), "ALL", log_file("testcu-all-disk"))
        assert_no_daemon_errors(t.daemon)
    assert "MultipathIO.Simple" in run.results, f"MultipathIO did not run: {run.summary()}"
    assert len(run.results) >= 230, f"the suite ran fewer tests than libiscsi 1.19's 230: {run.summary()}"
    excused, refused = reverify_defects(run, tmp_path_factory, lbppbe=lbppbe, multipath=True, blocksize=512,
                                        target=disk_target)
    for name, why in excused.items():
        print(f"excused libiscsi defect {name}: {why}")
    real = [n for n in run.names("fail") if n not in excused]
    print(f"Disk extent (loop device) multipath run: {run.summary()}; excused {sorted(excused)}; "
          f"skips: {run.names('skip')}")
    assert not real, (f"{len(real)} failures: {real}\nnot excused: {refused}\n{run.summary()}\n"
                      + failure_excerpts(run, real))
    allowed = ALLOWED_SKIPS + (LBPPB1_SKIPS if lbppbe == 0 else ())
    extra = disallowed_skips(run, allowed)
    assert not extra, f"skips outside {allowed}: {extra}\n" + failure_excerpts(run, extra, tail=4)
