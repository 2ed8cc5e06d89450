"""librbd over ctypes: images, asynchronous I/O completed on the event loop, locks, diffs.

Completions without a thread hop: the image is given an eventfd (``rbd_set_image_notification``)
and every aio completion is created without a callback.  librbd then queues each finished
completion inside the image and bumps the eventfd; the loop watches that fd, and one wake-up
drains every completion queued so far with ``rbd_poll_io_events``.  No Python code runs on
librbd's threads for I/O (a ctypes callback there would take the GIL once per I/O and fight the
loop for it), and a burst of completions costs one wake-up.

Every ctypes call releases the GIL (ctypes.CDLL).  That matters beyond speed: a librbd thread
running a Python callback (update watch, diff iteration) needs the GIL, and the calling thread
may be inside librbd waiting for that very thread.

Synchronous calls (``read``, ``write``, ``resize``, ``diff_iterate``...) block until the cluster
answers: run them in a thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from collections.abc import Callable, Sequence
from ctypes import CFUNCTYPE, POINTER, Structure, byref, c_bool, c_char, c_char_p, c_int, c_size_t, c_ssize_t
from ctypes import c_uint64 as u64
from ctypes import c_void_p as vp
from dataclasses import dataclass

from pyscsi_target.cluster.rados import IoCtx, RadosError, bind, check, load

EVENT_TYPE_EVENTFD = 2
LOCK_MODE_EXCLUSIVE = 0
WRITE_ZEROES_FLAG_THICK_PROVISION = 1
FEATURE_EXCLUSIVE_LOCK = 1 << 2
FEATURE_OBJECT_MAP = 1 << 3
FEATURE_FAST_DIFF = 1 << 4
FLAG_OBJECT_MAP_INVALID = 1 << 0
FLAG_FAST_DIFF_INVALID = 1 << 1
_POLL_BATCH = 64

Buffer = bytes | bytearray | memoryview
# An aio completion: called on the loop thread with librbd's return value (>= 0, or -errno).
Done = Callable[[int], None]


class Iovec(Structure):
    _fields_ = [("iov_base", vp), ("iov_len", c_size_t)]


class ImageInfo(Structure):
    _fields_ = [("size", u64), ("obj_size", u64), ("num_objs", u64), ("order", c_int),
                ("block_name_prefix", c_char * 24), ("parent_pool", ctypes.c_int64),
                ("parent_name", c_char * 96)]


DIFF_CB = CFUNCTYPE(c_int, u64, c_size_t, c_int, vp)
AIO_CB = CFUNCTYPE(None, vp, vp)
UPDATE_CB = CFUNCTYPE(None, vp)


class _Lib:
    def __init__(self) -> None:
        lib = load("librbd.so.1", "librbd1")
        i, p, s = c_int, POINTER, c_char_p
        self.open = bind(lib, "rbd_open", i, vp, s, p(vp), s)
        self.open_read_only = bind(lib, "rbd_open_read_only", i, vp, s, p(vp), s)
        self.close = bind(lib, "rbd_close", i, vp)
        self.create4 = bind(lib, "rbd_create4", i, vp, s, u64, vp)
        self.options_create = bind(lib, "rbd_image_options_create", None, p(vp))
        self.options_destroy = bind(lib, "rbd_image_options_destroy", None, vp)
        self.options_set_uint64 = bind(lib, "rbd_image_options_set_uint64", i, vp, i, u64)
        self.remove = bind(lib, "rbd_remove", i, vp, s)
        self.stat = bind(lib, "rbd_stat", i, vp, p(ImageInfo), c_size_t)
        self.get_size = bind(lib, "rbd_get_size", i, vp, p(u64))
        self.get_features = bind(lib, "rbd_get_features", i, vp, p(u64))
        self.get_flags = bind(lib, "rbd_get_flags", i, vp, p(u64))
        self.resize2 = bind(lib, "rbd_resize2", i, vp, u64, c_bool, vp, vp)
        self.metadata_get = bind(lib, "rbd_metadata_get", i, vp, s, vp, p(c_size_t))
        self.pool_metadata_get = bind(lib, "rbd_pool_metadata_get", i, vp, s, vp, p(c_size_t))
        self.read = bind(lib, "rbd_read", c_ssize_t, vp, u64, c_size_t, vp)
        self.write = bind(lib, "rbd_write", c_ssize_t, vp, u64, c_size_t, vp)
        self.discard = bind(lib, "rbd_discard", i, vp, u64, u64)
        self.write_zeroes = bind(lib, "rbd_write_zeroes", c_ssize_t, vp, u64, c_size_t, i, i)
        self.flush = bind(lib, "rbd_flush", i, vp)
        self.compare_and_write = bind(lib, "rbd_compare_and_write", c_ssize_t, vp, u64, c_size_t, vp, vp, p(u64), i)
        self.diff_iterate2 = bind(lib, "rbd_diff_iterate2", i, vp, s, u64, u64, ctypes.c_uint8, ctypes.c_uint8,
                                   DIFF_CB, vp)
        self.set_image_notification = bind(lib, "rbd_set_image_notification", i, vp, i, i)
        self.aio_create_completion = bind(lib, "rbd_aio_create_completion", i, vp, vp, p(vp))
        self.aio_create_completion_cb = bind(lib, "rbd_aio_create_completion", i, vp, AIO_CB, p(vp))
        self.aio_release = bind(lib, "rbd_aio_release", None, vp)
        self.aio_get_return_value = bind(lib, "rbd_aio_get_return_value", c_ssize_t, vp)
        self.poll_io_events = bind(lib, "rbd_poll_io_events", i, vp, p(vp), i)
        self.aio_read = bind(lib, "rbd_aio_read", i, vp, u64, c_size_t, vp, vp)
        self.aio_write = bind(lib, "rbd_aio_write", i, vp, u64, c_size_t, vp, vp)
        self.aio_writev = bind(lib, "rbd_aio_writev", i, vp, p(Iovec), i, u64, vp)
        self.aio_discard = bind(lib, "rbd_aio_discard", i, vp, u64, u64, vp)
        self.aio_write_zeroes = bind(lib, "rbd_aio_write_zeroes", i, vp, u64, c_size_t, vp, i, i)
        self.aio_flush = bind(lib, "rbd_aio_flush", i, vp, vp)
        self.aio_compare_and_write = bind(lib, "rbd_aio_compare_and_write", c_ssize_t, vp, u64, c_size_t, vp, vp,
                                           vp, p(u64), i)
        self.update_watch = bind(lib, "rbd_update_watch", i, vp, p(u64), UPDATE_CB, vp)
        self.update_unwatch = bind(lib, "rbd_update_unwatch", i, vp, u64)
        self.is_exclusive_lock_owner = bind(lib, "rbd_is_exclusive_lock_owner", i, vp, p(c_int))
        self.lock_acquire = bind(lib, "rbd_lock_acquire", i, vp, i)
        self.lock_release = bind(lib, "rbd_lock_release", i, vp)
        self.lock_get_owners = bind(lib, "rbd_lock_get_owners", i, vp, p(c_int), p(c_char_p), p(c_size_t))
        self.lock_get_owners_cleanup = bind(lib, "rbd_lock_get_owners_cleanup", None, p(c_char_p), c_size_t)
        self.lock_break = bind(lib, "rbd_lock_break", i, vp, i, s)


_lib: _Lib | None = None


def lib() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def pin(data: Buffer) -> tuple[int, object]:
    """The address of ``data``'s bytes and an object that keeps them in place until dropped.

    Writable buffers (a bytearray, a memoryview of one: what the iSCSI layer hands us) are
    used in place; so are ``bytes``.  Only a read-only memoryview is copied."""
    if isinstance(data, bytes):
        return ctypes.cast(c_char_p(data), vp).value or 0, data
    if not isinstance(data, memoryview) or not data.readonly:
        anchor = c_char.from_buffer(data)  # holds a buffer export: the bytearray cannot move
        return ctypes.addressof(anchor), anchor
    copy = data.tobytes()
    return ctypes.cast(c_char_p(copy), vp).value or 0, copy


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    exists: bool


def create_image(io: IoCtx, name: str, size: int, order: int = 0) -> None:
    """Create an image with the cluster's default features (``order`` 0: default object size)."""
    lib_ = lib()
    opts = vp()
    lib_.options_create(byref(opts))
    try:
        if order:
            check(lib_.options_set_uint64(opts, 2, order), "image order")  # RBD_IMAGE_OPTION_ORDER
        check(lib_.create4(io.handle, name.encode(), size, opts), f"creating image {name!r}")
    finally:
        lib_.options_destroy(opts)


def remove_image(io: IoCtx, name: str) -> None:
    check(lib().remove(io.handle, name.encode()), f"removing image {name!r}")


class Image:
    """An open image.  ``start_aio(loop)`` enables the asynchronous calls (``aio_*``)."""

    def __init__(self, io: IoCtx, name: str, read_only: bool = False) -> None:
        self._lib = lib()
        self.io = io
        self.name = name
        self.read_only = read_only
        self.handle = vp()
        opener = self._lib.open_read_only if read_only else self._lib.open
        check(opener(io.handle, name.encode(), byref(self.handle), None), f"opening image {name!r}")
        self.object_size = int(self.stat().obj_size)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._efd = -1
        # completion pointer -> (done, objects that must stay alive until it completes)
        self._pending: dict[int, tuple[Done, object]] = {}
        # Completions that report through a callback.  librbd may also queue them on the event
        # socket; only the callback path may release them (releasing twice is a use-after-free).
        self._called: set[int] = set()
        self._events = (vp * _POLL_BATCH)()
        self._watches: dict[int, object] = {}
        self._aio_cb = AIO_CB(self._called_back)
        self._comp = vp()
        self._comp_ref = byref(self._comp)
        self.wakeups = 0  # eventfd wake-ups, and the completions they delivered
        self.reaped = 0

    # --- metadata --------------------------------------------------------------------------

    def stat(self) -> ImageInfo:
        info = ImageInfo()
        check(self._lib.stat(self.handle, byref(info), ctypes.sizeof(info)), "rbd_stat")
        return info

    def size(self) -> int:
        """The image's size (refreshed from the cluster when a header update was seen)."""
        v = u64()
        check(self._lib.get_size(self.handle, byref(v)), "rbd_get_size")
        return v.value

    def features(self) -> int:
        v = u64()
        check(self._lib.get_features(self.handle, byref(v)), "rbd_get_features")
        return v.value

    def flags(self) -> int:
        v = u64()
        check(self._lib.get_flags(self.handle, byref(v)), "rbd_get_flags")
        return v.value

    def metadata(self, key: str, pool_level: bool = False) -> str | None:
        """An image (or pool) metadata value, None when unset."""
        buf = ctypes.create_string_buffer(4096)
        n = c_size_t(len(buf))
        if pool_level:
            r = self._lib.pool_metadata_get(self.io.handle, key.encode(), buf, byref(n))
        else:
            r = self._lib.metadata_get(self.handle, key.encode(), buf, byref(n))
        if r == -errno.ENOENT:
            return None
        check(r, f"metadata {key}")
        return buf.value.decode()

    def resize(self, size: int, allow_shrink: bool = False) -> None:
        check(self._lib.resize2(self.handle, size, allow_shrink, None, None), f"resizing to {size}")

    def update_watch(self, callback: Callable[[], None]) -> int:
        """Call ``callback`` (on a librbd thread) whenever the image header changes: a resize
        by another client, a lock change...  Returns the handle for ``update_unwatch``."""

        def trampoline(_arg: int | None) -> None:
            callback()

        cb = UPDATE_CB(trampoline)
        handle = u64()
        check(self._lib.update_watch(self.handle, byref(handle), cb, None), "rbd_update_watch")
        self._watches[handle.value] = cb
        return handle.value

    def update_unwatch(self, handle: int) -> None:
        if self._watches.pop(handle, None) is not None:
            check(self._lib.update_unwatch(self.handle, handle), "rbd_update_unwatch")

    # --- blocking data calls (threads only) -----------------------------------------------

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            self.read_into(buf, offset)
        return buf

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        if not len(buf):
            return  # librbd aborts the whole process on an empty read (Striper assertion)
        addr, keep = pin(buf)
        n = check(self._lib.read(self.handle, offset, len(buf), addr), f"read at {offset}")
        if n != len(buf):
            raise RadosError(errno.EIO, f"short read at {offset}: {n} of {len(buf)}")
        del keep

    def write(self, data: Buffer, offset: int) -> None:
        if not len(data):
            return
        addr, keep = pin(data)
        n = check(self._lib.write(self.handle, offset, len(data), addr), f"write at {offset}")
        if n != len(data):
            raise RadosError(errno.EIO, f"short write at {offset}: {n} of {len(data)}")
        del keep

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        check(self._lib.discard(self.handle, offset, length), f"discard at {offset}")

    def write_zeroes(self, offset: int, length: int, thick: bool = False) -> None:
        if length <= 0:
            return
        flags = WRITE_ZEROES_FLAG_THICK_PROVISION if thick else 0
        check(self._lib.write_zeroes(self.handle, offset, length, flags, 0), f"write zeroes at {offset}")

    def flush(self) -> None:
        check(self._lib.flush(self.handle), "flush")

    def compare_and_write(self, offset: int, compare: Buffer, data: Buffer) -> int | None:
        """Write ``data`` if the image holds ``compare`` at ``offset``; else return the offset
        (from ``offset``) of the first byte that differs and write nothing.  Pacific accepts
        only a range inside one 512-byte sector (EINVAL otherwise)."""
        if len(compare) != len(data):
            raise ValueError("compare and write buffers differ in length")
        mismatch = u64()
        caddr, ckeep = pin(compare)
        daddr, dkeep = pin(data)
        r = self._lib.compare_and_write(self.handle, offset, len(data), caddr, daddr, byref(mismatch), 0)
        del ckeep, dkeep
        if r == -errno.EILSEQ:
            return mismatch_offset(mismatch.value, offset, self.object_size)
        check(r, f"compare and write at {offset}")
        return None

    def diff_iterate(self, offset: int, length: int, whole_object: bool) -> list[Extent]:
        """Allocated (exists=True) and discarded runs of [offset, offset+length) since the
        image's creation.  ``whole_object`` answers from the object map (fast-diff) in object
        granularity; without it librbd lists each object's real extents (one request per object)."""
        out: list[Extent] = []

        def each(off: int, ln: int, exists: int, _arg: int | None) -> int:
            out.append(Extent(off, ln, bool(exists)))
            return 0

        cb = DIFF_CB(each)
        check(self._lib.diff_iterate2(self.handle, None, offset, length, 1, 1 if whole_object else 0, cb, None),
              "rbd_diff_iterate2")
        return out

    # --- exclusive lock --------------------------------------------------------------------

    def is_lock_owner(self) -> bool:
        owner = c_int()
        check(self._lib.is_exclusive_lock_owner(self.handle, byref(owner)), "rbd_is_exclusive_lock_owner")
        return bool(owner.value)

    def lock_acquire(self) -> None:
        """Take the exclusive lock and keep it: librbd then refuses to hand it over on request
        (a peer's write fails with EROFS/EBUSY instead of bouncing the lock)."""
        check(self._lib.lock_acquire(self.handle, LOCK_MODE_EXCLUSIVE), "rbd_lock_acquire")

    def lock_release(self) -> None:
        check(self._lib.lock_release(self.handle), "rbd_lock_release")

    def lock_owners(self) -> list[str]:
        mode = c_int()
        owners = (c_char_p * 8)()
        n = c_size_t(len(owners))
        r = self._lib.lock_get_owners(self.handle, byref(mode), owners, byref(n))
        if r == -errno.ENOENT:
            return []
        check(r, "rbd_lock_get_owners")
        try:
            return [(owners[k] or b"").decode() for k in range(n.value)]
        finally:
            self._lib.lock_get_owners_cleanup(owners, n.value)

    def lock_break(self, owner: str) -> None:
        """Break ``owner``'s exclusive lock; with rbd_blocklist_on_break_lock (the default) the
        owner is blocklisted first, so a gateway that only looked dead can write no more."""
        check(self._lib.lock_break(self.handle, LOCK_MODE_EXCLUSIVE, owner.encode()), f"breaking lock of {owner}")

    # --- asynchronous I/O ------------------------------------------------------------------

    def start_aio(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route completions to ``loop`` (call on the loop thread, once)."""
        if self._efd >= 0:
            raise RuntimeError("asynchronous I/O already started")
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            check(self._lib.set_image_notification(self.handle, efd, EVENT_TYPE_EVENTFD), "rbd_set_image_notification")
        except BaseException:
            os.close(efd)
            raise
        self._efd = efd
        self.loop = loop
        loop.add_reader(efd, self.reap)

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def _completion(self, done: Done, keep: object, event: bool = True) -> int:
        """A new completion for ``done``; ``keep`` lives until it ran.  Each I/O costs about a
        microsecond per ctypes call here, so the out-parameter is reused and nothing else is
        allocated."""
        if event:
            self._lib.aio_create_completion(None, None, self._comp_ref)
        else:
            self._lib.aio_create_completion_cb(None, self._aio_cb, self._comp_ref)
        c: int = self._comp.value or 0
        self._pending[c] = (done, keep)
        if not event:
            self._called.add(c)
        return c

    def _nothing_to_do(self, done: Done) -> bool:
        """An empty request completes without librbd, which asserts (aborting the whole process)
        on an empty read.  ``done`` still runs later on the loop, as for any other request."""
        if self.loop is None:
            raise RuntimeError("start_aio() first")
        self.loop.call_soon(done, 0)
        return True

    def _not_started(self, c: int, r: int, what: str) -> None:
        """librbd refused the request: forget its completion and raise."""
        del self._pending[c]
        self._called.discard(c)
        self._lib.aio_release(c)
        check(r, what)

    def aio_read(self, buf: bytearray | memoryview, offset: int, done: Done) -> None:
        """Fill ``buf`` from ``offset``; ``done(n)`` gets the byte count or -errno."""
        if not len(buf) and self._nothing_to_do(done):
            return
        addr, keep = pin(buf)
        c = self._completion(done, keep)
        r = self._lib.aio_read(self.handle, offset, len(buf), addr, c)
        if r < 0:
            self._not_started(c, r, f"read at {offset}")

    def aio_write(self, data: Sequence[Buffer], offset: int, done: Done) -> None:
        """Write the concatenation of ``data`` at ``offset`` (one request; several buffers go as
        an iovec, never joined).  ``done(r)`` gets 0 (not the byte count) or -errno."""
        data = [d for d in data if len(d)]
        if not data and self._nothing_to_do(done):
            return
        if len(data) == 1:
            addr, keep = pin(data[0])
            c = self._completion(done, keep)
            r = self._lib.aio_write(self.handle, offset, len(data[0]), addr, c)
        else:
            iov = (Iovec * len(data))()
            keeps: list[object] = [iov]
            for k, d in enumerate(data):
                iov[k].iov_base, keep = pin(d)
                iov[k].iov_len = len(d)
                keeps.append(keep)
            c = self._completion(done, keeps)
            r = self._lib.aio_writev(self.handle, iov, len(data), offset, c)
        if r < 0:
            self._not_started(c, r, f"write at {offset}")

    def aio_discard(self, offset: int, length: int, done: Done) -> None:
        if length <= 0 and self._nothing_to_do(done):
            return
        c = self._completion(done, None)
        r = self._lib.aio_discard(self.handle, offset, length, c)
        if r < 0:
            self._not_started(c, r, f"discard at {offset}")

    def aio_write_zeroes(self, offset: int, length: int, done: Done, thick: bool = False) -> None:
        if length <= 0 and self._nothing_to_do(done):
            return
        c = self._completion(done, None)
        r = self._lib.aio_write_zeroes(self.handle, offset, length, c,
                                       WRITE_ZEROES_FLAG_THICK_PROVISION if thick else 0, 0)
        if r < 0:
            self._not_started(c, r, f"write zeroes at {offset}")

    def aio_flush(self, done: Done) -> None:
        c = self._completion(done, None)
        r = self._lib.aio_flush(self.handle, c)
        if r < 0:
            self._not_started(c, r, "flush")

    def aio_compare_and_write(self, offset: int, compare: Buffer, data: Buffer,
                              done: Callable[[int, int | None], None]) -> None:
        """``done(r, mismatch)``: r >= 0 written; r == -EILSEQ with ``mismatch`` the offset of
        the first differing byte (from ``offset``); else -errno.  The OSDs compare and write
        each object atomically, so the check holds against every other client of the image."""
        if len(compare) != len(data):
            raise ValueError("compare and write buffers differ in length")
        mismatch = u64()
        caddr, ckeep = pin(compare)
        daddr, dkeep = pin(data)

        def finished(r: int) -> None:
            done(r, mismatch_offset(mismatch.value, offset, self.object_size) if r == -errno.EILSEQ else None)

        # Pacific's rbd_aio_compare_and_write never queues its completion on the image's event
        # socket (measured: it completes, the eventfd stays silent), so it gets a callback.
        c = self._completion(finished, (ckeep, dkeep, mismatch), event=False)
        r = self._lib.aio_compare_and_write(self.handle, offset, len(data), caddr, daddr, c, byref(mismatch), 0)
        if r < 0:
            self._not_started(c, r, f"compare and write at {offset}")

    def _called_back(self, comp: int | None, _arg: int | None) -> None:
        """A completion with a callback finished (librbd thread): finish it on the loop."""
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._finish, comp or 0)
            except RuntimeError:  # loop closed while the I/O ran: nobody waits for it
                pass

    def _finish(self, c: int) -> None:
        self._called.discard(c)
        r = self._lib.aio_get_return_value(c)
        self._lib.aio_release(c)
        entry = self._pending.pop(c, None)
        if entry is not None:
            entry[0](r)

    def reap(self) -> int:
        """Run every finished completion's ``done`` (the loop calls this when the eventfd fires)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        lib_, events, pending, called, count = self._lib, self._events, self._pending, self._called, 0
        self.wakeups += 1
        while True:
            n: int = lib_.poll_io_events(self.handle, events, _POLL_BATCH)
            if n <= 0:
                self.reaped += count
                return count
            for k in range(n):
                c = events[k] or 0
                if c in called:
                    continue
                r = lib_.aio_get_return_value(c)
                lib_.aio_release(c)
                entry = pending.pop(c, None)
                if entry is not None:
                    entry[0](r)
            count += n
            if n < _POLL_BATCH:
                self.reaped += count
                return count

    def detach(self) -> None:
        """Stop watching for completions (loop thread).  The eventfd itself stays open until
        ``close``: librbd may post to it until rbd_close returns, and a closed fd's number could
        meanwhile belong to another file."""
        if self._efd >= 0 and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self._efd)
        self.loop = None

    def stop_aio(self) -> None:
        """``detach``, and close the eventfd (only once librbd no longer posts to it)."""
        self.detach()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

    def close(self) -> None:
        """Close the image: rbd_close waits for I/O in flight; their callbacks do not run.  Any
        thread, once ``detach`` ran on the loop's."""
        if not self.handle:
            return
        for h in list(self._watches):
            self.update_unwatch(h)
        r = self._lib.close(self.handle)
        self.handle = vp()
        self.stop_aio()
        self._pending.clear()
        check(r, f"closing image {self.name!r}")


def mismatch_offset(raw: int, offset: int, object_size: int) -> int:
    """The first differing byte, counted from ``offset``, out of librbd's report.

    Pacific (librbd 1.16) reports the object's start plus the offset within the compared
    range (measured: 8192+100 -> 100, 4 MiB+300 -> 4 MiB+300); later releases report the
    image offset of the byte.  Pacific compares at most one 512-byte sector, so a range that
    does not start at its object's start lies 512 bytes or more past it: a report below
    ``offset`` can only be Pacific's form."""
    if raw >= offset:
        return raw - offset
    return raw - (offset - offset % object_size)
