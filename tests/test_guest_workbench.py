"""The kernel initiator against a fault the target injects, seen in a capture: a SCSI command
delayed past the initiator's command timeout makes Linux's SCSI error handler send ABORT TASK for
it (after checking the connection with a NOP-Out), the capture of the session shows that TMF
naming the delayed command, and the read completes on retry.  (The README examples cover the
connection drop and the bad sector: tests/test_workbench_readme.py.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.guest import Guest, GuestOptions, UserNetwork
from support.workbench import add_rule, api, download_capture, tshark_fields

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest image is built with apt-get, which needs root"),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark (Debian tshark) reads the capture"),
]

SD_TIMEOUT = 4  # seconds: Linux aborts after two timeouts (the first one pings the connection)
DELAY_MS = 30_000  # well past two timeouts (Linux also waits for its connection check)
LBA = 4096

SCRIPT = rf"""
start_iscsid && iscsi_login "$IQN" "$PORTAL" >/dev/null || {{ step login FAIL "iscsiadm --login"; exit 1; }}
DISK=$(iscsi_disk "$(iscsi_session "$IQN" "$PORTAL")" 0) || {{ step login FAIL "no disk"; exit 1; }}
DISK=${{DISK%% *}}
echo {SD_TIMEOUT} >/sys/block/$DISK/device/timeout
step login PASS "/dev/$DISK, command timeout $(cat /sys/block/$DISK/device/timeout)s"
mark ready
wait_host armed 120 || {{ step read FAIL "no word from the host"; exit 1; }}
begin read
dd if=/dev/$DISK of=/dev/null bs=4096 skip={LBA // 8} count=1 iflag=direct 2>/tmp/dd.err \
  || {{ step read FAIL "$(cat /tmp/dd.err)"; exit 1; }}
step read PASS "the delayed read completed"
"""


def test_a_delay_past_the_timeout_makes_linux_abort_the_task(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state").start()
    try:
        net = UserNetwork([d.portal])
        env = {"IQN": d.iqn, "PORTAL": net.guest_portal(0)}
        with Guest(SCRIPT, net, env=env, options=GuestOptions(timeout=240), run_dir=tmp_path / "guest") as g:
            assert g.wait_for_mark("ready", 200) is not None, g.wait().describe()
            cap = api(d, "POST", "captures/", {"target": "demo"})
            rule = add_rule(d, kind="delay", pdu="scsi-command", opcode=0x28, lba_first=LBA, delay_ms=DELAY_MS,
                            count=1, comment="past the initiator's timeout")
            g.send("armed")
            run = g.wait()
        pcap = download_capture(d, cap["id"], tmp_path / "abort.pcapng")
        fired = api(d, "GET", f"faults/{rule['id']}/")["fired"]
    finally:
        d.stop()
    assert run.ok, f"{run.describe()}\n--- daemon log ---\n{d.log_tail(40)}"
    assert fired == 1
    reads = tshark_fields(pcap, "frame.time_epoch", "iscsi.initiatortasktag", "iscsi.cmdsn",
                          display_filter=f"scsi_sbc.rdwr10.lba == {LBA} && iscsi.opcode == 0x01")
    aborts = tshark_fields(pcap, "frame.time_epoch", "iscsi.taskmanfun.referencedtasktag", "iscsi.refcmdsn",
                           display_filter="iscsi.taskmanfun.function == 1 && iscsi.opcode == 0x02")
    responses = tshark_fields(pcap, "iscsi.initiatortasktag", "iscsi.taskmanfun.response",
                              display_filter="iscsi.opcode == 0x22")
    assert reads and aborts, f"reads {reads}, aborts {aborts}"
    first = reads[0]
    abort = aborts[0]
    # The first ABORT TASK names the delayed READ (its ITT and CmdSN), after the timeout, before the delay ended.
    assert int(abort["iscsi.taskmanfun.referencedtasktag"], 0) == int(first["iscsi.initiatortasktag"], 0)
    assert int(abort["iscsi.refcmdsn"], 0) == int(first["iscsi.cmdsn"], 0)
    waited = float(abort["frame.time_epoch"]) - float(first["frame.time_epoch"])
    assert 2 * SD_TIMEOUT - 1 <= waited < DELAY_MS / 1000, waited
    # The command had not reached the target: "function complete" (RFC 7143 11.5.1), and the retry went through.
    assert any(int(r["iscsi.taskmanfun.response"], 0) == 0 for r in responses), responses
    assert len(reads) >= 2
