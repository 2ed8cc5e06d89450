"""Who may open an iSCSI connection now: file descriptors, and connections still in login.

A connection costs a file descriptor and about 32 KiB before it has said who it is.  Left
alone, a flood of connections that never log in takes every descriptor the process has:
new logins fail, and so does the REST API, which shares the process (issue 10).  So:

- **The descriptor limit.**  ``raise_fd_limit`` lifts the soft RLIMIT_NOFILE to the hard one
  at start (a 1024 soft limit is not enough for a thousand LUNs and their sessions).
- **A reserve.**  The portals stop accepting while fewer than ``reserve`` descriptors are
  left (``FdGauge``): what remains is for the REST API, the state database, new LU files
  and the log.  Connections wait in the kernel's listen backlog meanwhile, and are accepted
  as descriptors free up; the API never meets EMFILE because of iSCSI.
- **Connections in login.**  At most ``per_address`` from one source address (more are
  closed at once: a flood from one host only hurts that host), and at most ``in_login`` in
  all (1024, or half the descriptors iSCSI may use); at that limit the oldest connection
  still in login is closed to make room, so a distributed flood churns through its own
  connections while a real login, which takes milliseconds, gets through.  The login
  timeout (30 s) ends the rest.

Every refusal is logged, at most one line per kind and address every 10 s.  The counters are
plain attributes for a metrics exporter.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Hashable

from ..log_limit import LogLimit

log = logging.getLogger(__name__)

DEFAULT_PER_ADDRESS = 64
DEFAULT_IN_LOGIN = 1024
GAUGE_REFRESH = 0.25  # seconds between counts of /proc/self/fd


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # the kernel's default nr_open
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft, soft
        log.info("open-file limit raised from %d to %d", soft, hard)
        return soft, hard
    log.info("open-file limit %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return soft, soft


def fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def default_reserve(limit: int) -> int:
    """Descriptors kept from iSCSI connections: 64, or 1/16 of the limit when that is more."""
    return max(64, limit // 16)


def count_open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:
        return None  # no /proc: the gauge then never refuses


class FdGauge:
    """Open descriptors of this process, counted at most every GAUGE_REFRESH seconds and
    kept up to date in between by the connections the portals accept."""

    def __init__(self, limit: int | None = None, reserve: int | None = None) -> None:
        self.limit = limit if limit is not None else fd_limit()
        self.reserve = reserve if reserve is not None else default_reserve(self.limit)
        self._count: int | None = None
        self._counted_at = -1e9
        self._since = 0  # accepted minus closed since the count

    def room(self) -> int:
        """Descriptors iSCSI may still open before the reserve (large when unknown)."""
        now = time.monotonic()
        if now - self._counted_at >= GAUGE_REFRESH:
            self._count = count_open_fds()
            self._counted_at = now
            self._since = 0
        if self._count is None:
            return 1 << 30
        return self.limit - self.reserve - self.in_use

    @property
    def in_use(self) -> int:
        """Descriptors open, as last counted plus those opened since (0 when unknown)."""
        return (self._count or 0) + self._since

    def opened(self) -> None:
        self._since += 1

    def closed(self) -> None:
        self._since -= 1


class Admission:
    """Connection admission for every portal of the engine (see the module docstring)."""

    def __init__(self, *, per_address: int = DEFAULT_PER_ADDRESS, in_login: int | None = None,
                 gauge: FdGauge | None = None) -> None:
        self.gauge = g = gauge if gauge is not None else FdGauge()
        self.per_address = per_address
        if in_login is None:  # at most half the descriptors iSCSI may use: logged-in sessions keep the rest
            in_login = min(DEFAULT_IN_LOGIN, max(16, (g.limit - g.reserve) // 2))
        self.in_login_limit = in_login
        self._in_login: dict[Hashable, str] = {}  # connection -> peer address, oldest first
        self._by_address: dict[str, int] = {}
        self._log = LogLimit(10.0)
        # Counters (plain attributes, for /metrics).
        self.refused_per_address = 0  # closed at once: too many in login from that address
        self.evicted = 0  # oldest connections in login closed to make room
        self.accept_paused = 0  # times the portals stopped accepting for the descriptor reserve
        self.accept_errors = 0  # EMFILE / ENFILE and the like from accept()

    @property
    def in_login(self) -> int:
        return len(self._in_login)

    def may_accept(self) -> bool:
        """Whether the portals may accept one more connection (the descriptor reserve)."""
        if self.gauge.room() > 0:
            return True
        self.accept_paused += 1
        g = self.gauge
        self._log.log(log, logging.WARNING, "fd", "%d of %d file descriptors in use: new iSCSI connections wait in "
                      "the listen backlog (the last %d are kept for the API and the LUs)", g.in_use, g.limit, g.reserve)
        return False

    def accepted(self) -> None:
        """A portal accepted a connection: one descriptor more (``closed`` gives it back)."""
        self.gauge.opened()

    def accept_failed(self, exc: OSError) -> None:
        self.accept_errors += 1
        self._log.log(log, logging.WARNING, "accept", "accepting iSCSI connections failed: %s; retrying", exc)

    def admit(self, conn: Hashable, peer_ip: str) -> Hashable | None | bool:
        """A new connection (accepted, not logged in).  False: refuse it (its address has too
        many in login).  Otherwise None, or the oldest connection in login, which the caller
        closes to make room."""
        n = self._by_address.get(peer_ip, 0)
        if n >= self.per_address:
            self.refused_per_address += 1
            self._log.log(log, logging.WARNING, ("address", peer_ip), "%s: %d connections still in login from this "
                          "address: new ones are closed", peer_ip, n)
            return False
        victim: Hashable | None = None
        if len(self._in_login) >= self.in_login_limit:
            victim = next(iter(self._in_login))
            self.evicted += 1
            self._log.log(log, logging.WARNING, "global", "%d connections still in login: closing the oldest, from %s",
                          len(self._in_login), self._in_login[victim])
            self.login_over(victim)
        self._in_login[conn] = peer_ip
        self._by_address[peer_ip] = n + 1
        return victim

    def login_over(self, conn: Hashable) -> None:
        """The connection left the login phase (full feature phase, or gone)."""
        peer_ip = self._in_login.pop(conn, None)
        if peer_ip is None:
            return
        n = self._by_address.get(peer_ip, 0) - 1
        if n > 0:
            self._by_address[peer_ip] = n
        else:
            self._by_address.pop(peer_ip, None)

    def closed(self, conn: Hashable) -> None:
        """The connection is gone (its descriptor is free)."""
        self.login_over(conn)
        self.gauge.closed()
