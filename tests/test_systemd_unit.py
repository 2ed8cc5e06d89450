"""examples/pyscsi-target.service: systemd accepts it, and its sandbox stays tight."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).parents[1] / "examples" / "pyscsi-target.service"
SHIPPED_BINARY = "pyscsi-target"  # systemd resolves a bare name in its search path


def _unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart's command replaced by this machine's console script: verify
    checks that the binary exists, and where pip put it is the one thing that varies."""
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_BINARY} serve" in text
    binary = shutil.which("pyscsi-target") or sys.executable
    out = tmp_path / "pyscsi-target.service"
    out.write_text(text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={binary} "))
    return out


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = _unit_here(tmp_path)
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pyscsi-target.service" not in run.stderr, run.stderr  # no warning about our unit


def test_unit_settings_and_exposure(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ProtectSystem"] == "strict"
    assert "/var/lib/pyscsi-target" in settings["ReadWritePaths"]
    assert settings["DeviceAllow"] == "block-* rw" and settings["CapabilityBoundingSet"] == ""
    assert int(settings["LimitNOFILE"]) >= 16384
    assert settings["WatchdogSec"]
    run = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_unit_here(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout + run.stderr)
    assert m is not None, run.stdout + run.stderr
    assert float(m.group(1)) <= 2.5, run.stdout  # systemd calls up to 3.9 "OK"; it was 1.8 when written
