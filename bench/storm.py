"""Configuration at scale: how long N targets take to configure (one client, or several in parallel),
and how long I/O stalls while the configuration changes (a "storm": clients creating, renaming and
deleting targets while one session sends INQUIRY after INQUIRY and times each).

Both targets are driven alike: pyscsi-target through its FreeNAS v1.0 REST API (keep-alive HTTP,
one connection per client), tgtd through tgtadm (one process per call, as tgt-admin does).  The
probe is bench/iscsiraw.py's INQUIRY at QD1 on a session to the first target (LUN 0: our device's
"no logical unit" answer, tgtd's controller LUN), in a process of its own; its latency is the
stall the storm causes.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from support.daemon import ADMIN_PASSWORD, ADMIN_USER, FREENAS

from . import iscsiraw

#: Parallel clients of the "configure N targets" and storm measurements (a provisioning tool's shape).
CLIENTS = 8


class RestClient:
    """A keep-alive FreeNAS v1.0 client (urllib opens a connection per request)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
                        "Accept": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        self.conn.request(method, f"{FREENAS}/{path}", body=None if body is None else json.dumps(body),
                          headers=self.headers)
        r = self.conn.getresponse()
        raw = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path} -> HTTP {r.status}: {raw[:300]!r}")
        return json.loads(raw) if raw.strip() else None

    def close(self) -> None:
        self.conn.close()


def in_parallel(clients: int, items: list[int], work: Callable[[Any, int], None],
                make: Callable[[], Any], close: Callable[[Any], None] = lambda c: None) -> float:
    """Run ``work(client, item)`` for every item over ``clients`` workers (each with its own
    client from ``make``); seconds taken.  Items are dealt round-robin, in order per worker."""
    def worker(k: int) -> None:
        c = make()
        try:
            for item in items[k::clients]:
                work(c, item)
        finally:
            close(c)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(worker, k) for k in range(min(clients, len(items)))]:
            f.result()
    return time.perf_counter() - t0


class Probe:
    """INQUIRY after INQUIRY on one session, in a process of its own (so that the GIL of the
    bench's client threads does not delay it): each INQUIRY's start (CLOCK_MONOTONIC, shared by
    every process) and latency, in seconds."""

    def __init__(self, host: str, port: int, iqn: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.storm", "probe", host, str(port), iqn],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=Path(__file__).resolve().parents[1], text=True)
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []

    def start(self) -> Probe:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"probe did not log in: {line.strip()} {self.errors}")
        return self

    def stop(self) -> None:
        try:
            out, err = self.proc.communicate("stop\n", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        try:
            doc = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except ValueError:
            doc = {}
        self.samples = [(float(t), float(lat)) for t, lat in doc.get("samples", [])]
        self.errors += doc.get("errors", []) + ([err.strip()[-300:]] if self.proc.returncode and err.strip() else [])

    def between(self, t0: float, t1: float) -> list[float]:
        return [lat for t, lat in self.samples if t0 <= t < t1]


def _probe_main(host: str, port: int, iqn: str) -> None:
    """The probe process: log in, say ready, INQUIRY until told to stop, print the samples."""
    session = iscsiraw.login(host, port, iqn, initiator="iqn.2026-11.org.pyscsi-target.bench:probe")
    session.sock.settimeout(30)
    print("ready", flush=True)
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    try:
        while not select.select([sys.stdin], [], [], 0)[0]:
            t0 = time.monotonic()
            status = session.inquiry(0)
            samples.append((t0, time.monotonic() - t0))
            if status != 0:
                errors.append(f"INQUIRY status {status:#x}")
                break
    except (OSError, iscsiraw.IscsiError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        session.logout()
    print(json.dumps({"samples": samples, "errors": errors}))


def _summary(lat: list[float]) -> dict[str, Any]:
    if not lat:
        return {"count": 0}
    s = sorted(lat)
    return {"count": len(s), "median_ms": round(statistics.median(s) * 1e3, 3),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3, 3),
            "p999_ms": round(s[min(len(s) - 1, int(len(s) * 0.999))] * 1e3, 3), "max_ms": round(s[-1] * 1e3, 3)}


def storm(probe_target: tuple[str, int, str], change: Callable[[Any, int], None], make: Callable[[], Any],
          close: Callable[[Any], None], seconds: float, clients: int = CLIENTS) -> dict[str, Any]:
    """INQUIRY latency for 1 s without changes (baseline), then while ``clients`` workers run
    ``change(client, i)`` for i = 0, 1, ... for ``seconds``; counts the changes done."""
    probe = Probe(*probe_target).start()
    out: dict[str, Any] = {"ok": True, "error": ""}
    try:
        t_quiet = time.monotonic()
        time.sleep(1.0)
        t_storm = time.monotonic()
        deadline = t_storm + seconds
        done = [0] * clients

        def worker(k: int) -> None:
            c = make()
            try:
                i = k
                while time.monotonic() < deadline:
                    change(c, i)
                    done[k] += 1
                    i += clients
            finally:
                close(c)

        with ThreadPoolExecutor(clients) as ex:
            for f in [ex.submit(worker, k) for k in range(clients)]:
                f.result()
        t_end = time.monotonic()
        probe.stop()
        out.update({"changes": sum(done), "seconds": round(t_end - t_storm, 2), "clients": clients,
                    "quiet": _summary(probe.between(t_quiet, t_storm)),
                    "storm": _summary(probe.between(t_storm, t_end))})
        if probe.errors:
            raise RuntimeError(f"probe: {probe.errors[0]}")
    except Exception as e:  # noqa: BLE001 - reported in the result
        out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"
    finally:
        if probe.proc.poll() is None:
            probe.stop()
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "probe":
        _probe_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python3 -m bench.storm probe HOST PORT IQN")
