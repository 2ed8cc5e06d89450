"""How a guest reaches the targets under test: two network modes.

``UserNetwork``: qemu's user-mode (slirp) network with ``restrict=on``.  The guest reaches nothing
but the target portals given, each on host loopback and forwarded to its own guest-side address
(10.0.2.100, .101, ... with the portal's port).  qemu runs ``forwarder.py`` for every connection the
guest opens, so a target that is restarted on the same port is reachable again at once.  Slirp
moves 25-50 MiB/s under TCG.

``TapNetwork``: a network namespace created for the run, with a tap device the guest's virtio-net
attaches to.  The targets run inside the namespace (``entered()``, or ``command_prefix()`` for a
process) and listen on addresses of their own (10.231.0.1, .2, ...); the guest is 10.231.0.100.
Nothing else is reachable from either side, and the namespace is removed on exit.  This is the
realistic path: no user-space TCP stack between initiator and target.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

NICS = ("e1000", "virtio-net-pci")
NIC_MODULES = {"e1000": "e1000", "virtio-net-pci": "virtio_net"}  # the guest driver of each qemu NIC
FORWARDER = Path(__file__).with_name("forwarder.py")
_CLONE_NEWNET = 0x40000000
_names = itertools.count(1)


def parse_portal(portal: str | tuple[str, int]) -> tuple[str, int]:
    """``"ADDRESS:PORT"`` or ``(address, port)`` with an IPv4 address -> ``(address, port)``."""
    if isinstance(portal, tuple):
        host, port = portal
    else:
        host, sep, port_text = portal.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"portal must be ADDRESS:PORT, got {portal!r}")
        port = int(port_text)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"portal address must be IPv4, got {host!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"portal port must be 1-65535, got {port}")
    return host, port


def _check_nic(nic: str) -> str:
    if nic not in NICS:
        raise ValueError(f"nic must be one of {NICS}, got {nic!r}")
    return nic


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")  # a comma inside a qemu option value is written twice


class GuestNetwork:
    """What the VM runner needs from a network mode."""

    guest_address: str  # the guest's eth0, ADDRESS/PREFIX
    nic: str

    def qemu_args(self, run_dir: Path) -> list[str]:
        raise NotImplementedError

    def command_prefix(self) -> list[str]:
        """Prepended to the qemu command line (e.g. to run it inside a namespace)."""
        return []


class UserNetwork(GuestNetwork):
    """Slirp with every target portal (on host loopback) forwarded to 10.0.2.(100+i):PORT."""

    guest_address = "10.0.2.15/24"
    FIRST_FORWARD = 100

    def __init__(self, portals: Sequence[str | tuple[str, int]], *, nic: str = "e1000") -> None:
        # e1000 by default: virtio-net's mergeable receive buffers make slirp stall TCP for 5 s at a time.
        self.nic = _check_nic(nic)
        self.portals = [parse_portal(p) for p in portals]
        if not 1 <= len(self.portals) <= 100:
            raise ValueError("user-mode networking forwards 1 to 100 portals")
        for host, _ in self.portals:
            if not ipaddress.IPv4Address(host).is_loopback:
                raise ValueError(f"user-mode networking forwards host loopback portals only, got {host}")
        if len(set(self.portals)) != len(self.portals):
            raise ValueError(f"portals must be distinct: {self.portals}")

    def guest_portal(self, index: int = 0) -> str:
        """How the guest reaches portal ``index``: ADDRESS:PORT."""
        return f"10.0.2.{self.FIRST_FORWARD + index}:{self.portals[index][1]}"

    @property
    def guest_portals(self) -> list[str]:
        return [self.guest_portal(i) for i in range(len(self.portals))]

    def qemu_args(self, run_dir: Path) -> list[str]:
        forwards = []
        for i, (host, port) in enumerate(self.portals):
            # -I -S: the relay needs no site-packages and must not depend on PYTHON* variables.
            cmd = shlex.join([sys.executable, "-I", "-S", str(FORWARDER), host, str(port),
                              str(run_dir / "forwarder.log")])
            forwards.append(f"guestfwd=tcp:{self.guest_portal(i)}-cmd:{_qemu_escape(cmd)}")
        netdev = ",".join(["user", "id=n0", "ipv6=off", "restrict=on", "net=10.0.2.0/24", *forwards])
        return ["-netdev", netdev, "-device", f"{self.nic},netdev=n0,romfile="]


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class TapNetwork(GuestNetwork):
    """A private network namespace: ``tap0`` with the target addresses, the guest at 10.231.0.100."""

    PREFIX = "10.231.0"
    guest_address = f"{PREFIX}.100/24"

    def __init__(self, targets: int = 1, *, nic: str = "virtio-net-pci") -> None:
        if not 1 <= targets <= 50:
            raise ValueError("a tap network has 1 to 50 target addresses")
        self.nic = _check_nic(nic)
        self.target_addresses = [f"{self.PREFIX}.{i}" for i in range(1, targets + 1)]
        self.name = f"pyscsi-guest-{os.getpid()}-{next(_names)}"
        self.created = False

    @property
    def target_address(self) -> str:
        return self.target_addresses[0]

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {r.stderr.strip()}")

    @staticmethod
    def remove_stale() -> list[str]:
        """Remove the namespaces of test processes that died before removing theirs; returns their names."""
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        stale = [m.group(0) for m in re.finditer(r"(?m)^pyscsi-guest-(\d+)-\d+", out)
                 if not os.path.exists(f"/proc/{m.group(1)}")]
        for name in stale:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return stale

    def create(self) -> TapNetwork:
        self.remove_stale()
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip netns add {self.name}: {r.stderr.strip()} (tap mode needs root)")
        self.created = True
        try:
            self._ip("link", "set", "lo", "up")
            self._ip("tuntap", "add", "dev", "tap0", "mode", "tap")
            for address in self.target_addresses:
                self._ip("addr", "add", f"{address}/24", "dev", "tap0")
            self._ip("link", "set", "tap0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False

    def __enter__(self) -> TapNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread inside the namespace: processes it starts (a target daemon) and
        sockets it opens (REST calls to that daemon's API on the namespace's 127.0.0.1) live there."""
        if not self.created:
            raise RuntimeError("the namespace does not exist: use `with TapNetwork() as net`")
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.name}") as ns:
            _setns(ns.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def command_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def guest_portal(self, port: int, index: int = 0) -> str:
        """How the guest reaches the target listening on address ``index`` and ``port``."""
        return f"{self.target_addresses[index]}:{port}"

    def qemu_args(self, run_dir: Path) -> list[str]:
        return ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device", f"{self.nic},netdev=n0,romfile="]
