"""IsnsClient against scripted loopback servers: what real servers rarely do on demand.

An ESI or SCN arriving before the answer, an error status, a server that never answers
while we shut down, and the order and content of what the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from pyscsi_target.isns import DesiredState, IsnsClient, Node, Portal, Registration
from pyscsi_target.isns.wire import (
    RESPONSE_BIT,
    Attribute,
    Flags,
    Function,
    PduReader,
    Status,
    Tag,
    decode_attrs,
    encode_attrs,
    encode_pdu,
)
from pyscsi_target.values import ListenAddress

T = TypeVar("T")
P = Portal("127.0.0.1", 3260)
REG = Registration("ent", (P,), (Node("iqn.2026-11.org.example:a", "A", ((P, 1),)),), period=600)


@dataclass
class Received:
    function: int
    flags: Flags
    attrs: list[Attribute]


Handler = Callable[[Received, int], list[bytes]]


@dataclass
class ScriptedServer:
    """Answers each request with whatever ``handler(request, xid)`` returns (PDUs to write)."""

    handler: Handler
    received: list[Received] = field(default_factory=list)
    replies: list[tuple[int, bytes]] = field(default_factory=list)  # the client's answers to our requests
    server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> ListenAddress:
        assert self.server is not None
        return ListenAddress("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pdus = PduReader()
        try:
            while data := await reader.read(65536):
                for msg in pdus.feed(data):
                    if msg.function & RESPONSE_BIT:
                        self.replies.append((msg.function, msg.payload))
                        continue
                    req = Received(msg.function, msg.flags, decode_attrs(msg.payload))
                    self.received.append(req)
                    for out in self.handler(req, msg.xid):
                        writer.write(out)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def answer(req: Received, xid: int, status: int = Status.SUCCESSFUL, *attrs: Attribute) -> bytes:
    payload = status.to_bytes(4, "big") + encode_attrs(list(attrs))
    return encode_pdu(req.function | RESPONSE_BIT, Flags.SERVER, xid, payload)


def ok(req: Received, xid: int) -> list[bytes]:
    if req.function == Function.DEV_ATTR_QRY:  # the refresh: our entity is there
        return [answer(req, xid, Status.SUCCESSFUL, req.attrs[1], Attribute(Tag.DELIMITER),
                       Attribute(Tag.ENTITY_IDENTIFIER, "ent"), Attribute(Tag.REGISTRATION_PERIOD, 600))]
    return [answer(req, xid)]


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)
    return asyncio.run(bounded())


def client(**kw: float) -> IsnsClient:
    return IsnsClient(**{"min_backoff": 0.05, "max_backoff": 0.2, "connect_timeout": 1.0, "request_timeout": 1.0,
                         **kw})


@contextlib.asynccontextmanager
async def synced(handler: Handler, timeout: float = 5.0,
                 **kw: float) -> AsyncIterator[tuple[ScriptedServer, IsnsClient]]:
    """A scripted server and a client that registered ``REG`` with it (the caller closes the client)."""
    async with ScriptedServer(handler) as srv:
        c = client(**kw)
        c.update(DesiredState((srv.address,), REG))
        c.start()
        assert await c.wait_synced(timeout)
        yield srv, c


def test_esi_and_scn_before_the_answer_are_answered() -> None:
    esi_attrs = [Attribute(Tag.ENTITY_IDENTIFIER, "ent"), Attribute(Tag.PORTAL_PORT, 3260)]
    scn_attrs = [Attribute(Tag.ISCSI_NAME, "iqn.2026-11.org.example:a"), Attribute(Tag.TIMESTAMP, 5)]

    def handler(req: Received, xid: int) -> list[bytes]:
        if req.function == Function.DEV_ATTR_REG:
            return [encode_pdu(Function.ESI, Flags.SERVER, 900, encode_attrs(esi_attrs)),
                    encode_pdu(Function.SCN, Flags.SERVER, 901, encode_attrs(scn_attrs)),
                    answer(req, xid)]
        return ok(req, xid)

    async def main() -> None:
        async with synced(handler) as (srv, c):
            await c.close()
            assert srv.replies == [
                (0x800D, bytes(4) + encode_attrs(esi_attrs)),  # ESIRsp echoes the ESI
                (0x8008, bytes(4) + encode_attrs(scn_attrs[:1])),  # SCNRsp names the destination
            ]
            assert [r.function for r in srv.received] == [Function.DEV_ATTR_REG, Function.DEV_DEREG]
            reg = srv.received[0]
            assert Flags.REPLACE in reg.flags and Flags.CLIENT in reg.flags
            assert reg.attrs[:3] == [Attribute(Tag.ISCSI_NAME, "iqn.2026-11.org.example:a"),
                                     Attribute(Tag.ENTITY_IDENTIFIER, "ent"), Attribute(Tag.DELIMITER)]

    run(main())


def test_an_error_status_is_retried_and_logged_once_with_its_meaning(caplog: pytest.LogCaptureFixture) -> None:
    refusals = 3

    def handler(req: Received, xid: int) -> list[bytes]:
        nonlocal refusals
        if req.function == Function.DEV_ATTR_REG and refusals:
            refusals -= 1
            return [answer(req, xid, Status.SOURCE_UNAUTHORIZED)]
        return ok(req, xid)

    async def main() -> None:
        async with synced(handler, 10) as (srv, c):
            assert c.servers()[0].failures == 0
            await c.close()
            assert [r.function for r in srv.received].count(Function.DEV_ATTR_REG) == 4

    with caplog.at_level(logging.INFO, logger="pyscsi_target.isns"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "DEV_ATTR_REG refused: Source Unauthorized (8)" in warnings[0] and "authentication" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("after 3 failed attempt(s)" in m for m in infos)


def test_refresh_that_finds_nothing_registers_again_with_replace() -> None:
    gone = True

    def handler(req: Received, xid: int) -> list[bytes]:
        nonlocal gone
        if req.function == Function.DEV_ATTR_QRY and gone:
            gone = False
            return [answer(req, xid, Status.SUCCESSFUL, req.attrs[1], Attribute(Tag.DELIMITER))]
        return ok(req, xid)

    async def main() -> None:
        async with synced(handler, refresh_fraction=0.001) as (srv, c):  # a refresh every second, the minimum
            for _ in range(60):
                if [r.function for r in srv.received][:4] == [Function.DEV_ATTR_REG, Function.DEV_ATTR_QRY,
                                                              Function.DEV_ATTR_REG, Function.DEV_ATTR_QRY]:
                    break
                await asyncio.sleep(0.1)
            functions = [r.function for r in srv.received]
            assert functions[:4] == [Function.DEV_ATTR_REG, Function.DEV_ATTR_QRY, Function.DEV_ATTR_REG,
                                     Function.DEV_ATTR_QRY], functions
            assert Flags.REPLACE in srv.received[2].flags
            await c.close()

    run(main())


def test_close_is_bounded_when_a_server_never_answers() -> None:
    def handler(req: Received, xid: int) -> list[bytes]:
        return [] if req.function == Function.DEV_DEREG else ok(req, xid)

    async def main() -> None:
        async with synced(handler, request_timeout=30) as (srv, c):
            loop = asyncio.get_running_loop()
            t = loop.time()
            await c.close(timeout=0.5)
            assert loop.time() - t < 2.0
            assert [r.function for r in srv.received] == [Function.DEV_ATTR_REG, Function.DEV_DEREG]

    run(main())


def test_update_returns_at_once_and_unchanged_state_sends_nothing() -> None:
    async def main() -> None:
        async with ScriptedServer(ok) as srv:
            c = client()
            c.start()
            loop = asyncio.get_running_loop()
            t = loop.time()
            c.update(DesiredState((srv.address,), REG))
            assert loop.time() - t < 0.05
            assert await c.wait_synced(5)
            for _ in range(5):
                c.update(DesiredState((srv.address,), REG))
            await asyncio.sleep(0.3)
            assert [r.function for r in srv.received] == [Function.DEV_ATTR_REG]
            await c.close()

    run(main())
