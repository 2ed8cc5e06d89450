"""A logical unit: one backstore, shared by every target (ScsiDevice) that maps it.

It owns the SCSI state that SAM-5/SPC-4 put in the logical unit: the task set,
unit attentions per I_T nexus, mode pages, RESERVE/RELEASE and persistent
reservations, the third-party-copy results, and the I/O machinery on the backstore.

Execution model: everything runs on the event loop thread.  A command completes
synchronously inside submit when it can (page-cache hits, metadata commands), else
the backstore completes its I/O on the loop through a callback (backstore/base.py:
executor, writer thread or the backstore's own asynchronous I/O; no asyncio Task per
command).  Blocking backstore operations (COMPARE AND WRITE, UNMAP...) run in the loop's
default executor and complete from the future's done-callback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from pyscsi_target.backstore.base import Backstore, Buffer, PathUnavailable
from pyscsi_target.log_limit import LogLimit
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.alua import TARGET_PORT_UNAVAILABLE, Alua
from pyscsi_target.scsi.command import F
from pyscsi_target.scsi.modepages import ModePages
from pyscsi_target.scsi.persistence import StateWriter
from pyscsi_target.scsi.registry import ITKey, ScsiRegistry
from pyscsi_target.scsi.reservations import PersistentReservations
from pyscsi_target.scsi.settings import LuSettings
from pyscsi_target.scsi.task import MAX_TRANSFER_BYTES, Nexus, ScsiTask, TaskAttr
from pyscsi_target.scsi.thin import SoftThreshold

if TYPE_CHECKING:  # annotations only: these modules import this one
    from pyscsi_target.scsi.command import Command
    from pyscsi_target.scsi.tpc import CopyResult

R = TypeVar("R")

log = logging.getLogger(__name__)
# A failing backstore fails every command that reaches it: one line per LU and fault, with
# the count of the rest, instead of one per command.
_io_log = LogLimit()
# Out of space on the storage under a LU: SBC-3 4.7.3.6 (thin provisioning), as LIO maps
# ENOSPC; a quota exceeded is the same condition seen from the storage.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PERSISTENT_RESERVE_OUT = 0x5F
# Commands whose backstore failure is a failed read: READ(6/10/12/16), VERIFY(10/12/16) and
# PRE-FETCH(10/16) report UNRECOVERED READ ERROR (03/11/00), as LIO and a disk do; the rest
# (writes, WRITE SAME, UNMAP, SYNCHRONIZE CACHE...) report WRITE ERROR (03/0C/00).
_READ_OPCODES = frozenset((0x08, 0x28, 0xA8, 0x88, 0x2F, 0xAF, 0x8F, 0x34, 0x90))
# PYSCSI_TRACE_SCSI=1 logs every completed command's status and sense (debugging aid).
_TRACE = bool(os.environ.get("PYSCSI_TRACE_SCSI"))

# MAXIMUM TRANSFER LENGTH (block limits VPD), shared with the transport through the contract.
MAX_XFER_BYTES = MAX_TRANSFER_BYTES
MAX_UNMAP_LBA_COUNT_BYTES = 256 << 20
MAX_UNMAP_DESCRIPTORS = 256
# MAXIMUM WRITE SAME LENGTH (block limits VPD), enforced with INVALID FIELD IN CDB as LIO
# does.  0 ("no limit") would let Linux sd send up to 0x7FFFFF blocks per WRITE SAME
# (write_same_max_bytes / write_zeroes_max_bytes: 4 GiB at 512 B, 32 GiB at 4 KiB), each
# holding every other write to the LU while it runs (WRITE SAME is exclusive) and risking
# the initiator's command timeout.  One WRITE's worth (64 MiB) bounds that work like any
# other command, still lets Linux zero in 64 MiB steps with WRITE SAME(16), and stays far
# above what VAAI block zeroing sends per command.  Keeping it <= MAXIMUM TRANSFER
# LENGTH also keeps the two limits consistent for initiators (libiscsi's WriteSame16.Unmap
# among them) that write a range with one WRITE before unmapping it with one WRITE SAME.
MAX_WRITE_SAME_BYTES = MAX_XFER_BYTES
MAX_CAW_BLOCKS = 255  # COMPARE AND WRITE NUMBER OF LOGICAL BLOCKS is one byte
MAX_ATOMIC_BYTES = 1 << 20


class LogicalUnit:
    """A direct-access block device (peripheral device type 0) on one backstore."""

    # Slots: every command reads a dozen of these, and 36 attributes are past what
    # CPython's shared-key instance dicts (and their fastest attribute loads) take.
    __slots__ = (
        "alua", "avail_threshold", "backstore", "block_shift", "block_size", "blocked", "closed", "copy_results",
        "excl_active", "excl_waiters", "insecure_tpc", "it_key", "lbppbe", "legacy_holder", "modes", "naa",
        "name", "nexuses", "num_blocks", "on_reset", "ordered_running", "pr", "read_only", "registry", "rpm",
        "sanitize_busy", "sanitize_failed", "sanitize_progress", "sanitizing", "serial", "settings", "state",
        "stopped", "tasks", "threshold", "ua", "writes_inflight", "xen",
    )

    def __init__(
        self,
        settings: LuSettings,
        backstore: Backstore,
        registry: ScsiRegistry,
        state: StateWriter | None = None,
    ) -> None:
        self.backstore = backstore
        self.registry = registry
        self.it_key = registry.it_key  # bound once: every command's precheck calls it
        self.state = state  # durable PR / mode page / sanitize records, if any
        self.block_size = settings.block_size  # fixed for the LU's life (a change reopens it)
        self.block_shift = settings.block_shift
        self._apply_settings(settings)
        self.num_blocks = backstore.size // self.block_size
        saved_modes = state.load(self.modes_key) if state is not None else None
        self.modes = ModePages(saved_modes)
        self.pr = PersistentReservations(self)
        self.alua = Alua()  # target port group states (all active/optimized unless a cluster sets them)
        # A reset by task management reaches only this daemon's part of the LU; a cluster's
        # gateways spread it to the others, and the TMF response waits for what this returns.
        self.on_reset: Callable[[tuple[int, int]], asyncio.Future[None] | None] | None = None
        self.legacy_holder: ITKey | None = None  # RESERVE(6/10) holder
        self.ua: dict[ITKey, list[tuple[int, int]]] = {}
        self.nexuses: dict[ITKey, int] = {}  # I_T nexuses known to this LU (key -> refcount)
        # task set
        self.tasks: dict[tuple[int, int], ScsiTask] = {}
        self.blocked: deque[tuple[ScsiTask, Command]] = deque()
        self.ordered_running: set[ScsiTask] = set()  # ORDERED tasks currently running
        # write serialisation for COMPARE AND WRITE & co.
        self.writes_inflight = 0
        self.excl_active = False
        self.excl_waiters: deque[tuple[bool, Callable[[], None]]] = deque()
        # device state
        self.stopped = False
        self.sanitizing = False
        self.sanitize_failed = False
        self.sanitize_progress = 0.0  # fraction done, for the progress indication
        self.sanitize_busy = False  # a sanitize step is in a worker thread (close waits for it)
        self.copy_results: dict[tuple[ITKey, int], CopyResult] = {}
        self.threshold = SoftThreshold()
        self.closed = False
        registry.lus[self.naa] = self

    def _apply_settings(self, settings: LuSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.naa = settings.naa
        self.serial = settings.serial
        self.read_only = settings.read_only
        self.rpm = settings.rpm
        self.lbppbe = settings.lbppbe
        self.xen = settings.xen
        self.insecure_tpc = settings.insecure_tpc
        self.avail_threshold = settings.avail_threshold

    @property
    def modes_key(self) -> str:
        """The StateWriter key of the saved mode pages."""
        return f"modepages:{self.naa.hex()}"

    # --- configuration -----------------------------------------------------------------

    def update(self, settings: LuSettings) -> None:
        """Apply changed settings, with INQUIRY DATA HAS CHANGED when the identity changed.
        The block size is the LU's for life: a new one needs a new LU."""
        if settings.block_size != self.block_size:
            raise ValueError("the block size of an open logical unit cannot change")
        old_ident = (self.naa, self.serial, self.rpm, self.xen)
        if settings.naa != self.naa:
            if self.registry.lus.get(self.naa) is self:
                del self.registry.lus[self.naa]
            self.registry.lus[settings.naa] = self
        if settings.avail_threshold != self.avail_threshold:
            self.threshold = SoftThreshold()  # sample at the next write against the new value
        self._apply_settings(settings)
        if (self.naa, self.serial, self.rpm, self.xen) != old_ident:
            self.add_ua_all(S.INQUIRY_DATA_HAS_CHANGED)

    def resize(self, size: int = 0, told: ITKey | None = None) -> None:
        """Resize the backstore to ``size`` bytes (0: adopt the size it reports now, e.g. a
        device or image grown underneath), with CAPACITY DATA HAS CHANGED when it changed, for
        every I_T nexus but ``told`` (the one reading the new capacity now)."""
        if size != self.backstore.size:
            self.backstore.resize(size)
        blocks = self.backstore.size // self.block_size
        if blocks != self.num_blocks:
            self.num_blocks = blocks
            self.add_ua_all(S.CAPACITY_DATA_HAS_CHANGED, except_key=told)

    def refresh_size(self, asking: ScsiTask | None = None) -> bool:
        """Adopt a size the storage changed underneath (a block device grown or shrunk
        outside us); True when it changed.  Storage whose size is configured is left alone.
        ``asking`` is a READ CAPACITY about to report the new size: its nexus gets no UA."""
        if not self.backstore.size_from_storage or self.closed:
            return False
        before = self.num_blocks
        try:
            self.resize(0, self.it_key(asking.nexus) if asking is not None else None)
        except OSError as exc:
            _io_log.log(log, logging.WARNING, (self.name, "size"), "LU %s: cannot read the size of %s: %s",
                        self.name, self.backstore.name, exc)
            return False
        if self.num_blocks != before:
            log.info("LU %s: %s is now %d bytes (was %d): CAPACITY DATA HAS CHANGED", self.name,
                     self.backstore.name, self.num_blocks * self.block_size, before * self.block_size)
            return True
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.registry.lus.get(self.naa) is self:
            del self.registry.lus[self.naa]
        for task in list(self.tasks.values()):
            task.aborted = True
        if self.sanitize_busy:
            return  # the sanitize step in a worker thread still uses the backstore: it closes it
        self.close_backstore()

    def close_backstore(self) -> None:
        self.backstore.close()  # queued writes land before its flush and release

    def persist(self, key: str, data: bytes | None, task: ScsiTask | None,
                then: Callable[[], None] | None = None, undo: Callable[[], None] | None = None) -> None:
        """Save LU state durably; ``then`` (default: complete ``task`` GOOD) runs once it is
        on stable storage; a failed commit runs ``undo`` and fails ``task``."""

        def committed(exc: BaseException | None) -> None:
            if exc is not None:
                if undo is not None:
                    undo()
                if task is not None:
                    self.fail(task, exc)
                return
            if then is not None:
                then()
            elif task is not None:
                self.done(task)

        if self.state is None:
            committed(None)
        else:
            self.state.save(key, data, committed)

    # --- nexus bookkeeping and unit attentions --------------------------------------------

    def attach_nexus(self, key: ITKey, ua: tuple[int, int] | None = S.POWER_ON_RESET) -> None:
        n = self.nexuses.get(key, 0)
        self.nexuses[key] = n + 1
        if n == 0 and ua is not None and not self.ua.get(key):
            self.ua[key] = [ua]

    def detach_nexus(self, key: ITKey) -> None:
        n = self.nexuses.get(key, 0) - 1
        if n <= 0:
            self.nexuses.pop(key, None)
        else:
            self.nexuses[key] = n

    def add_ua(self, key: ITKey, code: tuple[int, int]) -> None:
        lst = self.ua.setdefault(key, [])
        if code not in lst:
            lst.append(code)

    def add_ua_all(self, code: tuple[int, int], except_key: ITKey | None = None) -> None:
        for key in set(self.nexuses) | set(self.ua):
            if key != except_key:
                self.add_ua(key, code)

    def pop_ua(self, key: ITKey) -> tuple[int, int] | None:
        lst = self.ua.get(key)
        if not lst:
            return None
        code = lst.pop(0)
        if not lst:
            del self.ua[key]
        return code

    # --- completion helpers ---------------------------------------------------------------

    def sense_of(self, exc: S.CheckCondition) -> bytes:
        return exc.encode(self.modes.d_sense)

    def done(self, task: ScsiTask, status: int = S.GOOD) -> None:
        task.status = status
        self._finish(task)

    def fail(self, task: ScsiTask, exc: BaseException) -> None:
        if isinstance(exc, S.CheckCondition):
            task.status = S.CHECK_CONDITION
            task.sense = self.sense_of(exc)
            task.data_in = []
            task.data_in_len = 0
        elif isinstance(exc, PathUnavailable):
            task.status = S.CHECK_CONDITION
            task.sense = self.sense_of(S.CheckCondition(S.NOT_READY, TARGET_PORT_UNAVAILABLE))
            task.data_in = []
            task.data_in_len = 0
        elif isinstance(exc, S.ReservationConflict):
            task.status = S.RESERVATION_CONFLICT
            task.sense = None
            task.data_in = []
            task.data_in_len = 0
        else:
            task.status = S.CHECK_CONDITION
            task.sense = self.sense_of(self._backstore_failure(task, exc))
            task.data_in = []
            task.data_in_len = 0
        self._finish(task)

    def _backstore_failure(self, task: ScsiTask, exc: BaseException) -> S.CheckCondition:
        """The sense for an error that is not a SCSI condition, logged at most once per
        interval per LU and kind."""
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE and task.cdb[0] == _PERSISTENT_RESERVE_OUT:
            # The state store cannot record the change (SPC-4 6.16: insufficient resources).
            _io_log.log(log, logging.WARNING, (self.name, "pr-space"),
                        "LU %s: persistent reservation state cannot be saved (%s)", self.name, exc.strerror)
            return S.CheckCondition(S.ILLEGAL_REQUEST, S.INSUFFICIENT_REGISTRATION_RESOURCES)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            _io_log.log(log, logging.WARNING, (self.name, "space"),
                        "LU %s: the storage under it is full (%s): writes fail with SPACE ALLOCATION FAILED",
                        self.name, exc.strerror)
            if self.check_threshold():
                # This crossing is new: the initiator hears of the threshold first (the UA
                # ends this command unexecuted; its retry gets the allocation failure).
                lst = self.ua.get(self.it_key(task.nexus))
                if lst and S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED in lst:
                    lst.remove(S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
                    return S.unit_attention(S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
            return S.CheckCondition(S.DATA_PROTECT, S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        _io_log.log(log, logging.ERROR, (self.name, type(exc)), "LU %s: command %02x failed: %r",
                    self.name, task.cdb[0], exc)
        if isinstance(exc, OSError):
            if task.cdb[0] in _READ_OPCODES:
                return S.CheckCondition(S.MEDIUM_ERROR, S.UNRECOVERED_READ_ERROR)
            return S.CheckCondition(S.MEDIUM_ERROR, S.WRITE_ERROR)
        return S.CheckCondition(S.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE)

    def _finish(self, task: ScsiTask) -> None:
        k = (task.nexus.nexus_id, task.tag)
        if self.tasks.get(k) is task:
            del self.tasks[k]
        if self.ordered_running:
            self.ordered_running.discard(task)
        if _TRACE:
            log.warning("trace op=%02x status=%#x sense=%s aborted=%s", task.cdb[0], task.status,
                        task.sense.hex() if task.sense else None, task.aborted)
        cb = task.on_done
        task.on_done = None
        if cb is not None:
            cb(task)
        if self.blocked and not self.tasks_running_block():
            self._release_blocked()

    # --- task set and queueing ---------------------------------------------------------

    def tasks_running_block(self) -> bool:
        return bool(self.ordered_running)

    def execute(self, task: ScsiTask, cmd: Command) -> None:
        """Run a routed command with SAM-5 task attribute semantics."""
        attr = task.attr
        k = (task.nexus.nexus_id, task.tag)
        if k in self.tasks:
            # Same tag twice from one nexus: overlapped commands (SAM-5 5.9.3).
            old = self.tasks.pop(k)
            old.aborted = True
            raise S.CheckCondition(S.ABORTED_COMMAND, S.OVERLAPPED_COMMANDS_ATTEMPTED)
        if attr == TaskAttr.HEAD_OF_QUEUE:
            self.tasks[k] = task
            self._run(task, cmd)
            return
        if attr == TaskAttr.ORDERED:
            if self.tasks or self.blocked:
                self.tasks[k] = task
                self.blocked.append((task, cmd))
                return
            self.ordered_running.add(task)
            self.tasks[k] = task
            self._run(task, cmd)
            return
        # SIMPLE / UNTAGGED
        if self.blocked or self.ordered_running:
            self.tasks[k] = task
            self.blocked.append((task, cmd))
            return
        self.tasks[k] = task
        self._run(task, cmd)

    def _release_blocked(self) -> None:
        while self.blocked and not self.ordered_running:
            task, cmd = self.blocked[0]
            if task.attr == TaskAttr.ORDERED:
                running = len(self.tasks) - len(self.blocked)
                if running > 0:
                    return  # an ORDERED task waits for every older task
                self.blocked.popleft()
                self.ordered_running.add(task)
            else:
                self.blocked.popleft()
            if task.aborted:  # e.g. the old task of an overlapped-commands pair
                self.ordered_running.discard(task)
                self.tasks.pop((task.nexus.nexus_id, task.tag), None)
                cb, task.on_done = task.on_done, None
                if cb is not None:
                    cb(task)
                continue
            self._run(task, cmd)

    def _run(self, task: ScsiTask, cmd: Command) -> None:
        try:
            cmd.handler(self, task)
        except (S.CheckCondition, S.ReservationConflict) as e:
            self.fail(task, e)
        except (IndexError, ValueError) as e:  # truncated CDB / malformed parameter data
            log.debug("malformed %s: %r", cmd.name, e)
            self.fail(task, S.invalid_cdb(0))
        except OSError as e:  # the backstore failed inline (a page-cache write on a full disk)
            self.fail(task, e)
        except Exception as e:  # noqa: BLE001 - never let a command take the daemon down
            log.exception("LU %s: %s crashed", self.name, cmd.name)
            self.fail(task, e)

    def precheck(self, task: ScsiTask, cmd: Command) -> None:
        """UA, reservation and readiness checks that precede a command's own (SAM-5 5.14)."""
        key = self.it_key(task.nexus)
        if not cmd.flags & F.UA_EXEMPT and self.ua.get(key):
            code = self.pop_ua(key)
            assert code is not None
            raise S.unit_attention(code)
        # A gateway taking a LU over, loading its shared state, or fenced: only inquiry-like
        # commands (INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE...) pass.
        if self.alua.states and not cmd.flags & F.SANITIZE_OK:
            refused = self.alua.refusal(task.nexus.portal_group_tag)
            if refused is not None:
                raise S.CheckCondition(S.NOT_READY, refused)
        # RESERVE(6/10) reservation held by another nexus
        if self.legacy_holder is not None and self.legacy_holder != key and not cmd.flags & F.RESV_ALLOWED:
            raise S.ReservationConflict()
        if self.pr.reservation is not None and self.pr.conflicts(key, cmd.flags):
            raise S.ReservationConflict()
        if self.sanitizing and not cmd.flags & F.SANITIZE_OK:
            raise self.sanitize_in_progress()
        if self.sanitize_failed and cmd.flags & F.MEDIUM:
            raise S.CheckCondition(S.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED)
        if self.stopped and cmd.flags & F.MEDIUM:
            raise S.CheckCondition(S.NOT_READY, S.LUN_NOT_READY_INIT_REQUIRED)

    def sanitize_in_progress(self) -> S.CheckCondition:
        """NOT READY, SANITIZE IN PROGRESS with the progress indication (SPC-4 4.5.2.4.4:
        SKSV=1 and the fraction done in 65536ths) that TEST UNIT READY and REQUEST SENSE
        pollers read."""
        progress = min(0xFFFF, int(self.sanitize_progress * 65536))
        return S.CheckCondition(S.NOT_READY, S.LUN_NOT_READY_SANITIZE_IN_PROGRESS,
                                sks=bytes((0x80, progress >> 8, progress & 0xFF)))

    # --- task management -------------------------------------------------------------

    def abort_tasks(self, pred: Callable[[ScsiTask], bool]) -> int:
        """Abort matching tasks: queued ones complete now, running ones when their I/O ends."""
        n = 0
        for k, task in list(self.tasks.items()):
            if pred(task):
                task.aborted = True
                n += 1
                if any(t is task for t, _ in self.blocked):
                    self.blocked = deque((t, c) for t, c in self.blocked if t is not task)
                    del self.tasks[k]
                    cb = task.on_done
                    task.on_done = None
                    if cb is not None:
                        cb(task)
        if self.blocked:
            self._release_blocked()
        return n

    def find_task(self, nexus: Nexus, tag: int) -> ScsiTask | None:
        return self.tasks.get((nexus.nexus_id, tag))

    def reset(self, ua: tuple[int, int]) -> None:
        """LOGICAL UNIT RESET / hard reset side effects (SAM-5 6.3.3)."""
        self.abort_tasks(lambda t: True)
        self.legacy_holder = None
        self.modes.reset_to_saved()
        self.stopped = False
        self.add_ua_all(ua)

    def nexus_lost(self, key: ITKey, nexus_id: int) -> None:
        self.abort_tasks(lambda t: t.nexus.nexus_id == nexus_id)
        if self.legacy_holder == key:
            self.legacy_holder = None

    # --- I/O primitives --------------------------------------------------------------

    def check_range(self, lba: int, nblocks: int) -> None:
        if lba + nblocks > self.num_blocks or lba >= (1 << 64):
            raise S.lba_out_of_range()

    def writable(self, task: ScsiTask) -> None:
        if self.read_only or task.nexus.read_only or self.modes.swp:
            raise S.write_protected()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def in_thread(self, task: ScsiTask, fn: Callable[[], R], then: Callable[[R], None] | None = None) -> None:
        """Run blocking ``fn`` in the executor; complete ``task`` (or call ``then``) after."""

        def _cb(fut: asyncio.Future[R]) -> None:
            self._conclude(task, fut.exception(), None if then is None else lambda: then(fut.result()))

        self.loop.run_in_executor(None, fn).add_done_callback(_cb)

    def _conclude(self, task: ScsiTask, exc: BaseException | None, then: Callable[[], None] | None) -> None:
        """End an operation: fail ``task`` on error, else run ``then`` (default: GOOD)."""
        if exc is not None:
            self.fail(task, exc)
        elif then is None:
            self.done(task)
        else:
            try:
                then()
            except Exception as e:  # noqa: BLE001 - SCSI errors and bugs alike end the task
                self.fail(task, e)

    def _after(self, task: ScsiTask, then: Callable[[], None] | None) -> Callable[[BaseException | None], None]:
        """A backstore completion that concludes ``task``."""
        return lambda exc: self._conclude(task, exc, then)

    def read(self, task: ScsiTask, lba: int, nblocks: int, then: Callable[[bytearray], None] | None = None) -> None:
        """READ data into task.data_in (zero copy), inline on a page-cache hit."""
        nbytes = nblocks << self.block_shift
        want = nbytes if then is not None or task.expected_len >= nbytes else task.expected_len
        buf = bytearray(want)
        off = lba << self.block_shift
        if then is None:
            task.data_in = [buf]
            task.data_in_len = nbytes
        if want == 0 or self.backstore.read_nowait(buf, off):
            if then is None:
                self.done(task)
            else:
                then(buf)
            return
        self.backstore.submit_read(buf, off, self._after(task, None if then is None else lambda: then(buf)))

    def write(
        self,
        task: ScsiTask,
        lba: int,
        data: Sequence[Buffer],
        fua: bool,
        then: Callable[[], None] | None = None,
    ) -> None:
        """WRITE through the page cache; durable before completion with FUA or WCE=0."""
        sync = fua or not self.modes.wce
        off = lba << self.block_shift
        if self.excl_active or self.excl_waiters:
            # An exclusive operation (COMPARE AND WRITE...) runs or waits: queue behind it.
            self.excl_waiters.append((False, lambda: self._start_write(task, off, data, sync, then)))
            return
        self._start_write(task, off, data, sync, then)

    def _start_write(
        self, task: ScsiTask, off: int, data: Sequence[Buffer], sync: bool, then: Callable[[], None] | None
    ) -> None:
        if not sync and self.backstore.write_nowait(data, off):
            if then is None:
                self.done(task)
            else:
                then()
            return
        self.writes_inflight += 1
        after = self._after(task, then)

        def _written(exc: BaseException | None) -> None:
            self.writes_inflight -= 1
            try:
                after(exc)
            finally:
                if self.writes_inflight == 0 and self.excl_waiters and not self.excl_active:
                    self._drain_excl()

        self.backstore.submit_write(data, off, sync, _written)

    def exclusive(self, task: ScsiTask, fn: Callable[[], R], then: Callable[[R], None] | None = None) -> None:
        """Run blocking ``fn`` with no other write in flight (COMPARE AND WRITE, ORWRITE...)."""

        def start() -> None:
            self.excl_active = True

            def _cb(fut: asyncio.Future[R]) -> None:
                self.excl_active = False
                try:
                    self._conclude(task, fut.exception(), None if then is None else lambda: then(fut.result()))
                finally:
                    if self.excl_waiters and not self.excl_active:
                        self._drain_excl()

            self.loop.run_in_executor(None, fn).add_done_callback(_cb)

        if self.excl_active or self.writes_inflight or self.excl_waiters:
            self.excl_waiters.append((True, start))
            return
        start()

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the loop once every write accepted so far has completed."""
        if self.excl_active or self.writes_inflight or self.excl_waiters:
            self.excl_waiters.append((True, fn))
            return
        fn()

    def _drain_excl(self) -> None:
        while self.excl_waiters and not self.excl_active:
            is_excl, fn = self.excl_waiters[0]
            if is_excl and self.writes_inflight:
                return
            self.excl_waiters.popleft()
            fn()

    def flush(self, task: ScsiTask) -> None:
        self.backstore.submit_flush(self._after(task, None))

    # --- thin provisioning threshold ------------------------------------------------------

    def wrote(self, nbytes: int) -> None:
        """Account a WRITE of ``nbytes`` against the soft threshold (scsi/thin.py): most
        writes cost a subtraction and a clock read, not a system call."""
        if self.threshold.due(nbytes):
            self.check_threshold(nbytes)

    def check_threshold(self, pending: int = 0) -> bool:
        """Sample the allocation now; on a new crossing of avail_threshold, THIN
        PROVISIONING SOFT THRESHOLD REACHED for every I_T nexus (True).  ``pending``: bytes
        of a write about to land, counted against the next sample's budget."""
        if not self.avail_threshold or not self.backstore.thin:
            return False
        try:
            used = self.backstore.allocated_bytes()
            free = self.backstore.free_bytes()
        except OSError:
            return False
        if used is None:  # a block device: nothing to measure the threshold against
            return False
        if self.threshold.sample(self.backstore.size, used, free, self.avail_threshold, pending):
            self.add_ua_all(S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
            return True
        return False
