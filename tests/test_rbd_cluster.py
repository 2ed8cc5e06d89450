"""The test cluster helper itself: a daemon that dies at start-up is reported with its log, and
nothing is left running."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.ceph import CephCluster, CephStartError, have_ceph


class BrokenMonCluster(CephCluster):
    """The monitor's store vanishes between mkfs and start: ceph-mon exits at once."""

    def _spawn(self, name: str, *args: str) -> None:
        if name == "mon.a":
            shutil.rmtree(self.root / "mon.a")
            (self.root / "mon.a").mkdir()
        super()._spawn(name, *args)


def test_a_daemon_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    if have_ceph():
        pytest.skip(f"Ceph tools missing: {have_ceph()}")
    cluster = BrokenMonCluster(tmp_path)
    with pytest.raises(CephStartError) as e:
        cluster.start()
    msg = str(e.value)
    assert "mon.a exited" in msg and str(tmp_path / "log" / "mon.a.log") in msg
    assert cluster.procs == {}  # stopped and reaped
