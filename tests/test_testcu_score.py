"""The iscsi-test-cu log scorer (tests/support/testcu_score.py) over crafted CUnit logs.

The logs copy the layout of real ``iscsi-test-cu -V`` output (libiscsi 1.19, CUnit 2.1-3): the status
word has no newline after it, so the next test's setup output continues on its line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import testcu_score
from support.testcu_score import count, score

BANNER = "\n\n     CUnit - A unit testing framework for C - Version 2.1-3\n     http://cunit.sourceforge.net/\n\n"
SUMMARY = ("\n\nRun Summary:    Type  Total    Ran Passed Failed Inactive\n"
           "              suites      1      1    n/a      0        0\n")


def log(*body: str, summary: bool = True) -> str:
    return "    Send PRIN/READ_KEYS\n" + BANNER + "\n".join(body) + (SUMMARY if summary else "")


def test_passes_including_a_test_that_printed_nothing() -> None:
    text = log("Suite: Inquiry",
               "  Test: Standard ...",
               "    Send INQUIRY (Expecting SUCCESS) evpd:0 page_code:00 alloc_len:260",
               "    [OK] INQUIRY returned SUCCESS NO SENSE(0x00) (null)(0x0000)",
               "passed    Send PRIN/READ_KEYS",
               "  Test: Quiet ...passed")
    assert score(text) == {"Inquiry.Standard": "pass", "Inquiry.Quiet": "pass"}


def test_skipped_on_its_own_line_or_on_the_test_line_is_a_skip_not_a_pass() -> None:
    # CUnit reports both as "passed"; libiscsi printed [SKIPPED] and returned early.
    text = log("Suite: StartStopUnit",
               "  Test: Simple ...",
               "    Test we can eject removable the media with IMMED==1",
               "    [SKIPPED] Media is not removable.",
               "passed    Send PRIN/READ_KEYS",
               "",
               "Suite: PreventAllow",
               "  Test: Simple ...    [SKIPPED] Logical unit is not removable. Skipping test.",
               "passed    Send PRIN/READ_KEYS")
    assert score(text) == {"StartStopUnit.Simple": "skip", "PreventAllow.Simple": "skip"}


def test_failed_with_assertion_lines() -> None:
    text = log("Suite: Write10",
               "  Test: Residuals ...",
               "    Send WRITE10 (Expecting INVALID_FIELD_IN_INFORMATION_UNIT) LBA:0 blocks:1",
               "    [FAILED] WRITE10 returned SUCCESS",
               "FAILED",
               "    1. test_write10_residuals.c:93  - status == SCSI_STATUS_CHECK_CONDITION    Send PRIN/READ_KEYS",
               "  Test: Quiet ...FAILED",
               "    1. test_x.c:10  - 0")
    assert score(text) == {"Write10.Residuals": "fail", "Write10.Quiet": "fail"}


def test_a_failure_after_a_partial_skip_is_a_failure() -> None:
    text = log("Suite: Sanitize",
               "  Test: Readonly ...",
               "    [SKIPPED] CRYPTO ERASE is not supported",
               "    [FAILED] SANITIZE returned SUCCESS",
               "FAILED",
               "    1. test_sanitize_readonly.c:120  - 0")
    assert score(text) == {"Sanitize.Readonly": "fail"}


def test_a_test_cut_short_by_a_crash_is_a_failure() -> None:
    # iscsi-test-cu died inside Read10.Async: no status word, no Run Summary; the log merely mentions
    # "passed" inside the test's own output, which is not CUnit's verdict.
    text = log("Suite: Read10",
               "  Test: Simple ...",
               "    [OK] READ10 returned SUCCESS NO SENSE(0x00) (null)(0x0000)",
               "passed    Send PRIN/READ_KEYS",
               "  Test: Async ...",
               "    Verify the first 4 reads passed",
               "    Send READ10 (Expecting SUCCESS) LBA:0 blocks:1",
               summary=False)
    assert score(text) == {"Read10.Simple": "pass", "Read10.Async": "fail"}


def test_a_test_interrupted_by_the_next_suite_is_a_failure() -> None:
    text = log("Suite: A", "  Test: One ...", "    Send TESTUNITREADY", "", "Suite: B", "  Test: Two ...passed")
    assert score(text) == {"A.One": "fail", "B.Two": "pass"}


def test_nothing_after_the_run_summary_is_read() -> None:
    text = log("Suite: A", "  Test: One ...passed") + "\nSuite: Ghost\n  Test: Phantom ...FAILED\n"
    assert score(text) == {"A.One": "pass"}


def test_skipped_text_after_the_status_belongs_to_no_test() -> None:
    # Setup output of the next test on the status line must not turn a pass into a skip.
    text = log("Suite: A", "  Test: One ...", "    [OK] fine", "passed    [SKIPPED] printed by the next setup")
    assert score(text) == {"A.One": "pass"}


def test_empty_log_scores_nothing() -> None:
    assert score("") == {}
    assert count([]) == {"pass": 0, "skip": 0, "fail": 0}


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cu.log"
    path.write_text(log("Suite: A", "  Test: One ...passed", "  Test: Two ...    [SKIPPED] no", "passed",
                        "  Test: Three ...FAILED"))
    assert testcu_score.main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["fail  A.Three", "skip  A.Two", "total=3 pass=1 skip=1 fail=1"]
    assert testcu_score.main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"counts": {"pass": 1, "skip": 1, "fail": 1},
                   "results": {"A.One": "pass", "A.Two": "skip", "A.Three": "fail"}}
    assert testcu_score.main([]) == 2
    assert testcu_score.main([str(path), "--csv"]) == 2
