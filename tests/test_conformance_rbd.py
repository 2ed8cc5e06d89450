"""libiscsi's suites for what an RBD image does differently from a file, on an RBD extent: COMPARE AND
WRITE (one sector atomic in the OSD, more under the image's lock), WRITE SAME (write-zeroes, thick or
deallocating), UNMAP, GET LBA STATUS (the object map), READ CAPACITY, WRITE ATOMIC, ORWRITE.

LUN 0 keeps the default physical block reporting (8 x 512-byte blocks per 4 KiB: five of these tests
run only then); GET LBA STATUS runs on LUN 1, which reports one logical block per physical block,
because with 8 libiscsi 1.19's GetLBAStatus.UnmapSingle checks a descriptor offset wrongly (the known
defect conformance_support excuses on file LUNs).  The whole ALL suite on an RBD LUN was run by hand
for issue 13: 212 pass, the 16 allowed skips, and only the two known libiscsi defects failing.
"""

from __future__ import annotations

from pathlib import Path

from conformance_support import assert_no_daemon_errors, failure_excerpts, log_file, run_testcu
from support import ceph as ceph_support
from support.ceph import CephCluster
from support.daemon import BASE_IQN, Daemon

ceph_cluster = ceph_support.ceph_cluster

SUITES = "ALL.CompareAndWrite*,ALL.WriteSame1*,ALL.Unmap*,ALL.ReadCapacity1*,ALL.WriteAtomic16*,ALL.OrWrite*"


def test_testcu_rbd_specific_suites(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    images = [ceph_cluster.create_image(128 << 20), ceph_cluster.create_image(64 << 20)]
    d = Daemon(tmp_path / "state", demo=False, extra_args=["--ceph-conf", str(ceph_cluster.conf)]).start()
    try:
        pg = d.rest("GET", "portal/")[0]
        t = d.rest("POST", "target/", {"iscsi_target_name": "conf"})
        d.rest("POST", "targetgroup/", {"iscsi_target": t["id"], "iscsi_target_portalgroup": pg["id"],
                                        "iscsi_target_authtype": "None"})
        for lun, image in enumerate(images):
            e = d.rest("POST", "extent/", {"iscsi_target_extent_type": "RBD", "iscsi_target_extent_name": image.name,
                                           "iscsi_target_extent_path": f"rbd/{image.name}",
                                           "iscsi_target_extent_pblocksize": lun == 1})
            d.rest("POST", "targettoextent/", {"iscsi_target": t["id"], "iscsi_extent": e["id"], "iscsi_lunid": lun})
        url = f"iscsi://{d.portal}/{BASE_IQN}:conf"
        runs = [run_testcu([f"{url}/0"], SUITES, log_file("testcu-rbd")),
                run_testcu([f"{url}/1"], "ALL.GetLBAStatus*", log_file("testcu-rbd-lba-status"))]
        assert_no_daemon_errors(d)
    finally:
        d.stop()
        for image in images:
            ceph_cluster.remove_image(image)
    assert len(runs[0].results) >= 40 and len(runs[1].results) >= 2, [r.summary() for r in runs]
    for run in runs:
        bad = run.names("fail") + run.names("skip")
        assert not bad, f"{run.summary()}\n" + failure_excerpts(run, bad)
