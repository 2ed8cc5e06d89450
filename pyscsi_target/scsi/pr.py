"""Reservation commands: PERSISTENT RESERVE IN/OUT (SPC-4 5.12, 6.15, 6.16) and
RESERVE/RELEASE(6/10).  The state they act on is scsi/reservations.py; a PR OUT
completes once the state it leaves is durable (APTPL)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, data_out_needed, set_data_in, usage
from pyscsi_target.scsi.registry import ITKey
from pyscsi_target.scsi.reservations import ALL_REGISTRANTS, TYPES, Reservation

if TYPE_CHECKING:
    from pyscsi_target.scsi.lu import LogicalUnit
    from pyscsi_target.scsi.task import ScsiTask

INVALID_RELEASE_OF_PR = (0x26, 0x04)


# --- PERSISTENT RESERVE IN ----------------------------------------------------------


def _alloc16(task: ScsiTask) -> int:
    alloc: int = struct.unpack_from(">H", task.cdb, 7)[0]
    return alloc


def transport_id(port: str) -> bytes:
    """iSCSI TransportID, format 01 (initiator port name with ISID), padded to 4 bytes."""
    name = port.encode() + b"\0"
    name += bytes(-len(name) % 4)
    if len(name) < 20:
        name += bytes(20 - len(name))
    return bytes((0x40 | 0x05, 0)) + struct.pack(">H", len(name)) + name


def parse_transport_id(data: memoryview) -> tuple[str, bool]:
    """(name or initiator port, has_isid) of an iSCSI TransportID; raises on others."""
    if len(data) < 4:
        raise S.param_list_length_error()
    proto = data[0] & 0x0F
    fmt = data[0] >> 6
    if proto != 0x05 or fmt not in (0, 1):
        raise S.invalid_param(24)
    length = struct.unpack_from(">H", data, 2)[0]
    if 4 + length > len(data):
        raise S.param_list_length_error()
    text = bytes(data[4 : 4 + length]).split(b"\0", 1)[0].decode("utf-8", "replace")
    if fmt == 1:
        name, sep, isid = text.partition(",i,")
        if not sep:
            raise S.invalid_param(28)
        return f"{name.lower()},i,{isid.lower()}", True
    return text.lower(), False


def prin(lu: LogicalUnit, task: ScsiTask) -> None:
    sa = task.cdb[1] & 0x1F
    alloc = _alloc16(task)
    pr = lu.pr
    if sa == 0x00:  # READ KEYS
        keys = b"".join(struct.pack(">Q", k) for k in pr.regs.values())
        data = struct.pack(">II", pr.generation, len(keys)) + keys
    elif sa == 0x01:  # READ RESERVATION
        r = pr.reservation
        if r is None:
            data = struct.pack(">II", pr.generation, 0)
        else:
            key = 0 if r.type in ALL_REGISTRANTS else pr.regs.get(r.holder, 0)
            body = struct.pack(">QIBBH", key, 0, 0, r.type & 0x0F, 0)
            data = struct.pack(">II", pr.generation, len(body)) + body
    elif sa == 0x02:  # REPORT CAPABILITIES
        # CRH: RESERVE/RELEASE compatible reservation handling; PTPL_C: APTPL supported.
        b2 = 0x10 | 0x01
        b3 = 0x80 | (0x01 if pr.aptpl else 0)  # TMV, ALLOW COMMANDS 000, PTPL_A
        mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
        data = struct.pack(">HBBBBH", 8, b2, b3, mask, 0x01, 0)
    elif sa == 0x03:  # READ FULL STATUS
        descs = []
        for k, key in pr.regs.items():
            holder = pr.is_holder(k)
            r = pr.reservation
            tid = transport_id(k[0])
            d = struct.pack(
                ">QIBBIHI",
                key,
                0,
                0x01 if holder else 0,
                (r.type & 0x0F) if (holder and r) else 0,
                0,
                k[1],
                len(tid),
            )
            descs.append(d + tid)
        body = b"".join(descs)
        data = struct.pack(">II", pr.generation, len(body)) + body
    else:
        raise S.invalid_cdb(1, 4)
    set_data_in(task, data, alloc)
    lu.done(task)


# --- PERSISTENT RESERVE OUT --------------------------------------------------------


def prout(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    sa = cdb[1] & 0x1F
    scope = cdb[2] >> 4
    rtype = cdb[2] & 0x0F
    plen = struct.unpack_from(">I", cdb, 5)[0]
    task.xfer_len = plen
    if sa > 0x07:
        raise S.invalid_cdb(1, 4)
    if sa == 0x07:
        if plen < 24:
            raise S.param_list_length_error()
    elif plen != 24:
        raise S.param_list_length_error()
    data = data_out_needed(task, plen)
    # The rest acts on the reservation state: where that state is shared (several gateways)
    # the change runs on a fresh copy and commits atomically (reservations.py ``change``).
    lu.pr.change(task, lambda: _prout(lu, task, sa, scope, rtype, data))


def _prout(lu: LogicalUnit, task: ScsiTask, sa: int, scope: int, rtype: int, data: memoryview) -> None:
    pr = lu.pr
    me = lu.registry.it_key(task.nexus)
    res_key, sark = struct.unpack_from(">QQ", data, 0)
    mine = pr.regs.get(me)

    if sa == 0x07:
        _register_and_move(lu, task, me, res_key, sark, scope, rtype, data)
        return

    flags = data[20]
    spec_i_pt, all_tg_pt, aptpl = flags & 0x08, flags & 0x04, flags & 0x01
    if sa in (0x00, 0x06):  # REGISTER / REGISTER AND IGNORE EXISTING KEY
        if spec_i_pt:
            raise S.invalid_param(20, 3)  # SIP_C is 0
        if all_tg_pt:
            raise S.invalid_param(20, 2)  # ATP_C is 0
        if sa == 0x00 and mine is None and res_key != 0:
            raise S.ReservationConflict()
        if sa == 0x00 and mine is not None and res_key != mine:
            raise S.ReservationConflict()
        if mine is None:
            if sark != 0:
                pr.regs[me] = sark
        elif sark == 0:
            pr.unregister(me)
        else:
            pr.regs[me] = sark
        pr.aptpl = bool(aptpl)
        pr.bump()
        pr.commit(task)
        return

    # Every other service action needs a registered nexus with the matching key.
    if mine is None or mine != res_key:
        raise S.ReservationConflict()
    # (APTPL only matters on the REGISTER family; SPC-4 has it ignored elsewhere.)
    if sa == 0x01:  # RESERVE
        if scope != 0:
            raise S.invalid_cdb(2, 7)
        if rtype not in TYPES:
            raise S.invalid_cdb(2, 3)
        r = pr.reservation
        if r is None:
            pr.reservation = Reservation(me, rtype)
            pr.commit(task)
        elif not pr.is_holder(me) or r.type != rtype:
            raise S.ReservationConflict()
        else:
            lu.done(task)
        return
    if sa == 0x02:  # RELEASE
        r = pr.reservation
        if r is None or not pr.is_holder(me):
            lu.done(task)
            return
        if scope != 0 or rtype != r.type:
            raise S.CheckCondition(S.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PR)
        pr.release(True, me)
        pr.commit(task)
        return
    if sa == 0x03:  # CLEAR
        for k in list(pr.regs):
            if k != me:
                pr.unit_attention(k, S.RESERVATIONS_PREEMPTED)
        pr.regs.clear()
        pr.reservation = None
        pr.bump()
        pr.commit(task)
        return
    if sa in (0x04, 0x05):  # PREEMPT / PREEMPT AND ABORT
        _preempt(lu, task, me, sark, scope, rtype, abort=sa == 0x05)
        return
    raise S.invalid_cdb(1, 4)


def _remove_regs(lu: LogicalUnit, key_value: int, me: ITKey) -> list[ITKey]:
    pr = lu.pr
    gone = [k for k, v in pr.regs.items() if v == key_value and k != me]
    for k in gone:
        del pr.regs[k]
        pr.unit_attention(k, S.REGISTRATIONS_PREEMPTED)
    return gone


def _preempt(lu: LogicalUnit, task: ScsiTask, me: ITKey, sark: int, scope: int, rtype: int, abort: bool) -> None:
    pr = lu.pr
    r = pr.reservation
    gone: list[ITKey]
    if r is not None and (scope != 0 or rtype not in TYPES):
        raise S.invalid_cdb(2)
    if r is None:
        if sark == 0:
            raise S.invalid_param(8)
        gone = _remove_regs(lu, sark, me)
        if not gone and sark != pr.regs.get(me):
            raise S.ReservationConflict()
    elif r.type in ALL_REGISTRANTS:
        if sark == 0:
            gone = [k for k in pr.regs if k != me]
            for k in gone:
                del pr.regs[k]
                pr.unit_attention(k, S.REGISTRATIONS_PREEMPTED)
            pr.reservation = Reservation(me, rtype)
        else:
            gone = _remove_regs(lu, sark, me)
            if not gone and sark != pr.regs.get(me):
                raise S.ReservationConflict()
    else:
        holder_key = pr.regs.get(r.holder)
        if sark == holder_key:
            gone = _remove_regs(lu, sark, me)
            old_type = r.type
            pr.reservation = Reservation(me, rtype)
            if old_type != rtype or r.holder != me:
                for k in pr.regs:
                    if k != me and k not in gone:
                        pr.unit_attention(k, S.RESERVATIONS_RELEASED)
        else:
            if sark == 0:
                raise S.invalid_param(8)
            gone = _remove_regs(lu, sark, me)
            if not gone and sark != pr.regs.get(me):
                raise S.ReservationConflict()
    if abort and gone:
        pr.abort_nexuses(set(gone), task)
    pr.bump()
    pr.commit(task)


def _register_and_move(
    lu: LogicalUnit, task: ScsiTask, me: ITKey, res_key: int, sark: int, scope: int, rtype: int, data: memoryview
) -> None:
    pr = lu.pr
    mine = pr.regs.get(me)
    if mine is None or mine != res_key:
        raise S.ReservationConflict()
    r = pr.reservation
    if r is None or not pr.is_holder(me) or r.type in ALL_REGISTRANTS:
        raise S.ReservationConflict()
    unreg, aptpl = data[17] & 0x02, data[17] & 0x01
    rel_port = struct.unpack_from(">H", data, 18)[0]
    tid_len = struct.unpack_from(">I", data, 20)[0]
    if 24 + tid_len > len(data):
        raise S.param_list_length_error()
    if sark == 0:
        raise S.invalid_param(8)
    port, has_isid = parse_transport_id(data[24 : 24 + tid_len])
    if has_isid:
        dest = (port, rel_port)
    else:
        matches = [k for k in lu.nexuses if k[0].split(",i,")[0] == port and k[1] == rel_port]
        if len(matches) != 1:
            raise S.invalid_param(24)
        dest = matches[0]
    if dest == me:
        raise S.invalid_param(24)
    pr.regs[dest] = sark
    pr.reservation = Reservation(dest, r.type)
    if unreg:
        pr.regs.pop(me, None)
    pr.aptpl = bool(aptpl)
    pr.bump()
    pr.commit(task)


# --- RESERVE / RELEASE (6) and (10) ---------------------------------------------------


def reserve(lu: LogicalUnit, task: ScsiTask) -> None:
    if task.cdb[0] == 0x56 and task.cdb[1] & 0x12:  # 3RDPTY / LONGID: third-party unsupported
        raise S.invalid_cdb(1, 4 if task.cdb[1] & 0x10 else 1)
    if task.cdb[0] == 0x16 and task.cdb[1] & 0x01:  # obsolete extent reservation
        raise S.invalid_cdb(1, 0)
    me = lu.registry.it_key(task.nexus)
    if lu.pr.regs or lu.pr.reservation is not None:
        raise S.ReservationConflict()
    if lu.legacy_holder is not None and lu.legacy_holder != me:
        raise S.ReservationConflict()
    lu.legacy_holder = me
    lu.done(task)


def release(lu: LogicalUnit, task: ScsiTask) -> None:
    if task.cdb[0] == 0x57 and task.cdb[1] & 0x12:
        raise S.invalid_cdb(1, 4 if task.cdb[1] & 0x10 else 1)
    me = lu.registry.it_key(task.nexus)
    if lu.pr.reservation is not None:
        raise S.ReservationConflict()
    if lu.legacy_holder == me:
        lu.legacy_holder = None
    lu.done(task)  # releasing someone else's (or no) reservation is a no-op (SPC-2 7.21)


COMMANDS = [
    Command(0x5E, 0x00, "PERSISTENT RESERVE IN / READ KEYS", prin,
            usage(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_ALLOWED),
    Command(0x5E, 0x01, "PERSISTENT RESERVE IN / READ RESERVATION", prin,
            usage(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_ALLOWED),
    Command(0x5E, 0x02, "PERSISTENT RESERVE IN / REPORT CAPABILITIES", prin,
            usage(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_ALLOWED),
    Command(0x5E, 0x03, "PERSISTENT RESERVE IN / READ FULL STATUS", prin,
            usage(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.PR_ALLOWED),
    *[
        Command(0x5F, sa, f"PERSISTENT RESERVE OUT / {name}", prout,
                usage(0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07), F.PR_ALLOWED)
        for sa, name in enumerate(
            ("REGISTER", "RESERVE", "RELEASE", "CLEAR", "PREEMPT", "PREEMPT AND ABORT",
             "REGISTER AND IGNORE EXISTING KEY", "REGISTER AND MOVE")
        )
    ],
    Command(0x16, None, "RESERVE(6)", reserve, usage(0x16, 0, 0, 0, 0, 0x07), F.PR_WRITE),
    Command(0x17, None, "RELEASE(6)", release, usage(0x17, 0, 0, 0, 0, 0x07), F.PR_WRITE | F.RESV_ALLOWED),
    Command(0x56, None, "RESERVE(10)", reserve,
            usage(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x07), F.PR_WRITE),
    Command(0x57, None, "RELEASE(10)", release,
            usage(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x07), F.PR_WRITE | F.RESV_ALLOWED),
]
