"""Score the verbose log of libiscsi's ``iscsi-test-cu -V``: one verdict per test.

CUnit's Basic interface (verbose mode) prints ``\\n  Test: NAME ...`` when a test starts and, when it
ends, ``passed`` or ``FAILED`` with no newline after it, followed for a failure by one
``\\n    N. file.c:LINE  - condition`` line per failed assertion.  The test's own output (libiscsi
indents it by four spaces) sits in between, and whatever comes next (often the next test's setup
output) continues on the status word's line, e.g. ``passed    Send PRIN/READ_KEYS``.  So a status is
the word ``passed``/``FAILED`` at the start of a line, or right after the ``...`` of a test that
printed nothing.

libiscsi marks a test that could not run as ``[SKIPPED]`` and returns, which CUnit counts as passed.
Here it is a skip.  Verdicts:

* ``fail``: CUnit said FAILED (even when part of the test skipped), or the test never finished: the
  log ends, or the next test or suite starts, before a status (iscsi-test-cu crashed or was killed);
* ``skip``: CUnit said passed and the test printed ``[SKIPPED]``;
* ``pass``: CUnit said passed and nothing was skipped.

The log should come from a line-buffered run (``stdbuf -oL -eL``) so that stderr cannot land inside a
stdout line.  Usage: ``python3 tests/support/testcu_score.py LOG [--json]``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["pass", "skip", "fail"]
VERDICTS: tuple[Verdict, ...] = ("pass", "skip", "fail")

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_STATUS = re.compile(r"^(passed|FAILED)")
_SKIPPED = "[SKIPPED]"


@dataclass
class _Open:
    """The test being read: its name, whether it skipped, and its CUnit status once printed."""

    name: str
    skipped: bool = False
    status: str | None = None

    def verdict(self) -> Verdict:
        if self.status != "passed":  # FAILED, or cut short before any status
            return "fail"
        return "skip" if self.skipped else "pass"


def score(text: str) -> dict[str, Verdict]:
    """``{"Suite.Test": verdict}`` in log order for every test the log shows starting."""
    results: dict[str, Verdict] = {}
    suite = "?"
    current: _Open | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            results[current.name] = current.verdict()
        current = None

    def feed(fragment: str) -> None:
        # A fragment is a line, or what follows "..." on a Test line.
        assert current is not None
        m = _STATUS.match(fragment)
        if m and current.status is None:
            current.status = m.group(1)
            return
        if current.status is None and _SKIPPED in fragment:
            current.skipped = True

    for line in text.splitlines():
        if m := _SUITE.match(line):
            close()
            suite = m.group(1)
        elif m := _TEST.match(line):
            close()
            current = _Open(f"{suite}.{m.group(1)}")
            feed(m.group(2))
        elif line.startswith("Run Summary"):
            close()
            break
        elif current is not None:
            feed(line)
    close()
    return results


def count(verdicts: Iterable[Verdict]) -> dict[Verdict, int]:
    out: dict[Verdict, int] = dict.fromkeys(VERDICTS, 0)
    for v in verdicts:
        out[v] += 1
    return out


def report(results: Mapping[str, Verdict]) -> str:
    """The non-passing tests, one a line, then the totals."""
    c = count(results.values())
    lines = [f"{v:5} {n}" for n, v in sorted(results.items()) if v != "pass"]
    return "\n".join([*lines, f"total={len(results)} pass={c['pass']} skip={c['skip']} fail={c['fail']}"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1 or any(a not in ("--json",) for a in args if a.startswith("--")):
        print("usage: testcu_score.py LOG [--json]", file=sys.stderr)
        return 2
    with open(paths[0], errors="replace") as f:
        results = score(f.read())
    if "--json" in args:
        print(json.dumps({"counts": count(results.values()), "results": results}, indent=1))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
