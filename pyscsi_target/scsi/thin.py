"""Thin provisioning space: the soft threshold and what a full backing store answers.

The threshold follows FreeNAS's extent ``avail_threshold``: "when the specified percentage
of free space is reached" - it is reached when the space the LU can still allocate falls to
N % of its capacity or below.  What the LU can still allocate is SBC-3's available LBA
mapping resources, as the Logical Block Provisioning log page reports them: the capacity
not yet allocated, capped by what the filesystem underneath can still give (another file
on it may use the space first).

Measuring costs two system calls (fstat, fstatvfs), so it is not done per WRITE: after a
sample, the LU's own writes can allocate at most the bytes they carry, so the next sample
is due only once the headroom to the threshold has been written, or after ``SAMPLE_PERIOD``
seconds for the space others take from the same filesystem.  A full filesystem (ENOSPC)
always samples, so the unit attention comes before the first SPACE ALLOCATION FAILED.
"""

from __future__ import annotations

from time import monotonic

#: Seconds between samples while the LU's own writes are far from the threshold.
SAMPLE_PERIOD = 1.0
#: Fewest bytes between two samples near the threshold (a soft threshold: a write or two
#: past it is fine; a sample per 4 KiB write is not), or 1/64 of a small LU's capacity.
MIN_BUDGET = 1 << 20
_NEVER = 1 << 62


def available(capacity: int, allocated: int, free: int | None) -> int:
    """Bytes the LU can still allocate: its unallocated capacity, capped by the free space
    of the storage under it when that is known."""
    remaining = max(0, capacity - allocated)
    return remaining if free is None else min(remaining, max(0, free))


def reached(capacity: int, allocated: int, free: int | None, percent: int) -> bool:
    """True when what can still be allocated is at most ``percent`` % of ``capacity``."""
    return capacity > 0 and available(capacity, allocated, free) * 100 <= capacity * percent


class SoftThreshold:
    """When to sample the allocation and whether the unit attention is due.

    ``armed`` is True until a crossing is reported, and again once a sample finds the
    LU back above the threshold (UNMAP, or space freed on the filesystem)."""

    __slots__ = ("armed", "budget", "deadline")

    def __init__(self) -> None:
        self.armed = True
        self.budget = 0  # bytes the LU may write before the next sample
        self.deadline = 0.0  # monotonic() of the next sample

    def due(self, nbytes: int) -> bool:
        """Account a write of ``nbytes``; True when a sample is due."""
        self.budget -= nbytes
        return self.budget <= 0 or monotonic() >= self.deadline

    def sample(self, capacity: int, allocated: int, free: int | None, percent: int, pending: int = 0) -> bool:
        """Take a measurement; True when it is a new crossing (the UA is to be sent).
        ``pending``: bytes of the write that asked for the sample, not yet on the storage."""
        self.deadline = monotonic() + SAMPLE_PERIOD
        if reached(capacity, allocated, free, percent):
            self.budget = _NEVER  # only a re-arm is left to see: the deadline finds it
            if self.armed:
                self.armed = False
                return True
            return False
        self.armed = True
        headroom = available(capacity, allocated, free) - capacity * percent // 100
        self.budget = max(min(MIN_BUDGET, capacity >> 6), headroom) - pending
        return False
