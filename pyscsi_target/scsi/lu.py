"""A logical unit: one extent, shared by every target (ScsiDevice) that maps it.

It owns the SCSI state that SAM-5/SPC-4 put in the logical unit: the task set,
unit attentions per I_T nexus, mode pages, RESERVE/RELEASE and persistent
reservations, the third-party-copy results, and the I/O machinery on the backstore.

Execution model: everything runs on the event loop thread.  A command completes
synchronously inside submit when it can (page-cache hits, metadata commands), else
its blocking part runs in the loop's default executor and completes from the
future's done-callback (no asyncio Task per command).  Writes that leave the loop go to
the LU's own writer thread instead (scsi/writer.py: batches, group commit).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyscsi_target.backstore.base import Backstore
from pyscsi_target.backstore.block import BlockBackstore
from pyscsi_target.backstore.file import FileBackstore
from pyscsi_target.config import model
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import F
from pyscsi_target.scsi.modepages import ModePages
from pyscsi_target.scsi.pr import PersistentReservations, PrStore
from pyscsi_target.scsi.task import MAX_TRANSFER_BYTES, Nexus, ScsiTask, TaskAttr
from pyscsi_target.scsi.writer import WriteQueue
from pyscsi_target.values import parse_size

if TYPE_CHECKING:
    from pyscsi_target.scsi.command import Command
    from pyscsi_target.scsi.device import ScsiDevice

log = logging.getLogger(__name__)
# PYSCSI_TRACE_SCSI=1 logs every completed command's status and sense (debugging aid).
_TRACE = bool(os.environ.get("PYSCSI_TRACE_SCSI"))

ITKey = tuple[str, int]  # (SCSI initiator port name, relative target port id)

#: Every open LU by its 8-byte NAA designator: the EXTENDED COPY copy manager finds the
#: source and destination of a segment here (copies work between LUs of this daemon).
LU_REGISTRY: dict[bytes, LogicalUnit] = {}

RPM = {"Unknown": 0, "SSD": 1, "5400": 5400, "7200": 7200, "10000": 10000, "15000": 15000}

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


_KEYS: dict[int, ITKey] = {}


def it_key(nexus: Nexus) -> ITKey:
    """The I_T nexus identity that UAs and reservations hang on (cached per nexus)."""
    key = _KEYS.get(nexus.nexus_id)
    if key is None:
        key = _KEYS[nexus.nexus_id] = (nexus.initiator_port.lower(), nexus.portal_group_tag)
    return key


def forget_nexus(nexus: Nexus) -> None:
    _KEYS.pop(nexus.nexus_id, None)


def naa_bytes(extent: model.Extent) -> bytes:
    """The LU's 8-byte NAA designator: the extent's, else a stable locally assigned one."""
    text = extent.naa.lower().removeprefix("0x")
    if re.fullmatch(r"[0-9a-f]{16}", text):
        return bytes.fromhex(text)
    digest = hashlib.sha256(f"{extent.id}:{extent.name}:{extent.path}".encode()).digest()
    # NAA 3 (locally assigned): top nibble 3, 60 bits of our own.
    return bytes(((0x30 | (digest[0] & 0x0F)),)) + digest[1:8]


def open_backstore(extent: model.Extent) -> Backstore:
    if extent.type == "Disk":
        return BlockBackstore(extent.path, read_only=extent.ro)
    return FileBackstore(extent.path, parse_size(extent.filesize or "0"), read_only=extent.ro)


def open_logical_unit(extent: model.Extent, pr_store: PrStore | None = None) -> LogicalUnit:
    return LogicalUnit(extent, open_backstore(extent), pr_store)


class LogicalUnit:
    """A direct-access block device (peripheral device type 0) on one backstore."""

    def __init__(self, extent: model.Extent, backstore: Backstore, pr_store: PrStore | None = None) -> None:
        self.extent = extent
        self.backstore = backstore
        self.pr_store = pr_store
        self.naa = naa_bytes(extent)
        self.block_size = extent.blocksize
        self.block_shift = extent.blocksize.bit_length() - 1
        self.num_blocks = backstore.size // self.block_size
        self._apply_attributes(extent)
        saved_modes = pr_store.load(f"modepages:{self.naa.hex()}") if pr_store else None
        self.modes = ModePages(saved_modes)
        self.pr = PersistentReservations(self, pr_store)
        self.legacy_holder: ITKey | None = None  # RESERVE(6/10) holder
        self.ua: dict[ITKey, list[tuple[int, int]]] = {}
        self.nexuses: dict[ITKey, int] = {}  # I_T nexuses known to this LU (key -> refcount)
        self.devices: set[ScsiDevice] = set()  # targets mapping this LU
        # task set
        self.tasks: dict[tuple[int, int], ScsiTask] = {}
        self.blocked: deque[tuple[ScsiTask, Command]] = deque()
        self.ordered_running: set[ScsiTask] = set()  # ORDERED tasks currently running
        # write serialisation for COMPARE AND WRITE & co.
        self.writes_inflight = 0
        self.writer: WriteQueue | None = None  # started by the first write that leaves the loop
        self.excl_active = False
        self.excl_waiters: deque[tuple[bool, Callable[[], None]]] = deque()
        # device state
        self.stopped = False
        self.sanitizing = False
        self.sanitize_failed = False
        self.sanitize_progress = 0.0  # fraction done, for the progress indication
        self.sanitize_busy = False  # a sanitize step is in a worker thread (close waits for it)
        self.copy_results: dict[tuple[ITKey, int], Any] = {}
        self.threshold_armed = True
        self.closed = False
        LU_REGISTRY[self.naa] = self
        if pr_store is not None:
            from pyscsi_target.scsi.sbc import resume_sanitize

            resume_sanitize(self)  # a SANITIZE interrupted by a restart runs again

    def _apply_attributes(self, extent: model.Extent) -> None:
        """Extent attributes that shape the device model.

        xen: FreeNAS's "Xen initiator compat mode".  FreeNAS pads the serial in the T10
        vendor ID designator (VPD 83h) to 31 characters with spaces; Xen's initiator
        mishandles those trailing spaces, so with xen set the designator carries the bare
        serial.  Nothing else changes.
        """
        self.read_only = extent.ro
        self.rpm = RPM.get(str(extent.rpm), 0)
        self.serial = (extent.serial or self.naa.hex())[:32]
        # pblocksize=True means "disable physical block size reporting" (FreeNAS): then the
        # exponent is 0; else 4 KiB physical blocks are reported for 512-byte LUs.
        self.lbppbe = 0 if extent.pblocksize else max(0, 12 - self.block_shift)
        self.xen = extent.xen
        self.insecure_tpc = extent.insecure_tpc
        self.avail_threshold = extent.avail_threshold

    # --- configuration -----------------------------------------------------------------

    def update(self, extent: model.Extent) -> None:
        """Apply a changed extent (resize, ro, rpm...) with the unit attentions it implies."""
        old_blocks = self.num_blocks
        old_ident = (self.naa, self.serial, self.rpm, self.xen)
        self.extent = extent
        new_naa = naa_bytes(extent)
        if new_naa != self.naa:
            if LU_REGISTRY.get(self.naa) is self:
                del LU_REGISTRY[self.naa]
            self.naa = new_naa
            LU_REGISTRY[new_naa] = self
        self._apply_attributes(extent)
        if (self.naa, self.serial, self.rpm, self.xen) != old_ident:
            self.add_ua_all(S.INQUIRY_DATA_HAS_CHANGED)
        if extent.type != "Disk":
            # filesize "0" means "the file's own size": pick up a file grown underneath us
            size = parse_size(extent.filesize or "0") or os.fstat(self.backstore.fd).st_size
            if size > 0 and size != self.backstore.size:
                self.backstore.resize(size)
        else:
            self.backstore.resize(0)
        self.num_blocks = self.backstore.size // self.block_size
        if self.num_blocks != old_blocks:
            self.add_ua_all(S.CAPACITY_DATA_HAS_CHANGED)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if LU_REGISTRY.get(self.naa) is self:
            del LU_REGISTRY[self.naa]
        for task in list(self.tasks.values()):
            task.aborted = True
        if self.sanitize_busy:
            return  # the sanitize step in a worker thread still uses the fd: it closes it
        self.close_backstore()

    def close_backstore(self) -> None:
        if self.writer is not None:
            self.writer.stop()  # queued writes land before the flush and close below
            self.writer = None
        if self.backstore.fd < 0:
            return
        try:
            self.backstore.flush()
        except OSError:
            log.exception("flush on close of %s", self.backstore.path)
        self.backstore.close()

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
        elif isinstance(exc, S.ReservationConflict):
            task.status = S.RESERVATION_CONFLICT
            task.sense = None
            task.data_in = []
            task.data_in_len = 0
        else:
            log.error("LU %s: command %02x failed: %r", self.extent.name, task.cdb[0], exc)
            code = S.WRITE_ERROR if isinstance(exc, OSError) else S.INTERNAL_TARGET_FAILURE
            key = S.MEDIUM_ERROR if isinstance(exc, OSError) else S.HARDWARE_ERROR
            task.status = S.CHECK_CONDITION
            task.sense = self.sense_of(S.CheckCondition(key, code))
            task.data_in = []
            task.data_in_len = 0
        self._finish(task)

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
        except Exception as e:  # noqa: BLE001 - never let a command take the daemon down
            log.exception("LU %s: %s crashed", self.extent.name, cmd.name)
            self.fail(task, e)

    def precheck(self, task: ScsiTask, cmd: Command) -> None:
        """UA, reservation and readiness checks that precede a command's own (SAM-5 5.14)."""
        key = it_key(task.nexus)
        if not cmd.flags & F.UA_EXEMPT and self.ua.get(key):
            code = self.pop_ua(key)
            assert code is not None
            raise S.unit_attention(code)
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

    def in_thread(
        self, task: ScsiTask, fn: Callable[..., Any], *args: Any, then: Callable[[Any], None] | None = None
    ) -> None:
        """Run blocking ``fn`` in the executor; complete ``task`` (or call ``then``) after."""

        def _cb(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception()
            if exc is not None:
                self.fail(task, exc)
                return
            if then is None:
                self.done(task)
                return
            try:
                then(fut.result())
            except (S.CheckCondition, S.ReservationConflict) as e:
                self.fail(task, e)
            except Exception as e:  # noqa: BLE001
                log.exception("completion of %02x", task.cdb[0])
                self.fail(task, e)

        self.loop.run_in_executor(None, fn, *args).add_done_callback(_cb)

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
        if then is None:
            self.in_thread(task, self.backstore.read_into, buf, off)
        else:
            self.in_thread(task, self.backstore.read_into, buf, off, then=lambda _r: then(buf))

    def write(
        self,
        task: ScsiTask,
        lba: int,
        data: Sequence[bytes | bytearray | memoryview],
        fua: bool,
        then: Callable[[Any], None] | None = None,
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
        self,
        task: ScsiTask,
        off: int,
        data: Sequence[bytes | bytearray | memoryview],
        sync: bool,
        then: Callable[[Any], None] | None,
    ) -> None:
        if not sync and self.backstore.write_nowait(data, off):
            if then is None:
                self.done(task)
            else:
                then(None)
            return
        self.writes_inflight += 1

        def _written(exc: BaseException | None) -> None:
            self.writes_inflight -= 1
            try:
                if exc is not None:
                    self.fail(task, exc)
                elif then is None:
                    self.done(task)
                else:
                    try:
                        then(None)
                    except Exception as e:  # noqa: BLE001 - SCSI errors and bugs alike end the task
                        self.fail(task, e)
            finally:
                if self.writes_inflight == 0 and self.excl_waiters and not self.excl_active:
                    self._drain_excl()

        if self.writer is None:
            self.writer = WriteQueue(self.backstore, self.loop)
        self.writer.submit(off, data, sync, _written)

    def exclusive(self, task: ScsiTask, fn: Callable[[], Any], then: Callable[[Any], None] | None = None) -> None:
        """Run blocking ``fn`` with no other write in flight (COMPARE AND WRITE, ORWRITE...)."""

        def start() -> None:
            self.excl_active = True

            def _cb(fut: asyncio.Future[Any]) -> None:
                self.excl_active = False
                exc = fut.exception()
                try:
                    if exc is not None:
                        self.fail(task, exc)
                    elif then is None:
                        self.done(task)
                    else:
                        try:
                            then(fut.result())
                        except Exception as e:  # noqa: BLE001 - SCSI errors and bugs alike end the task
                            self.fail(task, e)
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
        self.in_thread(task, self.backstore.flush)

    # --- thin provisioning threshold ------------------------------------------------------

    def check_threshold(self) -> None:
        """THIN PROVISIONING SOFT THRESHOLD REACHED once per crossing of avail_threshold.

        avail_threshold is a percentage of the LU's capacity: when the backing file has
        allocated that share of it, every I_T nexus gets the unit attention; it re-arms when
        UNMAP brings the allocation back under the threshold.
        """
        if not self.avail_threshold or not self.backstore.thin:
            return
        try:
            used = self.backstore.allocated_bytes()
        except OSError:
            return
        if used is None:  # a block device: nothing to measure the threshold against
            return
        limit = self.backstore.size * self.avail_threshold // 100
        if used >= limit and self.threshold_armed:
            self.threshold_armed = False
            self.add_ua_all(S.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)
        elif used < limit:
            self.threshold_armed = True

    def save_modes(self) -> None:
        if self.pr_store is not None:
            self.pr_store.save(f"modepages:{self.naa.hex()}", self.modes.serialize_saved())


