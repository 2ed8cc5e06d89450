"""Allocating extent files: sparse, preallocated or zero-filled, and writing imported images.

- ``sparse``: ``ftruncate``; nothing is allocated until written (thin, instant).
- ``preallocate``: ``fallocate(2)`` reserves every block (unwritten extents read as zeroes),
  so writes to the LU can never fail for lack of space; fast on ext4/XFS.
- ``zero``: writes zeroes over the whole range, so every block is allocated *and* written
  (what "eager-zeroed thick" disks are for: no first-write conversion cost later).  The
  writes bypass the page cache (O_DIRECT) so a multi-GiB fill does not evict the cache the
  live LUs read from; where O_DIRECT is refused (tmpfs) the written range is synced and
  dropped from the cache step by step instead.

Every function here blocks: callers run them in a job worker thread.  ``advance(n)`` reports
progress and raises (``JobCancelled``) to stop the work between steps.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable

from pyscsi_target.backstore.file import fallocate

SPARSE, PREALLOCATE, ZERO = "sparse", "preallocate", "zero"
ALLOCATIONS = (SPARSE, PREALLOCATE, ZERO)

CHUNK = 4 << 20  # one zero-fill write
FALLOCATE_STEP = 256 << 20  # one fallocate call (a progress step)
SYNC_STEP = 256 << 20  # buffered fills sync and drop the cache this often
ALIGN = 4096  # O_DIRECT offsets and lengths: safe for 512- and 4096-byte devices
HOLE_GRAIN = 64 << 10  # an imported run of zeroes this long is left as a hole

Advance = Callable[[int], None]


def allocate(fd: int, path: str, start: int, end: int, allocation: str, advance: Advance) -> None:
    """Make ``[start, end)`` of the open file allocated as ``allocation`` and the file at least
    ``end`` bytes long, then fsync it."""
    if allocation == PREALLOCATE:
        if not _preallocate(fd, start, end, advance):
            _zero_fill(fd, path, start, end, advance)  # no fallocate on this filesystem
    elif allocation == ZERO:
        _zero_fill(fd, path, start, end, advance)
    elif allocation == SPARSE:
        advance(end - start)
    else:
        raise ValueError(f"unknown allocation {allocation!r}")
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    os.fsync(fd)


def _preallocate(fd: int, start: int, end: int, advance: Advance) -> bool:
    pos = start
    while pos < end:
        n = min(FALLOCATE_STEP, end - pos)
        try:
            fallocate(fd, 0, pos, n)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS) and pos == start:
                return False
            raise
        pos += n
        advance(n)
    return True


def _zero_fill(fd: int, path: str, start: int, end: int, advance: Advance) -> None:
    zeroes = mmap.mmap(-1, CHUNK)  # anonymous: page-aligned and zero, as O_DIRECT needs
    view = memoryview(zeroes)
    try:
        direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        direct_fd = -1
    try:
        pos, synced = start, start
        while pos < end:
            n = min(CHUNK, end - pos)
            if direct_fd >= 0 and pos % ALIGN == 0 and n >= ALIGN:
                n -= n % ALIGN
                target = direct_fd
            else:  # an unaligned head or tail, or no O_DIRECT: through the page cache
                if pos % ALIGN:
                    n = min(n, ALIGN - pos % ALIGN)
                target = fd
            written = os.pwrite(target, view[:n], pos)
            pos += written
            if direct_fd < 0 and pos - synced >= SYNC_STEP:
                os.fdatasync(fd)
                os.posix_fadvise(fd, synced, pos - synced, os.POSIX_FADV_DONTNEED)
                synced = pos
            advance(written)
    finally:
        view.release()
        zeroes.close()
        if direct_fd >= 0:
            os.close(direct_fd)


def create_allocated(path: str, size: int, allocation: str, advance: Advance) -> None:
    """Create ``path`` (it must not exist) with ``size`` bytes allocated as ``allocation``.
    On any failure, cancellation included, the partial file is removed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        allocate(fd, path, 0, size, allocation, advance)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def extend_allocated(path: str, old_size: int, new_size: int, allocation: str, advance: Advance) -> None:
    """Grow ``path`` from ``old_size`` to ``new_size``, allocating the new range.  The file may
    be a live LU's: only bytes past ``old_size`` (which the LU does not reach until its
    extent's size changes) are touched, and a failure truncates back to ``old_size``."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        current = os.fstat(fd).st_size
        if current != old_size:
            raise OSError(errno.EBUSY, f"the file is {current} bytes, not the expected {old_size}")
        try:
            allocate(fd, path, old_size, new_size, allocation, advance)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, old_size)
            raise
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> None:
    """Give the finished temporary file its real name, never replacing a file that appeared
    there meanwhile (link(2) fails with EEXIST where rename(2) would clobber)."""
    try:
        os.link(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class ImageWriter:
    """Writes an uploaded raw image into a new sparse file; zero runs stay holes."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._zero = bytes(HOLE_GRAIN)
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        run_start = -1  # start of the pending run of non-zero grains
        pos = 0
        while pos < len(view):
            grain = view[pos : pos + HOLE_GRAIN]
            if grain == self._zero[: len(grain)]:
                if run_start >= 0:
                    self._pwrite_all(view[run_start:pos], offset + run_start)
                    run_start = -1
            elif run_start < 0:
                run_start = pos
            pos += len(grain)
        if run_start >= 0:
            self._pwrite_all(view[run_start:], offset + run_start)

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path)
