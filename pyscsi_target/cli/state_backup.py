"""``pyscsi-target config backup`` and ``config restore``: copies of the state database
itself (pyscsi_target/config/backups.py), on this host's state dir, no API involved.

``backup`` works while the daemon runs (SQLite's online backup takes a consistent
snapshot); ``restore`` needs the daemon stopped, and moves the file it replaces aside."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from ..api_endpoint import ApiEndpoint
from ..config.backups import copy_database, list_backups, restore, sqlite_problem, take_backup
from ..config.store import DB_NAME
from .client import CliError, default_state_dir
from .output import console


def add_parsers(config_group: Any) -> None:
    """Add ``backup`` and ``restore`` under ``pyscsi-target config``."""
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, help="the daemon's state dir")
    b = config_group.add_parser("backup", parents=[state],
                                help="copy the state database (also while the daemon runs)",
                                description="Copy the state database with SQLite's online backup. Without "
                                            "--output, into STATE_DIR/backups beside the automatic ones; "
                                            "--list shows those.")
    b.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the copy to FILE (e.g. another disk)")
    b.add_argument("--list", action="store_true", help="list the backups in STATE_DIR/backups")
    b.set_defaults(handler=backup, offline=True)
    r = config_group.add_parser("restore", parents=[state], help="put a backup in place of the state database",
                                description="Make FILE (or 'latest', the newest automatic backup) the state "
                                            "database of a stopped daemon. The database it replaces is "
                                            "moved aside (config.db.replaced-TIME), never deleted.")
    r.add_argument("file", metavar="FILE|latest")
    r.set_defaults(handler=restore_command, offline=True)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or default_state_dir()).resolve()


def backup(_client: object, args: argparse.Namespace) -> int:
    state = _state_dir(args)
    if args.list:
        for path in list_backups(state):
            when = datetime.fromtimestamp(path.stat().st_mtime).isoformat(" ", "seconds")
            print(f"{path}\t{when}\t{path.stat().st_size}")
        return 0
    db = state / DB_NAME
    problem = sqlite_problem(db) if db.is_file() else "no such file"
    if problem:
        raise CliError(f"{db} cannot be backed up: {problem}")
    try:
        if args.output is not None:
            copy_database(db, args.output.resolve())
            dest = args.output
        else:
            dest = take_backup(db)
    except Exception as exc:  # noqa: BLE001 - sqlite3 and OS errors alike: one line
        raise CliError(f"backup of {db} failed: {exc}") from None
    console(stderr=True).print(f"backed up {db} to {dest}")
    return 0


def restore_command(_client: object, args: argparse.Namespace) -> int:
    state = _state_dir(args)
    if ApiEndpoint.read(state) is not None:
        raise CliError(f"a daemon is running on {state}: stop it first")
    if args.file == "latest":
        found = list_backups(state)
        if not found:
            raise CliError(f"there is no backup in {state / 'backups'}")
        source = found[-1]
    else:
        source = Path(args.file).resolve()
    try:
        aside = restore(state / DB_NAME, source)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"restore into {state / DB_NAME} failed: {exc}") from None
    moved = f"; the database it replaced is now {aside}" if aside else ""
    console(stderr=True).print(f"restored {source} as {state / DB_NAME}{moved}")
    return 0
