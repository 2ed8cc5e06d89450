"""schemathesis against the running daemon: no 5xx, every response matches /api/openapi.json.

Checks run: not_a_server_error, status_code_conformance, content_type_conformance,
response_headers_conformance, response_schema_conformance, unsupported_method.
Not run, on purpose: positive_data_acceptance (the schema cannot express semantic rules
such as "this IP must be configured on this host" or "this id must exist") and
negative_data_rejection (the API is deliberately lenient: ids as strings, unknown fields
ignored, as FreeNAS clients need).  Afterwards, nothing may exist outside the extent root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.net import free_port
from test_rest_workflow import PASSWORD, daemon

pytestmark = pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis not installed")

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "unsupported_method",
    )
)


def _snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_schemathesis_no_server_errors(tmp_path: Path) -> None:
    state = tmp_path / "state"
    outside = tmp_path / "outside-before"
    outside.mkdir()
    before = _snapshot(tmp_path)
    portal, api = free_port(), free_port()
    with daemon(state, portal, api):
        out = subprocess.run(
            [
                "schemathesis",
                "run",
                f"http://127.0.0.1:{api}/api/openapi.json",
                "--auth",
                f"admin:{PASSWORD}",
                "--checks",
                CHECKS,
                "--max-time",
                "40",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--seed",
                "1234",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Test cases:" in out.stdout
    # Every file the run created is in the state dir (extents under its extents/ root).
    created = _snapshot(tmp_path) - before
    stray = [
        p
        for p in created
        if not p.startswith(str(state))
        and not p.startswith(str(tmp_path / "daemon-"))
        and ".hypothesis" not in p
        and "schemathesis" not in p
    ]
    assert stray == []
    extent_files = [p for p in created if p.startswith(str(state / "extents"))]
    assert all(Path(p).resolve().is_relative_to((state / "extents").resolve()) for p in extent_files)
