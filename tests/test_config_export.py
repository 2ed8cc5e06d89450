"""Configuration export and import: a fresh state dir reproduces every GET of both APIs; a
live import applies the difference and keeps the sessions of targets it does not touch."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import Daemon, RestError, wait_for
from support.net import free_port
from support.tools import missing
from test_cli import cli, ok

from pyscsi_target.config.export import FORMAT, VERSION

NATIVE = "/api/pyscsi/v1"
HN = "/v9/storage/iscsi-targets"


def native(d: Daemon, method: str, path: str, body: Any = None) -> Any:
    return d.rest(method, path, body, prefix=NATIVE)


def every_get(d: Daemon) -> dict[str, Any]:
    """Every GET the OpenAPI document lists for the FreeNAS and Hitachi APIs, each object's too."""
    doc = d.rest("GET", "openapi.json", prefix="/api")
    out: dict[str, Any] = {}
    items: list[tuple[str, str]] = []
    for path, ops in doc["paths"].items():
        if "get" not in ops or not path.startswith(("/api/v1.0/", "/v9/")):
            continue
        if "{" in path:
            items.append((path, re.search(r"\{(\w+)\}", path).group(1)))  # type: ignore[union-attr]
            continue
        out[path] = d.rest("GET", path, prefix="")
    for path, param in items:
        base = path[: path.index("{")]
        listing = out[base] if base in out else out[base.rstrip("/")]
        objs = listing["iscsiTargets"] if isinstance(listing, dict) else listing
        key = "objectId" if param.lower().endswith("objectid") else "id"
        assert objs, f"nothing to fetch through {path}"
        for o in objs:
            url = path.replace("{" + param + "}", str(o[key]))
            out[url] = d.rest("GET", url, prefix="")
    return out


def populate(d: Daemon) -> None:
    """Something of every kind, through both APIs, with ids that are not 1, 2, 3..."""
    d.rest("POST", "portal/", {"iscsi_target_portal_ips": [f"127.0.0.1:{free_port()}"],
                               "iscsi_target_portal_comment": "spare"})
    d.add_auth(5, "chapuser", "chap-secret-12", "peeruser", "peer-secret-12")
    ig = d.rest("POST", "authorizedinitiator/", {"iscsi_target_initiator_initiators": "iqn.2026-11.example:h1",
                                                 "iscsi_target_initiator_auth_network": "127.0.0.0/8"})
    d.add_target("t2", luns=((0, 8 << 20, 512), (5, 16 << 20, 4096)), initiators=None)
    t2 = next(g for g in d.rest("GET", "targetgroup/") if g["iscsi_target"] != 1)
    d.rest("PUT", f"targetgroup/{t2['id']}/", {"iscsi_target_initiatorgroup": ig["id"],
                                                "iscsi_target_authtype": "CHAP Mutual",
                                                "iscsi_target_authgroup": 5})
    d.rest("PUT", "globalconfiguration/", {"iscsi_pool_avail_threshold": 1})  # warn at 1 % free: quiet here
    d.rest("POST", "", {"alias": "HnasOne", "comment": "from /v9", "accessConfig": "127.0.0.1(rw); *(ro)",
                        "enableAuthentication": True, "secret": "hnas-secret"}, prefix=HN)
    hn = d.rest("GET", "", prefix=HN)["iscsiTargets"][-1]
    with pytest.raises(RestError) as see_other:  # 303 is how /v9 answers a PATCH
        d.rest("PATCH", hn["objectId"], {"regenerateGUN": True}, prefix=HN)  # a .g1 IQN to carry over
    assert see_other.value.status == 303 and ".g1" in see_other.value.body
    doomed = d.rest("POST", "target/", {"iscsi_target_name": "doomed"})
    d.rest("DELETE", f"target/{doomed['id']}/")  # ids are never reused: the import must keep that


def test_export_then_import_into_a_fresh_state_dir_gives_identical_views(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    a = daemon_factory()
    populate(a)
    before = every_get(a)
    doc = native(a, "GET", "config/")
    assert doc["format"] == FORMAT and doc["version"] == VERSION and doc["secrets"] == "included"
    assert doc["id_sequences"]["targets"] > max(t["id"] for t in doc["targets"])
    extent_root = a.state_dir / "extents"
    a.stop()  # its portal address is in the configuration: free it for the new daemon
    b = daemon_factory(demo=False, extra_args=["--extent-root", str(extent_root)])
    report = native(b, "PUT", "config/", doc)
    assert report["applied"] is True and report["files_created"] == []
    after = every_get(b)
    assert after.keys() == before.keys()
    for url in before:
        assert after[url] == before[url], url
    # The id sequences came along: the next target gets the id the original would have given.
    t = b.rest("POST", "target/", {"iscsi_target_name": "next"})
    assert t["id"] == doc["id_sequences"]["targets"] + 1
    # And the imported daemon serves: the demo LUN answers on the original portal.
    assert b.rest("GET", "portal/")[0]["iscsi_target_portal_ips"] == [a.portal]
    b.port = a.port
    out = subprocess.run(["iscsi-inq", b.url(0)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    b.assert_clean_log()


def test_offline_export_and_restore_before_first_start(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    a = daemon_factory()
    populate(a)
    before = every_get(a)
    a.stop()
    saved = tmp_path / "saved.json"
    ok(None, "config", "export", "--offline", "-o", str(saved), state_dir=a.state_dir)
    fresh = tmp_path / "fresh"
    args = ("config", "import", str(saved), "--offline", "--extent-root", str(a.state_dir / "extents"))
    assert "would change" in ok(None, *args, "--dry-run", state_dir=fresh)
    ok(None, *args, state_dir=fresh)
    refused = cli(None, "config", "export", "--offline", state_dir=tmp_path / "nothing-here")
    assert refused.returncode == 1 and "holds no configuration" in refused.stderr
    b = Daemon(fresh, demo=False, port=a.port, extra_args=["--extent-root", str(a.state_dir / "extents")])
    with b:
        after = every_get(b)
        # The daemon was started after the restore: a running one refuses an offline import.
        busy = cli(None, *args, state_dir=fresh)
        assert busy.returncode == 1 and "a daemon is running" in busy.stderr
    assert after == before


def test_redacted_export_and_validation(daemon: Daemon, tmp_path: Path) -> None:
    daemon.add_auth(3, "u1", "secret-one-12")
    redacted = native(daemon, "GET", "config/?redact=true")
    assert redacted["secrets"] == "redacted" and redacted["api_keys"] is None
    assert redacted["auth_credentials"][0]["secret"] is None
    assert "secret-one-12" not in json.dumps(redacted)
    # Into the same configuration the secrets are kept from the current credentials.
    report = native(daemon, "PUT", "config/", redacted)
    assert all(not any(c.values()) for c in report["changes"].values()), report
    assert daemon.rest("GET", "authcredential/")[0]["iscsi_target_auth_secret"] == "secret-one-12"
    # A redacted secret with no credential to take it from is an error naming the field.
    orphan = json.loads(json.dumps(redacted))
    orphan["auth_credentials"][0]["id"] = 77
    with pytest.raises(RestError) as err:
        native(daemon, "PUT", "config/", orphan)
    assert err.value.status == 400
    assert "auth_credentials[0].secret" in json.loads(err.value.body)["fields"]
    full = native(daemon, "GET", "config/")
    bad = [
        ({**full, "format": "other"}, "format"),
        ({**full, "version": VERSION + 1}, "version"),
        ({**full, "surprise": 1}, "surprise"),
        ({**full, "targets": [{**full["targets"][0], "name": "Bad Name"}]}, "targets[0].name"),
        ({**full, "targets": [{**full["targets"][0], "colour": "red"}]}, "targets[0].colour"),
        ({**full, "lun_maps": [{**full["lun_maps"][0], "extent": 999}]}, "lun_maps[0].extent"),
        ({**full, "extents": [{**full["extents"][0], "path": "/etc/passwd"}]}, "extents[0].path"),
        ({**full, "portal_groups": [{**full["portal_groups"][0], "tag": "one"}]}, "portal_groups[0].tag"),
    ]
    config_before = native(daemon, "GET", "config/")
    for doc, field in bad:
        with pytest.raises(RestError) as err:
            native(daemon, "PUT", "config/", doc)
        body = json.loads(err.value.body)
        assert err.value.status == 400 and field in body["fields"], (field, body)
    after = native(daemon, "GET", "config/")
    assert {k: v for k, v in after.items() if k != "exported"} == {
        k: v for k, v in config_before.items() if k != "exported"}


def test_cli_export_import_files(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "cfg.json"
    ok(daemon, "config", "export", "-o", str(out))
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc["targets"][0]["name"] == "demo"
    text = ok(daemon, "config", "import", str(out), "--dry-run")
    assert "nothing to change" in text
    doc["targets"].append({"id": 40, "name": "added"})
    out.write_text(json.dumps(doc))
    text = ok(daemon, "config", "import", str(out), "--dry-run")
    assert "would change" in text and "targets: 1 added" in text
    assert [t["iscsi_target_name"] for t in daemon.rest("GET", "target/")] == ["demo"]
    ok(daemon, "config", "import", str(out))
    assert [(t["id"], t["iscsi_target_name"]) for t in daemon.rest("GET", "target/")] == [(1, "demo"), (40, "added")]
    bad = cli(daemon, "config", "import", str(tmp_path / "missing.json"))
    assert bad.returncode == 1 and "cannot read" in bad.stderr


@pytest.mark.skipif(bool(missing("iscsi-perf")), reason="iscsi-perf (libiscsi-bin) not installed")
def test_live_import_keeps_sessions_of_untouched_targets(daemon: Daemon) -> None:
    daemon.add_target("t2")
    daemon.add_target("t3")
    initiator = "iqn.2026-11.org.pyscsi-target.test:live-import"
    perf = subprocess.Popen(["iscsi-perf", "-i", initiator, "-m", "2", "-b", "8", daemon.url(0)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sessions() -> list[dict[str, Any]]:
        return [s for s in native(daemon, "GET", "sessions/") if s["initiator"] == initiator]

    try:
        assert wait_for(lambda: len(sessions()) == 1, 20)
        tsih = sessions()[0]["tsih"]
        doc = native(daemon, "GET", "config/")
        t2 = next(t for t in doc["targets"] if t["name"] == "t2")
        t2["alias"] = "renamed alias"
        t3 = next(t for t in doc["targets"] if t["name"] == "t3")
        doc["targets"].remove(t3)
        doc["target_groups"] = [g for g in doc["target_groups"] if g["target"] != t3["id"]]
        doc["lun_maps"] = [m for m in doc["lun_maps"] if m["target"] != t3["id"]]
        doc["targets"].append({"id": 50, "name": "t4"})
        doc["target_groups"].append({"id": 50, "target": 50, "portal_group": doc["portal_groups"][0]["id"]})
        report = native(daemon, "PUT", "config/", doc)
        assert report["changes"]["targets"] == {"added": [50], "changed": [t2["id"]], "removed": [t3["id"]]}
        assert report["sessions_dropped"] == 0
        names = {t["iscsi_target_name"]: t for t in daemon.rest("GET", "target/")}
        assert set(names) == {"demo", "t2", "t4"} and names["t2"]["iscsi_target_alias"] == "renamed alias"
        # The demo session lived through it: same TSIH, and iscsi-perf is still reading.
        assert [s["tsih"] for s in sessions()] == [tsih]
        assert perf.poll() is None
        # Removing the target in use is refused unless forced, as a DELETE is.
        doc["targets"] = [t for t in doc["targets"] if t["name"] != "demo"]
        doc["target_groups"] = [g for g in doc["target_groups"] if g["target"] != 1]
        doc["lun_maps"] = [m for m in doc["lun_maps"] if m["target"] != 1]
        with pytest.raises(RestError) as err:
            native(daemon, "PUT", "config/", doc)
        assert err.value.status == 409 and "Target is in use" in err.value.body
        assert [s["tsih"] for s in sessions()] == [tsih]
        report = daemon.rest("PUT", "config/?force=true", doc, prefix=NATIVE)
        assert report["sessions_dropped"] == 1
        assert wait_for(lambda: not [s for s in sessions() if s["tsih"] == tsih], 10)
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(10)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait(5)
