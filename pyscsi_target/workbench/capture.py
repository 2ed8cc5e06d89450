"""PDU capture: what went over the wire on the connections a capture covers, in a bounded
ring, downloadable as pcapng (pcapng.py).

A capture covers a target, an initiator or a session (or every connection when none is
given).  The hooks (hooks.py) hand it each connection's bytes as they were read from and
written to the socket, one piece per PDU: a connection's pieces form a TCP stream whose
sequence numbers advance by every byte, so a piece whose payload is truncated
(``snaplen``: data-segment bytes kept per PDU) or evicted from the ring leaves the stream
consistent.  The ring holds at most ``limit`` bytes of captured data; the oldest pieces go
first, and the count of what was dropped is kept.  Capturing copies; it never changes what
is sent.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..iscsi.pdu import Payload
from . import pcapng
from .faults import Scope

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 16 << 20
MAX_LIMIT = 1 << 30
MAX_CAPTURES = 64
ISCSI_PORT = 3260
_OVERHEAD = 64  # bytes a piece costs in the ring beyond its data


@dataclass
class Stream:
    """One connection as one capture sees it: its endpoints and both sequence numbers."""

    id: int
    ends: pcapng.Endpoints
    tsih: int | None = None
    seq_i: int = 1  # next sequence number initiator -> target
    seq_t: int = 1  # next sequence number target -> initiator
    closed: bool = False


@dataclass
class Capture:
    id: int
    scope: Scope
    limit: int = DEFAULT_LIMIT
    snaplen: int | None = None  # data-segment bytes kept per PDU (None: all)
    real_ports: bool = False  # else the target side appears on 3260, where dissectors look for iSCSI
    started: float = field(default_factory=time.time)
    stopped: float | None = None
    segments: deque[pcapng.Segment] = field(default_factory=deque)
    streams: dict[int, Stream] = field(default_factory=dict)
    size: int = 0  # bytes held
    pieces: int = 0  # pieces recorded
    bytes_seen: int = 0  # stream bytes recorded (on the wire, truncated or not)
    evicted: int = 0  # pieces dropped from the ring
    _stream_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def running(self) -> bool:
        return self.stopped is None

    # --- recording (hooks.py) -----------------------------------------------------------------

    def open_stream(self, ends: pcapng.Endpoints, tsih: int | None, from_start: bool, ts_ns: int) -> Stream:
        """A connection joins the capture; ``from_start``: it has just opened (a handshake is drawn)."""
        if not self.real_ports:
            ends = pcapng.Endpoints(ends.initiator, ends.initiator_port, ends.target, ISCSI_PORT)
        st = Stream(next(self._stream_ids), ends, tsih)
        self.streams[st.id] = st
        if from_start:
            self._add(pcapng.Segment(ts_ns, st.id, True, pcapng.TCP_SYN, 0, 0, b"", 0))
            self._add(pcapng.Segment(ts_ns, st.id, False, pcapng.TCP_SYN | pcapng.TCP_ACK, 0, 1, b"", 0))
            self._add(pcapng.Segment(ts_ns, st.id, True, pcapng.TCP_ACK, 1, 1, b"", 0))
        return st

    def record(self, st: Stream, from_initiator: bool, items: Sequence[Payload], header: int, ts_ns: int,
               comment: str = "") -> None:
        """One PDU's bytes (``items`` in order, the first ``header`` bytes being its header)."""
        if not self.running or st.closed:
            return
        total = sum(len(b) for b in items)
        if not total:
            return
        keep = total if self.snaplen is None else min(total, header + self.snaplen)
        data = bytearray()
        for b in items:
            if len(data) >= keep:
                break
            data += b[: keep - len(data)] if len(data) + len(b) > keep else b
        flags = pcapng.TCP_ACK | pcapng.TCP_PSH
        if from_initiator:
            seg = pcapng.Segment(ts_ns, st.id, True, flags, st.seq_i, st.seq_t, bytes(data), total, comment)
            st.seq_i += total
        else:
            seg = pcapng.Segment(ts_ns, st.id, False, flags, st.seq_t, st.seq_i, bytes(data), total, comment)
            st.seq_t += total
        self.bytes_seen += total
        self._add(seg)

    def close_stream(self, st: Stream, ts_ns: int, reset: bool = False, comment: str = "") -> None:
        """The connection ended: a FIN each way, or the target's RST (a fault's reset)."""
        if st.closed or not self.running:
            return
        st.closed = True
        if reset:
            self._add(pcapng.Segment(ts_ns, st.id, False, pcapng.TCP_RST | pcapng.TCP_ACK, st.seq_t, st.seq_i, b"",
                                     0, comment))
            return
        self._add(pcapng.Segment(ts_ns, st.id, False, pcapng.TCP_FIN | pcapng.TCP_ACK, st.seq_t, st.seq_i, b"", 0,
                                 comment))
        self._add(pcapng.Segment(ts_ns, st.id, True, pcapng.TCP_FIN | pcapng.TCP_ACK, st.seq_i, st.seq_t + 1, b"", 0))

    def _add(self, seg: pcapng.Segment) -> None:
        self.segments.append(seg)
        self.pieces += 1
        self.size += len(seg.data) + _OVERHEAD
        while self.size > self.limit and len(self.segments) > 1:
            old = self.segments.popleft()
            self.size -= len(old.data) + _OVERHEAD
            self.evicted += 1

    # --- reading ----------------------------------------------------------------------------------

    def pcapng(self) -> Iterator[bytes]:
        """The ring as a pcapng file (a snapshot: recording goes on meanwhile)."""
        segments = list(self.segments)
        used = {s.stream for s in segments}
        streams = {sid: st.ends for sid, st in self.streams.items() if sid in used}
        return pcapng.write(segments, streams, f"pyscsi-target capture {self.id}")

    def describe(self) -> dict[str, Any]:
        sc = self.scope
        return {"id": self.id, "target": sc.target, "initiator": sc.initiator, "session": sc.session,
                "state": "running" if self.running else "stopped", "started": self.started, "stopped": self.stopped,
                "limit": self.limit, "snaplen": self.snaplen, "real_ports": self.real_ports, "size": self.size,
                "pieces": self.pieces, "bytes": self.bytes_seen, "evicted": self.evicted,
                "connections": len(self.streams)}


class CaptureBoard:
    """Every capture, running or stopped (a stopped one stays downloadable until removed)."""

    def __init__(self) -> None:
        self.captures: dict[int, Capture] = {}
        self._ids = itertools.count(1)

    def start(self, scope: Scope, limit: int = DEFAULT_LIMIT, snaplen: int | None = None,
              real_ports: bool = False) -> Capture:
        if len(self.captures) >= MAX_CAPTURES:
            raise ValueError(f"at most {MAX_CAPTURES} captures; remove some first")
        cap = Capture(next(self._ids), scope, limit, snaplen, real_ports)
        self.captures[cap.id] = cap
        log.info("capture %d started (target %s, initiator %s, session %s, ring %d bytes, snaplen %s)", cap.id,
                 scope.target or "any", scope.initiator or "any", scope.session or "any", limit,
                 snaplen if snaplen is not None else "all")
        return cap

    def stop(self, cap: Capture) -> None:
        if cap.running:
            cap.stopped = time.time()
            log.info("capture %d stopped: %d pieces, %d bytes seen", cap.id, cap.pieces, cap.bytes_seen)

    def remove(self, cap_id: int) -> Capture | None:
        cap = self.captures.pop(cap_id, None)
        if cap is not None:
            self.stop(cap)
        return cap

    def running(self) -> list[Capture]:
        return [c for c in self.captures.values() if c.running]
