"""SANITIZE (SBC-3 5.30): OVERWRITE and BLOCK ERASE, run in steps in the executor, and
resumed after a restart.

The operation is recorded in the LU's StateWriter before it touches the medium and the
record is cleared when it completes; while the record exists the operation is unfinished.
Whoever opens a logical unit (the engine) calls :func:`resume_sanitize`, which runs an
unfinished one again: SBC-3 keeps a sanitize going until it completes, whatever resets
happen, and partially overwritten data must not be served as if it had never started.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from functools import partial

from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, data_out_needed, usage
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import ScsiTask

log = logging.getLogger(__name__)

_U16 = struct.Struct(">H")

OVERWRITE = 0x01
BLOCK_ERASE = 0x02
EXIT_FAILURE_MODE = 0x1F

#: One step of a sanitize operation: one executor job, so a long sanitize never holds a
#: worker thread for long and other LUs' I/O queued meanwhile runs between its steps.
SANITIZE_CHUNK = 4 << 20
SANITIZE_ERASE_CHUNK = 256 << 20  # deallocation is cheap per byte: bigger steps


def record_key(lu: LogicalUnit) -> str:
    """The StateWriter key of the LU's unfinished-sanitize record."""
    return f"sanitize:{lu.naa.hex()}"


def sanitize(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    sa = cdb[1] & 0x1F
    plen = _U16.unpack_from(cdb, 7)[0]
    task.xfer_len = plen
    if cdb[1] & 0x40:
        raise S.invalid_cdb(1, 6)
    for i in range(2, 7):  # reserved bytes
        if cdb[i]:
            raise S.invalid_cdb(i)
    if sa == EXIT_FAILURE_MODE:
        if plen:
            raise S.invalid_cdb(7)
        lu.sanitize_failed = False
        lu.persist(record_key(lu), None, task)  # the initiator gave the sanitize up
        return
    if sa not in (OVERWRITE, BLOCK_ERASE):  # crypto erase: no encryption key to destroy
        raise S.invalid_cdb(1, 4)
    lu.writable(task)
    if sa == BLOCK_ERASE:
        if plen:
            raise S.invalid_cdb(7)
        start_sanitize(lu, sa, 0, False, b"", task, bool(cdb[1] & 0x80))
        return
    if plen < 5 or plen > lu.block_size + 4:
        raise S.invalid_cdb(7)  # header plus a 1..block-size pattern
    data = data_out_needed(task, plen)
    invert = bool(data[0] & 0x80)
    count = data[0] & 0x1F
    patlen = _U16.unpack_from(data, 2)[0]
    if count == 0:
        raise S.invalid_param(0, 4)
    if patlen == 0 or patlen > lu.block_size:
        raise S.invalid_param(2)
    if plen != 4 + patlen:
        raise S.param_list_length_error()
    start_sanitize(lu, sa, count, invert, bytes(data[4 : 4 + patlen]), task, bool(cdb[1] & 0x80))


def resume_sanitize(lu: LogicalUnit) -> None:
    """Run again a SANITIZE that a restart (or the LU's close) interrupted, or that failed.
    Overwrite and block erase are idempotent, so the whole operation starts over."""
    rec = lu.state.load(record_key(lu)) if lu.state is not None else None
    if not rec or len(rec) < 3:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # opened outside the event loop: cannot run it, so fail safe
        lu.sanitize_failed = True
        return
    log.warning("LU %s: resuming an interrupted SANITIZE", lu.name)
    start_sanitize(lu, rec[0], rec[1], bool(rec[2]), bytes(rec[3:]), None, True)


def start_sanitize(
    lu: LogicalUnit, sa: int, count: int, invert: bool, pattern: bytes, task: ScsiTask | None, immed: bool
) -> None:
    bs = lu.backstore
    size = lu.num_blocks << lu.block_shift
    if sa == BLOCK_ERASE:
        unit, passes = SANITIZE_ERASE_CHUNK, 1
        plain = inverted = memoryview(b"")
    else:
        block = (pattern * (lu.block_size // len(pattern) + 1))[: lu.block_size]
        chunk_blocks = max(1, SANITIZE_CHUNK >> lu.block_shift)
        plain = memoryview(block * chunk_blocks)
        inverted = memoryview(bytes(b ^ 0xFF for b in block) * chunk_blocks) if invert and count > 1 else plain
        unit, passes = len(plain), count
    per_pass = -(-size // unit)
    # The last step flushes: nothing is acknowledged (GOOD without IMMED, or SANITIZE IN
    # PROGRESS ending) before everything written or deallocated is on stable storage.
    total = passes * per_pass + 1

    def job(i: int) -> Callable[[], None]:
        """Step ``i``, built when it runs (a multi-TiB LU has millions of steps)."""
        if i == total - 1:
            return bs.flush
        p, k = divmod(i, per_pass)
        pos = k * unit
        m = min(unit, size - pos)
        if sa == BLOCK_ERASE:
            return partial(bs.discard, pos, m)
        # INVERT: the pattern is inverted between consecutive passes; the last pass writes
        # it as given (SBC-3 5.30.2).  Each chunk is written through (fdatasync): the pattern
        # must reach the medium, not just the page cache, and dirty memory stays bounded.
        buf = inverted if invert and (count - 1 - p) % 2 else plain
        return partial(bs.write, [buf[:m]], pos, True)

    key = record_key(lu)
    lu.sanitizing = True  # from now on medium access gets NOT READY, SANITIZE IN PROGRESS
    lu.sanitize_progress = 0.0

    def finish(exc: BaseException | None) -> None:
        lu.sanitizing = False
        lu.sanitize_failed = exc is not None  # until EXIT FAILURE MODE (SBC-3 4.11)
        if task is None or immed:
            return
        if exc is not None:
            lu.fail(task, S.CheckCondition(S.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED))
        else:
            lu.done(task)

    def end(exc: BaseException | None) -> None:
        if lu.closed:  # interrupted: the record stays for resume_sanitize
            lu.close_backstore()
            if task is not None and not immed:
                lu.fail(task, S.CheckCondition(S.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED))
            return
        if exc is not None:
            log.error("LU %s: sanitize failed: %r", lu.name, exc)
            finish(exc)
        elif lu.state is None:
            finish(None)
        else:
            lu.state.save(key, None, finish)  # complete once the record is gone

    def step(i: int) -> None:
        if i == total or lu.closed:
            end(None)
            return

        def after(fut: asyncio.Future[None]) -> None:
            lu.sanitize_busy = False
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                end(exc)
                return
            lu.sanitize_progress = (i + 1) / total
            step(i + 1)

        lu.sanitize_busy = True
        lu.loop.run_in_executor(None, job(i)).add_done_callback(after)

    def recorded(exc: BaseException | None) -> None:
        if exc is not None:  # without its record a restart could not resume it: refuse
            lu.sanitizing = False
            if task is not None:
                lu.fail(task, exc)
            return
        if task is not None and immed:
            lu.done(task)  # GOOD now; the sanitize runs on (through resets, as SBC-3 requires)
        # Writes accepted before the SANITIZE land first; later ones are refused by precheck.
        lu.after_writes(lambda: step(0))

    # The record is durable before the medium is touched, so a restart resumes it.
    record = bytes((sa, count, int(invert))) + pattern
    if lu.state is None:
        recorded(None)
    else:
        lu.state.save(key, record, recorded)


COMMANDS = [
    Command(0x48, sa, f"SANITIZE / {name}", sanitize,
            usage(0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07), F.MEDIUM | F.WRITE | F.PR_WRITE,
            timeout=3600)
    for sa, name in ((OVERWRITE, "OVERWRITE"), (BLOCK_ERASE, "BLOCK ERASE"), (EXIT_FAILURE_MODE, "EXIT FAILURE MODE"))
]
