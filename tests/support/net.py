"""Loopback port helpers shared by the daemon and tgtd fixtures."""

from __future__ import annotations

import random
import socket
import time


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out below the kernel's ephemeral range: bind(0) would pick one from that range,
# where any outgoing connection (a test's REST client, libiscsi, a guest's NAT) may take it as its
# local port before the daemon binds it - which failed a whole module's fixture once
# ("address already in use").  Nothing connects from below the range, so a port free now stays free
# until a server of ours binds it.
_PORT_LOW = 20000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, outside the ephemeral range, not handed out before by
    this process."""
    high = max(_PORT_LOW + 1000, _ephemeral_low()) - 1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(_PORT_LOW, high)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as s:  # the range is crowded: let the kernel pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 30.0, alive=None) -> None:
    """Wait until ``host:port`` accepts TCP; ``alive()`` returning False aborts early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"process exited before {host}:{port} accepted connections")
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
