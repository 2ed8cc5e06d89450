"""Portal groups: where the target listens.

Each listen address of a portal group ("IP:PORT" in the model) is bound by one
``Listener``; ``Portals.apply`` binds what the model adds and closes what it drops.  An
address that cannot be bound does not stop the others: they are reported together in
one ``EngineError`` once every other address has been tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from ..config import model as M
from ..values import format_listen, parse_listen

log = logging.getLogger(__name__)


class EngineError(OSError):
    """A configuration the engine cannot put into effect (e.g. a portal that cannot bind).

    An OSError so that callers treating bind failures as such (the daemon) see it."""


class Listener:
    """One listening socket of a portal group."""

    def __init__(self, host: str, port: int, pg_id: int) -> None:
        self.host = host
        self.port = port  # 0 in the model: the port the kernel chose, once started
        self.pg_id = pg_id
        self.server: asyncio.AbstractServer | None = None

    async def start(self, protocol_factory: Callable[[Listener], asyncio.BaseProtocol]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: protocol_factory(self),
                self.host or None,
                self.port,
                reuse_address=True,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_UNSPEC,
            )
        except OSError as e:
            raise EngineError(f"cannot listen on {format_listen(self.host, self.port)}: {e.strerror or e}") from e
        if self.port == 0 and self.server.sockets:
            self.port = self.server.sockets[0].getsockname()[1]
        log.info("listening on %s (portal group %d)", format_listen(self.host, self.port), self.pg_id)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            self.server = None
            log.info("stopped listening on %s", format_listen(self.host, self.port))


class Portals:
    """Every bound portal, keyed by the (host, port) the model names."""

    def __init__(self, protocol_factory: Callable[[Listener], asyncio.BaseProtocol]) -> None:
        self._factory = protocol_factory
        self.listeners: dict[tuple[str, int], Listener] = {}

    async def apply(self, model: M.ConfigModel, enabled: bool, tags: frozenset[int] | None = None) -> None:
        """Listen on every address of every portal group (none when not ``enabled``); with
        ``tags``, of those portal groups only (a gateway of a cluster serves its own)."""
        wanted: dict[tuple[str, int], int] = {}
        if enabled:
            for pg in model.portal_groups.values():
                if tags is not None and pg.tag not in tags:
                    continue
                for addr in pg.listen:
                    a = parse_listen(addr, allow_zero=True)
                    wanted[(a.host, a.port)] = pg.id
        for key in list(self.listeners):
            if key not in wanted:
                await self.listeners.pop(key).stop()
        failures = []
        for key, pg_id in wanted.items():
            lst = self.listeners.get(key)
            if lst is not None:
                lst.pg_id = pg_id
                continue
            lst = Listener(key[0], key[1], pg_id)
            try:
                await lst.start(self._factory)
            except EngineError as e:
                failures.append(str(e))
                continue
            self.listeners[key] = lst
        if failures:
            raise EngineError("; ".join(failures))

    async def stop(self) -> None:
        for lst in list(self.listeners.values()):
            await lst.stop()
        self.listeners.clear()

    def bound(self) -> dict[tuple[str, int], tuple[str, int]]:
        """Each listening address of the model -> the (host, port) actually bound."""
        return {key: (lst.host, lst.port) for key, lst in self.listeners.items()}

    def addresses(self) -> list[tuple[str, int]]:
        """Actual (host, port) of every listener (port 0 in the model resolves here)."""
        return [(lst.host, lst.port) for lst in self.listeners.values()]

    def bound_port(self, host: str, port: int) -> int:
        """The port an address of the model is served on (its listener's, if port 0 was asked)."""
        lst = self.listeners.get((host, port))
        return lst.port if lst is not None else port
