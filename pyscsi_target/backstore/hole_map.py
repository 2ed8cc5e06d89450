"""Which byte ranges of a file backstore are known to read as zeroes, so that reads of them
are answered without a syscall.

Why: a read of a never-written range of a sparse file makes the kernel allocate, zero and
insert a page-cache page, on the event-loop thread (RWF_NOWAIT reads of holes succeed).  On a
1 TiB sparse LUN nearly every random read does that, which ran it at 0.38 of the same load on
a 1 GiB LUN.

The map may forget a hole (the range is then read from the file, as without a map) but must
never claim one that holds data: that would return zeroes for real data.  So:

* it starts from SEEK_DATA/SEEK_HOLE at open (everything the file holds, page cache included);
* a write removes its range *before* its data is handed to the kernel, so once a write has
  completed no read can see the range as a hole; every write path of the backstore calls
  ``written`` (the loop's inline writes, the writer thread, COMPARE AND WRITE, EXTENDED COPY);
* a deallocation (punch, zero range) adds its range only *after* it succeeded, and only if no
  write touched the range meanwhile (``zeroing`` registers it first: a racing write marks it);
* a range the backstore did not create itself (a file grown by someone else) is never added;
* at most ``max_ranges`` holes are kept: a hole that would need more is dropped (forgotten).

Nothing else may write the file while the backstore has it open (as for any target's backing
store): such writes would not be seen.

Thread-safe: the loop reads it, the writer and worker threads write through it.
"""

from __future__ import annotations

import errno
import os
import threading
from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager

#: Holes kept per file: ~100 bytes each, so at most a few MiB for a badly fragmented file.
MAX_HOLES = 1 << 16


class _Zeroing:
    """A deallocation in progress: a write overlapping it clears ``valid``."""

    __slots__ = ("end", "start", "valid")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.valid = True


class HoleMap:
    """Disjoint, sorted ranges [start, end) that read as zeroes."""

    def __init__(self, max_ranges: int = MAX_HOLES) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.max_ranges = max_ranges
        self._zeroing: list[_Zeroing] = []
        self._lock = threading.Lock()

    @classmethod
    def scan(cls, fd: int, size: int, max_ranges: int = MAX_HOLES) -> HoleMap:
        """The holes of ``fd`` in [0, size) as SEEK_HOLE/SEEK_DATA report them (a file system
        without them reports one data run: no holes, every read goes to the file)."""
        m = cls(max_ranges)
        pos = 0
        while pos < size and len(m.starts) < max_ranges:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENXIO):  # no SEEK_HOLE, or past EOF
                    break
                raise
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after the hole, it runs to the end
                    raise
                data = size
            end = min(data, size)
            m.starts.append(hole)
            m.ends.append(end)
            pos = end
        return m

    def __len__(self) -> int:
        return len(self.starts)

    def ranges(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(zip(self.starts, self.ends, strict=True))

    def covers(self, start: int, end: int) -> bool:
        """Every byte of [start, end) is known to read as zero."""
        if not self.starts:  # a fully allocated file: no lock needed to say no
            return False
        with self._lock:
            i = bisect_right(self.starts, start) - 1
            return i >= 0 and self.ends[i] >= end

    def written(self, start: int, end: int) -> None:
        """[start, end) is about to receive data: it is no hole any more.  Call it before the
        data reaches the kernel."""
        if end <= start:
            return
        with self._lock:
            for z in self._zeroing:
                if z.start < end and start < z.end:
                    z.valid = False
            starts, ends = self.starts, self.ends
            i = bisect_right(ends, start)  # first hole ending after start
            if i == len(starts) or starts[i] >= end:
                return  # no hole overlaps: the common case of rewriting data
            j = i
            while j < len(starts) and starts[j] < end:
                j += 1
            keep_s: list[int] = []
            keep_e: list[int] = []
            if starts[i] < start:
                keep_s.append(starts[i])
                keep_e.append(start)
            if ends[j - 1] > end:
                keep_s.append(end)
                keep_e.append(ends[j - 1])
            if len(starts) - (j - i) + len(keep_s) > self.max_ranges:
                keep_s, keep_e = keep_s[:1], keep_e[:1]  # at the limit: forget the rest of the hole
            starts[i:j] = keep_s
            ends[i:j] = keep_e

    def add(self, start: int, end: int) -> None:
        """[start, end) reads as zero now (the backstore itself made it so)."""
        if end <= start:
            return
        with self._lock:
            self._add(start, end)

    def _add(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect_right(ends, start - 1)  # first hole ending at or after start: touching ones merge
        j = i
        while j < len(starts) and starts[j] <= end:
            j += 1
        if i == j and len(starts) >= self.max_ranges:
            return
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]

    @contextmanager
    def zeroing(self, start: int, end: int) -> Iterator[None]:
        """Deallocate or zero [start, end) inside the block: on success, and if no write
        touched the range meanwhile, the range becomes a hole."""
        z = _Zeroing(start, end)
        with self._lock:
            self._zeroing.append(z)
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._zeroing.remove(z)
                if ok and z.valid and end > start:
                    self._add(start, end)
