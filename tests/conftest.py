"""Shared pytest fixtures: the real daemon on loopback (see tests/support/daemon.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `support` importable as a top-level package

from support.daemon import Daemon  # noqa: E402


@pytest.fixture
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with fresh state dirs; every one is stopped at teardown."""
    started: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        d = Daemon(tmp_path_factory.mktemp("daemon"), **kw)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A fresh demo daemon (target iqn.2026-11.org.pyscsi-target:demo, LUN 0, open to all)."""
    return daemon_factory()


# `make test` installs every tool the suite drives, so there a skip can only mean something is
# missing or broken: with PYSCSI_TARGET_NO_SKIPS=1 (set by `make test`, hence by CI) a skip fails.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("PYSCSI_TARGET_NO_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under PYSCSI_TARGET_NO_SKIPS=1 (make test installs every tool): {reason}"
