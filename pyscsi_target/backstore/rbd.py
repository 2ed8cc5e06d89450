"""RBD backstore: a Ceph RBD image as a logical unit's storage, through librbd's C API.

Data path (loop thread, no thread hop): ``read``/``write``/``flush``/``discard``/``write_zeroes``/
``compare_and_write`` start a librbd aio and return; the completion runs ``done(exc)`` on the
event loop, handed over in batches through the image's eventfd (see backstore/librbd.py).
``exc`` is None on success, a ``Miscompare`` for a failed COMPARE AND WRITE, else an OSError
carrying librbd's errno.  A request that cannot even start (closed or read-only image, librbd
refusing it) raises at once instead.  ``done`` always runs later, never inside the call, empty
requests included.  ``close()`` belongs after the I/O in flight (``inflight``) has completed:
the completions of requests still in flight then never run.

Blocking calls (``block_status``, ``resize``, ``refresh_size``, ``allocated_bytes``,
``read_into``/``write_blocking``/``flush_blocking`` for copy and sanitize work, ``open``/``close``)
wait for the cluster and belong in a thread.

Facts measured on Ceph 16.2 (Pacific) that shape the advertised limits:

- A discard zeroes only whole ``rbd_discard_granularity_bytes`` chunks (64 KiB) when
  ``rbd_skip_partial_discard`` is on (the default) and skips the rest; it deallocates (removes)
  only whole objects (4 MiB by default).  So OPTIMAL UNMAP GRANULARITY is the object size, and
  a discard never leaves anything but zeroes or the old data behind (LBPRZ holds).
- ``write_zeroes`` zeroes any range exactly and removes whole objects inside it.
- ``compare_and_write`` is atomic in the OSD (cmpext + write in one object operation), so it
  holds against every gateway; Pacific accepts only a range inside one 512-byte sector.
- ``rbd_cache`` is turned off for gateways: an acknowledged write is then on the OSDs, so a
  gateway that dies loses nothing it acknowledged, and FUA needs no extra flush.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyscsi_target.backstore.base import Extent
from pyscsi_target.backstore.librbd import (
    FEATURE_FAST_DIFF,
    FEATURE_OBJECT_MAP,
    FLAG_FAST_DIFF_INVALID,
    FLAG_OBJECT_MAP_INVALID,
    Buffer,
    Image,
)
from pyscsi_target.cluster.rados import ClusterSettings, IoCtx, Rados, RadosError

log = logging.getLogger(__name__)

# Completion of an asynchronous backstore call, run on the loop thread.
Done = Callable[[BaseException | None], None]

#: The largest compare-and-write the cluster makes atomic (Pacific: one 512-byte sector).
CAW_SECTOR = 512
_GATEWAY_OPTIONS = (("rbd_cache", "false"),)


class Miscompare(Exception):  # noqa: N818 - a SCSI outcome, named as SBC names it
    """COMPARE AND WRITE found different data; ``offset`` is the first differing byte's
    position within the compared range."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset}")
        self.offset = offset


def _error(r: int, what: str) -> OSError:
    return RadosError(-r, f"{what}: {os.strerror(-r)}")


@dataclass(frozen=True)
class RbdSpec:
    """Which image: ``pool/[namespace/]image`` on the cluster named by ``cluster``."""

    pool: str
    image: str
    namespace: str = ""
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)

    @classmethod
    def parse(cls, text: str, cluster: ClusterSettings | None = None) -> RbdSpec:
        """``pool/image`` or ``pool/namespace/image`` (what ``rbd`` accepts)."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"RBD image {text!r}: expected pool/image or pool/namespace/image")
        if len(parts) == 2:
            return cls(parts[0], parts[1], "", cluster or ClusterSettings())
        return cls(parts[0], parts[2], parts[1], cluster or ClusterSettings())


class _Connections:
    """One librados client per cluster settings, shared by every image of the process (a
    client costs a monitor session and a dozen threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[ClusterSettings, tuple[Rados, int]] = {}

    def get(self, settings: ClusterSettings) -> Rados:
        with self._lock:
            rados, refs = self._conns.get(settings, (None, 0))
            if rados is None:
                opts = dict(_GATEWAY_OPTIONS)
                opts.update(settings.options)  # the user's options win
                rados = Rados(ClusterSettings(settings.conf, settings.client_id, settings.keyring,
                                              tuple(opts.items())))
            self._conns[settings] = (rados, refs + 1)
            return rados

    def put(self, settings: ClusterSettings) -> None:
        with self._lock:
            rados, refs = self._conns[settings]
            if refs > 1:
                self._conns[settings] = (rados, refs - 1)
                return
            del self._conns[settings]
        rados.shutdown()


CONNECTIONS = _Connections()


class RbdBackstore:
    """An open RBD image.  Attributes the SCSI layer reads:

    ``size`` (bytes), ``thin`` (True: discarded ranges read back as zeroes), ``object_size``,
    ``unmap_granularity`` (bytes an UNMAP must cover, aligned, to deallocate), ``read_only``,
    ``path`` (a name for logs).
    """

    thin = True

    def __init__(self, spec: RbdSpec, read_only: bool = False) -> None:
        self.spec = spec
        self.path = f"rbd:{spec.name}"
        self.read_only = read_only
        self.rados = CONNECTIONS.get(spec.cluster)
        self.io: IoCtx | None = None
        self.image: Image | None = None
        try:
            self.io = self.rados.open_ioctx(spec.pool, spec.namespace)
            self.image = Image(self.io, spec.image, read_only)
            self.size = self.image.size()
            self.object_size = self.image.object_size
            self.unmap_granularity = self.object_size
            self.discard_zeroes_granularity = self._discard_zeroes_granularity()
            # With rbd_cache on (the user's choice), acknowledged writes may sit in this process.
            self.cached = self._option("rbd_cache").lower() in ("true", "1")
        except BaseException:
            self._release()
            raise
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_resize: Callable[[int], None] | None = None
        self._watch: int | None = None
        self._refreshing = False
        self.holds_lock = False  # the exclusive lock taken explicitly (hold_lock), kept until released

    def _option(self, name: str) -> str:
        """A librbd option as this image sees it: image override, pool override, then config."""
        assert self.image is not None
        for pool_level in (False, True):
            value = self.image.metadata(f"conf_{name}", pool_level=pool_level)
            if value is not None:
                return value
        return self.rados.conf_get(name)

    def _discard_zeroes_granularity(self) -> int:
        if self._option("rbd_skip_partial_discard").lower() not in ("true", "1"):
            return 1  # partial discards are zeroed in place
        return int(self._option("rbd_discard_granularity_bytes")) or 1

    # --- life cycle ------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_resize: Callable[[int], None] | None = None) -> None:
        """Start asynchronous I/O on ``loop`` (call on the loop thread).  ``on_resize(size)``
        runs on the loop when another client resized the image (CAPACITY DATA HAS CHANGED)."""
        assert self.image is not None
        self.loop = loop
        self.on_resize = on_resize
        self.image.start_aio(loop)
        # librbd calls back on its own thread, where a blocking librbd call could deadlock:
        # hop to the loop, then read the size in a thread.
        self._watch = self.image.update_watch(self._header_changed)

    def _header_changed(self) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._schedule_refresh)
        except RuntimeError:
            pass

    def _schedule_refresh(self) -> None:
        if self._refreshing or self.loop is None or self.image is None:
            return
        self._refreshing = True
        self.loop.run_in_executor(None, self.image.size).add_done_callback(self._refreshed)

    def _refreshed(self, fut: asyncio.Future[int]) -> None:
        self._refreshing = False
        if fut.exception() is not None:
            log.warning("%s: size refresh failed: %s", self.path, fut.exception())
            return
        size = fut.result()
        if size != self.size:
            log.info("%s: size changed %d -> %d", self.path, self.size, size)
            self.size = size
            if self.on_resize is not None:
                self.on_resize(size)

    def close(self) -> None:
        """Close the image (blocking: librbd waits for I/O in flight)."""
        self._release()

    def _release(self) -> None:
        if self.image is not None:
            image, self.image = self.image, None
            try:
                image.close()
            except RadosError as e:
                log.warning("%s: close: %s", self.path, e)
        if self.io is not None:
            self.io.close()
            self.io = None
        if self.rados is not None:
            CONNECTIONS.put(self.spec.cluster)
            self.rados = None  # type: ignore[assignment]

    # --- asynchronous data path (loop thread) ----------------------------------------------

    @property
    def inflight(self) -> int:
        return self.image.inflight if self.image is not None else 0

    def _img(self) -> Image:
        if self.image is None:
            raise OSError(errno.EBADF, f"{self.path} is closed")
        return self.image

    def read(self, buf: bytearray | memoryview, offset: int, done: Done) -> None:
        """Fill ``buf`` from ``offset`` (zeroes where nothing was written)."""
        want = len(buf)

        def finished(r: int) -> None:
            if r < 0:
                done(_error(r, f"{self.path}: read at {offset}"))
            elif r != want:
                done(OSError(errno.EIO, f"{self.path}: short read at {offset}: {r} of {want}"))
            else:
                done(None)

        self._img().aio_read(buf, offset, finished)

    def write(self, data: Sequence[Buffer], offset: int, fua: bool, done: Done) -> None:
        """Write ``data`` (kept unchanged until ``done``) at ``offset``.  With the cache off a
        completed write is on the OSDs, so ``fua`` costs nothing more; should the user turn
        rbd_cache on, FUA adds a flush."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        img = self._img()

        def finished(r: int) -> None:
            if r < 0:
                done(_error(r, f"{self.path}: write at {offset}"))
            elif fua and self.cached:
                self.flush(done)
            else:
                done(None)

        img.aio_write(data, offset, finished)

    def flush(self, done: Done) -> None:
        self._img().aio_flush(lambda r: done(_error(r, f"{self.path}: flush") if r < 0 else None))

    def discard(self, offset: int, length: int, done: Done) -> None:
        """Deallocate what librbd can (see the module notes); the rest keeps its data."""
        self._img().aio_discard(offset, length,
                                lambda r: done(_error(r, f"{self.path}: discard at {offset}") if r < 0 else None))

    def write_zeroes(self, offset: int, length: int, done: Done, keep_mapped: bool = False) -> None:
        """Make [offset, offset+length) read as zeroes; whole objects are deallocated unless
        ``keep_mapped`` (then the zeroes are written: thick provisioning)."""
        self._img().aio_write_zeroes(
            offset, length, lambda r: done(_error(r, f"{self.path}: write zeroes at {offset}") if r < 0 else None),
            thick=keep_mapped)

    def caw_atomic(self, offset: int, length: int) -> bool:
        """True when the cluster itself compares and writes this range atomically."""
        return length <= CAW_SECTOR and offset // CAW_SECTOR == (offset + length - 1) // CAW_SECTOR

    def compare_and_write(self, offset: int, compare: Buffer, data: Buffer, done: Done) -> None:
        """Write ``data`` if the image holds ``compare`` at ``offset``, else ``done(Miscompare)``.

        Inside one 512-byte sector the OSD does it atomically, against every gateway.  A larger
        range is read, compared and written here while this client holds the image's exclusive
        lock explicitly (peers cannot take it over meanwhile); the caller must hold back its own
        other writes to the range (the LU's exclusive section does)."""
        if len(compare) != len(data):
            raise ValueError("compare and write buffers differ in length")
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        img = self._img()
        if not data:
            assert self.loop is not None, "attach() first"
            self.loop.call_soon(done, None)  # nothing to compare (librbd must never see it)
            return
        if self.caw_atomic(offset, len(data)):

            def finished(r: int, mismatch: int | None) -> None:
                if r == -errno.EILSEQ:
                    done(Miscompare(mismatch or 0))
                elif r < 0:
                    done(_error(r, f"{self.path}: compare and write at {offset}"))
                else:
                    done(None)

            img.aio_compare_and_write(offset, compare, data, finished)
            return
        assert self.loop is not None, "attach() first"
        fut = self.loop.run_in_executor(None, self._locked_compare_and_write, offset, compare, data)
        fut.add_done_callback(lambda f: done(f.exception()))

    def _locked_compare_and_write(self, offset: int, compare: Buffer, data: Buffer) -> None:
        img = self._img()
        held = self.holds_lock
        if not held:
            img.lock_acquire()
        try:
            cur = img.read(offset, len(compare))
            if cur != compare:
                raise Miscompare(next(k for k, (a, b) in enumerate(zip(cur, bytes(compare), strict=True)) if a != b))
            img.write(data, offset)
        finally:
            if not held:
                # An explicitly held lock makes every peer's write fail with EROFS: give it back.
                img.lock_release()

    def hold_lock(self) -> None:
        """Take the image's exclusive lock and keep it (blocking).  Peers' writes then fail at
        once with EROFS instead of asking for the lock: the active/optimized gateway's mode."""
        self._img().lock_acquire()
        self.holds_lock = True

    def release_lock(self) -> None:
        """Give the lock back: peers' writes take it over transparently again (blocking)."""
        self._img().lock_release()
        self.holds_lock = False

    # --- blocking calls (threads) ----------------------------------------------------------

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        self._img().read_into(buf, offset)

    def write_blocking(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        img = self._img()
        for d in data:
            img.write(d, offset)
            offset += len(d)
        if fua and self.cached:
            img.flush()

    def flush_blocking(self) -> None:
        self._img().flush()

    def refresh_size(self) -> int:
        """Re-read the size from the cluster (after a resize elsewhere)."""
        self.size = self._img().size()
        return self.size

    def resize(self, size: int) -> None:
        """Grow (or, deliberately, shrink) the image; other openers see it through their watch."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")
        self._img().resize(size, allow_shrink=True)
        self.size = size

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        """Mapped/deallocated runs of [offset, offset+length), in object granularity: from the
        object map when fast-diff is on and valid (no data I/O), else by asking each object."""
        img = self._img()
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        fast = (img.features() & (FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF)) == (FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF)
        fast = fast and not img.flags() & (FLAG_OBJECT_MAP_INVALID | FLAG_FAST_DIFF_INVALID)
        out: list[Extent] = []
        pos = offset
        for e in img.diff_iterate(offset, end - offset, whole_object=True if fast else False):
            if not e.exists:
                continue
            start, stop = max(e.offset, offset), min(e.offset + e.length, end)
            if stop <= pos:
                continue
            if start > pos:
                _append(out, Extent(pos, start - pos, False))
            _append(out, Extent(max(start, pos), stop - max(start, pos), True))
            pos = stop
            if len(out) >= max_runs:
                return out[:max_runs]
        if pos < end:
            _append(out, Extent(pos, end - pos, False))
        return out[:max_runs]

    def allocated_bytes(self) -> int:
        """Bytes of the image backed by objects (whole objects: what the object map tracks)."""
        return sum(e.length for e in self.block_status(0, self.size) if e.mapped)

    def free_bytes(self) -> int | None:
        return None  # pool quotas and cluster fullness are the cluster's business


def _append(out: list[Extent], e: Extent) -> None:
    if out and out[-1].mapped == e.mapped and out[-1].offset + out[-1].length == e.offset:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.mapped)
    else:
        out.append(e)
