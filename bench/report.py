"""Result table (text), machine description, and the PNG bar chart."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

A, B = "pyscsi-target", "tgtd"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    def pkg(name: str) -> str:
        return version(["dpkg-query", "-W", "-f", "${Version}", name])

    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mem_gib": round(mem_kib / (1 << 20), 1), "python": platform.python_version(),
            "tgt": pkg("tgt"), "libiscsi": pkg("libiscsi-bin"), "qemu_utils": pkg("qemu-utils"),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(result: dict[str, Any]) -> str:
    lines = []
    hdr = (f"{'load':<44} | {'pyscsi IOPS':>11} {'MB/s':>7} {'CPUs/GB':>7} | {'tgtd IOPS':>10} {'MB/s':>7} "
           f"{'CPUs/GB':>7} | {'ratio':>5}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for row in result["loads"]:
        a, b = row["median"].get(A, {}), row["median"].get(B, {})
        err = "" if row["ok"] else "  ERROR"
        lines.append(f"{row['title'][:44]:<44} | {_f(a.get('iops'), '11,.0f')} {_f(a.get('mbps'), '7.1f')} "
                     f"{_f(a.get('cpu_s_per_gb'), '7.2f')} | {_f(b.get('iops'), '10,.0f')} {_f(b.get('mbps'), '7.1f')} "
                     f"{_f(b.get('cpu_s_per_gb'), '7.2f')} | {_f(row.get('ratio'), '5.2f')}{err}")
    kern = result.get("kernel") or {}
    if kern:
        lines.append("")
        lines.extend(kernel_table(kern))
    derived = result.get("derived", {})
    if derived:
        lines.append("")
        for k, v in derived.items():
            lines.append(f"{k}: " + ", ".join(f"{n}={_f(x, '.3f')}" for n, x in v.items()))
    sc = result.get("scaling") or {}
    mem = sc.get("idle_memory") or {}
    if mem:
        lines.append("")
        lines.append(f"{'idle sessions (fresh process)':<44} | {'pyscsi RSS KiB':>14} {'KiB/sess':>8} {'marg.':>6} | "
                     f"{'tgtd RSS KiB':>12} {'KiB/sess':>8} {'marg.':>6} | ratio")
        pts = {n: {p["sessions"]: p for p in m.get("points", [])} for n, m in mem.items()}
        base = {n: m.get("baseline_rss_kib") for n, m in mem.items()}
        lines.append(f"{'0 sessions (baseline)':<44} | {_f(base.get(A), '14,d')} {'':>8} {'':>6} | "
                     f"{_f(base.get(B), '12,d')} {'':>8} {'':>6} |")
        for n in sorted({k for v in pts.values() for k in v}):
            a, b = pts.get(A, {}).get(n, {}), pts.get(B, {}).get(n, {})
            ka, kb = a.get("kib_per_session"), b.get("kib_per_session")
            lines.append(f"{f'{n} sessions':<44} | {_f(a.get('rss_kib'), '14,d')} {_f(ka, '8.1f')} "
                         f"{_f(a.get('marginal_kib_per_session'), '6.1f')} | {_f(b.get('rss_kib'), '12,d')} "
                         f"{_f(kb, '8.1f')} {_f(b.get('marginal_kib_per_session'), '6.1f')} | "
                         f"{_f(ka / kb if ka is not None and kb else None, '5.2f')}")
        for n, m in mem.items():
            if not m.get("ok"):
                lines.append(f"  {n}: ERROR {m.get('error')}")
    tg = sc.get("targets") or {}
    if tg:
        lines.append("")
        lines.append(f"{'targets configured (config s: adding them)':<44} | {'pyscsi start s':>14} {'disc. s':>8} "
                     f"{'config s':>8} | {'tgtd start s':>12} {'disc. s':>8} {'config s':>8} | disc. config")
        pts = {n: {p["targets"]: p for p in m.get("points", [])} for n, m in tg.items()}
        for n in sorted({k for v in pts.values() for k in v}):
            a, b = pts.get(A, {}).get(n, {}), pts.get(B, {}).get(n, {})
            da, db = a.get("discovery_s"), b.get("discovery_s")
            ca, cb = a.get("configure_s"), b.get("configure_s")
            lines.append(f"{f'{n} targets':<44} | {_f(a.get('startup_s'), '14.3f')} {_f(da, '8.4f')} "
                         f"{_f(ca, '8.2f')} | {_f(b.get('startup_s'), '12.3f')} {_f(db, '8.4f')} {_f(cb, '8.2f')} | "
                         f"{_f(da / db if da is not None and db else None, '5.2f')} "
                         f"{_f(ca / cb if ca and cb else None, '6.2f')}")
        clients = next((p.get("clients") for m in tg.values() for p in m.get("points", [])), None)
        if clients:
            lines.append(f"(config s: the targets added since the previous row, by {clients} clients in parallel: REST "
                         "keep-alive connections / tgtadm processes; ratios pyscsi-target / tgtd, lower is better)")
        seq = {n: m.get("sequential") or {} for n, m in tg.items()}
        if any(seq.values()):
            a, b = seq.get(A, {}), seq.get(B, {})
            ma, mb = a.get("ms_per_target"), b.get("ms_per_target")
            ref = a or b
            where = f"({ref.get('added')} added at {ref.get('at_targets')} targets)"
            lines.append(f"{'one client, one target at a time (ms/target)':<44} | {_f(ma, '14.2f')} {'':>17} | "
                         f"{_f(mb, '12.2f')} {'':>17} | {_f(ma / mb if ma and mb else None, '5.2f')}  {where}")
        storms = {n: m.get("storm") or {} for n, m in tg.items()}
        if any(storms.values()):
            lines += ["", f"{'configuration storm: INQUIRY latency (ms)':<44} | {'quiet med':>9} {'storm med':>9} "
                          f"{'p99':>7} {'max':>7} {'changes/s':>9} | max ratio"]
            ma = (storms.get(A) or {}).get("storm", {}).get("max_ms")
            mb = (storms.get(B) or {}).get("storm", {}).get("max_ms")
            for name in (A, B):
                st = storms.get(name) or {}
                if not st:
                    continue
                q, w = st.get("quiet", {}), st.get("storm", {})
                rate = st["changes"] / st["seconds"] if st.get("seconds") else None
                label = name + (f" (ERROR {st['error']})" if st.get("error") else "")
                ratio = _f(ma / mb if ma and mb else None, "5.2f") if name == A else ""
                lines.append(f"{label:<44} | {_f(q.get('median_ms'), '9.3f')} {_f(w.get('median_ms'), '9.3f')} "
                             f"{_f(w.get('p99_ms'), '7.2f')} {_f(w.get('max_ms'), '7.2f')} {_f(rate, '9.1f')} | "
                             f"{ratio}")
            st = storms.get(A) or {}
            lines.append(f"(each change: a target created, exported, renamed/updated and deleted, by "
                         f"{st.get('clients')} clients at {st.get('targets')} targets; 'max' is the longest I/O stall)")
        for n, m in tg.items():
            if not m.get("ok"):
                lines.append(f"  {n}: ERROR {m.get('error')}")
    return "\n".join(lines)


def _lat(med: dict[str, Any]) -> str:
    lat = med.get("read_lat_us") or med.get("write_lat_us") or {}
    return f"{_f(lat.get('p50'), '6.0f')} {_f(lat.get('p99'), '7.0f')}"


def kernel_table(kern: dict[str, Any]) -> list[str]:
    """The kernel-initiator rows: guest MB/s, each target's CPU s/GB, clat p50/p99, and both ratios."""
    cfg, guest = kern.get("config", {}), kern.get("guest", {})
    lines = [f"kernel initiator: fio (libaio, direct=1) in a qemu guest ({guest.get('accel') or cfg.get('accel')}), "
             f"open-iscsi over virtio-net on a tap link; {cfg.get('rounds')} rounds x {cfg.get('seconds')} s, "
             "medians, alternating which target goes first."]
    if (guest.get("accel") or cfg.get("accel")) == "tcg":
        lines.append("NOTE: the guest runs under TCG and is CPU-bound, so its MB/s mostly measures the emulation; "
                     "CPU s/GB (the target process's own CPU per GB moved) is the figure that ranks the targets.")
    hdr = (f"{'kernel load':<40} | {'pyscsi MB/s':>11} {'CPUs/GB':>7} {'p50 us':>6} {'p99 us':>7} | "
           f"{'tgtd MB/s':>9} {'CPUs/GB':>7} {'p50 us':>6} {'p99 us':>7} | {'MB/s':>5} {'CPU':>5}")
    lines += [hdr, "-" * len(hdr)]
    for row in kern.get("rows", []):
        a, b = row["median"].get(A, {}), row["median"].get(B, {})
        err = "" if row["ok"] else "  ERROR"
        lines.append(f"{row['title'][:40]:<40} | {_f(a.get('mbps'), '11.1f')} {_f(a.get('cpu_s_per_gb'), '7.2f')} "
                     f"{_lat(a)} | {_f(b.get('mbps'), '9.1f')} {_f(b.get('cpu_s_per_gb'), '7.2f')} {_lat(b)} | "
                     f"{_f(row.get('ratio'), '5.2f')} {_f(row.get('cpu_ratio'), '5.2f')}{err}")
    lines.append("ratios: MB/s = pyscsi-target / tgtd; CPU = tgtd CPU s/GB / pyscsi-target CPU s/GB "
                 "(both > 1 when pyscsi-target is ahead)")
    for name, disk in (guest.get("disks") or {}).items():
        lines.append(f"  {name}: {disk}")
    if kern.get("error"):
        lines.append(f"  kernel rows: ERROR {kern['error']}")
    return lines


def chart(result: dict[str, Any], path: Path) -> str | None:
    """Grouped bars of median IOPS per load (log scale) with the ratio written above; returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}); pip install matplotlib"
    rows = result["loads"]
    if not rows:
        return "no libiscsi rows to chart"
    labels = [r["id"] for r in rows]
    av = [r["median"].get(A, {}).get("iops") or 0 for r in rows]
    bv = [r["median"].get(B, {}).get("iops") or 0 for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.1), 5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], av, w, label=A, color="#3572A5")
    ax.bar([i + w / 2 for i in x], bv, w, label=B, color="#999999")
    for i, r in enumerate(rows):
        if r.get("ratio") is not None:
            ax.text(i, max(av[i], bv[i]) * 1.08 + 1, f"{r['ratio']:.2f}x", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median IOPS (log)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    m = result["machine"]
    ax.set_title(f"pyscsi-target vs tgtd, loopback, {m['nproc']} cores {m['cpu_model']} "
                 f"({result['config']['rounds']} rounds x {result['config']['seconds']} s, medians)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
