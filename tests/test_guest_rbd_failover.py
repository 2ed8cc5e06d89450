"""Failover with a real initiator: open-iscsi plus dm-multipath in a qemu guest, one path per
gateway, both exporting one RBD image.  The optimized gateway is killed (SIGKILL) while the guest
writes; the writes complete on the other path and the data reads back intact.

multipath.conf groups the paths by ALUA priority (``prio alua``, ``hardware_handler "1 alua"``), as
for any implicit-ALUA array: I/O goes to the active/optimized gateway's path.  open-iscsi's
``replacement_timeout`` (3 s here) bounds how long I/O waits on the dead path before dm-multipath
retries it on the other one; the survivor takes the image over after the failover timeout (2 s).

The test prints the failover timeline: SIGKILL -> the dead owner's lock broken (and it fenced) ->
the ALUA change -> the guest's writes resuming.
"""

from __future__ import annotations

import os
import re
import struct
import time
from datetime import datetime
from pathlib import Path

import pytest
from support import ceph as ceph_support
from support import rawclient as R
from support.ceph import CephCluster
from support.gateways import IQN, gateways
from support.guest import Guest, GuestOptions, UserNetwork

ceph_cluster = ceph_support.ceph_cluster

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest image is built with apt-get, which needs root"),
]

MiB = 1 << 20
CHUNKS = 24  # MiB written one by one, around the kill

MULTIPATH_CONF = r"""defaults {
  user_friendly_names yes
  find_multipaths no
  polling_interval 1
}
devices {
  device {
    vendor "PYSCSI"
    product "iSCSI Disk"
    path_grouping_policy group_by_prio
    prio alua
    hardware_handler "1 alua"
    path_checker tur
    failback immediate
    no_path_retry 30
  }
}
"""

SCRIPT = r"""
start_iscsid || exit 1
begin login
iscsi_login "$IQN" "$PORTAL1" 1 3 >/dev/null || { step login FAIL "path 1"; exit 1; }
iscsi_login "$IQN" "$PORTAL2" 2 3 >/dev/null || { step login FAIL "path 2"; exit 1; }
S1=$(iscsi_session "$IQN" "$PORTAL1") && S2=$(iscsi_session "$IQN" "$PORTAL2") \
  || { step login FAIL "sessions"; exit 1; }
D1=$(iscsi_disk "$S1" 0) && D2=$(iscsi_disk "$S2" 0) || { step login FAIL "disks"; exit 1; }
step login PASS "sessions $S1 $S2, disks ${D1%% *} ${D2%% *}"
begin multipath
start_multipath || { step multipath FAIL "multipathd"; exit 1; }
MP=""
i=0
while [ -z "$MP" ] && [ $i -lt 100 ]; do
  MP=$(dmsetup ls --target multipath 2>/dev/null | awk 'NR==1{print $1}')
  [ -z "$MP" ] && { multipath >/dev/null 2>&1; sleep 0.2; }
  i=$((i + 1))
done
[ -n "$MP" ] || { step multipath FAIL "no map"; exit 1; }
multipathd show maps topology >/tmp/topo 2>&1
data topology "$(cat /tmp/topo)"
check paths 2 "$(grep -c 'active ready' /tmp/topo)" || exit 1
step multipath PASS "/dev/mapper/$MP"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=$CHUNKS 2>/dev/null
begin writes
i=0
while [ $i -lt $CHUNKS ]; do
  dd if=/tmp/pattern of=/dev/mapper/$MP bs=1M count=1 skip=$i seek=$i oflag=direct conv=notrunc 2>/dev/null \
    || { step writes FAIL "chunk $i"; exit 1; }
  read -r up _rest </proc/uptime
  data "chunk$i" "$up"
  [ $i = 3 ] && mark writing
  i=$((i + 1))
done
step writes PASS "$CHUNKS MiB written through the failover"
begin verify
echo 3 >/proc/sys/vm/drop_caches
READ=$(dd if=/dev/mapper/$MP bs=1M count=$CHUNKS iflag=direct 2>/dev/null | sha256sum)
check data "$(sha256sum </tmp/pattern)" "$READ" || exit 1
multipathd show maps topology >/tmp/topo 2>&1
data topology_after "$(cat /tmp/topo)"
step verify PASS "read back intact"
"""


def optimized_gateway(portal_host: str, ports: list[int]) -> int:
    """Index of the gateway whose target port group is active/optimized (REPORT TARGET PORT GROUPS)."""
    with R.RawClient(portal_host, ports[0], initiator="iqn.2026-11.org.pyscsi-target.test:alua-probe") as c:
        assert c.login(IQN).ok
        c.clear_unit_attentions()
        r = c.scsi(struct.pack(">BBxxxxIxB", 0xA3, 0x0A, 1024, 0), read_len=1024)
        assert r.status == 0
        n, pos, states = struct.unpack_from(">I", r.data)[0], 4, {}
        while pos < 4 + n:
            b0, _s, tpg, _r, _st, _v, count = struct.unpack_from(">BBHBBBB", r.data, pos)
            states[tpg] = b0 & 0x0F
            pos += 8 + 4 * count
        c.logout()
    return next(tpg for tpg, s in states.items() if s == 0) - 1


def log_time(line: str) -> float:
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_guest_writes_survive_the_optimized_gateway_dying(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    image = ceph_cluster.create_image(64 * MiB)
    try:
        with gateways(ceph_cluster, tmp_path, timeout=2.0) as gws:
            gws.export(image)
            owner = optimized_gateway("127.0.0.1", [d.port for d in gws.daemons])
            survivor = 1 - owner
            net = UserNetwork([gws[0].portal, gws[1].portal])
            env = {"IQN": IQN, "PORTAL1": net.guest_portal(0), "PORTAL2": net.guest_portal(1), "CHUNKS": str(CHUNKS)}
            opts = GuestOptions(timeout=420)
            with Guest(SCRIPT, net, env=env, options=opts, files={"/etc/multipath.conf": MULTIPATH_CONF},
                       run_dir=tmp_path / "guest") as g:
                marked = g.wait_for_mark("writing", 360)
                assert marked is not None, g.wait().describe()
                mark_uptime = marked.uptime
                t_kill = time.time()
                gws.kill(owner)
                run = g.wait()
            assert run.ok, f"{run.describe()}\n--- survivor log ---\n{gws[survivor].log_tail(30)}"
            log = gws[survivor].log_text()
    finally:
        ceph_cluster.remove_image(image)
    # The timeline, on the host's clock (the guest's uptime mapped through the "writing" mark).
    took = next(line for line in log.splitlines() if "took LU" in line and "(dead)" in line)
    broken_ms = float(re.search(r"lock broken \(.*\) after (\d+) ms", took).group(1))  # type: ignore[union-attr]
    t_detected = log_time(took) - broken_ms / 1000
    t_broken = log_time(took)
    alua = next(line for line in log.splitlines() if "ALUA states" in line and log_time(line) >= t_broken - 0.01)
    t_alua = log_time(alua)
    uptimes = [(int(k[5:]), float(v)) for k, v in run.data.items() if k.startswith("chunk")]
    gaps = sorted(((b - a), i) for (i, a), (_j, b) in zip(sorted(uptimes), sorted(uptimes)[1:], strict=False))
    stall, resumed_chunk = gaps[-1]
    resumed_uptime = dict(uptimes)[resumed_chunk + 1]
    t_resumed = t_kill + (resumed_uptime - mark_uptime)
    print(f"\nfailover timeline (s after SIGKILL of gateway {owner + 1}): owner declared dead "
          f"{t_detected - t_kill:.2f}, "
          f"lock broken {t_broken - t_kill:.2f} ({broken_ms:.0f} ms to break and blocklist), ALUA change "
          f"{t_alua - t_kill:.2f}, guest I/O resumed {t_resumed - t_kill:.2f} (longest write stall {stall:.2f}s "
          f"in the guest)\n{run.data.get('topology_after', '')}")
    assert t_resumed - t_kill < 60
    assert "active/optimized" in alua
