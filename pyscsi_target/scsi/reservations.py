"""Persistent reservation state of one logical unit (SPC-4 5.12): registrations per
I_T nexus, the reservation, the generation, and the APTPL record.

Registrations are per I_T nexus, i.e. (SCSI initiator port name, relative target port),
so two sessions of one initiator with different ISIDs are different registrants and a
reinstated session (same ISID) keeps its registration.  With APTPL the whole state is
kept in the LU's StateWriter (keyed by the NAA designator) and restored when the LU opens.
The commands that change it are in pr.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import F
from pyscsi_target.scsi.registry import ITKey

if TYPE_CHECKING:  # annotations only: lu.py imports this module
    from pyscsi_target.scsi.lu import LogicalUnit
    from pyscsi_target.scsi.task import ScsiTask

log = logging.getLogger(__name__)

# Reservation types
WE = 1  # write exclusive
EA = 3  # exclusive access
WE_RO = 5  # write exclusive, registrants only
EA_RO = 6
WE_AR = 7  # write exclusive, all registrants
EA_AR = 8
TYPES = (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)
ALL_REGISTRANTS = (WE_AR, EA_AR)


@dataclass(slots=True)
class Reservation:
    holder: ITKey  # the I_T nexus that reserved (for all-registrants types: any registrant)
    type: int


# registrations, reservation, generation, APTPL: what a failed save rolls back to
_Snapshot = tuple[dict[ITKey, int], Reservation | None, int, bool]


class PersistentReservations:
    def __init__(self, lu: LogicalUnit) -> None:
        self.lu = lu
        self.regs: dict[ITKey, int] = {}
        self.reservation: Reservation | None = None
        self.generation = 0
        self.aptpl = False
        self._load()
        self._durable = self._snapshot()  # the state as last saved (or loaded)
        self._commits = 0  # changes handed to commit(), to tell the newest

    # --- persistence -----------------------------------------------------------------

    @property
    def key(self) -> str:
        """The StateWriter key of the APTPL record."""
        return self.lu.naa.hex()

    def _load(self) -> None:
        state = self.lu.state
        if state is None:
            return
        try:
            raw = state.load(self.key)
        except Exception:  # noqa: BLE001 - a broken store must not keep the LU offline
            log.exception("loading PR state of %s", self.key)
            return
        if not raw:
            return
        try:
            doc = json.loads(raw)
            self.regs = {(r["port"], int(r["tpg"])): int(r["key"]) for r in doc["registrations"]}
            res = doc.get("reservation")
            if res:
                self.reservation = Reservation((res["port"], int(res["tpg"])), int(res["type"]))
            self.generation = int(doc.get("generation", 0))
            self.aptpl = True
        except (ValueError, KeyError, TypeError):
            log.error("corrupt PR state for %s ignored", self.key)

    def record(self) -> bytes | None:
        """What the store keeps: the whole state with APTPL, else nothing."""
        if not self.aptpl:
            return None
        res = self.reservation
        doc = {
            "registrations": [{"port": p, "tpg": t, "key": k} for (p, t), k in self.regs.items()],
            "reservation": {"port": res.holder[0], "tpg": res.holder[1], "type": res.type} if res else None,
            "generation": self.generation,
        }
        return json.dumps(doc).encode()

    def _snapshot(self) -> _Snapshot:
        r = self.reservation
        return dict(self.regs), (Reservation(r.holder, r.type) if r else None), self.generation, self.aptpl

    def _restore(self, snap: _Snapshot) -> None:
        regs, r, self.generation, self.aptpl = snap
        self.regs = dict(regs)
        self.reservation = Reservation(r.holder, r.type) if r else None

    def commit(self, task: ScsiTask) -> None:
        """Complete the PR OUT ``task`` GOOD once the state it left is durable.  If it cannot
        be saved (a full state disk), the task fails and the state goes back to what is saved,
        unless a later PR OUT, which built on this one, is still to commit and settles it.
        (Unit attentions and aborts the change caused are not taken back.)"""
        self._commits += 1
        mine = self._commits
        state = self._snapshot()

        def saved() -> None:
            self._durable = state
            self.lu.done(task)

        def not_saved() -> None:
            if self._commits == mine:
                self._restore(self._durable)

        self.lu.persist(self.key, self.record(), task, then=saved, undo=not_saved)

    def change(self, task: ScsiTask, apply: Callable[[], None]) -> None:
        """Run a PR OUT's ``apply``, which changes the state and completes ``task`` (through
        ``commit`` or ``lu.done``) or raises.  Here the state is this LU's alone: at once."""
        apply()

    def unit_attention(self, key: ITKey, code: tuple[int, int]) -> None:
        """A unit attention a change raises for another I_T nexus."""
        self.lu.add_ua(key, code)

    def abort_nexuses(self, keys: set[ITKey], task: ScsiTask) -> None:
        """PREEMPT AND ABORT: abort the tasks of the preempted nexuses (not ``task`` itself)."""
        it_key = self.lu.registry.it_key
        self.lu.abort_tasks(lambda t: it_key(t.nexus) in keys and t is not task)

    # --- queries ---------------------------------------------------------------------

    def is_holder(self, key: ITKey) -> bool:
        r = self.reservation
        if r is None:
            return False
        if r.type in ALL_REGISTRANTS:
            return key in self.regs
        return r.holder == key

    def conflicts(self, key: ITKey, flags: int) -> bool:
        """Whether a command with ``flags`` from ``key`` conflicts (SPC-4 5.12.1 tables)."""
        r = self.reservation
        if r is None or flags & F.PR_ALLOWED or self.is_holder(key):
            return False
        write = bool(flags & F.PR_WRITE)
        read = bool(flags & F.PR_READ)
        if r.type in (WE_RO, WE_AR):
            return write and key not in self.regs
        if r.type in (EA_RO, EA_AR):
            return (read or write) and key not in self.regs
        if r.type == WE:
            return write
        return read or write  # EA

    # --- changes ---------------------------------------------------------------------

    def bump(self) -> None:
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def release(self, notify: bool, except_key: ITKey | None) -> None:
        r = self.reservation
        self.reservation = None
        if notify and r is not None and r.type not in (WE, EA):
            for k in self.regs:
                if k != except_key:
                    self.unit_attention(k, S.RESERVATIONS_RELEASED)

    def unregister(self, key: ITKey) -> None:
        self.regs.pop(key, None)
        r = self.reservation
        if r is None:
            return
        if r.type in ALL_REGISTRANTS:
            if not self.regs:
                self.reservation = None
            elif r.holder == key:
                r.holder = next(iter(self.regs))
        elif r.holder == key:
            self.release(True, key)
