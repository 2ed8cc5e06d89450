"""ScsiDevice: the SCSI target device behind one target node.

It routes commands to logical units by LUN, answers for LUNs that are not mapped
(INQUIRY with peripheral qualifier 011b, LOGICAL UNIT NOT SUPPORTED), serves the
REPORT LUNS well-known LUN, and carries out task management functions.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Mapping

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import set_data_in
from pyscsi_target.scsi.command_table import COMMANDS_BY_OPCODE, lookup
from pyscsi_target.scsi.inquiry import NO_LU, WELL_KNOWN_LU, standard_inquiry
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.registry import ScsiRegistry
from pyscsi_target.scsi.spc import REPORT_LUNS
from pyscsi_target.scsi.task import (
    LUN_UNSUPPORTED,
    WLUN_REPORT_LUNS,
    Nexus,
    ScsiTask,
    TaskAttr,
    TmfResult,
    decode_lun,
    encode_lun,
)

log = logging.getLogger(__name__)


class ScsiDevice:
    """The SCSI target device of one target node (its LUN map and I_T nexuses)."""

    def __init__(self, target_iqn: str, registry: ScsiRegistry) -> None:
        self.target_iqn = target_iqn
        self.registry = registry
        self.luns: dict[int, LogicalUnit] = {}
        self.nexuses: dict[int, Nexus] = {}
        self._portal_tags: list[int] | None = None
        self._settling: list[asyncio.Future[None]] = []  # resets still spreading (when_settled)
        registry.devices[target_iqn] = self

    # --- configuration -----------------------------------------------------------------

    def set_portal_groups(self, tags: list[int]) -> None:
        """Portal group tags this target is exported through (one ALUA group each)."""
        self._portal_tags = sorted(set(tags))

    def portal_group_tags(self) -> list[int]:
        tags = set(self._portal_tags or ())
        tags.update(n.portal_group_tag for n in self.nexuses.values())
        return sorted(tags)

    def has_initiator(self, initiator_name: str) -> bool:
        return any(n.initiator_name.lower() == initiator_name for n in self.nexuses.values())

    def set_luns(self, luns: Mapping[int, LogicalUnit]) -> None:
        """Replace the LUN map; a change raises REPORTED LUNS DATA HAS CHANGED everywhere."""
        new = dict(luns)
        changed = new.keys() != self.luns.keys() or any(new[k] is not self.luns[k] for k in new)
        it_key = self.registry.it_key
        keys = {it_key(n) for n in self.nexuses.values()}
        for lun, lu in self.luns.items():
            if new.get(lun) is not lu:
                for n in self.nexuses.values():
                    lu.nexus_lost(it_key(n), n.nexus_id)
                    lu.detach_nexus(it_key(n))
        for lun, lu in new.items():
            if self.luns.get(lun) is not lu:
                for n in self.nexuses.values():
                    lu.attach_nexus(it_key(n), ua=None)
        self.luns = new
        if changed and keys:
            for lu in new.values():
                for k in keys:
                    lu.add_ua(k, S.REPORTED_LUNS_DATA_HAS_CHANGED)

    def close(self) -> None:
        for n in list(self.nexuses.values()):
            self.nexus_lost(n)
        self.set_luns({})
        if self.registry.devices.get(self.target_iqn) is self:
            del self.registry.devices[self.target_iqn]

    # --- nexus lifecycle ------------------------------------------------------------

    def add_nexus(self, nexus: Nexus) -> None:
        """A new I_T nexus (session): every LU owes it POWER ON, RESET... once."""
        self.nexuses[nexus.nexus_id] = nexus
        key = self.registry.it_key(nexus)
        for lu in self.luns.values():
            lu.attach_nexus(key)

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss (session closed or dropped): abort its tasks, drop RESERVE."""
        if self.nexuses.pop(nexus.nexus_id, None) is None:
            return
        key = self.registry.it_key(nexus)
        for lu in self.luns.values():
            lu.nexus_lost(key, nexus.nexus_id)
            lu.detach_nexus(key)
        self.registry.forget_nexus(nexus)

    # --- command submission -------------------------------------------------------

    def submit(self, task: ScsiTask) -> None:
        lun = task.lun
        if lun >= 1 << 16:
            lun = decode_lun(lun)
        if len(task.cdb) < 16:
            task.cdb = bytes(task.cdb).ljust(16, b"\0")
        lu = self.luns.get(lun)
        try:
            cmd = lookup(task.cdb)
            if task.cdb[0] == REPORT_LUNS:
                self._report_luns(task, lu)
                return
            if lu is None:
                self._no_lu(task, lun)
                return
            if task.attr == TaskAttr.ACA:
                # No ACA condition can exist (NACA is refused), so an ACA task is invalid.
                raise S.CheckCondition(S.ILLEGAL_REQUEST, S.INVALID_MESSAGE_ERROR)
            if cmd is None:
                key = self.registry.it_key(task.nexus)
                if lu.ua.get(key):
                    code = lu.pop_ua(key)
                    assert code is not None
                    raise S.unit_attention(code)
                if task.cdb[0] in COMMANDS_BY_OPCODE:
                    raise S.invalid_cdb(1, 4)  # known opcode, unknown service action
                raise S.invalid_opcode()
            if task.cdb[cmd.cdb_len - 1] & 0x04:  # NACA: ACA is not supported
                raise S.invalid_cdb(cmd.cdb_len - 1, 2)
            lu.precheck(task, cmd)
            lu.execute(task, cmd)
        except (S.CheckCondition, S.ReservationConflict) as e:
            if lu is not None:
                lu.fail(task, e)
            else:
                self._fail(task, e)

    def _fail(self, task: ScsiTask, exc: S.CheckCondition | S.ReservationConflict) -> None:
        if isinstance(exc, S.CheckCondition):
            task.status = S.CHECK_CONDITION
            task.sense = exc.encode(False)
        else:
            task.status = S.RESERVATION_CONFLICT
        task.data_in = []
        task.data_in_len = 0
        self._complete(task)

    @staticmethod
    def _complete(task: ScsiTask) -> None:
        cb = task.on_done
        task.on_done = None
        if cb is not None:
            cb(task)

    def _no_lu(self, task: ScsiTask, lun: int) -> None:
        """Commands to a LUN with no logical unit (or the REPORT LUNS well-known LUN)."""
        op = task.cdb[0]
        wlun = lun == WLUN_REPORT_LUNS
        if op == 0x12:  # INQUIRY
            if task.cdb[1] & 0x01 or task.cdb[2]:
                if not wlun:
                    raise S.lu_not_supported()
                raise S.invalid_cdb(1 if task.cdb[1] & 0x01 else 2)
            alloc = struct.unpack_from(">H", task.cdb, 3)[0]
            data = standard_inquiry(None, WELL_KNOWN_LU if wlun else NO_LU)
            set_data_in(task, data, alloc)
            task.status = S.GOOD
            self._complete(task)
            return
        if op == 0x03:  # REQUEST SENSE
            desc = bool(task.cdb[1] & 0x01)
            if wlun:
                data = S.build_sense(S.NO_SENSE, S.NO_ADDITIONAL_SENSE, desc)
            else:
                data = S.build_sense(S.ILLEGAL_REQUEST, S.LOGICAL_UNIT_NOT_SUPPORTED, desc)
            set_data_in(task, data, task.cdb[4])
            task.status = S.GOOD
            self._complete(task)
            return
        if wlun:
            if op == 0x00:  # TEST UNIT READY
                task.status = S.GOOD
                self._complete(task)
                return
            raise S.invalid_opcode()
        raise S.lu_not_supported()

    def _report_luns(self, task: ScsiTask, lu: LogicalUnit | None) -> None:
        cdb = task.cdb
        select = cdb[2]
        alloc = struct.unpack_from(">I", cdb, 6)[0]
        if alloc < 16:
            raise S.invalid_cdb(6)
        if select == 0x00:
            luns = sorted(self.luns)
        elif select == 0x01:
            luns = [WLUN_REPORT_LUNS]
        elif select == 0x02:
            luns = [*sorted(self.luns), WLUN_REPORT_LUNS]
        elif select in (0x10, 0x11, 0x12):
            luns = []  # no administrative logical units / conglomerates
        else:
            raise S.invalid_cdb(2)
        body = b"".join(encode_lun(n) for n in luns)
        data = struct.pack(">I4x", len(body)) + body
        set_data_in(task, data, alloc)
        # REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED for this I_T nexus (SPC-4 6.33).
        key = self.registry.it_key(task.nexus)
        for each in self.luns.values():
            pending = each.ua.get(key)
            if pending and S.REPORTED_LUNS_DATA_HAS_CHANGED in pending:
                pending.remove(S.REPORTED_LUNS_DATA_HAS_CHANGED)
                if not pending:
                    del each.ua[key]
        task.status = S.GOOD
        self._complete(task)

    # --- task management (SAM-5 7) ----------------------------------------------------

    def _lu_for(self, lun: int) -> LogicalUnit | None:
        if lun >= 1 << 16:
            lun = decode_lun(lun)
        if lun == LUN_UNSUPPORTED:
            return None
        return self.luns.get(lun)

    def abort_task(self, nexus: Nexus, lun: int, tag: int) -> TmfResult:
        lu = self._lu_for(lun)
        if lu is None:
            return TmfResult.NO_SUCH_LUN
        task = lu.find_task(nexus, tag)
        if task is None:
            return TmfResult.NO_SUCH_TASK
        lu.abort_tasks(lambda t: t is task)
        return TmfResult.COMPLETE

    def abort_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        lu = self._lu_for(lun)
        if lu is None:
            return TmfResult.NO_SUCH_LUN
        lu.abort_tasks(lambda t: t.nexus.nexus_id == nexus.nexus_id)
        return TmfResult.COMPLETE

    def clear_task_set(self, nexus: Nexus, lun: int) -> TmfResult:
        lu = self._lu_for(lun)
        if lu is None:
            return TmfResult.NO_SUCH_LUN
        others = {self.registry.it_key(t.nexus) for t in lu.tasks.values() if t.nexus.nexus_id != nexus.nexus_id}
        lu.abort_tasks(lambda t: True)
        for k in others:  # TAS=0: their commands vanish, so tell them why (SAM-5 5.6)
            lu.add_ua(k, S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
        return TmfResult.COMPLETE

    def clear_aca(self, nexus: Nexus, lun: int) -> TmfResult:
        lu = self._lu_for(lun)
        if lu is None:
            return TmfResult.NO_SUCH_LUN
        return TmfResult.COMPLETE  # NACA=1 is refused, so there is never an ACA to clear

    def lun_reset(self, nexus: Nexus, lun: int) -> TmfResult:
        lu = self._lu_for(lun)
        if lu is None:
            return TmfResult.NO_SUCH_LUN
        self._reset(lu, S.BUS_DEVICE_RESET_OCCURRED)
        return TmfResult.COMPLETE

    def target_reset(self, nexus: Nexus, cold: bool) -> TmfResult:
        code = S.POWER_ON_OCCURRED if cold else S.POWER_ON_RESET
        for lu in self.luns.values():
            self._reset(lu, code)
        return TmfResult.COMPLETE

    def _reset(self, lu: LogicalUnit, code: tuple[int, int]) -> None:
        lu.reset(code)
        if lu.on_reset is not None:
            spreading = lu.on_reset(code)
            if spreading is not None:
                self._settling.append(spreading)

    def when_settled(self, done: Callable[[], None]) -> None:
        """Call ``done`` once the resets just made have reached every part of their LUs (at
        once unless a LU spans several gateways): the TMF response waits for it."""
        pending, self._settling = self._settling, []
        if not pending:
            done()
            return
        gathered = asyncio.gather(*pending, return_exceptions=True)
        gathered.add_done_callback(lambda _f: done())
