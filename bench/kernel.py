"""Kernel-initiator rows: fio in a qemu guest (open-iscsi, iscsi_tcp) against both targets over a tap link.

The guest harness (tests/support/guest) creates a network namespace with a tap device; pyscsi-target
listens on its first address, tgtd on its second, each exporting one LUN filled from the same image.
The guest (virtio-net on that tap, no user-space TCP in between) logs in to both and runs every fio
job against each in turn, alternating which target goes first from round to round.  Before each fio
run the guest waits for the host's go: the host reads the target process's CPU time (utime+stime, all
threads) before and after, so **CPU s/GB** is that target's own cost per GB (10^9 bytes) moved.

Under TCG (no usable KVM here) the guest is CPU-bound: its MB/s mostly measures qemu's emulation, not
the target.  CPU s/GB is the figure that ranks targets there; the table says so.  Ratios: MB/s ratio =
pyscsi-target / tgtd (higher is better for pyscsi-target); CPU ratio = tgtd CPU s/GB / pyscsi-target
CPU s/GB (higher is better for pyscsi-target: it spends that many times less CPU per GB).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.daemon import Daemon
from support.guest import Guest, GuestOptions, TapNetwork
from support.guest.vm import kvm_usable
from support.tgtd import Lun, Tgtd

from .targets import TGTD_PARAMS, GiB, copy_image, fill_file, proc_cpu_seconds

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "kernel_guest.sh"
A, B = "pyscsi-target", "tgtd"
PORT = 3260  # both targets on the iSCSI port, each on its own namespace address
MiB = 1 << 20


@dataclass(frozen=True)
class FioJob:
    id: str
    title: str
    rw: str  # fio --rw
    bs: int
    qd: int
    read_pct: int | None = None  # randrw only

    def spec(self) -> str:
        return f"{self.id},{self.rw},{self.bs},{self.qd},{'-' if self.read_pct is None else self.read_pct}"


def kernel_jobs() -> list[FioJob]:
    return [
        FioJob("k_rr4k_qd32", "fio 4 KiB random read QD32", "randread", 4096, 32),
        FioJob("k_rw4k_qd32", "fio 4 KiB random write QD32", "randwrite", 4096, 32),
        FioJob("k_sr128k_qd16", "fio 128 KiB sequential read QD16", "read", 128 << 10, 16),
        FioJob("k_sw128k_qd16", "fio 128 KiB sequential write QD16", "write", 128 << 10, 16),
        FioJob("k_sr1m_qd4", "fio 1 MiB sequential read QD4", "read", 1 << 20, 4),
        FioJob("k_rr4k_qd1", "fio 4 KiB random read QD1 (latency)", "randread", 4096, 1),
        FioJob("k_mix4k_qd32", "fio 4 KiB random 70/30 read/write QD32", "randrw", 4096, 32, 70),
    ]


def _fio_sample(doc: dict[str, Any], cpu_s: float) -> dict[str, Any]:
    """The figures of one fio run (its JSON) plus the target's CPU seconds over it."""
    job = doc["jobs"][0]
    total_bytes = 0
    iops = 0.0
    runtime_ms = 0
    out: dict[str, Any] = {"ok": True, "cpu_s": round(cpu_s, 3)}
    for direction in ("read", "write"):
        d = job.get(direction) or {}
        n = int(d.get("io_bytes", 0))
        if not n:
            continue
        total_bytes += n
        iops += float(d.get("iops", 0.0))
        runtime_ms = max(runtime_ms, int(d.get("runtime", 0)))
        clat = d.get("clat_ns") or {}
        pct = clat.get("percentile") or {}
        out[f"{direction}_lat_us"] = {
            "mean": round(float(clat.get("mean", 0.0)) / 1000, 1),
            **{p: round(float(v) / 1000, 1) for p, v in (("p50", pct.get("50.000000")), ("p90", pct.get("90.000000")),
                                                         ("p99", pct.get("99.000000")), ("p99.9", pct.get("99.900000")))
               if v is not None}}
    seconds = runtime_ms / 1000
    out.update({"bytes": total_bytes, "seconds": seconds, "iops": round(iops, 1),
                "mbps": round(total_bytes / seconds / 1e6, 2) if seconds else 0.0,
                "cpu_s_per_gb": round(cpu_s / (total_bytes / 1e9), 4) if total_bytes else None})
    return out


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in samples if s.get("ok")]
    if not ok:
        return {}
    med: dict[str, Any] = {"rounds_ok": len(ok)}
    for k in ("mbps", "iops"):
        med[k] = round(statistics.median(s[k] for s in ok), 2)
    cpg = [s["cpu_s_per_gb"] for s in ok if s.get("cpu_s_per_gb") is not None]
    med["cpu_s_per_gb"] = round(statistics.median(cpg), 4) if cpg else None
    for direction in ("read", "write"):
        lats = [s[f"{direction}_lat_us"] for s in ok if f"{direction}_lat_us" in s]
        if lats:
            med[f"{direction}_lat_us"] = {k: round(statistics.median(x[k] for x in lats if k in x), 1)
                                          for k in lats[0]}
    return med


def _ratios(med: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    a, b = med.get(A, {}), med.get(B, {})
    mb = round(a["mbps"] / b["mbps"], 3) if a.get("mbps") and b.get("mbps") else None
    cpu = round(b["cpu_s_per_gb"] / a["cpu_s_per_gb"], 3) if a.get("cpu_s_per_gb") and b.get("cpu_s_per_gb") else None
    lat = None
    pa, pb = a.get("read_lat_us", {}).get("p50"), b.get("read_lat_us", {}).get("p50")
    if pa and pb:
        lat = round(pb / pa, 3)  # tgtd's median latency over ours: > 1 means we answer faster
    return {"ratio": mb, "cpu_ratio": cpu, "lat_p50_ratio": lat}


class KernelBench:
    """Both targets in a tap namespace and one guest running every fio job against each."""

    def __init__(self, workdir: Path, *, rounds: int, seconds: int, lun_bytes: int,
                 jobs: list[FioJob], log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.rounds = rounds
        self.seconds = seconds
        self.lun_bytes = lun_bytes
        self.jobs = jobs
        self.log = log

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "error": "", "rows": [], "guest": {}, "config": {
            "rounds": self.rounds, "seconds": self.seconds, "lun_bytes": self.lun_bytes, "tgtd_params": TGTD_PARAMS,
            "order": "alternating: odd rounds pyscsi-target first, even rounds tgtd first",
            "accel": "kvm" if kvm_usable()[0] else "tcg"}}
        image = self.workdir / "kernel-lun.img"
        self.log(f"kernel: filling a {self.lun_bytes // MiB} MiB LUN image")
        fill_file(image, self.lun_bytes)
        tgtd_img = self.workdir / "kernel-tgtd.img"
        copy_image(image, tgtd_img)
        state = self.workdir / "pyscsi-kernel"
        # Daemon.add_target's file for LUN 0, in place before the extent opens it (same bytes as tgtd's).
        copy_image(image, state / "extents" / "kbench-lun0.img")
        daemon: Daemon | None = None
        tgtd: Tgtd | None = None
        try:
            with TapNetwork(2) as net:
                with net.entered():
                    addr_a, addr_b = net.target_addresses
                    tgtd = Tgtd([Lun(1, tgtd_img)], host=addr_b, port=PORT,
                                iqn="iqn.2026-11.org.pyscsi-target.bench:kernel-tgtd",
                                log_path=self.workdir / "kernel-tgtd.log").start()
                    for k, v in TGTD_PARAMS.items():
                        tgtd.adm("--mode", "target", "--op", "update", "--tid", "1", "--name", k, "--value", v)
                    daemon = Daemon(state, host=addr_a, port=PORT, demo=False,
                                    log_level="warning").start()
                    iqn = daemon.add_target("kbench", luns=[(0, self.lun_bytes, 512)])
                    ext = daemon.rest("GET", "extent/")[0]["iscsi_target_extent_path"]
                if Path(ext).resolve() != (state / "extents" / "kbench-lun0.img").resolve():
                    raise RuntimeError(f"the LUN is {ext}, not the prepared image")
                pids = {A: daemon.proc.pid if daemon.proc else 0, B: tgtd.pid}
                targets = [(A, net.guest_portal(PORT, 0), iqn, 0), (B, net.guest_portal(PORT, 1), tgtd.iqn, 1)]
                self._guest(net, targets, pids, out)
        except Exception as e:  # noqa: BLE001 - reported in the result, never a crashed bench
            out["error"] = out["error"] or f"{type(e).__name__}: {e}"
        finally:
            if daemon is not None:
                daemon.stop()
            if tgtd is not None:
                tgtd.stop()
        out["ok"] = not out["error"] and bool(out["rows"]) and all(r["ok"] for r in out["rows"])
        return out

    def _guest(self, net: TapNetwork, targets: list[tuple[str, str, str, int]], pids: dict[str, int],
               out: dict[str, Any]) -> None:
        env = {"KB_TARGETS": " ".join(",".join(map(str, t)) for t in targets),
               "KB_JOBS": " ".join(j.spec() for j in self.jobs),
               "KB_ROUNDS": str(self.rounds), "KB_SECONDS": str(self.seconds)}
        runs = len(self.jobs) * len(targets) * self.rounds
        limit = 120 + runs * (self.seconds + 30)
        names = [t[0] for t in targets]
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {j.id: {n: [] for n in names} for j in self.jobs}
        cpu: dict[str, float] = {}
        t0 = time.monotonic()
        with Guest(SCRIPT.read_text(), net, env=env, options=GuestOptions(timeout=limit, mem_mib=512),
                   run_dir=self.workdir / "kernel-guest") as guest:
            for r in range(1, self.rounds + 1):
                order = names if r % 2 else names[::-1]
                for job in self.jobs:
                    for name in order:
                        key = f"{r}.{job.id}.{name}"
                        if guest.wait_for_mark(f"ready.{key}", 300 if not cpu else 120) is None:
                            raise RuntimeError(f"the guest did not get to {key}: {_tail(guest)}")
                        cpu[key] = proc_cpu_seconds(pids[name])
                        guest.send(f"go.{key}")
                        if guest.wait_for_mark(f"done.{key}", self.seconds + 60) is None:
                            raise RuntimeError(f"fio {key} did not finish: {_tail(guest)}")
                        cpu[key] = proc_cpu_seconds(pids[name]) - cpu[key]
                        self.log(f"kernel round {r}/{self.rounds} {job.id:<14} {name:<14} "
                                 f"cpu {cpu[key]:6.2f}s")
            run = guest.wait()
        out["guest"] = {"accel": run.accel, "seconds": round(time.monotonic() - t0, 1), "summary": run.summary(),
                        "boot_seconds": run.boot_seconds,
                        "disks": {k.removeprefix("disk."): v for k, v in run.data.items() if k.startswith("disk.")}}
        if not run.ok:
            out["error"] = f"guest run failed: {run.summary()}"
            out["guest"]["failures"] = [str(f) for f in run.failures]
        docs = _fio_documents(run.data)
        for job in self.jobs:
            for r in range(1, self.rounds + 1):
                for name in names:
                    key = f"{r}.{job.id}.{name}"
                    doc = docs.get(key)
                    if doc is None or key not in cpu:
                        samples[job.id][name].append({"ok": False, "error": f"no fio result for {key}"})
                        continue
                    samples[job.id][name].append(_fio_sample(doc, cpu[key]))
        for job in self.jobs:
            med = {n: _median(v) for n, v in samples[job.id].items()}
            out["rows"].append({"id": job.id, "title": job.title, "rw": job.rw, "bs": job.bs, "qd": job.qd,
                                "read_pct": job.read_pct, "median": med, **_ratios(med),
                                "ok": all(s.get("ok") for v in samples[job.id].values() for s in v),
                                "rounds": samples[job.id]})


def _fio_documents(data: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Reassemble fio's JSON documents from the guest's chunked ``fio.KEY.N`` data records."""
    docs: dict[str, dict[str, Any]] = {}
    for name, count in data.items():
        if not (name.startswith("fio.") and name.endswith(".end")):
            continue
        key = name[len("fio."):-len(".end")]
        text = "".join(data.get(f"fio.{key}.{k}", "") for k in range(int(count)))
        try:
            docs[key] = json.loads(text)
        except ValueError:
            continue
    return docs


def _tail(guest: Guest, n: int = 8) -> str:
    """The guest's last records and console lines, for an error message (the guest may still run)."""
    console = (guest.run_dir / "console.log").read_text(errors="replace").replace("\r", "").splitlines()
    return "; ".join([*map(str, guest.records()[-n:]), *console[-n:]])


def run_kernel(workdir: Path, *, quick: bool, rounds: int | None, seconds: int | None, only: set[str] | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    jobs = [j for j in kernel_jobs() if only is None or j.id in only]
    bench = KernelBench(workdir, rounds=rounds or (1 if quick else 3), seconds=seconds or (2 if quick else 6),
                        lun_bytes=(256 * MiB) if quick else GiB, jobs=jobs, log=log)
    return bench.run()
