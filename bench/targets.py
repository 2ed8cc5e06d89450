"""The two systems under test: pyscsi-target (our daemon) and Debian's tgtd, on loopback.

Both export the same LUN layout so one load definition fits both:
  main   1 GiB file, pre-filled with identical data (reads hit real blocks, not holes)
  sp1g   1 GiB sparse file  \\  for the "1 GiB vs 1 TiB" row: same (hole) content,
  sp1t   1 TiB sparse file  /   only the LBA range differs
The daemon and tgtd helpers of the TEST engineer (tests/support/) start and stop the processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures live in tests/support, imported as `support`

from support.daemon import Daemon, RestError  # noqa: E402
from support.net import free_port, wait_port  # noqa: E402
from support.tgtd import SOCKET_DIR, Lun, Tgtd  # noqa: E402

from .storm import RestClient, in_parallel  # noqa: E402

GiB = 1 << 30
STORM_TIDS = 100000  # tgtd target ids of the storm's short-lived targets, above any grown one
TiB = 1 << 40
LUN_NAMES = ("main", "sp1g", "sp1t")


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of the whole process (all threads, live and exited) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()  # comm may contain spaces; fields start after ')'
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fill_file(path: Path, size: int, seed: int = 20261122) -> None:
    """Write ``size`` bytes of deterministic incompressible data (a 16 MiB random block repeated)."""
    import random

    chunk = random.Random(seed).randbytes(16 << 20)
    with open(path, "r+b" if path.exists() else "wb") as f:
        for off in range(0, size, len(chunk)):
            f.write(chunk[: min(len(chunk), size - off)])
        f.flush()
        os.fsync(f.fileno())


def copy_image(src: Path, dst: Path) -> None:
    """A copy of ``src`` at ``dst``, made *before* a target opens it: a target may keep state about
    its backing file (pyscsi-target's hole map), so nothing writes the file behind its back."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def free_tgtd_control_port() -> int:
    # tgtd -C accepts 0..32767 only; the port just names /var/run/tgtd/socket.<N>.
    for _ in range(200):
        n = 20000 + int.from_bytes(os.urandom(2), "big") % 12000
        if not (SOCKET_DIR / f"socket.{n}").exists():
            return n
    raise RuntimeError("no free tgtd control port")


@dataclass
class System:
    """Common face of both targets for the load runners."""

    name: str
    host: str
    port: int
    iqn: str
    luns: dict[str, int]  # LUN_NAMES -> LUN number
    block_size: int = 512
    handle: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.handle.proc.pid if isinstance(self.handle, Daemon) else self.handle.pid

    def url(self, lun: str = "main", query: str = "") -> str:
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{self.luns[lun]}{query}"

    def alive(self) -> bool:
        proc = self.handle.proc
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        self.handle.stop()


# tgtd's defaults (MaxRecv/MaxXmitDataSegmentLength 8192, FirstBurstLength 65536, InitialR2T=Yes,
# MaxOutstandingR2T 1) halve its 128 KiB write throughput here; pyscsi-target declares 256 KiB segments,
# 256 KiB first burst and accepts InitialR2T=No.  Aligning tgtd to the same limits makes both sessions
# negotiate the same parameters with libiscsi and qemu, so the rows compare implementations, not defaults.
# (MaxBurstLength: RFC 7143 caps it at 2^24-1.)
TGTD_PARAMS = {"MaxRecvDataSegmentLength": "262144", "MaxXmitDataSegmentLength": "262144",
               "FirstBurstLength": "262144", "MaxBurstLength": "16776192", "InitialR2T": "No",
               "ImmediateData": "Yes", "MaxOutstandingR2T": "16"}


def tuned_tgtd(luns: list[Lun], iqn: str, log_path: Path) -> Tgtd:
    """A started tgtd with ``luns`` and pyscsi-target's session limits (TGTD_PARAMS)."""
    t = Tgtd(luns, port=free_port(), control_port=free_tgtd_control_port(), iqn=iqn, log_path=log_path)
    t.start()
    try:
        for k, v in TGTD_PARAMS.items():
            t.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", k, "--value", v)
    except BaseException:
        t.stop()
        raise
    return t


def start_tgtd(workdir: Path, main_image: Path) -> System:
    sp1g, sp1t = workdir / "tgtd-sp1g.img", workdir / "tgtd-sp1t.img"
    for p, size in ((sp1g, GiB), (sp1t, TiB)):
        with open(p, "wb") as f:
            f.truncate(size)
    t = tuned_tgtd([Lun(1, main_image), Lun(2, sp1g), Lun(3, sp1t)], "iqn.2026-11.org.pyscsi-target.bench:tgtd",
                   workdir / "tgtd.log")
    return System("tgtd", t.host, t.port, t.iqn, {"main": 1, "sp1g": 2, "sp1t": 3}, 512, t)


def start_pyscsi(workdir: Path, main_image_src: Path) -> System:
    """The daemon with its --demo LUN 0 (1 GiB), filled from ``main_image_src``, plus two sparse LUNs via REST.

    The demo LUN's file is put in place before the daemon starts (it adopts an existing demo.img)."""
    state = workdir / "pyscsi-state"
    demo_file = state / "extents" / "demo.img"
    copy_image(main_image_src, demo_file)
    d = Daemon(state, log_level="warning", demo=True)
    d.start()
    try:
        tgt = next(t for t in d.rest("GET", "target/?limit=1000") if t["iscsi_target_name"] in ("demo", d.iqn))
        demo_maps = [m for m in d.rest("GET", "targettoextent/?limit=1000") if m["iscsi_target"] == tgt["id"]]
        ext = {e["id"]: e for e in d.rest("GET", "extent/?limit=1000")}
        demo_path = Path(ext[demo_maps[0]["iscsi_extent"]]["iscsi_target_extent_path"])
        if demo_path.resolve() != demo_file.resolve():
            raise RuntimeError(f"the demo LUN is {demo_path}, not the prepared {demo_file}")
        luns = {"main": demo_maps[0]["iscsi_lunid"] or 0}
        for lun_id, (name, size) in enumerate((("sp1g", GiB), ("sp1t", TiB)), start=1):
            e = d.rest("POST", "extent/", {
                "iscsi_target_extent_type": "File", "iscsi_target_extent_name": f"bench-{name}",
                "iscsi_target_extent_path": str(state / "extents" / f"bench-{name}.img"),
                "iscsi_target_extent_filesize": str(size)})
            d.rest("POST", "targettoextent/", {"iscsi_target": tgt["id"], "iscsi_extent": e["id"],
                                               "iscsi_lunid": lun_id})
            luns[name] = lun_id
        bs = ext[demo_maps[0]["iscsi_extent"]].get("iscsi_target_extent_blocksize", 512)
    except BaseException:
        d.stop()
        raise
    return System("pyscsi-target", d.host, d.port, d.iqn, luns, int(bs), d)


# --- scaling helpers ----------------------------------------------------------------------------------------


class PyscsiScaling:
    """A daemon without the demo LUN, for start-up and discovery with N targets (configured via REST)."""

    def __init__(self, workdir: Path) -> None:
        self.state = workdir / "pyscsi-scaling"
        self.port = free_port()
        self.daemon: Daemon | None = None
        self.targets = 0
        self.portal_group: int | None = None

    @property
    def pid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc.pid

    def start(self) -> float:
        """Start (or restart) the daemon; seconds until the portal accepts TCP."""
        self.daemon = Daemon(self.state, port=self.port, log_level="warning", demo=False)
        t0 = time.perf_counter()
        self.daemon.start()
        return time.perf_counter() - t0

    def client(self) -> RestClient:
        assert self.daemon is not None
        return RestClient(self.daemon.api_port)

    def grow_to(self, n: int, clients: int = 1) -> float:
        """Add targets (each with a target group on the default portal group) until there are ``n``,
        over ``clients`` parallel REST connections; seconds."""
        d = self.daemon
        assert d is not None
        if self.portal_group is None:
            self.portal_group = d.rest("GET", "portal/")[0]["id"]
        pg = self.portal_group

        def add(c: RestClient, i: int) -> None:
            t = c.call("POST", "target/", {"iscsi_target_name": f"bench{i:05d}"})
            c.call("POST", "targetgroup/", {"iscsi_target": t["id"], "iscsi_target_portalgroup": pg,
                                            "iscsi_target_authtype": "None"})

        secs = in_parallel(clients, list(range(self.targets + 1, n + 1)), add, self.client, RestClient.close)
        self.targets = max(self.targets, n)
        return secs

    def change(self, c: RestClient, i: int) -> None:
        """One step of the configuration storm: a target created, exported, renamed and deleted."""
        t = c.call("POST", "target/", {"iscsi_target_name": f"storm{i:06d}"})
        c.call("POST", "targetgroup/", {"iscsi_target": t["id"], "iscsi_target_portalgroup": self.portal_group,
                                        "iscsi_target_authtype": "None"})
        c.call("PUT", f"target/{t['id']}/", {"iscsi_target_alias": f"storm alias {i}"})
        c.call("DELETE", f"target/{t['id']}/")

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


class TgtdScaling:
    """tgtd with N empty targets bound to ALL; it has no persistent store, so its 'start-up' is tgtd + tgtadm."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.cport = 0
        self.targets = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _adm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", str(self.cport), "--lld", "iscsi", *args], check=True,
                       capture_output=True, timeout=30)

    def start(self) -> float:
        """Start tgtd and re-create the current targets (as tgt-admin does at boot); seconds until ready."""
        n, self.targets = self.targets, 0
        self.cport = free_tgtd_control_port()
        t0 = time.perf_counter()
        log = open(self.workdir / "tgtd-scaling.log", "ab")
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", str(self.cport), "--iscsi", f"portal=127.0.0.1:{self.port}"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        wait_port("127.0.0.1", self.port, timeout=15, alive=lambda: self.proc.poll() is None)
        deadline = time.monotonic() + 10
        while True:
            try:
                self._adm("--mode", "target", "--op", "show")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.grow_to(n)
        return time.perf_counter() - t0

    def grow_to(self, n: int, clients: int = 1) -> float:
        """Add targets bound to ALL until there are ``n``, over ``clients`` parallel tgtadm callers."""
        def add(_c: None, i: int) -> None:
            self._adm("--mode", "target", "--op", "new", "--tid", str(i), "--targetname",
                      f"iqn.2026-11.org.pyscsi-target.bench:t{i:05d}")
            self._adm("--mode", "target", "--op", "bind", "--tid", str(i), "--initiator-address", "ALL")

        secs = in_parallel(clients, list(range(self.targets + 1, n + 1)), add, lambda: None)
        self.targets = max(self.targets, n)
        return secs

    def client(self) -> None:
        return None

    def change(self, _c: None, i: int) -> None:
        """One step of the configuration storm, as pyscsi-target's: new, bind, a parameter, delete."""
        tid = str(STORM_TIDS + i)
        self._adm("--mode", "target", "--op", "new", "--tid", tid, "--targetname",
                  f"iqn.2026-11.org.pyscsi-target.bench:storm{i:06d}")
        self._adm("--mode", "target", "--op", "bind", "--tid", tid, "--initiator-address", "ALL")
        self._adm("--mode", "target", "--op", "update", "--tid", tid, "--name", "MaxRecvDataSegmentLength",
                  "--value", "65536")
        self._adm("--mode", "target", "--op", "delete", "--force", "--tid", tid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # tgtd ignores SIGTERM while targets exist (see tests/support/tgtd.py); nothing to flush here.
        proc.kill()
        proc.wait(timeout=10)
        for suffix in ("", ".lock"):
            try:
                (SOCKET_DIR / f"socket.{self.cport}{suffix}").unlink()
            except FileNotFoundError:
                pass


__all__ = ["System", "start_tgtd", "start_pyscsi", "PyscsiScaling", "TgtdScaling", "RestError", "fill_file",
           "proc_cpu_seconds", "proc_rss_kib", "GiB", "TiB", "wait_port"]
