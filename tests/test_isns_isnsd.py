"""The iSNS client against the real open-isns server (isnsd), read back with isnsadm.

Each test starts its own isnsd on a loopback port (tests/support/isnsd.py), drives an
``IsnsClient`` with states built by ``desired_state`` from a ``ConfigModel``, and checks
what ``isnsadm --query`` / ``--list`` show: the entity, the target nodes, the portals, and
which portal reaches which node under which tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support import isnsd
from support.isnsd import Isnsd
from support.net import free_port

from pyscsi_target.config import model as M
from pyscsi_target.isns import IsnsClient, desired_state

pytestmark = pytest.mark.skipif(not isnsd.available(), reason="open-isns (isnsd, isnsadm) is not installed")

EID = "pyscsi-target.test:isns"
ALPHA = f"{M.DEFAULT_BASENAME}:alpha"
BETA = f"{M.DEFAULT_BASENAME}:beta"
T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[Isnsd]:
    with Isnsd() as s:
        yield s


def config(*servers: str) -> M.ConfigModel:
    """alpha on portal group 1 (127.0.0.1:3260, tag 1); beta on it and on group 2 (127.0.0.2:3261, tag 2)."""
    m = M.ConfigModel()
    m.global_config.isns_servers = " ".join(servers)
    m.portal_groups[1] = M.PortalGroup(1, 1, ["127.0.0.1:3260"])
    m.portal_groups[2] = M.PortalGroup(2, 2, ["127.0.0.2:3261"])
    m.targets[1] = M.Target(1, "alpha", alias="Alpha disk")
    m.targets[2] = M.Target(2, "beta")
    m.target_groups[1] = M.TargetGroup(1, 1, 1)
    m.target_groups[2] = M.TargetGroup(2, 2, 1)
    m.target_groups[3] = M.TargetGroup(3, 2, 2)
    return m


def client(**kw: Any) -> IsnsClient:
    kw = {"min_backoff": 0.1, "max_backoff": 0.5, "connect_timeout": 2.0, "request_timeout": 2.0, **kw}
    return IsnsClient(**kw)


def run(coro: Awaitable[T], timeout: float = 90) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def eventually(probe: Callable[[], T], check: Callable[[T], bool], timeout: float = 15.0) -> T:
    """``probe()`` (blocking: isnsadm) in a thread until ``check`` holds; the last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(probe)
        if check(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


def names(objects: list[dict[str, str]]) -> set[str]:
    return {o["iSCSI name"] for o in objects if "iSCSI name" in o}


def pgs(objects: list[dict[str, str]]) -> set[tuple[str, str, str, str]]:
    return {(o["Portal group name"], o["Portal group address"], o["Portal group port"], o["Portal group tag"])
            for o in objects if "Portal group name" in o}


def test_register_update_and_deregister(server: Isnsd) -> None:
    async def main() -> None:
        c = client()
        m = config(server.address)
        c.update(desired_state(m, entity_id=EID))
        c.start()
        assert await c.wait_synced(15), c.servers()

        # What isnsadm --query shows for the entity: the entity, both targets, both portals.
        objs = await asyncio.to_thread(server.query, f"eid={EID}")
        types = [o["type"] for o in objs]
        assert types.count("Network Entity") == 1
        entity = next(o for o in objs if o["type"] == "Network Entity")
        assert entity["Entity identifier"] == EID and entity["Entity protocol"] == "iSCSI (2)"
        nodes = {o["iSCSI name"]: o for o in objs if o["type"] == "iSCSI Storage Node"}
        assert set(nodes) == {ALPHA, BETA}
        assert nodes[ALPHA]["iSCSI node type"] == "Target" and nodes[ALPHA]["iSCSI alias"] == "Alpha disk"
        assert "iSCSI alias" not in nodes[BETA]
        assert {(o["Portal IP address"], o["Portal TCP/UDP port"]) for o in objs if o["type"] == "Portal"} == {
            ("127.0.0.1", "3260/tcp"), ("127.0.0.2", "3261/tcp")}
        assert pgs(await asyncio.to_thread(server.portal_groups)) == {
            (ALPHA, "127.0.0.1", "3260/tcp", "1"), (BETA, "127.0.0.1", "3260/tcp", "1"),
            (BETA, "127.0.0.2", "3261/tcp", "2")}
        # An initiator asking for alpha learns only the portal alpha is exported on (NULL PGT at the other).
        seen = await asyncio.to_thread(server.query, f"iscsi-name={ALPHA}")
        assert {o["Portal IP address"] for o in seen if o["type"] == "Portal"} == {"127.0.0.1"}

        # beta deleted: gone, and so is its only-own portal 127.0.0.2:3261.
        m = m.copy()
        del m.targets[2], m.target_groups[2], m.target_groups[3]
        c.update(desired_state(m, entity_id=EID))
        assert await c.wait_synced(15)
        assert names(await asyncio.to_thread(server.nodes)) == {ALPHA}
        assert {o["Portal IP address"] for o in await asyncio.to_thread(server.portals)} == {"127.0.0.1"}

        # A new target and an alias change arrive as one incremental update.
        m = m.copy()
        m.targets[3] = M.Target(3, "gamma", alias="Gamma")
        m.target_groups[4] = M.TargetGroup(4, 3, 2)
        m.targets[1].alias = "Renamed"
        c.update(desired_state(m, entity_id=EID))
        assert await c.wait_synced(15)
        nodes = {o["iSCSI name"]: o for o in await asyncio.to_thread(server.nodes)}
        assert set(nodes) == {ALPHA, f"{M.DEFAULT_BASENAME}:gamma"}
        assert nodes[ALPHA]["iSCSI alias"] == "Renamed"
        assert pgs(await asyncio.to_thread(server.portal_groups)) == {
            (ALPHA, "127.0.0.1", "3260/tcp", "1"), (f"{M.DEFAULT_BASENAME}:gamma", "127.0.0.2", "3261/tcp", "2")}

        await c.close()
        assert await asyncio.to_thread(server.entities) == []
        assert await asyncio.to_thread(server.nodes) == []

    run(main())


def test_a_server_down_at_start_is_registered_once_it_is_up() -> None:
    server = Isnsd(port=free_port())
    try:
        async def main() -> None:
            c = client()
            c.update(desired_state(config(server.address), entity_id=EID))
            c.start()
            assert not await c.wait_synced(1.5)
            (state,) = c.servers()
            assert state.failures >= 2 and "cannot connect" in (state.last_error or "")
            await asyncio.to_thread(server.start)
            assert await c.wait_synced(10), c.servers()  # backoff is capped at 0.5 s here
            assert names(await asyncio.to_thread(server.nodes)) == {ALPHA, BETA}
            await c.close()
            assert await asyncio.to_thread(server.entities) == []

        run(main())
    finally:
        server.cleanup()


def test_keepalive_outlives_the_registration_period() -> None:
    """isnsd drops an entity that says nothing for a registration period (6 s here): an
    entity registered by isnsadm and left alone expires; ours, refreshed every 3 s, stays."""
    with Isnsd(registration_period=6) as server:
        async def main() -> None:
            await asyncio.to_thread(server.adm, "--register", "entity=silent", "target=iqn.2026-11.org.example:silent",
                                    "portal=127.0.0.9:3260")
            c = client()
            c.update(desired_state(config(server.address), entity_id=EID))
            c.start()
            assert await c.wait_synced(15)
            assert c.servers()[0].period == 6  # isnsd imposes its own period over the 900 s asked for
            ents = await eventually(server.entities, lambda e: {x["Entity identifier"] for x in e} == {EID}, 15)
            assert {x["Entity identifier"] for x in ents} == {EID}  # "silent" expired, ours did not
            await asyncio.sleep(13)  # more than two periods
            assert {x["Entity identifier"] for x in await asyncio.to_thread(server.entities)} == {EID}
            assert names(await asyncio.to_thread(server.nodes)) == {ALPHA, BETA}
            await c.close()

        run(main())


def test_a_server_that_lost_its_database_gets_everything_again() -> None:
    port = free_port()
    first = Isnsd(port=port, registration_period=4, persistent=False)
    second = Isnsd(port=port, registration_period=4, persistent=False)
    try:
        async def main() -> None:
            await asyncio.to_thread(first.start)
            c = client()
            c.update(desired_state(config(first.address), entity_id=EID))
            c.start()
            assert await c.wait_synced(15)
            await asyncio.to_thread(first.stop)
            await asyncio.to_thread(second.start)  # same port, empty in-memory database
            nodes = await eventually(second.nodes, lambda n: names(n) == {ALPHA, BETA}, 15)
            assert names(nodes) == {ALPHA, BETA}
            await c.close()

        run(main())
    finally:
        first.cleanup()
        second.cleanup()


def test_many_targets_are_registered_in_several_messages_without_default_pgs(server: Isnsd) -> None:
    m = config(server.address)
    m.portal_groups[3] = M.PortalGroup(3, 3, ["127.0.0.3:3262"])
    for i in range(10, 70):
        m.targets[i] = M.Target(i, f"bulk-{'x' * 120}-{i}", alias=f"bulk {i}")
        m.target_groups[i] = M.TargetGroup(i, i, 1 + i % 3)
    state = desired_state(m, entity_id=EID)

    async def main() -> None:
        c = client()
        c.update(state)
        c.start()
        assert await c.wait_synced(20)
        assert len(names(await asyncio.to_thread(server.nodes))) == 62
        expected = {(n.name, p.address, f"{p.port}/tcp", str(tag))
                    for n in state.registration.nodes for p, tag in n.tags}
        assert pgs(await asyncio.to_thread(server.portal_groups)) == expected  # and not one default tag-1 PG more
        await c.close()
        assert await asyncio.to_thread(server.nodes) == []

    run(main())


def test_wildcard_portals_are_registered_with_the_address_the_server_reaches(server: Isnsd) -> None:
    m = config(server.address)
    m.portal_groups[1].listen = ["0.0.0.0:3260"]

    async def main() -> None:
        c = client()
        c.update(desired_state(m, entity_id=EID))
        c.start()
        assert await c.wait_synced(15)
        portals = await asyncio.to_thread(server.portals)
        assert {(o["Portal IP address"], o["Portal TCP/UDP port"]) for o in portals} == {
            ("127.0.0.1", "3260/tcp"), ("127.0.0.2", "3261/tcp")}
        await c.close()

    run(main())


def test_servers_added_and_removed_by_configuration() -> None:
    with Isnsd() as one, Isnsd() as two:
        async def main() -> None:
            c = client()
            c.update(desired_state(config(one.address), entity_id=EID))
            c.start()
            assert await c.wait_synced(15)
            c.update(desired_state(config(two.address), entity_id=EID))
            assert await c.wait_synced(15)
            assert names(await asyncio.to_thread(two.nodes)) == {ALPHA, BETA}
            assert await eventually(one.entities, lambda e: e == [], 10) == []  # deregistered from the dropped one
            c.update(desired_state(config(), entity_id=EID))
            assert await eventually(two.entities, lambda e: e == [], 10) == []
            await c.close()

        run(main())


@contextlib.asynccontextmanager
async def misbehaving(kind: str):  # type: ignore[no-untyped-def]
    """A loopback TCP server that answers every connection with ``kind`` of nonsense."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(12)
            if kind == "garbage":
                writer.write(b"\x00\x01\x80\x01\x00\x08\x4c\x00" + b"\xff" * 40)
            elif kind == "wrong-version":
                writer.write(b"\x00\x07" + b"\x00" * 30)
            elif kind == "silent":
                await asyncio.sleep(30)
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()


def test_misbehaving_servers_do_not_disturb_the_good_one_or_the_loop(server: Isnsd,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with misbehaving("garbage") as bad1, misbehaving("wrong-version") as bad2, \
                misbehaving("closes") as bad3, misbehaving("silent") as bad4:
            lag = 0.0

            async def ticker() -> None:
                nonlocal lag
                while True:
                    t = time.monotonic()
                    await asyncio.sleep(0.01)
                    lag = max(lag, time.monotonic() - t - 0.01)

            tick = asyncio.create_task(ticker())
            c = client(request_timeout=0.5, log_interval=3600)
            c.update(desired_state(config(server.address, bad1, bad2, bad3, bad4, "127.0.0.1:1"), entity_id=EID))
            c.start()
            await asyncio.sleep(3)
            states = {str(s.address): s for s in c.servers()}
            assert states[server.address].registered and states[server.address].failures == 0
            for bad in (bad1, bad2, bad3, bad4, "127.0.0.1:1"):
                assert not states[bad].registered and states[bad].failures >= 2, states[bad]
            assert "protocol error" in (states[bad1].last_error or "")
            assert "no answer to DEV_ATTR_REG" in (states[bad4].last_error or "")
            t = time.monotonic()
            await c.close(timeout=2.0)
            assert time.monotonic() - t < 3.0
            tick.cancel()
            assert lag < 0.5, f"event loop stalled {lag:.3f}s"
        assert await asyncio.to_thread(server.entities) == []

    with caplog.at_level(logging.WARNING, logger="pyscsi_target.isns"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning per failing server (log_interval=3600), never one per retry
    assert len(warnings) == 5, warnings
    assert all("retrying with backoff" in w for w in warnings)


def test_the_daemon_wiring_registers_what_the_engine_listens_on(server: Isnsd, tmp_path: Path) -> None:
    """The few lines pyscsi_target/isns/__init__.py documents for the daemon, with a real Engine:
    port 0 in the configuration is registered as the port the engine bound, a portal that
    cannot be bound is not registered, and the iSCSI service switched off deregisters."""
    from pyscsi_target.server.engine import Engine, EngineError

    m = config(server.address)
    m.portal_groups[1].listen = ["127.0.0.1:0"]
    m.portal_groups[2].listen = ["192.0.2.123:3261"]  # not an address of this host: bind fails

    async def main() -> None:
        engine = Engine(tmp_path, tune_allocator=False)
        isns = client()

        async def apply(model: M.ConfigModel) -> None:
            with contextlib.suppress(EngineError):
                await engine.apply(model)
            bound = engine.bound_portals()
            isns.update(desired_state(engine.model, bound, entity_id=EID))

        try:
            await apply(m)
            isns.start()
            assert await isns.wait_synced(15)
            (port,) = [p for _, p in engine.listen_addresses()]
            portals = await asyncio.to_thread(server.portals)
            assert [(o["Portal IP address"], o["Portal TCP/UDP port"]) for o in portals] == [
                ("127.0.0.1", f"{port}/tcp")]
            assert names(await asyncio.to_thread(server.nodes)) == {ALPHA, BETA}

            off = m.copy()
            off.service_enabled = False
            await apply(off)
            assert await isns.wait_synced(15)
            assert await asyncio.to_thread(server.entities) == []
        finally:
            await isns.close()
            await engine.shutdown()

    run(main())


def test_the_daemon_registers_on_configuration_and_deregisters_at_shutdown(server: Isnsd, tmp_path: Path) -> None:
    """End to end through the daemon: iscsi_isns_servers set over the FreeNAS API registers the
    demo target and its portal; SIGTERM deregisters the entity before the process exits."""
    from support.daemon import Daemon, wait_for

    with Daemon(tmp_path / "state") as d:
        d.rest("PUT", "globalconfiguration/", {"iscsi_isns_servers": server.address})
        assert wait_for(lambda: d.iqn in names(server.nodes()), timeout=20), server.nodes()
        assert [(o["Portal IP address"], o["Portal TCP/UDP port"]) for o in server.portals()] == [
            (d.host, f"{d.port}/tcp")]
        d.stop()
        assert d.returncode == 0
    assert server.entities() == []
