"""Rate-limited log lines: one per key per interval, the next one counting what was held back."""

from __future__ import annotations

import logging

import pytest

from pyscsi_target import log_limit
from pyscsi_target.log_limit import LogLimit

log = logging.getLogger("test.log_limit")


def test_one_line_per_key_per_interval(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(log_limit.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO)
    lim = LogLimit(10.0)
    assert lim.log(log, logging.INFO, "a", "refused %s", "x")
    assert not lim.log(log, logging.INFO, "a", "refused %s", "y")
    assert not lim.log(log, logging.INFO, "a", "refused %s", "z")
    assert lim.log(log, logging.INFO, "b", "refused %s", "other key")
    now[0] += 10.0
    assert lim.log(log, logging.INFO, "a", "refused %s", "w")
    assert lim.log(log, logging.INFO, None, "never held back")
    assert lim.log(log, logging.INFO, None, "never held back")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "refused other key", "refused w (and 2 more like it since the last one logged)",
        "never held back", "never held back",
    ]


def test_the_key_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_limit, "MAX_KEYS", 8)
    lim = LogLimit(10.0)
    for i in range(20):
        lim.log(log, logging.DEBUG, i, "x")
    assert len(lim._last) == 8
