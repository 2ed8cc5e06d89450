"""The workbench's hooks without sockets: a connection no rule or capture covers keeps the plain
classes (nothing on its path); a covered one gets them swapped in and back out; a capture does
not change one byte of what a connection sends; the pcapng framing, the rule parser."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from test_connection_ffp import Harness, rw10

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.connection import Connection
from pyscsi_target.workbench import Workbench
from pyscsi_target.workbench.capture import Capture
from pyscsi_target.workbench.faults import FaultError, Scope, cdb_range, rule_from_request
from pyscsi_target.workbench.hooks import FaultDevice, InterceptedConnection, InterceptedWireOutput
from pyscsi_target.workbench.pcapng import SEGMENT, TCP_ACK, TCP_PSH, Endpoints, Segment, checksum, write


class Registry:
    def of_target(self, iqn: str) -> list[Any]:
        return []


class Engine:
    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.session_registry = Registry()


class Proto:
    """What the hooks use of the asyncio adapter."""

    def __init__(self, h: Harness) -> None:
        self.conn = h.conn
        self.output = h.conn.output
        self.reader = h.reader
        self.login = None
        self.hook = None
        self.peer = "192.0.2.7:40000"
        self.peer_addr = ("192.0.2.7", 40000)
        self.local_addr = ("192.0.2.1", 3261)
        self.transport = None
        self.dropped: list[bool] = []

    def flush_later(self) -> None:
        pass

    def fault_drop(self, hard: bool) -> None:
        self.dropped.append(hard)


def setup() -> tuple[Workbench, Harness, Proto]:
    wb = Workbench(Engine())  # type: ignore[arg-type]
    h = Harness()
    proto = Proto(h)
    wb.engine.connections.add(proto)
    return wb, h, proto


def plain(h: Harness, proto: Proto, device: object) -> bool:
    return (type(h.conn) is Connection and type(h.conn.output) is P.WireOutput and h.reader.tap is None
            and proto.hook is None and h.session.device is device and "hook" not in vars(h.conn))


def test_nothing_covers_the_connection_then_nothing_is_on_its_path() -> None:
    wb, h, proto = setup()
    device = h.session.device
    wb.refresh(proto)  # type: ignore[arg-type]
    assert plain(h, proto, device)
    rule = rule_from_request({"kind": "status", "sense_key": 5, "asc": 0x24, "opcode": 0x28})
    wb.faults.add(rule)
    wb.refresh(proto)  # type: ignore[arg-type]
    assert type(h.conn) is InterceptedConnection and type(h.conn.output) is InterceptedWireOutput
    assert isinstance(h.session.device, FaultDevice) and h.reader.tap is None  # no capture: no tap
    (rsp,) = h.send(h.cmd(rw10(0x28, 0, 1), read=True, edtl=512))
    assert isinstance(rsp, P.ScsiResponse) and rsp.status == 2
    wb.faults.remove(rule.id)
    wb.refresh(proto)  # type: ignore[arg-type]
    assert plain(h, proto, device)
    (rsp,) = h.send(h.cmd(rw10(0x28, 0, 1), read=True, edtl=512))
    assert rsp.status == 0


def test_a_rule_for_another_target_stays_off() -> None:
    wb, h, proto = setup()
    wb.faults.add(rule_from_request({"kind": "drop", "target": "iqn.2026-11.org.example:other"}))
    wb.refresh(proto)  # type: ignore[arg-type]
    assert plain(h, proto, h.session.device)


def _traffic(h: Harness) -> bytes:
    """A write with R2Ts and Data-Out, a read, a NOP: every byte the connection sends."""
    out = b""
    data = bytes(range(256)) * 32
    w = h.cmd(rw10(0x2A, 8, 16), write=True, edtl=len(data))
    for ev in h.reader.feed(h.wire(w)):
        h.conn.handle(ev)
    out += b"".join(bytes(b) for b in h.conn.take_output())
    for ev in h.reader.feed(h.wire(P.DataOut(itt=w.itt, ttt=1, datasn=0, offset=0, final=1, data=data))):
        h.conn.handle(ev)
    for ev in h.reader.feed(h.wire(h.cmd(rw10(0x28, 8, 16), read=True, edtl=len(data)))):
        h.conn.handle(ev)
    for ev in h.reader.feed(h.wire(P.NopOut(itt=0x99, cmdsn=h.cmdsn, immediate=True, data=b"echo"))):
        h.conn.handle(ev)
    return out + b"".join(bytes(b) for b in h.conn.take_output())


def test_a_capture_changes_nothing_on_the_wire() -> None:
    wb, h, proto = setup()
    plain_bytes = _traffic(h)
    wb, h, proto = setup()
    cap = wb.captures.start(Scope())
    wb.refresh(proto, opened=True)  # type: ignore[arg-type]
    assert h.reader.tap is not None and type(h.conn.output) is InterceptedWireOutput
    assert _traffic(h) == plain_bytes
    sent = b"".join(s.data for s in cap.segments if not s.from_initiator)
    assert sent == plain_bytes  # and the capture holds exactly that
    wb.stop_capture(cap)
    assert plain(h, proto, h.session.device)


def test_ring_and_snaplen() -> None:
    cap = Capture(1, Scope(), limit=4096, snaplen=8)
    st = cap.open_stream(Endpoints("10.0.0.2", 1000, "10.0.0.1", 3260), 1, True, 0)
    for i in range(100):
        cap.record(st, False, (bytes(48), b"x" * 1000), 48, i)
    assert all(len(s.data) == 56 and s.length == 1048 for s in cap.segments)  # header + 8 data bytes
    assert cap.size <= 4096 and cap.evicted > 0 and st.seq_t == 1 + 100 * 1048
    assert cap.segments[-1].seq == 1 + 99 * 1048  # the stream stays consistent past what was evicted


def test_pcapng_framing() -> None:
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D  # RFC 1071's example
    ends = Endpoints("::ffff:10.0.0.2", 40000, "10.0.0.1", 3260)
    big = bytes(150_000)
    blob = b"".join(write([Segment(5, 1, False, TCP_ACK | TCP_PSH, 1, 1, big, len(big))], {1: ends}, "t"))
    assert blob[:4] == b"\x0a\x0d\x0d\x0a"
    # Three segments (64000, 64000, 22000 bytes), IPv4 (the mapped address), PSH only on the last.
    off, packets = 0, []
    while off < len(blob):
        btype, blen = struct.unpack_from("<II", blob, off)
        if btype == 6:
            cap_len, orig = struct.unpack_from("<II", blob, off + 20)
            frame = blob[off + 28 : off + 28 + cap_len]
            packets.append((orig, frame[12:14], frame[14 + 20 + 13], struct.unpack_from(">I", frame, 14 + 20 + 4)[0]))
        off += blen
    assert [p[0] - 54 for p in packets] == [SEGMENT, SEGMENT, 150_000 - 2 * SEGMENT]
    assert all(p[1] == b"\x08\x00" for p in packets)
    assert [p[2] & TCP_PSH for p in packets] == [0, 0, TCP_PSH] and [p[3] for p in packets] == [1, 64001, 128001]


def test_rule_parsing() -> None:
    r = rule_from_request({"kind": "status", "lba_first": "0x800", "lba_last": 2055, "sense_key": "3",
                           "asc": "0x11", "count": 0})
    assert (r.scope.lba_first, r.scope.lba_last, r.sense_key, r.asc, r.count) == (2048, 2055, 3, 0x11, None)
    assert r.seat == "scsi" and r.sense(rw10(0x28, 2050, 8)) is not None
    assert rule_from_request({"kind": "drop"}).count == 1 and rule_from_request({"kind": "drop"}).pdu == "scsi-command"
    assert rule_from_request({"kind": "delay", "pdu": "data-in", "delay_ms": 5}).seat == "output"
    assert rule_from_request({"kind": "delay", "pdu": "nop-out", "delay_ms": 5}).seat == "input"
    with pytest.raises(FaultError) as e:
        rule_from_request({"kind": "withhold", "pdu": "data-in", "lun": 1, "pdu_x": 1})
    assert e.value.field == "pdu_x"
    assert cdb_range(rw10(0x2A, 7, 3)) == (7, 3) and cdb_range(bytes(6)) is None
    assert cdb_range(struct.pack(">BBQ3xB", 0x89, 0, 99, 2).ljust(16, b"\0")) == (99, 2)  # COMPARE AND WRITE
    sc = Scope(lba_first=10, lba_last=20)
    assert sc.matches_command(0, rw10(0x28, 5, 6)) and not sc.matches_command(0, rw10(0x28, 5, 5))
    assert sc.matches_command(0, rw10(0x28, 20, 1)) and not sc.matches_command(0, rw10(0x28, 21, 1))
