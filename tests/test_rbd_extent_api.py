"""RBD extents through the daemon: created, refused and served over the FreeNAS view, and a
qemu-img round trip of random data through the target, byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ceph as ceph_support
from support.ceph import CephCluster
from support.daemon import BASE_IQN, Daemon, RestError
from support.tools import qemu_iscsi, qemu_json, run

ceph_cluster = ceph_support.ceph_cluster

MiB = 1 << 20


@pytest.fixture(scope="module")
def gateway(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("rbd-gw"), demo=False, extra_args=["--ceph-conf", str(ceph_cluster.conf)])
    d.start()
    try:
        yield d
        d.assert_clean_log(allow=[r"job \d+ failed: create RBD extent native2"])
    finally:
        d.stop()


def extent_body(name: str, path: str, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {"iscsi_target_extent_type": "RBD", "iscsi_target_extent_name": name,
                               "iscsi_target_extent_path": path}
    body.update({f"iscsi_target_extent_{k}": v for k, v in fields.items()})
    return body


def refused(d: Daemon, body: dict[str, object]) -> dict[str, list[str]]:
    with pytest.raises(RestError) as e:
        d.rest("POST", "extent/", body)
    assert e.value.status == 400, e.value
    errors: dict[str, list[str]] = json.loads(e.value.body)
    return errors


def export(d: Daemon, name: str, extent_id: int) -> str:
    """Target ``name`` on the daemon's portal group with the extent as LUN 0; returns its IQN."""
    pg = d.rest("GET", "portal/")[0]
    t = d.rest("POST", "target/", {"iscsi_target_name": name})
    d.rest("POST", "targetgroup/", {"iscsi_target": t["id"], "iscsi_target_portalgroup": pg["id"],
                                    "iscsi_target_authtype": "None"})
    d.rest("POST", "targettoextent/", {"iscsi_target": t["id"], "iscsi_extent": extent_id, "iscsi_lunid": 0})
    return f"{BASE_IQN}:{name}"


def test_bad_rbd_extents_are_refused_with_the_reason(gateway: Daemon, ceph_cluster: CephCluster) -> None:
    errs = refused(gateway, extent_body("bad1", "nopool/disk", filesize="8MB"))
    assert "does not exist" in errs["iscsi_target_extent_path"][0] and "nopool" in errs["iscsi_target_extent_path"][0]
    errs = refused(gateway, extent_body("bad2", "rbd/no-such-image"))
    assert "give a size" in errs["iscsi_target_extent_path"][0]
    errs = refused(gateway, extent_body("bad3", "rbd/a@snap", filesize="8MB"))
    assert "pool/image" in errs["iscsi_target_extent_path"][0]
    errs = refused(gateway, extent_body("bad4", "rbd/x", filesize="1000"))
    assert "multiple of block size" in errs["iscsi_target_extent_filesize"][0]
    errs = refused(gateway, extent_body("bad5", "rbd/x", ceph_conf="relative.conf"))
    assert "absolute" in errs["iscsi_target_extent_ceph_conf"][0]
    image = ceph_cluster.create_image(16 * MiB)
    try:
        errs = refused(gateway, extent_body("bad6", f"rbd/{image.name}", filesize="8MB"))
        assert "never shrunk" in errs["iscsi_target_extent_filesize"][0]
    finally:
        ceph_cluster.remove_image(image)
    # nothing was left behind: no extent, no image made for a refused change
    assert not [e for e in gateway.rest("GET", "extent/") if e["iscsi_target_extent_name"].startswith("bad")]
    assert "x" not in ceph_cluster.rbd("ls", "rbd").split()


def test_existing_image_grown_and_new_image_created(gateway: Daemon, ceph_cluster: CephCluster) -> None:
    image = ceph_cluster.create_image(16 * MiB)
    try:
        e = gateway.rest("POST", "extent/", extent_body("grown", f"rbd/{image.name}", filesize="24MB"))
        assert e["iscsi_target_extent_type"] == "RBD" and e["iscsi_target_extent_path"] == f"rbd/{image.name}"
        assert "size 24 MiB" in ceph_cluster.rbd("info", f"rbd/{image.name}")
        new = gateway.rest("POST", "extent/", extent_body("created", "rbd/api-made", filesize="8MB"))
        assert "size 8 MiB" in ceph_cluster.rbd("info", "rbd/api-made")
        gateway.rest("DELETE", f"extent/{e['id']}/")
        gateway.rest("DELETE", f"extent/{new['id']}/")
    finally:
        ceph_cluster.remove_image(image)
    ceph_cluster.rbd("rm", "--no-progress", "rbd/api-made")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_qemu_img_round_trip(gateway: Daemon, ceph_cluster: CephCluster, tmp_path: Path) -> None:
    size = 48 * MiB
    e = gateway.rest("POST", "extent/", extent_body("qemu", "rbd/qemu-rt", filesize=str(size)))
    iqn = export(gateway, "qemu", e["id"])
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    src.write_bytes(os.urandom(size))
    lun = qemu_iscsi(gateway.portal, iqn, 0)
    w = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), qemu_json(lun), timeout=300)
    assert w.returncode == 0, f"write: {w.stderr}"
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", qemu_json(lun, size=size), str(dst), timeout=300)
    assert r.returncode == 0, f"read: {r.stderr}"
    assert sha256(dst) == sha256(src)
    # the data is in the image itself, as any other client reads it
    exported = tmp_path / "exported.raw"
    ceph_cluster.rbd("export", "--no-progress", "rbd/qemu-rt", str(exported), timeout=120)
    assert sha256(exported) == sha256(src)


NATIVE = "/api/pyscsi/v1"


def wait_job(d: Daemon, job: dict[str, object]) -> dict[str, object]:
    for _ in range(200):
        job = d.rest("GET", f"jobs/{job['id']}/", prefix=NATIVE)
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job still running: {job}")


def test_native_api_creates_grows_and_measures_rbd_extents(gateway: Daemon, ceph_cluster: CephCluster) -> None:
    job = gateway.rest("POST", "extents/", {"type": "RBD", "name": "native", "path": "rbd/native-made",
                                            "filesize": "8MB"}, prefix=NATIVE)
    job = wait_job(gateway, job)
    assert job["state"] == "succeeded", job
    extent_id = job["result"]["extent"]  # type: ignore[index]
    job = wait_job(gateway, gateway.rest("POST", f"extents/{extent_id}/resize/", {"filesize": "12MB"},
                                         prefix=NATIVE))
    assert job["state"] == "succeeded", job
    assert "size 12 MiB" in ceph_cluster.rbd("info", "rbd/native-made")
    usage = next(u for u in gateway.rest("GET", "extents/", prefix=NATIVE) if u["id"] == extent_id)
    assert (usage["type"], usage["size"], usage["allocated"], usage["error"]) == ("RBD", 12 * MiB, 0, None)
    # the pool is checked against the cluster by the job, which fails saying why
    job = wait_job(gateway, gateway.rest("POST", "extents/", {"type": "RBD", "name": "native2", "path": "nopool/x",
                                                              "filesize": "8MB"}, prefix=NATIVE))
    assert job["state"] == "failed" and "nopool" in json.dumps(job), job
    with pytest.raises(RestError) as e:  # the syntax at once
        gateway.rest("POST", "extents/", {"type": "RBD", "name": "native3", "path": "x"}, prefix=NATIVE)
    assert e.value.status == 400 and "pool/image" in e.value.body
    gateway.rest("DELETE", f"extent/{extent_id}/")
    ceph_cluster.rbd("rm", "--no-progress", "rbd/native-made")
