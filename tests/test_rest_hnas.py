"""Hitachi NAS v9 iscsi-targets: the document's PATCH examples, the other methods, auth, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.net import free_port
from support.rest_harness import FN, HN, aio, basic, harness, run_tool

from pyscsi_target.config.store import api_key_create
from rest import hnas

TARGET_FIELDS = {
    "accessConfig",
    "alias",
    "comment",
    "globalUniqueName",
    "isAuthenticationEnabled",
    "iscsiLogicalUnits",
    "objectId",
    "secret",
    "virtualServerId",
}

# The document's REQUEST block, verbatim.
PATCH_REQUEST = (
    '{ "accessConfig": "", "alias": "example", "comment": "This is a comment", "enableAuthentication": false, '
    '"regenerateGUN": false, "secret": "secret1234" }'
)
# The body of the document's code samples (python/ruby/php/...), verbatim.
PATCH_SAMPLE = (
    '{"accessConfig":"","alias":"string","comment":"This is a comment","enableAuthentication":true,'
    '"regenerateGUN":true,"secret":"secret1234"}'
)
DOC_OBJECT_ID = "313a3a3a6e69636b3a3a3a3a3a3a303a3a3a4f49445f24232140255f56"


async def _setup_target(h) -> str:  # type: ignore[no-untyped-def]
    """A FreeNAS-built target with a portal group and one LUN; returns its /v9 objectId."""
    assert (await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "target"}))[0] == 201
    assert (await h.call("POST", f"{FN}/targetgroup/", {"iscsi_target": 1, "iscsi_target_portalgroup": 1}))[0] == 201
    ext = {"iscsi_target_extent_name": "LUN1", "iscsi_target_extent_path": "l1", "iscsi_target_extent_filesize": "1MB"}
    assert (await h.call("POST", f"{FN}/extent/", ext))[0] == 201
    assert (await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 1, "iscsi_extent": 1, "iscsi_lunid": 1}))[
        0
    ] == 201
    status, body, _ = await h.call("GET", HN)
    assert status == 200
    return body["iscsiTargets"][0]["objectId"]


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_document_patch_examples(tmp_path: Path, real: bool) -> None:
    """Both modes: over a recording engine, and over the real engine where a real initiator
    (libiscsi) checks each PATCH's effect: CHAP with the secret, the new IQN, accessConfig."""
    if real and shutil.which("iscsi-inq") is None:
        pytest.skip("needs libiscsi-bin")
    portal = f"127.0.0.1:{free_port()}"
    async with harness(tmp_path, portals=(portal,), real_engine=real) as h:
        oid = await _setup_target(h)
        status, body, headers = await h.call("GET", f"{HN}/{oid}")
        assert status == 200 and set(body["iscsiTarget"]) == TARGET_FIELDS
        iqn0 = body["iscsiTarget"]["globalUniqueName"]
        assert iqn0 == "iqn.2026-11.org.pyscsi-target:target"
        assert body["iscsiTarget"]["iscsiLogicalUnits"][0]["logicalUnit"] == 1
        assert body["iscsiTarget"]["iscsiLogicalUnits"][0]["logicalUnitAlias"] == "LUN1"

        # The REQUEST example: 303 See Other, Location, {"iscsiTarget": {...}, "uri": ...}.
        status, body, headers = await h.call("PATCH", f"{HN}/{oid}", raw=PATCH_REQUEST)
        assert status == 303, body
        assert headers["Location"] == body["uri"] == f"{HN}/{oid}"
        assert set(body) == {"iscsiTarget", "uri"} and set(body["iscsiTarget"]) == TARGET_FIELDS
        t = body["iscsiTarget"]
        assert t["alias"] == "example" and t["comment"] == "This is a comment" and t["accessConfig"] == ""
        assert t["isAuthenticationEnabled"] is False and t["secret"] == "secret1234"
        assert t["globalUniqueName"] == iqn0 and t["objectId"] == oid and t["virtualServerId"] == 1
        lu = t["iscsiLogicalUnits"][0]
        assert set(lu) == {"logicalUnit", "logicalUnitAlias", "objectId"} and isinstance(lu["objectId"], str)
        # The FreeNAS view shows the same state.
        status, fn_target, _ = await h.call("GET", f"{FN}/target/1/")
        assert fn_target["iscsi_target_alias"] == "example"

        # The code samples' body: enable CHAP with the secret, regenerate the IQN.
        status, body, headers = await h.call("PATCH", f"{HN}/{oid}", raw=PATCH_SAMPLE)
        assert status == 303 and headers["Location"] == body["uri"]
        t = body["iscsiTarget"]
        assert t["alias"] == "string" and t["isAuthenticationEnabled"] is True and t["secret"] == "secret1234"
        assert t["globalUniqueName"] != iqn0 and t["globalUniqueName"].startswith(iqn0)
        assert h.engine.model.target_iqn(h.engine.model.targets[1]) == t["globalUniqueName"]
        status, groups, _ = await h.call("GET", f"{FN}/targetgroup/")
        assert groups[0]["iscsi_target_authtype"] == "CHAP" and groups[0]["iscsi_target_authgroup"] is not None
        status, creds, _ = await h.call("GET", f"{FN}/authcredential/")
        assert creds == [
            {
                "id": creds[0]["id"],
                "iscsi_target_auth_tag": groups[0]["iscsi_target_authgroup"],
                "iscsi_target_auth_user": "target",  # the CHAP name rule: the target's name
                "iscsi_target_auth_secret": "secret1234",
                "iscsi_target_auth_peeruser": "",
                "iscsi_target_auth_peersecret": "",
            }
        ]
        if real:
            new_iqn = t["globalUniqueName"]
            url = f"iscsi://target%secret1234@{portal}/{new_iqn}/1"
            rc, out = await run_tool("iscsi-inq", url)
            assert rc == 0 and "DIRECT_ACCESS" in out, out
            rc, out = await run_tool("iscsi-inq", f"iscsi://target%wrong-secret@{portal}/{new_iqn}/1")
            assert rc != 0 and "(513)" in out, out  # 0x0201 authentication failure
            rc, out = await run_tool("iscsi-ls", f"iscsi://{portal}")
            assert f"Target:{new_iqn} " in out and f"Target:{iqn0} " not in out, out
            # accessConfig that excludes 127.0.0.1: the login is refused with 0x0202; blank again admits it.
            assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": "192.0.2.0/24"}))[0] == 303
            rc, out = await run_tool("iscsi-inq", url)
            assert rc != 0 and "(514)" in out, out
            assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": "127.0.0.1(rw)"}))[0] == 303
            assert (await run_tool("iscsi-inq", url))[0] == 0
            if shutil.which("qemu-io"):
                # "(ro)": the LUN is write-protected for this host; "(rw)" writes again.
                assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": "10.0.0.0/8, 127.0.0.1(ro)"}))[0] == 303
                rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "write 0 4096", url)
                assert rc != 0 and "write protected" in out, out  # qemu reads the WP bit of MODE SENSE
                rc, out = await run_tool("qemu-io", "-f", "raw", "-r", "-c", "read 0 4096", url)
                assert rc == 0 and "read 4096/4096" in out, out
                assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": "127.0.0.1(rw)"}))[0] == 303
                rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "write 0 4096", url)
                assert rc == 0 and "wrote 4096/4096" in out, out
            # A larger filesize through the FreeNAS view grows the LUN live.
            assert (await h.call("PUT", f"{FN}/extent/1/", {"iscsi_target_extent_filesize": "2MB"}))[0] == 200
            rc, out = await run_tool("iscsi-readcapacity16", "-s", url)
            assert rc == 0 and out.strip() == str(2 << 20), out
            assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": ""}))[0] == 303
        # Disable again, then change the secret alone: one credential, updated in place.
        status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"enableAuthentication": False})
        assert status == 303 and body["iscsiTarget"]["isAuthenticationEnabled"] is False
        assert (await h.call("GET", f"{FN}/targetgroup/1/"))[1]["iscsi_target_authtype"] == "None"
        status, body, _ = await h.call(
            "PATCH", f"{HN}/{oid}", {"secret": "another-secret", "enableAuthentication": True}
        )
        assert status == 303 and body["iscsiTarget"]["secret"] == "another-secret"
        assert len((await h.call("GET", f"{FN}/authcredential/"))[1]) == 1

        # The document's example objectId does not name anything here: the seed's 404 body.
        status, body, _ = await h.call("PATCH", f"{HN}/{DOC_OBJECT_ID}", raw=PATCH_REQUEST)
        assert status == 404
        assert set(body) == {"errorCode", "errorDetail", "errorMsg"}
        assert set(body["errorDetail"]) == {
            "detail",
            "fault",
            "fileName",
            "function",
            "lineNumber",
            "message",
            "reason",
            "returnedValue",
            "subCode",
        }
        for bad in ("zz", "00", "", "313a"):
            status, body, _ = await h.call("GET", f"{HN}/{bad}")
            assert status in (404, 200) if bad == "" else status == 404


@pytest.mark.parametrize("real", [False, True], ids=["app", "engine"])
@aio
async def test_seed_examples_on_a_fresh_target(tmp_path: Path, real: bool) -> None:
    """Both seed bodies, verbatim, on targets that are not exported yet.  The setting and the
    secret are the target's: stored at once, shown as stored (the REQUEST example's 303 shows
    "secret1234" although authentication stays off), and enforced - fail closed - on every
    target group the target gets later, FreeNAS-view ones included.  With the real engine a
    real initiator (libiscsi) proves it: CHAP demanded, a wrong secret gets 0x0201."""
    portal = f"127.0.0.1:{free_port()}"
    async with harness(tmp_path, portals=(portal,), real_engine=real) as h:

        async def fresh_target(name: str, body: str) -> tuple[str, dict]:
            """A target made through the FreeNAS view, exported nowhere, PATCHed with ``body``."""
            status, made, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": name})
            assert status == 201
            oid = hnas.object_id("iscsi-target", made["id"])
            status, reply, _ = await h.call("PATCH", f"{HN}/{oid}", raw=body)
            assert status == 303 and reply["iscsiTarget"]["secret"] == "secret1234", reply
            return oid, reply["iscsiTarget"]

        # The REQUEST example: authentication off, the secret kept and shown as stored.
        oid, t = await fresh_target("plain", PATCH_REQUEST)
        assert t["isAuthenticationEnabled"] is False and t["alias"] == "example"
        assert (await h.call("GET", f"{HN}/{oid}"))[1]["iscsiTarget"]["secret"] == "secret1234"
        # The code samples' body: enabled before the target is exported.
        oid, t = await fresh_target("fresh", PATCH_SAMPLE)
        assert t["isAuthenticationEnabled"] is True and t["alias"] == "string"
        iqn = t["globalUniqueName"]
        assert iqn == "iqn.2026-11.org.pyscsi-target:fresh.g1"  # regenerateGUN
        # Exported later through the FreeNAS view, the way democratic-csi asks (authtype "None",
        # no auth group): the group demands CHAP with the target's secret all the same.
        tg = {"iscsi_target": 2, "iscsi_target_portalgroup": 1, "iscsi_target_authtype": "None"}
        tg["iscsi_target_authgroup"] = None
        status, group, _ = await h.call("POST", f"{FN}/targetgroup/", tg)
        assert status == 201 and group["iscsi_target_authtype"] == "CHAP"
        creds = (await h.call("GET", f"{FN}/authcredential/"))[1]
        own = [c for c in creds if c["iscsi_target_auth_tag"] == group["iscsi_target_authgroup"]]
        assert [(c["iscsi_target_auth_user"], c["iscsi_target_auth_secret"]) for c in own] == [("fresh", "secret1234")]
        # A FreeNAS PUT asking for less keeps CHAP: only enableAuthentication false turns it off.
        status, group, _ = await h.call(
            "PUT", f"{FN}/targetgroup/{group['id']}/", {"iscsi_target_authtype": "None", "iscsi_target_authgroup": ""}
        )
        assert status == 200 and group["iscsi_target_authtype"] == "CHAP" and group["iscsi_target_authgroup"]
        ext = {"iscsi_target_extent_name": "lun0", "iscsi_target_extent_path": "l0"}
        ext["iscsi_target_extent_filesize"] = "1MB"
        assert (await h.call("POST", f"{FN}/extent/", ext))[0] == 201
        assert (await h.call("POST", f"{FN}/targettoextent/", {"iscsi_target": 2, "iscsi_extent": 1}))[0] == 201
        if real:
            good = f"iscsi://fresh%secret1234@{portal}/{iqn}/0"
            rc, out = await run_tool("iscsi-inq", good)
            assert rc == 0 and "DIRECT_ACCESS" in out, out
            rc, out = await run_tool("iscsi-inq", f"iscsi://fresh%wrong-secret1@{portal}/{iqn}/0")
            assert rc != 0 and "(513)" in out, out  # 0x0201 authentication failure
            rc, out = await run_tool("iscsi-inq", f"iscsi://{portal}/{iqn}/0")
            assert rc != 0 and "(513)" in out, out  # no CHAP offered: refused too
        # Disabled: the stored secret stays (for a later re-enable) and logins need no CHAP.
        status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"enableAuthentication": False})
        assert status == 303 and body["iscsiTarget"]["secret"] == "secret1234"
        assert body["iscsiTarget"]["isAuthenticationEnabled"] is False
        if real:
            rc, out = await run_tool("iscsi-inq", f"iscsi://{portal}/{iqn}/0")
            assert rc == 0 and "DIRECT_ACCESS" in out, out
        # Re-enabled without a secret: the stored one is used again.
        status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"enableAuthentication": True})
        assert status == 303 and body["iscsiTarget"]["isAuthenticationEnabled"] is True
        if real:
            rc, out = await run_tool("iscsi-inq", f"iscsi://{portal}/{iqn}/0")
            assert rc != 0 and "(513)" in out, out
        # The credential deleted through the FreeNAS view: logins fail (closed), not open.
        for c in own:
            assert (await h.call("DELETE", f"{FN}/authcredential/{c['id']}/"))[0] == 204
        if real:
            rc, out = await run_tool("iscsi-inq", f"iscsi://fresh%secret1234@{portal}/{iqn}/0")
            assert rc != 0 and "(513)" in out, out
        # ...and a new target group then needs a secret first.
        assert (await h.call("POST", f"{FN}/portal/", {"iscsi_target_portal_ips": [f"127.0.0.1:{free_port()}"]}))[
            0
        ] == 201
        status, body, _ = await h.call("POST", f"{FN}/targetgroup/", {**tg, "iscsi_target_portalgroup": 2})
        assert status == 400 and "iscsi_target_authgroup" in body
        status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"secret": "another-one"})
        assert status == 303 and body["iscsiTarget"]["secret"] == "another-one"
        status, body, _ = await h.call("POST", f"{FN}/targetgroup/", {**tg, "iscsi_target_portalgroup": 2})
        assert status == 201 and body["iscsi_target_authtype"] == "CHAP"


@aio
async def test_access_config_and_errors(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        oid = await _setup_target(h)
        cfg = "127.0.0.1(ro), 10.0.0.0/8; 192.168.1.0/24 (rw) , *(ro)"
        status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": cfg})
        assert status == 303 and body["iscsiTarget"]["accessConfig"] == cfg
        assert h.engine.last.targets[1].access_config == cfg
        for bad in ("bogus", "10.0.0.1(rx)", "10.0.0.1,,10.0.0.2", "host.example.com", "10.0.0.0/40"):
            status, body, _ = await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": bad})
            assert status == 400 and set(body) == {"errorCode", "errorMsg"} and "accessConfig" in body["errorMsg"], bad
        assert h.service.model.targets[1].access_config == cfg  # unchanged by refused PATCHes
        # Type errors and invalid JSON: 400 with the seed's body.
        for raw in ('{"enableAuthentication": "yes"}', '{"alias": 5}', "{", "[]"):
            status, body, _ = await h.call("PATCH", f"{HN}/{oid}", raw=raw)
            assert status == 400 and set(body) == {"errorCode", "errorMsg"}, raw
        # Enabling authentication without any secret is refused.
        assert (await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "bare"}))[0] == 201
        assert (await h.call("POST", f"{FN}/targetgroup/", {"iscsi_target": 2, "iscsi_target_portalgroup": 1}))[
            0
        ] == 201
        oid2 = (await h.call("GET", HN))[1]["iscsiTargets"][1]["objectId"]
        status, body, _ = await h.call("PATCH", f"{HN}/{oid2}", {"enableAuthentication": True})
        assert status == 400 and "secret" in body["errorMsg"]


@aio
async def test_create_list_delete(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, headers = await h.call(
            "POST", HN, {"alias": "Target1", "comment": "c", "accessConfig": "127.0.0.1", "virtualServerId": 1}
        )
        assert status == 201 and headers["Location"] == body["uri"]
        t = body["iscsiTarget"]
        assert set(t) == TARGET_FIELDS and t["alias"] == "Target1" and t["globalUniqueName"].endswith(":target1")
        # Exported on every portal group, as a /v9 target has no portal of its own.
        assert [g.portal_group for g in h.engine.last.target_groups.values()] == [1]
        status, body, _ = await h.call("POST", HN, {"alias": "Target1"})
        assert status == 409 and set(body) == {"errorCode", "errorMsg"}
        status, body, _ = await h.call(
            "POST", HN, {"alias": "secure", "enableAuthentication": True, "secret": "s" * 12}
        )
        assert status == 201 and body["iscsiTarget"]["isAuthenticationEnabled"] is True
        status, body, _ = await h.call("POST", HN, {})
        assert status == 400
        status, body, _ = await h.call("GET", HN)
        assert status == 200 and [t["alias"] for t in body["iscsiTargets"]] == ["Target1", "secure"]
        oid = body["iscsiTargets"][0]["objectId"]
        h.engine.sessions[1] = 1
        status, body, _ = await h.call("DELETE", f"{HN}/{oid}")
        assert status == 409 and "in use" in body["errorMsg"]
        h.engine.sessions.clear()
        status, body, _ = await h.call("DELETE", f"{HN}/{oid}")
        assert status == 204
        status, body, _ = await h.call("GET", f"{HN}/{oid}")
        assert status == 404 and body["errorCode"] == 1081345


@aio
async def test_v9_authentication(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await _setup_target(h)
        status, body, headers = await h.call("GET", HN, auth=False)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        status, _, _ = await h.call("GET", HN, auth=False, headers=basic("admin", "nope"))
        assert status == 401
        # X-Subsystem-User + X-Subsystem-Password: the same user store as Basic.
        sub = {"X-Subsystem-User": "admin", "X-Subsystem-Password": "s3cret-pass"}
        assert (await h.call("GET", HN, auth=False, headers=sub))[0] == 200
        assert (await h.call("GET", HN, auth=False, headers={**sub, "X-Subsystem-Password": "x"}))[0] == 401
        # API keys, created the way `pyscsi-target api-key create` does (usable at once).
        key_all = api_key_create(tmp_path, [])
        key_vs2 = api_key_create(tmp_path, [2])
        assert (await h.call("GET", HN, auth=False, headers={"X-Api-Key": key_all}))[0] == 200
        assert (await h.call("GET", HN, auth=False, headers={"X-Api-Key": key_all + "x"}))[0] == 401
        status, body, _ = await h.call("GET", HN, auth=False, headers={"X-Api-Key": key_vs2})
        assert status == 200 and body == {"iscsiTargets": []}  # target 1 is on virtual server 1
        oid = (await h.call("GET", HN))[1]["iscsiTargets"][0]["objectId"]
        for method, body_ in (("GET", None), ("PATCH", {"comment": "x"}), ("DELETE", None)):
            status, body, _ = await h.call(method, f"{HN}/{oid}", body_, auth=False, headers={"X-Api-Key": key_vs2})
            assert status == 403 and body == {
                "errorMsg": "Forbidden request - the client does not have the required permissions to perform the "
                "operation"
            }
        status, body, _ = await h.call("POST", HN, {"alias": "x"}, auth=False, headers={"X-Api-Key": key_vs2})
        assert status == 403
        status, body, _ = await h.call(
            "POST", HN, {"alias": "x", "virtualServerId": 2}, auth=False, headers={"X-Api-Key": key_vs2}
        )
        assert status == 201 and body["iscsiTarget"]["virtualServerId"] == 2
        # API keys are for /v9 only; the key is stored hashed.
        assert (await h.call("GET", f"{FN}/target/", auth=False, headers={"X-Api-Key": key_all}))[0] == 401
        db = (tmp_path / "config.db").read_bytes() + (tmp_path / "config.db-wal").read_bytes()
        assert key_all.encode() not in db and key_all.split("_")[-1].encode() not in db


@aio
async def test_openapi_document(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, doc, _ = await h.call("GET", "/api/openapi.json", auth=False)
        assert status == 200 and doc["openapi"].startswith("3.")
        paths = doc["paths"]
        for res in (
            "portal",
            "authorizedinitiator",
            "authcredential",
            "target",
            "targetgroup",
            "extent",
            "targettoextent",
        ):
            assert set(paths[f"{FN}/{res}/"]) == {"get", "post"}
            assert {"get", "put", "delete"} <= set(paths[f"{FN}/{res}/{{id}}/"])
        assert set(paths[f"{HN}/{{iscsiTargetObjectId}}"]) >= {"get", "patch", "delete"}
        assert "303" in paths[f"{HN}/{{iscsiTargetObjectId}}"]["patch"]["responses"]
        json.dumps(doc)
