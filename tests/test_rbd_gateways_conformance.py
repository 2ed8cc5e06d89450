"""libiscsi's persistent-reservation and multipath suites with the two URLs on different gateways
exporting one RBD image: iscsi-test-cu ``ALL.Prin*``, ``ALL.Prout*`` and ``ALL.MultipathIO*`` (libiscsi
1.19 spells the suites PrinReadKeys, ProutRegister...: its -t matching is case-sensitive, so
"ALL.PrIn*" would select nothing).

The first URL is gateway 1's portal, the second gateway 2's, so every "second session" of these
suites (another initiator, another I_T nexus) runs through the other gateway: registrations, the
reservation, its conflicts and the unit attentions must hold across gateways (kept in RADOS).
No test may fail and none may be skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_support import failure_excerpts, log_file, run_testcu
from support import ceph as ceph_support
from support.ceph import CephCluster
from support.gateways import gateways

ceph_cluster = ceph_support.ceph_cluster

MiB = 1 << 20


@pytest.mark.parametrize("suite", ["ALL.Prin*", "ALL.Prout*", "ALL.MultipathIO*"])
def test_testcu_suite_on_two_gateways(suite: str, ceph_cluster: CephCluster, tmp_path: Path) -> None:
    image = ceph_cluster.create_image(64 * MiB)
    try:
        with gateways(ceph_cluster, tmp_path) as gws:
            gws.export(image)
            urls = gws.urls()
            assert urls[0].split("/")[2] != urls[1].split("/")[2]  # two gateways, two portals
            run = run_testcu(urls, suite, log_file(f"testcu-gateways-{suite.split('.')[1].rstrip('*')}"))
            for d in gws.daemons:
                d.assert_clean_log(allow=[r"login rejected \(status 0x0203\) initiator \S+:probe"])
    finally:
        ceph_cluster.remove_image(image)
    print(f"{suite} across two gateways: {run.summary()}")
    assert run.results, f"nothing ran: {run.summary()}"
    bad = run.names("fail") + run.names("skip")
    assert not bad, f"{run.summary()}\n" + failure_excerpts(run, bad)
