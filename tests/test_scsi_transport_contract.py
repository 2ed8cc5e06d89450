"""The SCSI layer's contract with the iSCSI transport and the engine, end to end.

* The transport's per-command write buffer cap is the SCSI layer's MAXIMUM TRANSFER LENGTH
  (scsi.task.MAX_TRANSFER_BYTES), so a WRITE the block limits VPD allows is never refused
  by the transport and a longer one never gets buffered.
* REPORT TARGET PORT GROUPS lists every portal group the target is exported on, including
  paths no session has used yet (the engine hands the tags to ScsiDevice.set_portal_groups).
"""

from __future__ import annotations

import struct
from pathlib import Path

from support.daemon import Daemon
from support.net import free_port
from support.rawclient import login_session

from pyscsi_target.iscsi import connection
from pyscsi_target.iscsi.write_budget import WriteBudget
from pyscsi_target.scsi.task import MAX_TRANSFER_BYTES


def test_write_buffer_cap_follows_max_transfer() -> None:
    assert connection.MAX_WRITE_BUFFER == MAX_TRANSFER_BYTES
    assert WriteBudget().session_cap >= MAX_TRANSFER_BYTES  # one maximal WRITE always fits a session's share


def test_report_target_port_groups_lists_unused_paths(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", demo=False)
    d.start()
    try:
        pg1 = d.rest("GET", "portal/")[0]
        port2 = free_port()
        pg2 = d.rest("POST", "portal/", {"iscsi_target_portal_ips": [f"127.0.0.1:{port2}"]})
        iqn = d.add_target("alua", portal_group=pg1["id"])
        tg = d.target_group("alua")
        d.rest("POST", "targetgroup/", {"iscsi_target": tg["iscsi_target"], "iscsi_target_portalgroup": pg2["id"],
                                        "iscsi_target_authtype": "None"})
        tags = sorted((pg1["iscsi_target_portal_tag"], pg2["iscsi_target_portal_tag"]))
        with login_session("127.0.0.1", d.port, iqn) as c:  # only path 1 has a session
            r = c.scsi(struct.pack(">BBxxxxIxB", 0xA3, 0x0A, 1024, 0), read_len=1024)
            assert r.status == 0, r
            n = struct.unpack_from(">I", r.data)[0] // 12
            groups = [struct.unpack_from(">BBH", r.data, 4 + 12 * i) for i in range(n)]
            assert sorted(g[2] for g in groups) == tags
            # the group of the path in use is active/optimized; the unused one is listed too
            states = {g[2]: g[0] & 0x0F for g in groups}
            assert states[pg1["iscsi_target_portal_tag"]] == 0
    finally:
        d.stop()
