"""Block device backstore: a disk, partition, zvol or LV opened exclusively.

Provisioning on a block device (issue 3: "Disk extents use the block device's own discard"):

* discard() deallocates with fallocate(PUNCH_HOLE | KEEP_SIZE) on the device, which the
  kernel turns into a WRITE ZEROES that may unmap (REQ_OP_WRITE_ZEROES without NOUNMAP:
  a hole in a loop device's file, NVMe Write Zeroes with DEAC, SCSI WRITE SAME + UNMAP...)
  and refuses when the device cannot zero that way.  Then we fall back to BLKDISCARD
  (frees space where the device can, but need not zero) followed by BLKZEROOUT.  Either
  way discarded blocks read back as zeroes, so LBPRZ=1 holds on every device.  (BLKDISCARD
  then BLKZEROOUT must not be the first choice: BLKZEROOUT is NOUNMAP and re-allocates what
  the discard just freed, e.g. a thin LV or a loop device's backing file.)

* A block device has no SEEK_HOLE: its allocation cannot be queried.  GET LBA STATUS
  reports as deallocated exactly the ranges this backstore deallocated since it opened the
  device and that nothing has written since (kept in memory, so SANITIZE BLOCK ERASE and
  UNMAP are visible as SBC-3 requires); everything else is reported mapped, which SBC-4
  defines as "mapped or unknown".  The set is deliberately not persisted: after a crash it
  could claim zeroes for blocks written before the crash, while forgetting it only ever
  reports "mapped" for blocks that happen to be deallocated.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

from pyscsi_target.backstore.base import Buffer, Extent, FdBackstore, RangeSet
from pyscsi_target.backstore.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268

#: errnos meaning "this device cannot do that operation at all" (remembered per device).
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


class BlockBackstore(FdBackstore):
    size_from_storage = True

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
        self._punch_ok = True  # fallocate(PUNCH_HOLE): zeroing deallocation
        self._discard_ok = True  # BLKDISCARD
        self.thin = True  # every discard path leaves zeroes: LBPRZ holds
        self.deallocated = RangeSet()  # what we deallocated and nobody wrote since

    @staticmethod
    def device_size(fd: int) -> int:
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size: int = struct.unpack("Q", buf)[0]
            return size
        except OSError:
            return os.lseek(fd, 0, os.SEEK_END)

    # --- writes clear the deallocated state (after the data landed: see discard) -----------

    def write_nowait(self, data: Sequence[Buffer], offset: int) -> bool:
        if not super().write_nowait(data, offset):
            return False
        if self.deallocated:
            self.deallocated.remove(offset, offset + sum(memoryview(d).nbytes for d in data))
        return True

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        super().write(data, offset, fua)
        if self.deallocated:
            self.deallocated.remove(offset, offset + sum(memoryview(d).nbytes for d in data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeroes that stay mapped (WRITE SAME without UNMAP)."""
        self._zero(offset, length)
        if self.deallocated:
            self.deallocated.remove(offset, offset + length)

    def _zero(self, offset: int, length: int) -> None:
        try:
            # BLKZEROOUT is NOUNMAP: the device writes (or offloads) zeroes, blocks stay allocated.
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError as e:
            if e.errno not in (*_UNSUPPORTED, errno.EINVAL):
                raise
            super().write_zeroes(offset, length)

    # --- provisioning ----------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        # Recorded before the device is touched: a write racing with this discard clears
        # the range after its own data landed, so a race can only make us report "mapped".
        self.deallocated.add(offset, offset + length)
        if self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno in _UNSUPPORTED:
                    self._punch_ok = False
                elif e.errno != errno.EINVAL:  # EINVAL: this range only (alignment)
                    raise
        if self._discard_ok:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as e:
                if e.errno in _UNSUPPORTED:
                    self._discard_ok = False
                elif e.errno != errno.EINVAL:
                    raise
        # A plain discard need not zero: make LBPRZ true explicitly.
        self._zero(offset, length)

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        end = min(self.size, offset + length)
        if offset >= end:
            return []
        return self.deallocated.runs(offset, end, max_runs)

    def resize(self, size: int) -> None:
        """A device's size is its own (``size`` is ignored): re-read it, after the zvol or
        LV was grown."""
        self.size = self.device_size(self.fd)
