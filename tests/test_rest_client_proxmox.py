"""freenas-proxmox (stable-5), its requests replayed against the FreeNAS v1.0 API.

Ported request for request from TheGrandWazoo/freenas-proxmox
``stable-5/perl5/PVE/Storage/LunCmd/FreeNAS.pm`` (the LunCmd written for API v1.0, used by
Proxmox's ZFS-over-iSCSI storage): ``freenas_api_call`` (a GET of ``/api/v1.0/system/version/``
before every request, which must be 200), ``run_create_lu``, ``run_list_lu``/``run_list_view``/
``run_list_extent``, ``run_modify_lu`` (a resize: the LUN is deleted and created again) and
``run_delete_lu``, with the status codes they test (201 for a POST, 204 for a DELETE).

The zvol itself is made by Proxmox over SSH with zfs; here a loop device at
``/dev/zvol/<pool>/...`` stands for it.  The master branch's v1.0 path deletes the extent
before the mapping, so its mapping DELETE finds nothing: real FreeNAS answered 404 there and
so do we (``test_a_mapping_that_is_gone_is_404``).
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

API = "/api/v1.0"
MAX_LUNS = 255


class LunCmdError(Exception):
    """A Perl ``die`` of the LunCmd."""


class FreeNASLunCmd:
    """``PVE::Storage::LunCmd::FreeNAS`` (stable-5), for one storage configuration."""

    def __init__(self, h: Harness, scfg: dict[str, str]) -> None:
        self.h = h
        self.scfg = scfg
        self.requests: list[tuple[str, str]] = []

    async def api_call(self, method: str, path: str, data: Any = None) -> tuple[int, Any]:
        self.requests.append(("GET", f"{API}/system/version/"))
        status, _, _ = await self.h.call("GET", f"{API}/system/version/")
        if status != 200:
            raise LunCmdError(f"Unable to connect to the FreeNAS API service (HTTP {status})")
        self.requests.append((method, path))
        raw = None if data is None else json.dumps(data)  # encode_json; Content-Type set on every call
        status, body, _ = await self.h.call(method, path, raw=raw, headers={"Content-Type": "application/json"})
        return status, body

    async def _list(self, res: str) -> list[dict[str, Any]] | None:
        status, body = await self.api_call("GET", f"{API}/services/iscsi/{res}/?limit=0")
        return body if status == 200 else None  # type: ignore[no-any-return]

    async def get_targetid(self) -> int | None:
        status, glob = await self.api_call("GET", f"{API}/services/iscsi/globalconfiguration/")
        targets = await self._list("target") or []
        for t in targets:
            if f"{glob['iscsi_basename']}:{t['iscsi_target_name']}" == self.scfg["target"]:
                return t["id"]  # type: ignore[no-any-return]
        return None

    async def get_target_to_extent(self) -> list[dict[str, Any]]:
        result = await self._list("targettoextent") or []
        for item in result:
            if item.get("iscsi_lunid") is None:  # "Auto" in FreeNAS 11.1: taken as 0
                item["iscsi_lunid"] = 0
        return result

    async def list_lu(self) -> list[dict[str, Any]]:
        await self._list("target")
        target_id = await self.get_targetid()
        luns = []
        if target_id is not None:
            links = await self.get_target_to_extent()
            extents = await self._list("extent") or []
            for item in links:
                if item["iscsi_target"] != target_id:
                    continue
                for node in extents:
                    if node["id"] == item["iscsi_extent"]:
                        m = re.match(r"(\d+)", str(item["iscsi_lunid"]))
                        if not m:
                            continue
                        node["iscsi_lunid"] = m.group(1)
                        luns.append(node)
        return luns

    async def first_available_lunid(self) -> int:
        target_id = await self.get_targetid()
        luns = sorted(i["iscsi_lunid"] for i in await self.get_target_to_extent() if i["iscsi_target"] == target_id)
        lun_id = 0
        for lun in luns:
            if lun != lun_id:
                break
            lun_id += 1
        return lun_id

    # --- run_lun_command methods ---------------------------------------------------------

    async def run_list_lu(self, lun_path: str, value: str = "name") -> str | None:
        for lun in await self.list_lu():
            if re.match(f"^{lun_path}$", lun["iscsi_target_extent_path"]):
                return lun["iscsi_lunid"] if value == "lun-id" else lun["iscsi_target_extent_path"]  # type: ignore[no-any-return]
        return None

    async def run_list_extent(self, lun_path: str) -> str | None:
        for lun in await self.list_lu():
            if re.match(f"^{lun_path}$", lun["iscsi_target_extent_path"]):
                return lun["iscsi_target_extent_naa"]  # type: ignore[no-any-return]
        return None

    async def run_create_lu(self, lun_path: str) -> None:
        lun_id = await self.first_available_lunid()
        if lun_id >= MAX_LUNS:
            raise LunCmdError(f"Maximum number of LUNs per target is {MAX_LUNS}")
        if await self.run_list_lu(lun_path) is not None:
            raise LunCmdError(f"{lun_path}: LUN {lun_path} exists")
        target_id = await self.get_targetid()
        if target_id is None:
            raise LunCmdError(f"Unable to find the target id for {self.scfg['target']}")
        request = {
            "iscsi_target_extent_type": "Disk",
            "iscsi_target_extent_name": self.scfg["pool"] + "/" + lun_path.rsplit("/", 1)[-1],
            "iscsi_target_extent_disk": lun_path.removeprefix("/dev/"),
        }
        status, extent = await self.api_call("POST", f"{API}/services/iscsi/extent/", request)
        if status != 201:
            extent = None
        link = {"iscsi_target": target_id, "iscsi_extent": extent["id"] if extent else None, "iscsi_lunid": lun_id}
        status, _ = await self.api_call("POST", f"{API}/services/iscsi/targettoextent/", link)
        if status != 201:
            raise LunCmdError(f"Unable to create lun {lun_path}")

    async def run_delete_lu(self, lun_path: str) -> None:
        lun = next((i for i in await self.list_lu() if re.match(f"^{lun_path}$", i["iscsi_target_extent_path"])), None)
        if lun is None:
            raise LunCmdError(f"Unable to find the lun {lun_path} for {self.scfg['target']}")
        target_id = await self.get_targetid()
        link = next(
            (
                i for i in await self.get_target_to_extent()
                if i["iscsi_target"] == target_id and i["iscsi_lunid"] == int(lun["iscsi_lunid"])
                and i["iscsi_extent"] == lun["id"]
            ),
            None,
        )
        if link is None:
            raise LunCmdError(f"Unable to find the link for the lun {lun_path} for {self.scfg['target']}")
        removed_link = (await self.api_call("DELETE", f"{API}/services/iscsi/targettoextent/{link['id']}/"))[0] == 204
        removed_extent = (await self.api_call("DELETE", f"{API}/services/iscsi/extent/{lun['id']}/"))[0] == 204
        if not (removed_link and removed_extent):
            raise LunCmdError(f"Unable to delete lun {lun_path}")

    async def run_modify_lu(self, new_size: int, lun_path: str) -> None:
        """A resize: Proxmox grew the zvol; the LUN is deleted and created on it again."""
        await self.run_delete_lu(lun_path)
        await self.run_create_lu(lun_path)


async def _storage(h: Harness) -> dict[str, str]:
    """The Proxmox storage's target, made beforehand by the administrator on portal 1."""
    status, made, _ = await h.call("POST", f"{API}/services/iscsi/target/", {"iscsi_target_name": "proxmox"})
    assert status == 201
    group = {"iscsi_target": made["id"], "iscsi_target_portalgroup": 1}
    assert (await h.call("POST", f"{API}/services/iscsi/targetgroup/", group))[0] == 201
    return {"target": "iqn.2026-11.org.pyscsi-target:proxmox"}


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_create_list_resize_delete(tmp_path: Path, real: bool) -> None:
    portal = f"127.0.0.1:{free_port()}"
    with FakePool(tmp_path) as pool:
        async with harness(tmp_path / "state", portals=(portal,), real_engine=real) as h:
            scfg = {**await _storage(h), "pool": pool.pool}
            luncmd = FreeNASLunCmd(h, scfg)
            paths = []
            for vm in (100, 101):
                pool.zvol(f"vm-{vm}-disk-0", 8 << 20)
                paths.append(f"/dev/zvol/{pool.pool}/vm-{vm}-disk-0")
                await luncmd.run_create_lu(paths[-1])
            # list_lu / list_view / list_extent, as ZFSPlugin asks them.
            assert await luncmd.run_list_lu(paths[0]) == paths[0]
            assert [await luncmd.run_list_lu(p, "lun-id") for p in paths] == ["0", "1"]
            naa = await luncmd.run_list_extent(paths[1])
            assert naa is not None and re.fullmatch(r"0x[0-9a-f]{16}", naa)
            assert all(p == f"{API}/system/version/" for m, p in luncmd.requests[::2])  # the ping first, always
            with pytest.raises(LunCmdError, match="exists"):
                await luncmd.run_create_lu(paths[0])
            url = f"iscsi://{portal}/{scfg['target']}/0"
            if real:
                rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
                assert rc == 0 and out.strip() == str(8 << 20), out

            # Resize: the zvol grows, then modify_lu deletes and re-creates the LUN on it.
            pool.resize("vm-100-disk-0", 24 << 20)
            await luncmd.run_modify_lu(24 << 20, paths[0])
            assert [await luncmd.run_list_lu(p, "lun-id") for p in paths] == ["0", "1"]  # the hole is LUN 0 again
            if real:
                rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
                assert rc == 0 and out.strip() == str(24 << 20), out

            for p in paths:
                await luncmd.run_delete_lu(p)
            assert await luncmd.list_lu() == []
            model = h.service.model
            assert not model.extents and not model.lun_maps and len(model.targets) == 1
            if real:
                rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
                assert rc != 0, out


@aio
async def test_a_mapping_that_is_gone_is_404(tmp_path: Path) -> None:
    """Deleting an extent deletes its LUN maps (as FreeNAS's foreign key did): a DELETE of
    the map afterwards - the master branch's v1.0 order - is 404, and the LunCmd dies."""
    with FakePool(tmp_path) as pool:
        async with harness(tmp_path / "state") as h:
            scfg = {**await _storage(h), "pool": pool.pool}
            luncmd = FreeNASLunCmd(h, scfg)
            pool.zvol("vm-102-disk-0", 4 << 20)
            path = f"/dev/zvol/{pool.pool}/vm-102-disk-0"
            await luncmd.run_create_lu(path)
            [link] = await luncmd.get_target_to_extent()
            assert (await luncmd.api_call("DELETE", f"{API}/services/iscsi/extent/{link['iscsi_extent']}/"))[0] == 204
            status, body = await luncmd.api_call("DELETE", f"{API}/services/iscsi/targettoextent/{link['id']}/")
            assert status == 404 and body == {"error": "Target to extent not found."}
