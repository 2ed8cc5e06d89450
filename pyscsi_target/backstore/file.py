"""File backstore: a (normally sparse) regular file.

File extents are thin: created sparse, deallocated with fallocate(PUNCH_HOLE|KEEP_SIZE)
and their allocation read back with SEEK_DATA/SEEK_HOLE for GET LBA STATUS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

from pyscsi_target.backstore.base import Extent, FdBackstore

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

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_ok = False
        self.write_zeroes(offset, length)  # filesystem without holes: keep LBPRZ true

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            super().write_zeroes(offset, length)

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
        self.size = size
