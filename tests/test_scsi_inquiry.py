"""INQUIRY data built from construct layouts (scsi/inquiry.py) equals the bytes SPC-4 and
SBC-3 lay down, packed here independently with struct."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

from test_scsi_support import Harness

from pyscsi_target.scsi import inquiry
from pyscsi_target.scsi.task import MAX_TRANSFER_BYTES


def _pages(tmp_path: Path, **kw: Any) -> dict[str, bytes]:
    async def main() -> dict[str, bytes]:
        h = Harness(tmp_path, **kw)
        try:
            out = {"std": inquiry.standard_inquiry(h.lu), "none": inquiry.standard_inquiry(None, inquiry.NO_LU)}
            for page in inquiry.VPD_PAGES:
                data = inquiry.vpd_page(h.lu, h.a, page)
                assert data is not None
                out[f"{page:02x}"] = data
            assert inquiry.vpd_page(h.lu, h.a, 0xB3) is None
            out["blocks"] = h.lu.num_blocks.to_bytes(8, "big")
            return out
        finally:
            h.close()

    return asyncio.run(main())


def test_standard_inquiry_bytes(tmp_path: Path) -> None:
    p = _pages(tmp_path, serial="SER42")
    expected = (bytes((0x00, 0x00, 0x06, 0x12, 91, 0x18, 0x10, 0x02)) + b"PYSCSI  " + b"iSCSI Disk      "
                + b"0001" + b"SER42".ljust(20, b"\0") + bytes(2)
                + struct.pack(">8H", 0x00A0, 0x0960, 0x0460, 0x04C0, 0, 0, 0, 0) + bytes(22))
    assert p["std"] == expected
    # no LU at this LUN: qualifier 011b, type 1Fh, no 3PC, no serial
    assert p["none"][0] == 0x7F and p["none"][5] == 0x10 and p["none"][36:56] == bytes(20)


def test_vpd_page_bytes(tmp_path: Path) -> None:
    p = _pages(tmp_path, rpm="7200", blocksize=512)
    assert p["86"] == bytes((0, 0x86, 0, 0x3C, 0, 0x07, 0x01, 0x01)) + bytes(56)
    bs = 512
    assert p["b0"] == struct.pack(
        ">BBHBBHIIIIIIIQIII8x", 0, 0xB0, 0x3C, 0, 255, 8, MAX_TRANSFER_BYTES // bs, (1 << 20) // bs,
        MAX_TRANSFER_BYTES // bs, (256 << 20) // bs, 256, 8, 0x80000000, MAX_TRANSFER_BYTES // bs,
        (1 << 20) // bs, 8, 8)
    assert p["b1"] == struct.pack(">BBHHBB", 0, 0xB1, 0x3C, 7200, 0, 0x40) + bytes(56)
    exponent = max(0, int.from_bytes(p["blocks"], "big").bit_length() - 32)
    assert p["b2"] == bytes((0, 0xB2, 0, 4, exponent, 0xE4, 0x02, 0))
    assert p["00"] == bytes((0, 0, 0, 8, 0x00, 0x80, 0x83, 0x86, 0x8F, 0xB0, 0xB1, 0xB2))


def test_block_limits_for_4k_blocks(tmp_path: Path) -> None:
    p = _pages(tmp_path, blocksize=4096)
    fields = struct.unpack(">BBHBBHIIIIIIIQIII8x", p["b0"])
    assert fields[5] == 1  # optimal granularity: one 4 KiB block is the physical block
    assert fields[6] == MAX_TRANSFER_BYTES // 4096 and fields[11] == 1 and fields[15] == 1
    # OPTIMAL TRANSFER LENGTH: 1 MiB, which Linux sd takes as max_sectors_kb and io_opt; it must be a
    # multiple of the physical block (the granularity) and within the maximum, or sd ignores it.
    assert fields[7] * 4096 == 1 << 20 and fields[7] % fields[5] == 0 and fields[7] <= fields[6]
