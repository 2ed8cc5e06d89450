"""libiscsi's iscsi-test-cu ALL suite, multipath, against a thin file extent (issue 3, point 1).

The LU is reached through two portal groups, i.e. two target ports, so the MultipathIO suite
runs and every "second session" test (reservations, SWP, unit attentions across I_T nexuses)
uses a real second path.  The floor: at least 220 of the suite's tests pass, none fails, and
the only skips are the ones in ``ALLOWED_SKIPS`` (removable-media tests; ReadOnly runs in
test_conformance_readonly.py against a write-protected LU).  Anything else fails CI.

Two libiscsi 1.19 test defects (``conformance_support.DEFECTS``) make a correct target fail
in this configuration; such a failure is excused only when the same test passes on a re-run
where the defect cannot trigger.  The extent keeps the default physical block reporting
(8 logical blocks per 4 KiB physical block) because five tests run only when LBPPB >= 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_support import (
    ALLOWED_SKIPS,
    assert_no_daemon_errors,
    conformance_target,
    disallowed_skips,
    failure_excerpts,
    lbppb_exponent,
    load_scorer,
    log_file,
    reverify_defects,
    run_testcu,
    sparse_usage,
)

PASS_FLOOR = 220


def test_testcu_all_multipath_thin_512(tmp_path_factory: pytest.TempPathFactory) -> None:
    log = log_file("testcu-all-512")
    with conformance_target(tmp_path_factory.mktemp("conf512"), paths=2, size="256MB", blocksize=512) as t:
        size, used = sparse_usage(t.extent_path)
        assert size == 256 << 20 and used < size // 16, f"extent is not thin: {used} of {size} bytes allocated"
        lbppbe = lbppb_exponent(t)
        run = run_testcu(t.urls(), "ALL", log)
        assert_no_daemon_errors(t.daemon)

    assert "MultipathIO.Simple" in run.results, f"MultipathIO did not run; log: {log}"
    assert len(run.results) >= 230, f"the suite ran fewer tests than libiscsi 1.19's 230: {run.summary()}"
    failed = run.names("fail")
    excused = reverify_defects(run, failed, tmp_path_factory, lbppbe=lbppbe, multipath=True, blocksize=512)
    for name, why in excused.items():
        print(f"excused libiscsi defect {name}: {why}")
    real = [f for f in failed if f not in excused]
    extra = disallowed_skips(run)
    passed = run.counts["pass"] + len(excused)
    print(f"512-byte multipath run: {run.summary()}; pass incl. re-verified={passed}; skips outside the "
          f"allowed list: {extra}")
    assert not real, f"{len(real)} failures: {real}\n{run.summary()}\n" + failure_excerpts(run, real)
    assert not extra, (f"skips outside {ALLOWED_SKIPS}: {extra}\n{run.summary()}\n"
                       + failure_excerpts(run, extra, tail=4))
    assert passed >= PASS_FLOOR, f"pass floor {PASS_FLOOR} not met: {passed} ({run.summary()})"


def test_scorer_is_the_shared_one() -> None:
    # The floor above is only as good as its scorer: a FAILED test must never count as a pass.
    sample = ("Suite: X\n  Test: A ...passed\n  Test: B ...\n    [SKIPPED] no\npassed\n"
              "  Test: C ...\n    [FAILED] wrong\nFAILED\n  Test: D ...\nRun Summary:\n")
    scorer = load_scorer()
    assert scorer.score(sample) == {"X.A": "pass", "X.B": "skip", "X.C": "fail", "X.D": "fail"}
    assert Path(scorer.__file__).name == "testcu_score.py"
