"""A throwaway Ceph cluster on loopback for the RBD tests: 1 monitor + 1 memstore OSD, no mgr.

``CephCluster(dir).start()`` brings it up in a couple of seconds:

- every daemon runs in the foreground (``-f``) as our child with PR_SET_PDEATHSIG, so a killed
  pytest takes the cluster with it, and ``stop()`` ends each one by PID;
- memstore keeps objects in RAM at 2-3 times their size: images handed out are small;
- ``auth="cephx"`` turns on authentication and adds a restricted user (``client.gateway``, its
  own keyring file) to exercise the client-id/keyring settings of the backstore;
- waits are bounded; a daemon that exits or never comes up raises ``CephStartError`` naming its
  log file (and quoting its tail).

Pytest fixtures: ``ceph_cluster`` (auth none, one per session), ``ceph_cephx_cluster`` (started
on first use), ``rbd_image`` (a fresh 64 MiB image per test, removed afterwards).  Test modules
import them (``from support.ceph import ceph_cluster, rbd_image  # noqa: F401``); the cluster is
a process-wide singleton, so several modules importing the fixture still share one cluster.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .net import free_port, port_open

CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool")
POOL = "rbd"
GATEWAY_ID = "gateway"  # the restricted client of the cephx cluster
_START_TIMEOUT = 60.0


class CephStartError(RuntimeError):
    pass


def _pdeathsig() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Image:
    """An RBD image made for one test."""

    cluster: CephCluster
    pool: str
    name: str
    size: int


class CephCluster:
    def __init__(self, root: Path, auth: str = "none") -> None:
        self.root = root
        self.auth = auth
        self.conf = root / "ceph.conf"
        self.keyring = root / "keyring"
        self.gateway_keyring = root / "gateway.keyring"
        self.log_dir = root / "log"
        self.port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._names = itertools.count()

    @property
    def mon_host(self) -> str:
        return f"v2:127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for the ceph/rbd/rados CLIs and librados clients."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    # --- bring-up ------------------------------------------------------------------------

    def start(self) -> CephCluster:
        for d in ("run", "log", "mon.a", "osd.0", "crash"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        try:
            if self.auth == "cephx":
                self._make_keyrings()
            self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[{self.mon_host}]",
                      str(self.root / "monmap"))
            self._run("ceph-mon", "-i", "a", "--mkfs", "--monmap", str(self.root / "monmap"))
            self._spawn("mon.a", "ceph-mon", "-f", "-i", "a")
            self._wait(lambda: port_open("127.0.0.1", self.port, 0.2), "mon.a", "listening on its port")
            osd_uuid = str(uuid.uuid4())
            osd_id = self.ceph("osd", "new", osd_uuid).strip()
            if osd_id != "0":
                raise CephStartError(f"'ceph osd new' returned id {osd_id!r}, expected 0")
            self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("osd.0", "ceph-osd", "-f", "-i", "0")
            self._wait(self._osd_up, "osd.0", "up")
            self.ceph("osd", "pool", "create", POOL, "8", "8")
            # `rbd pool init` returns once the pool's placement groups are active.
            self._run("rbd", "pool", "init", POOL, timeout=_START_TIMEOUT)
            if self.auth == "cephx":
                self._add_gateway_user()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self, fsid: str) -> None:
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = {self.mon_host}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = {self.auth}
auth service required = {self.auth}
auth client required = {self.auth}
keyring = {self.keyring}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
# paxos proposes every second by default: map changes (bring-up, blocklist) would wait for it
paxos propose interval = 0.05
# a client that cannot reach the monitor gives up instead of hanging for 300 s
client mount timeout = 15
rados mon op timeout = 15
osd objectstore = memstore
memstore device bytes = 2147483648
run dir = {r}/run
pid file = {r}/run/$name.pid
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
crash dir = {r}/crash
mon data = {r}/$name
osd data = {r}/$name
[client]
# every test client is client.admin: without this they would fight over one socket path
admin socket =
log file = {r}/log/client.log
""")

    def _make_keyrings(self) -> None:
        k = str(self.keyring)
        self._run("ceph-authtool", "-C", k, "-g", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", k, "-g", "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd",
                  "allow *", "--cap", "mgr", "allow *")
        self._run("ceph-authtool", k, "-g", "-n", "osd.0", "--cap", "mon", "allow profile osd", "--cap", "osd",
                  "allow *")

    def _add_gateway_user(self) -> None:
        # What ceph-iscsi documents for its gateways: the rbd profiles (which include the right to
        # blocklist a dead exclusive-lock owner).
        self.ceph("auth", "get-or-create", f"client.{GATEWAY_ID}", "mon", "profile rbd", "osd", "profile rbd",
                  "-o", str(self.gateway_keyring))

    def _run(self, *args: str, timeout: float = 30.0) -> str:
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as e:
            raise CephStartError(f"{' '.join(args)} did not finish in {timeout}s; logs in {self.log_dir}") from e
        if p.returncode != 0:
            raise CephStartError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}; "
                                 f"logs in {self.log_dir}")
        return p.stdout

    def ceph(self, *args: str, timeout: float = 30.0) -> str:
        return self._run("ceph", "--connect-timeout", "15", *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 30.0) -> str:
        return self._run("rbd", *args, timeout=timeout)

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")  # noqa: SIM115 - the child keeps it
        try:
            self.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                preexec_fn=_pdeathsig)
        finally:
            out.close()

    def _wait(self, ready: object, name: str, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + _START_TIMEOUT
        proc = self.procs[name]
        log, out = self.log_dir / f"{name}.log", self.log_dir / f"{name}.stdout"
        while True:
            if proc.poll() is not None:
                # errors before the log is opened go to stderr, kept in the .stdout file
                raise CephStartError(f"{name} exited with {proc.returncode} before {'being ' if what == 'up' else ''}"
                                     f"{what}; see {log} and {out}:\n{_tail(out)}\n{_tail(log, 5)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise CephStartError(f"{name} was not {what} within {_START_TIMEOUT}s; see {log}")
            time.sleep(0.05)

    def _osd_up(self) -> bool:
        dump = json.loads(self.ceph("osd", "dump", "--format", "json"))
        return any(o["osd"] == 0 and o["up"] for o in dump["osds"])

    # --- tear-down -----------------------------------------------------------------------

    def stop(self) -> None:
        """SIGKILL each daemon by PID (a throwaway cluster needs no clean shutdown) and reap it."""
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    # --- images --------------------------------------------------------------------------

    def create_image(self, size: int = 64 << 20, name: str | None = None, namespace: str = "",
                     features: str | None = None, object_size: str | None = None) -> Image:
        name = name or f"img{next(self._names)}-{uuid.uuid4().hex[:6]}"
        args = ["create", "--size", f"{size}B", "--pool", POOL]
        if namespace:
            args += ["--namespace", namespace]
        if features is not None:
            args += ["--image-feature", features]
        if object_size is not None:
            args += ["--object-size", object_size]
        self.rbd(*args, name)
        return Image(self, POOL, name, size)

    def remove_image(self, image: Image, namespace: str = "") -> None:
        """Remove the image; a watch left by a fenced (blocklisted) or killed client keeps it until the OSD
        expires the watch (osd_client_watch_timeout, 30 s), so that refusal is waited out."""
        args = ["rm", "--no-progress", "--pool", image.pool] + (["--namespace", namespace] if namespace else [])
        deadline = time.monotonic() + 60
        while True:
            try:
                self.rbd(*args, image.name, timeout=60)
                return
            except CephStartError as e:
                if "still has watchers" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def create_namespace(self, namespace: str) -> None:
        self.rbd("namespace", "create", "--pool", POOL, "--namespace", namespace)


def have_ceph() -> list[str]:
    """The Ceph tools missing on this machine (empty when the cluster can run)."""
    return [t for t in CEPH_TOOLS if shutil.which(t) is None]


# --- pytest fixtures: one cluster per process, whichever module asks first ------------------

_CLUSTERS: dict[str, CephCluster] = {}


def _cluster(auth: str) -> Iterator[CephCluster]:
    missing = have_ceph()
    if missing:
        pytest.skip(f"Ceph tools missing: {', '.join(missing)} (Debian: ceph-mon ceph-osd ceph-common)")
    cluster = _CLUSTERS.get(auth)
    if cluster is None:
        root = Path(tempfile.mkdtemp(prefix=f"ceph-{auth}-"))
        cluster = _CLUSTERS[auth] = CephCluster(root, auth).start()
    yield cluster
    # Every module importing the fixture has its own session-scoped definition; all are torn down
    # at the end of the session, and the first one stops the shared cluster.
    if _CLUSTERS.pop(auth, None) is not None:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    yield from _cluster("none")


@pytest.fixture(scope="session")
def ceph_cephx_cluster() -> Iterator[CephCluster]:
    yield from _cluster("cephx")


@pytest.fixture
def rbd_image(ceph_cluster: CephCluster) -> Iterator[Image]:
    """A fresh 64 MiB image (default features: exclusive-lock, object-map, fast-diff...)."""
    image = ceph_cluster.create_image()
    yield image
    ceph_cluster.remove_image(image)


def main() -> None:
    """``PYTHONPATH=tests python3 -m support.ceph [DIR]``: run the test cluster until Ctrl-C or SIGTERM (to try the
    RBD extents by hand); prints its ceph.conf."""
    import sys

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ceph-"))
    cluster = CephCluster(root).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"cluster up: CEPH_CONF={cluster.conf} (pool {POOL}); Ctrl-C stops it", flush=True)
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
