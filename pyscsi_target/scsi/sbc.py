"""SBC-3 block commands on a LogicalUnit's backstore (SANITIZE: scsi/sanitize.py).

Every medium-access handler validates in SBC order (protection fields, transfer length
limits, LBA range, write protection) before it touches the backstore, so a failed
command never has side effects.
"""

from __future__ import annotations

import struct

from pyscsi_target.backstore.base import first_difference
from pyscsi_target.scsi import lu as lumod
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import (
    Command,
    F,
    data_out_len,
    data_out_needed,
    data_out_parts,
    set_data_in,
    usage,
)
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import ScsiTask

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def lba_len(cdb: bytes) -> tuple[int, int]:
    """(LBA, number of blocks) of a READ/WRITE/VERIFY-shaped CDB."""
    op = cdb[0]
    group = op >> 5
    if group == 0:  # 6-byte
        n = cdb[4]
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], (n or 256)
    if group in (1, 2):  # 10-byte
        return _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
    if group == 5:  # 12-byte
        return _U32.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 6)[0]
    return _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]  # 16-byte


def _check_xfer(lu: LogicalUnit, n: int, byte: int) -> None:
    if n << lu.block_shift > lumod.MAX_XFER_BYTES:
        raise S.invalid_cdb(byte)


# --- READ / WRITE ---------------------------------------------------------------------


def read(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, n = lba_len(cdb)
    if cdb[0] != 0x08 and cdb[1] >> 5:  # RDPROTECT without protection information
        raise S.invalid_cdb(1, 7)
    _check_xfer(lu, n, 7)
    lu.check_range(lba, n)
    if n == 0:
        lu.done(task)
        return
    lu.read(task, lba, n)


def write(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, n = lba_len(cdb)
    if cdb[0] != 0x0A and cdb[1] >> 5:  # WRPROTECT
        raise S.invalid_cdb(1, 7)
    payload = _write_payload(lu, task, lba, n, 7)
    if payload is None:
        return
    if lu.avail_threshold:
        lu.wrote(task.xfer_len)  # the bytes this WRITE may allocate, at most
    lu.write(task, lba, payload, cdb[0] != 0x0A and bool(cdb[1] & 0x08))


def _write_payload(lu: LogicalUnit, task: ScsiTask, lba: int, n: int, len_byte: int) -> list[memoryview] | None:
    """The checks every write-type command shares; returns the Data-Out blocks to act on
    (views of the transport's buffers, no copy).

    What the initiator sent is written or the command fails (SAM-5 5.4.3 with FCP-4's
    rules for a Data-Out shorter than the CDB asks for): whole blocks below the transfer
    length are written, as the initiator's expected length said (GOOD, overflow residual);
    a Data-Out ending inside a block would leave that block half written, so the command
    writes nothing and answers INVALID FIELD IN COMMAND INFORMATION UNIT, as LIO does.
    None when there is nothing to write: the task is then already complete."""
    _check_xfer(lu, n, len_byte)
    lu.check_range(lba, n)
    task.xfer_len = nbytes = n << lu.block_shift  # before any error: the residual is reported with it
    sent = data_out_len(task)
    if sent < nbytes and sent & (lu.block_size - 1):
        raise S.short_data_out()
    lu.writable(task)
    blocks = min(n, sent >> lu.block_shift)
    if blocks == 0:
        lu.done(task)
        return None
    return data_out_parts(task, blocks << lu.block_shift)


# --- VERIFY / WRITE AND VERIFY ----------------------------------------------------------


def verify(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, n = lba_len(cdb)
    if cdb[1] >> 5:  # VRPROTECT
        raise S.invalid_cdb(1, 7)
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 2:
        raise S.invalid_cdb(1, 2)
    _check_xfer(lu, n, 7)
    lu.check_range(lba, n)
    bs = lu.block_size
    if bytchk == 0:
        task.xfer_len = 0
        if n == 0:
            lu.done(task)
            return
        lu.read(task, lba, n, then=lambda _buf: lu.done(task))  # medium verification
        return
    task.xfer_len = n * bs if bytchk == 1 else (bs if n else 0)
    if n == 0:
        lu.done(task)
        return
    data = data_out_needed(task, task.xfer_len)
    expected = data if bytchk == 1 else None

    def check(buf: bytearray) -> None:
        if expected is not None:
            off = first_difference(expected, buf)
        else:
            one = data[:bs]
            off = -1
            for i in range(n):
                o = first_difference(one, memoryview(buf)[i * bs : (i + 1) * bs])
                if o >= 0:
                    off = i * bs + o
                    break
        if off >= 0:
            raise S.miscompare(off)
        lu.done(task)

    lu.read(task, lba, n, then=check)


def write_and_verify(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, n = lba_len(cdb)
    if cdb[1] >> 5:
        raise S.invalid_cdb(1, 7)
    written = _write_payload(lu, task, lba, n, 7)
    if written is None:
        return
    blocks = sum(len(p) for p in written) >> lu.block_shift

    def verify_back() -> None:
        def check(buf: bytearray) -> None:
            off = _first_difference_parts(written, buf)
            if off >= 0:
                raise S.miscompare(off)
            lu.done(task)

        lu.read(task, lba, blocks, then=check)

    # Verification reads what reached the medium, so the write is made durable first.
    lu.write(task, lba, written, True, then=verify_back)


def _first_difference_parts(parts: list[memoryview], actual: bytearray) -> int:
    """first_difference of the concatenation of ``parts`` against ``actual``."""
    view = memoryview(actual)
    pos = 0
    for p in parts:
        off = first_difference(p, view[pos : pos + len(p)])
        if off >= 0:
            return pos + off
        pos += len(p)
    return -1


# --- PRE-FETCH / SYNCHRONIZE CACHE ------------------------------------------------------


def _cache_range(cdb: bytes) -> tuple[int, int]:
    if cdb[0] in (0x34, 0x35):
        return _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
    return _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]


def prefetch(lu: LogicalUnit, task: ScsiTask) -> None:
    lba, n = _cache_range(task.cdb)
    lu.check_range(lba, n)
    count = n if n else lu.num_blocks - lba
    if count:
        # WILLNEED starts readahead without waiting: we cannot promise the blocks are in
        # the cache when we answer, so the status is GOOD, not CONDITION MET (SBC-3 5.8).
        lu.backstore.prefetch(lba << lu.block_shift, count << lu.block_shift)
    lu.done(task)


def synchronize_cache(lu: LogicalUnit, task: ScsiTask) -> None:
    lba, n = _cache_range(task.cdb)
    lu.check_range(lba, n)
    # IMMED is honoured by ignoring it: GOOD is only returned once data is durable,
    # which SBC-3 permits and crash consistency requires.
    lu.flush(task)


# --- READ CAPACITY -------------------------------------------------------------------


def read_capacity10(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba = _U32.unpack_from(cdb, 2)[0]
    pmi = cdb[8] & 0x01
    if not pmi and lba:
        raise S.invalid_cdb(2)
    lu.refresh_size(task)  # a device grown underneath shows its new capacity at once
    last = lu.num_blocks - 1
    data = struct.pack(">II", min(last, 0xFFFFFFFF), lu.block_size)
    task.data_in = [data]
    task.data_in_len = 8
    lu.done(task)


def read_capacity16(lu: LogicalUnit, task: ScsiTask) -> None:
    alloc = _U32.unpack_from(task.cdb, 10)[0]
    lu.refresh_size(task)
    flags = 0x8000 | (0x4000 if lu.backstore.thin else 0)  # LBPME, LBPRZ
    data = struct.pack(">QIBBH", lu.num_blocks - 1, lu.block_size, 0, lu.lbppbe & 0x0F, flags) + bytes(16)
    set_data_in(task, data, alloc)
    lu.done(task)


# --- thin provisioning: UNMAP, WRITE SAME, GET LBA STATUS -----------------------------


def unmap(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[1] & 0x01:  # ANCHOR: ANC_SUP is 0
        raise S.invalid_cdb(1, 0)
    plen = _U16.unpack_from(cdb, 7)[0]
    task.xfer_len = plen
    if plen == 0:
        lu.done(task)
        return
    if plen < 8:
        raise S.param_list_length_error()
    data = data_out_needed(task, plen)
    bddl = _U16.unpack_from(data, 2)[0]
    count = min(bddl, plen - 8) // 16
    if count > lumod.MAX_UNMAP_DESCRIPTORS:
        raise S.invalid_param(2)
    max_lbas = lumod.MAX_UNMAP_LBA_COUNT_BYTES >> lu.block_shift
    ranges: list[tuple[int, int]] = []
    for i in range(count):
        lba, n = struct.unpack_from(">QI", data, 8 + 16 * i)
        if lba + n > lu.num_blocks:
            raise S.lba_out_of_range()
        if n > max_lbas:
            raise S.invalid_param(8 + 16 * i + 8)
        if n:
            ranges.append((lba, n))
    lu.writable(task)
    if not ranges:
        lu.done(task)
        return
    shift = lu.block_shift
    bs = lu.backstore

    def work() -> None:
        for lba, n in ranges:
            bs.discard(lba << shift, n << shift)

    lu.exclusive(task, work, then=lambda _r: _threshold_then_done(lu, task))


def _threshold_then_done(lu: LogicalUnit, task: ScsiTask) -> None:
    lu.check_threshold()
    lu.done(task)


def write_same(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    sixteen = cdb[0] == 0x93
    flags = cdb[1]
    if sixteen:
        lba, n = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
    else:
        lba, n = _U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0]
    ndob = sixteen and bool(flags & 0x01)
    do_unmap = bool(flags & 0x08)
    if flags >> 5:  # WRPROTECT
        raise S.invalid_cdb(1, 7)
    if flags & 0x10:  # ANCHOR without ANC_SUP
        raise S.invalid_cdb(1, 4)
    if lba > lu.num_blocks:
        raise S.lba_out_of_range()
    if n == 0:
        n = lu.num_blocks - lba  # WSNZ=0: to the end of the medium
    if n << lu.block_shift > lumod.MAX_WRITE_SAME_BYTES:
        # More than MAXIMUM WRITE SAME LENGTH (also when n=0 reaches that far): SBC-3 5.42
        raise S.invalid_cdb(10 if sixteen else 7)
    lu.check_range(lba, n)
    bsz = lu.block_size
    task.xfer_len = 0 if ndob else bsz
    lu.writable(task)
    if not ndob and task.expected_len > bsz:
        # The Data-Out buffer of WRITE SAME is exactly one logical block (a shorter one is
        # refused below, by data_out_needed).
        raise S.invalid_cdb(7 if not sixteen else 10)
    if n == 0:
        lu.done(task)
        return
    pattern = bytes(bsz) if ndob else bytes(data_out_needed(task, bsz))
    zero = not any(pattern)
    shift = lu.block_shift
    bs = lu.backstore
    off, length = lba << shift, n << shift
    sync = not lu.modes.wce

    def work() -> None:
        if do_unmap:
            # UNMAP=1: deallocate (SBC-3 5.42 lets the device server unmap instead of
            # writing); with LBPRZ the blocks then read back as zeroes.
            bs.discard(off, length)
        elif zero:
            bs.write_zeroes(off, length)  # keep the blocks mapped
        else:
            chunk_blocks = max(1, (1 << 20) >> shift)
            buf = pattern * min(n, chunk_blocks)
            pos, end = off, off + length
            while pos < end:
                m = min(len(buf), end - pos)
                bs.write([memoryview(buf)[:m]], pos)
                pos += m
        if sync:
            bs.flush()

    lu.exclusive(task, work, then=lambda _r: _threshold_then_done(lu, task))


def get_lba_status(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba = _U64.unpack_from(cdb, 2)[0]
    alloc = _U32.unpack_from(cdb, 10)[0]
    if lba >= lu.num_blocks:
        raise S.lba_out_of_range()
    shift = lu.block_shift
    max_desc = max(1, min(64, (alloc - 8) // 16)) if alloc >= 24 else 1
    span = lu.num_blocks - lba
    # Partial filesystem blocks can split one status into two runs: ask for a few spare.
    runs = lu.backstore.block_status(lba << shift, span << shift, 2 * max_desc + 2)
    descs = bytearray()
    merged: list[list[int]] = []
    for r in runs:
        start = r.offset >> shift
        end = (r.offset + r.length + (1 << shift) - 1) >> shift
        status = 0 if r.mapped else 1
        if merged and merged[-1][2] == status and merged[-1][1] >= start:
            merged[-1][1] = max(merged[-1][1], end)
        elif merged and merged[-1][1] > start:
            # a partially mapped block counts as mapped
            if status == 0:
                merged[-1][1] = start
                merged.append([start, end, 0])
            else:
                merged.append([merged[-1][1], end, 1])
        else:
            merged.append([start, end, status])
        if len(merged) > max_desc:
            break
    for start, end, status in merged[:max_desc]:
        if end > start:
            descs += struct.pack(">QIB3x", start, min(end, lu.num_blocks) - start, status)
    data = struct.pack(">I4x", len(descs) + 4) + bytes(descs)
    set_data_in(task, data, alloc)
    lu.done(task)


# --- COMPARE AND WRITE / ORWRITE / WRITE ATOMIC -------------------------------------


def compare_and_write(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba = _U64.unpack_from(cdb, 2)[0]
    n = cdb[13]
    if cdb[1] >> 5:
        raise S.invalid_cdb(1, 7)
    if n > lumod.MAX_CAW_BLOCKS:
        raise S.invalid_cdb(13)
    lu.check_range(lba, n)
    bsz = lu.block_size
    task.xfer_len = 2 * n * bsz
    lu.writable(task)
    if task.expected_len > task.xfer_len:
        raise S.invalid_cdb(13)  # more than the blocks to compare and write
    if n == 0:
        lu.done(task)
        return
    data = data_out_needed(task, 2 * n * bsz)
    verify_part = bytes(data[: n * bsz])
    write_part = bytes(data[n * bsz : 2 * n * bsz])
    off = lba << lu.block_shift
    bs = lu.backstore
    sync = bool(cdb[1] & 0x08) or not lu.modes.wce

    def work() -> int:
        # Runs with no other write in flight and new ones queued: read-compare-write is
        # atomic against every other write to this LU.
        return bs.compare_and_write(verify_part, write_part, off, sync)

    def after(diff: int) -> None:
        if diff >= 0:
            raise S.miscompare(diff)
        lu.done(task)

    lu.exclusive(task, work, then=after)


def orwrite(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, n = _U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0]
    if cdb[1] >> 5:  # ORPROTECT
        raise S.invalid_cdb(1, 7)
    payload = _write_payload(lu, task, lba, n, 10)
    if payload is None:
        return
    mask = b"".join(payload)
    off = lba << lu.block_shift
    bs = lu.backstore
    sync = bool(cdb[1] & 0x08) or not lu.modes.wce

    def work() -> None:
        cur = bytearray(len(mask))
        bs.read_into(cur, off)
        merged = (int.from_bytes(cur, "little") | int.from_bytes(mask, "little")).to_bytes(len(mask), "little")
        bs.write([merged], off, sync)

    lu.exclusive(task, work)


def write_atomic16(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    lba = _U64.unpack_from(cdb, 2)[0]
    boundary = _U16.unpack_from(cdb, 10)[0]
    n = _U16.unpack_from(cdb, 12)[0]
    if cdb[1] >> 5:
        raise S.invalid_cdb(1, 7)
    if boundary:  # MAXIMUM ATOMIC BOUNDARY SIZE is 0
        raise S.invalid_cdb(10)
    lu.check_range(lba, n)
    if n << lu.block_shift > lumod.MAX_ATOMIC_BYTES:
        raise S.invalid_cdb(12)
    gran = max(1, 4096 >> lu.block_shift)
    if lba % gran:
        raise S.invalid_cdb(2)  # ATOMIC ALIGNMENT
    if n % gran:
        raise S.invalid_cdb(12)  # ATOMIC TRANSFER LENGTH GRANULARITY
    lu.check_range(lba, n)
    lu.writable(task)
    task.xfer_len = n << lu.block_shift
    if n == 0:
        lu.done(task)
        return
    payload = bytes(data_out_needed(task, task.xfer_len))  # an atomic write is all or nothing
    off = lba << lu.block_shift
    bs = lu.backstore
    sync = bool(cdb[1] & 0x08) or not lu.modes.wce
    # One pwritev while no other write runs: no reader sees a mix after completion and no
    # concurrent writer interleaves.
    lu.exclusive(task, lambda: bs.write([payload], off, sync))


# --- READ DEFECT DATA, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL ------------------


def read_defect_data(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[0] == 0x37:
        fmt = cdb[2] & 0x1F
        alloc = _U16.unpack_from(cdb, 7)[0]
        data = bytes((0, fmt & 0x1F, 0, 0))  # no defects: empty list, formats echoed
    else:
        fmt = cdb[1] & 0x1F
        alloc = _U32.unpack_from(cdb, 6)[0]
        data = bytes((0, fmt & 0x1F, 0, 0)) + bytes(4)
    set_data_in(task, data, alloc)
    lu.done(task)


POWER_CONDITIONS = (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB)


def start_stop_unit(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    pc = cdb[4] >> 4
    start = cdb[4] & 0x01
    no_flush = cdb[4] & 0x04
    if pc not in POWER_CONDITIONS:
        raise S.invalid_cdb(4, 7)
    if pc != 0:  # a power condition change ignores START and LOEJ (SBC-3 5.25)
        lu.done(task)
        return
    if start:
        lu.stopped = False
        lu.done(task)
        return
    lu.stopped = True
    if no_flush:
        lu.done(task)
    else:
        lu.flush(task)


def prevent_allow(lu: LogicalUnit, task: ScsiTask) -> None:
    # The medium is not removable (RMB=0): PREVENT is accepted and has nothing to lock.
    if task.cdb[4] & 0xFC:
        raise S.invalid_cdb(4)
    lu.done(task)


_RW = F.MEDIUM | F.WRITE | F.PR_WRITE
_RD = F.MEDIUM | F.PR_READ

COMMANDS = [
    Command(0x08, None, "READ(6)", read, usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07), _RD),
    Command(0x28, None, "READ(10)", read, usage(0x28, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RD),
    Command(0xA8, None, "READ(12)", read,
            usage(0xA8, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07), _RD),
    Command(0x88, None, "READ(16)", read, usage(0x88, 0xFA, *([0xFF] * 12), 0x3F, 0x07), _RD),
    Command(0x0A, None, "WRITE(6)", write, usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07), _RW),
    Command(0x2A, None, "WRITE(10)", write, usage(0x2A, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RW),
    Command(0xAA, None, "WRITE(12)", write,
            usage(0xAA, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07), _RW),
    Command(0x8A, None, "WRITE(16)", write, usage(0x8A, 0xFA, *([0xFF] * 12), 0x3F, 0x07), _RW),
    Command(0x2F, None, "VERIFY(10)", verify, usage(0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RD),
    Command(0xAF, None, "VERIFY(12)", verify,
            usage(0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07), _RD),
    Command(0x8F, None, "VERIFY(16)", verify, usage(0x8F, 0xF6, *([0xFF] * 12), 0x3F, 0x07), _RD),
    Command(0x2E, None, "WRITE AND VERIFY(10)", write_and_verify,
            usage(0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RW),
    Command(0xAE, None, "WRITE AND VERIFY(12)", write_and_verify,
            usage(0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0x07), _RW),
    Command(0x8E, None, "WRITE AND VERIFY(16)", write_and_verify,
            usage(0x8E, 0xF2, *([0xFF] * 12), 0x3F, 0x07), _RW),
    Command(0x34, None, "PRE-FETCH(10)", prefetch,
            usage(0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RD),
    Command(0x90, None, "PRE-FETCH(16)", prefetch, usage(0x90, 0x02, *([0xFF] * 12), 0x3F, 0x07), _RD),
    Command(0x35, None, "SYNCHRONIZE CACHE(10)", synchronize_cache,
            usage(0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), F.MEDIUM | F.PR_WRITE),
    Command(0x91, None, "SYNCHRONIZE CACHE(16)", synchronize_cache,
            usage(0x91, 0x02, *([0xFF] * 12), 0x3F, 0x07), F.MEDIUM | F.PR_WRITE),
    Command(0x25, None, "READ CAPACITY(10)", read_capacity10,
            usage(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x07), F.MEDIUM),
    Command(0x9E, 0x10, "READ CAPACITY(16)", read_capacity16,
            usage(0x9E, 0x1F, *([0xFF] * 12), 0, 0x07), F.MEDIUM),
    Command(0x9E, 0x12, "GET LBA STATUS", get_lba_status,
            usage(0x9E, 0x1F, *([0xFF] * 12), 0, 0x07), _RD),
    Command(0x42, None, "UNMAP", unmap, usage(0x42, 0x01, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0x07), _RW),
    Command(0x41, None, "WRITE SAME(10)", write_same,
            usage(0x41, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x3F, 0xFF, 0xFF, 0x07), _RW),
    Command(0x93, None, "WRITE SAME(16)", write_same, usage(0x93, 0xF9, *([0xFF] * 12), 0x3F, 0x07), _RW),
    Command(0x89, None, "COMPARE AND WRITE", compare_and_write,
            usage(0x89, 0xF8, *([0xFF] * 8), 0, 0, 0, 0xFF, 0x3F, 0x07), _RW | F.PR_READ),
    Command(0x8B, None, "ORWRITE(16)", orwrite, usage(0x8B, 0xF8, *([0xFF] * 12), 0x3F, 0x07), _RW),
    Command(0x9C, None, "WRITE ATOMIC(16)", write_atomic16,
            usage(0x9C, 0xF8, *([0xFF] * 12), 0x3F, 0x07), _RW),
    Command(0x37, None, "READ DEFECT DATA(10)", read_defect_data,
            usage(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), _RD),
    Command(0xB7, None, "READ DEFECT DATA(12)", read_defect_data,
            usage(0xB7, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07), _RD),
    Command(0x1B, None, "START STOP UNIT", start_stop_unit,
            usage(0x1B, 0x01, 0, 0x0F, 0xF7, 0x07), F.PR_WRITE),
    Command(0x1E, None, "PREVENT ALLOW MEDIUM REMOVAL", prevent_allow,
            usage(0x1E, 0, 0, 0, 0x03, 0x07), F.PR_WRITE),
]
