"""SQLite store: persistence across restarts, id allocation, PR state, API keys, admin password."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.rest_harness import FN, HN, aio, harness

from pyscsi_target.config.model import ConfigModel, PortalGroup, Target
from pyscsi_target.config.store import ConfigStore, admin_credentials, api_key_create


def test_ids_never_reused_and_model_round_trip(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    assert store.is_empty()
    model = ConfigModel()
    with store.transaction() as tx:
        for name in ("a", "b", "c"):
            tid = tx.new_id("targets")
            model.targets[tid] = Target(id=tid, name=name, alias=name.upper(), access_config="10.0.0.0/8(ro)")
        pid = tx.new_id("portal_groups")
        model.portal_groups[pid] = PortalGroup(id=pid, tag=1, listen=["127.0.0.1:3260", "[::1]:3260"])
        tx.sync(ConfigModel(), model)
    assert not store.is_empty()
    assert store.load() == model
    # Delete the highest id, reopen: the next id is still new.
    new = model.copy()
    del new.targets[3]
    with store.transaction() as tx:
        tx.sync(model, new)
    store.close()
    store = ConfigStore(tmp_path)
    assert store.load() == new
    with store.transaction() as tx:
        assert tx.new_id("targets") == 4
    # A rolled-back transaction leaves nothing behind.
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.sync(new, ConfigModel())
        raise RuntimeError("abort")
    assert store.load().targets.keys() == {1, 2}
    assert store.path.stat().st_mode & 0o077 == 0
    store.close()


def test_pr_store_protocol(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    pr = store.pr_store
    assert pr.load("0x3000000000000001") is None
    pr.save("0x3000000000000001", b"\x01\x02")
    pr.save("0x3000000000000002", b"")
    store.close()
    pr = ConfigStore(tmp_path).pr_store
    assert pr.load("0x3000000000000001") == b"\x01\x02"
    assert pr.load("0x3000000000000002") == b""
    pr.save("0x3000000000000001", None)
    assert pr.load("0x3000000000000001") is None


def test_api_keys(tmp_path: Path) -> None:
    key = api_key_create(tmp_path, [3, 1, 3])
    other = api_key_create(tmp_path, [])
    assert key != other and key.startswith("pst_")
    store = ConfigStore(tmp_path)
    assert store.check_api_key(key) == [1, 3]
    assert store.check_api_key(other) == []
    assert store.check_api_key(key[:-1]) is None
    assert store.check_api_key("") is None
    assert [vs for _, vs in store.list_api_keys()] == [[1, 3], []]
    assert store.delete_api_key(1) and store.check_api_key(key) is None


def test_admin_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("PYSCSI_TARGET_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("PYSCSI_TARGET_ADMIN_USER", raising=False)
    with caplog.at_level("WARNING"):
        user, pw = admin_credentials(tmp_path)
    path = tmp_path / "admin-password"
    assert user == "admin" and len(pw) >= 16 and str(path) in caplog.text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert admin_credentials(tmp_path) == ("admin", pw)  # stable across restarts
    monkeypatch.setenv("PYSCSI_TARGET_ADMIN_USER", "root")
    monkeypatch.setenv("PYSCSI_TARGET_ADMIN_PASSWORD", "given")
    assert admin_credentials(tmp_path) == ("root", "given")


@aio
async def test_restart_keeps_every_object(tmp_path: Path) -> None:
    """A new store + service on the same state dir serves the same objects; ids are not reused."""
    paths = [
        f"{FN}/{r}/"
        for r in (
            "portal",
            "authorizedinitiator",
            "authcredential",
            "target",
            "targetgroup",
            "extent",
            "targettoextent",
        )
    ]
    paths += [f"{FN}/globalconfiguration/", "/api/v1.0/services/services/iscsitarget/", HN]
    async with harness(tmp_path) as h:
        calls = [
            ("POST", "authorizedinitiator", {"iscsi_target_initiator_initiators": "iqn.1993-08.org.debian:01:x"}),
            (
                "POST",
                "authcredential",
                {"iscsi_target_auth_tag": 1, "iscsi_target_auth_user": "u", "iscsi_target_auth_secret": "abcdefghijkl"},
            ),
            ("POST", "target", {"iscsi_target_name": "keep"}),
            ("POST", "target", {"iscsi_target_name": "drop"}),
            (
                "POST",
                "targetgroup",
                {
                    "iscsi_target": 1,
                    "iscsi_target_portalgroup": 1,
                    "iscsi_target_authtype": "CHAP",
                    "iscsi_target_authgroup": 1,
                    "iscsi_target_initiatorgroup": 1,
                },
            ),
            (
                "POST",
                "extent",
                {
                    "iscsi_target_extent_name": "e",
                    "iscsi_target_extent_path": "e.img",
                    "iscsi_target_extent_filesize": "4MB",
                    "iscsi_target_extent_blocksize": 4096,
                },
            ),
            ("POST", "targettoextent", {"iscsi_target": 1, "iscsi_extent": 1}),
            ("DELETE", "target/2", None),
        ]
        for method, res, body in calls:
            status, _, _ = await h.call(method, f"{FN}/{res}/", body)
            assert status in (201, 204), (method, res)
        oid = (await h.call("GET", HN))[1]["iscsiTargets"][0]["objectId"]
        assert (await h.call("PATCH", f"{HN}/{oid}", {"accessConfig": "127.0.0.1", "regenerateGUN": True}))[0] == 303
        assert (await h.call("PUT", f"{FN}/globalconfiguration/", {"iscsi_basename": "iqn.2000-01.org.example"}))[
            0
        ] == 200
        before = {p: (await h.call("GET", p))[1] for p in paths}
    async with harness(tmp_path) as h:
        after = {p: (await h.call("GET", p))[1] for p in paths}
        assert after == before
        # The restarted service applied the loaded model to the engine straight away.
        assert h.engine.applied and h.engine.last.targets[1].access_config == "127.0.0.1"
        status, body, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "new"})
        assert status == 201 and body["id"] == 3
