"""256 MiB of random data into the demo LUN with qemu-img (libiscsi) and back, byte-identical.

Modes: no auth, CHAP, header digest CRC32C (qemu's iscsi driver ``header-digest``), and
mutual CHAP.  qemu 7.2's iscsi driver never hands libiscsi a target user/secret (it does
not call iscsi_set_target_username_pwd; ``?target_user=`` in the URL and
LIBISCSI_CHAP_TARGET_* are ignored on that path), so for mutual CHAP the test shows that
qemu-img's one-way attempt is refused with 0x0201 and moves the same 256 MiB through a
mutual-CHAP session of the raw test initiator, which verifies the target's CHAP answer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from support import rawclient as R
from support.daemon import Daemon
from support.tools import missing, qemu_iscsi, qemu_json, run

SIZE = 256 * 1024 * 1024
USER, SECRET = "qemu-initiator", "initsecret-1234"
PEER, PEER_SECRET = "pyscsi-target", "tgtsecret-98765"

pytestmark = pytest.mark.skipif(bool(missing("qemu-img")), reason="qemu-img missing (apt-get install qemu-utils "
                                "qemu-block-extra)")


def configure_auth(d: Daemon, authtype: str) -> None:
    """The one configuration step: auth group 1 with CHAP + peer credentials, and the demo
    target's target group set to ``authtype`` ("None", "CHAP" or "CHAP Mutual"), via REST."""
    creds = d.rest("GET", "authcredential/")
    if not any(c["iscsi_target_auth_tag"] == 1 for c in creds):
        d.rest("POST", "authcredential/", {
            "iscsi_target_auth_tag": 1, "iscsi_target_auth_user": USER, "iscsi_target_auth_secret": SECRET,
            "iscsi_target_auth_peeruser": PEER, "iscsi_target_auth_peersecret": PEER_SECRET})
    groups = d.rest("GET", "targetgroup/")
    targets = {t["id"]: t["iscsi_target_name"] for t in d.rest("GET", "target/")}
    tg = next(g for g in groups if targets.get(g["iscsi_target"]) == "demo")
    d.rest("PUT", f"targetgroup/{tg['id']}/", {"iscsi_target_authgroup": None if authtype == "None" else 1,
                                               "iscsi_target_authtype": authtype})


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("qemu-roundtrip")).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def random_file(tmp_path: Path) -> Path:
    p = tmp_path / "src.raw"
    with open(p, "wb") as f:
        for _ in range(SIZE // (16 << 20)):
            f.write(os.urandom(16 << 20))
    return p


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def roundtrip(d: Daemon, src: Path, dst: Path, **opts: str) -> None:
    lun = qemu_iscsi(d.portal, d.iqn, 0, **opts)
    w = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), qemu_json(lun), timeout=300)
    assert w.returncode == 0, f"write: {w.stderr}"
    r = run("qemu-img", "convert", "-f", "raw", "-O", "raw", qemu_json(lun, size=SIZE), str(dst), timeout=300)
    assert r.returncode == 0, f"read: {r.stderr}"
    assert dst.stat().st_size == SIZE
    assert sha256(dst) == sha256(src), "data read back differs from data written"


def test_roundtrip_no_auth(target: Daemon, random_file: Path, tmp_path: Path) -> None:
    configure_auth(target, "None")
    roundtrip(target, random_file, tmp_path / "back.raw")


def test_roundtrip_chap(target: Daemon, random_file: Path, tmp_path: Path) -> None:
    configure_auth(target, "CHAP")
    wrong = qemu_iscsi(target.portal, target.iqn, user=USER, password="wrong-secret-99")
    bad = run("qemu-img", "info", qemu_json(wrong))
    assert bad.returncode != 0 and "Authentication failure(513)" in bad.stderr, bad.stderr
    roundtrip(target, random_file, tmp_path / "back.raw", user=USER, password=SECRET)
    assert SECRET not in target.log_text() and "wrong-secret-99" not in target.log_text()


def test_roundtrip_header_digest_crc32c(target: Daemon, random_file: Path, tmp_path: Path) -> None:
    configure_auth(target, "None")
    mark = len(target.log_text())
    roundtrip(target, random_file, tmp_path / "back.raw", header_digest="crc32c")
    new = target.log_text()[mark:]
    # Both qemu-img sessions really ran with HeaderDigest=CRC32C (and DataDigest=None).
    assert new.count("iqn.2008-11.org.linux-kvm") >= 2 and "digests CRC32C/None" in new, new[-2000:]
    assert "digests None/None" not in new


def test_roundtrip_mutual_chap(target: Daemon, random_file: Path) -> None:
    configure_auth(target, "CHAP Mutual")
    # qemu-img can only do one-way CHAP: the target insists on mutual and refuses it.
    one_way = run("qemu-img", "info", qemu_json(qemu_iscsi(target.portal, target.iqn, user=USER, password=SECRET)))
    assert one_way.returncode != 0 and "Authentication failure(513)" in one_way.stderr, one_way.stderr
    # A wrong peer secret on our side: the target's CHAP_R does not verify.
    c = R.RawClient(target.host, target.port)
    with pytest.raises(R.ProtocolViolation, match="mutual CHAP"):
        c.login(target.iqn, chap=(USER, SECRET), mutual=(PEER, "not-the-target-secret"))
    c.close()
    # The full 256 MiB through a mutual-CHAP session (1 MiB WRITE(10)/READ(10) commands).
    with R.login_session(target.host, target.port, target.iqn, chap=(USER, SECRET), mutual=(PEER, PEER_SECRET)) as c:
        chunk, blocks = 1 << 20, (1 << 20) // 512
        src_hash, back_hash = hashlib.sha256(), hashlib.sha256()
        with open(random_file, "rb") as f:
            for i in range(SIZE // chunk):
                data = f.read(chunk)
                src_hash.update(data)
                w = c.scsi(R.write10(i * blocks, blocks), data=data)
                assert w.status == 0, f"write {i}: status {w.status:#x} sense {w.sense.hex()}"
        for i in range(SIZE // chunk):
            r = c.scsi(R.read10(i * blocks, blocks), read_len=chunk)
            assert r.status == 0 and len(r.data) == chunk, f"read {i}: status {r.status:#x}"
            back_hash.update(r.data)
        assert back_hash.hexdigest() == src_hash.hexdigest()
        c.logout()
    configure_auth(target, "None")


def test_log_has_only_expected_auth_warnings(target: Daemon) -> None:
    # The refused logins above are logged (status 0x0201, without secrets); nothing else may be.
    target.assert_clean_log(allow=[r"login rejected \(status 0x0201\)"])
    assert PEER_SECRET not in target.log_text()
