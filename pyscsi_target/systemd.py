"""The systemd service protocol: sd_notify readiness, status, stopping and the watchdog.

systemd's ``Type=notify`` hands the service ``NOTIFY_SOCKET``, a datagram socket (a path,
or an abstract name written with a leading ``@``), and ``WATCHDOG_USEC`` when the unit
sets ``WatchdogSec=``.  A message is newline-separated ``KEY=value`` assignments
(sd_notify(3)).  Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing, so the
daemon calls these unconditionally.

The watchdog is fed from the event loop itself: a keep-alive that stops when the loop
stalls is the point, so systemd restarts a daemon whose loop is wedged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify over ``NOTIFY_SOCKET``; a no-op when the daemon does not run under systemd."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address: str | bytes | None = None
        if address:
            # "@name" is a Linux abstract socket: the name starts with a NUL byte.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        usec = 0
        # WATCHDOG_PID, when set, names the process the watchdog is meant for (sd_watchdog_enabled).
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            with contextlib.suppress(ValueError):
                usec = max(0, int(env.get("WATCHDOG_USEC", "0")))
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines (keyword names upper-cased: ``status=...`` -> ``STATUS=...``)."""
        if self.address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # systemd gone or the socket unreachable: the daemon serves on regardless.
            log.debug("sd_notify %r failed: %s", message[:60], exc)

    def status(self, text: str) -> None:
        self.notify(status=text)

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def stopping(self, status: str) -> None:
        self.notify(stopping=1, status=status)

    def start_watchdog(self) -> None:
        """Send WATCHDOG=1 at half the period systemd asked for, from the event loop."""
        if self.address is None or self.watchdog_usec <= 0 or self._watchdog is not None:
            return
        self._watchdog = asyncio.get_running_loop().create_task(self._feed(self.watchdog_usec / 2e6))

    async def _feed(self, interval: float) -> None:
        while True:
            self.notify(watchdog=1)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
