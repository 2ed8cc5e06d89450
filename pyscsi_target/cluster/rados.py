"""librados over ctypes: a cluster connection, pools, objects with omap compare-and-swap,
watch/notify, and blocklisting.

Why ctypes and not Debian's ``python3-rados``: that module is built for /usr/bin/python3 only
(our interpreter may be another build, a venv, or another minor version), and it is not on
PyPI.  The C API is stable across Ceph releases, so one binding serves any Python >= 3.11.

Every call that may wait for the cluster releases the GIL (ctypes.CDLL does that for each
call), so a blocking call must still not run on the event loop: the callers put those in a
thread.  Callbacks from librados (watch notifications, watch errors) arrive on a librados
thread; ``Watch`` hands them to an asyncio loop when it is given one.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from ctypes import (
    CFUNCTYPE,
    POINTER,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_ubyte,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# omap_cmp comparison operators (LIBRADOS_CMPXATTR_OP_*); values are compared as byte strings.
CMP_EQ, CMP_NE, CMP_GT, CMP_GTE, CMP_LT, CMP_LTE = 1, 2, 3, 4, 5, 6


class RadosError(OSError):
    """A librados/librbd call failed; ``errno`` is the (positive) error number."""


class LibraryMissing(ImportError):
    pass


def check(ret: int, what: str) -> int:
    """Raise RadosError for a negative return code (librados and librbd both return -errno)."""
    if ret < 0:
        raise RadosError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def load(soname: str, debian_package: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname)
    except OSError as e:
        raise LibraryMissing(f"cannot load {soname} ({e}); on Debian: apt-get install {debian_package}") from e


def bind(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    """``name`` from ``lib`` with its C signature (ctypes converts and checks each argument)."""
    fn = lib[name]  # a fresh function object: getattr would share one between two bindings
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


WATCH_CB = CFUNCTYPE(None, c_void_p, c_uint64, c_uint64, c_uint64, c_void_p, c_size_t)
WATCH_ERR_CB = CFUNCTYPE(None, c_void_p, c_uint64, c_int)


class _Lib:
    """The librados entry points this module uses, with their C signatures."""

    def __init__(self) -> None:
        lib = self.lib = load("librados.so.2", "librados2")
        v, p, s, u64, i = c_void_p, POINTER, c_char_p, c_uint64, c_int
        self.create2 = bind(lib, "rados_create2", i, p(v), s, s, u64)
        self.conf_read_file = bind(lib, "rados_conf_read_file", i, v, s)
        self.conf_set = bind(lib, "rados_conf_set", i, v, s, s)
        self.conf_get = bind(lib, "rados_conf_get", i, v, s, c_char_p, c_size_t)
        self.connect = bind(lib, "rados_connect", i, v)
        self.shutdown = bind(lib, "rados_shutdown", None, v)
        self.get_instance_id = bind(lib, "rados_get_instance_id", u64, v)
        self.getaddrs = bind(lib, "rados_getaddrs", i, v, p(c_char_p))
        self.blocklist_add = bind(lib, "rados_blocklist_add", i, v, s, c_uint32)
        self.mon_command = bind(lib, "rados_mon_command", i, v, p(s), c_size_t, s, c_size_t, p(v), p(c_size_t),
                                 p(v), p(c_size_t))
        self.buffer_free = bind(lib, "rados_buffer_free", None, v)
        self.wait_for_latest_osdmap = bind(lib, "rados_wait_for_latest_osdmap", i, v)
        self.ioctx_create = bind(lib, "rados_ioctx_create", i, v, s, p(v))
        self.ioctx_destroy = bind(lib, "rados_ioctx_destroy", None, v)
        self.ioctx_set_namespace = bind(lib, "rados_ioctx_set_namespace", None, v, s)
        self.write_full = bind(lib, "rados_write_full", i, v, s, c_char_p, c_size_t)
        self.read = bind(lib, "rados_read", i, v, s, v, c_size_t, u64)
        self.remove = bind(lib, "rados_remove", i, v, s)
        self.stat = bind(lib, "rados_stat", i, v, s, p(u64), v)
        self.create_write_op = bind(lib, "rados_create_write_op", v)
        self.release_write_op = bind(lib, "rados_release_write_op", None, v)
        self.write_op_create = bind(lib, "rados_write_op_create", None, v, i, s)
        self.write_op_omap_cmp = bind(lib, "rados_write_op_omap_cmp", None, v, s, c_uint8, c_char_p, c_size_t, p(i))
        self.write_op_omap_set2 = bind(lib, "rados_write_op_omap_set2", None, v, p(c_char_p), p(c_char_p),
                                        p(c_size_t), p(c_size_t), c_size_t)
        self.write_op_omap_rm_keys2 = bind(lib, "rados_write_op_omap_rm_keys2", None, v, p(c_char_p), p(c_size_t),
                                            c_size_t)
        self.write_op_operate = bind(lib, "rados_write_op_operate", i, v, v, s, v, i)
        self.create_read_op = bind(lib, "rados_create_read_op", v)
        self.release_read_op = bind(lib, "rados_release_read_op", None, v)
        self.read_op_omap_get_vals2 = bind(lib, "rados_read_op_omap_get_vals2", None, v, s, s, u64, p(v),
                                            p(c_ubyte), p(i))
        self.read_op_operate = bind(lib, "rados_read_op_operate", i, v, v, s, i)
        self.omap_get_next2 = bind(lib, "rados_omap_get_next2", i, v, p(v), p(v), p(c_size_t), p(c_size_t))
        self.omap_get_end = bind(lib, "rados_omap_get_end", None, v)
        self.watch2 = bind(lib, "rados_watch2", i, v, s, p(u64), WATCH_CB, WATCH_ERR_CB, v)
        self.unwatch2 = bind(lib, "rados_unwatch2", i, v, u64)
        self.watch_flush = bind(lib, "rados_watch_flush", i, v)
        self.watch_check = bind(lib, "rados_watch_check", i, v, u64)
        self.notify2 = bind(lib, "rados_notify2", i, v, s, c_char_p, i, u64, p(v), p(c_size_t))
        self.notify_ack = bind(lib, "rados_notify_ack", i, v, s, u64, u64, c_char_p, i)


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def lib() -> _Lib:
    """librados, loaded on first use (importing this module never needs Ceph installed)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


@dataclass(frozen=True)
class ClusterSettings:
    """How to reach a cluster: ceph.conf path (None: librados' default search, which honours
    CEPH_CONF), client id ("admin" -> client.admin), keyring path, extra config options."""

    conf: str | None = None
    client_id: str = "admin"
    keyring: str | None = None
    options: tuple[tuple[str, str], ...] = ()


class Rados:
    """One connection (a librados client instance) to a cluster."""

    def __init__(self, settings: ClusterSettings | None = None) -> None:
        self.settings = settings or ClusterSettings()
        self._lib = lib()
        self.handle = c_void_p()
        check(self._lib.create2(byref(self.handle), b"ceph", f"client.{self.settings.client_id}".encode(), 0),
              "rados_create2")
        try:
            conf = self.settings.conf
            r = self._lib.conf_read_file(self.handle, conf.encode() if conf else None)
            # Without an explicit path a missing ceph.conf is fine (mon_host may come as an option).
            if r < 0 and conf:
                check(r, f"reading {conf}")
            if self.settings.keyring:
                self.conf_set("keyring", self.settings.keyring)
            for k, val in self.settings.options:
                self.conf_set(k, val)
            check(self._lib.connect(self.handle), "connecting to the cluster")
        except BaseException:
            self._lib.shutdown(self.handle)
            self.handle = c_void_p()
            raise

    def conf_set(self, option: str, value: str) -> None:
        check(self._lib.conf_set(self.handle, option.encode(), value.encode()), f"setting {option}")

    def conf_get(self, option: str) -> str:
        buf = ctypes.create_string_buffer(4096)
        check(self._lib.conf_get(self.handle, option.encode(), buf, len(buf)), f"reading option {option}")
        return buf.value.decode()

    @property
    def instance_id(self) -> int:
        """This client's global id (the N of client.N in lock owners and watchers)."""
        return int(self._lib.get_instance_id(self.handle))

    @property
    def addrs(self) -> str:
        """This client's entity address vector, e.g. ``[v2:127.0.0.1:0/123456]``."""
        out = c_char_p()
        check(self._lib.getaddrs(self.handle, byref(out)), "rados_getaddrs")
        try:
            return (out.value or b"").decode()
        finally:
            self._lib.buffer_free(ctypes.cast(out, c_void_p))

    def open_ioctx(self, pool: str, namespace: str = "") -> IoCtx:
        io = c_void_p()
        check(self._lib.ioctx_create(self.handle, pool.encode(), byref(io)), f"opening pool {pool!r}")
        if namespace:
            self._lib.ioctx_set_namespace(io, namespace.encode())
        return IoCtx(self, io, pool, namespace)

    def mon_command(self, cmd: Mapping[str, object], inbuf: bytes = b"") -> tuple[bytes, str]:
        """Send one JSON command to the monitors; returns (output, status string)."""
        arg = (c_char_p * 1)(json.dumps(cmd).encode())
        outbuf, outs = c_void_p(), c_void_p()
        outbuf_len, outs_len = c_size_t(), c_size_t()
        r = self._lib.mon_command(self.handle, arg, 1, inbuf, len(inbuf), byref(outbuf), byref(outbuf_len),
                                  byref(outs), byref(outs_len))
        try:
            out = ctypes.string_at(outbuf, outbuf_len.value) if outbuf else b""
            status = ctypes.string_at(outs, outs_len.value).decode(errors="replace") if outs else ""
        finally:
            if outbuf:
                self._lib.buffer_free(outbuf)
            if outs:
                self._lib.buffer_free(outs)
        check(r, f"mon command {cmd.get('prefix')}: {status}")
        return out, status

    def blocklist_add(self, client_address: str, expire_seconds: int = 0) -> None:
        """Fence a client: the OSDs refuse its operations (0 = the cluster's default expiry)."""
        check(self._lib.blocklist_add(self.handle, client_address.encode(), expire_seconds),
              f"blocklisting {client_address}")

    def wait_for_latest_osdmap(self) -> None:
        check(self._lib.wait_for_latest_osdmap(self.handle), "rados_wait_for_latest_osdmap")

    def watch_flush(self) -> None:
        check(self._lib.watch_flush(self.handle), "rados_watch_flush")

    def shutdown(self) -> None:
        if self.handle:
            self._lib.shutdown(self.handle)
            self.handle = c_void_p()

    def __enter__(self) -> Rados:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _str_array(items: list[bytes]) -> tuple[ctypes.Array[c_char_p], ctypes.Array[c_size_t]]:
    return (c_char_p * len(items))(*items), (c_size_t * len(items))(*(len(b) for b in items))


@dataclass
class Notification:
    notify_id: int
    notifier_id: int
    data: bytes


class IoCtx:
    """A pool (and namespace) of one connection: objects, omap, watch/notify."""

    def __init__(self, rados: Rados, handle: c_void_p, pool: str, namespace: str) -> None:
        self.rados = rados
        self.handle = handle
        self.pool = pool
        self.namespace = namespace
        self._lib = rados._lib

    def close(self) -> None:
        if self.handle:
            self._lib.ioctx_destroy(self.handle)
            self.handle = c_void_p()

    def __enter__(self) -> IoCtx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- whole objects ---------------------------------------------------------------------

    def write_full(self, oid: str, data: bytes) -> None:
        check(self._lib.write_full(self.handle, oid.encode(), data, len(data)), f"writing {oid}")

    def read(self, oid: str, length: int = 1 << 20, offset: int = 0) -> bytes:
        buf = ctypes.create_string_buffer(length)
        n = check(self._lib.read(self.handle, oid.encode(), buf, length, offset), f"reading {oid}")
        return buf.raw[:n]

    def stat(self, oid: str) -> int:
        size = c_uint64()
        check(self._lib.stat(self.handle, oid.encode(), byref(size), None), f"stat {oid}")
        return size.value

    def remove(self, oid: str) -> None:
        check(self._lib.remove(self.handle, oid.encode()), f"removing {oid}")

    # --- omap ------------------------------------------------------------------------------

    def omap_get(self, oid: str, prefix: str = "", max_return: int = 1 << 16) -> dict[str, bytes]:
        """Every omap key/value of ``oid`` whose key starts with ``prefix`` (RadosError ENOENT
        when the object does not exist)."""
        out: dict[str, bytes] = {}
        start = b""
        while True:
            op = self._lib.create_read_op()
            it, more, prval = c_void_p(), c_ubyte(), c_int()
            try:
                self._lib.read_op_omap_get_vals2(op, start, prefix.encode(), max_return, byref(it), byref(more),
                                                 byref(prval))
                check(self._lib.read_op_operate(op, self.handle, oid.encode(), 0), f"reading omap of {oid}")
                check(prval.value, f"reading omap of {oid}")
                key, val, klen, vlen = c_void_p(), c_void_p(), c_size_t(), c_size_t()
                try:
                    while True:
                        check(self._lib.omap_get_next2(it, byref(key), byref(val), byref(klen), byref(vlen)),
                              "omap iteration")
                        if not key:
                            break
                        start = ctypes.string_at(key, klen.value)
                        out[start.decode()] = ctypes.string_at(val, vlen.value) if vlen.value else b""
                finally:
                    self._lib.omap_get_end(it)
            finally:
                self._lib.release_read_op(op)
            if not more.value:
                return out

    def omap_cas(
        self,
        oid: str,
        compare: Mapping[str, bytes] | None = None,
        set_keys: Mapping[str, bytes] | None = None,
        remove_keys: Iterable[str] = (),
        create: bool = False,
    ) -> bool:
        """Atomically: if every ``compare`` key holds exactly its value, set ``set_keys`` and
        remove ``remove_keys``.  True when applied, False when a comparison failed (another
        writer got there first: re-read and retry).  ``create`` makes the object if missing,
        else a missing object raises RadosError(ENOENT).

        The OSD evaluates the whole operation under the object's lock, so two clients racing
        on the same ``compare`` value cannot both succeed: this is the cluster-wide
        compare-and-swap the shared SCSI state is built on.  A missing key compares as the
        empty value (measured on Pacific), so ``compare={"gen": b""}`` with ``create`` writes
        the first generation exactly once.
        """
        op = self._lib.create_write_op()
        keep: list[object] = []  # the C strings must outlive rados_write_op_operate
        prvals = []
        try:
            if create:
                self._lib.write_op_create(op, 0, None)
            for key, value in (compare or {}).items():
                prval = c_int()
                kb = key.encode()
                keep += [kb, value]
                self._lib.write_op_omap_cmp(op, kb, CMP_EQ, value, len(value), byref(prval))
                prvals.append(prval)
            if set_keys:
                keys = [k.encode() for k in set_keys]
                vals = list(set_keys.values())
                karr, klens = _str_array(keys)
                varr, vlens = _str_array(vals)
                keep += [keys, vals, karr, klens, varr, vlens]
                self._lib.write_op_omap_set2(op, karr, varr, klens, vlens, len(keys))
            rm = [k.encode() for k in remove_keys]
            if rm:
                rarr, rlens = _str_array(rm)
                keep += [rm, rarr, rlens]
                self._lib.write_op_omap_rm_keys2(op, rarr, rlens, len(rm))
            r = self._lib.write_op_operate(op, self.handle, oid.encode(), None, 0)
        finally:
            self._lib.release_write_op(op)
        if r == -errno.ECANCELED:
            return False
        check(r, f"omap update of {oid}")
        return True

    # --- watch/notify ----------------------------------------------------------------------

    def watch(
        self,
        oid: str,
        on_notify: Callable[[Notification], bytes | None],
        on_error: Callable[[int], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Watch:
        """Watch ``oid``: ``on_notify`` runs for every notify (on ``loop`` when given, else on a
        librados thread) and its return value is the acknowledgement's payload."""
        return Watch(self, oid, on_notify, on_error, loop)

    def notify(self, oid: str, data: bytes = b"", timeout_ms: int = 5000) -> NotifyResult:
        """Notify every watcher of ``oid`` and wait until each acknowledged or ``timeout_ms``
        passed; the watchers that did not answer in time are listed, not raised.  The OSD counts
        whole seconds and reads 0 as its 30 s default: the timeout is rounded up to seconds."""
        timeout_ms = max(1000, -(-timeout_ms // 1000) * 1000)
        reply, reply_len = c_void_p(), c_size_t()
        r = self._lib.notify2(self.handle, oid.encode(), data, len(data), timeout_ms, byref(reply), byref(reply_len))
        try:
            out = ctypes.string_at(reply, reply_len.value) if reply else b""
        finally:
            if reply:
                self._lib.buffer_free(reply)
        if r < 0 and not (r == -errno.ETIMEDOUT and out):
            check(r, f"notify {oid}")
        return parse_notify_reply(out)


@dataclass
class NotifyResult:
    """{(watcher's client id, watch cookie): its ack payload}, and the watchers that timed out."""

    acks: dict[tuple[int, int], bytes]
    timeouts: list[tuple[int, int]]


def parse_notify_reply(reply: bytes) -> NotifyResult:
    """Decode a notify reply: a map of acks followed by a set of timed-out watchers."""
    acks: dict[tuple[int, int], bytes] = {}
    timeouts: list[tuple[int, int]] = []
    (n,) = struct.unpack_from("<I", reply, 0)
    pos = 4
    for _ in range(n):
        gid, cookie, length = struct.unpack_from("<QQI", reply, pos)
        pos += 20
        acks[(gid, cookie)] = reply[pos:pos + length]
        pos += length
    (n,) = struct.unpack_from("<I", reply, pos)
    pos += 4
    for _ in range(n):
        gid, cookie = struct.unpack_from("<QQ", reply, pos)
        timeouts.append((gid, cookie))
        pos += 16
    return NotifyResult(acks, timeouts)


class Watch:
    """A registered watch; ``close()`` unregisters it and waits for callbacks in flight."""

    def __init__(
        self,
        io: IoCtx,
        oid: str,
        on_notify: Callable[[Notification], bytes | None],
        on_error: Callable[[int], None] | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.io = io
        self.oid = oid
        self.on_notify = on_notify
        self.on_error = on_error
        self.loop = loop
        self.cookie = c_uint64()
        # ctypes keeps a C trampoline alive only while its Python object lives: hold both.
        self._cb = WATCH_CB(self._notified)
        self._err_cb = WATCH_ERR_CB(self._failed)
        check(io._lib.watch2(io.handle, oid.encode(), byref(self.cookie), self._cb, self._err_cb, None),
              f"watching {oid}")

    def _notified(self, _arg: int | None, notify_id: int, cookie: int, notifier_id: int, data: int | None,
                  data_len: int) -> None:
        n = Notification(notify_id, notifier_id, ctypes.string_at(data, data_len) if data and data_len else b"")
        if self.loop is None:
            self._deliver(n)
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, n)
        except RuntimeError:  # loop closed: still acknowledge, so the notifier does not wait out its timeout
            self._ack(n, b"")

    def _deliver(self, n: Notification) -> None:
        reply: bytes | None = b""
        try:
            reply = self.on_notify(n)
        except Exception:  # noqa: BLE001 - a failing handler must not leave the notifier waiting
            log.exception("watch callback for %s", self.oid)
        self._ack(n, reply or b"")

    def _ack(self, n: Notification, reply: bytes) -> None:
        if self.io.handle:
            self.io._lib.notify_ack(self.io.handle, self.oid.encode(), n.notify_id, self.cookie.value, reply,
                                    len(reply))

    def _failed(self, _arg: int | None, _cookie: int, err: int) -> None:
        # The watch was lost (OSD restart, our session blocklisted...): notifies may have been missed.
        log.warning("watch on %s failed: %s", self.oid, os.strerror(-err) if err < 0 else err)
        if self.on_error is None:
            return
        if self.loop is None:
            self.on_error(err)
        else:
            try:
                self.loop.call_soon_threadsafe(self.on_error, err)
            except RuntimeError:
                pass

    def check(self) -> int:
        """Milliseconds since the watch was last confirmed, or RadosError when it is broken."""
        return check(self.io._lib.watch_check(self.io.handle, self.cookie.value), f"watch on {self.oid}")

    def close(self) -> None:
        if self.cookie.value:
            self.io._lib.unwatch2(self.io.handle, self.cookie.value)
            self.io.rados.watch_flush()  # no callback may run after the trampolines are freed
            self.cookie = c_uint64()

