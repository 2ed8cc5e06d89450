"""opensvc's FreeNAS array driver, its requests replayed against the FreeNAS v1.0 API.

Ported request for request from opensvc/opensvc ``opensvc/drivers/array/freenas.py`` as it
was before commit 518b36f29 ("Move the freenas array driver to v2 rest api"), the last
version on API v1.0: class ``Freenas`` (``get``/``post``/``delete``, which put ``/`` after
every URI, so that ``post('/services/iscsi/target/')`` goes to ``.../target//``) and the
actions ``add_iscsi_initiatorgroup``, ``add_iscsi_target``, ``add_iscsi_targetgroup``,
``add_iscsi_file``, ``list_mappings``, ``unmap_iscsi_zvol``, ``map_iscsi_zvol``, ``unmap``,
``del_iscsi_file``, ``del_iscsi_targetgroup``, ``del_iscsi_target`` and
``del_iscsi_initiatorgroup``.  The driver checks no status on a POST: it parses the body and
looks for ``"id"``, so a 404 on a double-slash URL looked like success.  FreeNAS sat behind
nginx (``merge_slashes on``), which is why those URLs worked there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.freenas_pool import FakePool
from support.net import free_port
from support.rest_harness import Harness, aio, harness, run_tool

API = "/api/v1.0"
HBA = "iqn.1994-05.com.redhat:node1"
TARGET = "iqn.2009-11.com.opensvc.srv:tgt1"  # opensvc names targets by full IQN (see unmap)


class OpensvcError(Exception):
    """``ex.Error`` of the driver."""


class OpensvcFreenas:
    """``opensvc.drivers.array.freenas.Freenas`` on API v1.0, requests as it made them."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.requests: list[tuple[str, str]] = []

    async def _send(self, method: str, path: str, data: Any = None) -> tuple[int, str]:
        self.requests.append((method, path))
        raw = None if data is None else json.dumps(data)  # requests: data=json.dumps(data)
        status, body, _ = await self.h.call(method, path, raw=raw, headers={"Content-Type": "application/json"})
        return status, json.dumps(body) if body is not None else ""

    async def get(self, uri: str, params: dict[str, int] | None = None) -> str:
        query = "".join(f"&{k}={v}" for k, v in (params or {}).items())
        return (await self._send("GET", API + uri + "/?format=json" + query))[1]

    async def post(self, uri: str, data: dict[str, Any]) -> str:
        return (await self._send("POST", API + uri + "/", data))[1]

    async def delete(self, uri: str) -> int:
        return (await self._send("DELETE", API + uri + "/"))[0]

    async def _list(self, res: str) -> list[dict[str, Any]]:
        return json.loads(await self.get(f"/services/iscsi/{res}", {"limit": 0}))  # type: ignore[no-any-return]

    # --- add actions ----------------------------------------------------------------------

    async def add_iscsi_initiatorgroup(self, initiators: list[str], auth_network: str = "ALL",
                                       comment: str | None = None) -> dict[str, Any]:
        d = {"iscsi_target_initiator_initiators": ",".join(initiators),
             "iscsi_target_initiator_auth_network": auth_network}
        if comment:
            d["iscsi_target_initiator_comment"] = comment
        return json.loads(await self.post("/services/iscsi/authorizedinitiator/", d))  # type: ignore[no-any-return]

    async def add_iscsi_target(self, name: str, alias: str | None = None) -> dict[str, Any]:
        d = {"iscsi_target_name": name}
        if alias:
            d["iscsi_target_alias"] = alias
        return json.loads(await self.post("/services/iscsi/target/", d))  # type: ignore[no-any-return]

    async def add_iscsi_targetgroup(self, target: list[str], initiatorgroup: list[str], portal_id: int = 1,
                                    authtype: str = "None", authgroup_id: int | None = None) -> list[dict[str, Any]]:
        target_ids = [t["id"] for t in await self._list("target") if t["iscsi_target_name"] in target]
        ig_ids = [i["id"] for i in await self._list("authorizedinitiator")
                  if i["iscsi_target_initiator_initiators"] in initiatorgroup]
        if not target_ids or not ig_ids:
            raise OpensvcError("no ids found")
        data = []
        for tid in target_ids:
            for igid in ig_ids:
                d = {
                    "iscsi_target": tid,
                    "iscsi_target_initiatorgroup": igid,
                    "iscsi_target_portalgroup": portal_id,
                    "iscsi_target_authtype": authtype,
                    "iscsi_target_authgroup": -1,  # FreeNAS's form value for "none"
                    "iscsi_target_initialdigest": "Auto",
                }
                if authgroup_id:
                    d["iscsi_target_authgroup"] = authgroup_id
                data.append(json.loads(await self.post("/services/iscsi/targetgroup/", d)))
        return data

    async def add_iscsi_targets_to_extent(self, extent_id: int, targets: list[str],
                                          lun: int | None = None) -> list[dict[str, Any]]:
        target_ids = [t["id"] for t in await self._list("target") if t["iscsi_target_name"] in targets]
        if lun is None:  # get_aligned_lun: the first LUN free on all those targets
            luns = [d["iscsi_lunid"] for d in await self._list("targettoextent") if d["iscsi_target"] in target_ids]
            lun = next(n for n in range(2 ^ 16) if n not in luns)  # sic: 2 ^ 16 is 18
        out = []
        for tid in target_ids:
            d = {"iscsi_target": tid, "iscsi_extent": extent_id, "iscsi_lunid": lun}
            out.append(json.loads(await self.post("/services/iscsi/targettoextent", d)))
        return out

    async def add_iscsi_file(self, name: str, size_mib: int, volume: str, targets: list[str],
                             lun: int | None = None) -> dict[str, Any]:
        d = {
            "iscsi_target_extent_type": "File",
            "iscsi_target_extent_name": name,
            "iscsi_target_extent_insecure_tpc": True,
            "iscsi_target_extent_blocksize": 512,
            "iscsi_target_extent_filesize": f"{size_mib}MB",
            "iscsi_target_extent_path": f"/mnt/{volume}/{name}",
        }
        data = json.loads(await self.post("/services/iscsi/extent", d))
        if "id" not in data:
            if "iscsi_target_extent_name" in data:
                raise OpensvcError("\n".join(data["iscsi_target_extent_name"]))
            raise OpensvcError(str(data))
        await self.add_iscsi_targets_to_extent(data["id"], targets, lun)
        disk_id = data["iscsi_target_extent_naa"].replace("0x", "")
        return {"driver_data": data, "disk_id": disk_id, "mappings": await self.list_mappings(naa=disk_id)}

    async def map_iscsi_zvol(self, name: str, targets: list[str], lun: int | None = None) -> list[dict[str, Any]]:
        data = next((e for e in await self._list("extent") if e["iscsi_target_extent_name"] == name), None)
        if data is None:
            raise OpensvcError("zvol not found")
        return await self.add_iscsi_targets_to_extent(data["id"], targets, lun)

    # --- list, unmap, delete ---------------------------------------------------------------

    async def list_mappings(self, naa: str | None = None) -> dict[str, dict[str, Any]]:
        tte_data = await self._list("targettoextent")
        if naa is not None:
            extent = next((e for e in await self._list("extent") if e["iscsi_target_extent_naa"] == "0x" + naa), None)
            if extent is None:
                raise OpensvcError("extent not found")
            tte_data = [d for d in tte_data if d["iscsi_extent"] == extent["id"]]
        extents = {d["id"]: d for d in await self._list("extent")}
        targets = {d["id"]: d for d in await self._list("target")}
        tg_by_target: dict[int, list[dict[str, Any]]] = {}
        for d in await self._list("targetgroup"):
            tg_by_target.setdefault(d["iscsi_target"], []).append(d)
        igs = {d["id"]: d for d in await self._list("authorizedinitiator")}
        mappings = {}
        for d in tte_data:
            disk_id = extents[d["iscsi_extent"]]["iscsi_target_extent_naa"].replace("0x", "")
            for tg in tg_by_target.get(d["iscsi_target"], []):
                ig = igs[tg["iscsi_target_initiatorgroup"]]
                for hba_id in ig["iscsi_target_initiator_initiators"].split("\n"):
                    tgt_id = targets[tg["iscsi_target"]]["iscsi_target_name"]
                    mappings[f"{hba_id}:{tgt_id}:{disk_id}"] = {
                        "targetgroup": tg, "extent": d, "disk_id": disk_id, "tgt_id": tgt_id, "hba_id": hba_id,
                    }
        return mappings

    @staticmethod
    def split_mappings(mappings: list[str]) -> list[tuple[str, str]]:
        out = []
        for mapping in mappings:
            elements = mapping.split(":iqn.")
            for target in set(("iqn." + elements[-1]).split(",")):
                out.append((elements[0], target))
        return out

    async def _del(self, res: str, obj_id: int) -> dict[str, Any]:
        data = json.loads(await self.get(f"/services/iscsi/{res}/{obj_id}"))
        status = await self.delete(f"/services/iscsi/{res}/{obj_id}")
        if status != 204:
            raise OpensvcError(f"delete error: {res} {obj_id} ({status})")
        return data  # type: ignore[no-any-return]

    async def unmap_iscsi_zvol(self, name: str, mappings: list[str]) -> list[dict[str, Any]]:
        current = await self.list_mappings()
        extent = next((e for e in await self._list("extent") if e["iscsi_target_extent_name"] == name), None)
        if not extent:
            raise OpensvcError(f"no extent found for disk : {name}")
        results = []
        for hba, tgt in self.split_mappings(mappings):
            tg = current.get(f"{hba}:{tgt}:" + extent["iscsi_target_extent_naa"].replace("0x", ""))
            if tg:
                results.append(await self._del("targettoextent", tg["extent"]["id"]))  # _del_iscsi_targettoextent
        return results

    async def unmap(self, mappings: list[str]) -> list[dict[str, Any]]:
        current = await self.list_mappings()
        results = []
        for hba, tgt in self.split_mappings(mappings):
            for tg in current.values():
                if tg["tgt_id"] == tgt and tg["hba_id"] == hba:
                    results.append(await self._del("targetgroup", tg["targetgroup"]["id"]))  # del_iscsi_targetgroup
        return results

    async def del_iscsi_file(self, name: str) -> dict[str, Any] | None:
        data = next((e for e in await self._list("extent") if e["iscsi_target_extent_name"] == name), None)
        if data is None:
            return None
        status = await self.delete(f"/services/iscsi/extent/{data['id']}")  # del_iscsi_extent
        if status != 204:
            raise OpensvcError(f"delete error: extent {data['id']} ({status})")
        return data


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_file_disk_lifecycle(tmp_path: Path, real: bool) -> None:
    """Initiator group, target, target group (authgroup -1), file disk mapped at the first
    free LUN, the mappings listed, unmapped and deleted: every object made for real."""
    portal = f"127.0.0.1:{free_port()}"
    with FakePool(tmp_path) as pool:
        roots = [pool.mountpoint]
        async with harness(tmp_path / "state", portals=(portal,), extent_roots=roots, real_engine=real) as h:
            array = OpensvcFreenas(h)
            ig = await array.add_iscsi_initiatorgroup([HBA], comment="node1")
            assert ig["id"] == 1 and ig["iscsi_target_initiator_initiators"] == HBA
            tgt = await array.add_iscsi_target(TARGET, alias="tgt1")
            assert tgt["id"] == 1 and tgt["iscsi_target_alias"] == "tgt1"
            [tg] = await array.add_iscsi_targetgroup(target=[TARGET], initiatorgroup=[HBA])
            assert tg["iscsi_target_authgroup"] is None and tg["iscsi_target_initiatorgroup"] == 1
            posts = [p for m, p in array.requests if m == "POST"]
            assert posts == [f"{API}/services/iscsi/{r}//" for r in ("authorizedinitiator", "target", "targetgroup")]

            result = await array.add_iscsi_file("disk1", 16, pool.pool, targets=[TARGET])
            assert (pool.mountpoint / "disk1").stat().st_size == 16 << 20
            naa = result["disk_id"]
            key = f"{HBA}:{TARGET}:{naa}"
            assert list(result["mappings"]) == [key] and result["mappings"][key]["extent"]["iscsi_lunid"] == 0
            if real:
                url = f"iscsi://{portal}/{TARGET}/0"
                rc, out = await run_tool("iscsi-readcapacity16", "-i", HBA, "-s", url)
                assert rc == 0 and out.strip() == str(16 << 20), out
                rc, out = await run_tool("iscsi-readcapacity16", "-i", "iqn.1994-05.com.redhat:other", "-s", url)
                assert rc != 0 and "(514)" in out, out  # the initiator group admits node1 only

            # A second disk takes the next aligned LUN; then the first is unmapped and deleted.
            await array.add_iscsi_file("disk2", 8, pool.pool, targets=[TARGET])
            assert {m["extent"]["iscsi_lunid"] for m in (await array.list_mappings()).values()} == {0, 1}
            [gone] = await array.unmap_iscsi_zvol("disk1", [f"{HBA}:{TARGET}"])
            assert gone["iscsi_lunid"] == 0
            assert await array.list_mappings(naa=naa) == {}
            await array.map_iscsi_zvol("disk1", targets=[TARGET], lun=5)  # and back, at an explicit LUN
            assert h.service.model.lun_maps[3].lunid == 5
            assert (await array.del_iscsi_file("disk1"))["iscsi_target_extent_name"] == "disk1"
            assert (pool.mountpoint / "disk1").exists()  # the driver's DELETE sends no {"delete": true}
            assert [e.name for e in h.service.model.extents.values()] == ["disk2"]

            # unmap: the target group of the mapping goes; then the target and initiator group.
            [tg_gone] = await array.unmap([f"{HBA}:{TARGET}"])
            assert tg_gone["id"] == tg["id"] and not h.service.model.target_groups
            assert await array.list_mappings() == {}
            assert (await array._del("target", tgt["id"]))["iscsi_target_name"] == TARGET
            assert (await array._del("authorizedinitiator", ig["id"]))["id"] == ig["id"]
            model = h.service.model
            assert not model.targets and not model.initiator_groups and not model.lun_maps
            gets = [p for m, p in array.requests if m == "GET"]
            assert all("/?format=json" in p for p in gets)


@aio
async def test_errors_the_driver_reports(tmp_path: Path) -> None:
    """What the driver turns into its own errors: a refused extent ({field: [messages]}) and
    a DELETE of something gone (404)."""
    with FakePool(tmp_path) as pool:
        async with harness(tmp_path / "state", extent_roots=[pool.mountpoint]) as h:
            array = OpensvcFreenas(h)
            await array.add_iscsi_target(TARGET)
            await array.add_iscsi_file("disk1", 4, pool.pool, targets=[TARGET])
            with pytest.raises(OpensvcError, match="^Extent name must be unique$"):
                await array.add_iscsi_file("disk1", 4, pool.pool, targets=[TARGET])
            with pytest.raises(OpensvcError, match="must be inside an extent root"):
                await array.add_iscsi_file("disk3", 4, "elsewhere", targets=[TARGET])
            with pytest.raises(OpensvcError, match=r"\(404\)"):
                await array._del("targetgroup", 99)
