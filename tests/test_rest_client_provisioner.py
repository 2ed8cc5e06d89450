"""travisghansen/freenas-iscsi-provisioner: the storage resources it needs are not served.

Its Provision (``provisioner/provisioner.go``) first reads the iSCSI global configuration
(``freenas/iscsi_config.go``), then the parent dataset (``freenas/dataset.go`` ``Get``:
``GET /api/v1.0/storage/dataset/<name>/``, an error unless 200), and only then creates a zvol,
a target, a target group, an extent and a LUN.  The storage API is not served (see
rest/README.md, "Clients"), so the provisioner stops at the dataset, before creating anything.
"""

from __future__ import annotations

from pathlib import Path

from support.rest_harness import aio, harness


@aio
async def test_provision_stops_before_creating_anything(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, _ = await h.call("GET", "/api/v1.0/services/iscsi/globalconfiguration/")
        assert status == 200 and body["iscsi_basename"]
        status, body, headers = await h.call("GET", "/api/v1.0/storage/dataset/tank/")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        for path in ("/api/v1.0/storage/volume/tank/zvols/", "/api/v1.0/storage/dataset/tank/"):
            assert (await h.call("POST", path, {"name": "pvc-1", "volsize": "1 GiB"}))[0] in (404, 405)
        model = h.service.model
        assert not model.targets and not model.extents and not model.target_groups
