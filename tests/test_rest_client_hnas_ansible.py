"""Hitachi's own HNAS transport, its requests replayed against ``/v9/storage/iscsi-targets``.

Ported from hitachi-vantara/vspone-file-ansible ``plugins/module_utils/hnas_main.py``, class
``HNASFileServer``: the base URI ``<api_url>/storage/`` (api_url ``http[s]://host:port/v9``),
``set_credentials`` (``X-Subsystem-User``/``X-Subsystem-Password``, or ``X-Api-Key``), and
``simple_get`` (200), ``simple_post`` (the expected status, 201), ``simple_patch`` (303,
``allow_redirects=False``: the See Other is not followed) and ``simple_delete`` (204), whose
failures report ``get_error_details``: ``errorMsg``, then `` - errorDetail.message`` when the
body has an ``errorDetail``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.rest_harness import ADMIN, Harness, aio, harness

from pyscsi_target.config.store import api_key_create
from rest.hnas import object_id


class HnasError(AssertionError):
    """The transport's ``assert response.status_code == expected, "<status> <reason> - <details>"``."""


class HNASFileServer:
    def __init__(self, h: Harness) -> None:
        self.h = h
        self.base_uri = "/v9/storage/"
        self.headers = {"Content-Type": "application/json"}

    def set_credentials(self, api_key: str | None = None, api_username: str | None = None,
                        api_password: str | None = None) -> None:
        if api_key is None:
            self.headers["X-Subsystem-User"] = api_username or ""
            self.headers["X-Subsystem-Password"] = api_password or ""
        else:
            self.headers["X-Api-Key"] = api_key

    @staticmethod
    def get_error_details(body: Any) -> str:
        try:
            error = body["errorMsg"]
            if "errorDetail" in body:
                return " - ".join([error, body["errorDetail"]["message"]])
        except (KeyError, TypeError):
            error = "No details"
        return error  # type: ignore[no-any-return]

    async def _call(self, method: str, url: str, expected: int, data: Any = None) -> Any:
        raw = None if data is None else json.dumps(data)  # requests: json=data
        status, body, _ = await self.h.call(method, url, raw=raw, headers=dict(self.headers), auth=False)
        if status != expected:
            raise HnasError(f"{status} - {self.get_error_details(body)}")
        return body

    async def simple_get(self, url: str) -> Any:
        return await self._call("GET", url, 200)

    async def simple_post(self, url: str, expected_status_code: int, data: Any = None) -> Any:
        return await self._call("POST", url, expected_status_code, data)

    async def simple_patch(self, url: str, expected_status_code: int, data: Any = None) -> Any:
        return await self._call("PATCH", url, expected_status_code, data)

    async def simple_delete(self, url: str) -> None:
        await self._call("DELETE", url, 204)


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_list_get_create_patch_delete(tmp_path: Path, real: bool) -> None:
    async with harness(tmp_path, real_engine=real) as h:
        hnas = HNASFileServer(h)
        hnas.set_credentials(api_username=ADMIN[0], api_password=ADMIN[1])
        url = hnas.base_uri + "iscsi-targets"
        assert await hnas.simple_get(url) == {"iscsiTargets": []}
        made = await hnas.simple_post(url, 201, {"alias": "Target1", "comment": "c", "virtualServerId": 1})
        target = made["iscsiTarget"]
        assert made["uri"] == f"{url}/{target['objectId']}" and target["alias"] == "Target1"
        item = f"{url}/{target['objectId']}"
        assert (await hnas.simple_get(item))["iscsiTarget"] == target
        listed = await hnas.simple_get(url)
        assert [t["objectId"] for t in listed["iscsiTargets"]] == [target["objectId"]]
        # The documented 303 comes back as such (not followed), with the updated object.
        body = {"comment": "patched", "enableAuthentication": True, "secret": "secret1234"}
        patched = await hnas.simple_patch(item, 303, body)
        assert patched["iscsiTarget"]["comment"] == "patched" and patched["iscsiTarget"]["isAuthenticationEnabled"]
        await hnas.simple_delete(item)
        assert await hnas.simple_get(url) == {"iscsiTargets": []}


@aio
async def test_error_bodies_as_the_transport_reports_them(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        hnas = HNASFileServer(h)
        hnas.set_credentials(api_username=ADMIN[0], api_password=ADMIN[1])
        url = hnas.base_uri + "iscsi-targets"
        made = (await hnas.simple_post(url, 201, {"alias": "Target1"}))["iscsiTarget"]
        gone = object_id("iscsi-target", 99)
        with pytest.raises(HnasError) as err:
            await hnas.simple_get(f"{url}/{gone}")
        assert str(err.value) == (
            "404 - Cannot find the object of the operation on the device - The iSCSI target does not exist"
        )
        with pytest.raises(HnasError, match="^409 - .*Target name already exists"):
            await hnas.simple_post(url, 201, {"alias": "Target1"})
        with pytest.raises(HnasError, match="^400 - Invalid accessConfig parameter - "):
            await hnas.simple_patch(f"{url}/{made['objectId']}", 303, {"accessConfig": "nonsense"})
        with pytest.raises(HnasError, match="^400 - Invalid alias parameter - it must be a string$"):
            await hnas.simple_patch(f"{url}/{made['objectId']}", 303, {"alias": 5})
        # An API key for virtual server 2 only: 403 on virtual server 1's target.
        keyed = HNASFileServer(h)
        keyed.set_credentials(api_key=api_key_create(tmp_path, [2]))
        with pytest.raises(HnasError, match="^403 - Forbidden request"):
            await keyed.simple_delete(f"{url}/{made['objectId']}")
        wrong = HNASFileServer(h)
        wrong.set_credentials(api_username=ADMIN[0], api_password="wrong")
        with pytest.raises(HnasError, match="^401 - Unauthorized"):
            await wrong.simple_get(url)
