"""The client side of one iSNSP connection, without I/O (the h11 pattern).

``send(request)`` numbers a request and returns its bytes; ``receive_data(data)`` takes
what the socket read; ``next_event()`` hands out typed events: the ``Response`` to an
outstanding request, or a ``ServerRequest`` (ESI, SCN) the caller answers with
``reply()``.  Anything a server sends that RFC 4171 does not allow (bad framing, a
response nobody asked for, a response to a different function) raises
``IsnsProtocolError``; the caller drops the connection.
"""

from __future__ import annotations

from collections import deque

from .messages import Request, Response, ServerRequest, decode_message
from .wire import IsnsFormatError, PduReader


class IsnsProtocolError(Exception):
    """The server broke the protocol; the connection cannot be trusted any further."""


Event = Response | ServerRequest


class ClientConnection:
    def __init__(self, first_xid: int = 1) -> None:
        self._reader = PduReader()
        self._next_xid = first_xid & 0xFFFF or 1
        self._outstanding: dict[int, Request] = {}
        self._events: deque[Event] = deque()

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def send(self, request: Request, payload: bytes | None = None) -> tuple[int, bytes]:
        """The transaction ID given to ``request`` and the bytes to write (``payload``: its
        payload, if the caller encoded it already)."""
        xid = self._next_xid
        while xid in self._outstanding or xid == 0:
            xid = (xid + 1) & 0xFFFF
        self._next_xid = (xid + 1) & 0xFFFF
        self._outstanding[xid] = request
        return xid, request.encode(xid, payload)

    def receive_data(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except IsnsFormatError as e:
            raise IsnsProtocolError(str(e)) from None
        for raw in messages:
            try:
                event = decode_message(raw)
            except IsnsFormatError as e:
                raise IsnsProtocolError(str(e)) from None
            if isinstance(event, Response):
                request = self._outstanding.pop(event.xid, None)
                if request is None:
                    raise IsnsProtocolError(f"a response to transaction {event.xid}, which is not outstanding")
                if request.function != event.function:
                    raise IsnsProtocolError(
                        f"transaction {event.xid}: {request.function.name} answered with {event.function.name}")
            self._events.append(event)

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        return self._events.popleft() if self._events else None
