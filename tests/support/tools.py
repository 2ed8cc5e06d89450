"""Wrappers for the external initiators used by end-to-end tests (libiscsi tools, qemu-img)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

TESTCU_SCORE = Path("/work/shared/tools/testcu_score.py")
LIBISCSI_TOOLS = ("iscsi-ls", "iscsi-inq", "iscsi-test-cu")


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def run(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                          env={**os.environ, **(env or {})})


def score_testcu(log_text: str) -> dict[str, str]:
    """Per-test verdicts ('pass'/'skip'/'fail') of an iscsi-test-cu verbose log.

    Uses the shared scorer when present (the reference the issue's numbers come from),
    else an equivalent local reading of the CUnit output."""
    if TESTCU_SCORE.exists():
        spec = importlib.util.spec_from_file_location("testcu_score", TESTCU_SCORE)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.score(log_text)
    return _score(log_text)


def _score(text: str) -> dict[str, str]:
    import re

    results: dict[str, str] = {}
    suite, current, body = None, None, []

    def flush() -> None:
        if current is None:
            return
        blob = "\n".join(body)
        if re.search(r"(^|\.\.\.)FAILED\s*$", blob, re.M):
            results[current] = "fail"
        elif "[SKIPPED]" in blob:
            results[current] = "skip"
        elif "passed" in blob:
            results[current] = "pass"
        else:
            results[current] = "fail"

    for line in text.splitlines():
        m = re.match(r"^Suite: (\S+)", line)
        if m:
            flush()
            current, body, suite = None, [], m.group(1)
            continue
        m = re.match(r"^\s+Test: (\S+) \.\.\.(.*)$", line)
        if m:
            flush()
            current, body = f"{suite}.{m.group(1)}", [m.group(2)]
            continue
        if line.startswith("Run Summary"):
            flush()
            current = None
            break
        if current is not None:
            body.append(line)
    flush()
    return results


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
