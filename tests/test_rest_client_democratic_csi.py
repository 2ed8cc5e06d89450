"""democratic-csi 1.9.0's ``freenas-iscsi`` driver, its HTTP requests replayed.

The driver cannot be installed in CI, so its HTTP side is ported here request for request
from democratic-csi/democratic-csi at tag v1.9.0:

- ``src/driver/freenas/http/index.js`` ``Client``: base ``/api/v1.0`` or ``/api/v2.0``, a
  ``/`` appended to every v1 endpoint, HTTP Basic, every status below 500 handed back;
- ``src/driver/freenas/ssh.js``: ``getSystemVersion``/``getApiVersion``/
  ``getSystemVersionMajorMinor`` (the probe), ``createShare`` (CreateVolume),
  ``expandVolume`` (ControllerExpandVolume), ``deleteShare`` (DeleteVolume) and
  ``findResourceByProperties`` (the lookups of the retry-on-409 paths).

Its ZFS side (creating the zvol, keeping the asset ids in ZFS user properties) runs over
SSH; here a loop device at ``/dev/zvol/...`` stands for the zvol and a dict for the
properties, so that retries see exactly what the driver would have recorded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.freenas_pool import FakePool
from support.net import free_port
from support.rest_harness import Harness, aio, harness, run_tool

TARGET_ID = "democratic-csi:freenas_iscsi_target_id"
EXTENT_ID = "democratic-csi:freenas_iscsi_extent_id"
TTE_ID = "democratic-csi:freenas_iscsi_targettoextent_id"
ASSETS_NAME = "democratic-csi:freenas_iscsi_assets_name"

# examples/freenas-iscsi.yaml at v1.9.0: one target group on portal 1 and initiator group 1,
# auth type None, no auth group; extent defaults of createShare.
TARGET_GROUPS = [{"targetGroupPortalGroup": 1, "targetGroupInitiatorGroup": 1, "targetGroupAuthType": "None",
                  "targetGroupAuthGroup": None}]


class DriverError(Exception):
    """What the driver throws (a GrpcError UNKNOWN): the CSI call fails and is retried later."""


class DemocraticCsi:
    """The HTTP side of ``FreeNASSshDriver`` (freenas-iscsi), as v1.9.0 sends it."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.api_version = 2  # Client's default until getApiVersion() says otherwise
        self.requests: list[tuple[str, str]] = []

    async def call(
        self, method: str, endpoint: str, data: Any = None, params: dict[str, int] | None = None
    ) -> tuple[int, Any]:
        # http/index.js: v1 endpoints get a trailing "/"; axios sends params in insertion order.
        if self.api_version == 1 and not endpoint.endswith("/"):
            endpoint += "/"
        path = ("/api/v1.0" if self.api_version == 1 else "/api/v2.0") + endpoint
        if params:
            path += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        self.requests.append((method, path))
        raw = None if data is None else json.dumps(data)
        status, body, _ = await self.h.call(method, path, raw=raw, headers={"Accept": "application/json"})
        assert status < 500, (method, path, status, body)  # validateStatus: >= 500 is an exception
        return status, body

    # --- ssh.js getSystemVersion / getApiVersion / getSystemVersionMajorMinor ------------------

    async def system_version(self) -> dict[str, Any]:
        start = self.api_version
        self.api_version = 2
        status, body = await self.call("GET", "/system/version/")
        if status == 200:
            self.api_version = start
            return {"v2": body}
        self.api_version = 1
        status, body = await self.call("GET", "/system/version/")
        # IsJsonString(response.body): axios has parsed the JSON already, so an object fails.
        if status == 200 and isinstance(body, str):
            self.api_version = start
            return {"v1": body}
        raise DriverError(f"FreeNAS error getting system version info: {status} {body}")

    @staticmethod
    def major_minor(info: dict[str, Any]) -> str:
        version = info["v2"] if info.get("v2") else info["v1"]["fullversion"]
        parts = [re.sub(r"[^\d.]", "", p) for p in version.split("-")]
        return ".".join(".".join(p for p in parts if p).split(".")[:2])

    async def detect_api_version(self) -> int:
        info = await self.system_version()
        if info.get("v2"):
            return 1 if self.major_minor(info) == "11.2" else 2
        return 1 if info.get("v1") else 2

    # --- ssh.js findResourceByProperties -------------------------------------------------------

    async def find(self, endpoint: str, match: dict[str, Any]) -> dict[str, Any] | None:
        page, last = 0, None
        while True:
            status, body = await self.call("GET", endpoint, params={"limit": 100, "offset": 100 * page})
            if last is not None and last == body:
                return None
            last = body
            if status != 200:
                raise DriverError(f"FreeNAS http error - code: {status} body: {body}")
            if len(body) < 1:
                return None
            for item in body:
                if all(item.get(k) == v for k, v in match.items()):
                    return item  # type: ignore[no-any-return]
            page += 1

    # --- ssh.js createShare, case "iscsi", apiVersion 1 ----------------------------------------

    async def create_share(self, props: dict[str, Any], iscsi_name: str, disk: str) -> dict[str, Any]:
        status, body = await self.call("GET", "/services/iscsi/globalconfiguration")
        if status != 200:
            raise DriverError(f"error getting iscsi configuration - code: {status}")
        basename = body["iscsi_basename"]
        if props.get(TTE_ID) is None:
            status, target = await self.call(
                "POST", "/services/iscsi/target", {"iscsi_target_name": iscsi_name, "iscsi_target_alias": ""}
            )
            if status != 201:
                if status == 409 and "Target name already exists" in json.dumps(target):
                    target = await self.find("/services/iscsi/target", {"iscsi_target_name": iscsi_name})
                else:
                    raise DriverError(f"received error creating iscsi target - code: {status} body: {target}")
            if not target or target["iscsi_target_name"] != iscsi_name:
                raise DriverError("mismatch name error creating iscsi target")
            props[TARGET_ID] = target["id"]
            for cfg in TARGET_GROUPS:
                group = {
                    "iscsi_target": target["id"],
                    "iscsi_target_authgroup": cfg["targetGroupAuthGroup"],
                    "iscsi_target_authtype": cfg["targetGroupAuthType"] or "None",
                    "iscsi_target_portalgroup": cfg["targetGroupPortalGroup"],
                    "iscsi_target_initiatorgroup": cfg["targetGroupInitiatorGroup"],
                    "iscsi_target_initialdigest": "Auto",
                }
                status, made = await self.call("POST", "/services/iscsi/targetgroup", group)
                if status != 201:
                    if status == 404 or (status == 409 and "cannot be duplicated on a target" in json.dumps(made)):
                        made = await self.find(
                            "/services/iscsi/targetgroup",
                            {
                                "iscsi_target": target["id"],
                                "iscsi_target_portalgroup": cfg["targetGroupPortalGroup"],
                                "iscsi_target_initiatorgroup": cfg["targetGroupInitiatorGroup"],
                            },
                        )
                    else:
                        raise DriverError(f"received error creating iscsi targetgroup - code: {status} body: {made}")
                if not made:
                    raise DriverError("unknown error creating iscsi targetgroup")
            extent = {
                "iscsi_target_extent_comment": "",
                "iscsi_target_extent_type": "Disk",
                "iscsi_target_extent_name": iscsi_name,
                "iscsi_target_extent_insecure_tpc": True,
                "iscsi_target_extent_disk": disk,
                "iscsi_target_extent_xen": False,
                "iscsi_target_extent_avail_threshold": None,  # extentAvailThreshold 0 -> null
                "iscsi_target_extent_blocksize": 512,
                "iscsi_target_extent_pblocksize": True,
                "iscsi_target_extent_rpm": "SSD",
                "iscsi_target_extent_ro": False,
            }
            status, made = await self.call("POST", "/services/iscsi/extent", extent)
            if status != 201:
                if status == 409 and "Extent name must be unique" in json.dumps(made):
                    made = await self.find("/services/iscsi/extent", {"iscsi_target_extent_name": iscsi_name})
                else:
                    raise DriverError(f"received error creating iscsi extent - code: {status} body: {made}")
            if not made or made["iscsi_target_extent_name"] != iscsi_name:
                raise DriverError("mismatch name error creating iscsi extent")
            props[EXTENT_ID] = made["id"]
            tte = {"iscsi_target": target["id"], "iscsi_extent": made["id"], "iscsi_lunid": 0}
            status, link = await self.call("POST", "/services/iscsi/targettoextent", tte)
            if status != 201:
                text = json.dumps(link)
                known = ("Extent is already in this target.", "LUN ID is already being used for this target.")
                if status == 409 and any(msg in text for msg in known):
                    link = await self.find("/services/iscsi/targettoextent", tte)
                else:
                    raise DriverError(f"received error creating iscsi targettoextent - code: {status} body: {link}")
            if not link:
                raise DriverError("unknown error creating iscsi targettoextent")
            props[TTE_ID] = link["id"]
        props[ASSETS_NAME] = iscsi_name
        return {"iqn": f"{basename}:{iscsi_name}", "lun": 0}

    # --- ssh.js deleteShare, case "iscsi", apiVersion 1 ----------------------------------------

    async def delete_share(self, props: dict[str, Any]) -> None:
        name = props.get(ASSETS_NAME)
        for key, endpoint, name_field in (
            (TARGET_ID, "/services/iscsi/target/", "iscsi_target_name"),
            (EXTENT_ID, "/services/iscsi/extent/", "iscsi_target_extent_name"),
        ):
            if props.get(key) is None:
                continue
            endpoint += str(props[key])
            status, body = await self.call("GET", endpoint)
            if status in (404, 500):
                continue  # "assume is gone for now"
            if name is not None and body[name_field] != name:
                continue  # the id was re-used by someone else: left alone
            status, body = await self.call("DELETE", endpoint)
            # The in-use retry loop waits for v2's 422 "Target ... is in use" (errno 14) only.
            if status not in (200, 204):
                raise DriverError(f"received error deleting - code: {status} body: {body}")
            del props[key]  # zfs inherit: the property goes once the asset is gone


async def _admin_setup(h: Harness) -> None:
    """What the driver's configuration points at: initiator group 1 (portal 1 exists)."""
    body = {"iscsi_target_initiator_initiators": "ALL", "iscsi_target_initiator_auth_network": "127.0.0.0/8"}
    status, made, _ = await h.call("POST", "/api/v1.0/services/iscsi/authorizedinitiator/", body)
    assert status == 201 and made["id"] == 1


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_probe_create_expand_delete_and_retries(tmp_path: Path, real: bool) -> None:
    portal = f"127.0.0.1:{free_port()}"
    with FakePool(tmp_path) as pool:
        async with harness(tmp_path / "state", portals=(portal,), real_engine=real) as h:
            await _admin_setup(h)
            driver = DemocraticCsi(h)

            # Probe: /api/v2.0/system/version/ answers a FreeNAS 11.2 string -> the v1.0 API.
            info = await driver.system_version()
            assert info == {"v2": "FreeNAS-11.2-U8"} and driver.major_minor(info) == "11.2"
            driver.api_version = await driver.detect_api_version()
            assert driver.api_version == 1
            assert driver.requests[0] == ("GET", "/api/v2.0/system/version/")

            # CreateVolume: target, target group, extent, LUN 0, every POST answered 201.
            dataset = "k8s/b/vols/pvc-1"
            disk = pool.zvol(dataset, 8 << 20)
            name = "csi-pvc-1-clustera"
            props: dict[str, Any] = {}
            driver.requests.clear()
            context = await driver.create_share(props, name, disk)
            assert context == {"iqn": f"iqn.2026-11.org.pyscsi-target:{name}", "lun": 0}
            assert [m for m, _ in driver.requests] == ["GET", "POST", "POST", "POST", "POST"]
            status, extent, _ = await h.call("GET", f"/api/v1.0/services/iscsi/extent/{props[EXTENT_ID]}/")
            assert extent["iscsi_target_extent_type"] == "ZVOL"  # "after save Disk becomes ZVOL"
            assert extent["iscsi_target_extent_path"] == f"/dev/{disk}"
            if real:
                url = f"iscsi://{portal}/{context['iqn']}/0"
                rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
                assert rc == 0 and out.strip() == str(8 << 20), out

            # CreateVolume again, as after a crash before the last ZFS property was written:
            # every POST gets FreeNAS's 409 and the driver finds the asset it made.
            done = dict(props)
            del props[TTE_ID]
            driver.requests.clear()
            assert await driver.create_share(props, name, disk) == context
            assert props == done
            posts = [p for m, p in driver.requests if m == "POST"]
            assert len(posts) == 4 and len([p for m, p in driver.requests if "limit=100&offset=0" in p]) == 4

            # ControllerExpandVolume (apiVersion 1, not SCALE): `zfs set volsize` and `ctld reload`
            # over SSH, no HTTP request at all (ssh.js expandVolume).
            driver.requests.clear()
            pool.resize(dataset, 16 << 20)
            assert driver.requests == []
            if real:  # the node's rescan (READ CAPACITY) sees the grown zvol, no reload needed
                rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
                assert rc == 0 and out.strip() == str(16 << 20), out

            # DeleteVolume: GET + DELETE of the target (its groups and LUN go with it), then of the
            # extent (the zvol stays: the driver destroys it with zfs).
            if not real:
                h.engine.sessions[props[TARGET_ID]] = 1  # a node still logged in
                with pytest.raises(DriverError, match="409"):
                    await driver.delete_share(props)
                h.engine.sessions.clear()
            kept = dict(props)
            driver.requests.clear()
            await driver.delete_share(props)
            assert [m for m, _ in driver.requests] == ["GET", "DELETE", "GET", "DELETE"]
            assert TARGET_ID not in props and EXTENT_ID not in props
            model = h.service.model
            assert not model.targets and not model.extents and not model.target_groups and not model.lun_maps
            # DeleteVolume retried with the ids still recorded: both GETs are 404, "gone".
            driver.requests.clear()
            await driver.delete_share(kept)
            assert [m for m, _ in driver.requests] == ["GET", "GET"]
            if real:
                rc, out = await run_tool("iscsi-ls", f"iscsi://{portal}")
                assert name not in out, out


@aio
async def test_create_retry_after_a_partial_create(tmp_path: Path) -> None:
    """CreateVolume failed after the target and its group were made (the extent POST never
    arrived): the retry's target and group POSTs get 409 and find them; the rest is made."""
    with FakePool(tmp_path) as pool:
        async with harness(tmp_path / "state") as h:
            await _admin_setup(h)
            driver = DemocraticCsi(h)
            driver.api_version = await driver.detect_api_version()
            name, disk = "csi-pvc-2", pool.zvol("vols/pvc-2", 4 << 20)
            target = {"iscsi_target_name": name, "iscsi_target_alias": ""}
            status, made, _ = await h.call("POST", "/api/v1.0/services/iscsi/target/", target)
            group = {"iscsi_target": made["id"], "iscsi_target_portalgroup": 1, "iscsi_target_initiatorgroup": 1}
            assert (await h.call("POST", "/api/v1.0/services/iscsi/targetgroup/", group))[0] == 201
            props: dict[str, Any] = {TARGET_ID: made["id"]}
            driver.requests.clear()
            await driver.create_share(props, name, disk)
            statuses = [p for _, p in driver.requests]
            assert statuses.count("/api/v1.0/services/iscsi/target/?limit=100&offset=0") == 1
            assert statuses.count("/api/v1.0/services/iscsi/targetgroup/?limit=100&offset=0") == 1
            model = h.service.model
            assert len(model.targets) == 1 and len(model.target_groups) == 1 and len(model.lun_maps) == 1
            assert props[TTE_ID] in model.lun_maps
