"""Relay one guest connection to a target portal on host loopback (run by qemu's guestfwd).

Usage: forwarder.py HOST PORT LOG.  qemu starts it for every TCP connection the guest opens to a
forwarded address, with that connection as fd 0 and 1 (and 2).  Nothing may be written to those but
the relayed bytes, so diagnostics go to LOG.  A target that refuses or resets the connection resets
the guest's too, as a direct connection would: the initiator sees a failed connect, not a hang.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

_RESET = b"\1\0\0\0\0\0\0\0"  # SO_LINGER on, 0 s: close() sends RST


def _reset(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            s.close()
        except OSError:
            pass


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            # qemu writes its end with Nagle on: acknowledge at once so it never waits for a delayed ACK.
            src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(view[:n])
    except OSError as e:
        print(f"forwarder: {e}", file=sys.stderr)
        _reset(src, dst)
        os._exit(0)


def main() -> None:
    host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    guest = socket.socket(fileno=os.dup(0))
    os.dup2(2, 0)
    os.dup2(2, 1)
    try:
        target = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"forwarder: connect {host}:{port}: {e}", file=sys.stderr)
        _reset(guest)
        os._exit(1)
    target.settimeout(None)
    for s in (guest, target):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(target, guest), daemon=True)
    back.start()
    _pump(guest, target)
    back.join(30)
    os._exit(0)


if __name__ == "__main__":
    main()
