"""asyncio adapter: one ``BufferedProtocol`` per TCP connection.

The transport receives straight into the PDUReader's buffer (one recv per batch).  All
PDUs of a batch are handled, their responses collected, and written with one
``writelines`` at the end; completions that come later (thread-pool I/O) are coalesced
into one flush per loop iteration.  Timers live here, not in the sans-IO core: a login
timeout, and a NOP-In keepalive that pings an idle connection and drops it when the
ping goes unanswered.

One input point (``buffer_updated`` hands each framed event to the login machine or the
connection) and one output point (the connection's ``WireOutput``, written in
``_flush``) carry every PDU of the connection, login included.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..iscsi.connection import Connection
from ..iscsi.events import ABORT_TASKS, ANNOUNCE_DROP, LINK_LOST, PING, Notice, RequestLogout
from ..iscsi.login import LoginMachine
from ..iscsi.params import LoginResult
from ..iscsi.pdu import PDU, Framed, OversizedPDU, Payload, PduError, PDUReader, WireOutput
from ..iscsi.stats import clock_ns

if TYPE_CHECKING:
    from ..workbench.hooks import ConnectionHook
    from .engine import Engine
    from .initiator_access import PortalPolicy
    from .portal_groups import Listener

log = logging.getLogger(__name__)

LOGIN_MAX_DATA = 8192  # MaxRecvDataSegmentLength before negotiation (RFC 7143 13.12)
# Receive buffer: 32 KiB during login (a rejected login PDU is read whole, so the close
# after the reject is a FIN, not a reset that could discard the reject); 4 KiB in full
# feature phase while idle (RSS per idle session, issue 14).  The framer doubles it whenever
# a receive fills it, so a busy session soon takes hundreds of command PDUs per recv (up to
# READ_BUFFER_MAX), and grows it for large Data-Out PDUs.
READ_BUFFER = 32 * 1024
IDLE_READ_BUFFER = 4 * 1024
READ_BUFFER_MAX = 256 * 1024
WRITE_HIGH_WATER = 8 * 1024 * 1024
# While a large PDU (a WRITE's data) is only partly received, SO_RCVLOWAT asks the kernel to wake
# the loop once the rest is there, not for every segment: a 128 KiB PDU from the kernel
# initiator arrives in many segments, and each wake-up costs a loop iteration of Python.
LOWAT_MIN = 16 * 1024


@runtime_checkable
class StreamTransport(Protocol):
    """What we use of a TCP transport (asyncio's and uvloop's, which are not related classes)."""

    def get_extra_info(self, name: str, default: object = None) -> object: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def writelines(self, list_of_data: Iterable[Payload]) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _address(info: object) -> tuple[str, int]:
    """(host, port) of a socket address as get_extra_info gives it (IPv6 has 4 items)."""
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return "", 0


class IscsiProtocol(asyncio.BufferedProtocol):
    def __init__(self, engine: Engine, listener: Listener) -> None:
        self.engine = engine
        self.listener = listener
        self.reader = PDUReader(max_data=LOGIN_MAX_DATA, bufsize=READ_BUFFER, max_bufsize=READ_BUFFER_MAX)
        self.output = WireOutput()  # login responses, then everything the connection sends
        self.transport: StreamTransport | None = None
        self.conn: Connection | None = None
        self.login: LoginMachine | None = None
        self.policy: PortalPolicy | None = None
        self.peer = ""
        self.peer_addr: tuple[str, int] = ("", 0)
        self.local_addr: tuple[str, int] = ("", 0)
        # The workbench's hook while a fault rule or a capture covers this connection (else None).
        self.hook: ConnectionHook | None = None
        self._close_after_flush = False
        self._in_batch = False
        self._flush_scheduled = False
        self._paused_writing = False
        self._paused_reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._sock: socket.socket | None = None  # for SO_RCVLOWAT
        self._lowat = 1
        self._last_rx = 0.0
        self._logout_deadline: float | None = None
        self.loop = asyncio.get_running_loop()  # protocols are built by the running server

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, StreamTransport):
            raise TypeError(f"not a stream transport: {transport!r}")
        self.transport = transport
        # A few large Data-In bursts exceed the default 64 KiB high-water mark; pausing
        # reads that early would stall a healthy pipeline.  The CmdSN window bounds it.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self._sock = sock if hasattr(sock, "setsockopt") else None
        peer_ip, peer_port = _address(transport.get_extra_info("peername"))
        local_ip, local_port = _address(transport.get_extra_info("sockname"))
        if local_ip.startswith("::ffff:") and "." in local_ip:
            local_ip = local_ip[7:]  # an IPv4 client on a dual-stack socket
        self.peer = f"[{peer_ip}]:{peer_port}" if ":" in peer_ip else f"{peer_ip}:{peer_port}"
        self.peer_addr, self.local_addr = (peer_ip, peer_port), (local_ip, local_port)
        self.engine.connections.add(self)
        verdict = self.engine.admission.admit(self, peer_ip)
        if verdict is False:
            transport.abort()  # too many connections in login from this address
            return
        if isinstance(verdict, IscsiProtocol):
            verdict.close(hard=True)  # the oldest connection still in login makes room
        self.policy = self.engine.make_policy(self.listener, peer_ip, local_ip, local_port)
        self.login = LoginMachine(self.policy, cmdsn_window=self.engine.queue_depth,
                                  backoff=self.engine.auth_backoff, peer=self.peer, peer_ip=peer_ip)
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(self.engine.login_timeout, self._login_timeout)
        self.engine.workbench.connection_made(self)
        log.debug("connection from %s", self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_rx = self.loop.time()
        self._in_batch = True
        if self.conn is not None:
            self.conn.rx_ns = clock_ns()  # the batch's arrival: commands' latency starts here
        try:
            events = self.reader.buffer_updated(nbytes)
            while True:
                switched = False
                for ev in events:
                    conn = self.conn
                    if conn is None:
                        switched = self._login_event(ev)
                        if switched or self._close_after_flush:
                            break
                    else:
                        conn.handle(ev)
                        if conn.closing:
                            break
                if switched:
                    # Digests and MaxRecvDataSegmentLength change from the next PDU on:
                    # reparse what is left of the buffer with the new settings.
                    events = self.reader.buffer_updated(0)
                    continue
                break
        except PduError as e:
            log.info("%s: unframeable input (%s), dropping", self.peer, e)
            self._close_after_flush = True
        except Exception:  # noqa: BLE001 - one bad connection must not take the server down
            log.exception("%s: internal error, dropping connection", self.peer)
            self._close_after_flush = True
        finally:
            self._in_batch = False
            self._flush()
            need = self.reader.need
            if need >= LOWAT_MIN or self._lowat != 1:
                self._set_lowat(need if need >= LOWAT_MIN else 1)

    def _set_lowat(self, nbytes: int) -> None:
        """Readable only once ``nbytes`` are queued (the kernel caps it at half the receive
        buffer).  Only ever the rest of a PDU whose header arrived: the peer must send it."""
        if nbytes == self._lowat or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:
            self._sock = None  # not supported here: wake per segment, as without it
            return
        self._lowat = nbytes

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.hook is not None:
            self.engine.workbench.connection_lost(self)
        conn = self.conn
        if conn is not None:
            conn.handle(LINK_LOST)
        else:
            # Bound by complete_login but never reached full feature phase (the final
            # response failed or the peer left): the session has no connection to live on.
            s = self.policy.session if self.policy is not None else None
            if s is not None and s.connection is None:
                self.engine.session_registry.ended(s)
        self.engine.connection_closed(self)
        log.debug("connection %s closed (%s)", self.peer, exc or "clean")

    def pause_writing(self) -> None:
        # The peer is not reading: stop taking new commands until our output drains.
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Read only while our output drains and the command backlog is bounded.

        MaxCmdSN already limits numbered commands; immediate ones are not numbered, so a
        flood of those is held off here by not reading."""
        t = self.transport
        if t is None or t.is_closing():
            return
        conn = self.conn
        backlog = len(conn.session.tasks) if conn is not None else 0
        limit = self.engine.queue_depth
        if self._paused_reading:
            if not self._paused_writing and backlog < limit:
                self._paused_reading = False
                t.resume_reading()
        elif self._paused_writing or backlog >= 2 * limit:
            self._paused_reading = True
            t.pause_reading()

    # --- login phase ----------------------------------------------------------------------

    def _login_event(self, ev: Framed) -> bool:
        """Handle one event before full feature phase; True once login completed."""
        login = self.login
        if login is None:  # no event comes before connection_made
            return False
        if isinstance(ev, OversizedPDU):
            # A data segment over the 8192 bytes allowed during login: Login reject 0x0200.
            responses = login.oversized(ev.pdu, ev.length)
        elif isinstance(ev, PDU):
            # Any other PDU before full feature phase is answered by the login machine
            # with Login reject 0x020b (RFC 7143 6.2: invalid during login).
            if isinstance(ev.data, memoryview):
                ev.data = bytes(ev.data)
            responses = login.receive(ev)
        else:  # digest errors cannot happen before digests are negotiated
            log.info("%s: %r during login, dropping", self.peer, ev)
            self._close_after_flush = True
            return False
        for rsp in responses:
            self.output.send(rsp)
        if self.hook is not None:
            self.engine.workbench.login_progress(self)
        if login.failed:
            self._close_after_flush = True  # a login reject ends the connection (RFC 7143 11.13.5)
            self.engine.workbench.login_failed(self, login)
            return False
        if not login.done or login.result is None:
            return False
        self._enter_ffp(login.result)
        self.login = None  # its negotiation state is not needed any more (RSS per session)
        self.reader.shrink(IDLE_READ_BUFFER)
        return True

    def _enter_ffp(self, result: LoginResult) -> None:
        session = self.policy.session if self.policy is not None else None
        if session is None:
            # The login machine finished without complete_login: cannot happen with a
            # conforming LoginMachine; refuse rather than serve an unbound session.
            log.error("%s: login finished without a session", self.peer)
            self._close_after_flush = True
            return
        params = result.params
        conn = Connection(
            session,
            cid=result.cid,
            statsn=result.statsn,
            policy=self.policy,
            peer=self.peer,
            notify=self._notify,
            on_event=self._on_event,
            conn_params=params,
            output=self.output,
        )
        self.conn = conn
        self.engine.admission.login_over(self)
        r = self.reader
        r.header_digest = params.header_digest
        r.data_digest = params.data_digest
        r.max_data = params.max_recv_dsl
        if self.hook is not None:
            self.engine.workbench.entered_ffp(self)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.engine.nop_interval, self._keepalive)
        log.info("%s: %s session %s tsih %d (%s) digests %s/%s MaxRecvDSL %d/%d", self.peer, result.session_type,
                 result.initiator_name, session.tsih, session.target.iqn if session.target else "discovery",
                 "CRC32C" if params.header_digest else "None", "CRC32C" if params.data_digest else "None",
                 params.max_recv_dsl, params.max_xmit_dsl)

    def _login_timeout(self) -> None:
        self._timer = None
        if self.conn is None and self.transport is not None:
            log.info("%s: login timed out", self.peer)
            self.transport.abort()

    # --- full feature phase ---------------------------------------------------------------

    def _keepalive(self) -> None:
        self._timer = None
        conn = self.conn
        if conn is None or conn.closed or self.transport is None:
            return
        now = self.loop.time()
        if self._logout_deadline is not None and now >= self._logout_deadline:
            log.info("%s: no logout after the async logout request, dropping", self.peer)
            conn.handle(ANNOUNCE_DROP)
            self.close(abort_tasks=True)
            return
        idle = now - self._last_rx
        if conn.ping_ttt is not None and idle >= self.engine.nop_timeout:
            log.warning("%s: NOP-In ping unanswered for %.0fs, dropping connection", self.peer, idle)
            self.close(abort_tasks=True, hard=True)
            return
        if idle >= self.engine.nop_interval and conn.ping_ttt is None:
            self.reader.shrink(IDLE_READ_BUFFER)  # quiet for a NOP interval: give a grown buffer back
            conn.handle(PING)
            self._flush()
        delay = self.engine.nop_interval if conn.ping_ttt is None else self.engine.nop_timeout
        if self._logout_deadline is not None:
            delay = min(delay, max(0.05, self._logout_deadline - now))
        self._timer = self.loop.call_later(delay, self._keepalive)

    def flush_later(self) -> None:
        """Output queued from a timer (the workbench's delays): flush once this loop iteration."""
        self._notify()

    def fault_drop(self, hard: bool) -> None:
        """A fault rule drops the connection: what is queued is written, then a TCP reset
        (``hard``) or an orderly close."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.output.buffers:
            t.writelines(self.output.take())
        self._close_after_flush = True  # no further login PDU is handled
        if self.conn is not None:
            self.conn.handle(LINK_LOST)  # nor any further PDU: the tasks end, as when the link goes
        if hard:
            t.abort()
        else:
            t.close()

    def _notify(self) -> None:
        """Output produced outside a receive batch: flush once this loop iteration."""
        if self._in_batch or self._flush_scheduled:
            return
        self._flush_scheduled = True
        self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _on_event(self, event: Notice, conn: Connection) -> None:
        if event is Notice.COLD_RESET and conn.session.target is not None:
            self.loop.call_soon(self.engine.target_cold_reset, conn.session.target.iqn)

    def _flush(self) -> None:
        t = self.transport
        if t is None:
            return
        if self.output.buffers:
            out = self.output.take()
            if not t.is_closing():
                t.writelines(out)
        conn = self.conn
        if self._close_after_flush or (conn is not None and conn.closing):
            t.close()  # close() still sends what is buffered
        elif conn is not None and (self._paused_reading or len(conn.session.tasks) >= 2 * self.engine.queue_depth):
            self._update_reading()

    def request_logout(self, within: int) -> None:
        """Shutdown: Async Message asking the initiator to log out within ``within`` s."""
        conn = self.conn
        if conn is None:
            self.close()
            return
        conn.handle(RequestLogout(within))
        self._logout_deadline = self.loop.time() + within
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(within, self._keepalive)
        self._flush()

    def close(self, abort_tasks: bool = False, hard: bool = False, announce: bool = False) -> None:
        if self.conn is not None and announce:
            self.conn.handle(ANNOUNCE_DROP)
        if self.conn is not None and abort_tasks:
            self.conn.handle(ABORT_TASKS)
        if hard and self.transport is not None:
            self.transport.abort()  # a dead peer would never drain our buffer
            return
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
