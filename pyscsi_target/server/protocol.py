"""asyncio adapter: one ``BufferedProtocol`` per TCP connection.

The transport receives straight into the PDUReader's buffer (one recv per batch).  All
PDUs of a batch are handled, their responses collected, and written with one
``writelines`` at the end; completions that come later (thread-pool I/O) are coalesced
into one flush per loop iteration.  Timers live here, not in the sans-IO core: a login
timeout, and a NOP-In keepalive that pings an idle connection and drops it when the
ping goes unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..iscsi import pdu as P
from ..iscsi.connection import Connection
from ..iscsi.pdu import PduError, PDUReader

if TYPE_CHECKING:
    from .engine import Engine, Listener

log = logging.getLogger(__name__)

LOGIN_MAX_DATA = 8192  # MaxRecvDataSegmentLength before negotiation (RFC 7143 13.12)
# Initial receive buffer: holds hundreds of command PDUs per recv and keeps an idle
# session small (issue 5: < 256 KiB each); the framer grows it for large Data-Out PDUs.
READ_BUFFER = 32 * 1024
WRITE_HIGH_WATER = 8 * 1024 * 1024


class IscsiProtocol(asyncio.BufferedProtocol):
    def __init__(self, engine: Engine, listener: Listener) -> None:
        self.engine = engine
        self.listener = listener
        self.reader = PDUReader(max_data=LOGIN_MAX_DATA, bufsize=READ_BUFFER)
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.login: Any = None
        self.policy: Any = None
        self.peer = ""
        self._login_out: list[Any] = []
        self._close_after_flush = False
        self._in_batch = False
        self._flush_scheduled = False
        self._paused_writing = False
        self._paused_reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._logout_deadline: float | None = None
        self.loop = asyncio.get_running_loop()  # protocols are built by the running server

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from ..iscsi.login import LoginMachine

        self.transport = transport  # type: ignore[assignment]
        # A few large Data-In bursts exceed the default 64 KiB high-water mark; pausing
        # reads that early would stall a healthy pipeline.  The CmdSN window bounds it.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        peer_ip, local_ip, local_port = str(peer[0]), str(sock[0]), int(sock[1])
        if local_ip.startswith("::ffff:") and "." in local_ip:
            local_ip = local_ip[7:]  # an IPv4 client on a dual-stack socket
        self.peer = f"[{peer_ip}]:{peer[1]}" if ":" in peer_ip else f"{peer_ip}:{peer[1]}"
        self.engine.connections.add(self)
        self.policy = self.engine.make_policy(self.listener, peer_ip, local_ip, local_port)
        self.login = LoginMachine(self.policy, cmdsn_window=self.engine.queue_depth)
        self._last_rx = self.loop.time()
        self._timer = self.loop.call_later(self.engine.login_timeout, self._login_timeout)
        log.debug("connection from %s", self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_rx = self.loop.time()
        self._in_batch = True
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

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        if conn is not None:
            conn.connection_lost()
        else:
            # Bound by complete_login but never reached full feature phase (the final
            # response failed or the peer left): the session has no connection to live on.
            s = getattr(self.policy, "session", None)
            if s is not None and s.connection is None:
                self.engine.session_ended(s)
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

    def _login_event(self, ev: Any) -> bool:
        """Handle one event before full feature phase; True once login completed."""
        login = self.login
        if isinstance(ev, P.OversizedPDU):
            # A data segment over the 8192 bytes allowed during login: Login reject 0x0200.
            responses = login.oversized(ev.pdu, ev.length)
        elif isinstance(ev, P.PDU):
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
            self._login_out.extend(rsp.to_buffers())
        if login.failed:
            self._close_after_flush = True  # a login reject ends the connection (RFC 7143 11.13.5)
            return False
        if not login.done:
            return False
        self._enter_ffp(login.result)
        return True

    def _enter_ffp(self, result: Any) -> None:
        session = self.policy.session
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
        )
        self.conn = conn
        r = self.reader
        r.header_digest = params.header_digest
        r.data_digest = params.data_digest
        r.max_data = params.max_recv_dsl
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
            conn.announce_drop()
            self.close(abort_tasks=True)
            return
        idle = now - self._last_rx
        if conn.ping_ttt is not None and idle >= self.engine.nop_timeout:
            log.warning("%s: NOP-In ping unanswered for %.0fs, dropping connection", self.peer, idle)
            self.close(abort_tasks=True, hard=True)
            return
        if idle >= self.engine.nop_interval and conn.ping_ttt is None:
            conn.ping()
            self._flush()
        delay = self.engine.nop_interval if conn.ping_ttt is None else self.engine.nop_timeout
        if self._logout_deadline is not None:
            delay = min(delay, max(0.05, self._logout_deadline - now))
        self._timer = self.loop.call_later(delay, self._keepalive)

    def _notify(self) -> None:
        """Output produced outside a receive batch: flush once this loop iteration."""
        if self._in_batch or self._flush_scheduled:
            return
        self._flush_scheduled = True
        self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _on_event(self, event: str, conn: Connection) -> None:
        if event == "cold_reset" and conn.session.target is not None:
            iqn = conn.session.target.iqn
            self.loop.call_soon(self.engine.target_cold_reset, iqn)

    def _flush(self) -> None:
        t = self.transport
        if t is None:
            return
        out = self._login_out
        if out:
            self._login_out = []
        conn = self.conn
        if conn is not None and conn.out:
            out = out + conn.take_output() if out else conn.take_output()
        if out and not t.is_closing():
            t.writelines(out)
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
        conn.request_logout(within)
        self._logout_deadline = self.loop.time() + within
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(within, self._keepalive)
        self._flush()

    def close(self, abort_tasks: bool = False, hard: bool = False, announce: bool = False) -> None:
        if self.conn is not None and announce:
            self.conn.announce_drop()
        if self.conn is not None and abort_tasks:
            self.conn.abort_all()
        if hard and self.transport is not None:
            self.transport.abort()  # a dead peer would never drain our buffer
            return
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
