"""Scaling rows: idle memory per session, start-up and SendTargets discovery time against target count."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import iscsiraw
from .storm import CLIENTS, storm
from .targets import PyscsiScaling, TgtdScaling, proc_rss_kib


def idle_memory(pid: int, host: str, port: int, iqn: str, steps: list[int], settle: float = 0.5) -> dict[str, Any]:
    """RSS of process ``pid`` with 0 and then ``steps`` idle logged-in sessions to ``iqn`` held open.

    Run on a freshly started target: a process that already served many sessions reuses their freed
    heap and would under-report.  The 1-session point also carries one-time costs (lazy imports,
    first allocations); the marginal cost between the larger steps is the per-session figure."""
    out: dict[str, Any] = {"ok": True, "error": "", "points": []}
    with iscsiraw.IdleSessions() as idle:
        try:
            idle.serve(settle)
            base = prev_rss = proc_rss_kib(pid)
            prev_n = 0
            out["baseline_rss_kib"] = base
            for n in steps:
                idle.open(host, port, iqn, n - len(idle.sessions))
                idle.serve(settle)  # let the target finish per-session set-up; answer its pings meanwhile
                rss = proc_rss_kib(pid)
                out["points"].append({"sessions": n, "rss_kib": rss, "kib_per_session": round((rss - base) / n, 2),
                                      "marginal_kib_per_session": round((rss - prev_rss) / (n - prev_n), 2)})
                prev_rss, prev_n = rss, n
        except Exception as e:
            out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
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


def targets_scaling(sysm: PyscsiScaling | TgtdScaling, counts: list[int], repeat: int, *, clients: int,
                    sequential: int, storm_seconds: float) -> dict[str, Any]:
    """For each N: configure N targets (``clients`` in parallel), time SendTargets=All (median of
    ``repeat``), then restart and time start-up until discovery lists all N.  At the largest N:
    ``sequential`` more targets added by one client (seconds per target), then the configuration
    storm.  ``sysm`` is running on entry and stopped on return."""
    out: dict[str, Any] = {"ok": True, "error": "", "points": []}
    try:
        for n in counts:
            cfg_s = sysm.grow_to(n, clients=clients)
            _wait_discoverable("127.0.0.1", sysm.port, n, timeout=30)
            times, _ = _time_discovery("127.0.0.1", sysm.port, n, repeat)
            sysm.stop()
            t0 = time.perf_counter()
            sysm.start()
            _wait_discoverable("127.0.0.1", sysm.port, n, timeout=120)
            startup = time.perf_counter() - t0
            out["points"].append({"targets": n, "configure_s": round(cfg_s, 3), "clients": clients,
                                  "discovery_s": round(statistics.median(times), 5),
                                  "discovery_runs_s": [round(t, 5) for t in times],
                                  "startup_s": round(startup, 3)})
        top = counts[-1]
        secs = sysm.grow_to(top + sequential, clients=1)
        out["sequential"] = {"at_targets": top, "added": sequential, "seconds": round(secs, 3),
                             "ms_per_target": round(secs / sequential * 1e3, 3)}
        first = iscsiraw.discover("127.0.0.1", sysm.port)[0]
        out["storm"] = storm(("127.0.0.1", sysm.port, first), sysm.change, sysm.client,
                             lambda c: c.close() if c is not None else None, storm_seconds, clients)
        out["storm"]["targets"] = top + sequential
        if not out["storm"]["ok"]:
            raise RuntimeError(f"storm: {out['storm']['error']}")
    except Exception as e:
        out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    finally:
        sysm.stop()
    return out


def run_scaling(names: list[str], workdir: Path, *, session_steps: list[int], target_counts: list[int],
                repeat: int, log: Callable[[str], None], clients: int = CLIENTS, sequential: int = 100,
                storm_seconds: float = 5.0) -> dict[str, Any]:
    """Per system, on a fresh process: idle memory (sessions to its first target), then the target-count rows."""
    res: dict[str, Any] = {"idle_memory": {}, "targets": {}}
    makers: dict[str, Callable[[], Any]] = {"tgtd": lambda: TgtdScaling(workdir),
                                             "pyscsi-target": lambda: PyscsiScaling(workdir)}
    for name in names:
        sysm = makers[name]()
        try:
            sysm.start()
            sysm.grow_to(1)
            _wait_discoverable("127.0.0.1", sysm.port, 1, timeout=30)
            iqn = iscsiraw.discover("127.0.0.1", sysm.port)[0]
            log(f"idle memory: {name} at {session_steps} sessions")
            res["idle_memory"][name] = idle_memory(sysm.pid, "127.0.0.1", sysm.port, iqn, session_steps)
        except Exception as e:
            res["idle_memory"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "points": []}
            sysm.stop()
            res["targets"][name] = {"ok": False, "error": "not run (set-up failed)", "points": []}
            continue
        log(f"start-up and discovery: {name} at {target_counts} targets ({clients} clients), then "
            f"{sequential} more by one client, then a {storm_seconds:.0f} s configuration storm")
        res["targets"][name] = targets_scaling(sysm, target_counts, repeat, clients=clients, sequential=sequential,
                                               storm_seconds=storm_seconds)
    return res
