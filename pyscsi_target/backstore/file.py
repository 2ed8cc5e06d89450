"""File backstore: a (normally sparse) regular file.

File extents are thin: created sparse, deallocated with fallocate(PUNCH_HOLE|KEEP_SIZE)
and their allocation read back with SEEK_DATA/SEEK_HOLE for GET LBA STATUS.  Reads of ranges
known to be holes are answered with zeroes without a syscall (hole_map.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Sequence

from pyscsi_target.backstore.base import Buffer, Extent, FdBackstore
from pyscsi_target.backstore.hole_map import HoleMap

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def create_sparse(path: str, size: int) -> None:
    """Create (or grow) a sparse file of ``size`` bytes without allocating blocks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


class FileBackstore(FdBackstore):
    """A regular file; ``size`` 0 means "the file's current size"."""

    def __init__(self, path: str, size: int = 0, read_only: bool = False, create: bool = True) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create and not read_only and size > 0:
            flags |= os.O_CREAT
        fd = os.open(path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            if size <= 0:
                size = st.st_size
            elif st.st_size < size and not read_only:
                os.ftruncate(fd, size)  # grows sparsely
        except BaseException:
            os.close(fd)
            raise
        super().__init__(path, fd, size)
        self.read_only = read_only
        self.thin = True
        self._punch_ok = True
        self.holes = HoleMap.scan(fd, size)

    # --- reads of known holes: zeroes, no syscall; every write path marks its range first ---

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> bool:
        n = len(buf)
        if self.holes.covers(offset, offset + n):
            _zero_fill(buf, n)
            return True
        return super().read_nowait(buf, offset)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        n = len(buf)
        if self.holes.covers(offset, offset + n):
            _zero_fill(buf, n)
            return
        super().read_into(buf, offset)

    def write_nowait(self, data: Sequence[Buffer], offset: int) -> bool:
        if not self.nowait_write:  # the writer thread will write it (and mark it then)
            return False
        self.holes.written(offset, offset + _nbytes(data))
        return super().write_nowait(data, offset)

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        self.holes.written(offset, offset + _nbytes(data))
        super().write(data, offset, fua)

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._punch_ok:
            try:
                with self.holes.zeroing(offset, offset + length):
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_ok = False
        self.write_zeroes(offset, length)  # filesystem without holes: keep LBPRZ true

    def write_zeroes(self, offset: int, length: int) -> None:
        # The range reads as zeroes afterwards either way (a zeroed range or written zeroes):
        # unless a write raced with it, reads of it need not reach the file.
        with self.holes.zeroing(offset, offset + length):
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                super().write_zeroes(offset, length)  # its writes forget the range: read from the file

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        """Runs from SEEK_DATA/SEEK_HOLE, starting at ``offset``, up to ``offset+length``
        (at most ``max_runs`` of them: a fragmented file costs two lseeks per run)."""
        end = min(self.size, offset + length)
        out: list[Extent] = []
        pos = offset
        while pos < end and len(out) < max_runs:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                    raise
                data = self.size
            if data > pos:
                hole_end = min(data, end)
                out.append(Extent(pos, hole_end - pos, False))
                pos = hole_end
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            data_end = min(hole, end)
            out.append(Extent(pos, data_end - pos, True))
            pos = data_end
        return out

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def free_bytes(self) -> int:
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize

    def resize(self, size: int) -> None:
        """Grow the file (sparsely) to ``size``; 0: adopt the file's own size, e.g. after
        it was grown underneath us."""
        current = os.fstat(self.fd).st_size
        if size <= 0:
            if current > 0:
                self.size = current
            return
        if size > current:
            os.ftruncate(self.fd, size)
            self.holes.add(current, size)  # grown by us: sparse, nobody wrote there
        self.size = size


_ZEROES = memoryview(bytes(1 << 20))


def _nbytes(data: Sequence[Buffer]) -> int:
    return sum(d.nbytes if isinstance(d, memoryview) else len(d) for d in data)


def _zero_fill(buf: bytearray | memoryview, n: int) -> None:
    view = memoryview(buf).cast("B") if not isinstance(buf, bytearray) else memoryview(buf)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROES))
        view[pos:pos + k] = _ZEROES[:k]
        pos += k
