"""The guest harness booted: what tests of the kernel initiator rely on beyond the interop flow.

- a script that overruns its time limit is stopped by the guest's watchdog, and what it reported
  before comes back, with the step it was in;
- the host can wait for a mark of the guest, kill and restart the target on the same portal, tell
  the guest, and the kernel initiator reconnects (issues 10 and 12 build on this).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.guest import Guest, GuestOptions, UserNetwork, run_guest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest image is built with apt-get, which needs root"),
]


def test_a_script_over_its_time_limit_is_stopped_and_its_records_come_back(tmp_path: Path) -> None:
    script = "begin fast\nstep fast PASS\ndata before 1\nbegin slow\nsay sleeping\nsleep 600\nstep slow PASS\n"
    run = run_guest(script, None, options=GuestOptions(timeout=12), run_dir=tmp_path / "guest")
    assert run.timed_out and not run.host_killed, run.describe()
    assert run.timeout_step == "slow" and run.exit_status is None and not run.ok
    assert run.steps["fast"].status == "PASS" and "slow" not in run.steps and run.data == {"before": "1"}
    assert "guest: sleeping" in run.console and "time limit 12s" in run.console
    assert "Run /init as init process" in run.dmesg  # the kernel log from the start of the boot
    assert run.seconds < 12 + 60


RECONNECT = r"""
start_iscsid
begin login
iscsi_login "$IQN" "$PORTAL" || { step login FAIL "iscsiadm --login"; exit 1; }
SESS=$(iscsi_session "$IQN" "$PORTAL")
DISK=$(iscsi_disk "$SESS" 0) || { step login FAIL "no disk"; exit 1; }
DISK=${DISK%% *}
step login PASS "session $SESS, /dev/$DISK"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
begin before
dd if=/tmp/pattern of=/dev/$DISK bs=1M count=4 oflag=direct 2>/dev/null
step before PASS "4 MiB written"
mark written
wait_host restarted 120 || { step after FAIL "no word from the host"; exit 1; }
begin after
# This I/O waits in the initiator until it has reconnected to the restarted target.
dd if=/tmp/pattern of=/dev/$DISK bs=1M skip=4 seek=4 count=4 oflag=direct 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
check data "$(sha256sum </tmp/pattern)" "$(dd if=/dev/$DISK bs=1M count=8 iflag=direct 2>/dev/null | sha256sum)" \
  || exit 1
step after PASS "4 more MiB after the restart; all 8 MiB read back"
"""


def test_guest_initiator_reconnects_to_a_killed_and_restarted_target(tmp_path: Path) -> None:
    """The harness contract issues 10 and 12 build on: the host waits for a mark of the guest, kills the
    target (SIGKILL) and starts it again on the same portal, tells the guest, and the kernel initiator's
    I/O carries on through a new connection to the same forwarded address."""
    d = Daemon(tmp_path / "state").start()
    try:
        net = UserNetwork([d.portal])
        env = {"IQN": d.iqn, "PORTAL": net.guest_portal(0)}
        with Guest(RECONNECT, net, env=env, options=GuestOptions(timeout=240), run_dir=tmp_path / "guest") as g:
            assert g.wait_for_mark("written", 200) is not None, g.wait().describe()
            assert d.proc is not None
            os.kill(d.proc.pid, signal.SIGKILL)
            assert d.stop() == -signal.SIGKILL
            mark = d.log_mark()
            d.start()
            g.send("restarted")
            run = g.wait()
    finally:
        d.stop()
    assert run.ok, f"{run.describe()}\n--- daemon log ---\n{d.log_tail(40)}"
    assert "detected conn error" in run.dmesg, run.dmesg[-2000:]
    assert not d.errors_since(mark)
