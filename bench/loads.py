"""Load definitions and runners: iscsi-perf (reads) and qemu-img bench (writes) against a System.

Every runner returns a Sample with IOPS, bytes moved and the target process's CPU seconds over
the run (utime+stime from /proc/<pid>/stat, so tgtd's I/O threads and our thread pool count).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .targets import System, proc_cpu_seconds

# qemu-img bench has no random mode: offsets advance by -S (step) modulo the image size (qemu 7.2).
# A step of 162013 blocks of 4 KiB (~0.618 * 2^18 blocks, odd so coprime with 2^18) visits every
# 4 KiB block of a 1 GiB LUN once per 262144 requests in a scattered golden-ratio order: no two
# consecutive requests are near each other, which is what "random" has to mean for a target.
GOLDEN_STEP_BLOCKS = 162013

# iscsi-perf hard-codes iscsi_set_header_digest(NONE_CRC32C) after parsing its URL, so the URL's
# ?header_digest=crc32c is overridden and a target that accepts None picks None.  This LD_PRELOAD
# shim makes the call use $BENCH_ISCSI_HEADER_DIGEST (libiscsi enum: 3 = CRC32C only) instead.
_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
struct iscsi_context;
int iscsi_set_header_digest(struct iscsi_context *iscsi, int digest)
{
    static int (*real)(struct iscsi_context *, int);
    const char *forced = getenv("BENCH_ISCSI_HEADER_DIGEST");
    if (!real)
        real = (int (*)(struct iscsi_context *, int))dlsym(RTLD_NEXT, "iscsi_set_header_digest");
    if (forced && *forced)
        digest = atoi(forced);
    return real(iscsi, digest);
}
"""
ISCSI_HEADER_DIGEST_CRC32C = 3


def build_digest_shim(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler is needed for the header-digest row (apt-get install gcc)")
    src = workdir / "digest_shim.c"
    out = workdir / "digest_shim.so"
    src.write_text(_SHIM_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"], check=True,
                   capture_output=True, timeout=60)
    return out


@dataclass
class Load:
    id: str
    title: str
    tool: str  # "iscsi-perf" | "qemu-img"
    size: int  # bytes per request
    qd: int  # per session
    random: bool
    write: bool = False
    sessions: int = 1
    lun: str = "main"
    header_digest: bool = False
    note: str = ""


def default_loads() -> list[Load]:
    return [
        Load("rr4k_qd1", "4 KiB random read QD1", "iscsi-perf", 4096, 1, True),
        Load("sr4k_qd1", "4 KiB sequential read QD1", "iscsi-perf", 4096, 1, False),
        Load("rr4k_qd32", "4 KiB random read QD32", "iscsi-perf", 4096, 32, True),
        Load("sr4k_qd32", "4 KiB sequential read QD32", "iscsi-perf", 4096, 32, False),
        Load("sr128k_qd16", "128 KiB sequential read QD16", "iscsi-perf", 131072, 16, False),
        Load("rw4k_qd32", "4 KiB random write QD32", "qemu-img", 4096, 32, True, write=True,
             note="qemu-img bench -w, golden-ratio stride over the LUN"),
        Load("sw128k_qd16", "128 KiB sequential write QD16", "qemu-img", 131072, 16, False, write=True),
        Load("rr4k_qd32_hd", "4 KiB random read QD32, HeaderDigest=CRC32C", "iscsi-perf", 4096, 32, True,
             header_digest=True),
        Load("rr4k_32sess", "4 KiB random read, 32 sessions x QD4", "iscsi-perf", 4096, 4, True, sessions=32),
        Load("rr4k_qd32_sp1g", "4 KiB random read QD32, 1 GiB sparse LUN", "iscsi-perf", 4096, 32, True,
             lun="sp1g"),
        Load("rr4k_qd32_sp1t", "4 KiB random read QD32, 1 TiB sparse LUN", "iscsi-perf", 4096, 32, True,
             lun="sp1t"),
    ]


@dataclass
class Sample:
    ok: bool
    iops: float = 0.0
    bytes: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    error: str = ""
    commands: list[str] = field(default_factory=list)

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def cpu_s_per_gb(self) -> float | None:
        return self.cpu_s / (self.bytes / 1e9) if self.bytes else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["mbps"] = round(self.mbps, 2)
        d["cpu_s_per_gb"] = None if self.cpu_s_per_gb is None else round(self.cpu_s_per_gb, 4)
        d["iops"] = round(self.iops, 1)
        d["seconds"] = round(self.seconds, 3)
        d["cpu_s"] = round(self.cpu_s, 3)
        return d


_PERF_AVG = re.compile(r"iops average (\d+)")


class Runner:
    def __init__(self, workdir: Path, seconds: int) -> None:
        self.workdir = workdir
        self.seconds = max(1, int(seconds))
        self._shim: Path | None = None
        self._rate: dict[tuple[str, str], float] = {}  # (load, system) -> last IOPS, sizes qemu-img counts

    def shim(self) -> Path:
        if self._shim is None:
            self._shim = build_digest_shim(self.workdir)
        return self._shim

    def run(self, load: Load, system: System) -> Sample:
        if not system.alive():
            return Sample(False, error=f"{system.name} is not running")
        cpu0 = proc_cpu_seconds(system.pid)
        try:
            if load.tool == "iscsi-perf":
                s = self._iscsi_perf(load, system)
            else:
                s = self._qemu_bench(load, system)
        except Exception as e:  # a runner failure is a failed sample, never a crashed bench
            s = Sample(False, error=f"{type(e).__name__}: {e}")
        try:
            s.cpu_s = proc_cpu_seconds(system.pid) - cpu0
        except OSError:
            s.ok, s.error = False, s.error or f"{system.name} exited during the run"
        if s.ok and not system.alive():
            s.ok, s.error = False, f"{system.name} exited during the run"
        return s

    # --- iscsi-perf -------------------------------------------------------------------------------------------
    def _iscsi_perf(self, load: Load, system: System) -> Sample:
        blocks = load.size // system.block_size
        env = dict(os.environ)
        if load.header_digest:
            env["LD_PRELOAD"] = str(self.shim())
            env["BENCH_ISCSI_HEADER_DIGEST"] = str(ISCSI_HEADER_DIGEST_CRC32C)
        cmds = []
        procs = []
        for i in range(load.sessions):
            cmd = ["iscsi-perf", "-i", f"iqn.2026-11.org.pyscsi-target.bench:init{i}", "-t", str(self.seconds),
                   "-m", str(load.qd), "-b", str(blocks), *(["-r"] if load.random else []), system.url(load.lun)]
            cmds.append(" ".join(cmd))
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL))
        t0 = time.perf_counter()
        total_iops, errors = 0.0, []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                errors.append("iscsi-perf timed out")
                continue
            text = out.decode(errors="replace")
            avgs = _PERF_AVG.findall(text)
            if p.returncode != 0 or "finished." not in text or not avgs:
                errors.append(f"iscsi-perf rc={p.returncode}: {text.strip()[-300:]}")
                continue
            total_iops += int(avgs[-1])
        wall = time.perf_counter() - t0
        if errors:
            return Sample(False, error="; ".join(errors[:3]), commands=cmds[:1])
        # iscsi-perf runs exactly -t seconds of load after login; its own average is over that window.
        secs = float(self.seconds)
        return Sample(True, iops=total_iops, bytes=int(total_iops * secs * load.size), seconds=secs,
                      commands=cmds[:1] + ([f"... x{load.sessions} in parallel (wall {wall:.1f}s)"]
                                           if load.sessions > 1 else []))

    # --- qemu-img bench ---------------------------------------------------------------------------------------
    def _qemu_bench(self, load: Load, system: System) -> Sample:
        key = (load.id, system.name)
        if key not in self._rate:  # pilot run to size the count; not recorded
            pilot = self._qemu_once(load, system, 4000 if load.size <= 8192 else 800)
            if not pilot.ok:
                return pilot
            self._rate[key] = pilot.iops
        count = max(500, int(self._rate[key] * self.seconds))
        s = self._qemu_once(load, system, count)
        if s.ok:
            self._rate[key] = s.iops
        return s

    def _qemu_once(self, load: Load, system: System, count: int) -> Sample:
        step = load.size * (GOLDEN_STEP_BLOCKS if load.random else 1)
        cmd = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", str(load.qd), "-s", str(load.size),
               "-S", str(step), "-c", str(count), *(["-w", "--pattern=0xa5"] if load.write else []),
               system.url(load.lun)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
        if r.returncode != 0 or not m:
            return Sample(False, error=f"qemu-img rc={r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}",
                          commands=[" ".join(cmd)])
        secs = float(m.group(1))
        return Sample(True, iops=count / secs if secs else 0.0, bytes=count * load.size, seconds=secs,
                      commands=[" ".join(cmd)])


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pyscsi-bench-"))
