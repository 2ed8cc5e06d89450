"""SPC-4 primary commands: INQUIRY and VPD pages, REQUEST SENSE, TEST UNIT READY,
MODE SENSE/SELECT, LOG SENSE, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS and REPORT
TARGET PORT GROUPS (ALUA: one target port group per portal group).  REPORT SUPPORTED
OPERATION CODES reports the command table, so it lives there (command_table.py)."""

from __future__ import annotations

import struct

from pyscsi_target.scsi import lu as lumod
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, set_data_in, usage
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import Nexus, ScsiTask
from pyscsi_target.scsi.tpc import third_party_copy_vpd

VENDOR = b"PYSCSI  "
PRODUCT = b"iSCSI Disk      "
REVISION = b"0001"

# Version descriptors (SPC-4 table 29): SAM-5, iSCSI (RFC 7143 has none; RFC 3720 0x0960),
# SPC-4, SBC-3.
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)

VPD_PAGES = (0x00, 0x80, 0x83, 0x86, 0x8F, 0xB0, 0xB1, 0xB2)

PROTO_ISCSI = 0x5


def standard_inquiry(lu: LogicalUnit | None, pq_pdt: int = 0x00) -> bytes:
    buf = bytearray(96)
    buf[0] = pq_pdt
    buf[2] = 0x06  # SPC-4
    buf[3] = 0x12  # HISUP, response data format 2
    buf[4] = len(buf) - 5
    # TPGS=01 (implicit ALUA), 3PC (EXTENDED COPY) on real LUs
    buf[5] = 0x10 | (0x08 if lu is not None else 0)
    buf[6] = 0x10  # MULTIP: reachable through several target ports (portal groups)
    buf[7] = 0x02  # CMDQUE
    buf[8:16] = VENDOR
    buf[16:32] = PRODUCT
    buf[32:36] = REVISION
    if lu is not None:
        serial = lu.serial.encode()[:20]
        buf[36 : 36 + len(serial)] = serial
    for i, v in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", buf, 58 + 2 * i, v)
    return bytes(buf)


def _designator(proto_codeset: int, piv_assoc_type: int, value: bytes) -> bytes:
    return bytes((proto_codeset, piv_assoc_type, 0, len(value))) + value


def _name_string(text: str) -> bytes:
    b = text.encode() + b"\0"
    return b + bytes(-len(b) % 4)


def device_identification(lu: LogicalUnit, nexus: Nexus) -> bytes:
    tpg = nexus.portal_group_tag
    serial = lu.serial
    if not lu.xen:
        # FreeNAS pads the T10 vendor designator's serial to 31 characters with spaces;
        # Xen's blkback rejects trailing spaces in it, so xen compat mode leaves them off.
        serial = serial.ljust(31)
    t10 = VENDOR + PRODUCT + serial.encode()
    descs = [
        _designator(0x01, 0x03, lu.naa),  # binary, LU, NAA
        _designator(0x02, 0x01, t10),  # ASCII, LU, T10 vendor ID
        # iSCSI, binary, PIV, target port, relative target port
        _designator((PROTO_ISCSI << 4) | 0x01, 0x94, struct.pack(">HH", 0, tpg & 0xFFFF)),
        # target port group (PIV, target port association)
        _designator((PROTO_ISCSI << 4) | 0x01, 0x95, struct.pack(">HH", 0, tpg & 0xFFFF)),
        # SCSI name string of the target port (UTF-8, PIV, target port)
        _designator((PROTO_ISCSI << 4) | 0x03, 0x98, _name_string(nexus.target_port)),
        # SCSI name string of the target device
        _designator((PROTO_ISCSI << 4) | 0x03, 0xA8, _name_string(nexus.target_name)),
    ]
    body = b"".join(descs)
    return bytes((0, 0x83)) + struct.pack(">H", len(body)) + body


def vpd_page(lu: LogicalUnit, nexus: Nexus, page: int) -> bytes:
    if page == 0x00:
        return bytes((0, 0x00, 0, len(VPD_PAGES))) + bytes(VPD_PAGES)
    if page == 0x80:
        s = lu.serial.encode()
        return bytes((0, 0x80, 0, len(s))) + s
    if page == 0x83:
        return device_identification(lu, nexus)
    if page == 0x86:
        buf = bytearray(64)
        buf[1] = 0x86
        buf[3] = 0x3C
        buf[5] = 0x07  # HEADSUP, ORDSUP, SIMPSUP
        buf[6] = 0x01  # V_SUP: volatile cache (flushed by SYNCHRONIZE CACHE)
        buf[7] = 0x01  # LUICLR: unit attentions are per I_T nexus
        return bytes(buf)
    if page == 0x8F:
        return third_party_copy_vpd()
    if page == 0xB0:
        bs = lu.block_size
        buf = bytearray(64)
        buf[1] = 0xB0
        buf[3] = 0x3C
        buf[4] = 0x00  # WSNZ=0: WRITE SAME with zero blocks means "to the end"
        buf[5] = lumod.MAX_CAW_BLOCKS
        gran = 1 << lu.lbppbe
        struct.pack_into(">H", buf, 6, gran)
        struct.pack_into(">I", buf, 8, lumod.MAX_XFER_BYTES // bs)
        struct.pack_into(">I", buf, 12, max(gran, (128 << 10) // bs))
        struct.pack_into(">I", buf, 16, lumod.MAX_XFER_BYTES // bs)  # max prefetch
        struct.pack_into(">I", buf, 20, lumod.MAX_UNMAP_LBA_COUNT_BYTES // bs)
        struct.pack_into(">I", buf, 24, lumod.MAX_UNMAP_DESCRIPTORS)
        # Holes are punched in filesystem blocks: 4 KiB is the unit that really frees space.
        struct.pack_into(">I", buf, 28, max(1, 4096 // bs))
        struct.pack_into(">I", buf, 32, 0x80000000)  # UGAVALID, alignment 0
        struct.pack_into(">Q", buf, 36, lumod.MAX_WRITE_SAME_BYTES // bs)  # MAXIMUM WRITE SAME LENGTH
        struct.pack_into(">I", buf, 44, lumod.MAX_ATOMIC_BYTES // bs)
        # Atomic writes are whole 4 KiB pages: aligned to and a multiple of them.
        struct.pack_into(">I", buf, 48, max(1, 4096 // bs))  # atomic alignment
        struct.pack_into(">I", buf, 52, max(1, 4096 // bs))  # atomic transfer length granularity
        return bytes(buf)
    if page == 0xB1:
        buf = bytearray(64)
        buf[1] = 0xB1
        buf[3] = 0x3C
        struct.pack_into(">H", buf, 4, lu.rpm)
        # WABEREQ=01b: after SANITIZE BLOCK ERASE reads succeed (they return zeroes)
        buf[7] = 0x40
        return bytes(buf)
    if page == 0xB2:
        buf = bytearray(8)
        buf[1] = 0xB2
        buf[3] = 4
        buf[4] = threshold_exponent(lu)  # scales the LOG SENSE resource counts
        # LBPU, LBPWS, LBPWS10, LBPRZ; ANC_SUP=0 (no anchored state)
        buf[5] = 0x80 | 0x40 | 0x20 | 0x04
        buf[6] = 0x02  # provisioning type: thin
        return bytes(buf)
    raise S.invalid_cdb(2)


def threshold_exponent(lu: LogicalUnit) -> int:
    """Smallest exponent making the LU's block count fit the 32-bit resource counts."""
    return max(0, lu.num_blocks.bit_length() - 32)


def inquiry(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    evpd = cdb[1] & 0x01
    page = cdb[2]
    alloc = struct.unpack_from(">H", cdb, 3)[0]
    if cdb[1] & 0xFE:  # CMDDT (obsolete) and reserved bits
        raise S.invalid_cdb(1)
    if not evpd:
        if page:
            raise S.invalid_cdb(2)
        data = standard_inquiry(lu)
    else:
        data = vpd_page(lu, task.nexus, page)
    set_data_in(task, data, alloc)
    lu.done(task)


def request_sense(lu: LogicalUnit, task: ScsiTask) -> None:
    desc = bool(task.cdb[1] & 0x01)
    alloc = task.cdb[4]
    key = lu.registry.it_key(task.nexus)
    code = lu.pop_ua(key)
    if code is not None:
        data = S.build_sense(S.UNIT_ATTENTION, code, desc)
    elif lu.sanitizing:
        data = lu.sanitize_in_progress().encode(desc)
    elif lu.stopped:
        data = S.build_sense(S.NOT_READY, S.LUN_NOT_READY_INIT_REQUIRED, desc)
    else:
        data = S.build_sense(S.NO_SENSE, S.NO_ADDITIONAL_SENSE, desc)
    set_data_in(task, data, alloc)
    lu.done(task)


def test_unit_ready(lu: LogicalUnit, task: ScsiTask) -> None:
    lu.done(task)


REPORT_LUNS = 0xA0


def report_luns(lu: LogicalUnit, task: ScsiTask) -> None:
    """Never called: ScsiDevice answers REPORT LUNS itself (it knows the LUN map)."""
    raise S.invalid_opcode()


# --- MODE SENSE / MODE SELECT ----------------------------------------------------------


def _block_descriptor(lu: LogicalUnit, long_lba: bool) -> bytes:
    if long_lba:
        return struct.pack(">QII", lu.num_blocks, 0, lu.block_size)
    n = min(lu.num_blocks, 0xFFFFFFFF)
    return struct.pack(">II", n, lu.block_size & 0xFFFFFF)


def mode_sense(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    ten = cdb[0] == 0x5A
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    pages = lu.modes.pages_for(page, subpage, pc)
    bd = b"" if dbd else _block_descriptor(lu, llbaa)
    wp = lu.read_only or task.nexus.read_only or lu.modes.swp
    dsp = (0x80 if wp else 0) | 0x10  # WP, DPOFUA
    if ten:
        total = 8 + len(bd) + len(pages)
        hdr = struct.pack(">HBBBBH", total - 2, 0, dsp, 0x01 if llbaa and bd else 0, 0, len(bd))
    else:
        total = 4 + len(bd) + len(pages)
        if total > 256:
            raise S.invalid_cdb(4)
        hdr = bytes((total - 1, 0, dsp, len(bd)))
    set_data_in(task, hdr + bd + pages, alloc)
    lu.done(task)


def mode_select(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    ten = cdb[0] == 0x55
    sp = bool(cdb[1] & 0x01)
    plen = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    task.xfer_len = plen
    if cdb[1] & 0xEE if not ten else cdb[1] & 0xEE:
        raise S.invalid_cdb(1)
    if plen == 0:
        lu.done(task)
        return
    data = memoryview(task.data_out or b"")[:plen]
    hlen = 8 if ten else 4
    if len(data) < plen or plen < hlen:
        raise S.param_list_length_error()
    if ten:
        bdlen = struct.unpack_from(">H", data, 6)[0]
        long_lba = data[4] & 0x01
    else:
        bdlen = data[3]
        long_lba = 0
    if hlen + bdlen > plen:
        raise S.param_list_length_error()
    if bdlen:
        step = 16 if long_lba else 8
        if bdlen % step:
            raise S.invalid_param(hlen - 1)
        bd = data[hlen : hlen + step]
        blen = struct.unpack_from(">I", bd, 12)[0] if long_lba else int.from_bytes(bd[5:8], "big")
        if blen != lu.block_size:
            raise S.invalid_param(hlen + (12 if long_lba else 5))
    wce_before = lu.modes.wce
    changed = lu.modes.select(data[hlen + bdlen :], sp)
    if changed:
        lu.add_ua_all(S.MODE_PARAMETERS_CHANGED, except_key=lu.registry.it_key(task.nexus))

    def finish() -> None:
        if wce_before and not lu.modes.wce:
            # Write cache turned off: what it still holds must be durable before we answer,
            # since from now on every acknowledged write is.
            lu.flush(task)
        else:
            lu.done(task)

    if sp:  # saved pages: GOOD once they are durable
        lu.persist(lu.modes_key, lu.modes.serialize_saved(), task, finish)
    else:
        finish()


# --- LOG SENSE ------------------------------------------------------------------------

LOG_PAGES = (0x00, 0x0C)


def log_sense(lu: LogicalUnit, task: ScsiTask) -> None:
    """Supported pages and Logical Block Provisioning (0Ch): how much of the thin LU is
    allocated and how much more the filesystem under it can still provide."""
    cdb = task.cdb
    if cdb[1] & 0x01:  # SP: no saveable log parameters
        raise S.invalid_cdb(1, 0)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    pointer = struct.unpack_from(">H", cdb, 5)[0]
    alloc = struct.unpack_from(">H", cdb, 7)[0]
    if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != 0x00):
        raise S.invalid_cdb(3)
    if page == 0x00:
        if subpage == 0xFF:
            body = b"".join(bytes((p, 0)) for p in LOG_PAGES)
            data = bytes((0x40, 0xFF)) + struct.pack(">H", len(body)) + body
        else:
            data = bytes((0x00, 0)) + struct.pack(">H", len(LOG_PAGES)) + bytes(LOG_PAGES)
    elif page == 0x0C:
        if pointer > 2:
            raise S.invalid_cdb(5)
        exp = threshold_exponent(lu)
        try:
            used_bytes = lu.backstore.allocated_bytes()
            free_bytes = lu.backstore.free_bytes()
        except OSError:
            used_bytes = free_bytes = None
        counts: list[tuple[int, int]] = []
        # A block device cannot tell its allocation: its parameters are left out rather
        # than guessed (both are optional in SBC-3's logical block provisioning page).
        if used_bytes is not None:
            used = used_bytes >> lu.block_shift
            avail = max(0, lu.num_blocks - used)
            if free_bytes is not None:
                avail = min(avail, free_bytes >> lu.block_shift)
            counts = [(0x0001, avail), (0x0002, used)]
        params = b""
        for code, value in counts:
            if code >= pointer and pc in (1, 3):  # cumulative values only
                # FORMAT AND LINKING 11b; scope 01b: dedicated to this LU
                params += struct.pack(">HBBIB3x", code, 0x03, 8, min(value >> exp, 0xFFFFFFFF), 0x01)
        data = bytes((0x0C, 0)) + struct.pack(">H", len(params)) + params
    else:
        raise S.invalid_cdb(2, 5)
    set_data_in(task, data, alloc)
    lu.done(task)


# --- REPORT SUPPORTED OPERATION CODES / TMFs, REPORT TARGET PORT GROUPS --------------


def report_supported_tmfs(lu: LogicalUnit, task: ScsiTask) -> None:
    repd = bool(task.cdb[2] & 0x80)
    alloc = struct.unpack_from(">I", task.cdb, 6)[0]
    # ATS, ATSS, CACAS, CTSS, LURS, TRS; no QUERY TASK (iSCSI has no such function).
    data = bytearray(16 if repd else 4)
    data[0] = 0x80 | 0x40 | 0x20 | 0x10 | 0x08 | 0x02
    if repd:
        data[3] = 0x0C
    set_data_in(task, data, alloc)
    lu.done(task)


def report_target_port_groups(lu: LogicalUnit, task: ScsiTask) -> None:
    fmt = task.cdb[1] >> 5
    alloc = struct.unpack_from(">I", task.cdb, 6)[0]
    dev = lu.registry.device_of(task)
    tags = dev.portal_group_tags() if dev is not None else [task.nexus.portal_group_tag]
    body = bytearray()
    for tag in tags:
        # active/optimized, AO_SUP only; one target port whose relative id is the tag
        body += struct.pack(">BBHBBBB", 0x80 if tag == task.nexus.portal_group_tag else 0x00,
                            0x01, tag & 0xFFFF, 0, 0, 0, 1)
        body += struct.pack(">HH", 0, tag & 0xFFFF)
    if fmt == 1:
        data = struct.pack(">IBBH", len(body) + 4, 0x10, 0, 0) + body
    elif fmt == 0:
        data = struct.pack(">I", len(body)) + body
    else:
        raise S.invalid_cdb(1, 5)
    set_data_in(task, data, alloc)
    lu.done(task)


#: INQUIRY-like commands: allowed whatever the reservations and state, UA-exempt.
RO_FLAGS = F.PR_ALLOWED | F.UA_EXEMPT | F.RESV_ALLOWED | F.SANITIZE_OK

COMMANDS = [
    Command(REPORT_LUNS, None, "REPORT LUNS", report_luns,
            usage(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            F.UA_EXEMPT | F.PR_ALLOWED | F.RESV_ALLOWED | F.SANITIZE_OK),
    Command(0x12, None, "INQUIRY", inquiry, usage(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07), RO_FLAGS),
    Command(0x03, None, "REQUEST SENSE", request_sense, usage(0x03, 0x01, 0, 0, 0xFF, 0x07), RO_FLAGS),
    Command(0x00, None, "TEST UNIT READY", test_unit_ready, usage(0x00, 0, 0, 0, 0, 0x07), F.MEDIUM),
    Command(0x1A, None, "MODE SENSE(6)", mode_sense, usage(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07), F.PR_READ),
    Command(0x5A, None, "MODE SENSE(10)", mode_sense,
            usage(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_READ),
    Command(0x4D, None, "LOG SENSE", log_sense,
            usage(0x4D, 0x01, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07), F.PR_READ),
    Command(0x15, None, "MODE SELECT(6)", mode_select, usage(0x15, 0x11, 0, 0, 0xFF, 0x07), F.PR_WRITE),
    Command(0x55, None, "MODE SELECT(10)", mode_select,
            usage(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_WRITE),
    Command(0xA3, 0x0A, "REPORT TARGET PORT GROUPS", report_target_port_groups,
            usage(0xA3, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07), RO_FLAGS & ~F.UA_EXEMPT),
    Command(0xA3, 0x0D, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", report_supported_tmfs,
            usage(0xA3, 0x1F, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07), RO_FLAGS & ~F.UA_EXEMPT),
]
