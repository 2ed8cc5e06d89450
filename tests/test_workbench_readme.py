"""The README's three workbench examples, run command for command: each ``readme-example`` block's
lines go through bash against a daemon of their own (its portal put where the README says
127.0.0.1:3260, ``pyscsi-target`` run from this checkout).  Two boot the kernel-initiator guest.

They are also acceptance tests of issue 12: the kernel initiator sees an injected connection drop
during I/O, recovers and the data checks out; an injected CHECK CONDITION on an LBA range appears
in the guest's kernel log with the chosen sense.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemon import ADMIN_PASSWORD, ROOT, Daemon

_BLOCK = re.compile(r"<!-- readme-example: ([\w-]+) -->\n```sh\n(.*?)```", re.S)
GUEST = pytest.mark.skipif(os.geteuid() != 0, reason="the guest image is built with apt-get, which needs root")


def examples() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    return {name: [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
            for name, body in _BLOCK.findall(text)}


def run_example(name: str, d: Daemon, cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYSCSI_TARGET_STATE_DIR": str(d.state_dir), "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "PYTHONPATH": str(ROOT)}
    out = []
    for line in examples()[name]:
        cmd = re.sub(r"(^|\s)pyscsi-target ", rf"\1{sys.executable} -m pyscsi_target ", line)
        cmd = cmd.replace("127.0.0.1:3260", d.portal).replace("PYTHONPATH=tests", f"PYTHONPATH={ROOT}/tests:{ROOT}")
        cmd = cmd.replace(" examples/", f" {ROOT}/examples/").replace("python3 -m support", f"{sys.executable} -m "
                                                                                          "support")
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README example {name}: {line}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n" \
                                  f"{r.stderr[-3000:]}\n--- daemon log\n{d.log_tail(30)}"
        out.append(r)
    return out


def guest_data(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The data records `support.guest run` prints (a JSON object after the summary line)."""
    start = r.stdout.index("{")
    data: dict[str, str] = json.JSONDecoder().raw_decode(r.stdout[start:])[0]
    return data


def test_the_readme_has_the_three_examples() -> None:
    assert set(examples()) == {"drop-during-write", "bad-sector", "libiscsi-login-capture"}


@GUEST
@pytest.mark.interop
def test_drop_during_a_1mib_write_and_open_iscsi_recovers(tmp_path: Path) -> None:
    with Daemon(tmp_path / "state") as d:
        add, guest, log, _rm = run_example("drop-during-write", d, tmp_path)
    assert "fault rule 1 added: drop" in add.stdout
    assert "login=PASS write=PASS readback=PASS" in guest.stdout, guest.stdout  # the MiB read back intact
    assert int(guest_data(guest)["conn_errors"]) >= 1  # iscsi_tcp saw the drop, and recovered
    assert re.search(r"\bdrop\b.*scsi-command.*write=True", log.stdout), log.stdout
    assert "fault #1 drop fired (1/1)" in d.log_text()
    assert len(re.findall(r"Normal session .*test:guest", d.log_text())) >= 2  # it logged in again


@GUEST
@pytest.mark.interop
def test_bad_sector_shows_in_the_guest_kernel_log(tmp_path: Path) -> None:
    with Daemon(tmp_path / "state") as d:
        _add, guest, _rm = run_example("bad-sector", d, tmp_path)
    assert "bad-read=PASS good-read=PASS" in guest.stdout, guest.stdout
    data = guest_data(guest)
    assert data["medium_error"] != "0" and data["unrecovered_read_error"] != "0", data  # the chosen sense
    assert data["critical_sector"] == "2048", data


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark (Debian tshark) opens the capture")
def test_capture_a_libiscsi_login_and_open_it_in_tshark(tmp_path: Path) -> None:
    with Daemon(tmp_path / "state") as d:
        *_, summary, fields = run_example("libiscsi-login-capture", d, tmp_path)
    assert (tmp_path / "login.pcapng").stat().st_size > 0
    assert "Login Command" in summary.stdout and "Login Response (Success)" in summary.stdout, summary.stdout
    assert "Inquiry" in summary.stdout
    rows = [line.split("\t") for line in fields.stdout.splitlines()]
    assert rows and rows[0][0] == "0x03" and "InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi" in rows[0][3]
    assert any(r[0] == "0x23" and "TargetPortalGroupTag=1" in r[3] for r in rows), rows
