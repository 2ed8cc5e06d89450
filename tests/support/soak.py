"""Soak load: many iSCSI sessions doing mixed, self-checking I/O at once (issue 10, campaign).

Each ``SoakSession`` logs in (one connection, asyncio), then ``depth`` workers run in turn
WRITE (1-256 blocks, some with FUA, the longer ones through R2Ts), READ (compared with what
was written), VERIFY(16) with BYTCHK=1 (the target compares) and SYNCHRONIZE CACHE, each
worker on its own slice of the session's own LBA range, so every expected byte is known.
Block contents are derived from (session, LBA, generation): a lost, misplaced or stale write
shows as a mismatch.  At the end every block written is read back once more.

``run_soak`` drives ``sessions`` of them from one process for ``seconds`` and returns the
counts and every error; the daemon's RSS is sampled meanwhile by the caller (bench/soak.py,
tests/test_soak.py).  The PDU codec is the project's; the initiator logic is not.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyscsi_target.iscsi import pdu as P

BS = 512
INITIATOR = "iqn.2026-11.org.pyscsi-target.test:soak"
FIRST_BURST = 65536
MAX_BURST = 262144
MAX_RECV = 65536


def block_data(session: int, lba: int, gen: int) -> bytes:
    return struct.pack(">IIQ", session, lba, gen) * (BS // 16)


@dataclass
class Counts:
    ops: dict[str, int] = field(default_factory=lambda: {"write": 0, "read": 0, "verify": 0, "sync": 0})
    bytes_written: int = 0
    bytes_read: int = 0
    blocks_checked: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for k, v in other.ops.items():
            self.ops[k] = self.ops.get(k, 0) + v
        self.bytes_written += other.bytes_written
        self.bytes_read += other.bytes_read
        self.blocks_checked += other.blocks_checked
        self.errors += other.errors


class _Pending:
    __slots__ = ("cmd", "data", "buf", "fut")

    def __init__(self, cmd: P.ScsiCommand, data: bytes, read_len: int, fut: asyncio.Future[tuple[int, bytes, bytes]]):
        self.cmd, self.data, self.buf, self.fut = cmd, data, bytearray(read_len), fut


class SoakSession:
    def __init__(self, index: int, host: str, port: int, iqn: str, lun: int, first_lba: int, blocks: int,
                 depth: int, seed: int) -> None:
        self.index, self.host, self.port, self.iqn, self.lun = index, host, port, iqn, lun
        self.first_lba, self.blocks, self.depth = first_lba, blocks, depth
        self.rng = random.Random(seed)
        self.gen = [0] * blocks  # per block of the range: 0 = never written by us
        self.counts = Counts()
        self.cmdsn = 1
        self.statsn = 0
        self.itt = 0
        self.pending: dict[int, _Pending] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._rx: asyncio.Task[None] | None = None
        self.max_xmit = 8192

    def error(self, what: str) -> None:
        self.counts.errors.append(f"session {self.index} lun {self.lun}: {what}")

    # --- wire ----------------------------------------------------------------------------

    def _send(self, *pdus: P.PDU) -> None:
        assert self.writer is not None
        self.writer.write(b"".join(p.to_bytes() for p in pdus))

    async def _recv(self) -> P.PDU:
        assert self.reader is not None
        hdr = await self.reader.readexactly(48)
        dsl = int.from_bytes(hdr[5:8], "big")
        rest = await self.reader.readexactly(hdr[4] * 4 + dsl + P.pad_len(dsl))
        return P.decode(hdr + rest)

    async def login(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        isid = (0x40 << 40 | self.index).to_bytes(6, "big")
        keys = [("InitiatorName", INITIATOR), ("TargetName", self.iqn), ("SessionType", "Normal"),
                ("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", str(MAX_RECV)),
                ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", str(MAX_BURST)),
                ("FirstBurstLength", str(FIRST_BURST)), ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0")]
        req = P.LoginRequest(transit=1, csg=1, nsg=3, isid=isid, tsih=0, itt=0, cid=0, cmdsn=self.cmdsn,
                             expstatsn=0, data=P.build_text(keys))
        self._send(req)
        rsp = await asyncio.wait_for(self._recv(), 30)
        if not isinstance(rsp, P.LoginResponse) or rsp.status_class != 0 or rsp.nsg != 3:
            raise RuntimeError(f"session {self.index}: login failed: {rsp!r}")
        self.statsn = (rsp.statsn + 1) & 0xFFFFFFFF
        self.max_xmit = int(dict(P.parse_text(rsp.data)).get("MaxRecvDataSegmentLength", "8192"))
        self._rx = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        try:
            while True:
                pdu = await self._recv()
                if hasattr(pdu, "statsn") and isinstance(pdu, P.ScsiResponse | P.NopIn | P.AsyncMessage):
                    self.statsn = (pdu.statsn + 1) & 0xFFFFFFFF
                if isinstance(pdu, P.DataIn) and pdu.has_status:
                    self.statsn = (pdu.statsn + 1) & 0xFFFFFFFF
                self._dispatch(pdu)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for p in self.pending.values():
                if not p.fut.done():
                    p.fut.set_exception(ConnectionError(f"connection lost: {exc!r}"))
            self.pending.clear()

    def _dispatch(self, pdu: P.PDU) -> None:
        if isinstance(pdu, P.NopIn):
            if pdu.ttt != P.RESERVED_TAG:  # the target's ping
                self._send(P.NopOut(itt=P.RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmdsn=self.cmdsn,
                                    expstatsn=self.statsn, immediate=True))
            return
        if isinstance(pdu, P.AsyncMessage):
            self.error(f"async message {pdu!r}")
            return
        p = self.pending.get(getattr(pdu, "itt", -1))
        if p is None:
            self.error(f"PDU for no command: {pdu!r}")
            return
        if isinstance(pdu, P.R2T):
            self._data_out(p, pdu.offset, pdu.desired_length, pdu.ttt)
        elif isinstance(pdu, P.DataIn):
            p.buf[pdu.offset : pdu.offset + len(pdu.data)] = pdu.data
            if pdu.has_status:
                self._done(p, pdu.status, b"")
        elif isinstance(pdu, P.ScsiResponse):
            sense = b""
            if len(pdu.data) >= 2:
                sense = bytes(pdu.data[2 : 2 + struct.unpack_from(">H", pdu.data)[0]])
            self._done(p, pdu.status, sense)
        else:
            self.error(f"unexpected {pdu!r}")

    def _done(self, p: _Pending, status: int, sense: bytes) -> None:
        del self.pending[p.cmd.itt]
        if not p.fut.done():
            p.fut.set_result((status, bytes(p.buf), sense))

    def _data_out(self, p: _Pending, offset: int, length: int, ttt: int) -> None:
        out = []
        end, datasn = offset + length, 0
        while offset < end:
            n = min(self.max_xmit, end - offset)
            out.append(P.DataOut(final=int(offset + n == end), lun=p.cmd.lun, itt=p.cmd.itt, ttt=ttt,
                                 expstatsn=self.statsn, datasn=datasn, offset=offset, data=p.data[offset : offset + n]))
            offset += n
            datasn += 1
        self._send(*out)

    async def command(self, cdb: bytes, *, read_len: int = 0, data: bytes = b"") -> tuple[int, bytes, bytes]:
        self.itt = (self.itt + 1) & 0x7FFFFFFF or 1
        immediate = data[: min(FIRST_BURST, self.max_xmit)]
        unsolicited = len(immediate) < min(FIRST_BURST, len(data))  # Data-Out follows up to the first burst
        cmd = P.ScsiCommand(final=int(not unsolicited), read=int(read_len > 0), write=int(bool(data)),
                            attr=1, lun=P.int_to_lun(self.lun), itt=self.itt, edtl=read_len or len(data),
                            cmdsn=self.cmdsn, expstatsn=self.statsn, cdb=cdb.ljust(16, b"\0"), data=immediate)
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes, bytes]] = asyncio.get_running_loop().create_future()
        p = self.pending[cmd.itt] = _Pending(cmd, data, read_len, fut)
        self._send(cmd)
        if unsolicited:
            self._data_out_unsolicited(p, len(immediate), min(FIRST_BURST, len(data)))
        return await asyncio.wait_for(fut, 60)

    def _data_out_unsolicited(self, p: _Pending, start: int, end: int) -> None:
        out, datasn, off = [], 0, start
        while off < end:
            n = min(self.max_xmit, end - off)
            out.append(P.DataOut(final=int(off + n == end), lun=p.cmd.lun, itt=p.cmd.itt, ttt=P.RESERVED_TAG,
                                 expstatsn=self.statsn, datasn=datasn, offset=off, data=p.data[off : off + n]))
            off += n
            datasn += 1
        self._send(*out)

    # --- the load ------------------------------------------------------------------------

    def _expected(self, lba: int, n: int) -> bytes:
        return b"".join(block_data(self.index, lba + i, self.gen[lba + i - self.first_lba]) if
                        self.gen[lba + i - self.first_lba] else b"" for i in range(n))

    def _written(self, lba: int, n: int) -> bool:
        return all(self.gen[lba + i - self.first_lba] for i in range(n))

    async def _write(self, lba: int, n: int, fua: bool) -> None:
        gens = [self.gen[lba + i - self.first_lba] + 1 for i in range(n)]
        data = b"".join(block_data(self.index, lba + i, g) for i, g in enumerate(gens))
        cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, n, 0, 0)
        status, _, sense = await self.command(cdb, data=data)
        self.counts.ops["write"] += 1
        if status != 0:
            self.error(f"WRITE lba {lba} n {n}: status {status:#x} sense {sense.hex()}")
            return
        for i, g in enumerate(gens):
            self.gen[lba + i - self.first_lba] = g
        self.counts.bytes_written += len(data)

    async def _read(self, lba: int, n: int) -> None:
        status, data, sense = await self.command(struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0), read_len=n * BS)
        self.counts.ops["read"] += 1
        if status != 0:
            self.error(f"READ lba {lba} n {n}: status {status:#x} sense {sense.hex()}")
            return
        self.counts.bytes_read += len(data)
        for i in range(n):
            g = self.gen[lba + i - self.first_lba]
            if g and data[i * BS : (i + 1) * BS] != block_data(self.index, lba + i, g):
                got = data[i * BS : i * BS + 16]
                self.error(f"READ lba {lba + i}: expected generation {g}, got {got.hex()}")
                return
            self.counts.blocks_checked += bool(g)

    async def _verify(self, lba: int, n: int) -> None:
        data = self._expected(lba, n)
        cdb = struct.pack(">BBQIBB", 0x8F, 0x02, lba, n, 0, 0)  # VERIFY(16), BYTCHK=1
        status, _, sense = await self.command(cdb, data=data)
        self.counts.ops["verify"] += 1
        if status != 0:
            self.error(f"VERIFY lba {lba} n {n}: status {status:#x} sense {sense.hex()}")
        else:
            self.counts.blocks_checked += n

    async def _worker(self, slot: int, deadline: float) -> None:
        per = self.blocks // self.depth
        lo = self.first_lba + slot * per
        rng = self.rng
        while time.monotonic() < deadline:
            r = rng.random()
            n = rng.choice((1, 1, 2, 8, 8, 16, 64)) if rng.random() < 0.9 else rng.choice((128, 256))
            n = min(n, per)
            lba = lo + rng.randrange(per - n + 1)
            if r < 0.40:
                await self._write(lba, n, fua=rng.random() < 0.1)
            elif r < 0.80:
                await self._read(lba, n)
            elif r < 0.95:
                if self._written(lba, n):
                    await self._verify(lba, n)
                else:
                    await self._write(lba, n, fua=False)
            else:
                status, _, sense = await self.command(struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0))
                self.counts.ops["sync"] += 1
                if status != 0:
                    self.error(f"SYNCHRONIZE CACHE: status {status:#x} sense {sense.hex()}")

    async def run(self, deadline: float) -> None:
        for _ in range(4):  # the LU's POWER ON unit attention
            if (await self.command(bytes(6)))[0] == 0:
                break
        await asyncio.gather(*(self._worker(i, deadline) for i in range(self.depth)))

    async def check_all(self) -> None:
        """Read back every block this session wrote."""
        step = 128
        for lba in range(self.first_lba, self.first_lba + self.blocks, step):
            n = min(step, self.first_lba + self.blocks - lba)
            if any(self.gen[lba - self.first_lba : lba - self.first_lba + n]):
                await self._read(lba, n)

    async def logout(self) -> None:
        if self._rx is not None:
            self._rx.cancel()
        self.itt = (self.itt + 1) & 0x7FFFFFFF or 1
        self._send(P.LogoutRequest(reason=0, itt=self.itt, cid=0, cmdsn=self.cmdsn, expstatsn=self.statsn))
        try:
            while not isinstance(await asyncio.wait_for(self._recv(), 10), P.LogoutResponse):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            self.error(f"logout: {exc!r}")
        assert self.writer is not None
        self.writer.close()


async def run_soak(host: str, port: int, iqn: str, *, sessions: int, seconds: float, luns: int = 1,
                   blocks_per_session: int = 2048, depth: int = 4, seed: int = 1, first_index: int = 0,
                   progress: Callable[[str], None] | None = None) -> Counts:
    """``sessions`` sessions over ``luns`` LUNs (session i on LUN i % luns, its own range)."""
    ss = []
    for i in range(sessions):
        idx = first_index + i
        ss.append(SoakSession(idx, host, port, iqn, idx % luns, (idx // luns) * blocks_per_session,
                              blocks_per_session, depth, seed * 1000003 + idx))
    for s in ss:
        await s.login()
    if progress:
        progress(f"{sessions} sessions logged in")
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(s.run(deadline) for s in ss))
    if progress:
        progress("load done; reading back every block written")
    await asyncio.gather(*(s.check_all() for s in ss))
    for s in ss:
        await s.logout()
    total = Counts()
    for s in ss:
        total.add(s.counts)
    return total


@dataclass
class SoakReport:
    sessions: int
    seconds: float
    counts: Counts
    rss_mib: list[tuple[float, float]]  # (seconds since start, daemon RSS MiB)
    threads: list[tuple[float, int]]
    fds: list[tuple[float, int]]

    def rss_growth_mib(self) -> float:
        """Peak RSS of the last third of the run minus the peak of its second third (the first
        third is warm-up: the heap grows to its working size)."""
        n = len(self.rss_mib)
        if n < 3:
            return 0.0
        mid = max(r for _t, r in self.rss_mib[n // 3 : 2 * n // 3])
        end = max(r for _t, r in self.rss_mib[2 * n // 3 :])
        return end - mid

    def summary(self) -> dict[str, object]:
        c = self.counts
        ops = sum(c.ops.values())
        return {
            "sessions": self.sessions, "seconds": round(self.seconds, 1), "ops": c.ops,
            "ops_per_s": round(ops / self.seconds) if self.seconds else 0,
            "mib_written": c.bytes_written >> 20, "mib_read": c.bytes_read >> 20,
            "blocks_checked": c.blocks_checked, "errors": len(c.errors),
            "rss_mib_first_last_max": [self.rss_mib[0][1], self.rss_mib[-1][1], max(r for _t, r in self.rss_mib)]
            if self.rss_mib else [],
            "rss_growth_mib_last_third": round(self.rss_growth_mib(), 1),
            "threads_max": max((n for _t, n in self.threads), default=0),
            "fds_max": max((n for _t, n in self.fds), default=0),
        }


def _proc_sample(pid: int) -> tuple[float, int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def soak(pid: int, host: str, port: int, iqn: str, *, sessions: int, seconds: float, luns: int = 1,
         sample_every: float = 5.0, progress: Callable[[str], None] | None = None, **kw: object) -> SoakReport:
    """``run_soak`` against the daemon ``pid`` while its RSS, threads and descriptors are sampled."""
    samples: list[tuple[float, tuple[float, int, int]]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while True:
            samples.append((round(time.monotonic() - t0, 1), _proc_sample(pid)))
            if stop.wait(sample_every):
                return

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        counts = asyncio.run(run_soak(host, port, iqn, sessions=sessions, seconds=seconds, luns=luns,
                                      progress=progress, **kw))  # type: ignore[arg-type]
    finally:
        stop.set()
        th.join(10)
    return SoakReport(sessions, time.monotonic() - t0, counts, [(t, round(s[0], 1)) for t, s in samples],
                      [(t, s[1]) for t, s in samples], [(t, s[2]) for t, s in samples])
