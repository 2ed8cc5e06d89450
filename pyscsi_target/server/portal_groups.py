"""Portal groups: where the target listens.

Each listen address of a portal group ("IP:PORT" in the model) is bound by one
``Listener``; ``Portals.apply`` binds what the model adds and closes what it drops.  An
address that cannot be bound does not stop the others: they are reported together in
one ``EngineError`` once every other address has been tried.

A listener accepts connections itself, one at a time, rather than through the loop's
server: the loop's accepts every pending connection in one go and, out of descriptors,
silently drops them (libuv's EMFILE handling), the REST API's included.  Here each accept
first asks the engine's ``Admission`` (admission.py) whether a descriptor may be spent;
when not, or when accept() fails with EMFILE/ENFILE, the listener stops reading for a
moment and the connections wait in the kernel's backlog.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from ..config import model as M
from ..values import format_listen, parse_listen
from .admission import Admission

log = logging.getLogger(__name__)

BACKLOG = 1024  # connections the kernel queues while we do not accept (somaxconn may cap it)
ACCEPT_BATCH = 64  # accepts per readiness event, so one busy portal cannot hold the loop
PAUSE = 0.1  # seconds before accepting again when descriptors are short
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class EngineError(OSError):
    """A configuration the engine cannot put into effect (e.g. a portal that cannot bind).

    An OSError so that callers treating bind failures as such (the daemon) see it."""


class Listener:
    """One listening address of a portal group (one socket, or two for a wildcard host)."""

    def __init__(self, host: str, port: int, pg_id: int, admission: Admission | None = None) -> None:
        self.host = host
        self.port = port  # 0 in the model: the port the kernel chose, once started
        self.pg_id = pg_id
        self.admission = admission
        self.sockets: list[socket.socket] = []
        self._factory: Callable[[Listener], asyncio.BaseProtocol] | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._resume: dict[int, asyncio.TimerHandle] = {}

    async def start(self, protocol_factory: Callable[[Listener], asyncio.BaseProtocol]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.sockets = _bind(self.host, self.port)
        except OSError as e:
            raise EngineError(f"cannot listen on {format_listen(self.host, self.port)}: {e.strerror or e}") from e
        if self.port == 0 and self.sockets:
            self.port = self.sockets[0].getsockname()[1]
        self._factory = protocol_factory
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._readable, sock)
        log.info("listening on %s (portal group %d)", format_listen(self.host, self.port), self.pg_id)

    def _readable(self, sock: socket.socket) -> None:
        adm = self.admission
        for _ in range(ACCEPT_BATCH):
            if adm is not None and not adm.may_accept():
                self._pause(sock)
                return
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    if adm is not None:
                        adm.accept_failed(exc)
                    self._pause(sock)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue  # the peer gave up while queued
                log.warning("accept on %s: %s", format_listen(self.host, self.port), exc)
                return
            if adm is not None:
                adm.accepted()
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.get_running_loop().create_task(self._connect(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        factory = self._factory
        assert factory is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: factory(self), conn)
        except Exception as exc:  # noqa: BLE001 - one connection's failure must not stop the portal
            log.warning("cannot serve a connection on %s: %s", format_listen(self.host, self.port), exc)
            conn.close()
            if self.admission is not None:
                self.admission.gauge.closed()

    def _pause(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        loop.remove_reader(fd)
        self._resume[fd] = loop.call_later(PAUSE, self._unpause, sock)

    def _unpause(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._resume.pop(fd, None)
        if fd >= 0:
            asyncio.get_running_loop().add_reader(fd, self._readable, sock)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for timer in self._resume.values():
            timer.cancel()
        self._resume.clear()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        if self.sockets:
            log.info("stopped listening on %s", format_listen(self.host, self.port))
        self.sockets = []


def check_bindable(host: str, port: int) -> None:
    """Raise EngineError now if ``host:port`` cannot be listened on (taken by another target,
    say): lets a first start fail before it seeds a state dir it would then have to keep."""
    try:
        sockets = _bind(host, port)
    except OSError as e:
        raise EngineError(f"cannot listen on {format_listen(host, port)}: {e.strerror or e}") from e
    for sock in sockets:
        sock.close()


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` ("" or a wildcard: every family it resolves to)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_UNSPEC
    infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    out: list[socket.socket] = []
    seen = set()
    try:
        for af, kind, proto, _canon, addr in infos:
            if (af, addr) in seen:
                continue
            seen.add((af, addr))
            sock = socket.socket(af, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(out) > 1:  # a wildcard's second family: the port the first got
                addr = (addr[0], out[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class Portals:
    """Every bound portal, keyed by the (host, port) the model names."""

    def __init__(self, protocol_factory: Callable[[Listener], asyncio.BaseProtocol],
                 admission: Admission | None = None) -> None:
        self._factory = protocol_factory
        self.admission = admission
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
            lst = Listener(key[0], key[1], pg_id, self.admission)
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
