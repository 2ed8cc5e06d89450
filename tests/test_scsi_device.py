"""SCSI layer unit tests: ScsiDevice driven with ScsiTask objects, no iSCSI."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_scsi_support import Harness, MemoryPrStore, Scsi, make_extent, nexus, pr_in, pr_out, run, rw10, rw16

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.task import TaskAttr

GOOD, CC, RC = 0x00, 0x02, 0x18


def check(r: Any, key: int, code: tuple[int, int]) -> None:
    assert r.status == CC, r
    assert r.key_asc == (key, *code), r.key_asc


# --- INQUIRY, VPD, REPORT LUNS ------------------------------------------------------


@run
async def test_standard_inquiry(h: Harness) -> None:
    r = await h.cmd(bytes((0x12, 0, 0, 1, 4, 0)))
    assert r.status == GOOD and len(r.data) == 96
    d = r.data
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] & 0x0F == 2 and d[4] == 91
    assert d[5] & 0x30 == 0x10 and d[5] & 0x08  # TPGS implicit, 3PC
    assert d[8:16] == b"PYSCSI  "
    assert struct.unpack_from(">4H", d, 58) == (0x00A0, 0x0960, 0x0460, 0x04C0)
    # allocation length truncates, no error
    r = await h.cmd(bytes((0x12, 0, 0, 0, 5, 0)))
    assert r.status == GOOD and len(r.data) == 5 and r.task.data_in_len == 5
    # page code without EVPD is invalid
    check(await h.cmd(bytes((0x12, 0, 0x80, 0, 255, 0))), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


@run
async def test_vpd_pages(h: Harness) -> None:
    r = await h.cmd(bytes((0x12, 1, 0x00, 0, 255, 0)))
    pages = list(r.data[4:])
    assert pages == sorted(pages) and {0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x8F} <= set(pages)
    r = await h.cmd(bytes((0x12, 1, 0x83, 0, 255, 0)))
    body = r.data[4:]
    types = []
    while body:
        types.append((body[1] >> 4 & 3, body[1] & 0x0F))
        if body[1] & 0x0F == 3:
            assert body[4:12] == h.lu.naa
        body = body[4 + body[3] :]
    assert (0, 3) in types and (1, 4) in types and (1, 5) in types and (1, 8) in types and (2, 8) in types
    bl = (await h.cmd(bytes((0x12, 1, 0xB0, 0, 64, 0)))).data
    assert bl[3] == 0x3C and struct.unpack_from(">I", bl, 20)[0] > 0  # max unmap LBA count
    lbp = (await h.cmd(bytes((0x12, 1, 0xB2, 0, 64, 0)))).data
    assert lbp[5] & 0xE4 == 0xE4  # LBPU LBPWS LBPWS10 LBPRZ
    bdc = (await h.cmd(bytes((0x12, 1, 0xB1, 0, 64, 0)))).data
    assert struct.unpack_from(">H", bdc, 4)[0] == 1  # SSD
    check(await h.cmd(bytes((0x12, 1, 0x42, 0, 255, 0))), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


@run
async def test_unmapped_lun_and_report_luns(h: Harness) -> None:
    r = await h.cmd(bytes((0x12, 0, 0, 0, 96, 0)), lun=5)
    assert r.status == GOOD and r.data[0] == 0x7F  # qualifier 011b, type 1Fh
    check(await h.cmd(bytes(6), lun=5), S.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED)
    r = await h.cmd(bytes((0x03, 0, 0, 0, 18, 0)), lun=5)
    assert r.status == GOOD and S.sense_key_asc(r.data) == (S.ILLEGAL_REQUEST, 0x25, 0)
    rl = struct.pack(">BBBxxxIxx", 0xA0, 0, 0, 256)
    r = await h.cmd(rl)
    assert r.data[:8] == struct.pack(">I4x", 8) and r.data[8:16] == bytes(8)
    r = await h.cmd(struct.pack(">BBBxxxIxx", 0xA0, 0, 2, 256))
    assert r.data[16:18] == b"\xc1\x01"
    # the REPORT LUNS well-known LUN, addressed by its raw 64-bit LUN field
    r = await h.cmd(rl, lun=0xC101 << 48)
    assert r.status == GOOD
    r = await h.cmd(bytes((0x12, 0, 0, 0, 96, 0)), lun=0xC101 << 48)
    assert r.data[0] == 0x1E
    check(await h.cmd(struct.pack(">BBBxxxIxx", 0xA0, 0, 7, 256)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    check(await h.cmd(struct.pack(">BBBxxxIxx", 0xA0, 0, 0, 8)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


@run
async def test_report_luns_changed_ua(h: Harness) -> None:
    h.dev.set_luns({0: h.lu, 3: h.lu})
    check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.REPORTED_LUNS_DATA_HAS_CHANGED)
    # REPORT LUNS clears it for nexus b
    await h.cmd(struct.pack(">BBBxxxIxx", 0xA0, 0, 0, 256), nx=h.b)
    assert (await h.cmd(bytes(6), nx=h.b)).status == GOOD


@run
async def test_unknown_opcode_and_naca(h: Harness) -> None:
    r = await h.cmd(bytes((0xFF, 0, 0, 0, 0, 0)))
    check(r, S.ILLEGAL_REQUEST, S.INVALID_COMMAND_OPERATION_CODE)
    assert r.sense[15] == 0xC0  # SKSV, C/D: field pointer into the CDB
    check(await h.cmd(bytes((0, 0, 0, 0, 0, 0x04))), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    check(await h.cmd(bytes(6), attr=TaskAttr.ACA), S.ILLEGAL_REQUEST, S.INVALID_MESSAGE_ERROR)
    check(await h.cmd(bytes((0x9E, 0x1F)) + bytes(14)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


# --- READ / WRITE / capacity ----------------------------------------------------------


@run
async def test_read_write_roundtrip_and_ranges(h: Harness) -> None:
    blocks = h.lu.num_blocks
    payload = os.urandom(8 * 512)
    assert (await h.cmd(rw10(0x2A, 100, 8), payload)).status == GOOD
    r = await h.cmd(rw16(0x88, 100, 8))
    assert r.status == GOOD and r.data == payload
    r = await h.cmd(struct.pack(">BBIIBB", 0xA8, 0, 100, 8, 0, 0))  # READ(12)
    assert r.data == payload
    r = await h.cmd(bytes((0x08, 0, 0, 100, 8, 0)))  # READ(6)
    assert r.data == payload
    check(await h.cmd(rw10(0x28, blocks - 1, 2)), S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    check(await h.cmd(rw16(0x88, 2**64 - 1, 1)), S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    check(await h.cmd(rw10(0x28, blocks + 1, 0)), S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    assert (await h.cmd(rw10(0x28, 0, 0))).status == GOOD
    check(await h.cmd(rw10(0x28, 0, 1, 0x20)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)  # RDPROTECT
    check(await h.cmd(rw10(0x2A, 0, 1, 0x40), bytes(512)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    # READ CAPACITY
    r = await h.cmd(bytes((0x25,)) + bytes(9))
    assert struct.unpack(">II", r.data) == (blocks - 1, 512)
    r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
    last, bs, _p, exp, flags = struct.unpack_from(">QIBBH", r.data)
    assert (last, bs, exp) == (blocks - 1, 512, 3) and flags & 0xC000 == 0xC000  # LBPME LBPRZ


@run
async def test_short_data_out_writes_only_whole_blocks(h: Harness) -> None:
    await h.cmd(rw10(0x2A, 0, 2), b"a" * 1024)
    r = await h.cmd(rw10(0x2A, 0, 2), b"b" * 512, expected_len=512)
    assert r.status == GOOD and r.task.xfer_len == 1024
    assert (await h.cmd(rw10(0x28, 0, 2))).data == b"b" * 512 + b"a" * 512


@run
async def test_fua_and_synchronize_cache(h: Harness) -> None:
    assert (await h.cmd(rw10(0x2A, 0, 1, 0x08), b"f" * 512)).status == GOOD
    assert (await h.cmd(rw10(0x35, 0, 0))).status == GOOD
    check(await h.cmd(rw10(0x35, h.lu.num_blocks, 1)), S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    assert (await h.cmd(rw16(0x91, 0, 8))).status == GOOD


@run
async def test_verify_and_write_verify(h: Harness) -> None:
    data = os.urandom(1024)
    await h.cmd(rw10(0x2A, 10, 2), data)
    assert (await h.cmd(rw10(0x2F, 10, 2, 0x02), data)).status == GOOD  # BYTCHK=1
    bad = bytearray(data)
    bad[700] ^= 1
    r = await h.cmd(rw10(0x2F, 10, 2, 0x02), bytes(bad))
    check(r, S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY)
    assert r.sense[0] & 0x80 and struct.unpack_from(">I", r.sense, 3)[0] == 700
    assert (await h.cmd(rw10(0x2F, 10, 2))).status == GOOD  # BYTCHK=0: medium check
    check(await h.cmd(rw10(0x2F, 10, 2, 0x04)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)  # BYTCHK=2
    await h.cmd(rw10(0x2A, 20, 2), b"z" * 1024)
    assert (await h.cmd(rw10(0x2F, 20, 2, 0x06), b"z" * 512)).status == GOOD  # BYTCHK=3
    assert (await h.cmd(rw10(0x2E, 30, 1, 0x02), b"w" * 512)).status == GOOD
    assert (await h.cmd(rw10(0x28, 30, 1))).data == b"w" * 512


@run
async def test_compare_and_write(h: Harness) -> None:
    await h.cmd(rw10(0x2A, 5, 1), b"o" * 512)
    cdb = struct.pack(">BBQxxxBxB", 0x89, 0, 5, 1, 0)
    assert (await h.cmd(cdb, b"o" * 512 + b"n" * 512)).status == GOOD
    assert (await h.cmd(rw10(0x28, 5, 1))).data == b"n" * 512
    r = await h.cmd(cdb, b"o" * 512 + b"x" * 512)
    check(r, S.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY)
    assert struct.unpack_from(">I", r.sense, 3)[0] == 0
    assert (await h.cmd(rw10(0x28, 5, 1))).data == b"n" * 512  # nothing written
    check(await h.cmd(cdb, b"n" * 512 * 4), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)  # data-out size


@run
async def test_compare_and_write_is_atomic_against_writes(h: Harness) -> None:
    await h.cmd(rw10(0x2A, 0, 1), b"0" * 512)
    cdb = struct.pack(">BBQxxxBxB", 0x89, 0, 0, 1, 0)
    # Many CAWs racing with plain writes of the same block: every CAW either sees exactly
    # the value it compares against or fails cleanly; the block never tears.
    jobs = []
    for _ in range(20):
        jobs.append(h.cmd(cdb, b"0" * 512 + b"1" * 512))
        jobs.append(h.cmd(rw10(0x2A, 0, 1), b"0" * 512))
    results = await asyncio.gather(*jobs)
    assert all(r.status in (GOOD, CC) for r in results)
    final = (await h.cmd(rw10(0x28, 0, 1))).data
    assert final in (b"0" * 512, b"1" * 512)


# --- thin provisioning ----------------------------------------------------------------


async def _lba_status(h: Harness, lba: int) -> list[tuple[int, int, int]]:
    r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, lba, 4096, 0, 0))
    assert r.status == GOOD
    n = (struct.unpack_from(">I", r.data)[0] - 4) // 16
    return [struct.unpack_from(">QIB", r.data, 8 + 16 * i) for i in range(n)]


@run
async def test_unmap_and_get_lba_status(h: Harness) -> None:
    desc = await _lba_status(h, 0)
    assert desc[0] == (0, h.lu.num_blocks, 1)  # a fresh sparse extent is all deallocated
    await h.cmd(rw10(0x2A, 0, 64), b"\xff" * 64 * 512)
    desc = await _lba_status(h, 0)
    assert desc[0] == (0, 64, 0) and desc[1][2] == 1
    param = struct.pack(">HH4xQI4x", 22, 16, 16, 16)
    assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x42, 0, len(param), 0), param)).status == GOOD
    desc = await _lba_status(h, 0)
    assert desc[:3] == [(0, 16, 0), (16, 16, 1), (32, 32, 0)]
    assert (await h.cmd(rw10(0x28, 16, 16))).data == bytes(16 * 512)
    check(await _unmap_raw(h, struct.pack(">HH4xQI4x", 22, 16, h.lu.num_blocks, 1)),
          S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    check(await _unmap_raw(h, b"\0\0"), S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
    check(await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, h.lu.num_blocks, 64, 0, 0)),
          S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)


async def _unmap_raw(h: Harness, param: bytes) -> Any:
    return await h.cmd(struct.pack(">BBxxxxxHB", 0x42, 0, len(param), 0), param)


@run
async def test_write_same(h: Harness) -> None:
    pattern = bytes(range(256)) * 2
    cdb = struct.pack(">BBIBHB", 0x41, 0, 200, 0, 10, 0)
    assert (await h.cmd(cdb, pattern)).status == GOOD
    assert (await h.cmd(rw10(0x28, 200, 10))).data == pattern * 10
    # UNMAP bit deallocates, and the blocks read back as zeroes (LBPRZ)
    cdb = struct.pack(">BBIBHB", 0x41, 0x08, 200, 0, 8, 0)
    assert (await h.cmd(cdb, bytes(512))).status == GOOD
    assert (await h.cmd(rw10(0x28, 200, 8))).data == bytes(8 * 512)
    assert (await _lba_status(h, 200))[0] == (200, 8, 1)
    # ANCHOR without ANC_SUP; data-out not exactly one block
    check(await h.cmd(struct.pack(">BBIBHB", 0x41, 0x18, 0, 0, 1, 0), bytes(512)),
          S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    check(await h.cmd(struct.pack(">BBIBHB", 0x41, 0x08, 0, 0, 1, 0), bytes(1024)),
          S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    # zero blocks = to the end of the medium (WSNZ=0)
    last = h.lu.num_blocks - 3
    await h.cmd(rw16(0x8A, last, 3), b"\xee" * 1536)
    assert (await h.cmd(struct.pack(">BBQIBB", 0x93, 0x08, last, 0, 0, 0), bytes(512))).status == GOOD
    assert (await h.cmd(rw16(0x88, last, 3))).data == bytes(1536)


# --- mode pages, sense format, write protect ----------------------------------------


async def _control_page(h: Harness, pc: int = 0) -> bytes:
    r = await h.cmd(bytes((0x1A, 0x08, (pc << 6) | 0x0A, 0, 255, 0)))
    assert r.status == GOOD
    return r.data[4:]


async def _select_control(h: Harness, page: bytes) -> Any:
    data = bytes(4) + page
    return await h.cmd(bytes((0x15, 0x10, 0, 0, len(data), 0)), data)


@run
async def test_mode_sense_pages(h: Harness) -> None:
    r = await h.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)))
    assert r.status == GOOD and r.data[0] == len(r.data) - 1 and r.data[3] == 8
    assert r.data[2] & 0x10  # DPOFUA
    r = await h.cmd(struct.pack(">BBBBxxxHB", 0x5A, 0x10, 0x3F, 0, 1024, 0))  # LLBAA
    assert struct.unpack_from(">H", r.data, 6)[0] == 16
    r = await h.cmd(bytes((0x1A, 0, 0x3F, 0, 4, 0)))
    assert len(r.data) == 4 and r.task.data_in_len == 4
    ch = await _control_page(h, 1)
    assert ch[2] & 0x04 and ch[4] & 0x08  # D_SENSE and SWP are changeable
    check(await h.cmd(bytes((0x1A, 0, 0x2B, 0, 255, 0))), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


@run
async def test_d_sense_selects_descriptor_format(h: Harness) -> None:
    page = bytearray(await _control_page(h))
    page[2] |= 0x04
    assert (await _select_control(h, bytes(page))).status == GOOD
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.MODE_PARAMETERS_CHANGED)
    r = await h.cmd(rw16(0x88, 2**64 - 1, 1))
    assert r.sense[0] == 0x72 and r.key_asc == (S.ILLEGAL_REQUEST, 0x21, 0)
    # changing a bit that is not changeable is refused
    page[3] ^= 0x02
    check(await _select_control(h, bytes(page)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_PARAMETER_LIST)


@run
async def test_swp_write_protects(h: Harness) -> None:
    page = bytearray(await _control_page(h))
    page[4] |= 0x08
    assert (await _select_control(h, bytes(page))).status == GOOD
    check(await h.cmd(rw10(0x2A, 0, 1), bytes(512)), S.DATA_PROTECT, S.WRITE_PROTECTED)
    assert (await h.cmd(rw10(0x28, 0, 1))).status == GOOD
    r = await h.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)))
    assert r.data[2] & 0x80  # WP


@run
async def test_request_sense_reports_and_clears_ua(h: Harness) -> None:
    h.lu.add_ua_all(S.CAPACITY_DATA_HAS_CHANGED)
    r = await h.cmd(bytes((0x03, 0, 0, 0, 252, 0)))
    assert r.status == GOOD and S.sense_key_asc(r.data) == (S.UNIT_ATTENTION, 0x2A, 0x09)
    r = await h.cmd(bytes((0x03, 1, 0, 0, 252, 0)))  # DESC=1, nothing pending
    assert r.data[0] == 0x72 and r.data[1] == 0
    assert (await h.cmd(bytes(6))).status == GOOD


# --- reservations -----------------------------------------------------------------


@run
async def test_persistent_reservation_between_two_nexuses(h: Harness) -> None:
    cdb, data = pr_out(0x00, 0, 0xAAAA)
    assert (await h.cmd(cdb, data)).status == GOOD
    cdb, data = pr_out(0x00, 0, 0xBBBB)
    assert (await h.cmd(cdb, data, nx=h.b)).status == GOOD
    r = await h.cmd(pr_in(0x00))
    gen, length = struct.unpack_from(">II", r.data)
    assert gen == 2 and sorted(struct.unpack_from(">2Q", r.data, 8)) == [0xAAAA, 0xBBBB]
    # a reads-keeps-working WRITE EXCLUSIVE reservation by a
    cdb, data = pr_out(0x01, 0xAAAA, 0, rtype=1)
    assert (await h.cmd(cdb, data)).status == GOOD
    r = await h.cmd(pr_in(0x01))
    assert struct.unpack_from(">IIQ", r.data)[1:] == (16, 0xAAAA) and r.data[21] == 1
    assert (await h.cmd(rw10(0x28, 0, 1), nx=h.b)).status == GOOD
    assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512), nx=h.b)).status == RC
    assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512))).status == GOOD
    # wrong key -> conflict; b preempts a and gets the reservation
    cdb, data = pr_out(0x01, 0x1234, 0, rtype=1)
    assert (await h.cmd(cdb, data, nx=h.b)).status == RC
    cdb, data = pr_out(0x04, 0xBBBB, 0xAAAA, rtype=3)
    assert (await h.cmd(cdb, data, nx=h.b)).status == GOOD
    check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.REGISTRATIONS_PREEMPTED)
    assert (await h.cmd(rw10(0x28, 0, 1))).status == RC  # exclusive access now, a unregistered
    # READ FULL STATUS shows b as holder with an iSCSI TransportID
    r = await h.cmd(pr_in(0x03))
    assert r.data[8:16] == struct.pack(">Q", 0xBBBB) and r.data[20] & 0x01 and r.data[21] == 3
    assert b"iqn.1994-05.com.example:b,i,0x23d000000002" in r.data
    # CLEAR
    cdb, data = pr_out(0x03, 0xBBBB, 0)
    assert (await h.cmd(cdb, data, nx=h.b)).status == GOOD
    assert (await h.cmd(rw10(0x28, 0, 1))).status == GOOD


@run
async def test_pr_capabilities_and_errors(h: Harness) -> None:
    r = await h.cmd(pr_in(0x02))
    assert struct.unpack_from(">H", r.data)[0] == 8 and r.data[2] & 0x01  # PTPL_C
    check(await h.cmd(pr_in(0x07)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    cdb, data = pr_out(0x00, 0, 1)
    check(await h.cmd(cdb[:5] + struct.pack(">I", 23) + cdb[9:], data[:23]),
          S.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
    cdb, data = pr_out(0x01, 5, 0, rtype=1)
    assert (await h.cmd(cdb, data)).status == RC  # not registered


@pytest.mark.parametrize("rtype,b_reads,b_writes", [(1, True, False), (3, False, False), (5, True, True),
                                                   (6, True, True), (7, True, True), (8, True, True)])
def test_pr_access_by_type(tmp_path: Path, rtype: int, b_reads: bool, b_writes: bool) -> None:
    async def body(h: Harness) -> None:
        c = nexus("iqn.1994-05.com.example:c", 0x23D000000003)
        h.dev.add_nexus(c)
        await h.clear_ua(c)
        for nx, key in ((h.a, 1), (h.b, 2)):
            cdb, data = pr_out(0x00, 0, key)
            assert (await h.cmd(cdb, data, nx=nx)).status == GOOD
        cdb, data = pr_out(0x01, 1, 0, rtype=rtype)
        assert (await h.cmd(cdb, data)).status == GOOD
        # b is registered, c is not
        assert ((await h.cmd(rw10(0x28, 0, 1), nx=h.b)).status == GOOD) == b_reads
        assert ((await h.cmd(rw10(0x2A, 0, 1), bytes(512), nx=h.b)).status == GOOD) == b_writes
        assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512), nx=c)).status == RC
        assert ((await h.cmd(rw10(0x28, 0, 1), nx=c)).status == GOOD) == (rtype in (1, 5, 7))
        assert (await h.cmd(bytes(6), nx=c)).status == GOOD  # TEST UNIT READY always allowed

    asyncio.run(_with_harness(tmp_path, body))


async def _with_harness(tmp_path: Path, body: Callable[[Harness], Awaitable[None]], **kw: Any) -> None:
    h = Harness(tmp_path, **kw)
    try:
        await h.clear_ua(h.a)
        await h.clear_ua(h.b)
        await body(h)
    finally:
        h.close()


def test_pr_aptpl_survives_reopen(tmp_path: Path) -> None:
    store = MemoryPrStore()
    seen: list[Any] = []

    async def first(h: Harness) -> None:
        seen.append(h.ext)
        cdb, data = pr_out(0x00, 0, 0x77, flags=0x01)  # APTPL
        assert (await h.cmd(cdb, data)).status == GOOD
        cdb, data = pr_out(0x01, 0x77, 0, rtype=3)
        assert (await h.cmd(cdb, data)).status == GOOD

    asyncio.run(_with_harness(tmp_path, first, store=store))

    async def second() -> None:
        scsi = Scsi(store)
        lu = scsi.open(seen[0])
        dev = scsi.device()
        dev.set_luns({0: lu})
        assert lu.pr.regs and lu.pr.reservation is not None and lu.pr.reservation.type == 3
        assert lu.pr.aptpl
        dev.close()
        lu.close()
        scsi.close()

    asyncio.run(second())


@run
async def test_reserve6_release6(h: Harness) -> None:
    assert (await h.cmd(bytes((0x16, 0, 0, 0, 0, 0)))).status == GOOD
    assert (await h.cmd(bytes(6), nx=h.b)).status == RC
    assert (await h.cmd(bytes((0x12, 0, 0, 0, 96, 0)), nx=h.b)).status == GOOD
    assert (await h.cmd(bytes((0x16, 0, 0, 0, 0, 0)), nx=h.b)).status == RC
    assert (await h.cmd(bytes((0x17, 0, 0, 0, 0, 0)), nx=h.b)).status == GOOD  # no-op
    assert (await h.cmd(bytes(6), nx=h.b)).status == RC
    h.dev.nexus_lost(h.a)  # I_T nexus loss releases it
    assert (await h.cmd(bytes(6), nx=h.b)).status == GOOD


# --- task management --------------------------------------------------------------


@run
async def test_lun_reset_releases_and_raises_ua(h: Harness) -> None:
    await h.cmd(bytes((0x16, 0, 0, 0, 0, 0)))
    assert h.dev.lun_reset(h.a, 0) == 0
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.BUS_DEVICE_RESET_OCCURRED)
    assert (await h.cmd(bytes(6), nx=h.b)).status == GOOD
    assert h.dev.lun_reset(h.a, 9) == 2  # NO_SUCH_LUN


@run
async def test_ordered_task_waits_and_abort_task_set(h: Harness) -> None:
    loop = asyncio.get_running_loop()
    done: list[int] = []
    from pyscsi_target.scsi.task import ScsiTask

    def mk(tag: int, cdb: bytes, attr: TaskAttr, data: bytes | None = None) -> ScsiTask:
        return ScsiTask(h.a, 0, cdb, tag, attr, len(data) if data else 4096, data,
                        lambda t: done.append(t.tag))

    # a write goes to the thread pool; an ORDERED TUR must wait for it
    h.dev.submit(mk(1, rw10(0x2A, 0, 8), TaskAttr.SIMPLE, bytes(4096)))
    h.dev.submit(mk(2, bytes(6), TaskAttr.ORDERED))
    h.dev.submit(mk(3, bytes(6), TaskAttr.SIMPLE))
    assert 2 not in done and 3 not in done
    h.dev.submit(mk(4, bytes(6), TaskAttr.HEAD_OF_QUEUE))
    assert 4 in done
    for _ in range(100):
        if 3 in done:
            break
        await asyncio.sleep(0.01)
    assert done.index(1) < done.index(2) < done.index(3)
    # abort a queued task: it completes at once with aborted set
    t5 = mk(5, rw10(0x2A, 0, 8), TaskAttr.SIMPLE, bytes(4096))
    t6 = mk(6, bytes(6), TaskAttr.ORDERED)
    h.dev.submit(t5)
    h.dev.submit(t6)
    assert h.dev.abort_task(h.a, 0, 6) == 0 and t6.aborted and 6 in done
    assert h.dev.abort_task(h.a, 0, 99) == 1
    await asyncio.sleep(0.05)
    _ = loop


@run
async def test_start_stop_unit(h: Harness) -> None:
    assert (await h.cmd(bytes((0x1B, 0, 0, 0, 0x00, 0)))).status == GOOD
    check(await h.cmd(bytes(6)), S.NOT_READY, S.LUN_NOT_READY_INIT_REQUIRED)
    assert (await h.cmd(bytes((0x12, 0, 0, 0, 96, 0)))).status == GOOD
    assert (await h.cmd(bytes((0x1B, 0, 0, 0, 0x01, 0)))).status == GOOD
    assert (await h.cmd(bytes(6))).status == GOOD


@run
async def test_sanitize_block_erase_and_overwrite(h: Harness) -> None:
    await h.cmd(rw10(0x2A, 0, 4), b"s" * 2048)
    assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x02, 0, 0))).status == GOOD
    assert (await _lba_status(h, 0))[0] == (0, h.lu.num_blocks, 1)
    param = struct.pack(">BxH", 1, 4) + b"\xde\xad\xbe\xef"
    assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x01, len(param), 0), param)).status == GOOD
    assert (await h.cmd(rw10(0x28, 7, 1))).data == b"\xde\xad\xbe\xef" * 128
    check(await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x03, 0, 0)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


@run
async def test_report_supported_opcodes(h: Harness) -> None:
    r = await h.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x80, 0, 0, 65535, 0))
    assert r.status == GOOD
    n = struct.unpack_from(">I", r.data)[0]
    ops = set()
    pos = 4
    while pos < 4 + n:
        op, _r, sa, _r2, flags, cdblen = struct.unpack_from(">BBHBBH", r.data, pos)
        ops.add((op, sa if flags & 1 else None))
        assert flags & 0x02  # CTDP with RCTD
        pos += 8 + 12
    assert {(0x28, None), (0x89, None), (0x9E, 0x10), (0x48, 0x02), (0x83, 0x00)} <= ops
    r = await h.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x01, 0x28, 0, 64, 0))
    assert r.data[1] & 0x07 == 3 and r.data[4] == 0x28
    check(await h.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x01, 0x9E, 0x10, 64, 0)),
          S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    r = await h.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0D, 0, 0, 0, 16, 0))
    assert r.data[0] & 0x08  # LURS


@run
async def test_report_target_port_groups(h: Harness) -> None:
    h.dev.set_portal_groups([1, 2])
    r = await h.cmd(struct.pack(">BBxxxxIxB", 0xA3, 0x0A, 1024, 0))
    assert struct.unpack_from(">I", r.data)[0] == 2 * 12
    assert struct.unpack_from(">H", r.data, 6)[0] == 1 and struct.unpack_from(">H", r.data, 18)[0] == 2


@run
async def test_extended_copy_between_lus(h: Harness) -> None:
    tmp = Path(h.ext.path).parent
    other = h.scsi.open(make_extent(tmp, name="dst"))
    try:
        h.dev.set_luns({0: h.lu, 1: other})
        await h.clear_ua(h.a)
        await h.clear_ua(h.a, lun=1)
        src = os.urandom(16 * 512)
        await h.cmd(rw10(0x2A, 0, 16), src)

        def cscd(naa: bytes) -> bytes:
            return bytes((0xE4, 0, 0, 0, 0x01, 0x03, 0, 8)) + naa + bytes(12) + bytes((0, 0, 2, 0))

        seg = struct.pack(">BBHHHxxHQQ", 0x02, 0, 0x18, 0, 1, 16, 0, 100)
        tds = cscd(h.lu.naa) + cscd(other.naa)
        param = struct.pack(">BBHxxxxII", 7, 0, len(tds), len(seg), 0) + tds + seg
        cdb = struct.pack(">BBxxxxxxxxIxB", 0x83, 0, len(param), 0)
        r = await h.cmd(cdb, param)
        assert r.status == GOOD, r
        assert (await h.cmd(rw10(0x28, 100, 16), lun=1)).data == src
        r = await h.cmd(struct.pack(">BBBxxxxxxxIxB", 0x84, 0x00, 7, 64, 0))
        assert r.data[4] == 0x01 and struct.unpack_from(">H", r.data, 5)[0] == 1
        # unknown list identifier, unknown LU, too many segments
        check(await h.cmd(struct.pack(">BBBxxxxxxxIxB", 0x84, 0x00, 8, 64, 0)),
              S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        bad = cscd(b"\x39" * 8) + cscd(other.naa)
        param = struct.pack(">BBHxxxxII", 8, 0, len(bad), len(seg), 0) + bad + seg
        check(await h.cmd(struct.pack(">BBxxxxxxxxIxB", 0x83, 0, len(param), 0), param),
              S.COPY_ABORTED, S.COPY_TARGET_DEVICE_NOT_REACHABLE)
        segs = seg * 17
        param = struct.pack(">BBHxxxxII", 9, 0, len(tds), len(segs), 0) + tds + segs
        check(await h.cmd(struct.pack(">BBxxxxxxxxIxB", 0x83, 0, len(param), 0), param),
              S.ILLEGAL_REQUEST, S.TOO_MANY_SEGMENT_DESCRIPTORS)
    finally:
        other.close()


def test_read_only_extent(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        check(await h.cmd(rw10(0x2A, 0, 1), bytes(512)), S.DATA_PROTECT, S.WRITE_PROTECTED)
        check(await _unmap_raw(h, struct.pack(">HH4xQI4x", 22, 16, 0, 1)), S.DATA_PROTECT, S.WRITE_PROTECTED)
        assert (await h.cmd(rw10(0x28, 0, 1))).status == GOOD
        r = await h.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)))
        assert r.data[2] & 0x80

    async def main() -> None:
        ext = make_extent(tmp_path, name="ro")
        ext.ro = True
        h = Harness.__new__(Harness)
        h.store = MemoryPrStore()
        h.scsi = Scsi(h.store)
        h.ext = ext
        h.lu = h.scsi.open(ext)
        h.dev = h.scsi.device("iqn.2026-11.org.pyscsi-target:ro")
        h.dev.set_luns({0: h.lu})
        h.a = nexus(target="iqn.2026-11.org.pyscsi-target:ro")
        h.b = nexus("iqn.1994-05.com.example:b", 2, target="iqn.2026-11.org.pyscsi-target:ro")
        h.dev.add_nexus(h.a)
        await h.clear_ua()
        try:
            await body(h)
        finally:
            h.close()

    asyncio.run(main())


def test_4096_byte_blocks(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
        last, bs, _p, exp, _f = struct.unpack_from(">QIBBH", r.data)
        assert bs == 4096 and exp == 0 and last == (64 << 20) // 4096 - 1
        data = os.urandom(3 * 4096)
        assert (await h.cmd(rw10(0x2A, 5, 3), data)).status == GOOD
        assert (await h.cmd(rw10(0x28, 5, 3))).data == data
        param = struct.pack(">HH4xQI4x", 22, 16, 6, 1)
        assert (await _unmap_raw(h, param)).status == GOOD
        assert (await _lba_status(h, 5))[:3] == [(5, 1, 0), (6, 1, 1), (7, 1, 0)]
        assert (await h.cmd(rw10(0x28, 6, 1))).data == bytes(4096)

    asyncio.run(_with_harness(tmp_path, body, blocksize=4096))


def test_write_same_length_limit(tmp_path: Path) -> None:
    """MAXIMUM WRITE SAME LENGTH is one WRITE's worth and longer WRITE SAMEs (also n=0
    reaching further) fail with INVALID FIELD IN CDB (inbox 12:28, 4 KiB LU)."""
    from pyscsi_target.scsi.task import MAX_TRANSFER_BYTES

    async def body(h: Harness) -> None:
        bl = (await h.cmd(bytes((0x12, 1, 0xB0, 0, 64, 0)))).data
        max_ws = struct.unpack_from(">Q", bl, 36)[0]
        max_xfer = struct.unpack_from(">I", bl, 8)[0]
        assert max_ws == MAX_TRANSFER_BYTES // 4096 == max_xfer
        assert h.lu.num_blocks > max_ws
        ws16 = lambda lba, n, fl=0x08: struct.pack(">BBQIBB", 0x93, fl, lba, n, 0, 0)  # noqa: E731
        # a range one WRITE can map, one WRITE SAME can unmap
        assert (await h.cmd(rw16(0x8A, 0, 16), b"\xff" * 16 * 4096)).status == GOOD
        assert (await h.cmd(ws16(0, max_ws), bytes(4096))).status == GOOD
        assert (await h.cmd(rw16(0x88, 0, 16))).data == bytes(16 * 4096)
        check(await h.cmd(ws16(0, max_ws + 1), bytes(4096)), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        check(await h.cmd(ws16(0, max_ws + 1, 0), b"\x01" * 4096), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        # NUMBER OF LOGICAL BLOCKS 0 = to the end: refused when that is too far, else done
        check(await h.cmd(ws16(h.lu.num_blocks - max_ws - 1, 0), bytes(4096)),
              S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
        await h.cmd(rw16(0x8A, h.lu.num_blocks - 1, 1), b"\xee" * 4096)
        assert (await h.cmd(ws16(h.lu.num_blocks - max_ws, 0), bytes(4096))).status == GOOD
        assert (await h.cmd(rw16(0x88, h.lu.num_blocks - 1, 1))).data == bytes(4096)
        # WRITE SAME(10) shares the limit
        check(await h.cmd(struct.pack(">BBIBHB", 0x41, 0, 0, 0, max_ws + 1, 0), bytes(4096)),
              S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)

    asyncio.run(_with_harness(tmp_path, body, blocksize=4096, size=128 << 20))


def test_disk_extent_provisioning_on_loop_device(tmp_path: Path) -> None:
    """Disk extent (loop device over a sparse file): UNMAP and SANITIZE BLOCK ERASE use the
    device's own deallocation and GET LBA STATUS reports what was deallocated (inbox 12:40)."""
    from support.loop_device import loop_device

    from pyscsi_target.config.model import Extent

    backing = tmp_path / "disk.img"

    async def body(h: Harness) -> None:
        n = h.lu.num_blocks
        r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
        assert r.data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
        assert await _lba_status(h, 0) == [(0, n, 0)]  # nothing known deallocated yet
        await h.cmd(rw10(0x2A, 0, 2048), b"d" * (1 << 20))
        param = struct.pack(">HH4xQI4x", 22, 16, 256, 512)
        assert (await _unmap_raw(h, param)).status == GOOD
        assert (await _lba_status(h, 0))[:3] == [(0, 256, 0), (256, 512, 1), (768, n - 768, 0)]
        assert (await h.cmd(rw10(0x28, 300, 1))).data == bytes(512)
        assert (await h.cmd(rw10(0x28, 100, 1))).data == b"d" * 512
        await h.cmd(rw10(0x2A, 300, 1), b"m" * 512)  # written again: mapped
        # a device's allocation is unknown: no threshold UA (avail_threshold=1), no made-up
        # LOG SENSE provisioning counts
        assert (await h.cmd(bytes(6))).status == GOOD
        r = await h.cmd(struct.pack(">BBBBxHHB", 0x4D, 0, 0x4C, 0, 0, 64, 0))
        assert r.status == GOOD and r.data == bytes((0x0C, 0, 0, 0))
        assert (await _lba_status(h, 256))[:3] == [(256, 44, 1), (300, 1, 0), (301, 467, 1)]
        assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x02, 0, 0))).status == GOOD
        assert await _lba_status(h, 0) == [(0, n, 1)]
        assert (await h.cmd(rw10(0x28, 100, 1))).data == bytes(512)
        assert os.stat(backing).st_blocks == 0  # the erase really freed the backing space

    with loop_device(backing, 16 << 20) as dev:
        ext = Extent(id=4242, name="loopdisk", type="Disk", path=dev, pblocksize=True, avail_threshold=1)
        asyncio.run(_with_harness(tmp_path, body, extent=ext))


def test_capacity_change_ua(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        ext = h.ext
        ext.filesize = str(128 << 20)
        h.reconfigure(ext)
        check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.CAPACITY_DATA_HAS_CHANGED)
        r = await h.cmd(bytes((0x25,)) + bytes(9))
        assert struct.unpack(">II", r.data)[0] == (128 << 20) // 512 - 1

    asyncio.run(_with_harness(tmp_path, body))


def test_thin_threshold_ua(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        # 64 MiB LU, threshold 99 % free: writing 1 MiB leaves 98.4 % and crosses it once
        # (the first WRITE samples; the 1 MiB written spends the budget, so the next samples)
        await h.cmd(rw10(0x2A, 0, 2048), b"t" * (1 << 20))
        await h.cmd(rw10(0x2A, 4096, 1), b"t" * 512)
        check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
        assert (await h.cmd(bytes(6))).status == GOOD

    asyncio.run(_with_harness(tmp_path, body, avail_threshold=99))


def test_pr_aptpl_in_state_database_across_restart(tmp_path: Path) -> None:
    """APTPL registrations and the reservation survive a restart through the SQLite store."""
    from pyscsi_target.config.store import ConfigStore

    ext = make_extent(tmp_path, name="aptpl")

    async def first() -> None:
        store = ConfigStore(tmp_path / "state")
        scsi = Scsi(store.pr_store)
        lu = scsi.open(ext)
        dev = scsi.device("iqn.2026-11.org.pyscsi-target:p")
        dev.set_luns({0: lu})
        a = nexus("iqn.1994-05.com.example:a", 1, target=dev.target_iqn)
        b = nexus("iqn.1994-05.com.example:b", 2, target=dev.target_iqn)
        h = Harness.__new__(Harness)
        h.dev, h.lu, h.a, h.b = dev, lu, a, b
        for n in (a, b):
            dev.add_nexus(n)
            await h.clear_ua(n)
        cdb, data = pr_out(0x00, 0, 0xA1, flags=0x01)
        assert (await h.cmd(cdb, data)).status == GOOD
        # the APTPL bit of the most recent REGISTER decides (SPC-4 5.12.5)
        cdb, data = pr_out(0x00, 0, 0xB2, flags=0x01)
        assert (await h.cmd(cdb, data, nx=b)).status == GOOD
        cdb, data = pr_out(0x01, 0xA1, 0, rtype=5)
        assert (await h.cmd(cdb, data)).status == GOOD
        dev.close()
        lu.close()
        scsi.close()
        store.close()

    async def second() -> None:
        store = ConfigStore(tmp_path / "state")
        scsi = Scsi(store.pr_store)
        lu = scsi.open(ext)
        dev = scsi.device("iqn.2026-11.org.pyscsi-target:p")
        dev.set_luns({0: lu})
        c = nexus("iqn.1994-05.com.example:c", 3, target=dev.target_iqn)
        b = nexus("iqn.1994-05.com.example:b", 2, target=dev.target_iqn)
        h = Harness.__new__(Harness)
        h.dev, h.lu, h.a, h.b = dev, lu, c, b
        for n in (c, b):
            dev.add_nexus(n)
            await h.clear_ua(n)
        r = await h.cmd(pr_in(0x00))
        assert sorted(struct.unpack_from(">2Q", r.data, 8)) == [0xA1, 0xB2]
        r = await h.cmd(pr_in(0x01))
        assert struct.unpack_from(">Q", r.data, 8)[0] == 0xA1 and r.data[21] == 5
        assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512), nx=c)).status == RC  # not registered
        assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512), nx=b)).status == GOOD  # registrant
        r = await h.cmd(pr_in(0x02))
        assert r.data[3] & 0x01  # PTPL_A
        dev.close()
        lu.close()
        scsi.close()
        store.close()

    asyncio.run(first())
    asyncio.run(second())


@run
async def test_log_sense_provisioning_page(h: Harness) -> None:
    r = await h.cmd(struct.pack(">BBBBxHHB", 0x4D, 0, 0x00, 0, 0, 64, 0))
    assert r.status == GOOD and list(r.data[4:]) == [0x00, 0x0C]
    await h.cmd(rw10(0x2A, 0, 64), b"L" * 64 * 512)
    r = await h.cmd(struct.pack(">BBBBxHHB", 0x4D, 0, 0x4C, 0, 0, 64, 0))
    assert r.status == GOOD and r.data[0] == 0x0C
    code, _fl, ln, used, scope = struct.unpack_from(">HBBIB", r.data, 16)
    assert code == 2 and ln == 8 and used >= 64
    check(await h.cmd(struct.pack(">BBBBxHHB", 0x4D, 0, 0x4F, 0, 0, 64, 0)),
          S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)


def test_random_cdbs_always_complete_once(tmp_path: Path) -> None:
    """Malformed CDBs and parameter data never crash the SCSI layer: every command ends
    exactly once with a valid SAM status."""
    import random

    rnd = random.Random(7)

    async def body(h: Harness) -> None:
        from pyscsi_target.scsi.command_table import COMMANDS_BY_OPCODE

        ops = list(COMMANDS_BY_OPCODE) + [rnd.randrange(256) for _ in range(20)]
        for i in range(1500):
            op = ops[i % len(ops)]
            cdb = bytes((op,)) + rnd.randbytes(15)
            data = rnd.randbytes(rnd.choice((0, 8, 24, 512, 1024)))
            calls: list[int] = []
            fut = asyncio.get_running_loop().create_future()

            def done(t: Any, calls: list[int] = calls, fut: asyncio.Future[Any] = fut) -> None:
                calls.append(t.status)
                if not fut.done():
                    fut.set_result(t)

            from pyscsi_target.scsi.task import ScsiTask

            task = ScsiTask(h.a if i % 2 else h.b, rnd.choice((0, 0, 0, 1, 0xC101 << 48)), cdb, 10_000 + i,
                            TaskAttr.SIMPLE, len(data), data or None, done)
            h.dev.submit(task)
            t = await asyncio.wait_for(fut, 30)
            await asyncio.sleep(0)
            assert len(calls) == 1
            assert t.status in (0x00, 0x02, 0x04, 0x08, 0x18, 0x28), t.status
            if h.lu.stopped:
                h.lu.stopped = False
            while h.lu.sanitizing:
                await asyncio.sleep(0.01)
            h.lu.sanitize_failed = False

    asyncio.run(_with_harness(tmp_path, body, size=8 << 20))


@run
async def test_wce_off_makes_writes_synchronous(h: Harness) -> None:
    r = await h.cmd(bytes((0x1A, 0x08, 0x08, 0, 255, 0)))
    page = bytearray(r.data[4:])
    assert page[2] & 0x04  # WCE on by default
    page[2] &= ~0x04
    data = bytes(4) + bytes(page)
    assert (await h.cmd(bytes((0x15, 0x10, 0, 0, len(data), 0)), data)).status == GOOD
    assert not h.lu.modes.wce
    # Durable before GOOD: the data is written and then flushed (fdatasync), whether the
    # backstore does it in one call (fua=True) or the writer flushes after the write.
    events: list[str] = []
    real_write, real_flush = h.lu.backstore.write, h.lu.backstore.flush

    def spy_write(data: Any, off: int, fua: bool = False) -> None:
        real_write(data, off, fua)
        events.append("write+flush" if fua else "write")

    def spy_flush() -> None:
        real_flush()
        events.append("flush")

    h.lu.backstore.write = spy_write  # type: ignore[method-assign]
    h.lu.backstore.flush = spy_flush  # type: ignore[method-assign]
    assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512))).status == GOOD
    assert events in (["write+flush"], ["write", "flush"])


@run
async def test_xen_drops_serial_padding(h: Harness) -> None:
    def t10(data: bytes) -> bytes:
        body = data[4:]
        while body:
            if body[1] & 0x0F == 1:
                return body[4 : 4 + body[3]]
            body = body[4 + body[3] :]
        raise AssertionError("no T10 designator")

    padded = t10((await h.cmd(bytes((0x12, 1, 0x83, 0, 255, 0)))).data)
    assert padded.endswith(b" ") and len(padded) == 8 + 16 + 31
    ext = h.ext
    ext.xen = True
    h.reconfigure(ext)
    check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.INQUIRY_DATA_HAS_CHANGED)
    bare = t10((await h.cmd(bytes((0x12, 1, 0x83, 0, 255, 0)))).data)
    assert bare == padded.rstrip(b" ")


def test_pblocksize_disables_physical_block_reporting(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        r = await h.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
        assert r.data[13] & 0x0F == 0  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT

    asyncio.run(_with_harness(tmp_path, body, pblocksize=True))


@run
async def test_clear_task_set_notifies_other_nexus(h: Harness) -> None:
    from pyscsi_target.scsi.task import ScsiTask

    done: list[ScsiTask] = []
    t = ScsiTask(h.b, 0, rw10(0x2A, 0, 8), 77, TaskAttr.SIMPLE, 4096, bytes(4096), done.append)
    h.dev.submit(t)  # in the thread pool now
    assert h.dev.clear_task_set(h.a, 0) == 0
    assert t.aborted
    for _ in range(100):
        if done:
            break
        await asyncio.sleep(0.01)
    assert done == [t]  # still completed once, for the transport to drop
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)


@run
async def test_target_reset_and_nexus_loss(h: Harness) -> None:
    assert h.dev.target_reset(h.a, cold=False) == 0
    check(await h.cmd(bytes(6)), S.UNIT_ATTENTION, S.POWER_ON_RESET)
    assert h.dev.target_reset(h.a, cold=True) == 0
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.POWER_ON_RESET)  # oldest first
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.POWER_ON_OCCURRED)
    # PR registrations survive nexus loss; RESERVE(6) does not
    cdb, data = pr_out(0x00, 0, 9)
    await h.clear_ua(h.a)
    assert (await h.cmd(cdb, data)).status == GOOD
    h.dev.nexus_lost(h.a)
    assert h.lu.pr.regs


@run
async def test_orwrite_write_atomic_prefetch_defects(h: Harness) -> None:
    await h.cmd(rw10(0x2A, 40, 1), b"\x0f" * 512)
    assert (await h.cmd(rw16(0x8B, 40, 1), b"\xf0" * 512)).status == GOOD  # ORWRITE(16)
    assert (await h.cmd(rw10(0x28, 40, 1))).data == b"\xff" * 512
    check(await h.cmd(rw16(0x8B, 40, 1, 0x20), b"\xf0" * 512), S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    atomic = struct.pack(">BBQHHBB", 0x9C, 0, 48, 0, 8, 0, 0)
    assert (await h.cmd(atomic, b"A" * 4096)).status == GOOD
    assert (await h.cmd(rw10(0x28, 48, 8))).data == b"A" * 4096
    # ATOMIC ALIGNMENT / GRANULARITY are one 4 KiB page (8 blocks)
    check(await h.cmd(struct.pack(">BBQHHBB", 0x9C, 0, 49, 0, 8, 0, 0), b"A" * 4096),
          S.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    check(await h.cmd(struct.pack(">BBQHHBB", 0x9C, 0, h.lu.num_blocks, 0, 8, 0, 0), b"A" * 4096),
          S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    assert (await h.cmd(rw10(0x34, 0, 64))).status == GOOD  # PRE-FETCH(10)
    check(await h.cmd(rw16(0x90, h.lu.num_blocks, 1)), S.ILLEGAL_REQUEST, S.LBA_OUT_OF_RANGE)
    r = await h.cmd(struct.pack(">BBBxxxxHB", 0x37, 0, 0x18 | 0x05, 64, 0))  # READ DEFECT DATA(10)
    assert r.status == GOOD and r.data == bytes((0, 0x1D, 0, 0))  # PLISTV GLISTV: valid, empty


@run
async def test_register_and_move_and_preempt_and_abort(h: Harness) -> None:
    for nx, key in ((h.a, 0xA), (h.b, 0xB)):
        cdb, data = pr_out(0x00, 0, key)
        assert (await h.cmd(cdb, data, nx=nx)).status == GOOD
    cdb, data = pr_out(0x01, 0xA, 0, rtype=1)
    assert (await h.cmd(cdb, data)).status == GOOD
    # REGISTER AND MOVE the reservation to b's I_T nexus, identified by its TransportID
    from pyscsi_target.scsi.pr import transport_id

    tid = transport_id(h.b.initiator_port)
    param = struct.pack(">QQxBHI", 0xA, 0xB, 0x00, h.b.portal_group_tag, len(tid)) + tid
    cdb = struct.pack(">BBBxxIB", 0x5F, 0x07, 0x01, len(param), 0)
    assert (await h.cmd(cdb, param)).status == GOOD
    r = await h.cmd(pr_in(0x01))
    assert struct.unpack_from(">Q", r.data, 8)[0] == 0xB
    assert (await h.cmd(rw10(0x2A, 0, 1), bytes(512))).status == RC  # a no longer holds it
    # PREEMPT AND ABORT: a takes over, b's registration goes, b's queued task is aborted
    from pyscsi_target.scsi.task import ScsiTask

    done: list[ScsiTask] = []
    slow = ScsiTask(h.b, 0, rw10(0x2A, 0, 8), 501, TaskAttr.SIMPLE, 4096, bytes(4096), done.append)
    h.dev.submit(slow)
    cdb, data = pr_out(0x05, 0xA, 0xB, rtype=3)
    assert (await h.cmd(cdb, data)).status == GOOD
    assert slow.aborted or done
    check(await h.cmd(bytes(6), nx=h.b), S.UNIT_ATTENTION, S.REGISTRATIONS_PREEMPTED)
    assert 0xB not in h.lu.pr.regs.values()


@run
async def test_sanitize_immed_reports_progress(h: Harness) -> None:
    param = struct.pack(">BxH", 2, 512) + b"\x5a" * 512  # two passes
    assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x81, len(param), 0), param)).status == GOOD
    seen_progress = False
    for _ in range(500):
        if not h.lu.sanitizing:
            break
        check(await h.cmd(rw10(0x28, 0, 1)), S.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS)
        r = await h.cmd(bytes((0x03, 0, 0, 0, 18, 0)))
        if not h.lu.sanitizing and S.sense_key_asc(r.data) == (S.NO_SENSE, 0, 0):
            break  # it completed between the two commands
        assert S.sense_key_asc(r.data) == (S.NOT_READY, 0x04, 0x1B) and r.data[15] == 0x80
        seen_progress = True
        await asyncio.sleep(0.005)
    assert not h.lu.sanitizing
    assert (await h.cmd(rw10(0x28, 3, 1))).data == b"\x5a" * 512
    _ = seen_progress  # a fast disk may finish before the first poll


def test_sanitize_overwrite_is_durable_chunked_and_reports_progress(tmp_path: Path) -> None:
    """SANITIZE OVERWRITE: every chunk written through and a final flush before GOOD; chunks
    are separate thread-pool jobs, so another LU's I/O is served while it runs on a one-thread
    pool; TEST UNIT READY reports SANITIZE IN PROGRESS with progress, across an LU reset."""
    from concurrent.futures import ThreadPoolExecutor

    from pyscsi_target.scsi import sanitize

    other_ext = make_extent(tmp_path, size=8 << 20, name="other")

    async def body(h: Harness) -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        bs = h.lu.backstore
        ops: list[tuple[str, bool]] = []
        real_write, real_flush = bs.write, bs.flush

        def write(data: Any, offset: int, fua: bool = False) -> None:
            ops.append(("write", fua))
            real_write(data, offset, fua)

        def flush() -> None:
            ops.append(("flush", True))
            real_flush()

        bs.write, bs.flush = write, flush  # type: ignore[method-assign]
        # not IMMED: GOOD only once everything is durable
        param = struct.pack(">BxH", 1, 4) + b"\x11\x22\x33\x44"
        assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x01, len(param), 0), param)).status == GOOD
        chunks = (h.lu.num_blocks << h.lu.block_shift) // sanitize.SANITIZE_CHUNK
        # each chunk written through (write + fdatasync), then a final flush
        assert ops == [("write", True), ("flush", True)] * chunks + [("flush", True)]
        ops.clear()
        # IMMED, three passes: progress while it runs, another LU's synchronous write meanwhile
        other = h.scsi.open(other_ext)
        h.dev.set_luns({0: h.lu, 1: other})
        await h.clear_ua(h.a, lun=1)
        await h.clear_ua(h.a, lun=0)
        param = struct.pack(">BxH", 3, 512) + b"\x77" * 512
        assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x81, len(param), 0), param)).status == GOOD
        r = await h.cmd(bytes(6))
        check(r, S.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS)
        assert r.sense is not None and r.sense[15] & 0x80  # SKSV: progress indication
        assert (await h.cmd(rw10(0x2A, 0, 8, 0x08), b"o" * 4096, lun=1)).status == GOOD  # FUA: a thread job
        assert h.lu.sanitizing, "the other LU's write waited for the whole sanitize"
        assert h.dev.lun_reset(h.a, 0) == 0
        progress = []
        for _ in range(2000):
            r = await h.cmd(bytes(6))
            if r.status == GOOD:
                break
            if r.key_asc == (S.UNIT_ATTENTION, *S.BUS_DEVICE_RESET_OCCURRED):
                continue
            check(r, S.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS)
            assert r.sense is not None
            progress.append(struct.unpack_from(">H", r.sense, 16)[0])
            await asyncio.sleep(0.002)
        assert not h.lu.sanitizing and not h.lu.sanitize_failed
        assert progress == sorted(progress) and progress
        assert ops[-1] == ("flush", True) and all(fua for _, fua in ops)
        assert (await h.cmd(rw10(0x28, h.lu.num_blocks - 1, 1))).data == b"\x77" * 512
        other.close()

    asyncio.run(_with_harness(tmp_path, body))


def test_sanitize_interrupted_by_close_resumes_on_reopen(tmp_path: Path) -> None:
    """A SANITIZE cut short by the LU's close (daemon restart, extent reopened) runs again when
    the LU is opened with the same state store: partially sanitized data is never served."""

    async def body(h: Harness) -> None:
        await h.cmd(rw10(0x2A, h.lu.num_blocks - 8, 8), b"secret!!" * 512)
        param = struct.pack(">BxH", 4, 8) + b"\xa5" * 8
        assert (await h.cmd(struct.pack(">BBxxxxxHB", 0x48, 0x81, len(param), 0), param)).status == GOOD
        old = h.lu
        while old.sanitize_progress == 0.0:
            await asyncio.sleep(0.001)
        assert old.sanitizing and h.store.data.get(f"sanitize:{old.naa.hex()}")
        old.close()  # mid-operation; the step in the worker thread still owns the fd
        while not old.backstore.closed:
            await asyncio.sleep(0.005)
        assert old.sanitizing  # it did not complete
        new = h.scsi.open(h.ext)
        h.lu = new
        h.dev.set_luns({0: new})
        assert new.sanitizing
        r = await h.cmd(bytes(6))
        while r.status != GOOD:
            if r.key_asc != (S.UNIT_ATTENTION, *S.REPORTED_LUNS_DATA_HAS_CHANGED):
                check(r, S.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS)
            await asyncio.sleep(0.01)
            r = await h.cmd(bytes(6))
        assert not new.sanitize_failed and f"sanitize:{new.naa.hex()}" not in h.store.data
        assert (await h.cmd(rw10(0x28, new.num_blocks - 8, 8))).data == b"\xa5" * 4096

    asyncio.run(_with_harness(tmp_path, body))
