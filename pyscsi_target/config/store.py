"""SQLite persistence of the configuration, persistent-reservation state and API keys.

One file, ``<state_dir>/config.db``, in WAL mode with ``synchronous=FULL`` so that an
acknowledged configuration change or PERSISTENT RESERVE OUT survives a power cut.

Every object kind of the model has its own table ``(id INTEGER PRIMARY KEY AUTOINCREMENT,
data TEXT)``; AUTOINCREMENT (rather than plain rowid) guarantees that an id is never handed
out again after its object is deleted, which is what FreeNAS clients that cache ids rely on.
The row payload is the dataclass as JSON so that adding a model field needs no migration:
missing keys take the dataclass default on load, unknown keys are dropped.

The connection is used from the event loop thread only in practice, but the PR store may be
called by a SCSI worker, so every access holds a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyscsi_target.config.backups import list_backups, sqlite_problem
from pyscsi_target.config.model import (
    AuthCredential,
    ConfigModel,
    Extent,
    GlobalConfig,
    InitiatorGroup,
    LunMap,
    PortalGroup,
    Target,
    TargetGroup,
)

log = logging.getLogger(__name__)

DB_NAME = "config.db"
ADMIN_PASSWORD_FILE = "admin-password"
API_KEY_PREFIX = "pst"

# Model dict attribute -> (table, dataclass).  Table names equal the attribute names.
KINDS: dict[str, type] = {
    "portal_groups": PortalGroup,
    "initiator_groups": InitiatorGroup,
    "auth_credentials": AuthCredential,
    "targets": Target,
    "target_groups": TargetGroup,
    "extents": Extent,
    "lun_maps": LunMap,
}

_SCHEMA_VERSION = 1


def _to_json(obj: Any) -> str:
    data = dataclasses.asdict(obj)
    data.pop("id", None)  # the row id is the one source of truth
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _from_json(cls: type, row_id: int, text: str) -> Any:
    data = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names and k != "id"}
    return cls(id=row_id, **kwargs)


class StateDbError(Exception):
    """The state database cannot be used as it is (empty, damaged, missing): the daemon
    refuses to start rather than run on an empty or half-read configuration.  The message
    is one line naming the file and the way out."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) says the disk is full: SQLite's
    SQLITE_FULL, or ENOSPC/EDQUOT from a file operation."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; a cycle must not loop
        if seen is None:
            return False
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_SQLITE_FULL = 13


def way_out(state_dir: Path) -> str:
    """What an administrator can do about a damaged or missing state database."""
    cmd = f"pyscsi-target config restore --state-dir {state_dir}"
    found = list_backups(state_dir)
    if found:
        return (f"restore the newest backup ({found[-1].name}) with `{cmd} latest`, "
                f"or another of the {len(found)} in {found[-1].parent}")
    return (f"restore a copy with `{cmd} FILE`, or move {state_dir / DB_NAME} away to start with an empty "
            "configuration")


def check_state_db(path: Path) -> None:
    """Refuse a state database that exists but is empty or damaged (StateDbError).

    A database that does not exist is fine only in a state dir that never had one: with
    backups beside it, it was lost."""
    state_dir = path.parent
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if list_backups(state_dir):
            raise StateDbError(f"state database {path} is missing but this state dir has backups of it: "
                               f"{way_out(state_dir)}") from None
        return
    if size == 0:
        raise StateDbError(f"state database {path} is empty (0 bytes; truncated?): {way_out(state_dir)}")
    problem = sqlite_problem(path)
    if problem:
        raise StateDbError(f"state database {path} is damaged ({problem}): {way_out(state_dir)}")


class ConfigStore:
    """The state database.  ``ConfigStore(state_dir)`` creates the directory and schema, or
    checks the existing database (StateDbError if it is empty or damaged)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DB_NAME
        check_state_db(self.path)
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            os.chmod(self.path, 0o600)  # holds CHAP secrets and key hashes
        except OSError:
            pass
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=OFF")
        self._create_schema()

    def _create_schema(self) -> None:
        with self.transaction() as tx:
            c = tx.conn
            for table in KINDS:
                c.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} "
                    "(id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL)"
                )
            c.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            c.execute("CREATE TABLE IF NOT EXISTS pr_state (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
            c.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " hash TEXT NOT NULL UNIQUE, virtual_servers TEXT NOT NULL, created REAL NOT NULL)"
            )
            c.execute(
                "INSERT OR IGNORE INTO settings(key, value) VALUES ('schema_version', ?)",
                (json.dumps(_SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- configuration ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """One atomic write transaction; rolled back if the block raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield StoreTransaction(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed: SQLite leaves the transaction open after
                # SQLITE_FULL, and every later BEGIN would fail until it is rolled back.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def is_empty(self) -> bool:
        """True when no configuration was ever saved (a fresh state dir)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM settings WHERE key = 'global_config'").fetchone()
        return row is None

    def load(self) -> ConfigModel:
        try:
            return self._load()
        except (ValueError, TypeError, KeyError) as exc:  # a row that is not this program's JSON
            raise StateDbError(f"state database {self.path} holds a record that cannot be read ({exc!r}): "
                               f"{way_out(self.state_dir)}") from exc

    def _load(self) -> ConfigModel:
        with self._lock:
            model = ConfigModel()
            for kind, cls in KINDS.items():
                objs = getattr(model, kind)
                for row_id, text in self._db.execute(f"SELECT id, data FROM {kind} ORDER BY id"):
                    objs[row_id] = _from_json(cls, row_id, text)
            settings = dict(self._db.execute("SELECT key, value FROM settings"))
        if "global_config" in settings:
            model.global_config = _from_json(GlobalConfig, 1, settings["global_config"])
        if "service_enabled" in settings:
            model.service_enabled = bool(json.loads(settings["service_enabled"]))
        return model

    def save_all(self, model: ConfigModel) -> None:
        """Make the database equal to ``model`` (used to seed a fresh state dir)."""
        with self.transaction() as tx:
            tx.sync(self.load_unlocked(tx), model)

    def load_unlocked(self, tx: StoreTransaction) -> ConfigModel:
        model = ConfigModel()
        for kind, cls in KINDS.items():
            objs = getattr(model, kind)
            for row_id, text in tx.conn.execute(f"SELECT id, data FROM {kind} ORDER BY id"):
                objs[row_id] = _from_json(cls, row_id, text)
        return model

    # --- PrStore protocol (pyscsi_target.scsi.pr) --------------------------------------

    def load_pr(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM pr_state WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def save_pr(self, key: str, data: bytes | None) -> None:
        with self.transaction() as tx:
            if data is None:
                tx.conn.execute("DELETE FROM pr_state WHERE key = ?", (key,))
            else:
                tx.conn.execute(
                    "INSERT INTO pr_state(key, data) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET data = excluded.data",
                    (key, bytes(data)),
                )

    @property
    def pr_store(self) -> PrStateStore:
        """An object with exactly the PrStore protocol (``load``/``save``)."""
        return PrStateStore(self)

    # --- API keys ------------------------------------------------------------------------

    def create_api_key(self, virtual_servers: list[int] | None = None) -> str:
        """Create a key, store only its hash, and return the key (shown once)."""
        vs = sorted({int(v) for v in virtual_servers or []})
        secret = secrets.token_urlsafe(32)
        with self.transaction() as tx:
            cur = tx.conn.execute(
                "INSERT INTO api_keys(hash, virtual_servers, created) VALUES ('', ?, ?)",
                (json.dumps(vs), time.time()),
            )
            key_id = cur.lastrowid
            key = f"{API_KEY_PREFIX}_{key_id}_{secret}"
            tx.conn.execute("UPDATE api_keys SET hash = ? WHERE id = ?", (_hash_key(key), key_id))
        return key

    def check_api_key(self, key: str) -> list[int] | None:
        """The virtual servers a valid key may use ([] = all), or None if the key is unknown.

        Keys are 256-bit random, so a plain SHA-256 (no slow KDF) is enough against a stolen
        database, and the lookup by hash leaks nothing useful through timing.
        """
        if not key or len(key) > 256:
            return None
        with self._lock:
            row = self._db.execute("SELECT virtual_servers FROM api_keys WHERE hash = ?", (_hash_key(key),)).fetchone()
        if row is None:
            return None
        return [int(v) for v in json.loads(row[0])]

    def list_api_keys(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            rows = self._db.execute("SELECT id, virtual_servers FROM api_keys ORDER BY id").fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def delete_api_key(self, key_id: int) -> bool:
        with self.transaction() as tx:
            cur = tx.conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
        return cur.rowcount > 0

    def api_key_rows(self) -> list[dict[str, Any]]:
        """Every key as stored (its hash, never the key) for a configuration export."""
        with self._lock:
            rows = self._db.execute("SELECT id, hash, virtual_servers, created FROM api_keys ORDER BY id").fetchall()
        return [{"id": r[0], "hash": r[1], "virtual_servers": json.loads(r[2]), "created": r[3]} for r in rows]

    def id_sequences(self) -> dict[str, int]:
        """The last id handed out per object kind (ids are never reused; an export keeps them)."""
        with self._lock:
            rows = self._db.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
        return {name: int(seq) for name, seq in rows if name in KINDS}


class StoreTransaction:
    """Write access inside ``ConfigStore.transaction()``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def new_id(self, kind: str) -> int:
        """Reserve the next never-used id of ``kind`` (AUTOINCREMENT)."""
        if kind not in KINDS:
            raise KeyError(kind)
        # Insert-and-delete bumps sqlite_sequence without leaving a placeholder row behind;
        # the object row itself is written by sync() in the same transaction.
        cur = self.conn.execute(f"INSERT INTO {kind}(data) VALUES ('{{}}')")
        new_id = cur.lastrowid
        assert new_id is not None
        self.conn.execute(f"DELETE FROM {kind} WHERE id = ?", (new_id,))
        return new_id

    def sync(self, old: ConfigModel, new: ConfigModel) -> None:
        """Write the difference between two models (rows of ``new`` that changed)."""
        for kind in KINDS:
            before: dict[int, Any] = getattr(old, kind)
            after: dict[int, Any] = getattr(new, kind)
            for obj_id in before.keys() - after.keys():
                self.conn.execute(f"DELETE FROM {kind} WHERE id = ?", (obj_id,))
            for obj_id, obj in after.items():
                prev = before.get(obj_id)
                if prev is obj:  # shared by both models: unchanged (sealed objects)
                    continue
                if prev != obj or obj_id not in before:
                    self.conn.execute(
                        f"INSERT INTO {kind}(id, data) VALUES (?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                        (obj_id, _to_json(obj)),
                    )
        # The singletons are tiny: always write them.
        self._set("global_config", _to_json(new.global_config))
        self._set("service_enabled", json.dumps(new.service_enabled))

    def raise_id_sequence(self, kind: str, last: int) -> None:
        """Never hand out an id of ``kind`` up to ``last`` again (an imported configuration's)."""
        if kind not in KINDS:
            raise KeyError(kind)
        cur = self.conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (last, kind))
        if cur.rowcount == 0:
            self.conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES (?, ?)", (kind, last))

    def replace_api_keys(self, rows: list[dict[str, Any]]) -> None:
        """Make the stored API keys exactly ``rows`` (as ``ConfigStore.api_key_rows`` gives them)."""
        self.conn.execute("DELETE FROM api_keys")
        for r in rows:
            self.conn.execute(
                "INSERT INTO api_keys(id, hash, virtual_servers, created) VALUES (?, ?, ?, ?)",
                (r["id"], r["hash"], json.dumps(r["virtual_servers"]), r["created"]),
            )

    def _set(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


class PrStateStore:
    """The SCSI layer's PrStore protocol on the ``pr_state`` table (keyed by extent naa)."""

    def __init__(self, store: ConfigStore) -> None:
        self._store = store

    def load(self, key: str) -> bytes | None:
        return self._store.load_pr(key)

    def save(self, key: str, data: bytes | None) -> None:
        try:
            self._store.save_pr(key, data)
        except sqlite3.Error as exc:
            if is_disk_full(exc):  # the SCSI layer's terms: no space (it answers PR OUT 05/55/04)
                raise OSError(errno.ENOSPC, "the state database's disk is full") from exc
            raise


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# --- admin credentials and the CLI piece ----------------------------------------------------


def admin_credentials(state_dir: Path | str) -> tuple[str, str]:
    """The REST admin (user, password).

    The user is ``$PYSCSI_TARGET_ADMIN_USER`` (default ``admin``).  The password is
    ``$PYSCSI_TARGET_ADMIN_PASSWORD`` when set; otherwise it is read from
    ``<state_dir>/admin-password``, which is generated (mode 0600) on first use.
    """
    user = os.environ.get("PYSCSI_TARGET_ADMIN_USER") or "admin"
    env_pw = os.environ.get("PYSCSI_TARGET_ADMIN_PASSWORD")
    if env_pw:
        return user, env_pw
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    path = state / ADMIN_PASSWORD_FILE
    try:
        password = path.read_text().strip()
        if password:
            log.info("REST admin password read from %s", path)
            return user, password
    except FileNotFoundError:
        pass
    password = secrets.token_urlsafe(18)
    # O_EXCL + 0600 at creation: the password is never world-readable, not even briefly.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (password + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.warning("generated REST admin password for user %r, stored in %s", user, path)
    return user, password


def api_key_create(state_dir: Path | str, virtual_servers: list[int]) -> str:
    """``pyscsi-target api-key create``: a new API key, usable at once by a running daemon."""
    store = ConfigStore(state_dir)
    try:
        return store.create_api_key(virtual_servers)
    finally:
        store.close()
