"""Write residuals over iSCSI (issue 10, defect 6): libiscsi master's iSCSIResiduals.Write10/12/16
cases, on the daemon, with a raw initiator.

A one-block WRITE whose ExpectedDataTransferLength is 200 bytes is answered CHECK CONDITION,
ILLEGAL REQUEST / INVALID FIELD IN COMMAND INFORMATION UNIT, with the 312-byte overflow
residual, and the block keeps its data; whole blocks under the CDB's length are written with
GOOD and the residual; the data beyond the CDB's length is never written.
"""

from __future__ import annotations

import struct

import pytest
from support import rawclient as R
from support.daemon import Daemon

BS = 512
CC = 0x02


def write_cdb(size: int, lba: int, blocks: int) -> bytes:
    if size == 10:
        return R.write10(lba, blocks)
    if size == 12:
        return struct.pack(">BBIIBB", 0xAA, 0, lba, blocks, 0, 0)
    return R.write16(lba, blocks)


def write_edtl(c: R.RawClient, cdb: bytes, data: bytes) -> R.ScsiResult:
    """A WRITE whose ExpectedDataTransferLength is len(data), whatever the CDB says."""
    return c.scsi(cdb, data=data)


@pytest.mark.parametrize("size", [10, 12, 16])
def test_write_residuals(daemon: Daemon, size: int) -> None:
    c = R.login_session(daemon.host, daemon.port, daemon.iqn)
    try:
        assert c.scsi(R.write10(0, 4), data=b"a" * 4 * BS).status == 0

        r = write_edtl(c, write_cdb(size, 0, 1), b"b" * 200)
        assert r.status == CC and r.sense_key == 0x05 and r.asc_ascq == (0x0E, 0x03), r
        assert r.overflow and r.residual == BS - 200
        assert c.scsi(R.read10(0, 4), read_len=4 * BS).data == b"a" * 4 * BS

        r = write_edtl(c, write_cdb(size, 0, 2), b"b" * BS)  # EDTL one block of two
        assert r.status == 0 and r.overflow and r.residual == BS
        r = write_edtl(c, write_cdb(size, 2, 1), b"c" * 2 * BS)  # EDTL two blocks of one
        assert r.status == 0 and r.underflow and r.residual == BS
        assert c.scsi(R.read10(0, 4), read_len=4 * BS).data == b"b" * BS + b"a" * BS + b"c" * BS + b"a" * BS

        r = write_edtl(c, write_cdb(size, 0, 1), b"")  # no Data-Out at all: nothing to lose
        assert r.status == 0 and r.overflow and r.residual == BS
        c.logout()
    finally:
        c.close()
    daemon.assert_clean_log()
