"""WRITEs whose data never comes cannot exhaust the daemon's memory (issue 10, defect 1).

The issue's attack: six unauthenticated sessions on the demo target, each with four 64 MiB
WRITEs whose data never arrives.  Before the fix each pinned a zero-filled 64 MiB buffer
(RSS 1.6 GB); now a command reserves its length from the daemon-wide budget (the rest get
TASK SET FULL) and its memory is allocated only as its data arrives.  A well-behaved session
still writes, and reads back, while the attackers hold their reservations.  A second attack
sends all of each burst but its last PDU, so the reserved memory is really used: what the
daemon holds stays within the budget's ceiling.
"""

from __future__ import annotations

import time

from support import rawclient as R
from support.attacks import dataless_writes, process_rss
from support.daemon import Daemon

MiB = 1 << 20
TASK_SET_FULL = 0x28


def good_session_writes(d: Daemon, lba: int, blocks: int, queue: int) -> None:
    """``queue`` WRITEs of ``blocks`` blocks in flight at once, then every one read back."""
    c = R.login_session(d.host, d.port, d.iqn)
    try:
        datas = [bytes([i + 1]) * blocks * 512 for i in range(queue)]
        results = c.scsi_many([(R.write10(lba + i * blocks, blocks), 0, data) for i, data in enumerate(datas)])
        assert [r.status for r in results] == [0] * queue, results
        for i, data in enumerate(datas):
            assert c.scsi(R.read10(lba + i * blocks, blocks), read_len=len(data)).data == data
        c.logout()
    finally:
        c.close()


def test_dataless_writes_cost_no_memory_and_a_good_session_keeps_writing(daemon: Daemon) -> None:
    assert daemon.proc is not None
    time.sleep(0.3)
    before = process_rss(daemon.proc.pid)
    attack = dataless_writes(daemon.host, daemon.port, daemon.iqn, sessions=6, writes=4, size=64 * MiB)
    try:
        assert attack.r2ts + len(attack.statuses) == 24
        assert attack.statuses and set(attack.statuses) == {TASK_SET_FULL}  # beyond the budget
        time.sleep(0.5)
        during = process_rss(daemon.proc.pid)
        assert during < 512 * MiB, f"RSS {during >> 20} MiB under the attack"
        assert during - before < 64 * MiB, f"RSS grew {(during - before) >> 20} MiB for data never sent"
        # 16 x 1 MiB in flight: the guaranteed share of a session while the attackers hold the rest.
        good_session_writes(daemon, 0, 2048, 16)
    finally:
        attack.close()
    daemon.assert_clean_log()


def test_partly_sent_writes_stay_within_the_budget(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(extra_args=["--write-buffer-budget", "64MB"])
    time.sleep(0.3)
    before = process_rss(d.proc.pid)
    attack = dataless_writes(d.host, d.port, d.iqn, sessions=6, writes=4, size=16 * MiB, almost_all_data=True,
                             timeout=60, settle=2)
    try:
        time.sleep(0.5)
        grown = process_rss(d.proc.pid) - before
        # Reservations stay within 1.5 x the budget (the floors of late sessions come on top of
        # what the first ones borrowed); unbounded, the 24 commands would hold 384 MiB.
        assert grown < 96 * MiB + 16 * MiB, f"RSS grew {grown >> 20} MiB"
        assert TASK_SET_FULL in attack.statuses
        good_session_writes(d, 0, 256, 8)
    finally:
        attack.close()
    d.assert_clean_log()
