"""Short soak (issue 10): 32 sessions of mixed, self-checking I/O for 40 s on 2 LUNs.  Nothing
lost, no error, a clean daemon log, memory flat.  The 10-minute, 256-session campaign runs
outside CI: ``python3 -m bench.soak`` (same load, tests/support/soak.py)."""

from __future__ import annotations

from support.daemon import Daemon
from support.soak import soak


def test_short_soak(daemon: Daemon) -> None:
    daemon.add_luns(1, filesize="64MB")
    assert daemon.proc is not None
    report = soak(daemon.proc.pid, daemon.host, daemon.port, daemon.iqn, sessions=32, seconds=40, luns=2,
                  sample_every=2.0)
    s = report.summary()
    print(s)
    assert not report.counts.errors, report.counts.errors[:10]
    c = report.counts
    assert min(c.ops.values()) > 0 and c.blocks_checked > 0
    assert report.rss_growth_mib() < 32, report.rss_mib  # flat once warm (the heap grows to its working size first)
    daemon.assert_clean_log()
