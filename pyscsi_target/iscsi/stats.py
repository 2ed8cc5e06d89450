"""Counters the transport keeps for observability: plain integers, read at scrape time.

Per LUN of a target (``IoStats``): commands, bytes and errors by direction, and latency
(from the receive batch that brought the SCSI Command PDU to its status going out) in a
fixed histogram of power-of-two buckets.  Updating one costs a few integer additions and
one clock read per command, far less than a metrics library's locked counter; the metrics
collector turns them into Prometheus histograms when scraped.

Per session (``SessionCounters``): the rare events (Rejects by reason, digest errors,
task management functions by function, NOP-Outs, Text requests, Async Messages).  The
session registry adds a finished session's counters to its running totals, so daemon-wide
counts never go backwards when sessions end.
"""

from __future__ import annotations

import time

# A latency of ns nanoseconds is counted in slot (ns >> 10).bit_length(): slot i holds
# latencies below 2**(i + 10) ns (1.024 us << i).  The list is long enough for any 64-bit
# count, so the hot path needs no bounds check; ``buckets`` folds the slots into the
# exported histogram, whose last finite bound is 2**(EXPORTED + 9) ns (~17 s).
SLOTS = 55
EXPORTED = 25
clock_ns = time.monotonic_ns


def bucket_bounds_seconds() -> list[float]:
    """The upper bound of each exported bucket (the last, +Inf, excluded), in seconds."""
    return [(1 << (i + 10)) / 1e9 for i in range(EXPORTED)]


def latency_slot(ns: int) -> int:
    return (ns >> 10).bit_length()


class OpStats:
    """One direction (read, write or other) of one LUN.  The number of commands is the sum
    of the histogram (one addition less per command)."""

    __slots__ = ("bytes", "errors", "latency_ns", "hist")

    def __init__(self) -> None:
        self.bytes = 0
        self.errors = 0  # completed with a status other than GOOD
        self.latency_ns = 0  # sum, for the histogram's _sum
        self.hist = [0] * SLOTS  # per slot (not cumulative)

    @property
    def ops(self) -> int:
        return sum(self.hist)

    def buckets(self) -> list[int]:
        """Cumulative counts of the exported buckets, the last being +Inf (= ``ops``)."""
        out, total = [], 0
        for n in self.hist[:EXPORTED]:
            total += n
            out.append(total)
        out.append(total + sum(self.hist[EXPORTED:]))
        return out

    def add(self, other: OpStats) -> None:
        self.bytes += other.bytes
        self.errors += other.errors
        self.latency_ns += other.latency_ns
        for i, n in enumerate(other.hist):
            self.hist[i] += n


class IoStats:
    """The I/O of one LUN of one target, as the transport saw it complete."""

    __slots__ = ("read", "write", "other")

    def __init__(self) -> None:
        self.read = OpStats()
        self.write = OpStats()
        self.other = OpStats()

    def ops(self) -> tuple[tuple[str, OpStats], ...]:
        return (("read", self.read), ("write", self.write), ("other", self.other))


class SessionCounters:
    """A session's rare events, by kind."""

    __slots__ = ("rejects", "digest_errors", "tmfs", "nop_outs", "texts", "async_messages", "violations")

    def __init__(self) -> None:
        self.rejects: dict[int, int] = {}  # Reject reason code -> count
        self.digest_errors: dict[str, int] = {}  # "header" / "data" -> count
        self.tmfs: dict[int, int] = {}  # TMF function code -> count
        self.nop_outs = 0
        self.texts = 0
        self.async_messages: dict[int, int] = {}  # AsyncEvent code -> count
        self.violations = 0

    def add(self, other: SessionCounters) -> None:
        for mine, theirs in ((self.rejects, other.rejects), (self.tmfs, other.tmfs),
                             (self.async_messages, other.async_messages)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        for k2, n in other.digest_errors.items():
            self.digest_errors[k2] = self.digest_errors.get(k2, 0) + n
        self.nop_outs += other.nop_outs
        self.texts += other.texts
        self.violations += other.violations

    def count(self, table: dict[int, int], key: int) -> None:
        table[key] = table.get(key, 0) + 1
