"""Login, CHAP and discovery against the real daemon with libiscsi's tools (loopback only)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support.net import free_port, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = "iqn.2026-11.org.pyscsi-target:demo"
USER, SECRET, PEER, PEERSECRET = "alice", "initiatorsecret1", "tgt", "targetsecret123"

pytestmark = pytest.mark.skipif(shutil.which("iscsi-inq") is None or shutil.which("iscsi-ls") is None,
                                reason="libiscsi-bin not installed")


class LoginDaemon:
    def __init__(self, state: Path) -> None:
        self.port, self.api = free_port(), free_port()
        self.log = open(state / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyscsi_target", "serve", "--state-dir", str(state), "--portal",
             f"127.0.0.1:{self.port}", "--api", f"127.0.0.1:{self.api}", "--demo", "--log-level", "info"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.state = state
        wait_port("127.0.0.1", self.port, alive=lambda: self.proc.poll() is None)
        wait_port("127.0.0.1", self.api, alive=lambda: self.proc.poll() is None)
        pw = (state / "admin-password").read_text().strip()
        self.auth = "Basic " + base64.b64encode(f"admin:{pw}".encode()).decode()

    def rest(self, method: str, path: str, body: dict | None = None) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api}/api/v1.0/services/iscsi/{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": self.auth, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def logtext(self) -> str:
        return (self.state / "daemon.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def login_daemon(tmp_path_factory):
    d = LoginDaemon(tmp_path_factory.mktemp("login-e2e"))
    try:
        d.rest("POST", "authcredential/", {
            "iscsi_target_auth_tag": 1, "iscsi_target_auth_user": USER, "iscsi_target_auth_secret": SECRET,
            "iscsi_target_auth_peeruser": PEER, "iscsi_target_auth_peersecret": PEERSECRET})
        yield d
    finally:
        d.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "LIBISCSI_DEBUG": "0"})


def inq(d: LoginDaemon, creds: str = "", query: str = "") -> subprocess.CompletedProcess[str]:
    return run("iscsi-inq", f"iscsi://{creds}127.0.0.1:{d.port}/{TARGET}/0{query}")


def set_auth(d: LoginDaemon, authtype: str) -> None:
    d.rest("PUT", "targetgroup/1/", {"iscsi_target_authgroup": 1, "iscsi_target_authtype": authtype})


def test_no_auth_login_and_discovery(login_daemon):
    daemon = login_daemon
    set_auth(daemon, "None")
    r = inq(daemon)
    assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout
    r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{daemon.port}")
    assert r.returncode == 0 and f"Target:{TARGET} Portal:127.0.0.1:{daemon.port},1" in r.stdout


def test_chap_one_way(login_daemon):
    daemon = login_daemon
    set_auth(daemon, "CHAP")
    assert "Authentication failure(513)" in inq(daemon).stdout + inq(daemon).stderr
    bad = inq(daemon, f"{USER}%wrongsecret123@")
    assert bad.returncode != 0 and "Authentication failure(513)" in bad.stdout + bad.stderr
    ok = inq(daemon, f"{USER}%{SECRET}@")
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout
    log = daemon.logtext()
    assert "0x0201" in log and SECRET not in log and "wrongsecret123" not in log


def test_chap_mutual(login_daemon):
    daemon = login_daemon
    set_auth(daemon, "CHAP Mutual")
    one_way = inq(daemon, f"{USER}%{SECRET}@")
    assert one_way.returncode != 0
    ok = inq(daemon, f"{USER}%{SECRET}@", f"?target_user={PEER}&target_password={PEERSECRET}")
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout
    # A target that does not know the initiator's expected secret fails the initiator's check.
    bad = inq(daemon, f"{USER}%{SECRET}@", f"?target_user={PEER}&target_password=notthesecret1")
    assert bad.returncode != 0 and "CHAP_R" in bad.stdout + bad.stderr
    set_auth(daemon, "None")


def test_discovery_chap(login_daemon):
    daemon = login_daemon
    daemon.rest("PUT", "portal/1/", {"iscsi_target_portal_discoveryauthmethod": "CHAP",
                                     "iscsi_target_portal_discoveryauthgroup": 1})
    try:
        r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{daemon.port}")
        assert r.returncode != 0 and "Authentication failure(513)" in r.stdout + r.stderr
        r = run("iscsi-ls", f"iscsi://{USER}%{SECRET}@127.0.0.1:{daemon.port}")
        assert r.returncode == 0 and f"Target:{TARGET}" in r.stdout
    finally:
        daemon.rest("PUT", "portal/1/", {"iscsi_target_portal_discoveryauthmethod": "None"})


def test_unknown_target_and_forbidden_initiator(login_daemon):
    daemon = login_daemon
    r = run("iscsi-inq", f"iscsi://127.0.0.1:{daemon.port}/iqn.2026-11.org.pyscsi-target:nosuch/0")
    assert r.returncode != 0 and "(515)" in r.stdout + r.stderr  # 0x0203 target not found
    ig = daemon.rest("POST", "authorizedinitiator/", {
        "iscsi_target_initiator_initiators": "iqn.2026-11.org.example:allowed",
        "iscsi_target_initiator_auth_network": "ALL"})
    daemon.rest("PUT", "targetgroup/1/", {"iscsi_target_initiatorgroup": ig["id"]})
    try:
        denied = run("iscsi-inq", "-i", "iqn.2026-11.org.example:other", f"iscsi://127.0.0.1:{daemon.port}/{TARGET}/0")
        assert denied.returncode != 0 and "(514)" in denied.stdout + denied.stderr  # 0x0202 authorization failure
        ok = run("iscsi-inq", "-i", "iqn.2026-11.org.example:allowed", f"iscsi://127.0.0.1:{daemon.port}/{TARGET}/0")
        assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout
    finally:
        daemon.rest("PUT", "targetgroup/1/", {"iscsi_target_initiatorgroup": None})
