"""Helpers for the workbench tests: its REST namespace on a test daemon, pcapng reading
through tshark."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .daemon import ADMIN_PASSWORD, ADMIN_USER, ROOT, Daemon

NATIVE = "/api/pyscsi/v1"


@contextmanager
def daemon(state: Path, clean_log: bool = False) -> Iterator[Daemon]:
    """A test daemon for a module; afterwards its log has no ERROR (nor WARNING with ``clean_log``:
    what a fault does to a connection is logged as a warning)."""
    d = Daemon(state).start()
    try:
        yield d
    finally:
        d.stop()
    if clean_log:
        d.assert_clean_log()
    else:
        assert not d.errors_since(0), d.errors_since(0)


def api(d: Daemon, method: str, path: str, body: Any = None) -> Any:
    return d.rest(method, path, body, prefix=NATIVE)


def add_rule(d: Daemon, **rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = api(d, "POST", "faults/", rule)
    return out


def clear_rules(d: Daemon) -> None:
    api(d, "DELETE", "faults/")


def fetch(d: Daemon, path: str, auth: bool = True) -> tuple[int, bytes, dict[str, str]]:
    """GET ``path`` (absolute on the API) -> (status, body, headers)."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    req = urllib.request.Request(d.api_url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def download_capture(d: Daemon, cap_id: int, dest: Path) -> Path:
    status, body, headers = fetch(d, f"{NATIVE}/captures/{cap_id}/pcapng")
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "application/x-pcapng"
    dest.write_bytes(body)
    return dest


def tshark_fields(pcap: Path, *fields: str, display_filter: str = "iscsi") -> list[dict[str, str]]:
    """One dict per packet matching ``display_filter``, with the requested fields (tshark -T fields)."""
    cmd = ["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields", "-E", "separator=\t", "-E",
           "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(fields, line.split("\t"), strict=False)) for line in out.splitlines()]


def tshark_json(pcap: Path, display_filter: str = "iscsi") -> list[dict[str, Any]]:
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "json"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out) if out.strip() else []


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``pyscsi-target ARGS`` against the test daemon (found through its state dir)."""
    env = {**os.environ, "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD}
    return subprocess.run([sys.executable, "-m", "pyscsi_target", *args, "--state-dir", str(d.state_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
