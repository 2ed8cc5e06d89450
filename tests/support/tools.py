"""Wrappers for the external initiators used by end-to-end tests (libiscsi tools, qemu-img)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from .testcu_score import score as score_testcu  # noqa: F401  (the libiscsi tool tests score through here)

LIBISCSI_TOOLS = ("iscsi-ls", "iscsi-inq", "iscsi-test-cu")


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def run(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                          env={**os.environ, **(env or {})})


def qemu_iscsi(portal: str, target: str, lun: int = 0, *, user: str | None = None, password: str | None = None,
               header_digest: str | None = None, initiator: str | None = None) -> dict[str, Any]:
    """qemu's iscsi block driver options (QAPI BlockdevOptionsIscsi).

    qemu 7.2 passes user/password and header-digest (crc32c, none, crc32c-none, none-crc32c)
    to libiscsi; it never calls iscsi_set_target_username_pwd, so mutual CHAP cannot be
    requested through qemu-img (neither options, URL ?target_user= nor LIBISCSI_CHAP_TARGET_*
    reach the login)."""
    o: dict[str, Any] = {"driver": "iscsi", "transport": "tcp", "portal": portal, "target": target, "lun": lun}
    if user is not None:
        o["user"] = user
        o["password"] = password or ""
    if header_digest is not None:
        o["header-digest"] = header_digest
    if initiator is not None:
        o["initiator-name"] = initiator
    return o


def qemu_json(file_opts: dict[str, Any], size: int | None = None) -> str:
    raw: dict[str, Any] = {"driver": "raw", "file": file_opts}
    if size is not None:
        raw["size"] = size  # expose only the first `size` bytes of the LUN
    return "json:" + json.dumps(raw)
