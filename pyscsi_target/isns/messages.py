"""iSNSP messages (RFC 4171 5.6): what a target sends and what it gets back.

A request is ``Source, Message Key, Delimiter, Operating Attributes``; a response is
``Status, Message Key, Delimiter, Operating Attributes``.  The server's own requests to
a client (ESI, SCN) carry their attributes without a source or a delimiter, and are
answered with the status and the attributes RFC 4171 5.7.5 asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .wire import (
    RESPONSE_BIT,
    Attribute,
    Flags,
    Function,
    IsnsFormatError,
    RawMessage,
    Status,
    Tag,
    decode_attrs,
    encode_attrs,
    encode_pdu,
)

DELIMITER = Attribute(Tag.DELIMITER)


@dataclass(frozen=True, slots=True)
class Request:
    """A client request; ``source`` is the iSCSI name of one of our registered nodes."""

    function: Function
    source: str
    key: tuple[Attribute, ...] = ()
    operating: tuple[Attribute, ...] = ()
    replace: bool = False

    def payload(self) -> bytes:
        return encode_attrs((Attribute(Tag.ISCSI_NAME, self.source), *self.key, DELIMITER, *self.operating))

    def encode(self, xid: int, payload: bytes | None = None) -> bytes:
        """The PDU; ``payload`` is ``self.payload()`` when already computed (e.g. off the loop)."""
        flags = Flags.CLIENT | (Flags.REPLACE if self.replace else Flags.NONE)
        return encode_pdu(self.function, flags, xid, self.payload() if payload is None else payload)


@dataclass(frozen=True, slots=True)
class Response:
    """A server's response to one of our requests."""

    function: Function  # the request's function (without the response bit)
    xid: int
    status: int
    key: tuple[Attribute, ...] = ()
    operating: tuple[Attribute, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESSFUL

    def values(self, tag: int) -> list[object]:
        """The values of ``tag`` among the operating attributes (the answer proper)."""
        return [a.value for a in self.operating if a.tag == tag]


@dataclass(frozen=True, slots=True)
class ServerRequest:
    """A request the server sends to us: ESI, SCN, or something a target does not serve."""

    function: int
    xid: int
    attributes: tuple[Attribute, ...] = field(default=())

    def reply(self) -> bytes:
        """The response RFC 4171 asks of a client: ESIRsp echoes the ESI's attributes (5.7.5.13),
        SCNRsp carries the SCN's destination attribute (5.7.5.8); anything else is refused
        with "Message Not Supported"."""
        if self.function == Function.ESI:
            status, attrs = Status.SUCCESSFUL, self.attributes
        elif self.function == Function.SCN:
            status, attrs = Status.SUCCESSFUL, self.attributes[:1]
        else:
            status, attrs = Status.MESSAGE_NOT_SUPPORTED, ()
        payload = int(status).to_bytes(4, "big") + encode_attrs(attrs)
        return encode_pdu(self.function | RESPONSE_BIT, Flags.CLIENT, self.xid, payload)


def _split_at_delimiter(attrs: list[Attribute]) -> tuple[tuple[Attribute, ...], tuple[Attribute, ...]]:
    for i, a in enumerate(attrs):
        if a.tag == Tag.DELIMITER:
            return tuple(attrs[:i]), tuple(attrs[i + 1:])
    return tuple(attrs), ()


def decode_message(msg: RawMessage) -> Response | ServerRequest:
    """Type a reassembled message from a server.  A response with an error status may carry
    no attributes at all; a malformed payload is an ``IsnsFormatError``."""
    if msg.function & RESPONSE_BIT:
        try:
            function = Function(msg.function & ~RESPONSE_BIT)
        except ValueError:
            raise IsnsFormatError(f"response to unknown function {msg.function:#06x}") from None
        if len(msg.payload) < 4:
            raise IsnsFormatError("a response without a status code")
        status = int.from_bytes(msg.payload[:4], "big")
        rest = msg.payload[4:]
        try:
            attrs = decode_attrs(rest)
        except IsnsFormatError:
            if status == Status.SUCCESSFUL:
                raise
            attrs = []  # an error status is what matters; servers may append anything
        key, operating = _split_at_delimiter(attrs)
        return Response(function, msg.xid, status, key, operating)
    return ServerRequest(msg.function, msg.xid, tuple(decode_attrs(msg.payload)))
