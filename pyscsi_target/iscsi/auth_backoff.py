"""Backoff after failed CHAP logins, per initiator name and per source address (sans-IO).

Without it an initiator could test about a thousand secrets a second over one connection
after another (issue 10).  After ``free`` failures of a key (an address, or an initiator
name), CHAP responses under that key are not evaluated for a while: the login is answered
0x0201 (authentication failure) at once, exactly as a wrong secret is, so the initiator
cannot tell a throttled try from a wrong one and learns nothing from it.  The pause doubles
with each further failure, from ``base`` up to ``cap`` seconds.  A success forgets the
initiator name's failures; an address's are only forgotten ``forget`` seconds after its last
failure (else a host holding one valid credential could reset its address between guesses).

Why answer at once rather than delay the answer: a delayed answer still evaluates the
guess, and an attacker running many connections in parallel gets as many guesses per
delay; unevaluated refusals bound the guesses per key whatever the parallelism, and free
the connection at once.  Both keys are needed: the address stops one host trying many
names, the name stops many hosts trying one name.  The price is that a flood of failures
under a legitimate initiator's name or address delays that initiator's own login by at
most ``cap`` seconds.

The counters are plain attributes for a metrics exporter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

Key = tuple[str, str]

DEFAULT_FREE = 3
DEFAULT_BASE = 1.0
DEFAULT_CAP = 60.0
DEFAULT_FORGET = 900.0
MAX_KEYS = 16384  # the oldest keys are forgotten beyond this (an attacker cannot grow it without bound)


def login_keys(initiator_name: str, peer_ip: str) -> tuple[Key, ...]:
    """The keys a login is throttled under: its source address and its initiator name."""
    keys: list[Key] = [("name", initiator_name.lower())]
    if peer_ip:
        keys.append(("address", peer_ip))
    return tuple(keys)


class _Entry:
    __slots__ = ("failures", "until", "last")

    def __init__(self) -> None:
        self.failures = 0
        self.until = 0.0  # no evaluation before this time
        self.last = 0.0  # time of the last failure


class AuthBackoff:
    def __init__(self, *, free: int = DEFAULT_FREE, base: float = DEFAULT_BASE, cap: float = DEFAULT_CAP,
                 forget: float = DEFAULT_FORGET, clock: Callable[[], float] = time.monotonic) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.forget = forget
        self.clock = clock
        self._entries: dict[Key, _Entry] = {}
        # Counters (plain attributes, for /metrics).
        self.failures = 0  # CHAP responses evaluated and refused
        self.throttled = 0  # CHAP responses refused without evaluation (backing off)
        self.successes = 0  # CHAP logins that authenticated

    def wait(self, keys: Iterable[Key]) -> float:
        """Seconds before a CHAP response under ``keys`` may be evaluated (0: now)."""
        now = self.clock()
        longest = 0.0
        for key in keys:
            e = self._entries.get(key)
            if e is None:
                continue
            if now - e.last > self.forget:
                del self._entries[key]
                continue
            longest = max(longest, e.until - now)
        return longest

    def refused(self) -> None:
        """A response was refused unevaluated (counted only)."""
        self.throttled += 1

    def failed(self, keys: Iterable[Key]) -> float:
        """A response did not verify; returns the pause now in force (seconds)."""
        self.failures += 1
        now = self.clock()
        pause = 0.0
        for key in keys:
            e = self._entries.pop(key, None)
            if e is None or now - e.last > self.forget:
                e = _Entry()
            self._entries[key] = e  # most recent last: the oldest are forgotten first
            e.failures += 1
            e.last = now
            extra = e.failures - self.free
            if extra > 0:
                e.until = now + min(self.cap, self.base * (1 << min(extra - 1, 30)))
            pause = max(pause, e.until - now)
        while len(self._entries) > MAX_KEYS:
            del self._entries[next(iter(self._entries))]
        return pause

    def succeeded(self, keys: Iterable[Key]) -> None:
        """The initiator authenticated: its name starts afresh (its address does not)."""
        self.successes += 1
        for key in keys:
            if key[0] == "name":
                self._entries.pop(key, None)

    def failures_of(self, key: Key) -> int:
        e = self._entries.get(key)
        return e.failures if e is not None else 0
