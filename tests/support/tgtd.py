"""Start and stop a private Debian tgtd (the C reference target) on loopback.

Used by the interop harness validation and by bench/ for A/B runs.  Each instance gets
its own control port (tgtd names its management unix socket /var/run/tgtd/socket.<N>
after it) and its own iSCSI portal, so it never collides with a system tgtd or another
test.  Verified commands (tgt 1.0.85, Debian bookworm)::

    tgtd -f -C 7777 --iscsi portal=127.0.0.1:3270
    tgtadm -C 7777 --lld iscsi --mode target --op new --tid 1 --targetname IQN
    tgtadm -C 7777 --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store FILE [--blocksize 4096]
    tgtadm -C 7777 --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
    tgtadm -C 7777 --lld iscsi --mode account --op new --user U --password P
    tgtadm -C 7777 --lld iscsi --mode account --op bind --tid 1 --user U [--outgoing]
    tgtadm -C 7777 --lld iscsi --mode target --op update --tid 1 --name HeaderDigest --value None,CRC32C

tgt's default HeaderDigest/DataDigest is None only, so a digest-requiring initiator is
refused unless the target parameters are updated as above.  tgt exports a controller
LUN 0 of its own; file LUNs start at 1.  tgtd ignores SIGTERM: stop() deletes the target, then
``tgtadm -C N --mode system --op delete`` (tgtd exits 0), and falls back to SIGKILL.

Usage::

    with Tgtd([Lun(1, path)], port=free_port(), chap=("u", "secret12345")) as t:
        ... iscsi://127.0.0.1:{t.port}/{t.iqn}/1 ...
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .net import free_port, wait_port

TGTD = shutil.which("tgtd") or "/usr/sbin/tgtd"
TGTADM = shutil.which("tgtadm") or "/usr/sbin/tgtadm"
SOCKET_DIR = Path("/var/run/tgtd")


def available() -> bool:
    return os.path.exists(TGTD) and os.path.exists(TGTADM)


@dataclass
class Lun:
    lun: int
    path: Path | str  # a file, or pool/image with bstype "rbd" (Debian's tgt-rbd)
    block_size: int | None = None  # tgt default 512
    bstype: str | None = None  # tgt's backing store type (default rdwr: a file)
    bsopts: str | None = None  # e.g. "conf=/etc/ceph/ceph.conf;id=admin" for rbd


class TgtdError(RuntimeError):
    pass


class Tgtd:
    """A tgtd process with one target; context manager that always cleans up."""

    def __init__(
        self,
        luns: list[Lun],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        control_port: int | None = None,
        iqn: str = "iqn.2026-11.org.pyscsi-target.test:tgtd",
        chap: tuple[str, str] | None = None,
        mutual_chap: tuple[str, str] | None = None,
        digests: bool = True,
        initiator_address: str = "ALL",
        log_path: Path | str | None = None,
    ) -> None:
        self.luns = luns
        self.host = host
        self.port = port or free_port(host)
        self.control_port = control_port or self._free_control_port()
        self.iqn = iqn
        self.chap = chap
        self.mutual_chap = mutual_chap
        self.digests = digests
        self.initiator_address = initiator_address
        self._own_log_dir = None if log_path else tempfile.mkdtemp(prefix="tgtd-")
        self.log_path = Path(log_path) if log_path else Path(self._own_log_dir) / "tgtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _free_control_port() -> int:
        # The "port" only names the unix socket (tgtd accepts 0..32767); pick one no live tgtd uses.
        for _ in range(1000):
            n = random.randint(20000, 32767)
            if not (SOCKET_DIR / f"socket.{n}").exists():
                return n
        raise TgtdError("no free tgtd control port")

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, lun: int = 1) -> str:
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{lun}"

    def adm(self, *args: str) -> str:
        cmd = [TGTADM, "-C", str(self.control_port), "--lld", "iscsi", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise TgtdError(f"{' '.join(cmd)} -> rc={r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def start(self) -> Tgtd:
        if not available():
            raise TgtdError("tgtd/tgtadm not installed (Debian package tgt)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [TGTD, "-f", "-C", str(self.control_port), "--iscsi", f"portal={self.host}:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_port(self.host, self.port, timeout=15, alive=lambda: self.proc.poll() is None)
            self._wait_control()
            self._configure()
        except BaseException as e:
            tail = self.log_tail()
            self.stop()
            if isinstance(e, Exception):
                raise TgtdError(f"tgtd failed to start: {e}; log tail:\n{tail}") from e
            raise
        return self

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_control(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.adm("--mode", "target", "--op", "show")
                return
            except TgtdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _configure(self) -> None:
        self.adm("--mode", "target", "--op", "new", "--tid", "1", "--targetname", self.iqn)
        for lun in self.luns:
            args = ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", str(lun.lun),
                    "--backing-store", str(lun.path)]
            if lun.block_size:
                args += ["--blocksize", str(lun.block_size)]
            if lun.bstype:
                args += ["--bstype", lun.bstype]
            if lun.bsopts:
                args += ["--bsopts", lun.bsopts]
            self.adm(*args)
        self.adm("--mode", "target", "--op", "bind", "--tid", "1", "--initiator-address", self.initiator_address)
        if self.digests:
            for name in ("HeaderDigest", "DataDigest"):
                self.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", name, "--value", "None,CRC32C")
        for cred, outgoing in ((self.chap, False), (self.mutual_chap, True)):
            if cred is None:
                continue
            user, secret = cred
            self.adm("--mode", "account", "--op", "new", "--user", user, "--password", secret)
            bind = ["--mode", "account", "--op", "bind", "--tid", "1", "--user", user]
            self.adm(*bind, *(["--outgoing"] if outgoing else []))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # tgtd ignores SIGTERM; its clean exit is "delete system", allowed once no target is left.
            for args in (("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", "1"),
                         ("--mode", "system", "--op", "delete")):
                try:
                    subprocess.run([TGTADM, "-C", str(self.control_port), *args], capture_output=True, timeout=10)
                except subprocess.TimeoutExpired:
                    break
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for suffix in ("", ".lock"):
            try:
                (SOCKET_DIR / f"socket.{self.control_port}{suffix}").unlink()
            except FileNotFoundError:
                pass
        if self._own_log_dir:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    def __enter__(self) -> Tgtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
