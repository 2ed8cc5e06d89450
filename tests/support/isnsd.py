"""A private open-isns server (Debian ``open-isns-server``) on loopback, and ``isnsadm`` to read it.

Each instance has its own config, database directory, PID file and control socket
under a temporary directory and listens on its own loopback port, so it never meets a
system isnsd.  Security is off (``Security = 0``): open-isns then lets any client
register targets; with security on it only lets DSA-signed clients do so.  Verified
with open-isns 0.101 (Debian bookworm)::

    isnsd -f -c DIR/isnsd.conf
    isnsadm -c DIR/isnsadm.conf --list nodes
    isnsadm -c DIR/isnsadm.conf --query eid=ENTITY

``stop()`` sends SIGTERM to the PID it started (isnsd exits 0), then SIGKILL.

Usage::

    with Isnsd(registration_period=10) as server:
        ... register with 127.0.0.1:{server.port} ...
        server.nodes()  # [{"iSCSI name": "iqn...", "iSCSI node type": "Target", ...}]
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .daemon import _pdeathsig
from .net import free_port, wait_port

ISNSD = shutil.which("isnsd") or "/usr/sbin/isnsd"
ISNSADM = shutil.which("isnsadm") or "/usr/sbin/isnsadm"


def available() -> bool:
    return os.path.exists(ISNSD) and os.path.exists(ISNSADM)


_OBJECT_RE = re.compile(r"^(?:object\[\d+\] = <(?P<type>[^>]+)>|Object \d+:)\s*$")
_ATTR_RE = re.compile(r"^\s+[0-9a-f]{4}\s+\S+\s*: (?P<name>[^=]+?) = (?P<value>.*)$")


def parse_objects(text: str) -> list[dict[str, str]]:
    """isnsadm's object dump as dicts of attribute name -> value (quotes removed); a query's
    object type, when printed, is under "type"."""
    objects: list[dict[str, str]] = []
    for line in text.splitlines():
        m = _OBJECT_RE.match(line)
        if m:
            objects.append({"type": m.group("type")} if m.group("type") else {})
            continue
        m = _ATTR_RE.match(line)
        if m and objects:
            value = m.group("value").strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            objects[-1][m.group("name").strip()] = value
    return objects


class Isnsd:
    def __init__(self, *, port: int | None = None, registration_period: int = 600, persistent: bool = True) -> None:
        self.port = port or free_port("127.0.0.1")
        self.registration_period = registration_period
        self.persistent = persistent
        self.dir = Path(tempfile.mkdtemp(prefix="isnsd-"))
        self.log_path = self.dir / "isnsd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_configs()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_configs(self) -> None:
        lines = [
            f"SourceName = iqn.2026-11.org.pyscsi-target.test:isnsd-{self.port}",
            f"BindAddress = 127.0.0.1:{self.port}",
            f"PIDFile = {self.dir}/isnsd.pid",
            f"ControlSocket = {self.dir}/isnsctl",
            f"RegistrationPeriod = {self.registration_period}",
            "DefaultDiscoveryDomain = 1",
            "SLPRegister = 0",
            "Security = 0",
        ]
        if self.persistent:  # without a Database line isnsd keeps its database in memory
            (self.dir / "db").mkdir(exist_ok=True)
            lines.append(f"Database = {self.dir}/db")
        (self.dir / "isnsd.conf").write_text("\n".join(lines) + "\n")
        (self.dir / "isnsadm.conf").write_text(
            f"SourceName = iqn.2026-11.org.pyscsi-target.test:isnsadm-{self.port}\n"
            f"ServerAddress = 127.0.0.1:{self.port}\n"
            f"ControlSocket = {self.dir}/isnsctl\n"
            "Security = 0\n"
        )

    def start(self) -> Isnsd:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([ISNSD, "-f", "-c", str(self.dir / "isnsd.conf")], stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        finally:
            log.close()
        wait_port("127.0.0.1", self.port, timeout=15, alive=lambda: self.proc is not None and self.proc.poll() is None)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Isnsd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- reading the database through isnsadm -------------------------------------------------

    def adm(self, *args: str) -> str:
        r = subprocess.run([ISNSADM, "-c", str(self.dir / "isnsadm.conf"), *args], capture_output=True, text=True,
                           errors="replace", timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"isnsadm {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def query(self, *attrs: str) -> list[dict[str, str]]:
        return parse_objects(self.adm("--query", *attrs))

    def entities(self) -> list[dict[str, str]]:
        return parse_objects(self.adm("--list", "entities"))

    def nodes(self) -> list[dict[str, str]]:
        return parse_objects(self.adm("--list", "nodes"))

    def portals(self) -> list[dict[str, str]]:
        return parse_objects(self.adm("--list", "portals"))

    def portal_groups(self) -> list[dict[str, str]]:
        return parse_objects(self.adm("--list", "portal-groups"))

