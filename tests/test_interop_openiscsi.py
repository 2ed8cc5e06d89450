"""The Linux kernel initiator (iscsi_tcp + open-iscsi 2.1.8 in a qemu guest) against the daemon.

Each mode starts pyscsi-target with a fresh state dir, configures it through the REST API,
runs ../shared/interop/open-iscsi-vm.sh (discovery, login, negotiated parameters,
INQUIRY/size, O_DIRECT write, read-back checksums, mkfs.ext4+fsck, logout) and asserts the
single ``OPEN-ISCSI-INTEROP: PASS`` line and a daemon log without WARNING/ERROR lines.
A guest run takes 15-60 s under TCG; the 256 MiB run a few minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.daemon import Daemon

HARNESS = Path(os.environ.get("PYSCSI_INTEROP_HARNESS", "/work/shared/interop/open-iscsi-vm.sh"))
USER, SECRET = "vm-initiator", "vmsecret-123456"
PEER, PEER_SECRET = "pyscsi-target", "tgtsecret-65432"
PASS_RE = re.compile(r"^OPEN-ISCSI-INTEROP: (PASS|FAIL) steps=(\d+)/(\d+).*$", re.M)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not HARNESS.exists(), reason=f"open-iscsi guest harness not found at {HARNESS} "
                       "(set PYSCSI_INTEROP_HARNESS)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the open-iscsi guest harness runs as root"),
]


@dataclass
class Mode:
    name: str
    args: list[str] = field(default_factory=list)
    auth: str = "None"  # demo target's auth type
    discovery_chap: bool = False
    luns: list[tuple[int, int, int]] | None = None  # a separate target with these LUNs, else demo
    timeout: int = 300


MODES = [
    Mode("no-auth"),
    Mode("chap", ["-u", USER, "-p", SECRET], auth="CHAP"),
    Mode("mutual-chap", ["-u", USER, "-p", SECRET, "-U", PEER, "-P", PEER_SECRET], auth="CHAP Mutual"),
    Mode("discovery-chap", ["-u", USER, "-p", SECRET, "-C"], auth="CHAP", discovery_chap=True),
    Mode("digests-crc32c", ["-d", "CRC32C"]),
    Mode("block-4096", luns=[(0, 256 << 20, 4096)]),
    Mode("three-luns-lun2", ["-l", "2"], luns=[(0, 64 << 20, 512), (1, 64 << 20, 512), (2, 128 << 20, 512)]),
    Mode("data-256mib", ["-s", "256", "-t", "900"], timeout=900),
]


def configure(d: Daemon, mode: Mode) -> list[str]:
    """REST configuration for ``mode``; returns extra harness arguments (target IQN)."""
    extra: list[str] = []
    if mode.auth != "None" or mode.discovery_chap:
        d.add_auth(1, USER, SECRET, PEER, PEER_SECRET)
    if mode.auth != "None":
        d.set_target_auth("demo", mode.auth, 1)
    if mode.discovery_chap:
        d.set_discovery_auth("CHAP", 1)
    if mode.luns:
        iqn = d.add_target(mode.name, luns=mode.luns)
        extra += ["-T", iqn]
    return extra


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_open_iscsi_guest(mode: Mode, tmp_path: Path, record_property) -> None:
    d = Daemon(tmp_path / "state").start()
    try:
        extra = configure(d, mode)
        mark = d.log_mark()  # configuration is done: from here on only the guest's traffic
        cmd = [str(HARNESS), "-a", d.portal, *extra, *mode.args]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=mode.timeout + 120,
                           env={**os.environ, "VMTEST_RUNDIR": str(tmp_path / "runs")})
        took = time.monotonic() - t0
    finally:
        rc = d.stop()
    out = r.stdout + r.stderr
    (tmp_path / "harness.log").write_text(out)
    m = PASS_RE.search(out)
    line = m.group(0) if m else "(no result line)"
    record_property("result_line", line)
    record_property("seconds", round(took, 1))
    print(f"\n[{mode.name}] {line} ({took:.1f}s)")
    steps = "\n".join(ln for ln in out.splitlines() if "STEP" in ln or "negotiated" in ln)
    assert m and m.group(1) == "PASS" and m.group(2) == m.group(3), (
        f"{mode.name}: {line}\n{steps}\n--- harness tail ---\n{out[-3000:]}\n--- daemon log ---\n{d.log_tail(60)}")
    assert r.returncode == 0
    assert rc == 0, f"daemon exit status {rc} after SIGTERM"
    d.assert_clean_log(since=mark)
    if mode.name == "three-luns-lun2":
        assert "(LUN 2)" in steps, steps
    if mode.name == "block-4096":
        assert "lbs=4096" in steps, steps
    if mode.name == "digests-crc32c":
        assert "digests header=CRC32C data=CRC32C" in steps, steps

