"""RBD backstore: a Ceph RBD image as a logical unit's storage, through librbd's C API.

It implements the backstore contract (backstore/base.py):

- **Data path (loop thread, no thread hop).**  ``submit_read``/``submit_write``/``submit_flush``
  start a librbd aio and return; librbd queues the completion in the image and bumps an eventfd
  the loop watches, and one wake-up runs every ``done`` queued so far (backstore/librbd.py).
- **Blocking calls (worker threads).**  ``read_into``, ``write``, ``flush``, ``discard``,
  ``write_zeroes``, ``compare_and_write``, ``block_status``, ``resize`` wait for the cluster.

Facts measured on Ceph 16.2 (Pacific) that shape what is advertised (docs/ceph.md):

- ``rbd_discard`` zeroes only whole 64 KiB chunks (``rbd_skip_partial_discard``) and frees only
  whole objects (4 MiB by default); ``rbd_write_zeroes`` zeroes any range exactly and frees the
  whole objects inside it.  So ``discard`` is a write-zeroes (the contract wants zeroes back),
  and the granularity that really deallocates, OPTIMAL UNMAP GRANULARITY, is the object size.
- ``write_zeroes`` (WRITE SAME of zeroes without UNMAP) keeps the blocks mapped: librbd's
  thick-provision flag writes the zeroes.
- ``rbd_compare_and_write`` is atomic in the OSD, against every client of the image, but only
  within one 512-byte sector.  A larger range is compared and written through a second handle
  that holds the image's exclusive lock explicitly meanwhile: other writers then fail with
  EROFS, which this backstore retries (a COMPARE AND WRITE lasts milliseconds), so they wait.
  (A handle that took the lock explicitly never takes it by itself again: hence the second one.)
- ``rbd_cache`` is off for gateways: an acknowledged write is on the OSDs, so a gateway that
  dies loses nothing it acknowledged, and a durable write needs no flush.
- A zero-length read aborts librbd's process: the binding never passes one on.
- A blocklisted client's I/O fails with ESHUTDOWN: ``on_fenced`` tells the gateway.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyscsi_target.backstore.base import Backstore, Buffer, Done, Extent, PathUnavailable, first_difference
from pyscsi_target.backstore.librbd import (
    FEATURE_FAST_DIFF,
    FEATURE_OBJECT_MAP,
    FLAG_FAST_DIFF_INVALID,
    FLAG_OBJECT_MAP_INVALID,
    Image,
)
from pyscsi_target.cluster.rados import ClusterSettings, IoCtx, Rados, RadosError
from pyscsi_target.values import parse_rbd_image

log = logging.getLogger(__name__)

#: The largest compare-and-write the cluster makes atomic (Pacific: one 512-byte sector).
CAW_SECTOR = 512
_GATEWAY_OPTIONS = (("rbd_cache", "false"),)
#: How long a write waits for a peer that holds the exclusive lock explicitly (its COMPARE
#: AND WRITE of several sectors) before it fails.
LOCK_WAIT = 30.0
_RETRY_FIRST, _RETRY_MAX = 0.001, 0.05
#: Ceph's EBLOCKLISTED: this client was fenced (another gateway broke its lock).
EBLOCKLISTED = errno.ESHUTDOWN


def _error(r: int, what: str) -> OSError:
    if -r == EBLOCKLISTED:  # fenced: nothing landed, another gateway can do it
        return PathUnavailable(-r, f"{what}: this gateway was fenced ({os.strerror(-r)})")
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
        name = parse_rbd_image(text)
        return cls(name.pool, name.image, name.namespace, cluster or ClusterSettings())


class _Connections:
    """One librados client per cluster settings, shared by every image of the process (a
    client costs a monitor session and a dozen threads).  A client that was blocklisted is
    retired: the next image opened gets a new client instance, while the images still on the
    old one keep it until they close."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[ClusterSettings, Rados] = {}
        self._refs: dict[Rados, int] = {}

    def get(self, settings: ClusterSettings) -> Rados:
        with self._lock:
            rados = self._current.get(settings)
            if rados is None:
                opts = dict(_GATEWAY_OPTIONS)
                opts.update(settings.options)  # the user's options win
                rados = Rados(ClusterSettings(settings.conf, settings.client_id, settings.keyring,
                                              tuple(opts.items())))
                self._current[settings] = rados
            self._refs[rados] = self._refs.get(rados, 0) + 1
            return rados

    def put(self, settings: ClusterSettings, rados: Rados) -> None:
        """Drop one reference; the last one shuts the client down."""
        with self._lock:
            refs = self._refs[rados] - 1
            if refs:
                self._refs[rados] = refs
                return
            del self._refs[rados]
            if self._current.get(settings) is rados:
                del self._current[settings]
        rados.shutdown()

    def retire(self, settings: ClusterSettings, rados: Rados) -> None:
        """Connect anew for the next image: ``rados`` was fenced and can do nothing more."""
        with self._lock:
            if self._current.get(settings) is rados:
                del self._current[settings]


CONNECTIONS = _Connections()


class RbdBackstore(Backstore):
    """An open RBD image (opening blocks: run it in a thread).

    Beyond the contract: ``object_size``, ``discard_zeroes_granularity`` (the chunk a plain
    rbd discard zeroes), ``cached`` (rbd_cache on), ``read_only``, ``spec``; and the hooks
    ``on_fenced`` (this client was blocklisted) and the exclusive-lock calls the gateway
    failover uses.
    """

    def __init__(self, spec: RbdSpec, read_only: bool = False) -> None:
        self.spec = spec
        self.read_only = read_only
        self.rados: Rados | None = CONNECTIONS.get(spec.cluster)
        self.io: IoCtx | None = None
        self.image: Image | None = None
        try:
            self.io = self.rados.open_ioctx(spec.pool, spec.namespace)
            self.image = Image(self.io, spec.image, read_only)
            size = self.image.size()
            self.object_size = self.image.object_size
            self.discard_zeroes_granularity = self._discard_zeroes_granularity()
            # With rbd_cache on (the user's choice), acknowledged writes may sit in this process.
            self.cached = self._option("rbd_cache").lower() in ("true", "1")
        except BaseException:
            self.release()
            raise
        super().__init__(f"rbd:{spec.name}", size)
        self.thin = True  # discarded (write-zeroed) ranges read back as zeroes: LBPRZ
        self.discard_granularity = self.object_size  # only whole objects are freed
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watch: int | None = None
        self._refreshing = False
        self._caw_image: Image | None = None  # the handle of locked compare-and-writes (opened on first use)
        self._caw_lock = threading.Lock()
        self.fenced = False
        #: Called on the loop once, when I/O finds this client blocklisted.
        self.on_fenced: Callable[[], None] | None = None
        #: The close running in a thread (close() on the loop), until it is done.
        self.closing: asyncio.Future[None] | None = None

    @property
    def path(self) -> str:
        return self.name

    @property
    def unmap_granularity(self) -> int:
        return self.discard_granularity

    def _option(self, name: str) -> str:
        """A librbd option as this image sees it: image override, pool override, then config."""
        assert self.image is not None and self.rados is not None
        for pool_level in (False, True):
            value = self.image.metadata(f"conf_{name}", pool_level=pool_level)
            if value is not None:
                return value
        return self.rados.conf_get(name)

    def _discard_zeroes_granularity(self) -> int:
        if self._option("rbd_skip_partial_discard").lower() not in ("true", "1"):
            return 1  # partial discards are zeroed in place
        return int(self._option("rbd_discard_granularity_bytes")) or 1

    # --- the event loop ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start asynchronous I/O on ``loop`` (loop thread; the first submit does it otherwise),
        and watch the image header: a resize by another client calls ``on_size_change``."""
        img = self._img()
        if self.loop is not None:
            return
        self.loop = loop
        img.start_aio(loop)
        # librbd calls back on its own thread, where a blocking librbd call could deadlock:
        # hop to the loop, then read the size in a thread.
        self._watch = img.update_watch(self._header_changed)

    def _attached(self) -> Image:
        img = self._img()
        if self.loop is None:
            self.attach(asyncio.get_running_loop())
        return img

    def _header_changed(self) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._schedule_refresh)
        except RuntimeError:
            pass

    def _schedule_refresh(self) -> None:
        if self._refreshing or self.loop is None or self.image is None or self.fenced:
            return
        self._refreshing = True
        self.loop.run_in_executor(None, self.image.size).add_done_callback(self._refreshed)

    def _refreshed(self, fut: asyncio.Future[int]) -> None:
        self._refreshing = False
        exc = fut.exception()
        if exc is not None:
            log.warning("%s: size refresh failed: %s", self.name, exc)
            return
        size = fut.result()
        if size != self.size:
            log.info("%s: size changed %d -> %d", self.name, self.size, size)
            self.size = size
            if self.on_size_change is not None:
                self.on_size_change(size)

    def _fail(self, r: int, what: str) -> OSError:
        if -r == EBLOCKLISTED and not self.fenced:
            self.fenced = True
            log.error("%s: this client was blocklisted (another gateway took the image over)", self.name)
            if self.rados is not None:
                CONNECTIONS.retire(self.spec.cluster, self.rados)
            loop = self.loop
            if self.on_fenced is not None and loop is not None:
                try:  # called from the loop or from a worker thread alike
                    loop.call_soon_threadsafe(self.on_fenced)
                except RuntimeError:
                    pass
        return _error(r, f"{self.name}: {what}")

    # --- data path (loop thread) ---------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self.image.inflight if self.image is not None else 0

    def _img(self) -> Image:
        if self.image is None:
            raise OSError(errno.EBADF, f"{self.name} is closed")
        return self.image

    def submit_read(self, buf: bytearray | memoryview, offset: int, done: Done) -> None:
        want = len(buf)

        def finished(r: int) -> None:
            if r < 0:
                done(self._fail(r, f"read at {offset}"))
            elif r != want:
                done(OSError(errno.EIO, f"{self.name}: short read at {offset}: {r} of {want}"))
            else:
                done(None)

        self._attached().aio_read(buf, offset, finished)

    def submit_write(self, data: Sequence[Buffer], offset: int, sync: bool, done: Done) -> None:
        """Write ``data`` (kept unchanged until ``done``).  With the cache off a completed write
        is on the OSDs, so ``sync`` costs nothing more; with rbd_cache on it adds a flush."""
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        img = self._attached()
        loop = self.loop
        assert loop is not None
        deadline = 0.0
        delay = _RETRY_FIRST

        def start() -> None:
            try:
                img.aio_write(data, offset, finished)
            except OSError as exc:
                done(exc)

        def finished(r: int) -> None:
            nonlocal deadline, delay
            if r == -errno.EROFS and self.image is img:
                # A peer holds the lock explicitly for a COMPARE AND WRITE: wait for it.
                now = loop.time()
                deadline = deadline or now + LOCK_WAIT
                if now < deadline:
                    loop.call_later(delay, start)
                    delay = min(delay * 2, _RETRY_MAX)
                    return
            if r < 0:
                done(self._fail(r, f"write at {offset}"))
            elif sync and self.cached:
                self.submit_flush(done)
            else:
                done(None)

        img.aio_write(data, offset, finished)

    def submit_flush(self, done: Done) -> None:
        self._attached().aio_flush(lambda r: done(self._fail(r, "flush") if r < 0 else None))

    # --- blocking calls (worker threads) ------------------------------------------------------

    def _retry_erofs(self, fn: Callable[[], None]) -> None:
        """Run a blocking librbd call; EROFS (a peer holds the lock explicitly) is retried for up
        to LOCK_WAIT, and a fenced client's failure becomes PathUnavailable."""
        deadline = time.monotonic() + LOCK_WAIT
        delay = _RETRY_FIRST
        while True:
            try:
                fn()
                return
            except OSError as exc:
                if exc.errno == EBLOCKLISTED:
                    raise self._fail(-exc.errno, str(exc)) from exc
                if exc.errno != errno.EROFS or self.read_only or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        img = self._img()
        self._retry_erofs(lambda: img.read_into(buf, offset))

    def write(self, data: Sequence[Buffer], offset: int, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        img = self._img()
        for d in data:
            self._retry_erofs(lambda d=d, off=offset: img.write(d, off))  # type: ignore[misc]
            offset += len(d)
        if fua and self.cached:
            img.flush()

    def flush(self) -> None:
        self._retry_erofs(self._img().flush)

    def discard(self, offset: int, length: int) -> None:
        """Zeroes that free every whole object inside the range (a plain rbd discard would
        leave the data of partial chunks: the contract wants zeroes)."""
        img = self._img()
        self._retry_erofs(lambda: img.write_zeroes(offset, length, thick=False))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeroes that stay allocated (WRITE SAME without UNMAP)."""
        img = self._img()
        self._retry_erofs(lambda: img.write_zeroes(offset, length, thick=True))

    def caw_atomic(self, offset: int, length: int) -> bool:
        """True when the cluster itself compares and writes this range atomically."""
        return length <= CAW_SECTOR and offset // CAW_SECTOR == (offset + length - 1) // CAW_SECTOR

    def compare_and_write(self, expected: Buffer, data: Buffer, offset: int, fua: bool) -> int:
        """Write ``data`` if the image holds ``expected``; -1 when written, else the offset of
        the first differing byte.  Atomic against every gateway: in the OSD for one sector,
        else under the image's exclusive lock held explicitly for the duration."""
        if len(expected) != len(data):
            raise ValueError("compare and write buffers differ in length")
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        img = self._img()
        if not len(data):
            return -1  # nothing to compare (librbd must never see an empty request)
        if self.caw_atomic(offset, len(data)):
            result: list[int | None] = []
            self._retry_erofs(lambda: result.append(img.compare_and_write(offset, expected, data)))
            mismatch = result[0]
            return -1 if mismatch is None else mismatch
        with self._caw_lock:
            # A handle that ever took the lock explicitly stops taking it by itself for writes
            # (librbd switches it to its "standard" lock policy for good): a second handle of
            # its own does the locked compare-and-write, so the data path keeps its automatic one.
            caw = self._caw_image
            if caw is None:
                assert self.io is not None
                caw = self._caw_image = Image(self.io, self.spec.image)
            self._retry_erofs(caw.lock_acquire)
            try:
                current = caw.read(offset, len(expected))
                diff = first_difference(expected, current)
                if diff < 0:
                    caw.write(data, offset)
            finally:
                # An explicitly held lock makes every other writer (the data path's handle and
                # the peers') fail with EROFS, which they retry: give it back at once.
                caw.lock_release()
        return diff

    def block_status(self, offset: int, length: int, max_runs: int = 1 << 30) -> list[Extent]:
        """Mapped/deallocated runs of [offset, offset+length), in object granularity: from the
        object map when fast-diff is on and valid (no data I/O), else by asking each object."""
        img = self._img()
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        both = FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF
        fast = (img.features() & both) == both
        fast = fast and not img.flags() & (FLAG_OBJECT_MAP_INVALID | FLAG_FAST_DIFF_INVALID)
        out: list[Extent] = []
        pos = offset
        for e in img.diff_iterate(offset, end - offset, whole_object=fast):
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

    def resize(self, size: int) -> None:
        """Grow (or, deliberately, shrink) the image; 0 adopts the size the cluster reports (a
        resize by another client).  Other openers see a change through their header watch."""
        img = self._img()
        if size <= 0:
            self.size = img.size()
            return
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} is read-only")
        img.resize(size, allow_shrink=True)
        self.size = size

    # --- exclusive lock (blocking: threads) ------------------------------------------------------

    def lock_owners(self) -> list[str]:
        """The client address(es) holding the image's exclusive lock (e.g. ``127.0.0.1:0/123``)."""
        return self._img().lock_owners()

    def is_lock_owner(self) -> bool:
        return self._img().is_lock_owner()

    def break_lock(self, owner: str) -> None:
        """Break ``owner``'s exclusive lock; librbd blocklists the owner first
        (rbd_blocklist_on_break_lock), so a gateway that only looked dead writes no more."""
        self._img().lock_break(owner)

    @property
    def client_address(self) -> str:
        """This client's address as lock owners and the blocklist name it."""
        assert self.rados is not None
        return _plain_address(self.rados.addrs)

    # --- life cycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the image.  On the event loop the waiting (a flush, the lock handed
        back, rbd_close) moves to a thread, and ``closing`` is the future of it: a cluster that
        stopped answering must not stall the loop."""
        if self.closed:
            return
        self.closed = True
        image, self.image = self.image, None
        loop = self.loop
        if image is not None and loop is not None and asyncio._get_running_loop() is loop:
            image.detach()
            self.closing = loop.run_in_executor(None, self._finish_close, image)
            return
        self._finish_close(image)

    def _finish_close(self, image: Image | None) -> None:
        self._close_caw_image()
        if image is not None:
            try:
                if not self.fenced and not self.read_only:
                    image.flush()
            except OSError as e:
                log.warning("%s: flush on close: %s", self.name, e)
            try:
                image.close()
            except RadosError as e:
                log.warning("%s: close: %s", self.name, e)
        self.release()

    def _close_caw_image(self) -> None:
        caw, self._caw_image = getattr(self, "_caw_image", None), None
        if caw is not None:
            try:
                caw.close()
            except RadosError as e:
                log.warning("%s: close: %s", self.name, e)

    def release(self) -> None:
        """Give the image and the client back (the image is closed already, or was never
        opened)."""
        self._close_caw_image()
        if self.image is not None:
            image, self.image = self.image, None
            try:
                image.close()
            except RadosError as e:
                log.warning("%s: close: %s", getattr(self, "name", self.spec.name), e)
        if self.io is not None:
            self.io.close()
            self.io = None
        if self.rados is not None:
            CONNECTIONS.put(self.spec.cluster, self.rados)
            self.rados = None


def _plain_address(addrs: str) -> str:
    """``[v2:127.0.0.1:0/123,v1:...]`` -> ``127.0.0.1:0/123`` (the form lock owners use)."""
    first = addrs.strip("[]").split(",")[0]
    return first.split(":", 1)[1] if first.startswith(("v1:", "v2:", "any:")) else first


def _append(out: list[Extent], e: Extent) -> None:
    if out and out[-1].mapped == e.mapped and out[-1].offset + out[-1].length == e.offset:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.mapped)
    else:
        out.append(e)
