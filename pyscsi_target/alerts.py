"""Space alerts: the configuration's thresholds, watched off the I/O path.

Two FreeNAS settings promise a warning when space runs short.  Both name "the percentage
of free space that should remain": the alert fires when the free share falls to N % or
below, not when N % is in use.

- ``iscsi_pool_avail_threshold`` (global): the pool here is the filesystem holding an
  extent root (each filesystem once); its free share is what an unprivileged writer may
  still use, as df counts it;
- an extent's ``avail_threshold``: what a thin File extent can still allocate (its
  unallocated capacity, capped by its filesystem's free space) against its capacity - the
  same rule (``scsi/thin.py``) as the THIN PROVISIONING SOFT THRESHOLD REACHED unit
  attention the SCSI layer sends initiators.  A Disk extent's allocation is the device's
  own business and a block device reports none, so its threshold is not watched (said
  once in the log).

``SpaceMonitor.check`` measures (statvfs/stat, in a worker thread) and updates an
``AlertBoard``, the one object the API (``/api/v1.0/system/alert/``), the log and metrics
read: an alert is raised once per crossing (logged as a warning), and cleared (logged) when
the free space is back above the threshold, the threshold is removed or its object is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyscsi_target.config.model import ConfigModel
from pyscsi_target.scsi.thin import available, reached

log = logging.getLogger(__name__)

WARNING = "WARNING"  # FreeNAS's alert level for space warnings
DEFAULT_INTERVAL = 30.0  # seconds between periodic checks


@dataclass(frozen=True)
class Alert:
    key: str  # what it is about: "pool:<extent root>" or "extent:<id>"
    level: str
    message: str
    since: float  # when the threshold was crossed (epoch seconds)
    dismissed: bool = False

    @property
    def id(self) -> str:
        """A stable id for this crossing (FreeNAS showed hex ids): a new crossing, a new id."""
        return hashlib.sha256(f"{self.key}@{self.since!r}".encode()).hexdigest()[:32]

    @property
    def kind(self) -> str:
        return self.key.partition(":")[0]


@dataclass
class AlertBoard:
    """The alerts in effect.  ``crossings`` counts raised alerts by kind (for metrics)."""

    _alerts: dict[str, Alert] = field(default_factory=dict)
    crossings: Counter[str] = field(default_factory=Counter)
    clock: Callable[[], float] = time.time

    def raise_(self, key: str, level: str, message: str) -> bool:
        """Raise (or refresh the message of) the alert ``key``; True if newly raised."""
        current = self._alerts.get(key)
        if current is not None:
            if current.message != message:
                self._alerts[key] = replace(current, message=message)
            return False
        alert = Alert(key, level, message, self.clock())
        self._alerts[key] = alert
        self.crossings[alert.kind] += 1
        log.warning("alert: %s", message)
        return True

    def clear(self, key: str, why: str) -> bool:
        alert = self._alerts.pop(key, None)
        if alert is not None:
            log.info("alert cleared (%s): %s", why, alert.message)
        return alert is not None

    def active(self) -> list[Alert]:
        return sorted(self._alerts.values(), key=lambda a: (a.since, a.key))

    def dismiss(self, alert_id: str, dismissed: bool = True) -> bool:
        """Mark an alert (not) dismissed, as FreeNAS's ``system/alert/dismiss`` did; False if
        there is no such alert."""
        for key, alert in self._alerts.items():
            if alert.id == alert_id:
                self._alerts[key] = replace(alert, dismissed=dismissed)
                return True
        return False


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolUsage:
    root: str
    used: int  # bytes, as df counts them
    avail: int  # bytes an unprivileged writer may still use

    @property
    def percent_free(self) -> int:
        total = self.used + self.avail
        return self.avail * 100 // total if total else 0  # rounded down: df's Use% rounds up

    def reached(self, threshold: int) -> bool:
        total = self.used + self.avail
        return total > 0 and self.avail * 100 <= total * threshold


@dataclass(frozen=True)
class ExtentUsage:
    extent_id: int
    name: str
    allocated: int  # bytes the file has allocated
    size: int  # the extent's capacity in bytes
    free: int  # bytes its filesystem may still give

    @property
    def available(self) -> int:
        return available(self.size, self.allocated, self.free)

    def reached(self, threshold: int) -> bool:
        return reached(self.size, self.allocated, self.free, threshold)


@dataclass(frozen=True)
class Plan:
    """What to measure, read from the model on the event loop."""

    pool_threshold: int | None
    roots: tuple[str, ...]
    files: tuple[tuple[int, str, str, int], ...]  # (extent id, name, path, threshold)


def _measure(plan: Plan) -> tuple[list[PoolUsage], list[ExtentUsage]]:
    """statvfs of each filesystem holding a root, stat of each watched file (a worker thread)."""
    pools: list[PoolUsage] = []
    seen: set[int] = set()
    if plan.pool_threshold is not None:
        for root in plan.roots:
            try:
                dev = os.stat(root).st_dev
                fs = os.statvfs(root)
            except OSError as exc:
                log.debug("extent root %s: %s", root, exc)
                continue
            if dev in seen:
                continue
            seen.add(dev)
            pools.append(PoolUsage(root, (fs.f_blocks - fs.f_bfree) * fs.f_frsize, fs.f_bavail * fs.f_frsize))
    files = []
    for extent_id, name, path, _ in plan.files:
        try:
            st = os.stat(path)
            fs = os.statvfs(path)
        except OSError as exc:
            log.debug("extent %s (%s): %s", name, path, exc)
            continue
        files.append(ExtentUsage(extent_id, name, st.st_blocks * 512, st.st_size, fs.f_bavail * fs.f_frsize))
    return pools, files


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class SpaceMonitor:
    """Checks the thresholds of the current model against the disks, now or periodically."""

    def __init__(
        self,
        model: Callable[[], ConfigModel],
        roots: Callable[[], Iterable[Path]],
        board: AlertBoard | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._model = model
        self._roots = roots
        self.board = board or AlertBoard()
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._unwatched: set[int] = set()  # Disk extents whose threshold was said to be unwatchable

    def _plan(self) -> Plan:
        model = self._model()
        files = []
        for e in model.extents.values():
            if e.avail_threshold is None:
                continue
            if e.type == "File":
                files.append((e.id, e.name, e.path, e.avail_threshold))
            elif e.id not in self._unwatched:
                self._unwatched.add(e.id)
                log.info(
                    "extent %s: avail_threshold %d%% is not watched: the device %s reports no allocation",
                    e.name, e.avail_threshold, e.path,
                )
        roots = tuple(str(r) for r in self._roots())
        return Plan(model.global_config.pool_avail_threshold, roots, tuple(files))

    async def check(self) -> list[Alert]:
        """Measure now and bring the board up to date; returns the alerts in effect."""
        async with self._lock:  # the periodic check and an API read may overlap
            plan = self._plan()
            pools, files = await asyncio.to_thread(_measure, plan)
            wanted: set[str] = set()
            threshold = plan.pool_threshold
            for p in pools:
                key = f"pool:{p.root}"
                if threshold is not None and p.reached(threshold):
                    wanted.add(key)
                    self.board.raise_(
                        key,
                        WARNING,
                        f"The filesystem holding extent root {p.root} has {p.percent_free}% free space "
                        f"({_mib(p.avail)} available), at or below the iSCSI pool threshold of {threshold}%.",
                    )
            thresholds = {extent_id: t for extent_id, _, _, t in plan.files}
            for f in files:
                key = f"extent:{f.extent_id}"
                t = thresholds[f.extent_id]
                if f.reached(t):
                    wanted.add(key)
                    self.board.raise_(
                        key,
                        WARNING,
                        f'iSCSI extent "{f.name}" can allocate {_mib(f.available)} more of its {_mib(f.size)}, '
                        f"at or below its free space threshold of {t}%.",
                    )
            for alert in self.board.active():
                if alert.key not in wanted:
                    self.board.clear(alert.key, "free space back above the threshold, or no longer watched")
            return self.board.active()

    # --- the periodic task ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="space-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - one failed check must not end the watching
                log.exception("space check failed")
            await asyncio.sleep(self.interval)
