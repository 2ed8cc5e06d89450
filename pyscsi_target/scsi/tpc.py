"""Third-party copy (SPC-4 6.4 EXTENDED COPY LID1, 6.18 RECEIVE COPY RESULTS).

The copy manager copies between logical units of this daemon: a CSCD identification
descriptor (0xE4) names an LU by its NAA designator, found in the ScsiRegistry.
Segments are block-to-block (0x02), what VMware VAAI XCOPY and Linux sg_xcopy send.

Access rule: an LU is a usable copy target if the issuing I_T nexus's target maps it,
or the same initiator has a session to a target that maps it, or its extent has
``insecure_tpc`` set (FreeNAS semantics: copies may then bypass the access control).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, data_out_needed, set_data_in, usage
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import ScsiTask

MAX_CSCD = 4
MAX_SEGMENTS = 16
MAX_DESC_LIST = MAX_CSCD * 32 + MAX_SEGMENTS * 28
MAX_SEGMENT_BYTES = 64 << 20
CHUNK = 1 << 20

CSCD_IDENT = 0xE4
SEG_B2B = 0x02

COPY_OK = 0x01
COPY_ERR = 0x02


@dataclass(slots=True)
class CopyResult:
    status: int  # COPY MANAGER STATUS
    segments: int
    bytes: int


def _aborted(code: tuple[int, int] = S.COPY_TARGET_DEVICE_NOT_REACHABLE) -> S.CheckCondition:
    return S.CheckCondition(S.COPY_ABORTED, code)


def _reachable(issuer: LogicalUnit, task: ScsiTask, target: LogicalUnit) -> bool:
    if target is issuer or target.insecure_tpc:
        return True
    registry = issuer.registry
    dev = registry.device_of(task)
    if dev is not None and target in dev.luns.values():
        return True
    name = task.nexus.initiator_name.lower()
    return any(d.has_initiator(name) for d in registry.devices_mapping(target))


def extended_copy(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    plen = struct.unpack_from(">I", cdb, 10)[0]
    task.xfer_len = plen
    if plen == 0:
        lu.done(task)
        return
    if plen < 16:
        raise S.param_list_length_error()
    data = data_out_needed(task, plen)
    list_id = data[0]
    list_id_usage = (data[1] >> 3) & 0x03
    tdl = struct.unpack_from(">H", data, 2)[0]
    sdl, inline = struct.unpack_from(">II", data, 8)
    if tdl + sdl > MAX_DESC_LIST:
        raise S.param_list_length_error()
    if 16 + tdl + sdl + inline > plen:
        raise S.param_list_length_error()
    if list_id_usage == 0x01:  # reserved value
        raise S.invalid_param(1, 4)
    if list_id_usage == 0x03 and list_id != 0:
        raise S.invalid_param(0)
    if tdl % 32:
        raise S.param_list_length_error()
    if tdl // 32 > MAX_CSCD:
        raise S.CheckCondition(S.ILLEGAL_REQUEST, S.TOO_MANY_TARGET_DESCRIPTORS)
    # segment descriptors: walk to count them (each carries its own length)
    segs: list[memoryview] = []
    pos = 16 + tdl
    end = pos + sdl
    while pos < end:
        if end - pos < 4:
            raise S.param_list_length_error()
        dlen = struct.unpack_from(">H", data, pos + 2)[0] + 4
        if pos + dlen > end:
            raise S.param_list_length_error()
        segs.append(data[pos : pos + dlen])
        pos += dlen
    if len(segs) > MAX_SEGMENTS:
        raise S.CheckCondition(S.ILLEGAL_REQUEST, S.TOO_MANY_SEGMENT_DESCRIPTORS)
    # target (CSCD) descriptors
    targets: list[LogicalUnit | None] = []
    for i in range(tdl // 32):
        d = data[16 + 32 * i : 48 + 32 * i]
        if d[0] != CSCD_IDENT:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE)
        # LU ID TYPE is ignored and NUL is obsolete in SPC-4: the designator alone
        # names the logical unit.
        codeset, dtype, dlen = d[4] & 0x0F, d[5] & 0x0F, d[7]
        target = None
        if codeset == 0x01 and dtype == 0x03 and dlen in (8, 16):
            target = lu.registry.lus.get(bytes(d[8:16]))
        targets.append(target)
    for s in segs:
        if s[0] != SEG_B2B:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, S.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE)
        if len(s) != 28:
            raise S.invalid_param(16 + tdl)
    key = lu.registry.it_key(task.nexus)
    if list_id_usage != 0x03:
        prev = lu.copy_results.get((key, list_id))
        if prev is not None and prev.status == 0x00:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, (0x0D, 0x03))  # operation in progress

    # Validate every segment before copying anything.
    plan: list[tuple[LogicalUnit, int, LogicalUnit, int, int]] = []
    for s in segs:
        src_i, dst_i = struct.unpack_from(">HH", s, 4)
        nblocks = struct.unpack_from(">H", s, 10)[0]
        src_lba, dst_lba = struct.unpack_from(">QQ", s, 12)
        if src_i >= len(targets) or dst_i >= len(targets):
            raise _aborted()
        src, dst = targets[src_i], targets[dst_i]
        if src is None or dst is None or src.closed or dst.closed:
            raise _aborted()
        if not _reachable(lu, task, src) or not _reachable(lu, task, dst):
            raise _aborted()
        if src.block_size != dst.block_size:
            raise _aborted(S.NO_ADDITIONAL_SENSE)
        if src_lba + nblocks > src.num_blocks or dst_lba + nblocks > dst.num_blocks:
            raise _aborted(S.NO_ADDITIONAL_SENSE)
        if nblocks * src.block_size > MAX_SEGMENT_BYTES:
            raise _aborted(S.NO_ADDITIONAL_SENSE)
        if dst.read_only or dst.modes.swp or task.nexus.read_only:
            raise S.write_protected()
        plan.append((src, src_lba, dst, dst_lba, nblocks))

    result = CopyResult(0x00, 0, 0)
    if list_id_usage != 0x03:
        lu.copy_results[(key, list_id)] = result

    def work() -> None:
        for src, src_lba, dst, dst_lba, nblocks in plan:
            bs = src.block_size
            total = nblocks * bs
            done = 0
            buf = bytearray(min(CHUNK, total) or 1)
            while done < total:
                m = min(len(buf), total - done)
                view = memoryview(buf)[:m]
                src.backstore.read_into(view, src_lba * bs + done)
                dst.backstore.write([view], dst_lba * bs + done, not dst.modes.wce)
                done += m
            result.segments += 1
            result.bytes += total

    def finished(_r: object) -> None:
        result.status = COPY_OK
        lu.done(task)

    def run() -> None:
        try:
            work()
        except BaseException:
            result.status = COPY_ERR
            raise

    lu.in_thread(task, run, then=finished)


def receive_copy_results(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    sa = cdb[1] & 0x1F
    list_id = cdb[2]
    alloc = struct.unpack_from(">I", cdb, 10)[0]
    if sa == 0x03:  # OPERATING PARAMETERS
        body = struct.pack(
            ">B3xHHIIIII2xHBBBB3xB",
            0x01,  # SNLID: list identifiers not tracked when LIST ID USAGE is 11b
            MAX_CSCD,
            MAX_SEGMENTS,
            MAX_DESC_LIST,
            MAX_SEGMENT_BYTES,
            0,  # max inline data length
            0,  # held data limit
            0,  # max stream device transfer size
            1,  # total concurrent copies
            1,  # max concurrent copies
            lu.block_shift,  # data segment granularity (log2 bytes)
            0,
            0,
            2,  # implemented descriptor list length
        ) + bytes((SEG_B2B, CSCD_IDENT))
        data = struct.pack(">I", len(body)) + body
    elif sa == 0x00:  # COPY STATUS
        res = lu.copy_results.get((lu.registry.it_key(task.nexus), list_id))
        if res is None:
            raise S.invalid_cdb(2)
        units, count = 0x00, res.bytes
        if count > 0xFFFFFFFF:
            units, count = 0x02, res.bytes >> 20  # MiB
        data = struct.pack(">IBHBI", 8, res.status & 0x7F, res.segments & 0xFFFF, units, count)
    elif sa == 0x04:  # FAILED SEGMENT DETAILS: we keep no sense of failed copies beyond status
        res = lu.copy_results.get((lu.registry.it_key(task.nexus), list_id))
        if res is None:
            raise S.invalid_cdb(2)
        data = struct.pack(">I52xBBH", 56, 0, 0 if res.status != COPY_ERR else 0x02, 0)
    else:
        raise S.invalid_cdb(1, 4)
    set_data_in(task, data, alloc)
    lu.done(task)


def third_party_copy_vpd() -> bytes:
    """VPD 0x8F with a Supported Commands descriptor (SPC-4 7.8.17.2)."""
    cmds = bytes((0x83, 1, 0x00)) + bytes((0x84, 3, 0x00, 0x03, 0x04))
    body = bytes((len(cmds),)) + cmds
    body += bytes(-(len(body)) % 4)
    desc = struct.pack(">HH", 0x0001, len(body)) + body
    # Parameter data descriptor for LID1 (0x0004)
    pdata = struct.pack(">4xHHII12x", MAX_CSCD, MAX_SEGMENTS, MAX_DESC_LIST, 0)
    desc += struct.pack(">HH", 0x0004, len(pdata)) + pdata
    return bytes((0, 0x8F)) + struct.pack(">H", len(desc)) + desc


COMMANDS = [
    Command(0x83, 0x00, "EXTENDED COPY(LID1)", extended_copy,
            usage(0x83, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            F.PR_WRITE | F.MEDIUM, timeout=600),
    *[
        Command(0x84, sa, f"RECEIVE COPY RESULTS / {name}", receive_copy_results,
                usage(0x84, 0x1F, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07), F.PR_READ)
        for sa, name in ((0x00, "COPY STATUS"), (0x03, "OPERATING PARAMETERS"), (0x04, "FAILED SEGMENT DETAILS"))
    ],
]
