"""Back-off for failed API logins, per source address (issue 10: password guessing).

Each address may fail ``FREE_FAILURES`` times; after that every further failure closes it
for an exponentially growing time (1 s, 2 s, 4 s ... at most ``MAX_BLOCK``), during which
its requests get 429 with Retry-After *before* the credentials are looked at - so a
guesser gets about one try a minute instead of thousands a second, while an administrator
who mistyped a few times is not slowed.  A success clears the address; failures are
forgotten ``FORGET_AFTER`` seconds after the last one.  The table is bounded (the oldest
entries go), so addresses that vary cannot grow it without end.

The address is the TCP peer: a reverse proxy in front of the API makes all its clients
one address, and its own limits apply there (X-Forwarded-For is not trusted).

Counters for metrics are plain attributes: ``failures`` (401s answered), ``throttled``
(429s answered), ``blocked_now()`` (addresses closed at this moment).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 5
MAX_BLOCK = 60.0
FORGET_AFTER = 900.0
MAX_ADDRESSES = 8192


@dataclass
class _Record:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class AuthThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._peers: OrderedDict[str, _Record] = OrderedDict()
        self.failures = 0  # failed authentications answered with 401
        self.throttled = 0  # requests answered with 429 while their address was closed

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: it may now).  Counts a throttled request."""
        rec = self._peers.get(peer)
        if rec is None:
            return 0.0
        wait = rec.blocked_until - self.clock()
        if wait <= 0:
            return 0.0
        self.throttled += 1
        return wait

    def failed(self, peer: str) -> int:
        """Record a failure of ``peer``; returns its failures in a row."""
        now = self.clock()
        self.failures += 1
        rec = self._peers.get(peer)
        if rec is None or now - rec.last > FORGET_AFTER:
            rec = _Record()
        rec.failures += 1
        rec.last = now
        if rec.failures > FREE_FAILURES:
            rec.blocked_until = now + min(MAX_BLOCK, 2.0 ** (rec.failures - FREE_FAILURES - 1))
        self._peers[peer] = rec
        self._peers.move_to_end(peer)
        while len(self._peers) > MAX_ADDRESSES:
            self._peers.popitem(last=False)
        return rec.failures

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def blocked_now(self) -> int:
        now = self.clock()
        return sum(1 for rec in self._peers.values() if rec.blocked_until > now)
