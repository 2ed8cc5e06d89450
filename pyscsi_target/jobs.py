"""Long operations as jobs: listed, polled for percent done, cancelled.

A job's blocking work runs in the registry's own worker threads (never on the event loop,
never in the default executor the SCSI layer uses), and the job belongs to the registry,
not to the request that started it: a client that disconnects leaves it running, and any
client can follow it by id.  The registry keeps the last ``HISTORY`` finished jobs.

Progress made elsewhere is shown through a ``JobSource``: an object whose ``jobs()`` returns
snapshots (e.g. ``SanitizeJobs`` over the logical units the engine runs a SANITIZE on).
Those ids are prefixed by their kind so they never collide with the registry's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
HISTORY = 100
# Fills are disk-bound, but a second job (an import, say) must not wait for a long fill to end.
WORKERS = 4


class JobCancelled(Exception):
    """Raised in a job's worker thread at its next progress step after a cancel request."""


class JobError(Exception):
    """A job could not be found or changed (``status`` is the HTTP status to answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    kind: str  # "extent-create", "extent-resize", "extent-import", "sanitize", ...
    description: str
    total: int  # units of work (bytes for the extent jobs); 0 when unknown
    done: int = 0
    state: str = RUNNING
    message: str = ""  # the step in progress, or why the job failed
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, object] = field(default_factory=dict)
    cancellable: bool = True
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def percent(self) -> float:
        if self.state == SUCCEEDED:
            return 100.0
        if self.total <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.done / self.total), 1)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    # --- called from the worker thread ---------------------------------------------------

    def advance(self, n: int) -> None:
        """``n`` more units done; raises JobCancelled once a cancel was requested."""
        self.done += n  # one writer (the worker): a plain int update is enough
        self.check()

    def check(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()


class JobSource(Protocol):
    """Progress kept elsewhere, shown as jobs (snapshots built on each call)."""

    def jobs(self) -> Iterable[Job]: ...


class SanitizingUnit(Protocol):
    """What ``SanitizeJobs`` reads of a logical unit (``scsi.lu.LogicalUnit`` has it)."""

    sanitizing: bool
    sanitize_failed: bool
    sanitize_progress: float  # fraction done


class SanitizeJobs:
    """SANITIZE progress as jobs.  ``units()`` yields (extent name, logical unit) for every
    LU the engine serves; the engine owns the LUs, so the daemon passes a lookup."""

    def __init__(self, units: Callable[[], Iterable[tuple[str, SanitizingUnit]]]) -> None:
        self._units = units

    def jobs(self) -> Iterable[Job]:
        for name, lu in self._units():
            if not (lu.sanitizing or lu.sanitize_failed):
                continue
            job = Job(
                id=f"sanitize-{name}",
                kind="sanitize",
                description=f"SANITIZE of extent {name}",
                total=10000,
                done=int(lu.sanitize_progress * 10000),
                cancellable=False,  # SBC-3: a SANITIZE runs to its end (or fails)
            )
            if lu.sanitize_failed and not lu.sanitizing:
                job.state, job.message = FAILED, "SANITIZE failed: the medium reports an error until the next one"
            yield job


Work = Callable[[Job], Awaitable[dict[str, object]]]


class JobRegistry:
    """Runs and remembers jobs.  Create it on the event loop; ``close()`` at shutdown."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)
        self._sources: list[JobSource] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyscsi-job")
        self.claims: dict[str, str] = {}  # what running jobs reserved ("path:/x", "name:y") -> job id

    def add_source(self, source: JobSource) -> None:
        self._sources.append(source)

    # --- running ---------------------------------------------------------------------------

    def start(self, kind: str, description: str, total: int, work: Work, *, claims: Iterable[str] = ()) -> Job:
        """Start ``work(job)`` as a new job; it returns the job's result.  ``claims`` are keys
        no other running job may hold (a path being created, say): JobError 409 if one does."""
        claims = list(claims)
        for key in claims:
            if key in self.claims:
                raise JobError(409, f"job {self.claims[key]} is already working on {key.partition(':')[2]}")
        job = Job(id=str(next(self._ids)), kind=kind, description=description, total=total)
        for key in claims:
            self.claims[key] = job.id
        self._jobs[job.id] = job
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, work, claims))
        log.info("job %s started: %s", job.id, description)
        return job

    async def _run(self, job: Job, work: Work, claims: list[str]) -> None:
        try:
            job.result = await work(job)
            job.state, job.message = SUCCEEDED, ""
            log.info("job %s succeeded: %s", job.id, job.description)
        except (JobCancelled, asyncio.CancelledError):
            job.state, job.message = CANCELLED, "cancelled"
            log.info("job %s cancelled: %s", job.id, job.description)
        except Exception as exc:  # noqa: BLE001 - the job reports it; the daemon goes on
            job.state, job.message = FAILED, str(exc) or exc.__class__.__name__
            log.warning("job %s failed: %s: %s", job.id, job.description, job.message)
        finally:
            job.finished = time.time()
            self._tasks.pop(job.id, None)
            for key in claims:
                self.claims.pop(key, None)
            self._trim()

    async def in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking ``fn`` in a job worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state != RUNNING]
        for old in done[: max(0, len(done) - HISTORY)]:
            del self._jobs[old.id]

    # --- queries and control ---------------------------------------------------------------

    def list(self) -> list[Job]:
        out = list(self._jobs.values())
        for source in self._sources:
            try:
                out.extend(source.jobs())
            except Exception:  # noqa: BLE001 - one broken source must not hide the other jobs
                log.exception("job source %r failed", source)
        return out

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id) or next((j for j in self.list() if j.id == job_id), None)
        if job is None:
            raise JobError(404, f"Job {job_id} does not exist.")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop (its worker stops at the next step and cleans up)."""
        job = self.get(job_id)
        if not job.cancellable:
            raise JobError(409, f"Job {job_id} ({job.kind}) cannot be cancelled.")
        if job.state == RUNNING:
            job._cancel.set()
            job.message = "cancelling"
        return job

    def forget(self, job_id: str) -> None:
        """Drop a finished job from the history."""
        job = self.get(job_id)
        if job.state == RUNNING:
            raise JobError(409, f"Job {job_id} is still running: cancel it first.")
        self._jobs.pop(job_id, None)

    async def wait(self, job_id: str) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return self.get(job_id)

    async def close(self) -> None:
        """Cancel every running job and wait for the workers to clean up."""
        for job in list(self._jobs.values()):
            if job.state == RUNNING:
                job._cancel.set()
        tasks = list(self._tasks.values())
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        self._executor.shutdown(wait=False, cancel_futures=True)
