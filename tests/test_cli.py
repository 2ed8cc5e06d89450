"""The operator CLI against a running daemon: ls with a live libiscsi session, create/map/
delete round trips checked against the API, progress, image import, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import ADMIN_PASSWORD, ROOT, Daemon, RestError, wait_for
from support.tools import missing

PERF_INITIATOR = "iqn.2026-11.org.pyscsi-target.test:cli-perf"


def cli(d: Daemon | None, *args: str, env: dict[str, str] | None = None, state_dir: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m pyscsi_target ARGS`` as an operator on the daemon's host runs it."""
    base = {**os.environ, "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})}
    base.pop("PYSCSI_TARGET_STATE_DIR", None)
    where = ["--state-dir", str(state_dir or (d.state_dir if d else "/nonexistent"))]
    if args and args[0] in ("completion", "--version"):
        where = []
    # Options follow the command: find where the positional words end.
    return subprocess.run([sys.executable, "-m", "pyscsi_target", *args, *where], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(d: Daemon | None, *args: str, **kw: Any) -> str:
    out = cli(d, *args, **kw)
    assert out.returncode == 0, f"{args}: rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def cli_json(d: Daemon, *args: str) -> Any:
    return json.loads(ok(d, *args, "--json"))


@pytest.fixture
def perf_session(daemon: Daemon) -> Iterator[subprocess.Popen[bytes]]:
    """A live libiscsi session doing reads (iscsi-perf) on the demo LUN."""
    if missing("iscsi-perf"):
        pytest.skip("iscsi-perf (libiscsi-bin) not installed")
    proc = subprocess.Popen(["iscsi-perf", "-i", PERF_INITIATOR, "-m", "2", "-b", "8", daemon.url(0)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any(s["initiator"] == PERF_INITIATOR
                                    for s in daemon.rest("GET", "sessions/", prefix="/api/pyscsi/v1")), 20)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_ls_shows_demo_target_lun_and_live_libiscsi_session(daemon: Daemon, perf_session: Any) -> None:
    text = ok(daemon, "ls")
    assert daemon.iqn in text
    assert "LUN 0  demo  File 1.0 GiB, 512-byte blocks" in text
    assert f"tag 1  {daemon.portal}" in text
    session_line = next(line for line in text.splitlines() if PERF_INITIATOR in line)
    assert "from 127.0.0.1:" in session_line and "TSIH" in session_line
    # The session sits under the demo target, after its LUN.
    assert text.index(daemon.iqn) < text.index("LUN 0") < text.index(PERF_INITIATOR)
    long = ok(daemon, "ls", "-l")
    assert "MaxRecvDataSegmentLength=" in long and "HeaderDigest=None" in long and "CmdSN window" in long
    assert "MaxRecvDataSegmentLength" not in text
    data = cli_json(daemon, "ls")
    assert {"config", "sessions", "extents"} <= data.keys()
    assert any(s["initiator"] == PERF_INITIATOR and s["target"] == daemon.iqn for s in data["sessions"])
    assert all(c.get("secret") is None for c in data["config"]["auth_credentials"])
    table = ok(daemon, "sessions")
    assert PERF_INITIATOR in table and daemon.iqn in table


def test_create_map_delete_round_trips_match_the_api(daemon: Daemon) -> None:
    extents_dir = daemon.state_dir / "extents"
    ok(daemon, "extent", "create", "e1", "--size", "64MB", "--blocksize", "4096", "--rpm", "7200")
    e1 = next(e for e in daemon.rest("GET", "extent/") if e["iscsi_target_extent_name"] == "e1")
    assert e1["iscsi_target_extent_path"] == str(extents_dir / "e1.img")
    assert e1["iscsi_target_extent_filesize"] == "64MB" and e1["iscsi_target_extent_blocksize"] == 4096
    assert e1["iscsi_target_extent_rpm"] == "7200" and os.path.getsize(extents_dir / "e1.img") == 64 << 20

    ok(daemon, "initiator-group", "create", "--initiators", "iqn.2026-11.example:host1", "--networks", "127.0.0.0/8")
    ig = daemon.rest("GET", "authorizedinitiator/")[0]
    assert ig["iscsi_target_initiator_initiators"] == "iqn.2026-11.example:host1"
    ok(daemon, "chap", "create", "1", "cliuser", env={"PYSCSI_TARGET_CHAP_SECRET": "cli-secret-123"})
    cred = daemon.rest("GET", "authcredential/")[0]
    assert (cred["iscsi_target_auth_user"], cred["iscsi_target_auth_secret"]) == ("cliuser", "cli-secret-123")
    assert "cli-secret-123" not in ok(daemon, "chap", "list") + ok(daemon, "chap", "list", "--json")

    ok(daemon, "target", "create", "t1", "--alias", "first", "--initiator-group", str(ig["iscsi_target_initiator_tag"]),
       "--auth", "CHAP", "--auth-group", "1")
    t1 = next(t for t in daemon.rest("GET", "target/") if t["iscsi_target_name"] == "t1")
    assert t1["iscsi_target_alias"] == "first"
    groups = [g for g in daemon.rest("GET", "targetgroup/") if g["iscsi_target"] == t1["id"]]
    assert [(g["iscsi_target_initiatorgroup"], g["iscsi_target_authtype"], g["iscsi_target_authgroup"])
            for g in groups] == [(ig["id"], "CHAP", 1)]

    ok(daemon, "lun", "map", "t1", "e1", "--lun", "3")
    maps = [m for m in daemon.rest("GET", "targettoextent/") if m["iscsi_target"] == t1["id"]]
    assert [(m["iscsi_extent"], m["iscsi_lunid"]) for m in maps] == [(e1["id"], 3)]
    assert cli_json(daemon, "lun", "list") == daemon.rest("GET", "targettoextent/")
    assert cli_json(daemon, "target", "list") == daemon.rest("GET", "target/")
    tree = ok(daemon, "ls")
    assert "LUN 3  e1  File 64.0 MiB, 4096-byte blocks" in tree and "auth CHAP (auth group 1)" in tree

    ok(daemon, "lun", "unmap", "t1", "3")
    assert not [m for m in daemon.rest("GET", "targettoextent/") if m["iscsi_target"] == t1["id"]]
    ok(daemon, "target", "delete", "t1")
    assert [t["iscsi_target_name"] for t in daemon.rest("GET", "target/")] == ["demo"]
    assert not [g for g in daemon.rest("GET", "targetgroup/") if g["iscsi_target"] == t1["id"]]
    ok(daemon, "extent", "delete", "e1", "--delete-file")
    assert "e1" not in {e["iscsi_target_extent_name"] for e in daemon.rest("GET", "extent/")}
    assert not (extents_dir / "e1.img").exists()
    ok(daemon, "chap", "delete", "1", "cliuser")
    ok(daemon, "initiator-group", "delete", str(ig["iscsi_target_initiator_tag"]))
    assert daemon.rest("GET", "authcredential/") == [] and daemon.rest("GET", "authorizedinitiator/") == []
    daemon.assert_clean_log()


def test_exit_codes_and_the_apis_messages(daemon: Daemon, tmp_path: Path) -> None:
    usage = cli(daemon, "target", "create")
    assert usage.returncode == 2 and "NAME" in usage.stderr
    assert cli(daemon, "extent", "create", "x", "--allocation", "thick").returncode == 2
    out = cli(daemon, "extent", "create", "x", "--size", "1000")
    with pytest.raises(RestError) as api:  # the same request straight to the API
        daemon.rest("POST", "extent/", {"iscsi_target_extent_name": "x", "iscsi_target_extent_path": "x.img",
                                        "iscsi_target_extent_filesize": "1000"})
    message = json.loads(api.value.body)["iscsi_target_extent_filesize"][0]
    assert out.returncode == 1 and out.stderr.strip() == f"pyscsi-target: --size: {message}"
    out = cli(daemon, "target", "create", "demo")
    assert out.returncode == 1 and out.stderr.strip() == "pyscsi-target: NAME: Target name already exists"
    out = cli(daemon, "target", "create", "t2", "--auth", "CHAP", "--auth-group", "9")
    assert out.returncode == 1 and "--auth-group: Auth group 9 does not exist." in out.stderr
    assert [t["iscsi_target_name"] for t in daemon.rest("GET", "target/")] == ["demo"]  # t2 was rolled back
    out = cli(daemon, "lun", "unmap", "demo", "7")
    assert out.returncode == 1 and "target demo has no LUN 7" in out.stderr
    out = cli(None, "ls", state_dir=tmp_path)
    assert out.returncode == 1 and "no running pyscsi-target found" in out.stderr
    out = cli(daemon, "ls", env={"PYSCSI_TARGET_ADMIN_PASSWORD": "wrong-password"})
    assert out.returncode == 1 and "refused the credentials" in out.stderr
    # Remote use: --url and a password from the environment.
    out = subprocess.run([sys.executable, "-m", "pyscsi_target", "target", "list", "--json", "--url", daemon.api_url,
                          "--user", "admin"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYSCSI_TARGET_PASSWORD": ADMIN_PASSWORD}, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["iscsi_target_name"] == "demo", out.stderr


def test_local_and_remote_tls(daemon_factory: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=pyscsi-target.invalid", "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    d = daemon_factory(extra_args=["--api-cert", str(cert), "--api-key-file", str(key)])
    # On the daemon's host the CLI trusts exactly the daemon's certificate (found in the state dir).
    assert d.iqn in ok(d, "ls")
    url = d.api_url.replace("http:", "https:")
    env = {**os.environ, "PYSCSI_TARGET_PASSWORD": ADMIN_PASSWORD}

    def remote(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyscsi_target", "target", "list", "--url", url, *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    out = remote()  # an unknown certificate is refused
    assert out.returncode == 1 and "TLS with" in out.stderr, out.stderr
    out = remote("--cacert", str(cert))  # trusted, but its name is not the URL's host
    assert out.returncode == 1 and "TLS with" in out.stderr, out.stderr


def test_zero_filled_extent_progress_and_resize(daemon: Daemon) -> None:
    out = cli(daemon, "extent", "create", "z", "--size", "512MB", "--allocation", "zero")
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stderr.splitlines() if line.startswith("create extent z (zero")]
    assert steps[0].endswith(": 0%") and steps[-1].endswith(": 100%"), out.stderr
    assert "created extent z" in out.stdout
    path = daemon.state_dir / "extents" / "z.img"
    assert os.stat(path).st_blocks * 512 >= 512 << 20
    out = cli(daemon, "extent", "resize", "z", "1GB", "--allocation", "preallocate")
    assert out.returncode == 0 and "resized extent z" in out.stdout, out.stderr
    assert os.path.getsize(path) == 1 << 30
    job = json.loads(ok(daemon, "extent", "create", "w", "--size", "64MB", "--allocation", "zero", "--no-wait",
                        "--json"))
    assert job["state"] == "running" or job["state"] == "succeeded"
    ok(daemon, "job", "wait", job["id"])
    assert any(j["id"] == job["id"] and j["state"] == "succeeded" for j in cli_json(daemon, "job", "list"))
    sizes = {u["name"]: u["size"] for u in cli_json(daemon, "extent", "list")}
    assert sizes == {"demo": 1 << 30, "z": 1 << 30, "w": 64 << 20}


def test_extent_import(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = bytearray(8 << 20)
    data[4096:8192] = os.urandom(4096)
    image.write_bytes(data)
    out = cli(daemon, "extent", "import", str(image))
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout and "uploading disk.raw: 100%" in out.stderr
    assert (daemon.state_dir / "extents" / "disk.img").read_bytes() == data
    ext = next(e for e in daemon.rest("GET", "extent/") if e["iscsi_target_extent_name"] == "disk")
    assert ext["iscsi_target_extent_filesize"] == str(8 << 20)
    again = cli(daemon, "extent", "import", str(image))  # refused before any data is sent
    assert again.returncode == 1 and "already exists" in again.stderr
    qcow = tmp_path / "disk.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(508))
    out = cli(daemon, "extent", "import", str(qcow))
    assert out.returncode == 1 and "qcow2 image, not raw" in out.stderr


def test_completion(daemon: Daemon, tmp_path: Path) -> None:
    out = ok(None, "completion", "bash")
    assert "pyscsi-target" in out and "complete" in out

    def complete(line: str) -> list[str]:
        result = tmp_path / "completions"
        env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
               "_ARGCOMPLETE_IFS": "\n", "_ARGCOMPLETE_STDOUT_FILENAME": str(result),
               "PYSCSI_TARGET_ADMIN_PASSWORD": ADMIN_PASSWORD}
        r = subprocess.run([sys.executable, "-m", "pyscsi_target"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return result.read_text().split()

    assert "extent" in complete("pyscsi-target ext")
    assert {"create", "delete", "import", "resize", "list"} <= set(complete("pyscsi-target extent "))
    # Names come from the running daemon.
    assert complete(f"pyscsi-target target delete --state-dir {daemon.state_dir} de") == ["demo"]


def test_ls_refuses_nothing_it_cannot_show(daemon: Daemon) -> None:
    """A missing extent file shows as an error on its line, not a failure of ls."""
    daemon.rest("POST", "extent/", {"iscsi_target_extent_name": "gone", "iscsi_target_extent_type": "File",
                                    "iscsi_target_extent_path": "gone.img", "iscsi_target_extent_filesize": "1MB"})
    (daemon.state_dir / "extents" / "gone.img").unlink()
    text = ok(daemon, "ls")
    line = next(line for line in text.splitlines() if "gone.img" in line)
    assert "No such file or directory" in line
    with pytest.raises(RestError):
        daemon.rest("GET", "extent/999/")
