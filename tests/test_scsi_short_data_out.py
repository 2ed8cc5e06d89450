"""Data-Out shorter (or longer) than the CDB asks for: what the initiator sent is written, or
the command fails and nothing is written; never GOOD with the data dropped (issue 10, defect 6).

A one-block WRITE whose expected data transfer length is 200 bytes used to answer GOOD with
an overflow residual and write nothing.  Now every data-out command that cannot use a short
Data-Out answers INVALID FIELD IN COMMAND INFORMATION UNIT (05/0E/03) before touching the
medium; whole blocks below the transfer length are still written (FCP-4's rule a).  The same
commands also take a Data-Out gathered in several buffers (one per burst) as the iSCSI
transport hands it over.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from test_scsi_support import Harness, pr_out, run, rw10, rw16

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.task import ScsiTask

GOOD, CC = 0x00, 0x02
BS = 512
SHORT_IU = (S.ILLEGAL_REQUEST, *S.INVALID_FIELD_IN_INFORMATION_UNIT)


def rw12(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBIIBB", op, 0, lba, n, 0, 0)


WRITES = {
    "WRITE(10)": lambda lba, n: rw10(0x2A, lba, n),
    "WRITE(12)": lambda lba, n: rw12(0xAA, lba, n),
    "WRITE(16)": lambda lba, n: rw16(0x8A, lba, n),
    "WRITE AND VERIFY(10)": lambda lba, n: rw10(0x2E, lba, n),
    "WRITE AND VERIFY(16)": lambda lba, n: rw16(0x8E, lba, n),
    "ORWRITE(16)": lambda lba, n: rw16(0x8B, lba, n),
}


async def fill(h: Harness, lba: int, n: int, byte: int) -> None:
    assert (await h.cmd(rw10(0x2A, lba, n), bytes([byte]) * n * BS)).status == GOOD


async def read(h: Harness, lba: int, n: int) -> bytes:
    r = await h.cmd(rw10(0x28, lba, n), expected_len=n * BS)
    assert r.status == GOOD
    return r.data


@pytest.mark.parametrize("name", list(WRITES))
def test_partial_block_write_fails_and_writes_nothing(tmp_path: Path, name: str) -> None:
    @run
    async def body(h: Harness) -> None:
        await fill(h, 0, 2, 0x61)
        # ORWRITE ORs: 0x02 into 0x61 would change every byte, as 'b' over 'a' would elsewhere.
        r = await h.cmd(WRITES[name](0, 1), b"\x02" * 200)
        assert r.status == CC and r.key_asc == SHORT_IU, (r.status, r.key_asc)
        assert r.task.xfer_len == BS  # the transport reports the 312-byte overflow residual from it
        assert await read(h, 0, 2) == b"\x61" * 2 * BS  # not a byte written
        # 1.5 blocks of a 2-block write: the same (the second block would be half written).
        r = await h.cmd(WRITES[name](0, 2), b"\x02" * (BS + BS // 2))
        assert r.key_asc == SHORT_IU
        assert await read(h, 0, 2) == b"\x61" * 2 * BS

    body(tmp_path)


@run
async def test_whole_blocks_below_the_transfer_length_are_written(h: Harness) -> None:
    await fill(h, 0, 2, 0x61)
    r = await h.cmd(rw10(0x2A, 0, 2), b"b" * BS)  # EDTL one block, CDB two
    assert r.status == GOOD and r.task.xfer_len == 2 * BS
    assert await read(h, 0, 2) == b"b" * BS + b"a" * BS  # what was sent is written, no more
    r = await h.cmd(rw10(0x2A, 0, 1), b"c" * 10000)  # EDTL beyond the CDB: the CDB's one block
    assert r.status == GOOD and r.task.xfer_len == BS
    assert await read(h, 0, 2) == b"c" * BS + b"a" * BS
    # No Data-Out at all: nothing was sent, so nothing is lost (libiscsi 1.19's Write10Residuals
    # demands GOOD and the overflow residual here).
    r = await h.cmd(rw10(0x2A, 0, 1), b"", expected_len=0)
    assert r.status == GOOD and r.task.xfer_len == BS
    assert await read(h, 0, 1) == b"c" * BS


async def short_param(h: Harness, cdb: bytes, data: bytes) -> None:
    """``cdb`` with one byte less Data-Out than it asks for: 0E/03 and no side effect."""
    r = await h.cmd(cdb, data[:-1])
    assert r.status == CC and r.key_asc == SHORT_IU, (cdb.hex(), r.status, r.key_asc)


@run
async def test_parameter_list_commands_with_short_data_out(h: Harness) -> None:
    unmap = struct.pack(">HH4xQI4x", 22, 16, 0, 8)
    await short_param(h, struct.pack(">BBxxxxxHB", 0x42, 0, len(unmap), 0), unmap)
    cdb, data = pr_out(0x00, 0, 0x1234)  # REGISTER
    await short_param(h, cdb, data)
    r = await h.cmd(bytes((0x5E, 0x00)) + bytes(5) + struct.pack(">HB", 1024, 0), expected_len=1024)
    assert struct.unpack_from(">I", r.data, 4)[0] == 0  # nothing registered
    caching = bytes((0, 0, 0, 0, 0x08, 0x12, 0x04)) + bytes(17)  # MODE SELECT(6): header + caching page, WCE=1
    await short_param(h, bytes((0x15, 0x10, 0, 0, len(caching), 0)), caching)
    xcopy = bytes(16)
    await short_param(h, bytes((0x83, 0)) + bytes(8) + struct.pack(">I", len(xcopy)) + bytes(2), xcopy)
    await fill(h, 0, 1, 0x61)
    caw = b"a" * BS + b"z" * BS
    await short_param(h, rw16(0x89, 0, 0)[:13] + b"\x01" + bytes(2), caw)
    await short_param(h, rw16(0x93, 0, 1), b"z" * BS)  # WRITE SAME(16) with 511 bytes
    await short_param(h, rw16(0x8F, 0, 1, flags=0x02), b"a" * BS)  # VERIFY(16) BYTCHK=1
    sanitize = struct.pack(">BBH", 1, 0, 4) + b"zzzz"  # OVERWRITE, one pass, 4-byte pattern
    await short_param(h, bytes((0x48, 0x01)) + bytes(5) + struct.pack(">HB", len(sanitize), 0), sanitize)
    assert await read(h, 0, 1) == b"a" * BS


def segmented(data: bytes, *cuts: int) -> list[memoryview]:
    """``data`` split at ``cuts`` into separate buffers, as the transport gathers bursts."""
    bounds = [0, *cuts, len(data)]
    return [memoryview(bytearray(data[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)]


async def cmd_parts(h: Harness, cdb: bytes, parts: list[memoryview]) -> ScsiTask:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[ScsiTask] = loop.create_future()
    task = ScsiTask(h.a, 0, cdb, 0x7777, expected_len=sum(len(p) for p in parts), data_out=parts,
                    on_done=fut.set_result)
    h.dev.submit(task)
    return await asyncio.wait_for(fut, 10)


@run
async def test_data_out_in_several_buffers(h: Harness) -> None:
    data = bytes(range(256)) * (8 * BS // 256)
    t = await cmd_parts(h, rw10(0x2A, 8, 8), segmented(data, 1000, 3 * BS))
    assert t.status == GOOD
    assert await read(h, 8, 8) == data
    t = await cmd_parts(h, rw10(0x2E, 8, 8), segmented(data, 4 * BS))  # WRITE AND VERIFY
    assert t.status == GOOD
    # EDTL 7.5 blocks in three buffers: refused whole.
    t = await cmd_parts(h, rw10(0x2A, 8, 8), segmented(b"x" * (7 * BS + BS // 2), BS, 5 * BS))
    assert t.status == CC and t.sense is not None and S.sense_key_asc(t.sense) == SHORT_IU
    assert await read(h, 8, 8) == data
    unmap = struct.pack(">HH4xQI4x", 22, 16, 8, 8)
    t = await cmd_parts(h, struct.pack(">BBxxxxxHB", 0x42, 0, len(unmap), 0), segmented(unmap, 3, 9))
    assert t.status == GOOD
    assert await read(h, 8, 8) == bytes(8 * BS)
