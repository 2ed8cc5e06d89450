"""The fuzzing campaign's output, kept honest in CI (issue 10).

- Every input of the repo corpus (tests/fuzz_corpus/TARGET/), crash files included, goes
  through its target again: a crash the campaign found stays fixed.
- A short coverage-guided run of every target (atheris, 15 s each, under 2 minutes in
  all) finds no new failure.  The long campaign runs outside CI: ``PYTHONPATH=tests
  python3 -m support.fuzz campaign`` (tests/support/fuzz.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support import fuzz, fuzz_targets


def test_corpus_covers_every_target() -> None:
    assert set(fuzz_targets.TARGETS) == set(fuzz.TARGET_NAMES)
    for target in fuzz.TARGET_NAMES:
        assert any(p.name.startswith("seed-") for p in (fuzz.CORPUS / target).iterdir()), target


@pytest.mark.parametrize("target", fuzz.TARGET_NAMES)
def test_corpus_replays_cleanly(target: str) -> None:
    """Every kept input of ``target``, past crashes first; all failures are listed."""
    paths = sorted((fuzz.CORPUS / target).iterdir(), key=lambda p: (not p.name.startswith("crash-"), p.name))
    failures = []
    logging.disable(logging.CRITICAL)
    try:
        for path in paths:
            try:
                fuzz_targets.TARGETS[target](path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"{path.name}: {exc!r}")
    finally:
        logging.disable(logging.NOTSET)
    assert not failures, f"{len(failures)} of {len(paths)} inputs fail:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("target", fuzz.TARGET_NAMES)
def test_short_fuzz_run_finds_nothing(target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    summary = fuzz.run(target, seconds=15, keep=tmp_path)
    assert summary["crashes"] == [], summary
    assert summary["exit"] == 0 and int(summary["inputs"]) > 1000, summary  # type: ignore[call-overload]
