"""The settings of one logical unit: everything the device model reports that is not read
from the backstore.  The engine maps its configuration to these (server/logical_units.py);
the SCSI layer never sees a configuration object."""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SIZES = (512, 1024, 2048, 4096)

#: MEDIUM ROTATION RATE (block device characteristics VPD) of a non-rotating medium.
NON_ROTATING = 1


@dataclass(frozen=True, slots=True)
class LuSettings:
    name: str  # for logs only
    naa: bytes  # the 8-byte NAA designator (VPD 83h; EXTENDED COPY names LUs by it)
    serial: str  # UNIT SERIAL NUMBER (VPD 80h), at most 32 characters
    block_size: int = 512
    read_only: bool = False
    rpm: int = NON_ROTATING  # 0 not reported, 1 non-rotating, else revolutions per minute
    # Reported through LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT; equal to block_size to
    # report none (FreeNAS's "disable physical block size reporting").
    physical_block_size: int = 4096
    # Xen compat mode: the T10 vendor designator (VPD 83h) carries the serial unpadded.
    xen: bool = False
    insecure_tpc: bool = True  # EXTENDED COPY may reach this LU from any nexus
    # THIN PROVISIONING SOFT THRESHOLD REACHED when what the LU can still allocate falls to
    # this percentage of its capacity (FreeNAS's "percentage of free space"); 0 = never.
    avail_threshold: int = 0

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size} is not one of {BLOCK_SIZES}")
        if len(self.naa) != 8:
            raise ValueError("an NAA designator is 8 bytes")
        if len(self.serial) > 32 or not self.serial.isascii():
            raise ValueError("a unit serial number is at most 32 ASCII characters")
        if self.physical_block_size < self.block_size or self.physical_block_size & (self.physical_block_size - 1):
            raise ValueError("the physical block size is a power of two no smaller than the block size")
        if not 0 <= self.avail_threshold <= 100:
            raise ValueError("avail_threshold is a percentage")
        if not 0 <= self.rpm <= 0xFFFE:
            raise ValueError("rpm out of range")

    @property
    def block_shift(self) -> int:
        return self.block_size.bit_length() - 1

    @property
    def lbppbe(self) -> int:
        """LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT."""
        return self.physical_block_size.bit_length() - self.block_size.bit_length()
