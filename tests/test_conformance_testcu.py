"""libiscsi's iscsi-test-cu ALL suite, multipath, against a thin file extent (issue 3, point 1).

The LU is reached through two portal groups, i.e. two target ports, so the MultipathIO suite
runs and every "second session" test (reservations, SWP, unit attentions across I_T nexuses)
uses a real second path.  The floor: at least 220 of the suite's tests pass, none fails, and
the only skips are the ones in ``ALLOWED_SKIPS`` (removable-media tests; ReadOnly runs in
test_conformance_readonly.py against a write-protected LU).  Anything else fails CI.
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
    run_testcu,
    sparse_usage,
)

PASS_FLOOR = 220


def test_testcu_all_multipath_thin_512(tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("conf512")
    log = tmp_path_factory.mktemp("testcu") / "testcu-all-512.log"
    with conformance_target(state, paths=2, size="256MB", blocksize=512) as t:
        size, used = sparse_usage(t.extent_path)
        assert size == 256 << 20 and used < size // 16, f"extent is not thin: {used} of {size} bytes allocated"
        run = run_testcu(t.urls(), "ALL", log)
        assert_no_daemon_errors(t.daemon)

    assert "MultipathIO.Simple" in run.results, f"MultipathIO did not run; log: {log}"
    failed = run.names("fail")
    assert not failed, (f"{len(failed)} failures: {failed}\n{run.summary()}\n"
                        + failure_excerpts(run, failed))
    extra = disallowed_skips(run)
    assert not extra, (f"skips outside {ALLOWED_SKIPS}: {extra}\n{run.summary()}\n"
                       + failure_excerpts(run, extra, lines=6))
    assert run.counts["pass"] >= PASS_FLOOR, f"pass floor {PASS_FLOOR} not met: {run.summary()}"
    assert len(run.results) >= 230, f"the suite ran fewer tests than libiscsi 1.19's 230: {run.summary()}"


def test_scorer_is_the_shared_one() -> None:
    # The floor above is only as good as its scorer: a FAILED test must never count as a pass.
    from conformance_support import load_scorer

    sample = ("Suite: X\n  Test: A ...passed\n  Test: B ...\n    [SKIPPED] no\npassed\n"
              "  Test: C ...\n    [FAILED] wrong\nFAILED\n  Test: D ...\nRun Summary:\n")
    assert load_scorer().score(sample) == {"X.A": "pass", "X.B": "skip", "X.C": "fail", "X.D": "fail"}
    assert Path(load_scorer().__file__).name == "testcu_score.py"
