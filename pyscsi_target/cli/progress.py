"""Following a job's progress: a progress bar on a terminal, a line per 10% otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .client import NATIVE, ApiClient, CliError
from .output import console

POLL = 0.2


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields ``update(done)``; draws on stderr (a bar on a terminal, else 10% steps)."""
    if sys.stderr.isatty():
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console(stderr=True),
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total or None)
            yield lambda done: bar.update(task, completed=done)
        return
    last = -1

    def update(done: int) -> None:
        nonlocal last
        step = int(100 * done / total) // 10 * 10 if total else 0
        if step > last:
            last = step
            print(f"{description}: {step}%", file=sys.stderr, flush=True)

    yield update


def wait(client: ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """Follow ``job`` to its end; the finished job, or CliError if it did not succeed."""
    job_id = job["id"]
    try:
        with progress_bar(job["description"], job["total"]) as update:
            while job["state"] == "running":
                update(job["done"])
                time.sleep(POLL)
                job = client.request("GET", f"{NATIVE}/jobs/{job_id}/")
            if job["state"] == "succeeded":
                update(job["total"])
    except KeyboardInterrupt:
        raise CliError(f"stopped following job {job_id}; it goes on in the daemon "
                       f"(pyscsi-target job wait {job_id}, or job cancel {job_id})") from None
    if job["state"] != "succeeded":
        raise CliError(f"job {job_id} {job['state']}: {job['message']}")
    return job
