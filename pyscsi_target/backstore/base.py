"""The backstore interface: byte-addressed storage under one logical unit.

The contract (the SCSI layer relies on nothing else; file, block device and RBD
backstores all fit it):

* **Units.** Offsets and lengths are bytes; the SCSI layer only passes multiples of its
  block size.  ``size`` is the capacity in bytes; ``thin`` says that ``discard`` really
  deallocates and discarded ranges read back as zeroes (LBPRZ); ``discard_granularity`` is
  the unit that a discard really frees (OPTIMAL UNMAP GRANULARITY: a filesystem block, an
  RBD object).  ``name`` is for logs.

* **Data path, on the event loop thread.**  ``read_nowait`` / ``write_nowait`` either do
  the whole transfer at once without blocking and return True, or do nothing and return
  False (the default).  ``submit_read`` / ``submit_write`` / ``submit_flush`` start the
  operation and return at once; the backstore later calls ``done(None)`` or
  ``done(exception)`` exactly once, **on the loop thread**.  How it gets there is the
  backstore's business: the default implementations below run the blocking methods in
  the loop's executor (reads, flushes) or on the backstore's own writer thread (writes,
  in batches with group commit: backstore/writer.py); an asynchronous backstore (librbd
  aio) overrides them and hands its completions to the loop itself (one
  ``call_soon_threadsafe`` per completion or per batch of them), with no worker thread in
  between.  ``submit_write(..., sync=True)`` completes only once the data is durable.
  The buffers passed stay untouched by the SCSI layer until ``done`` runs.

* **Blocking operations, on worker threads.**  ``read_into``, ``write``, ``flush``,
  ``discard``, ``write_zeroes``, ``compare_and_write``, ``block_status`` may block: the SCSI
  layer calls them from its executor (COMPARE AND WRITE, UNMAP, WRITE SAME, EXTENDED COPY,
  SANITIZE), never from the loop.  ``flush`` makes every completed write durable.
  ``prefetch``, ``allocated_bytes`` and ``free_bytes`` are cheap and may be called on the
  loop (advisory, and None where the backstore cannot tell).

* **Life cycle.**  ``resize(size)`` changes the capacity (0: adopt the size the storage
  reports now, e.g. after a device or image was grown underneath); ``close()`` lets queued
  writes land, flushes, and releases the storage.  A backstore that learns by itself that
  its size changed (an RBD image resized by another client) sets ``size`` and calls
  ``on_size_change(size)`` on the loop thread, when the LU's owner has set that hook.  The
  SCSI layer never touches a file descriptor: only FdBackstore and its subclasses have one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import NamedTuple

from pyscsi_target.backstore.writer import WriteQueue

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
#: Completion of a submitted operation: None, or the exception it failed with.
Done = Callable[[BaseException | None], None]

# Buffered writes with RWF_NOWAIT: measured on this machine (kernel 6.18, ext4) they fail
# with EOPNOTSUPP, so a backstore remembers that after the first try and the SCSI layer
# sends its writes straight to a thread.  Reads with RWF_NOWAIT work (0.7 us for a cached
# 4 KiB read, holes included) and return EAGAIN when the data is not in the page cache.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class PathUnavailable(OSError):
    """The storage refuses this node (a gateway fenced by another that took its RBD image
    over): nothing was written, and the command may succeed through another target port.
    The SCSI layer reports it as such (NOT READY, TARGET PORT IN UNAVAILABLE STATE) instead
    of a medium error, so a multipath initiator retries it on another path."""


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
    """Storage of ``size`` bytes under one logical unit (see the module docstring)."""

    name: str
    size: int
    #: True when discard() really deallocates (reads of discarded ranges return zeroes).
    thin: bool
    #: Bytes: the smallest aligned range whose discard really frees space.
    discard_granularity: int
    closed: bool
    #: The capacity is the storage's own and may change underneath without notice (a zvol's
    #: volsize, an LV grown): the LU re-reads it (``resize(0)``) at READ CAPACITY and when the
    #: daemon rescans.  A file has the configured size; an RBD image announces its changes.
    size_from_storage = False

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.thin = False
        # Holes are punched in filesystem blocks: 4 KiB is the unit that really frees space.
        self.discard_granularity = 4096
        self.closed = False
        self._writer: WriteQueue | None = None
        #: Set by the LU's owner; called on the loop when the storage was resized underneath.
        self.on_size_change: Callable[[int], None] | None = None

    # --- data path (loop thread) ---------------------------------------------------------

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> bool:
        """Fill ``buf`` at once without blocking, or return False and do nothing."""
        return False

    def write_nowait(self, data: Sequence[Buffer], offset: int) -> bool:
        """Write at once without blocking (not durable), or return False and do nothing."""
        return False

    def submit_read(self, buf: bytearray | memoryview, offset: int, done: Done) -> None:
        """Read exactly len(buf) bytes; ``done`` on the loop thread."""
        _in_executor(done, self.read_into, buf, offset)

    def submit_write(self, data: Sequence[Buffer], offset: int, sync: bool, done: Done) -> None:
        """Write; with ``sync`` durable before ``done``, which runs on the loop thread."""
        writer = self._writer
        if writer is None:
            writer = self._writer = WriteQueue(self, asyncio.get_running_loop())
        writer.submit(offset, data, sync, done)

    def submit_flush(self, done: Done) -> None:
        """Make every completed write durable; ``done`` on the loop thread."""
        _in_executor(done, self.flush)

    # --- blocking operations (worker threads) ---------------------------------------------

    @abstractmethod
    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Read exactly len(buf) bytes (zeroes past the end of the stored data)."""

    @abstractmethod
    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        """Write; with ``fua`` the data is on stable storage when this returns."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (SYNCHRONIZE CACHE, FUA)."""

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; afterwards it reads as zeroes (LBPRZ)."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeroes that stay allocated (WRITE SAME without UNMAP); by default by
        writing a zero buffer."""
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write([memoryview(chunk)[:n]], offset)
            offset += n

    def compare_and_write(self, expected: Buffer, data: Buffer, offset: int, fua: bool) -> int:
        """Write ``data`` at ``offset`` if the stored bytes equal ``expected`` (same length);
        return -1 when written, else the offset of the first differing byte.

        The SCSI layer calls it with no other write to this LU in flight, which makes this
        default atomic within one daemon; a backstore shared between daemons overrides it
        with an operation atomic on the shared storage."""
        current = bytearray(len(expected))
        self.read_into(current, offset)
        diff = first_difference(expected, current)
        if diff < 0:
            self.write([data], offset, fua)
        return diff

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        """Mapped/deallocated runs from ``offset``: all of [offset, offset+length) or the
        first ``max_runs`` runs of it, whichever is shorter."""
        return [Extent(offset, length, True)]

    # --- advisory (any thread) ----------------------------------------------------------

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading a range into a cache, without waiting (PRE-FETCH); by default
        there is no cache to fill."""
        return None

    def allocated_bytes(self) -> int | None:
        """Bytes of backing storage in use (thin-provisioning threshold, LOG SENSE), or None
        where the backstore cannot measure it (a block device's allocation is its own)."""
        return None

    def free_bytes(self) -> int | None:
        """Bytes the backing storage can still allocate, or None when unknown."""
        return None

    # --- life cycle -----------------------------------------------------------------------

    def resize(self, size: int) -> None:
        """Change the capacity to ``size`` bytes; 0 adopts the size the storage reports."""
        raise OSError(errno.EOPNOTSUPP, "resize not supported")

    def close(self) -> None:
        """Let queued writes land, flush, and release the storage (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        try:
            self.flush()
        except OSError:
            log.exception("flush on close of %s", self.name)
        self.release()

    @abstractmethod
    def release(self) -> None:
        """Give the storage back (close a descriptor, an image); called once by close()."""


def first_difference(expected: Buffer, actual: Buffer) -> int:
    """Offset of the first byte where ``actual`` differs from ``expected``, or -1."""
    e, a = memoryview(expected).cast("B"), memoryview(actual).cast("B")
    if e == a[: len(e)]:
        return -1
    eb, ab = bytes(e), bytes(a)
    for i in range(len(eb)):
        if eb[i] != ab[i]:
            return i
    return -1


def _in_executor(done: Done, fn: Callable[..., object], *args: object) -> None:
    def finished(fut: asyncio.Future[object]) -> None:
        done(fut.exception() if not fut.cancelled() else asyncio.CancelledError())

    asyncio.get_running_loop().run_in_executor(None, fn, *args).add_done_callback(finished)


class FdBackstore(Backstore):
    """Storage reached through a file descriptor: a regular file or a block device.

    Reads that hit the page cache complete inline (preadv with RWF_NOWAIT), others in the
    executor; writes go to the writer thread (or inline where RWF_NOWAIT writes work)."""

    fd: int
    path: str
    #: False once a RWF_NOWAIT write failed with EOPNOTSUPP: then writes go to a thread.
    nowait_write: bool

    def __init__(self, path: str, fd: int, size: int) -> None:
        super().__init__(path, size)
        self.path = path
        self.fd = fd
        self.nowait_write = bool(_NOWAIT)

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> bool:
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
        return n == len(buf)  # a short read (or EOF): the blocking path finishes it

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # EOF of a file shorter than the LU: the rest reads as zeroes
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def write_nowait(self, data: Sequence[Buffer], offset: int) -> bool:
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
        # A short non-blocking write: write the rest synchronously here (at most a few
        # pages), so the call still did the whole transfer.
        self._write_all(data, offset, n)
        return True

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        self._write_all(data, offset, 0)
        if fua:
            self.flush()

    def _write_all(self, data: Sequence[Buffer], offset: int, skip: int) -> None:
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
        os.fdatasync(self.fd)

    def prefetch(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
