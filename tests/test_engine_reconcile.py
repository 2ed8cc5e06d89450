"""Engine.apply reconciles listeners, targets, LUN maps and logical units against a model."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from test_engine_loopback import IQN, Client, make_model

from pyscsi_target.config import model as M
from pyscsi_target.iscsi import pdu as P
from pyscsi_target.server.engine import Engine


def _extent(tmp: Path, eid: int, name: str) -> M.Extent:
    img = tmp / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    return M.Extent(eid, name, "File", str(img), naa=f"0x6589cfc0000001{eid:02x}", serial=f"s{eid}")


def test_reconcile_luns_targets_listeners(tmp_path: Path) -> None:
    async def main() -> None:
        eng = Engine(tmp_path)
        m = make_model(tmp_path, ["127.0.0.1:0"])
        await eng.apply(m)
        try:
            dev1 = eng._targets[1].device
            assert set(dev1.luns) == {0}
            lu0 = dev1.luns[0]

            # A second target sharing extent 1, plus a new extent at LUN 1 of target 1.
            m = m.copy()
            m.extents[2] = _extent(tmp_path, 2, "second")
            m.lun_maps[2] = M.LunMap(2, 1, 2, 1)
            m.targets[2] = M.Target(2, "other")
            m.target_groups[2] = M.TargetGroup(2, 2, 1)
            m.lun_maps[3] = M.LunMap(3, 2, 1, 0)
            await eng.apply(m)
            assert set(dev1.luns) == {0, 1} and dev1.luns[0] is lu0
            assert eng._targets[2].device.luns[0] is lu0  # one LogicalUnit per extent

            # Same model again: nothing changes (idempotent).
            await eng.apply(m.copy())
            assert dev1.luns[0] is lu0 and eng._targets[1].device is dev1

            # Extent resized in place: same LU, updated.
            m = m.copy()
            m.extents[1] = dataclasses.replace(m.extents[1], comment="bigger")
            await eng.apply(m)
            assert dev1.luns[0] is lu0

            # A session on target 2, then target 2 removed: the session is closed.
            port = eng.listen_addresses()[0][1]
            c = await Client.connect("127.0.0.1", port)
            assert (await c.login(f"{M.DEFAULT_BASENAME}:other")).status_class == 0
            assert eng.session_count(2) == 1
            m = m.copy()
            del m.targets[2], m.target_groups[2], m.lun_maps[3]
            await eng.apply(m)
            assert 2 not in eng._targets and eng.session_count(2) == 0
            data = await asyncio.wait_for(c.r.read(), 5)  # Async event 3, then closed
            assert data == b"" or data[0] == 0x32
            await c.close()

            # LUN unmapped: gone from the device, its LU closed.
            lu1 = dev1.luns[1]
            m = m.copy()
            del m.lun_maps[2]
            await eng.apply(m)
            assert set(dev1.luns) == {0} and lu1.closed

            # A new portal address listens, the old one stops; service disabled stops all.
            m = m.copy()
            m.portal_groups[1] = dataclasses.replace(m.portal_groups[1], listen=["127.0.0.2:0"])
            await eng.apply(m)
            assert [h for h, _p in eng.listen_addresses()] == ["127.0.0.2"]
            m = m.copy()
            m.service_enabled = False
            await eng.apply(m)
            assert eng.listen_addresses() == []
        finally:
            await eng.shutdown(grace=0.2)

    asyncio.run(main())


def test_initiator_group_and_discovery_visibility(tmp_path: Path) -> None:
    async def main() -> None:
        eng = Engine(tmp_path)
        m = make_model(tmp_path, ["127.0.0.1:0"])
        m.initiator_groups[1] = M.InitiatorGroup(1, 1, initiators="iqn.2000-01.com.other:x", auth_network="ALL")
        m.initiator_groups[2] = M.InitiatorGroup(2, 2, initiators="ALL", auth_network="10.0.0.0/8")
        m.targets[2] = M.Target(2, "net")
        m.target_groups[2] = M.TargetGroup(2, 2, 1, initiator_group=2)
        m.target_groups[1] = dataclasses.replace(m.target_groups[1], initiator_group=1)
        await eng.apply(m)
        try:
            port = eng.listen_addresses()[0][1]
            c = await Client.connect("127.0.0.1", port)
            rsp = await c.login(IQN)  # our initiator name is not in group 1
            assert (rsp.status_class, rsp.status_detail) == (2, 2)
            await c.close()
            lst = next(iter(eng.portals.listeners.values()))
            pol = eng.make_policy(lst, "127.0.0.1", "127.0.0.1", port)
            assert pol.send_targets("iqn.2000-01.com.other:x", "All") == [(IQN, [f"127.0.0.1:{port},1"])]
            assert pol.send_targets("iqn.1994-05.com.example:loop", "All") == []
            pol10 = eng.make_policy(lst, "10.1.2.3", "127.0.0.1", port)
            names = [t for t, _a in pol10.send_targets("iqn.1994-05.com.example:loop", "All")]
            assert names == [f"{M.DEFAULT_BASENAME}:net"]
        finally:
            await eng.shutdown(grace=0.2)

    asyncio.run(main())


def test_target_removed_after_send_targets_answers_target_removed(tmp_path: Path) -> None:
    """A target SendTargets showed and the configuration then removed: its login is refused
    with 0x0204 TARGET REMOVED, a name that never existed with 0x0203 NOT FOUND, and the
    target logs in again once it is back."""

    async def main() -> None:
        eng = Engine(tmp_path)
        m = make_model(tmp_path, ["127.0.0.1:0"])
        m.targets[2] = M.Target(2, "gone")
        m.target_groups[2] = M.TargetGroup(2, 2, 1)
        await eng.apply(m)
        gone = f"{M.DEFAULT_BASENAME}:gone"
        try:
            port = eng.listen_addresses()[0][1]
            d = await Client.connect("127.0.0.1", port)
            assert (await d.login(None)).status_class == 0
            await d.send(P.TextRequest(itt=d.next_itt(), cmdsn=d.cmdsn, expstatsn=d.statsn,
                                       data=P.build_text([("SendTargets", "All")])))
            txt = await d.recv()
            assert isinstance(txt, P.TextResponse)
            assert [v for k, v in P.parse_text(txt.data) if k == "TargetName"] == [IQN, gone]
            await d.close()

            removed = m.copy()
            del removed.targets[2], removed.target_groups[2]
            await eng.apply(removed)
            c = await Client.connect("127.0.0.1", port)
            rsp = await c.login(gone.upper())  # iSCSI names compare case-insensitively
            assert (rsp.status_class, rsp.status_detail) == (0x02, 0x04)
            await c.close()
            c = await Client.connect("127.0.0.1", port)
            rsp = await c.login(f"{M.DEFAULT_BASENAME}:never")
            assert (rsp.status_class, rsp.status_detail) == (0x02, 0x03)
            await c.close()

            await eng.apply(m.copy())
            c = await Client.connect("127.0.0.1", port)
            assert (await c.login(gone)).status_class == 0
            await c.close()
        finally:
            await eng.shutdown(grace=0.2)

    asyncio.run(main())
