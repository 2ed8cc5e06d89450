"""Shared pytest fixtures: the real daemon on loopback (see tests/support/daemon.py)."""

from __future__ import annotations

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
