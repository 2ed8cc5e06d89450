"""Scaling rows: idle memory per session, start-up and SendTargets discovery time against target count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import iscsiraw
from .targets import PyscsiScaling, System, TgtdScaling, proc_rss_kib


def idle_memory(system: System, steps: list[int], settle: float = 0.5) -> dict[str, Any]:
    """RSS of the target process with 0 and then ``steps`` idle logged-in sessions held open."""
    out: dict[str, Any] = {"ok": True, "error": "", "points": []}
    with iscsiraw.IdleSessions() as idle:
        try:
            idle.serve(settle)
            base = proc_rss_kib(system.pid)
            out["baseline_rss_kib"] = base
            for n in steps:
                idle.open(system.host, system.port, system.iqn, n - len(idle.sessions))
                idle.serve(settle)  # let the target finish per-session set-up; answer its pings meanwhile
                rss = proc_rss_kib(system.pid)
                out["points"].append({"sessions": n, "rss_kib": rss,
                                      "kib_per_session": round((rss - base) / n, 2)})
        except Exception as e:
            out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    if out["ok"] and not system.alive():
        out["ok"], out["error"] = False, f"{system.name} exited while holding idle sessions"
    return out


def _time_discovery(host: str, port: int, expect: int, repeat: int) -> tuple[list[float], int]:
    times, found = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        names = iscsiraw.discover(host, port)
        times.append(time.perf_counter() - t0)
        found = len(names)
        if found != expect:
            raise RuntimeError(f"SendTargets returned {found} targets, expected {expect}")
    return times, found


def _wait_discoverable(host: str, port: int, expect: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if len(iscsiraw.discover(host, port)) == expect:
                return
        except (OSError, iscsiraw.IscsiError) as e:
            last = e
        time.sleep(0.02)
    raise RuntimeError(f"target count {expect} not discoverable within {timeout}s ({last})")


def targets_scaling(name: str, make: Callable[[], PyscsiScaling | TgtdScaling], counts: list[int],
                    repeat: int) -> dict[str, Any]:
    """For each N: configure N targets, time SendTargets=All (median of ``repeat``), then restart and time
    start-up until discovery lists all N."""
    out: dict[str, Any] = {"ok": True, "error": "", "points": []}
    sysm = make()
    try:
        sysm.start()
        for n in counts:
            cfg_s = sysm.grow_to(n)
            _wait_discoverable("127.0.0.1", sysm.port, n, timeout=30)
            times, _ = _time_discovery("127.0.0.1", sysm.port, n, repeat)
            sysm.stop()
            t0 = time.perf_counter()
            sysm.start()
            _wait_discoverable("127.0.0.1", sysm.port, n, timeout=120)
            startup = time.perf_counter() - t0
            out["points"].append({"targets": n, "configure_s": round(cfg_s, 3),
                                  "discovery_s": round(statistics.median(times), 5),
                                  "discovery_runs_s": [round(t, 5) for t in times],
                                  "startup_s": round(startup, 3)})
    except Exception as e:
        out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    finally:
        sysm.stop()
    return out


def run_scaling(systems: dict[str, System], workdir: Path, *, session_steps: list[int], target_counts: list[int],
                repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"idle_memory": {}, "targets": {}}
    for name, system in systems.items():
        log(f"idle memory: {name} at {session_steps} sessions")
        res["idle_memory"][name] = idle_memory(system, session_steps)
    makers: dict[str, Callable[[], Any]] = {"tgtd": lambda: TgtdScaling(workdir),
                                             "pyscsi-target": lambda: PyscsiScaling(workdir)}
    for name in systems:
        log(f"start-up and discovery: {name} at {target_counts} targets")
        res["targets"][name] = targets_scaling(name, makers[name], target_counts, repeat)
    return res
