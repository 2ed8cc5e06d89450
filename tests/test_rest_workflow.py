"""The REST issue's end-to-end workflow against the real daemon, driven by examples/*.sh.

1. examples/freenas-workflow.sh: portal, initiator, CHAP credential, target, CHAP target group,
   extent and LUN through /api/v1.0; iscsi-ls logs in with the right secret and is refused
   with a wrong one.
2. examples/hnas-workflow.sh: /v9 PATCH accessConfig excluding 127.0.0.1 refuses the next
   login, restoring it admits it again, regenerateGUN shows a new IQN in discovery.
3. After a daemon restart the same GETs return the same objects and an initiator logs in again.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.net import free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "workflow-pass"

pytestmark = pytest.mark.skipif(shutil.which("iscsi-ls") is None, reason="libiscsi-bin (iscsi-ls) not installed")


@contextmanager
def daemon(state: Path, portal: int, api: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYSCSI_TARGET_ADMIN_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO)}
    log = open(state.parent / f"daemon-{api}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyscsi_target",
            "serve",
            "--state-dir",
            str(state),
            "--portal",
            f"127.0.0.1:{portal}",
            "--api",
            f"127.0.0.1:{api}",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", api, timeout=30, alive=lambda: proc.poll() is None)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def get(api: int, path: str) -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{api}{path}")
    token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def run_script(name: str, api: int, portal: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "API": f"http://127.0.0.1:{api}", "PASSWORD": PASSWORD, "PORTAL": f"127.0.0.1:{portal}"}
    return subprocess.run(["sh", str(REPO / "examples" / name)], env=env, capture_output=True, text=True, timeout=60)


def test_workflow_through_both_apis_and_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    portal, new_portal, api = free_port(), free_port(), free_port()
    paths = [
        f"/api/v1.0/services/iscsi/{r}/?limit=0"
        for r in (
            "portal",
            "authorizedinitiator",
            "authcredential",
            "target",
            "targetgroup",
            "extent",
            "targettoextent",
        )
    ] + ["/api/v1.0/services/iscsi/globalconfiguration/", "/v9/storage/iscsi-targets"]
    with daemon(state, portal, api):
        fn = run_script("freenas-workflow.sh", api, new_portal)
        assert fn.returncode == 0, fn.stdout + fn.stderr
        assert "Lun:0" in fn.stdout and "OK:" in fn.stdout
        hn = run_script("hnas-workflow.sh", api, new_portal)
        assert hn.returncode == 0, hn.stdout + hn.stderr
        assert "OK:" in hn.stdout
        assert "(514)" in hn.stdout  # login status 0x0202 (forbidden) while accessConfig excluded us
        before = {p: get(api, p) for p in paths}
        iqn = next(t for t in before["/v9/storage/iscsi-targets"]["iscsiTargets"] if t["alias"] == "wf")[
            "globalUniqueName"
        ]
        assert iqn.endswith(":wf.g1")
    with daemon(state, portal, api):
        assert {p: get(api, p) for p in paths} == before
        out = subprocess.run(
            ["iscsi-inq", f"iscsi://wf-user%wf-secret-123@127.0.0.1:{new_portal}/{iqn}/0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and "DIRECT_ACCESS" in out.stdout, out.stdout + out.stderr
