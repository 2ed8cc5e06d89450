"""REST edges (issue 10, defect 8).

- A write from a browser on another site (cached Basic credentials) is refused, and so is
  a write whose body is not JSON (a cross-site form sends text/plain without a preflight):
  403 / 415 in each API's error shape.  Same-origin browser writes and plain clients work.
- Text that cannot be UTF-8 (a lone surrogate from a ``\\uD800`` escape) or is too long is
  a 400 on the field, never a 500, and never stored (an alias with one broke every login).
- ``--demo`` adds the demo only to an empty state dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.rest_harness import FN, HN, aio, harness

from pyscsi_target.config.model import PortalGroup
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from rest.native import BASE as NATIVE

TARGET = {"iscsi_target_name": "t1"}


@aio
async def test_cross_site_and_non_json_writes_are_refused(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # The attack of the issue: a text/plain body with a foreign Origin.
        status, body, _ = await h.call("POST", f"{FN}/target/", raw='{"iscsi_target_name": "evil"}',
                                       headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert status == 403 and set(body) == {"error"} and "Cross-origin" in body["error"], body
        # text/plain alone (no Origin: an older browser, or a form's fetch in no-cors mode)
        status, body, _ = await h.call("POST", f"{FN}/target/", raw='{"iscsi_target_name": "evil"}',
                                       headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in body["error"], body
        for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
            status, _, _ = await h.call("PUT", f"{FN}/globalconfiguration/",
                                        raw='{"iscsi_basename": "iqn.2000-01.x:y"}', headers={"Content-Type": ctype})
            assert status == 415, ctype
        # Fetch metadata: a cross-site or same-site (another port or subdomain) request
        for site in ("cross-site", "same-site"):
            status, body, _ = await h.call("DELETE", f"{FN}/target/1/", headers={"Sec-Fetch-Site": site})
            assert status == 403 and "Sec-Fetch-Site" in body["error"], body
        status, _, _ = await h.call("POST", f"{FN}/target/", TARGET, headers={"Origin": "null"})
        assert status == 403
        # The HNAS and native APIs answer in their own shapes.
        status, body, _ = await h.call("POST", HN, raw='{"alias": "x"}', headers={"Content-Type": "text/plain"})
        assert status == 415 and set(body) >= {"errorCode", "errorMsg"}, body
        status, body, _ = await h.call("POST", HN, {"alias": "x"}, headers={"Origin": "https://evil.example"})
        assert status == 403 and "errorMsg" in body, body
        status, body, _ = await h.call("PUT", f"{NATIVE}/config/", raw="{}", headers={"Content-Type": "text/plain"})
        assert status == 415 and set(body) == {"error", "fields"}, body
        # nothing was created by any of them
        assert (await h.call("GET", f"{FN}/target/"))[1] == []
        assert (await h.call("GET", HN))[1]["iscsiTargets"] == []
        # Reads are not affected; same-origin browser writes and plain JSON clients work.
        assert (await h.call("GET", f"{FN}/target/", headers={"Sec-Fetch-Site": "cross-site"}))[0] == 200
        own = f"http://{h.client.host}:{h.client.port}" if h.client is not None else h.base_url
        status, _, _ = await h.call("POST", f"{FN}/target/", TARGET,
                                    headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert status == 201
        status, _, _ = await h.call("POST", f"{FN}/target/", {"iscsi_target_name": "t2"},
                                    headers={"Content-Type": "application/json; charset=utf-8"})
        assert status == 201
        assert (await h.call("DELETE", f"{FN}/target/2/"))[0] == 204  # no body, no Content-Type


LONE = "a\ud800b"


@pytest.mark.parametrize(("path", "body", "field"), [
    (f"{FN}/extent/", {"iscsi_target_extent_name": "x" * 300, "iscsi_target_extent_path": "a.img",
                       "iscsi_target_extent_filesize": "1MB"}, "iscsi_target_extent_name"),
    (f"{FN}/extent/", {"iscsi_target_extent_name": LONE, "iscsi_target_extent_path": "a.img",
                       "iscsi_target_extent_filesize": "1MB"}, "iscsi_target_extent_name"),
    (f"{FN}/extent/", {"iscsi_target_extent_name": "e", "iscsi_target_extent_path": f"{LONE}.img",
                       "iscsi_target_extent_filesize": "1MB"}, "iscsi_target_extent_path"),
    (f"{FN}/target/", {"iscsi_target_name": "t", "iscsi_target_alias": "al\udc80"}, "iscsi_target_alias"),
    (f"{FN}/authorizedinitiator/", {"iscsi_target_initiator_initiators": f"iqn.2000-01.x:{LONE}",
                                    "iscsi_target_initiator_tag": 1}, "iscsi_target_initiator_initiators"),
    (f"{FN}/authcredential/", {"iscsi_target_auth_tag": 1, "iscsi_target_auth_user": "u",
                               "iscsi_target_auth_secret": f"secret{LONE}12345"}, "iscsi_target_auth_secret"),
])
def test_bad_text_is_400_on_the_field(tmp_path: Path, path: str, body: dict[str, object], field: str) -> None:
    @aio
    async def run() -> None:
        async with harness(tmp_path) as h:
            status, answer, _ = await h.call("POST", path, body)
            assert status == 400 and field in answer, answer
            listed = (await h.call("GET", path))[1]
            assert listed == [], listed

    run()


@aio
async def test_hnas_lone_surrogate_alias_is_400(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, _ = await h.call("POST", HN, {"alias": "x\ud800", "virtualServerId": 1})
        assert status == 400 and "alias" in body["errorMsg"] and "surrogate" in body["errorMsg"], body
        assert (await h.call("GET", HN))[1]["iscsiTargets"] == []


@aio
async def test_demo_only_on_an_empty_state_dir(tmp_path: Path) -> None:
    from support.rest_harness import FakeEngine

    service = ConfigService(ConfigStore(tmp_path), FakeEngine())
    await service.start(default_portals=["127.0.0.1:3260"])  # a first start without --demo
    pg = await service.create_portal_group({"tag": 2, "listen": ["127.0.0.1:3261"], "comment": "admin's"})
    assert isinstance(pg, PortalGroup)
    restarted = ConfigService(ConfigStore(tmp_path), FakeEngine())
    await restarted.start(default_portals=["127.0.0.1:3260"], demo=True)
    assert restarted.model.targets == {} and restarted.model.extents == {}  # nothing exported to all
    # while a new state dir still gets it
    fresh = ConfigService(ConfigStore(tmp_path / "new"), FakeEngine())
    await fresh.start(default_portals=["127.0.0.1:3260"], demo=True)
    assert [t.name for t in fresh.model.targets.values()] == ["demo"]


def test_first_start_on_a_taken_portal_fails_in_one_line_and_seeds_nothing(tmp_path: Path) -> None:
    """`make run` where another target holds the port: one line, exit 1, and the state dir stays
    unseeded, so the next start (the port freed) still adds the demo."""
    import socket
    import subprocess
    import sys

    from support.daemon import Daemon
    from support.net import free_port

    state = tmp_path / "state"
    with socket.socket() as other:
        port = free_port()
        other.bind(("127.0.0.1", port))
        other.listen()
        out = subprocess.run([sys.executable, "-m", "pyscsi_target", "serve", "--demo", "--state-dir", str(state),
                              "--portal", f"127.0.0.1:{port}", "--api", f"127.0.0.1:{free_port()}"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and f"cannot start: cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]
    with Daemon(state, port=port) as d:  # the port free again: the demo is there
        assert [t["iscsi_target_name"] for t in d.rest("GET", "target/")] == ["demo"]
        d.assert_clean_log()
