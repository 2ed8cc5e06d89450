"""SPC-4 primary commands: INQUIRY (its data: inquiry.py), REQUEST SENSE, TEST UNIT READY,
MODE SENSE/SELECT, LOG SENSE, REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS and REPORT
TARGET PORT GROUPS (ALUA: one target port group per portal group).  REPORT SUPPORTED
OPERATION CODES reports the command table, so it lives there (command_table.py)."""

from __future__ import annotations

import struct

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, data_out_needed, set_data_in, usage
from pyscsi_target.scsi.inquiry import standard_inquiry, threshold_exponent, vpd_page
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import ScsiTask
from pyscsi_target.scsi.thin import available


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
        vpd = vpd_page(lu, task.nexus, page)
        if vpd is None:
            raise S.invalid_cdb(2)
        data = vpd
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
    hlen = 8 if ten else 4
    if plen < hlen:
        raise S.param_list_length_error()
    data = data_out_needed(task, plen)
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
            avail = available(lu.backstore.size, used_bytes, free_bytes) >> lu.block_shift
            counts = [(0x0001, avail), (0x0002, used_bytes >> lu.block_shift)]
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
    alua = lu.alua
    preferred = alua.preferred if alua.preferred is not None else frozenset((task.nexus.portal_group_tag,))
    body = bytearray()
    for tag in tags:
        # PREF, the group's state, the states it may take; one target port whose relative id
        # is the tag (implicit ALUA: the states change as gateways come, go and take over)
        body += struct.pack(">BBHBBBB", (0x80 if tag in preferred else 0) | alua.state(tag), alua.supported,
                            tag & 0xFFFF, 0, 0, 0, 1)
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
