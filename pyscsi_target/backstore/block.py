"""Block device backstore: a disk, partition, zvol or LV opened exclusively."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from pyscsi_target.backstore.base import Backstore

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268
BLKDISCARDZEROES = 0x127C


class BlockBackstore(Backstore):
    def __init__(self, path: str, read_only: bool = False) -> None:
        # O_EXCL on a block device: fail if it is mounted or held by another exclusive user.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_EXCL
        fd = os.open(path, flags)
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTBLK, f"{path} is not a block device")
            size = self.device_size(fd)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(path, fd, size)
        self.read_only = read_only
        self._discard_ok = True
        self.thin = True  # BLKDISCARD falls back to BLKZEROOUT, so LBPRZ stays true

    @staticmethod
    def device_size(fd: int) -> int:
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        except OSError:
            return os.lseek(fd, 0, os.SEEK_END)

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._discard_ok:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
                # Discarded blocks need not read back as zeroes on every device; zero them
                # explicitly (BLKZEROOUT uses WRITE ZEROES/unmap where the device has it).
                self.write_zeroes(offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
                self._discard_ok = False
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            super().write_zeroes(offset, length)

    def resize(self, size: int) -> None:
        """A device's size is its own: re-read it (after the zvol/LV was grown)."""
        self.size = self.device_size(self.fd)
