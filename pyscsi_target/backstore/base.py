"""The backstore interface: byte-addressed storage under one logical unit.

Every method here is synchronous and may block; the SCSI layer decides where to call
it (inline on the event loop for page-cache hits, else in the default thread pool).
Offsets and lengths are bytes; the SCSI layer only ever passes block-aligned values.
"""

from __future__ import annotations

import errno
import os
import threading
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import NamedTuple

# Buffered writes with RWF_NOWAIT: measured on this machine (kernel 6.18, ext4) they fail
# with EOPNOTSUPP, so a backstore remembers that after the first try and the SCSI layer
# sends its writes straight to a thread.  Reads with RWF_NOWAIT work (0.7 us for a cached
# 4 KiB read, holes included) and return EAGAIN when the data is not in the page cache.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class Extent(NamedTuple):
    """A run of bytes with one provisioning state (GET LBA STATUS)."""

    offset: int
    length: int
    mapped: bool


class RangeSet:
    """Disjoint, merged byte ranges [start, end), thread-safe (I/O runs in worker threads).

    At most ``max_ranges`` ranges are kept: a range that would need a new entry beyond that
    is not recorded, so the set may under-report but never over-reports.
    """

    def __init__(self, max_ranges: int = 1 << 16) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.max_ranges = max_ranges
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.starts)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        with self._lock:
            i = bisect_left(self.ends, start)  # first range ending at or after start (touching merges)
            j = bisect_right(self.starts, end)  # ranges [i, j) overlap or touch [start, end]
            if i == j and len(self.starts) >= self.max_ranges:
                return
            if i < j:
                start = min(start, self.starts[i])
                end = max(end, self.ends[j - 1])
            self.starts[i:j] = [start]
            self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        with self._lock:
            i = bisect_right(self.ends, start)  # first range ending after start
            j = bisect_left(self.starts, end)  # ranges [i, j) overlap [start, end)
            if i >= j:
                return
            ns: list[int] = []
            ne: list[int] = []
            if self.starts[i] < start:
                ns.append(self.starts[i])
                ne.append(start)
            if self.ends[j - 1] > end:
                ns.append(end)
                ne.append(self.ends[j - 1])
            self.starts[i:j] = ns
            self.ends[i:j] = ne

    def clear(self) -> None:
        with self._lock:
            self.starts.clear()
            self.ends.clear()

    def runs(self, offset: int, end: int, max_runs: int) -> list[Extent]:
        """[offset, end) split into runs: inside the set -> mapped=False, outside -> True."""
        out: list[Extent] = []
        with self._lock:
            i = bisect_right(self.ends, offset)
            pos = offset
            while pos < end and len(out) < max_runs:
                if i < len(self.starts) and self.starts[i] <= pos:
                    stop = min(self.ends[i], end)
                    out.append(Extent(pos, stop - pos, False))
                    i += 1
                else:
                    stop = min(self.starts[i], end) if i < len(self.starts) else end
                    out.append(Extent(pos, stop - pos, True))
                pos = stop
        return out


class Backstore(ABC):
    """Storage of ``size`` bytes reached through a file descriptor."""

    fd: int
    size: int
    path: str
    #: False once a RWF_NOWAIT write failed with EOPNOTSUPP: then writes go to a thread.
    nowait_write: bool
    #: True when discard() really deallocates (reads of discarded ranges return zeroes).
    thin: bool

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.nowait_write = bool(_NOWAIT)
        self.thin = False

    # --- data path -------------------------------------------------------------------

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> bool:
        """Fill ``buf`` from the page cache without blocking; False if that would block."""
        if not _NOWAIT:
            return False
        try:
            n = os.preadv(self.fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        if n == len(buf):
            return True
        if n == 0 and offset >= self.size:
            return False
        return False  # short read: let the blocking path finish it

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Blocking read of exactly len(buf) bytes (zero-filled past the end of a file)."""
        view = memoryview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # EOF of a file shorter than the LU: the rest reads as zeroes
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def write_nowait(self, data: Sequence[bytes | bytearray | memoryview], offset: int) -> bool:
        """Write to the page cache without blocking; False if the caller must use write()."""
        if not self.nowait_write:
            return False
        total = sum(len(d) for d in data)
        try:
            n = os.pwritev(self.fd, data, offset, _NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_write = False
                return False
            raise
        if n == total:
            return True
        # A short non-blocking write: finish the tail inline would block, so report partial
        # progress by writing the rest synchronously here (it is at most a few pages).
        self._write_all(data, offset, n)
        return True

    def write(self, data: Sequence[bytes | bytearray | memoryview], offset: int, fua: bool = False) -> None:
        """Blocking write; with ``fua`` the data is on stable storage when this returns."""
        self._write_all(data, offset, 0)
        if fua:
            self.flush()

    def _write_all(self, data: Sequence[bytes | bytearray | memoryview], offset: int, skip: int) -> None:
        views = [memoryview(d).cast("B") for d in data]
        pos = 0
        pending: list[memoryview] = []
        for v in views:  # drop the first ``skip`` bytes already written
            if pos + len(v) <= skip:
                pos += len(v)
                continue
            pending.append(v[max(0, skip - pos):])
            pos += len(v)
        off = offset + skip
        while pending:
            n = os.pwritev(self.fd, pending, off)
            off += n
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if pending and n:
                pending[0] = pending[0][n:]

    def flush(self) -> None:
        """Make every completed write durable (SYNCHRONIZE CACHE, FUA)."""
        os.fdatasync(self.fd)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeroes without sending them (falls back to writing a zero buffer)."""
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self._write_all([memoryview(chunk)[:n]], offset, 0)
            offset += n

    def prefetch(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    # --- provisioning ----------------------------------------------------------------

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; afterwards it reads as zeroes (LBPRZ)."""

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        """Mapped/deallocated runs from ``offset``: all of [offset, offset+length) or the
        first ``max_runs`` runs of it, whichever is shorter."""
        return [Extent(offset, length, True)]

    def allocated_bytes(self) -> int | None:
        """Bytes of backing storage in use (thin-provisioning threshold, LOG SENSE), or None
        where the backstore cannot measure it (a block device's allocation is its own)."""
        return None

    def free_bytes(self) -> int | None:
        """Bytes the backing storage can still allocate, or None when unknown."""
        return None

    def resize(self, size: int) -> None:
        """Change the LU's size (files only; devices report their own)."""
        raise OSError(errno.EOPNOTSUPP, "resize not supported")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
