"""The asyncio iSNS client: keeps every configured server's view of this target current.

One task per server.  Each task reconciles what the server holds with the desired
``Registration`` (``plan.update``) whenever the configuration changes, and keeps the
registration alive by refreshing it (a DevAttrQry of our own entity) at half the
registration period the server reports.  A refresh whose answer lacks our entity (the
server restarted, an administrator removed it, it expired) triggers a full
re-registration.

Why refresh rather than ESI: ESI (RFC 4171 5.6.5.13) makes the server connect to a port
we would have to open and register per portal, reachable through whatever firewall sits
between them; open-isns still enforces the registration period when ESI is on.  A
refresh is one small request on a connection we open ourselves, it works with every
server, and the same query detects a server that lost our registration.

A connection lives for one burst of work (a change, a refresh) and is then closed, so
there is no idle connection for a server to time out and no half-open socket to notice.
Failures (refused or lost connections, timeouts, malformed replies, error statuses) are
retried with jittered exponential backoff and logged at most once per ``log_interval``
per server; nothing here waits on the network from a caller's point of view: ``start``
and ``update`` return at once and ``close`` is bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, replace

from ..values import ListenAddress
from . import plan
from .connection import ClientConnection, IsnsProtocolError
from .messages import Request, Response
from .registration import DesiredState, Registration
from .wire import Attribute, Function, Status, Tag, status_text

log = logging.getLogger("pyscsi_target.isns")

_HINTS: dict[int, str] = {
    Status.SOURCE_UNAUTHORIZED: " (the server requires iSNS authentication, which this target does not do)",
}


class IsnsRefused(Exception):
    """The server answered a request with an error status."""

    def __init__(self, request: Request, status: int) -> None:
        hint = _HINTS.get(status, "")
        super().__init__(f"{request.function.name} refused: {status_text(status)}{hint}")
        self.status = status


@dataclass(frozen=True, slots=True)
class ServerState:
    """What a caller (or a test) may know about one server."""

    address: ListenAddress
    registered: bool  # the server holds exactly the desired registration
    failures: int  # consecutive failed attempts
    last_error: str | None
    period: int | None  # the registration period the server reported


def _prepare(held: Registration | None, want: Registration,
             maybe_held: Registration | None) -> list[tuple[Request, bytes]]:
    """The requests from what the server holds (None: unknown) to ``want``, with their payloads."""
    if held is not None:
        requests = plan.update(held, want)
    elif not want.empty:
        requests = plan.register_all(want)  # Replace: whatever the server holds goes
    else:
        requests = plan.deregister_all(maybe_held) if maybe_held is not None else []
    return [(request, request.payload()) for request in requests]


class _Link:
    """The reconcile loop for one server."""

    def __init__(self, client: IsnsClient, address: ListenAddress, desired: Registration) -> None:
        self.client = client
        self.address = address
        self.desired = desired
        self.stopping = False
        self.held: Registration | None = None  # what the server holds; None: not known
        self.maybe_held: Registration | None = None  # what it may hold when `held` is unknown
        self.local_address: str | None = None
        self.period: int | None = None
        self.refresh_due = 0.0
        self.failures = 0
        self.last_error: str | None = None
        self._last_warning = float("-inf")
        self._suppressed = 0
        self.wake = asyncio.Event()
        self.synced = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # --- loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.wake.clear()
            try:
                await self._sync()
            except Exception as e:  # noqa: BLE001 - whatever a server does, the loop goes on
                self.held = None
                self._failed(e)
                if self.stopping:
                    return  # one attempt to deregister; the registration period does the rest
                await self._sleep(self._backoff(), wake_on_change=False)
                continue
            if self.stopping and (self.held is None or self.held.empty):
                return
            delay = max(0.0, self.refresh_due - loop.time()) if self.held is not None and not self.held.empty \
                else None
            await self._sleep(delay, wake_on_change=True)

    async def _sleep(self, delay: float | None, *, wake_on_change: bool) -> None:
        """Sleep ``delay`` seconds (None: until woken); a change wakes it early when
        ``wake_on_change``, closing always does."""
        if delay is not None and delay <= 0:
            return
        deadline = None if delay is None else asyncio.get_running_loop().time() + delay
        while not self.stopping:
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), remaining)
            except TimeoutError:
                return
            self.wake.clear()
            if wake_on_change:
                return

    def _backoff(self) -> float:
        c = self.client
        base: float = min(c.max_backoff, c.min_backoff * 2.0 ** min(self.failures - 1, 30))
        return base * random.uniform(0.75, 1.0)

    # --- one round -----------------------------------------------------------------------------

    def _target(self) -> Registration:
        return replace(self.desired, nodes=(), portals=()) if self.stopping else self.desired

    def _want(self, local: str | None) -> Registration | None:
        target = self._target()
        if local is None:
            return None if any(p.wildcard for p in target.portals) else target
        return target.resolved(local)

    async def _sync(self) -> None:
        loop = asyncio.get_running_loop()
        want = self._want(self.local_address)
        refresh_due = self.held is not None and not self.held.empty and loop.time() >= self.refresh_due
        if want is not None and self.held is not None and want == self.held and not refresh_due:
            self._settled()
            return
        if want is not None and want.empty and self.held is None and self.maybe_held is None:
            self.held = want  # nothing of ours can be there
            self._settled()
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address.host, self.address.port), self.client.connect_timeout)
        except TimeoutError:
            raise ConnectionError(f"cannot connect: no answer within {self.client.connect_timeout:g}s") from None
        except OSError as e:
            raise ConnectionError(f"cannot connect: {e.strerror or e}") from None
        try:
            sockname = writer.get_extra_info("sockname")
            self.local_address = str(sockname[0]) if sockname else None
            conn = ClientConnection(random.randrange(1, 0x10000))
            await self._converge(conn, reader, writer, refresh_due)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _converge(self, conn: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        refresh_due: bool) -> None:
        loop = asyncio.get_running_loop()
        want = self._want(self.local_address) or self._target()
        for _ in range(2):  # a second pass when the refresh finds the registration gone
            # Planning and encoding thousands of TLVs is milliseconds of CPU: not on the loop.
            prepared = await asyncio.to_thread(_prepare, self.held, want, self.maybe_held)
            requests = [request for request, _ in prepared]
            if requests:
                # Until the whole plan went through, the server holds something in between.
                if not want.empty:
                    self.maybe_held = want
                elif self.held is not None:
                    self.maybe_held = self.held
                self.held = None
                for request, payload in prepared:
                    self._note_period(await self._call(conn, reader, writer, request, payload))
                self._recovered(want, requests)
            elif refresh_due and not want.empty:
                response = await self._call(conn, reader, writer, plan.refresh(want))
                if Attribute(Tag.ENTITY_IDENTIFIER, want.entity_id) not in response.operating:  # not the key echo
                    log.info("iSNS server %s: entity %s is not registered any more; registering it again",
                             self.address, want.entity_id)
                    self.held = None
                    self.maybe_held = want
                    continue
                self._note_period(response)
                log.debug("iSNS server %s: registration of %s refreshed", self.address, want.entity_id)
            self.held = want
            self.maybe_held = None if want.empty else want
            break
        period = self.period or want.period
        self.refresh_due = loop.time() + max(1.0, period * self.client.refresh_fraction)
        self._settled()

    async def _call(self, conn: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: Request, payload: bytes | None = None) -> Response:
        xid, data = conn.send(request, payload)
        writer.write(data)
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + self.client.request_timeout
        while True:
            event = conn.next_event()
            if event is None:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    chunk = await asyncio.wait_for(reader.read(65536), remaining)
                except TimeoutError:
                    raise TimeoutError(f"no answer to {request.function.name} within "
                                       f"{self.client.request_timeout:g}s") from None
                if not chunk:
                    raise ConnectionResetError(f"connection closed while waiting for the {request.function.name} "
                                               "response")
                conn.receive_data(chunk)
                continue
            if isinstance(event, Response):
                if event.xid != xid:  # cannot happen: one request at a time; kept for safety
                    raise IsnsProtocolError(f"response to transaction {event.xid} while waiting for {xid}")
                if not event.ok and not (request.function == Function.DEV_DEREG
                                         and event.status == Status.NO_SUCH_ENTRY):
                    raise IsnsRefused(request, event.status)
                return event
            writer.write(event.reply())  # ESI or SCN: answer and keep waiting

    def _note_period(self, response: Response) -> None:
        for value in response.values(Tag.REGISTRATION_PERIOD):
            if isinstance(value, int):
                self.period = value

    # --- state and logging ----------------------------------------------------------------------

    def _settled(self) -> None:
        want = self._want(self.local_address)
        if want is not None and want == self.held:
            self.synced.set()

    def _recovered(self, held: Registration, requests: list[Request]) -> None:
        what = (f"deregistered entity {held.entity_id}" if held.empty else
                f"registered entity {held.entity_id}: {len(held.nodes)} target(s), {len(held.portals)} portal(s)")
        after = f" after {self.failures} failed attempt(s)" if self.failures else ""
        log.info("iSNS server %s: %s (%s)%s", self.address, what, plan.describe(requests), after)
        self.failures = 0
        self.last_error = None
        self._suppressed = 0
        self._last_warning = float("-inf")

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        expected = isinstance(e, OSError | TimeoutError | IsnsProtocolError | IsnsRefused)
        reason = str(e) or type(e).__name__
        if isinstance(e, IsnsProtocolError):
            reason = f"protocol error: {reason}"
        self.last_error = reason
        now = asyncio.get_running_loop().time()
        if self.stopping:
            log.info("iSNS server %s: could not deregister (%s); the server drops the registration when its "
                     "period ends", self.address, reason)
        elif now - self._last_warning >= self.client.log_interval:
            more = f" ({self._suppressed} similar failure(s) not logged)" if self._suppressed else ""
            log.warning("iSNS server %s: %s; retrying with backoff%s", self.address, reason, more,
                        exc_info=None if expected else e)
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1
            log.debug("iSNS server %s: %s", self.address, reason)

    def state(self) -> ServerState:
        want = self._want(self.local_address)
        return ServerState(self.address, want is not None and want == self.held and not want.empty,
                           self.failures, self.last_error, self.period)


class IsnsClient:
    """Registers this target with every configured iSNS server.

    ``start()`` once the event loop runs, ``update(desired)`` on every configuration change
    (cheap when nothing changed), ``await close()`` at shutdown (deregisters, bounded).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        refresh_fraction: float = 0.5,
        log_interval: float = 300.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.refresh_fraction = refresh_fraction
        self.log_interval = log_interval
        self._desired: DesiredState | None = None
        self._links: dict[ListenAddress, _Link] = {}
        self._started = False
        self._closed = False
        self._warned_rejected: tuple[str, ...] = ()

    def start(self) -> None:
        self._started = True
        if self._desired is not None:
            self.update(self._desired)

    def update(self, desired: DesiredState) -> None:
        """Adopt a new desired state: new servers get a link, dropped servers are deregistered
        from, and every link reconciles.  Returns at once."""
        if self._closed:
            return
        self._desired = desired
        if desired.rejected_servers and desired.rejected_servers != self._warned_rejected:
            log.warning("iSNS servers ignored (not IP[:port]): %s", ", ".join(desired.rejected_servers))
        self._warned_rejected = desired.rejected_servers
        if not self._started:
            return
        for address, link in list(self._links.items()):
            if address not in desired.servers and not link.stopping:
                link.stopping = True
                link.synced.clear()
                link.wake.set()
        for address in desired.servers:
            current = self._links.get(address)
            if current is None or (current.task is not None and current.task.done()):
                fresh = _Link(self, address, desired.registration)
                self._links[address] = fresh
                fresh.task = asyncio.get_running_loop().create_task(fresh.run(), name=f"isns {address}")
                fresh.task.add_done_callback(self._link_done)
                continue
            current.stopping = False
            if current.desired != desired.registration:
                current.desired = desired.registration
                current.synced.clear()
            current.wake.set()

    def _link_done(self, task: asyncio.Task[None]) -> None:
        for address, link in list(self._links.items()):
            if link.task is task and link.stopping:
                del self._links[address]
        if not task.cancelled() and task.exception() is not None:
            log.error("iSNS client task failed", exc_info=task.exception())

    async def close(self, timeout: float = 5.0) -> None:
        """Deregister from every server (each gets one attempt) and stop; never longer than
        ``timeout``.  A server we could not reach drops the registration when its period ends."""
        self._closed = True
        links = list(self._links.values())
        for link in links:
            link.stopping = True
            link.wake.set()
        tasks = [link.task for link in links if link.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._links.clear()

    def servers(self) -> list[ServerState]:
        return [link.state() for link in self._links.values()]

    async def wait_synced(self, timeout: float) -> bool:
        """True once every server holds the desired registration (for tests and diagnostics)."""
        links = [link for link in self._links.values() if not link.stopping]
        try:
            await asyncio.wait_for(asyncio.gather(*(link.synced.wait() for link in links)), timeout)
        except TimeoutError:
            return False
        return True
