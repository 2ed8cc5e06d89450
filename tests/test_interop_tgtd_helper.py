"""The tgtd helper bench/ and the harness validation rely on: start, CHAP, digests, clean stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import tgtd
from support.tools import missing, run

pytestmark = pytest.mark.skipif(not tgtd.available() or bool(missing("iscsi-inq", "iscsi-ls")),
                                reason="needs Debian packages tgt and libiscsi-bin")


def test_tgtd_helper_serves_and_cleans_up(tmp_path: Path) -> None:
    img = tmp_path / "lun.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    t = tgtd.Tgtd([tgtd.Lun(1, img, 4096)], chap=("tgtd-user", "tgtdsecret-1234"),
                  mutual_chap=("tgtd-target", "tgtdsecret-4321"))
    with t:
        pid, sock = t.pid, tgtd.SOCKET_DIR / f"socket.{t.control_port}"
        assert sock.exists()
        assert run("iscsi-inq", t.url(1)).returncode != 0  # CHAP is required
        r = run("iscsi-inq", f"iscsi://tgtd-user%tgtdsecret-1234@{t.portal}/{t.iqn}/1")
        assert r.returncode == 0 and "DIRECT_ACCESS" in r.stdout
        r = run("iscsi-inq", f"iscsi://tgtd-user%tgtdsecret-1234@{t.portal}/{t.iqn}/1"
                "?header_digest=crc32c&target_user=tgtd-target&target_password=tgtdsecret-4321")
        assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not sock.exists()
