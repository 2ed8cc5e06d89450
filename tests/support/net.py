"""Loopback port helpers shared by the daemon and tgtd fixtures."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A currently unused TCP port on ``host`` (the kernel picks; racy but fine on loopback)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
