"""Backups of the state database, taken with SQLite's online backup API, and restores.

Automatic backups go to ``<state_dir>/backups/config-<UTC time>.db``:

- one when the daemon starts (the database has just passed its integrity check, so this
  is a known-good copy), and after configuration changes, at most one per
  ``MIN_INTERVAL`` (10 minutes): changes come in bursts of API calls, and the newest
  backup is then at most 10 minutes behind;
- a backup identical to the newest one is not kept (a daemon restarted in a loop must not
  push the older, different copies out);
- the ``KEEP`` (16) newest are kept: at least 2 h 40 min of history while an administrator
  edits without pause, days or weeks when changes are rare - enough to go back past a bad
  change noticed later, for a few MB at most (the database holds configuration and
  reservation state only).

A backup is written to a temporary file, checked (``PRAGMA quick_check``), fsynced and
renamed, so a backup file is always whole.  The backups share the state disk: for a copy
elsewhere, ``pyscsi-target config backup --output FILE``.

``restore`` puts a backup in place of the database of a stopped daemon; the file it
replaces (and its WAL) is moved aside, not deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from pyscsi_target.log_limit import LogLimit

log = logging.getLogger(__name__)
_warn = LogLimit(600.0)

BACKUP_DIR = "backups"
KEEP = 16
MIN_INTERVAL = 600.0
_PREFIX, _SUFFIX = "config-", ".db"


def backup_dir(state_dir: Path) -> Path:
    return state_dir / BACKUP_DIR


def list_backups(state_dir: Path) -> list[Path]:
    """The automatic backups, oldest first (their names sort by time)."""
    try:
        names = os.listdir(backup_dir(state_dir))
    except OSError:
        return []
    return [backup_dir(state_dir) / n for n in sorted(names) if n.startswith(_PREFIX) and n.endswith(_SUFFIX)]


def _read_only(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro"


def sqlite_problem(path: Path) -> str:
    """What is wrong with the SQLite file at ``path`` ("" if nothing): PRAGMA quick_check
    (page structure, record formats), and that it holds this program's tables."""
    try:
        db = sqlite3.connect(_read_only(path), uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            text = " ".join("; ".join(str(r) for r in rows).split())  # one line: it goes in one
            return "quick_check: " + (text if len(text) <= 200 else text[:197] + "...")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        db.close()
    if tables and "settings" not in tables:
        return "not a pyscsi-target state database"
    return ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_database(source: Path, dest: Path) -> None:
    """Copy the SQLite database ``source`` to ``dest`` (replaced whole, or left as it was)
    with the online backup API: a consistent snapshot even while the daemon writes."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        src = sqlite3.connect(_read_only(source), uri=True, timeout=10.0)
        try:
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)  # all pages in one step: one snapshot
                out.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            finally:
                out.close()
        finally:
            src.close()
        problem = sqlite_problem(tmp)
        if problem:
            raise sqlite3.DatabaseError(f"the copy of {source} does not check out: {problem}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)  # it holds CHAP secrets like the database
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def take_backup(db_path: Path, keep: int = KEEP, now: float | None = None) -> Path:
    """A new automatic backup of ``db_path`` (the newest if identical to it); the oldest
    beyond ``keep`` are removed once the new one is safe."""
    state_dir = db_path.parent
    folder = backup_dir(state_dir)
    folder.mkdir(mode=0o700, exist_ok=True)
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    dest = folder / f"{_PREFIX}{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}{_SUFFIX}"
    existing = list_backups(state_dir)
    copy_database(db_path, dest)
    if existing and existing[-1] != dest and _digest(existing[-1]) == _digest(dest):
        os.unlink(dest)
        return existing[-1]
    for old in list_backups(state_dir)[:-keep]:
        with contextlib.suppress(OSError):
            os.unlink(old)
    return dest


def restore(db_path: Path, source: Path) -> Path | None:
    """Make ``source`` (a backup) the database at ``db_path`` of a stopped daemon.  The file
    replaced and its WAL/shared-memory files are moved aside (returned: the moved database,
    or None if there was none); ValueError if ``source`` is not a sound state database."""
    problem = sqlite_problem(source) if source.is_file() else "no such file"
    if problem:
        raise ValueError(f"{source} cannot be restored: {problem}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside: Path | None = None
    # The WAL of the old database must not be replayed into the restored one.
    for suffix in ("", "-wal", "-shm"):
        old = db_path.with_name(db_path.name + suffix)
        if old.exists():
            moved = db_path.with_name(f"{db_path.name}.replaced-{stamp}{suffix}")
            os.replace(old, moved)
            if not suffix:
                aside = moved
    copy_database(source, db_path)
    return aside


class AutoBackup:
    """Backups on the daemon's schedule: ``changed()`` after every applied change."""

    def __init__(self, db_path: Path, *, interval: float = MIN_INTERVAL, keep: int = KEEP) -> None:
        self.db_path = db_path
        self.interval = interval
        self.keep = keep
        self.last = float("-inf")  # time.monotonic() of the last backup
        self.latest: Path | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[None] | None = None

    def changed(self) -> None:
        """Take a backup now, or once ``interval`` has passed since the last one."""
        if self._timer is not None or self._running is not None:
            return  # one is due already: it will see this change too
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.last + self.interval - time.monotonic())
        self._timer = loop.call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self.last = time.monotonic()
        self._running = asyncio.ensure_future(asyncio.to_thread(self._take))
        self._running.add_done_callback(self._finished)

    def _finished(self, fut: asyncio.Future[None]) -> None:
        self._running = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            _warn.log(log, logging.WARNING, "backup", "backup of %s failed: %s (the earlier backups are kept)",
                      self.db_path, exc)

    def _take(self) -> None:
        self.latest = take_backup(self.db_path, self.keep)
        log.debug("state database backed up to %s", self.latest)

    async def close(self) -> None:
        """Take a backup still waiting for its interval, and wait for one in progress."""
        if self._timer is not None:
            self._timer.cancel()
            self._start()
        if self._running is not None:
            with contextlib.suppress(Exception):
                await self._running
