"""pcapng with synthesised Ethernet/IP/TCP framing around captured iSCSI byte streams.

The workbench captures the bytes of each connection at the transport (what was read from
and written to the socket), not packets.  This module turns them back into a file that
Wireshark and tshark open as an ordinary TCP capture: one Ethernet II + IPv4/IPv6 + TCP
segment per captured piece (split at 64000 bytes, below the 16-bit IP length), with the
connection's real addresses and ports, sequence and acknowledgement numbers that follow
the byte stream (so the iSCSI dissector reassembles PDUs across segments), a synthesised
handshake when the capture saw the connection open and a FIN when it saw it close, and
correct IPv4 and TCP checksums.

A piece captured with its payload truncated keeps its full length on the wire: the
segments carry the original lengths and the sequence numbers advance by them, and the
Enhanced Packet Blocks say how much was captured (the classic snaplen), so Wireshark marks
them "packet size limited during capture".  Comments (the fault a piece was subject to)
become packet comments.

Format: pcapng (draft-ietf-opsawg-pcapng) section header, one Ethernet interface with
nanosecond timestamps, enhanced packet blocks.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

LINKTYPE_ETHERNET = 1
SEGMENT = 64000  # payload bytes per synthesised TCP segment
TARGET_MAC = bytes.fromhex("020000000001")
INITIATOR_MAC = bytes.fromhex("020000000002")

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_BYTE_ORDER_MAGIC = 0x1A2B3C4D


def _pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) & 3)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header(application: str) -> bytes:
    opts = _option(4, application.encode()) + _option(0, b"")  # shb_userappl
    return _block(0x0A0D0D0A, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + opts)


def interface_description(name: str = "pyscsi-target", snaplen: int = 0) -> bytes:
    opts = _option(2, name.encode()) + _option(9, bytes((9,))) + _option(0, b"")  # if_name, if_tsresol = ns
    return _block(1, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen) + opts)


def enhanced_packet(ts_ns: int, data: bytes, orig_len: int, comment: str = "") -> bytes:
    opts = (_option(1, comment.encode()) + _option(0, b"")) if comment else b""
    body = struct.pack("<IIIII", 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len) + _pad4(data) + opts
    return _block(6, body)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071), as the big-endian 16-bit value to store."""
    if len(data) & 1:
        data += b"\0"
    # Summing native-order words and swapping the folded result is the same sum (RFC 1071 2.B).
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    c = ~total & 0xFFFF
    return ((c & 0xFF) << 8) | (c >> 8) if sys.byteorder == "little" else c


@dataclass(frozen=True)
class Endpoints:
    """One TCP connection: the initiator's and the target's address and port."""

    initiator: str
    initiator_port: int
    target: str
    target_port: int

    @staticmethod
    def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        try:
            ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
        except ValueError:
            return ipaddress.IPv4Address("0.0.0.0")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    def addresses(self) -> tuple[bytes, bytes, int]:
        """(initiator IP, target IP, IP version); mixed families fall back to IPv6 for both."""
        a, b = self._ip(self.initiator), self._ip(self.target)
        if a.version == b.version:
            return a.packed, b.packed, a.version
        a6 = a if isinstance(a, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{a}")
        b6 = b if isinstance(b, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{b}")
        return a6.packed, b6.packed, 6


class Framer:
    """Ethernet/IP/TCP headers for the segments of one connection."""

    def __init__(self, ends: Endpoints) -> None:
        self.ends = ends
        self.ini_ip, self.tgt_ip, self.version = ends.addresses()
        self._ip_id = 0

    def frame(self, from_initiator: bool, seq: int, ack: int, flags: int, payload: bytes, payload_len: int,
              ack_valid: bool = True) -> tuple[bytes, int]:
        """(captured bytes of the frame, its length on the wire).  ``payload`` may be a prefix
        of the ``payload_len`` bytes the segment carried (truncated capture); the TCP
        checksum is then left 0, as it cannot be computed."""
        e = self.ends
        if from_initiator:
            src, dst, sport, dport = self.ini_ip, self.tgt_ip, e.initiator_port, e.target_port
            smac, dmac = INITIATOR_MAC, TARGET_MAC
        else:
            src, dst, sport, dport = self.tgt_ip, self.ini_ip, e.target_port, e.initiator_port
            smac, dmac = TARGET_MAC, INITIATOR_MAC
        if not ack_valid:
            flags &= ~TCP_ACK
        tcp = bytearray(struct.pack(">HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF if ack_valid else 0,
                                    5 << 4, flags, 65535, 0, 0))
        tcp_len = 20 + payload_len
        if len(payload) == payload_len:
            if self.version == 4:
                pseudo = src + dst + struct.pack(">BBH", 0, 6, tcp_len)
            else:
                pseudo = src + dst + struct.pack(">IxxxB", tcp_len, 6)
            struct.pack_into(">H", tcp, 16, _fold(checksum(pseudo + bytes(tcp) + payload)))
        if self.version == 4:
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, self._ip_id, 0x4000, 64, 6, 0, src, dst))
            struct.pack_into(">H", ip, 10, checksum(bytes(ip)))
            ethertype = 0x0800
        else:
            ip = bytearray(struct.pack(">IHBB16s16s", 6 << 28, tcp_len, 6, 64, src, dst))
            ethertype = 0x86DD
        head = dmac + smac + struct.pack(">H", ethertype) + bytes(ip) + bytes(tcp)
        return head + payload, len(head) + payload_len


def _fold(c: int) -> int:
    return c if c else 0xFFFF  # a computed TCP checksum of 0 travels as 0xffff


@dataclass(frozen=True)
class Segment:
    """What the capture recorded for one connection: a piece of one direction's byte
    stream (or a bare SYN/FIN), with its stream position."""

    ts_ns: int
    stream: int  # the connection's id within the capture
    from_initiator: bool
    flags: int
    seq: int  # of the first payload byte (or of the SYN/FIN)
    ack: int  # the other direction's next sequence number
    data: bytes  # captured payload (a prefix of ``length`` bytes when truncated)
    length: int  # payload bytes on the wire
    comment: str = ""


def write(segments: Iterable[Segment], streams: dict[int, Endpoints], application: str) -> Iterator[bytes]:
    """The pcapng file, in pieces."""
    yield section_header(application)
    yield interface_description()
    framers = {sid: Framer(ends) for sid, ends in streams.items()}
    for seg in segments:
        framer = framers.get(seg.stream)
        if framer is None:
            continue
        handshake = seg.flags & TCP_SYN and not seg.flags & TCP_ACK
        if seg.length <= SEGMENT:
            frame, wire = framer.frame(seg.from_initiator, seg.seq, seg.ack, seg.flags, seg.data, seg.length,
                                       ack_valid=not handshake)
            yield enhanced_packet(seg.ts_ns, frame, wire, seg.comment)
            continue
        for off in range(0, seg.length, SEGMENT):
            n = min(SEGMENT, seg.length - off)
            flags = seg.flags if off + n == seg.length else seg.flags & ~TCP_PSH
            frame, wire = framer.frame(seg.from_initiator, seg.seq + off, seg.ack, flags, seg.data[off : off + n], n)
            yield enhanced_packet(seg.ts_ns, frame, wire, seg.comment if off == 0 else "")
