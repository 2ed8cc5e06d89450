"""FreeNAS v1.0 iSCSI resources: the document's examples, client leniency, errors, validation."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from support.net import port_open
from support.rest_harness import FN, aio, basic, harness

# --- every request example of the FreeNAS v1.0 iSCSI API document ---------------------------

PORTAL_DOC = {
    "iscsi_target_portal_tag": 1,
    "id": 1,
    "iscsi_target_portal_discoveryauthmethod": "None",
    "iscsi_target_portal_discoveryauthgroup": None,
    "iscsi_target_portal_ips": ["0.0.0.0:3260"],
    "iscsi_target_portal_comment": "",
}


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_document_examples_in_order(tmp_path: Path, real: bool) -> None:
    """Both modes: the REST app over a recording engine, and over the real engine with real
    portals, where iscsi-ls must then see the documented target and LUN."""
    if real and (shutil.which("iscsi-ls") is None or port_open("127.0.0.1", 3260)):
        pytest.skip("needs iscsi-ls and a free port 3260 (the document's portal is 0.0.0.0:3260)")
    # No default portal: the document's ids (all 1) then come out exactly.
    async with harness(tmp_path, portals=(), real_engine=real) as h:
        applied = 0 if real else len(h.engine.applied)

        status, body, headers = await h.call("GET", f"{FN}/globalconfiguration/")
        assert status == 200 and headers["Vary"] == "Accept" and headers["Content-Type"].startswith("application/json")
        assert set(body) == {"iscsi_basename", "iscsi_isns_servers", "iscsi_pool_avail_threshold", "id"}
        assert body["id"] == 1 and body["iscsi_pool_avail_threshold"] is None

        status, body, _ = await h.call("PUT", f"{FN}/globalconfiguration/", raw='{\n"iscsi_maxconnect": 16\n}')
        assert status == 200 and body["id"] == 1 and body["iscsi_basename"].startswith("iqn.")

        # Portal
        status, body, headers = await h.call(
            "POST", f"{FN}/portal/", raw='{"iscsi_target_portal_ips": ["0.0.0.0:3260"]}'
        )
        assert status == 201 and body == PORTAL_DOC and headers["Vary"] == "Accept"
        status, body, _ = await h.call("GET", f"{FN}/portal/")
        assert status == 200 and body == [PORTAL_DOC]
        assert h.engine.model.portal_groups[1].listen == ["0.0.0.0:3260"]
        # The document's PUT uses 192.168.3.20, which is not configured here: refused, field named.
        status, body, _ = await h.call("PUT", f"{FN}/portal/1/", {"iscsi_target_portal_ips": ["192.168.3.20:3260"]})
        assert status == 400 and "iscsi_target_portal_ips" in body
        status, body, _ = await h.call("PUT", f"{FN}/portal/1/", {"iscsi_target_portal_ips": ["127.0.0.1:3260"]})
        assert status == 200 and body == {**PORTAL_DOC, "iscsi_target_portal_ips": ["127.0.0.1:3260"]}

        # Authorized initiator: the document's POST has a trailing comma (invalid JSON).
        verbatim = '{\n"iscsi_target_initiator_initiators": "ALL",\n"iscsi_target_initiator_auth_network": "ALL",\n}'
        status, body, _ = await h.call("POST", f"{FN}/authorizedinitiator/", raw=verbatim)
        assert status == 400 and body == {"error": "Request is not valid JSON."}
        status, body, _ = await h.call(
            "POST",
            f"{FN}/authorizedinitiator/",
            {"iscsi_target_initiator_initiators": "ALL", "iscsi_target_initiator_auth_network": "ALL"},
        )
        initiator = {
            "iscsi_target_initiator_initiators": "ALL",
            "iscsi_target_initiator_comment": "",
            "iscsi_target_initiator_auth_network": "ALL",
            "id": 1,
            "iscsi_target_initiator_tag": 1,
        }
        assert status == 201 and body == initiator
        status, body, _ = await h.call(
            "PUT", f"{FN}/authorizedinitiator/1/", {"iscsi_target_initiator_auth_network": "192.168.3.0/24"}
        )
        assert status == 200 and body == {**initiator, "iscsi_target_initiator_auth_network": "192.168.3.0/24"}
        status, body, _ = await h.call("GET", f"{FN}/authorizedinitiator/")
        assert status == 200 and len(body) == 1

        # Auth credential: the document's secrets ("secret", "peersecret") are shorter than the
        # 12 characters FreeNAS required, so the verbatim example is refused field by field.
        doc_cred = {
            "iscsi_target_auth_secret": "secret",
            "iscsi_target_auth_peeruser": "peeruser",
            "iscsi_target_auth_peersecret": "peersecret",
            "iscsi_target_auth_user": "user",
            "iscsi_target_auth_tag": 1,
        }
        status, body, _ = await h.call("POST", f"{FN}/authcredential/", doc_cred)
        assert status == 400
        assert set(body) == {"iscsi_target_auth_secret", "iscsi_target_auth_peersecret"}
        fixed = {**doc_cred, "iscsi_target_auth_secret": "secretsecret", "iscsi_target_auth_peersecret": "peersecret12"}
        status, body, _ = await h.call("POST", f"{FN}/authcredential/", fixed)
        assert status == 201 and body == {**fixed, "id": 1}
        status, body, _ = await h.call("PUT", f"{FN}/authcredential/1/", {"iscsi_target_auth_peeruser": "myuser"})
        assert status == 200 and body == {**fixed, "id": 1, "iscsi_target_auth_peeruser": "myuser"}

        # Target
        status, body, _ = await h.call("POST", f"{FN}/target/", raw='{\n"iscsi_target_name": "target"\n}')
        assert status == 201 and body == {"iscsi_target_name": "target", "iscsi_target_alias": None, "id": 1}
        assert h.engine.model.target_iqn(h.engine.model.targets[1]).endswith(":target")
        status, body, _ = await h.call("PUT", f"{FN}/target/1/", {"iscsi_target_alias": "test"})
        assert status == 200 and body == {"iscsi_target_name": "target", "iscsi_target_alias": "test", "id": 1}
        status, body, _ = await h.call("GET", f"{FN}/target/")
        assert body == [{"iscsi_target_name": "target", "iscsi_target_alias": "test", "id": 1}]

        # Target group (sent verbatim, including the nulls)
        tg_req = (
            '{"iscsi_target": 1, "iscsi_target_authgroup": null, "iscsi_target_authtype": "None",'
            ' "iscsi_target_portalgroup": 1, "iscsi_target_initiatorgroup": null, "iscsi_target_initialdigest": "Auto"}'
        )
        tg_doc = {
            "id": 1,
            "iscsi_target": 1,
            "iscsi_target_authgroup": None,
            "iscsi_target_authtype": "None",
            "iscsi_target_portalgroup": 1,
            "iscsi_target_initiatorgroup": None,
            "iscsi_target_initialdigest": "Auto",
        }
        status, body, _ = await h.call("POST", f"{FN}/targetgroup/", raw=tg_req)
        assert status == 201 and body == tg_doc
        status, body, _ = await h.call("PUT", f"{FN}/targetgroup/1/", {"iscsi_target_initialdigest": "CHAP"})
        assert status == 200 and body == {**tg_doc, "iscsi_target_initialdigest": "CHAP"}
        status, body, _ = await h.call("GET", f"{FN}/targetgroup/")
        assert body == [{**tg_doc, "iscsi_target_initialdigest": "CHAP"}]

        # Extent: /mnt/tank/iscsi is outside the extent roots, so it is refused; the same
        # request with a path inside the root gives every documented field.
        ext_req = {
            "iscsi_target_extent_type": "File",
            "iscsi_target_extent_name": "extent",
            "iscsi_target_extent_filesize": "10MB",
            "iscsi_target_extent_path": "/mnt/tank/iscsi",
        }
        status, body, _ = await h.call("POST", f"{FN}/extent/", ext_req)
        assert status == 400 and "iscsi_target_extent_path" in body
        assert not os.path.exists("/mnt/tank/iscsi")
        status, body, _ = await h.call("POST", f"{FN}/extent/", {**ext_req, "iscsi_target_extent_path": "tank/iscsi"})
        assert status == 201
        path = tmp_path / "extents" / "tank" / "iscsi"
        expected = {
            "iscsi_target_extent_comment": "",
            "iscsi_target_extent_type": "File",
            "iscsi_target_extent_name": "extent",
            "iscsi_target_extent_filesize": "10MB",
            "iscsi_target_extent_insecure_tpc": True,
            "id": 1,
            "iscsi_target_extent_path": str(path),
            "iscsi_target_extent_xen": False,
            "iscsi_target_extent_avail_threshold": None,
            "iscsi_target_extent_blocksize": 512,
            "iscsi_target_extent_pblocksize": False,
            "iscsi_target_extent_rpm": "SSD",
            "iscsi_target_extent_ro": False,
        }
        assert {k: body[k] for k in expected} == expected
        assert len(body["iscsi_target_extent_naa"]) == 18 and body["iscsi_target_extent_naa"].startswith("0x")
        assert body["iscsi_target_extent_serial"]
        st = path.stat()
        assert st.st_size == 10 << 20 and st.st_blocks * 512 < (1 << 20)  # sparse
        status, body, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_filesize": "20MB"})
        assert status == 200 and body["iscsi_target_extent_filesize"] == "20MB"
        assert path.stat().st_size == 20 << 20
        assert h.engine.model.extents[1].filesize == "20MB"

        # zvol example: no such device here -> 400 naming the disk field.
        status, body, _ = await h.call(
            "POST",
            f"{FN}/extent/",
            {
                "iscsi_target_extent_type": "Disk",
                "iscsi_target_extent_name": "zvolextent",
                "iscsi_target_extent_disk": "zvol/tank/zvolextent",
            },
        )
        assert status == 400 and "iscsi_target_extent_disk" in body

        # Target to extent: the document's POST is invalid JSON (missing comma, trailing comma).
        verbatim = '{\n"iscsi_target": 1,\n"iscsi_extent": 1\n"iscsi_lunid": null,\n}'
        status, body, _ = await h.call("POST", f"{FN}/targettoextent/", raw=verbatim)
        assert status == 400 and body == {"error": "Request is not valid JSON."}
        status, body, _ = await h.call(
            "POST", f"{FN}/targettoextent/", raw='{"iscsi_target": 1, "iscsi_extent": 1, "iscsi_lunid": null}'
        )
        assert status == 201 and body == {"iscsi_target": 1, "iscsi_extent": 1, "iscsi_lunid": 0, "id": 1}
        assert h.engine.model.luns_of_target(1)[0].name == "extent"
        status, body, _ = await h.call(
            "POST",
            f"{FN}/extent/",
            {
                "iscsi_target_extent_name": "extent2",
                "iscsi_target_extent_path": "e2",
                "iscsi_target_extent_filesize": "1MB",
            },
        )
        assert status == 201 and body["id"] == 2
        status, body, _ = await h.call("PUT", f"{FN}/targettoextent/1/", {"iscsi_extent": 2})
        assert status == 200 and body == {"iscsi_target": 1, "iscsi_extent": 2, "iscsi_lunid": 0, "id": 1}
        status, body, _ = await h.call("GET", f"{FN}/targettoextent/")
        assert body == [{"iscsi_target": 1, "iscsi_extent": 2, "iscsi_lunid": 0, "id": 1}]
        if real:
            # The configuration is live: an initiator sees the target and its LUN on the portal.
            proc = await asyncio.create_subprocess_exec(
                "iscsi-ls",
                "-s",
                "iscsi://127.0.0.1:3260",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
            assert "Target:iqn.2026-11.org.pyscsi-target:target " in out and "Lun:0" in out, out

        # Deletes, in the document's order of resources.
        for res in (
            "targettoextent",
            "extent",
            "authorizedinitiator",
            "authcredential",
            "targetgroup",
            "target",
            "portal",
        ):
            status, body, headers = await h.call("DELETE", f"{FN}/{res}/1/")
            assert status == 204 and headers["Vary"] == "Accept", res
            status, _, _ = await h.call("GET", f"{FN}/{res}/1/")
            assert status == 404, res
        assert path.exists()  # DELETE without {"delete": true} keeps the file
        if not real:
            assert len(h.engine.applied) > applied + 15  # every change reached the engine


# --- leniency --------------------------------------------------------------------------------


@aio
async def test_client_leniency(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # An id in a POST body is ignored; trailing slash optional.
        status, body, _ = await h.call("POST", f"{FN}/target", {"id": 99, "iscsi_target_name": "t1"})
        assert status == 201 and body["id"] == 1
        status, body, _ = await h.call("GET", f"{FN}/target/1")
        assert status == 200 and body["iscsi_target_name"] == "t1"
        # Ids as strings.
        status, body, _ = await h.call(
            "POST", f"{FN}/targetgroup/", {"iscsi_target": "1", "iscsi_target_portalgroup": "1"}
        )
        assert status == 201 and body["iscsi_target"] == 1 and body["iscsi_target_portalgroup"] == 1
        # rpm as a number.
        status, body, _ = await h.call(
            "POST",
            f"{FN}/extent/",
            {
                "iscsi_target_extent_name": "e",
                "iscsi_target_extent_path": "e.img",
                "iscsi_target_extent_filesize": 1 << 20,
                "iscsi_target_extent_rpm": 7200,
            },
        )
        assert status == 201 and body["iscsi_target_extent_rpm"] == "7200"
        for i in range(2, 5):
            status, body, _ = await h.call(
                "POST",
                f"{FN}/extent/",
                {
                    "iscsi_target_extent_name": f"e{i}",
                    "iscsi_target_extent_path": f"e{i}.img",
                    "iscsi_target_extent_filesize": "1MB",
                    "iscsi_target_extent_rpm": "SSD",
                },
            )
            assert status == 201
        # Lowest free LUN: null, absent, then a hole is reused.
        status, body, _ = await h.call(
            "POST", f"{FN}/targettoextent/", {"iscsi_target": "1", "iscsi_extent": "1", "iscsi_lunid": None}
        )
        assert status == 201 and body["iscsi_lunid"] == 0
        status, body, _ = await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 2})
        assert status == 201 and body["iscsi_lunid"] == 1
        status, body, _ = await h.call(
            "POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 3, "iscsi_lunid": "5"}
        )
        assert status == 201 and body["iscsi_lunid"] == 5
        status, _, _ = await h.call("DELETE", f"{FN}/targettoextent/1/")
        assert status == 204
        status, body, _ = await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 4})
        assert status == 201 and body["iscsi_lunid"] == 0 and body["id"] == 4
        status, body, _ = await h.call("GET", f"{FN}/targettoextent/")
        assert all(isinstance(m["iscsi_lunid"], int) for m in body)
        # PUT: unknown fields ignored, null leaves a value unchanged.
        status, body, _ = await h.call("PUT", f"{FN}/target/1/", {"iscsi_target_alias": "a1", "bogus": 1})
        assert status == 200 and body["iscsi_target_alias"] == "a1"
        status, body, _ = await h.call(
            "PUT", f"{FN}/target/1/", {"iscsi_target_alias": None, "iscsi_target_name": None}
        )
        assert status == 200 and body == {"id": 1, "iscsi_target_name": "t1", "iscsi_target_alias": "a1"}
        # A threshold is null or 1-99; 0 is refused, as FreeNAS 11.3 did (democratic-csi sends null).
        status, body, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_avail_threshold": 0})
        assert status == 400
        assert body == {"iscsi_target_extent_avail_threshold": ["Ensure this value is greater than or equal to 1."]}
        status, body, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_avail_threshold": 50})
        assert status == 200 and body["iscsi_target_extent_avail_threshold"] == 50
        status, body, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_avail_threshold": ""})
        assert status == 200 and body["iscsi_target_extent_avail_threshold"] is None
        # Booleans as strings, as form-minded clients send them.
        status, body, _ = await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_ro": "true"})
        assert status == 200 and body["iscsi_target_extent_ro"] is True
        assert h.engine.last.extents[1].ro is True


@aio
async def test_pagination(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for i in range(25):
            status, _, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": f"t{i:02d}"})
            assert status == 201

        async def names(query: str) -> list[str] | int:
            status, body, _ = await h.call("GET", f"{FN}/target/{query}")
            return [t["iscsi_target_name"] for t in body] if status == 200 else status

        assert len(await names("")) == 20
        assert len(await names("?limit=0")) == 25
        assert len(await names("?limit=1000")) == 25
        assert len(await names("?limit=99999")) == 25
        assert await names("?limit=10&offset=20") == [f"t{i}" for i in range(20, 25)]
        assert await names("?limit=100&offset=100") == []
        assert await names("?offset=24") == ["t24"]
        assert await names("?limit=abc") == 400
        assert await names("?offset=-1") == 400
        status, body, _ = await h.call("GET", f"{FN}/target/?limit=x")
        assert status == 400 and "error" in body


# --- errors, conflicts, validation -------------------------------------------------------------


@aio
async def test_conflicts_use_freenas_messages(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        assert (await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "t"}))[0] == 201
        status, body, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "t"})
        assert status == 409 and body == {"iscsi_target_name": ["Target name already exists"]}
        ext = {"iscsi_target_extent_name": "x", "iscsi_target_extent_path": "x", "iscsi_target_extent_filesize": "1MB"}
        assert (await h.call("POST", f"{FN}/extent/", ext))[0] == 201
        status, body, _ = await h.call("POST", f"{FN}/extent/", {**ext, "iscsi_target_extent_path": "y"})
        assert status == 409 and body == {"iscsi_target_extent_name": ["Extent name must be unique"]}
        assert (
            await h.call(
                "POST", f"{FN}/extent/", {**ext, "iscsi_target_extent_name": "y", "iscsi_target_extent_path": "y"}
            )
        )[0] == 201
        assert (await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 1}))[0] == 201
        status, body, _ = await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 1})
        assert status == 409 and body == {"iscsi_extent": ["Extent is already in this target."]}
        status, body, _ = await h.call(
            "POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 2, "iscsi_lunid": 0}
        )
        assert status == 409 and body == {"iscsi_lunid": ["LUN ID is already being used for this target."]}
        assert (await h.call("POST", f"{FN}/targetgroup/", {"iscsi_target": 1, "iscsi_target_portalgroup": 1}))[
            0
        ] == 201
        status, body, _ = await h.call("POST", f"{FN}/targetgroup/", {"iscsi_target": 1, "iscsi_target_portalgroup": 1})
        assert status == 409 and body == {"iscsi_target_portalgroup": ["Portal 1 cannot be duplicated on a target"]}
        # Same naa twice.
        naa = h.service.model.extents[1].naa
        status, body, _ = await h.call(
            "POST",
            f"{FN}/extent/",
            {**ext, "iscsi_target_extent_name": "z", "iscsi_target_extent_path": "z", "iscsi_target_extent_naa": naa},
        )
        assert status == 409 and "iscsi_target_extent_naa" in body
        # Same (ip, port) on another portal, and a wildcard overlapping it.
        status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": ["127.0.0.1:3260"]})
        assert status == 409 and "iscsi_target_portal_ips" in body
        status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": ["0.0.0.0:3260"]})
        assert status == 409
        # A target with logged-in sessions cannot be deleted.
        h.engine.sessions[1] = 2
        status, body, _ = await h.call("DELETE", f"{FN}/target/1/")
        assert status == 409 and body == {"__all__": ["Target is in use"]}
        h.engine.sessions[1] = 0
        status, _, _ = await h.call("DELETE", f"{FN}/target/1/")
        assert status == 204
        # Cascade: its target groups and LUN maps are gone.
        model = h.service.model
        assert not model.target_groups and not model.lun_maps and len(model.extents) == 2


@aio
async def test_validation_rules(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:

        async def post(res: str, body: dict) -> tuple[int, dict]:
            status, data, _ = await h.call("POST", f"{FN}/{res}/", body)
            return status, data

        # Target names.
        for bad in ("Target", "a b", "tgt_1", "", "iqn.bad"):
            status, body = await post("target", {"iscsi_target_name": bad})
            assert status == 400 and "iscsi_target_name" in body, bad
        status, body = await post("target", {"iscsi_target_name": "iqn.2000-01.com.example:disk1"})
        assert status == 201
        assert h.engine.last.target_iqn(h.engine.last.targets[body["id"]]) == "iqn.2000-01.com.example:disk1"
        assert (await post("target", {"iscsi_target_name": "b", "iscsi_target_alias": "same"}))[0] == 201
        assert (await post("target", {"iscsi_target_name": "c", "iscsi_target_alias": "same"}))[0] == 409
        # CHAP secrets.
        cred = {"iscsi_target_auth_tag": 1, "iscsi_target_auth_user": "u", "iscsi_target_auth_secret": "x" * 12}
        assert (await post("authcredential", {**cred, "iscsi_target_auth_secret": "x" * 11}))[0] == 400
        assert (await post("authcredential", {**cred, "iscsi_target_auth_secret": "x" * 17}))[0] == 400
        status, body = await post("authcredential", {**cred, "iscsi_target_auth_peeruser": "p"})
        assert status == 400 and "iscsi_target_auth_peersecret" in body
        status, body = await post("authcredential", {**cred, "iscsi_target_auth_peersecret": "y" * 12})
        assert status == 400 and "iscsi_target_auth_peeruser" in body
        status, body = await post(
            "authcredential", {**cred, "iscsi_target_auth_peeruser": "p", "iscsi_target_auth_peersecret": "x" * 12}
        )
        assert status == 400 and "iscsi_target_auth_peersecret" in body
        assert (await post("authcredential", cred))[0] == 201
        # Target group: CHAP needs an auth group; CHAP Mutual needs a peer user in it.
        tg = {"iscsi_target": 1, "iscsi_target_portalgroup": 1}
        assert (await post("targetgroup", {**tg, "iscsi_target_authtype": "CHAP"}))[0] == 400
        assert (await post("targetgroup", {**tg, "iscsi_target_authtype": "CHAP Mutual", "iscsi_target_authgroup": 1}))[
            0
        ] == 400
        assert (await post("targetgroup", {**tg, "iscsi_target_authtype": "Bogus"}))[0] == 400
        assert (await post("targetgroup", {**tg, "iscsi_target": 99}))[0] == 400
        assert (await post("targetgroup", {**tg, "iscsi_target_authgroup": 7, "iscsi_target_authtype": "CHAP"}))[
            0
        ] == 400
        assert (await post("targetgroup", {**tg, "iscsi_target_authtype": "CHAP", "iscsi_target_authgroup": 1}))[
            0
        ] == 201
        # Networks and initiators.
        ok = {
            "iscsi_target_initiator_initiators": "iqn.1994-05.com.redhat:a iqn.1994-05.com.redhat:b",
            "iscsi_target_initiator_auth_network": "10.0.0.0/8 192.168.1.5 fe80::/10",
        }
        status, body = await post("authorizedinitiator", ok)
        assert status == 201
        assert h.engine.last.initiator_groups[body["id"]].auth_network.split() == [
            "10.0.0.0/8",
            "192.168.1.5",
            "fe80::/10",
        ]
        status, body = await post("authorizedinitiator", {"iscsi_target_initiator_auth_network": "10.0.0.0/33"})
        assert status == 400 and "iscsi_target_initiator_auth_network" in body
        # Portals: syntax, port, host address.
        for bad in (
            ["127.0.0.1"],
            ["127.0.0.1:0"],
            ["127.0.0.1:70000"],
            ["::1:3260"],
            ["nonsense:1"],
            ["203.0.113.9:3260"],
            [],
            "x",
            [1],
        ):
            status, body = await post("portal", {"iscsi_target_portal_ips": bad})
            assert status == 400 and "iscsi_target_portal_ips" in body, bad
        status, body = await post("portal", {"iscsi_target_portal_ips": ["[::1]:3261", "127.0.0.1:3261"]})
        assert status == 201 and body["iscsi_target_portal_ips"] == ["[::1]:3261", "127.0.0.1:3261"]
        status, body = await post("portal", {})  # FreeNAS gave a 500 here
        assert status == 400

        # Extents: sizes, block sizes, rpm, thresholds.
        def ext(**kw: object) -> dict:
            return {
                "iscsi_target_extent_name": kw.pop("name", "e"),
                "iscsi_target_extent_path": kw.pop("path", "e.img"),
                **{f"iscsi_target_extent_{k}": v for k, v in kw.items()},
            }

        for field, value in (
            ("filesize", "1000"),
            ("filesize", "10XB"),
            ("filesize", "-1"),
            ("blocksize", 4000),
            ("rpm", "12000"),
            ("avail_threshold", -1),
            ("avail_threshold", 100),
            ("type", "Tape"),
            ("serial", "x" * 17),
        ):
            kwargs = {"filesize": "1MB", field: value}
            status, body = await post("extent", ext(**kwargs))
            assert status == 400 and f"iscsi_target_extent_{field}" in body, (field, value, body)
        status, body = await post("extent", ext(filesize="1.5KB", blocksize=512))
        assert status == 201 and (tmp_path / "extents" / "e.img").stat().st_size == 1536
        status, body = await post(
            "extent", ext(name="g", path="g.img", filesize="1GB", blocksize="4096", avail_threshold=80, rpm="15000")
        )
        assert status == 201 and (tmp_path / "extents" / "g.img").stat().st_size == 1 << 30
        assert body["iscsi_target_extent_blocksize"] == 4096 and body["iscsi_target_extent_avail_threshold"] == 80
        # 0 = auto: the size of an existing file.
        (tmp_path / "extents" / "pre.img").write_bytes(b"\0" * 4096)
        status, body = await post("extent", ext(name="pre", path="pre.img", filesize="0"))
        assert status == 201
        # Sizes are binary multiples.
        status, body = await post("extent", ext(name="t", path="t.img", filesize="2TB"))
        assert status == 201 and (tmp_path / "extents" / "t.img").stat().st_size == 2 << 40
        # A PUT never shrinks an extent file.
        status, body, _ = await h.call("PUT", f"{FN}/extent/{body['id']}/", {"iscsi_target_extent_filesize": "1TB"})
        assert status == 400


@aio
async def test_freenas_113_rules(tmp_path: Path) -> None:
    """Rules and messages of FreeNAS 11.3 (truenas/middleware freenas/11.3-stable:
    gui/services/models.py field lengths and validators; the messages of
    src/middlewared/middlewared/plugins/iscsi.py, which its forms call)."""
    too_long = "Ensure this value has at most {} characters (it has {})."
    async with harness(tmp_path) as h:

        async def refused(method: str, res: str, body: dict, field: str, *msgs: str) -> None:
            status, data, _ = await h.call(method, f"{FN}/{res}", body)
            assert status == 400 and data == {field: list(msgs)}, (body, data)

        async def send(method: str, res: str, body: dict) -> tuple[int, dict]:
            status, data, _ = await h.call(method, f"{FN}/{res}", body)
            return status, data

        # Thresholds: null or 1..99; 0 is a validation error (Django's MinValueValidator text).
        gc, thr = "globalconfiguration/", "iscsi_pool_avail_threshold"
        await refused("PUT", gc, {thr: 0}, thr, "Ensure this value is greater than or equal to 1.")
        await refused("PUT", gc, {thr: 100}, thr, "Ensure this value is less than or equal to 99.")
        assert await send("PUT", gc, {thr: 1}) == (200, {**(await send("GET", gc, {}))[1], thr: 1})
        # iSNS servers: IP[:port] each (IPv6 in brackets); host names are refused as FreeNAS did.
        servers = "192.0.2.1 192.0.2.2:3206 [2001:db8::1]:3205"
        status, body = await send("PUT", gc, {"iscsi_isns_servers": servers})
        assert status == 200 and body["iscsi_isns_servers"] == servers
        await refused(
            "PUT", gc, {"iscsi_isns_servers": "192.0.2.1 isns.example.com 2001:db8::1"}, "iscsi_isns_servers",
            'Server "isns.example.com" is not a valid IP(:PORT)? tuple.',
            'Server "2001:db8::1" is not a valid IP(:PORT)? tuple.',
        )
        assert h.engine.last.global_config.isns_servers == servers  # the refused change left nothing
        # The model's lengths: basename, names and comments 120, serial 16.
        basename = "iqn.2000-01.com.example:" + "a" * 100
        await refused("PUT", gc, {"iscsi_basename": basename}, "iscsi_basename", too_long.format(120, 124))
        portal = {"iscsi_target_portal_ips": ["127.0.0.1:3270"], "iscsi_target_portal_comment": "c" * 121}
        await refused("POST", "portal/", portal, "iscsi_target_portal_comment", too_long.format(120, 121))
        key = "iscsi_target_initiator_comment"
        await refused("POST", "authorizedinitiator/", {key: "c" * 121}, key, too_long.format(120, 121))
        key = "iscsi_target_name"
        await refused("POST", "target/", {key: "t" * 121}, key, too_long.format(120, 121))
        ext = {"iscsi_target_extent_name": "e1", "iscsi_target_extent_path": "e1.img"}
        ext["iscsi_target_extent_filesize"] = "1MB"
        for field, limit in (("comment", 120), ("name", 120), ("serial", 16), ("path", 120)):
            key = f"iscsi_target_extent_{field}"
            await refused("POST", "extent/", {**ext, key: "x" * (limit + 1)}, key, too_long.format(limit, limit + 1))
        # Double quotes: extent names and serials, target aliases; the alias "target" is reserved.
        quotes = "Double quotes are not allowed"
        for key, value in (("iscsi_target_extent_name", 'say "hi"'), ("iscsi_target_extent_serial", 'ab"c')):
            await refused("POST", "extent/", {**ext, key: value}, key, quotes)
        target = {"iscsi_target_name": "t1", "iscsi_target_alias": 'a"b'}
        await refused("POST", "target/", target, "iscsi_target_alias", quotes)
        target["iscsi_target_alias"] = "target"
        await refused("POST", "target/", target, "iscsi_target_alias", "target is a reserved word")
        assert (await send("POST", "target/", {"iscsi_target_name": "t1", "iscsi_target_alias": "a1"}))[0] == 201
        status, body = await send("POST", "target/", {"iscsi_target_name": "t2", "iscsi_target_alias": "a1"})
        assert status == 409 and body == {"iscsi_target_alias": ["Alias already exists"]}
        # File extent paths: a directory, or a path ending in "/", is an error on the path field.
        (tmp_path / "extents" / "adir").mkdir()
        path_key, not_a_file = "iscsi_target_extent_path", "You need to specify a filepath not a directory"
        for path in ("adir", "adir/", "newdir/", str(tmp_path / "extents" / "adir")):
            await refused("POST", "extent/", {**ext, path_key: path}, path_key, not_a_file)
        assert not (tmp_path / "extents" / "newdir").exists()
        # Size 0 ("auto") needs an existing file: the error is on the path.
        auto = {**ext, "iscsi_target_extent_filesize": "0"}
        await refused("POST", "extent/", auto, path_key, "The file must exist if the extent size is set to auto (0)")
        key = "iscsi_target_extent_filesize"
        await refused("POST", "extent/", {**ext, key: "1000"}, key, "File size must be a multiple of block size")
        assert not (tmp_path / "extents" / "e1.img").exists()
        # An authcredential sent without a tag joins auth group 1.
        status, body = await send(
            "POST", "authcredential/", {"iscsi_target_auth_user": "u", "iscsi_target_auth_secret": "s" * 12}
        )
        assert status == 201 and body["iscsi_target_auth_tag"] == 1
        # Target groups: iscsi_target_authgroup -1 means none (FreeNAS's form choice; opensvc sends it).
        tg = {"iscsi_target": 1, "iscsi_target_portalgroup": 1, "iscsi_target_authgroup": -1}
        status, body = await send("POST", "targetgroup/", tg)
        assert status == 201 and body["iscsi_target_authgroup"] is None
        status, body = await send("PUT", f"targetgroup/{body['id']}/", {"iscsi_target_authgroup": "-1"})
        assert status == 200 and body["iscsi_target_authgroup"] is None
        status, body = await send("PUT", "targetgroup/1/", {"iscsi_target_authgroup": -2})
        assert status == 400 and "iscsi_target_authgroup" in body


async def _raw_get(h, path: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """A GET sent as written (clients would take "//api" as a scheme-relative URL)."""
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


@aio
async def test_slashes_are_merged_as_nginx_did(tmp_path: Path) -> None:
    """FreeNAS sat behind nginx (merge_slashes on): ``target//`` was ``target/``."""
    async with harness(tmp_path) as h:
        status, body, _ = await h.call("POST", f"{FN}/target//", {"iscsi_target_name": "t1"})
        assert status == 201 and body["iscsi_target_name"] == "t1"
        status, body, _ = await h.call("GET", f"{FN}//target//1//?limit=0&format=json")
        assert status == 200 and body["id"] == 1
        status, body, _ = await h.call("GET", f"{FN}/target//?offset=1")  # the query string survives
        assert status == 200 and body == []
        status, body, headers = await h.call("GET", f"{FN}//nothing//")
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        status, body, headers = await h.call("PATCH", f"{FN}/target//1//", {})
        assert status == 405 and "PUT" in headers["Allow"]
        # Merged before authentication: "//api/..." is still protected.
        paths = (b"//api/v1.0/services/iscsi/target/", b"//v9//storage/iscsi-targets", b"///api//v2.0/system/version/")
        for path in paths:
            reply = await _raw_get(h, path)
            assert reply.startswith(b"HTTP/1.1 401"), (path, reply[:60])


@aio
async def test_extent_path_security(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    async with harness(tmp_path / "state") as h:
        root = tmp_path / "state" / "extents"
        (root / "escape").symlink_to(outside)
        (root / "link.img").symlink_to(outside / "victim.img")
        for path in (
            "../x.img",
            "a/../../x.img",
            str(outside / "x.img"),
            "/etc/passwd",
            "escape/x.img",
            "link.img",
            str(root),
            "",
            "a\x00b",
            "/dev/sda",
        ):
            status, body, _ = await h.call(
                "POST",
                f"{FN}/extent/",
                {
                    "iscsi_target_extent_name": "e",
                    "iscsi_target_extent_path": path,
                    "iscsi_target_extent_filesize": "1MB",
                },
            )
            assert status == 400 and "iscsi_target_extent_path" in body, (path, status, body)
        assert list(outside.iterdir()) == []
        # Disk extents must be block devices under /dev.
        for disk in ("../etc/passwd", "null", "/etc/passwd", "zvol/../../etc/passwd"):
            status, body, _ = await h.call(
                "POST",
                f"{FN}/extent/",
                {"iscsi_target_extent_name": "d", "iscsi_target_extent_type": "Disk", "iscsi_target_extent_disk": disk},
            )
            assert status == 400 and "iscsi_target_extent_disk" in body, disk
        # Nested directories inside the root are created; DELETE {"delete": true} removes the file.
        status, body, _ = await h.call(
            "POST",
            f"{FN}/extent/",
            {
                "iscsi_target_extent_name": "n",
                "iscsi_target_extent_path": "a/b/c.img",
                "iscsi_target_extent_filesize": "1MB",
            },
        )
        assert status == 201 and (root / "a" / "b" / "c.img").is_file()
        status, _, _ = await h.call("DELETE", f"{FN}/extent/{body['id']}/", {"delete": True})
        assert status == 204 and not (root / "a" / "b" / "c.img").exists()


@aio
async def test_auth_and_extra_endpoints(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, _, headers = await h.call("GET", f"{FN}/target/", auth=False)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        status, _, headers = await h.call("GET", f"{FN}/target/", auth=False, headers=basic("admin", "wrong"))
        assert status == 401 and "WWW-Authenticate" in headers
        status, _, _ = await h.call("GET", f"{FN}/target/", auth=False, headers={"Authorization": "Basic !!!"})
        assert status == 401
        status, body, _ = await h.call("GET", "/api/v1.0/system/version/")
        assert status == 200 and set(body) == {"fullversion", "version", "name"}
        status, body, _ = await h.call("GET", "/api/v1.0/services/services/iscsitarget/")
        assert status == 200 and body["srv_service"] == "iscsitarget" and body["srv_state"] == "RUNNING"
        assert set(body) == {"id", "srv_service", "srv_enable", "srv_state"}
        status, body, _ = await h.call("PUT", "/api/v1.0/services/services/iscsitarget/", {"srv_enable": "false"})
        assert status == 200 and body["srv_enable"] is False and body["srv_state"] == "STOPPED"
        assert h.engine.last.service_enabled is False
        status, body, _ = await h.call("PUT", "/api/v1.0/services/services/iscsitarget", {"srv_enable": True})
        assert status == 200 and body["srv_state"] == "RUNNING" and h.engine.last.service_enabled is True
        status, body, _ = await h.call("PUT", "/api/v1.0/services/services/iscsitarget/", {"srv_enable": "maybe"})
        assert status == 400
        # Errors are JSON, never HTML; unknown ids are 404.
        for method, path in (("GET", f"{FN}/target/999/"), ("PUT", f"{FN}/target/abc/"), ("DELETE", f"{FN}/extent/7/")):
            status, body, headers = await h.call(method, path, {})
            assert status == 404 and headers["Content-Type"].startswith("application/json"), (method, path)
        for odd in ("9" * 5000, "%C2%B2", "-1", "1.0", "0x1"):
            for method in ("GET", "PUT", "DELETE"):
                status, _, _ = await h.call(method, f"{FN}/target/{odd}/", {})
                assert status == 404, (method, odd[:10])
        status, body, _ = await h.call("POST", f"{FN}/target/", raw="[1, 2]")
        assert status == 400
        status, body, _ = await h.call("POST", f"{FN}/target/", raw=b"\xff\xfe")
        assert status == 400 and body == {"error": "Request is not valid JSON."}
        status, body, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": ["x"]})
        assert status == 400 and "iscsi_target_name" in body
        status, _, _ = await h.call("POST", f"{FN}/target/", raw="x" * (2 << 20))
        assert status == 413


@aio
async def test_engine_failure_rolls_back(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.engine.fail_next = OSError(98, "Address already in use")
        status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": ["127.0.0.1:3299"]})
        assert status == 400 and "Address already in use" in str(body)
        assert len(h.service.model.portal_groups) == 1
        assert len(h.store.load().portal_groups) == 1
        assert len(h.engine.last.portal_groups) == 1  # the old model was re-applied
        status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": ["127.0.0.1:3299"]})
        assert status == 201 and body["id"] == 3  # id 2 was burnt, never reused


@aio
async def test_concurrent_same_name_posts(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for round_ in range(5):
            results = await asyncio.gather(
                *(h.call("POST", f"{FN}/target/", {"iscsi_target_name": f"same{round_}"}) for _ in range(2))
            )
            assert sorted(r[0] for r in results) == [201, 409]
        results = await asyncio.gather(
            *(
                h.call(
                    "POST",
                    f"{FN}/extent/",
                    {
                        "iscsi_target_extent_name": "dup",
                        "iscsi_target_extent_path": f"d{i}",
                        "iscsi_target_extent_filesize": "1MB",
                    },
                )
                for i in range(4)
            )
        )
        assert sorted(r[0] for r in results) == [201, 409, 409, 409]


@aio
async def test_disk_extent_on_a_loop_device(tmp_path: Path) -> None:
    import shutil
    import subprocess

    import pytest

    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 8 << 20)
    if shutil.which("losetup") is None:
        pytest.skip("losetup not available")
    made = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a loop device: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        async with harness(tmp_path / "state") as h:
            body = {
                "iscsi_target_extent_type": "Disk",
                "iscsi_target_extent_name": "zvolextent",
                "iscsi_target_extent_disk": dev.removeprefix("/dev/"),
            }
            status, out, _ = await h.call("POST", f"{FN}/extent/", body)
            assert status == 201, out
            assert out["iscsi_target_extent_type"] == "Disk" and out["iscsi_target_extent_path"] == dev
            assert out["iscsi_target_extent_filesize"] == "0"
            assert h.engine.last.extents[out["id"]].path == dev
            status, out, _ = await h.call(
                "POST", f"{FN}/extent/", {**body, "iscsi_target_extent_name": "again", "iscsi_target_extent_disk": dev}
            )
            assert status == 409 and "iscsi_target_extent_disk" in out
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@aio
async def test_portals_and_service_switch_listeners_live(tmp_path: Path) -> None:
    from support.net import free_port

    first, second = free_port(), free_port()
    async with harness(tmp_path, portals=(f"127.0.0.1:{first}",), real_engine=True) as h:
        assert port_open("127.0.0.1", first)
        status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": [f"127.0.0.1:{second}"]})
        assert status == 201 and port_open("127.0.0.1", second)
        second_id = body["id"]
        svc = "/api/v1.0/services/services/iscsitarget/"
        status, body, _ = await h.call("PUT", svc, {"srv_enable": "false"})
        assert status == 200 and body["srv_state"] == "STOPPED"
        assert not port_open("127.0.0.1", first) and not port_open("127.0.0.1", second)
        status, body, _ = await h.call("PUT", svc, {"srv_enable": True})
        assert status == 200 and port_open("127.0.0.1", first) and port_open("127.0.0.1", second)
        status, _, _ = await h.call("DELETE", f"{FN}/portal/{second_id}/")
        assert status == 204 and not port_open("127.0.0.1", second) and port_open("127.0.0.1", first)
        # A port another program holds: the engine cannot bind, the change is undone (400, not 500).
        import socket

        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            busy = squatter.getsockname()[1]
            status, body, _ = await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": [f"127.0.0.1:{busy}"]})
            assert status == 400 and "in use" in str(body), body
        assert len(h.service.model.portal_groups) == 1 and len(h.store.load().portal_groups) == 1
