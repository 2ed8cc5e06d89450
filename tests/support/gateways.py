"""Several pyscsi-target daemons as the gateways of one cluster, on the loopback test cluster.

``Gateways(cluster, root, n)`` starts gateways ``gw1``..``gwN`` (portal group tags 1..N, each on
its own loopback port) sharing their configuration in a fresh RADOS namespace of the ``rbd``
pool, so tests never see each other's gateways.  ``export(image)`` makes, through gateway 1's
REST API, an RBD extent on the image, target ``rbd`` exported through every gateway's portal
group, LUN 0; the other gateways get it from the shared configuration.  Short heartbeats
(0.25 s) and failover timeout (default 2 s) keep takeovers quick.  Every daemon is stopped
by PID on exit (``kill()`` SIGKILLs one, as a crash would).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .ceph import CephCluster, Image
from .daemon import BASE_IQN, Daemon
from .rawclient import RawClient, tur

TARGET = "rbd"
IQN = f"{BASE_IQN}:{TARGET}"


class Gateways:
    def __init__(self, cluster: CephCluster, root: Path, n: int = 2, *, timeout: float = 2.0,
                 heartbeat: float = 0.25, log_level: str = "info") -> None:
        self.cluster = cluster
        self.namespace = f"gw-{uuid.uuid4().hex[:8]}"
        self.daemons: list[Daemon] = []
        self.exported = False
        for k in range(1, n + 1):
            self.daemons.append(Daemon(
                root / f"gw{k}", demo=False, log_level=log_level,
                extra_args=["--ceph-conf", str(cluster.conf), "--cluster", f"rbd/{self.namespace}",
                            "--gateway", f"gw{k}", "--portal-group", str(k), "--heartbeat", str(heartbeat),
                            "--failover-timeout", str(timeout)]))

    def __getitem__(self, k: int) -> Daemon:
        return self.daemons[k]

    def start(self) -> Gateways:
        """Start every gateway (again); once a target was exported, wait until each serves it."""
        try:
            for d in self.daemons:  # one after the other: the first publishes the configuration
                d.start()
            if self.exported:
                self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_serving(self, timeout: float = 15) -> None:
        for d in self.daemons:
            if d.alive():
                wait_for(lambda d=d: serves_lun(d, IQN), timeout, f"{d.state_dir.name} to serve LUN 0")

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def kill(self, k: int) -> None:
        """SIGKILL gateway ``k``: no logout, no clean leave, its image lock left held."""
        d = self.daemons[k]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=10)
        d.returncode = d.proc.returncode
        d.proc = None

    def urls(self, lun: int = 0) -> list[str]:
        return [f"iscsi://{d.portal}/{IQN}/{lun}" for d in self.daemons]

    def export(self, image: Image, **extent: Any) -> dict[str, Any]:
        """Target ``rbd`` with the image as LUN 0 on every gateway's portal group, made through
        gateway 1; waits until every gateway serves it."""
        d = self.daemons[0]
        body = {"iscsi_target_extent_type": "RBD", "iscsi_target_extent_name": image.name,
                "iscsi_target_extent_path": f"{image.pool}/{image.name}"}
        body.update({f"iscsi_target_extent_{k}": v for k, v in extent.items()})
        ext = d.rest("POST", "extent/", body)
        target = d.rest("POST", "target/", {"iscsi_target_name": TARGET})
        ig = d.rest("POST", "authorizedinitiator/", {"iscsi_target_initiator_initiators": "ALL",
                                                     "iscsi_target_initiator_auth_network": "127.0.0.0/8"})
        tags = {k + 1 for k in range(len(self.daemons))}
        for pg in d.rest("GET", "portal/"):
            if pg["iscsi_target_portal_tag"] in tags:
                d.rest("POST", "targetgroup/", {"iscsi_target": target["id"], "iscsi_target_portalgroup": pg["id"],
                                                "iscsi_target_initiatorgroup": ig["id"],
                                                "iscsi_target_authtype": "None"})
        d.rest("POST", "targettoextent/", {"iscsi_target": target["id"], "iscsi_extent": ext["id"],
                                           "iscsi_lunid": 0})
        self.exported = True
        self.wait_serving()
        return ext


def serves_lun(d: Daemon, iqn: str, lun: int = 0) -> bool:
    """The daemon's engine serves ``lun`` of ``iqn`` on its portal (TEST UNIT READY through a
    session of its own reaches the LU)."""
    with RawClient(d.host, d.port, initiator="iqn.2026-11.org.pyscsi-target.test:probe") as c:
        if not c.login(iqn).ok:
            return False
        for _ in range(8):
            r = c.scsi(tur(), lun=lun)
            if r.status == 0:
                c.logout()
                return True
            if r.sense_key != 0x6:
                return False
        return False


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` every 10 ms; returns the seconds it took, fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


@contextmanager
def gateways(cluster: CephCluster, root: Path, n: int = 2, **kw: Any) -> Iterator[Gateways]:
    g = Gateways(cluster, root, n, **kw).start()
    try:
        yield g
    finally:
        g.stop()
