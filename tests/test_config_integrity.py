"""A damaged state store (issue 10, defect 5).

- config.db truncated to 0 bytes, with a corrupt page, or garbage: the daemon refuses to
  start with one line naming the file and the way out, and leaves the file as it was;
- only a state dir that never had a database is seeded;
- automatic rotating backups (SQLite online backup), ``config backup|restore``;
- a full state disk: 507 on both APIs with their error bodies, nothing half saved, and the
  same request succeeds once space returns.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import ADMIN_PASSWORD, ROOT
from support.net import free_port
from support.rest_harness import FN, HN, aio, harness
from support.small_fs import fill, small_fs

from pyscsi_target.config import backups
from pyscsi_target.config.store import DB_NAME, ConfigStore, StateDbError, is_disk_full

EX_CONFIG = 78


def _serve(state: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the daemon expecting it to refuse to start (it exits by itself)."""
    cmd = [sys.executable, "-m", "pyscsi_target", "serve", "--state-dir", str(state),
           "--portal", f"127.0.0.1:{free_port('127.0.0.1')}", "--api", f"127.0.0.1:{free_port('127.0.0.1')}",
           "--log-format", "text", *extra]
    env = {**os.environ, "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyscsi_target", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _configured_state(state: Path, targets: int = 3) -> None:
    """A state dir whose database holds a few targets (and no WAL left over), with a backup
    as a daemon's start would have taken."""

    async def body() -> None:
        async with harness(state) as h:
            for i in range(targets):
                assert (await h.call("POST", f"{FN}/target/", {"iscsi_target_name": f"t{i}"}))[0] == 201

    asyncio.run(body())
    db = sqlite3.connect(state / DB_NAME)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    backups.take_backup(state / DB_NAME)


def _assert_refused(state: Path, what: str) -> str:
    before = (state / DB_NAME).read_bytes() if (state / DB_NAME).exists() else None
    r = _serve(state)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    assert str(state / DB_NAME) in line and what in line, line
    assert "pyscsi-target config restore" in line, line  # the way out
    after = (state / DB_NAME).read_bytes() if (state / DB_NAME).exists() else None
    assert after == before  # not seeded over, not "repaired"
    return line


def test_truncated_to_zero_refuses_to_start(tmp_path: Path) -> None:
    _configured_state(tmp_path)
    os.truncate(tmp_path / DB_NAME, 0)
    line = _assert_refused(tmp_path, "is empty (0 bytes")
    assert "config restore --state-dir" in line and " latest`" in line  # a backup exists


def test_corrupt_page_refuses_to_start(tmp_path: Path) -> None:
    _configured_state(tmp_path)
    db = tmp_path / DB_NAME
    page = sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:  # page 3 onwards hold the tables' b-trees
        f.seek(2 * page + 8)
        f.write(os.urandom(page // 2))
    _assert_refused(tmp_path, "is damaged (")


def test_garbage_refuses_to_start(tmp_path: Path) -> None:
    """No backup: the way out is a copy or an empty configuration."""
    (tmp_path / DB_NAME).write_bytes(os.urandom(12288))
    line = _assert_refused(tmp_path, "is damaged (file is not a database)")
    assert "away to start with an empty configuration" in line


def test_foreign_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    _assert_refused(tmp_path, "not a pyscsi-target state database")


def test_lost_database_with_backups_refuses(tmp_path: Path) -> None:
    _configured_state(tmp_path)
    for name in os.listdir(tmp_path):
        if name.startswith(DB_NAME):
            os.unlink(tmp_path / name)
    r = _serve(tmp_path)
    assert r.returncode == EX_CONFIG and "is missing but this state dir has backups" in r.stderr, r.stderr
    assert not (tmp_path / DB_NAME).exists()


def test_unreadable_record_is_refused_not_a_traceback(tmp_path: Path) -> None:
    _configured_state(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("UPDATE targets SET data = '{not json' WHERE id = 1")
    db.commit()
    db.close()
    with pytest.raises(StateDbError, match="holds a record that cannot be read"):
        ConfigStore(tmp_path).load()


def test_backup_and_restore_cli(tmp_path: Path) -> None:
    """The way out the refusal names works: restore the newest backup, the targets are
    back, the damaged file is kept aside; ``config backup`` copies while a store is open."""
    state = tmp_path / "state"
    _configured_state(state, targets=2)
    store = ConfigStore(state)  # open, as a running daemon's would be
    try:
        r = _cli("config", "backup", "--state-dir", str(state), "--output", str(tmp_path / "copy.db"))
        assert r.returncode == 0, r.stderr
        assert backups.sqlite_problem(tmp_path / "copy.db") == ""
        r = _cli("config", "backup", "--state-dir", str(state))
        assert r.returncode == 0 and "backed up" in r.stderr, r.stderr
    finally:
        store.close()
    listed = _cli("config", "backup", "--list", "--state-dir", str(state)).stdout.splitlines()
    assert listed and all(ln.startswith(str(state / "backups")) for ln in listed)
    (state / DB_NAME).write_bytes(b"\0" * 4096)  # damaged
    _assert_refused(state, "is damaged")
    r = _cli("config", "restore", "--state-dir", str(state), "latest")
    assert r.returncode == 0 and "replaced is now" in r.stderr, r.stderr
    aside = [n for n in os.listdir(state) if n.startswith(f"{DB_NAME}.replaced-")]
    assert aside and (state / aside[0]).read_bytes() == b"\0" * 4096  # nothing deleted
    model = ConfigStore(state).load()
    assert sorted(t.name for t in model.targets.values()) == ["t0", "t1"]
    # a file that is not a sound state database is not restored
    (tmp_path / "junk.db").write_bytes(b"junk" * 1000)
    r = _cli("config", "restore", "--state-dir", str(state), str(tmp_path / "junk.db"))
    assert r.returncode == 1 and "cannot be restored" in r.stderr, r.stderr


def test_backups_rotate_and_skip_identical(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    try:
        first = backups.take_backup(store.path, keep=3)
        assert backups.take_backup(store.path, keep=3) == first  # nothing changed: not kept twice
        made = [first]
        for i in range(4):
            with store.transaction() as tx:
                tx.conn.execute("INSERT INTO pr_state(key, data) VALUES (?, ?)", (f"k{i}", b"x"))
            made.append(backups.take_backup(store.path, keep=3))
        assert backups.list_backups(tmp_path) == made[-3:]
        assert all(backups.sqlite_problem(p) == "" for p in made[-3:])
        assert oct((made[-1]).stat().st_mode & 0o777) == "0o600"
    finally:
        store.close()


@aio
async def test_auto_backup_at_most_once_per_interval(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    try:
        auto = backups.AutoBackup(store.path, interval=0.3)
        auto.changed()  # start-up: at once
        await asyncio.sleep(0.1)
        assert len(backups.list_backups(tmp_path)) == 1
        for i in range(5):  # a burst of changes: one backup at the end of the interval
            with store.transaction() as tx:
                tx.conn.execute("INSERT INTO pr_state(key, data) VALUES (?, ?)", (f"k{i}", b"x"))
            auto.changed()
        await asyncio.sleep(0.05)
        assert len(backups.list_backups(tmp_path)) == 1
        await asyncio.sleep(0.4)
        assert len(backups.list_backups(tmp_path)) == 2
        with store.transaction() as tx:
            tx.conn.execute("DELETE FROM pr_state")
        auto.changed()  # pending at shutdown: taken by close()
        await auto.close()
        assert len(backups.list_backups(tmp_path)) == 3
    finally:
        store.close()


def test_daemon_starts_on_a_sound_database_and_backs_it_up(tmp_path: Path) -> None:
    """A state dir that never had a database is seeded; the start takes a backup."""
    from support.daemon import Daemon

    with Daemon(tmp_path / "state", demo=False) as d:
        assert d.rest("GET", "target/") == []
    assert len(backups.list_backups(tmp_path / "state")) == 1


# --- a full state disk ---------------------------------------------------------------------


def test_disk_full_recognised() -> None:
    err = sqlite3.OperationalError("database or disk is full")
    err.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert is_disk_full(err) and is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("x")
    wrapped.__cause__ = err
    assert is_disk_full(wrapped) and not is_disk_full(OSError(5, "EIO"))


@aio
async def test_full_state_disk_is_507_and_recovers(tmp_path: Path) -> None:
    with small_fs(tmp_path / "state", 1 << 20) as state:
        extents = tmp_path / "extents"
        extents.mkdir()
        async with harness(state, extent_roots=[extents]) as h:
            fill(state / "filler.bin")
            # SQLite may still find room in its WAL for a few: post until the disk says no.
            fn_status = hn_status = 0
            fn_body = hn_body = None
            created = []
            for i in range(200):
                fn_status, fn_body, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": f"full{i}"})
                if fn_status != 201:
                    break
                created.append(f"full{i}")
            assert fn_status == 507, (fn_status, fn_body)
            assert set(fn_body) == {"error"} and "disk holding the configuration database is full" in fn_body["error"]
            hn_status, hn_body, _ = await h.call("POST", HN, {"alias": "hfull", "virtualServerId": 1})
            assert hn_status == 507, (hn_status, hn_body)
            assert set(hn_body) >= {"errorCode", "errorMsg", "errorDetail"} and "full" in hn_body["errorMsg"]
            # nothing half saved: the refused target is in neither the model nor the database
            names = [t["iscsi_target_name"] for t in (await h.call("GET", f"{FN}/target/?limit=0"))[1]]
            assert names == created
            os.unlink(state / "filler.bin")  # space returns: the same request succeeds
            status, body, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "after"})
            assert status == 201, body
        assert sorted(t.name for t in ConfigStore(state).load().targets.values()) == sorted([*created, "after"])


def test_pr_state_on_a_full_state_disk_is_no_space(tmp_path: Path) -> None:
    """The SCSI layer hears a full state disk as ENOSPC (and answers a PR OUT 05/55/04),
    not as a database error."""
    import errno

    with small_fs(tmp_path / "state", 1 << 20) as state:
        store = ConfigStore(state)
        try:
            prs = store.pr_store
            prs.save("naa", b"x" * 100)
            fill(state / "filler")
            with pytest.raises(OSError) as info:
                prs.save("naa", os.urandom(512 << 10))
            assert info.value.errno == errno.ENOSPC
            assert prs.load("naa") == b"x" * 100  # nothing half saved
        finally:
            store.close()
