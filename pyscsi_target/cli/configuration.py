"""``pyscsi-target config export`` and ``config import``: the whole configuration as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .client import NATIVE, ApiClient, CliError
from .output import console, print_json


def export(client: ApiClient, args: argparse.Namespace) -> int:
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


def import_(client: ApiClient, args: argparse.Namespace) -> int:
    doc = _read(args.file)
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
