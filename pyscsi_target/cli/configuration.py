"""``pyscsi-target config export`` and ``config import``: the whole configuration as JSON.

Through the running daemon's API, or with ``--offline`` straight on the state dir of a
stopped one (a backup of a stopped service; a restore before its first start).  Both use
``pyscsi_target.config.export``, so the format, the validation and the messages are one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..api_endpoint import ApiEndpoint
from ..config.errors import ConfigError
from ..config.export import apply_import, export_config, plan_import
from ..config.service import ConfigService
from ..config.store import DB_NAME, ConfigStore, StateDbError
from .client import NATIVE, ApiClient, ApiError, CliError, default_state_dir
from .output import console, print_json


def export(client: ApiClient | None, args: argparse.Namespace) -> int:
    if client is None:
        doc = export_offline(args)
    else:
        doc = client.request("GET", f"{NATIVE}/config/", query={"redact": str(bool(args.redact)).lower()})
    text = json.dumps(doc, indent=2) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    # An export with secrets is as sensitive as the state dir: owner-only from the start.
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    secrets = "secrets redacted" if args.redact else "secrets included"
    console(stderr=True).print(f"exported the configuration to {args.output} ({secrets})")
    return 0


def _read(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path} is not JSON: {exc}") from None


def import_(client: ApiClient | None, args: argparse.Namespace) -> int:
    doc = _read(args.file)
    if client is None:
        report = import_offline(args, doc)
    else:
        query = {"dry_run": str(bool(args.dry_run)).lower(), "force": str(bool(args.force)).lower()}
        report = client.request("PUT", f"{NATIVE}/config/", doc, query=query)
    if args.json:
        print_json(report)
        return 0
    out = console()
    verb = "would change" if args.dry_run else "changed"
    lines = []
    for kind, change in report["changes"].items():
        parts = [f"{len(ids)} {what}" for what, ids in change.items() if ids]
        if parts:
            lines.append(f"  {kind.replace('_', ' ')}: {', '.join(parts)}")
    if report.get("global_config_changed"):
        lines.append("  global settings")
    if report.get("api_keys_replaced"):
        lines.append("  API keys replaced")
    out.print(f"import {verb}:" if lines else "import: nothing to change")
    for line in lines:
        out.print(line)
    for path in report.get("files_created", []):
        out.print(f"  [yellow]created an empty (sparse) file[/] {path}")
    for path in report.get("files_grown", []):
        out.print(f"  grew {path}")
    if report.get("sessions_dropped"):
        out.print(f"  [yellow]{report['sessions_dropped']} session(s) dropped[/]")
    return 0


# --- offline: the state dir of a stopped daemon -------------------------------------------------


def _state_dir(args: argparse.Namespace) -> Path:
    state = (args.state_dir or default_state_dir()).resolve()
    if not (state / DB_NAME).exists():
        raise CliError(f"{state} holds no configuration ({DB_NAME} is missing)")
    return state


def _open_store(state: Path) -> ConfigStore:
    try:
        return ConfigStore(state)
    except StateDbError as exc:
        raise CliError(str(exc)) from None


def export_offline(args: argparse.Namespace) -> dict[str, Any]:
    store = _open_store(_state_dir(args))
    try:
        return export_config(store.load(), store, redact=bool(args.redact))
    finally:
        store.close()


def import_offline(args: argparse.Namespace, doc: Any) -> dict[str, Any]:
    """Write ``doc`` into a state dir no daemon runs on (a restore before the first start)."""
    state = (args.state_dir or default_state_dir()).resolve()
    if ApiEndpoint.read(state) is not None:
        raise CliError(f"a daemon is running on {state}: import through it (without --offline)")
    roots = [Path(r).resolve() for r in args.extent_root] if args.extent_root else [state / "extents"]
    store = _open_store(state)
    try:
        service = ConfigService(store, None, extent_roots=roots)
        try:
            plan = plan_import(doc, service.model, service.roots, current_api_keys=store.api_key_rows())
            report = plan.report() if args.dry_run else asyncio.run(apply_import(service, plan))
        except ConfigError as exc:
            raise ApiError(400, exc.message, exc.errors) from None
    finally:
        store.close()
    return {**report, "applied": not args.dry_run}
