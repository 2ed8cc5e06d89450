"""Run the real pyscsi-target daemon as a subprocess for end-to-end tests.

``Daemon`` starts ``python3 -m pyscsi_target serve --demo`` on free loopback ports with its
own state dir, waits until the iSCSI portal and the REST API accept TCP, and on exit sends
SIGTERM (clean shutdown path), then SIGKILL if it hangs.  The child also gets
PR_SET_PDEATHSIG so a killed pytest never leaves a daemon behind.

The REST admin password is fixed through ``PYSCSI_TARGET_ADMIN_PASSWORD`` so tests can
configure CHAP, initiator groups etc. via the FreeNAS v1.0 API (``rest()``).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .net import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_IQN = "iqn.2026-11.org.pyscsi-target:demo"
BASE_IQN = "iqn.2026-11.org.pyscsi-target"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "pyscsi-test-admin-pw"
FREENAS = "/api/v1.0/services/iscsi"
NATIVE = "/api/pyscsi/v1"

# A log line is "<asctime> <LEVEL> <logger>: <message>"; these levels (or a traceback) fail a clean run.
_BAD_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback \(most recent call last\)|^\s*\w+Error: ")


def _pdeathsig() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGKILL): die with the test process.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class RestError(RuntimeError):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Daemon:
    """One daemon process.  Attributes: host, port, portal, api_url, iqn, state_dir, log_path."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_port: int | None = None,
        demo: bool = True,
        log_level: str = "info",
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE to start the daemon with
        self.host = host
        self.port = port or free_port(host)
        self.api_port = api_port or free_port("127.0.0.1")
        self._picked_ports = port is None and api_port is None  # ours to pick again if taken
        self.demo = demo
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.log_path = self.state_dir / "daemon.log"
        self.iqn = DEMO_IQN
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # --- addresses ---
    @property
    def portal(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def url(self, lun: int = 0, *, iqn: str | None = None, user: str | None = None, secret: str | None = None,
            **query: str) -> str:
        """libiscsi URL, e.g. url(0, user="u", secret="s", target_user=..., header_digest="crc32c")."""
        creds = ""
        if user is not None:
            creds = f"{urllib.parse.quote(user, safe='')}%{urllib.parse.quote(secret or '', safe='')}@"
        q = ("?" + "&".join(f"{k}={v}" for k, v in query.items())) if query else ""
        return f"iscsi://{creds}{self.portal}/{iqn or self.iqn}/{lun}{q}"

    # --- lifecycle ---
    def start(self, timeout: float = 60.0) -> Daemon:
        for _ in range(2):
            mark = self.log_mark()
            try:
                return self._start(timeout)
            except RuntimeError:
                # Ports we picked were taken before the daemon bound them: pick others.
                text = self.log_text()
                if not self._picked_ports or "address already in use" not in text[mark:].lower():
                    raise
                # The failed start's lines go aside, so that a test's log checks see only the real run.
                with open(self.log_path.with_name(self.log_path.name + ".failed-start"), "a") as aside:
                    aside.write(text[mark:])
                self.log_path.write_text(text[:mark])
                self.port, self.api_port = free_port(self.host), free_port("127.0.0.1")
        return self._start(timeout)

    def _start(self, timeout: float) -> Daemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pyscsi_target", "serve", "--state-dir", str(self.state_dir),
               "--portal", self.portal, "--api", f"127.0.0.1:{self.api_port}", "--log-level", self.log_level,
               *(["--demo"] if self.demo else []), *self.extra_args]
        env = {**os.environ, "PYSCSI_TARGET_ADMIN_USER": ADMIN_USER, "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("PYSCSI_TARGET_STATE_DIR", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, preexec_fn=self._preexec)
        try:
            alive = self.alive
            wait_port(self.host, self.port, timeout=timeout, alive=alive)
            wait_port("127.0.0.1", self.api_port, timeout=timeout, alive=alive)
        except BaseException as e:
            self.stop()
            if isinstance(e, Exception):
                raise RuntimeError(f"daemon did not come up: {e}\n--- log tail ---\n{self.log_tail()}") from e
            raise
        return self

    def _preexec(self) -> None:
        _pdeathsig()
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL; returns the exit status (negative = killed by that signal)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.returncode = proc.returncode
        return self.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- log ---
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_mark(self) -> int:
        """Current log length: pass as ``since=`` to look only at what was logged afterwards."""
        return len(self.log_text())

    def bad_log_lines(self, allow: Iterable[str] = (), since: int = 0) -> list[str]:
        allowed = [re.compile(a) for a in allow]
        return [line for line in self.log_text()[since:].splitlines()
                if _BAD_LINE.search(line) and not any(a.search(line) for a in allowed)]

    def errors_since(self, since: int = 0) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks (warnings allowed: negative tests cause them)."""
        return self.bad_log_lines(allow=[r"^\S+ \S+ WARNING "], since=since)

    def assert_clean_log(self, allow: Iterable[str] = (), since: int = 0) -> None:
        """No WARNING/ERROR/CRITICAL line and no traceback, except lines matching an ``allow`` regex."""
        bad = self.bad_log_lines(allow, since)
        assert not bad, "daemon log has warnings/errors:\n" + "\n".join(bad[:40])

    # --- REST (FreeNAS v1.0) ---
    def rest(self, method: str, path: str, body: Any = None, *, prefix: str = FREENAS, timeout: float = 30) -> Any:
        """``rest("POST", "authcredential/", {...})`` -> decoded JSON (None for an empty body)."""
        url = f"{self.api_url}{prefix}/{path.lstrip('/')}"
        token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
        req = urllib.request.Request(
            url, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json",
                     "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise RestError(e.code, e.read().decode(errors="replace"), method, path) from None
        return json.loads(raw) if raw.strip() else None

    # --- configuration helpers (FreeNAS v1.0) ---
    def basename(self) -> str:
        return self.rest("GET", "globalconfiguration/")["iscsi_basename"]

    def add_auth(self, tag: int, user: str, secret: str, peeruser: str = "", peersecret: str = "") -> dict[str, Any]:
        return self.rest("POST", "authcredential/", {
            "iscsi_target_auth_tag": tag, "iscsi_target_auth_user": user, "iscsi_target_auth_secret": secret,
            "iscsi_target_auth_peeruser": peeruser, "iscsi_target_auth_peersecret": peersecret})

    def add_target(
        self,
        name: str,
        *,
        luns: Iterable[tuple[int, int, int]] = ((0, 64 << 20, 512),),
        auth_type: str = "None",
        auth_group: int | None = None,
        initiators: str | None = None,
        auth_network: str = "ALL",
        portal_group: int | None = None,
    ) -> str:
        """Create target ``name`` with file LUNs ``(lunid, size, blocksize)``; returns its IQN."""
        t = self.rest("POST", "target/", {"iscsi_target_name": name})
        ig = None
        if initiators is not None:
            ig = self.rest("POST", "authorizedinitiator/", {
                "iscsi_target_initiator_initiators": initiators, "iscsi_target_initiator_auth_network": auth_network,
                "iscsi_target_initiator_comment": f"{name} initiators"})["id"]
        if portal_group is None:
            portal_group = self.rest("GET", "portal/")[0]["id"]
        self.rest("POST", "targetgroup/", {
            "iscsi_target": t["id"], "iscsi_target_portalgroup": portal_group, "iscsi_target_initiatorgroup": ig,
            "iscsi_target_authtype": auth_type, "iscsi_target_authgroup": auth_group})
        for lunid, size, blocksize in luns:
            e = self.rest("POST", "extent/", {
                "iscsi_target_extent_name": f"{name}-lun{lunid}", "iscsi_target_extent_type": "File",
                "iscsi_target_extent_path": str(self.state_dir / "extents" / f"{name}-lun{lunid}.img"),
                "iscsi_target_extent_filesize": size, "iscsi_target_extent_blocksize": blocksize})
            self.rest("POST", "targettoextent/", {"iscsi_target": t["id"], "iscsi_extent": e["id"],
                                                  "iscsi_lunid": lunid})
        return f"{self.basename()}:{name}"

    def target_group(self, name: str = "demo") -> dict[str, Any]:
        targets = {t["id"]: t["iscsi_target_name"] for t in self.rest("GET", "target/")}
        return next(g for g in self.rest("GET", "targetgroup/") if targets.get(g["iscsi_target"]) == name)

    def set_target_auth(self, name: str, auth_type: str, auth_group: int | None) -> None:
        tg = self.target_group(name)
        self.rest("PUT", f"targetgroup/{tg['id']}/", {"iscsi_target_authtype": auth_type,
                                                     "iscsi_target_authgroup": auth_group})

    def add_luns(self, count: int, filesize: str = "1MB") -> None:
        """Map ``count`` more sparse file extents (LUN 1, 2, ...) on the demo target in one
        configuration import (a thousand take about a second)."""
        doc = self.rest("GET", "config/", prefix=NATIVE)
        ext0, map0 = doc["extents"][0], doc["lun_maps"][0]
        next_ext = max(e["id"] for e in doc["extents"]) + 1
        next_map = max(m["id"] for m in doc["lun_maps"]) + 1
        first_lun = max(m["lunid"] for m in doc["lun_maps"]) + 1
        for i in range(count):
            e = dict(ext0, id=next_ext + i, name=f"lun{first_lun + i}", path=f"lun{first_lun + i}.img",
                     filesize=filesize, serial="", naa="")
            doc["extents"].append(e)
            doc["lun_maps"].append(dict(map0, id=next_map + i, extent=e["id"], lunid=first_lun + i))
        self.rest("PUT", "config/", doc, prefix=NATIVE, timeout=300)

    def set_discovery_auth(self, method: str, group: int | None) -> None:
        pg = self.rest("GET", "portal/")[0]
        self.rest("PUT", f"portal/{pg['id']}/", {"iscsi_target_portal_discoveryauthmethod": method,
                                                 "iscsi_target_portal_discoveryauthgroup": group})


@contextmanager
def running_daemon(state_dir: Path | str, **kw: Any) -> Iterator[Daemon]:
    d = Daemon(state_dir, **kw)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
