"""The engine's logical units: one per mapped extent, opened, reconfigured and closed as
the configuration changes.

This is where a configuration ``Extent`` becomes what the SCSI layer understands: a
backstore and an ``LuSettings`` value.  The SCSI layer itself never sees the config.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from ..backstore.base import Backstore
from ..backstore.block import BlockBackstore
from ..backstore.file import FileBackstore
from ..backstore.rbd import RbdBackstore
from ..cluster.rados import ClusterSettings
from ..config import model as M
from ..config.rbd_images import spec_of
from ..scsi.lu import LogicalUnit
from ..scsi.persistence import StateStore, StateWriter
from ..scsi.registry import ScsiRegistry
from ..scsi.sanitize import resume_sanitize
from ..scsi.settings import LuSettings
from ..values import parse_size
from .model_index import ModelIndex

log = logging.getLogger(__name__)

#: Extent rpm (FreeNAS's choices) -> MEDIUM ROTATION RATE.
RPM = {"Unknown": 0, "SSD": 1, "5400": 5400, "7200": 7200, "10000": 10000, "15000": 15000}


def naa_of(extent: M.Extent) -> bytes:
    """The LU's 8-byte NAA designator: the extent's, else a stable locally assigned one."""
    text = extent.naa.lower().removeprefix("0x")
    if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
        return bytes.fromhex(text)
    digest = hashlib.sha256(f"{extent.id}:{extent.name}:{extent.path}".encode()).digest()
    # NAA 3 (locally assigned): top nibble 3, 60 bits of our own.
    return bytes(((0x30 | (digest[0] & 0x0F)),)) + digest[1:8]


def lu_settings(extent: M.Extent) -> LuSettings:
    naa = naa_of(extent)
    return LuSettings(
        name=extent.name,
        naa=naa,
        serial=(extent.serial or naa.hex())[:32],
        block_size=extent.blocksize,
        read_only=extent.ro,
        rpm=RPM.get(str(extent.rpm), 0),
        # pblocksize=True means "disable physical block size reporting" (FreeNAS); else
        # 4 KiB physical blocks are reported for smaller logical blocks.
        physical_block_size=extent.blocksize if extent.pblocksize else max(4096, extent.blocksize),
        # xen: FreeNAS's "Xen initiator compat mode" (unpadded serial in VPD 83h).
        xen=extent.xen,
        insecure_tpc=extent.insecure_tpc,
        avail_threshold=extent.avail_threshold or 0,
    )


def requested_size(extent: M.Extent) -> int:
    """The LU size the extent asks for in bytes; 0 = the storage's own size (a device, an RBD
    image, or filesize "0": the existing file's)."""
    if extent.type in ("Disk", "RBD"):
        return 0
    return parse_size(extent.filesize or "0")


def open_backstore(extent: M.Extent, ceph: ClusterSettings | None = None) -> Backstore:
    """Open the extent's storage (an RBD image waits for its cluster: open those in a thread)."""
    if extent.type == "Disk":
        return BlockBackstore(extent.path, read_only=extent.ro)
    if extent.type == "RBD":
        return RbdBackstore(spec_of(extent, ceph or ClusterSettings()), read_only=extent.ro)
    return FileBackstore(extent.path, requested_size(extent), read_only=extent.ro)


def open_logical_unit(extent: M.Extent, registry: ScsiRegistry, state: StateWriter | None,
                      backstore: Backstore | None = None) -> LogicalUnit:
    """Open the extent's backstore (unless given, already open) and its LU, on the loop thread;
    an interrupted SANITIZE resumes (which needs the running event loop)."""
    if backstore is None:
        backstore = open_backstore(extent)
    try:
        lu = LogicalUnit(lu_settings(extent), backstore, registry, state)
    except BaseException:
        backstore.close()
        raise
    # A resize underneath (another client of an RBD image): CAPACITY DATA HAS CHANGED.
    backstore.on_size_change = lu.resize
    if isinstance(backstore, RbdBackstore):
        backstore.attach(asyncio.get_running_loop())  # aio and the header watch, on this loop
    resume_sanitize(lu)
    return lu


def reconfigure(lu: LogicalUnit, extent: M.Extent) -> None:
    """Apply a changed extent to its open LU, with the unit attentions that implies
    (INQUIRY DATA HAS CHANGED, CAPACITY DATA HAS CHANGED).  An RBD image's size changes
    reach the LU through the image's header watch instead."""
    lu.update(lu_settings(extent))
    if extent.type != "RBD":
        lu.resize(requested_size(extent))


def _needs_reopen(old: M.Extent, new: M.Extent) -> bool:
    if (new.path, new.type, new.blocksize) != (old.path, old.type, old.blocksize):
        return True
    # An RBD image is opened read-only (or not) on its cluster: changing either opens it anew.
    return new.type == "RBD" and (new.ro, new.ceph_conf, new.ceph_client, new.ceph_keyring) != (
        old.ro, old.ceph_conf, old.ceph_client, old.ceph_keyring)


def _wanted(model: M.ConfigModel) -> dict[int, M.Extent]:
    """The extents some target maps: those need a logical unit."""
    wanted: dict[int, M.Extent] = {}
    for m in model.lun_maps.values():
        if m.target in model.targets and m.extent in model.extents:
            wanted[m.extent] = model.extents[m.extent]
    return wanted


class LogicalUnits:
    """The open LUs by extent id, reconciled against each configuration the engine applies."""

    def __init__(self, registry: ScsiRegistry, store: StateStore | None = None,
                 ceph: ClusterSettings | None = None) -> None:
        self.registry = registry
        self.state = StateWriter(store) if store is not None else None
        self.ceph = ceph or ClusterSettings()  # RBD extents' cluster settings left empty
        self._lus: dict[int, tuple[LogicalUnit, M.Extent]] = {}  # the extent as last applied (sealed)
        self.failed: set[int] = set()  # wanted extents that could not be opened: retried every apply
        # RBD backstores opened in a thread ahead of apply(): extent id -> (extent, outcome)
        self._opened: dict[int, tuple[M.Extent, Backstore | Exception]] = {}
        #: Called with each LU just opened, before any command reaches it (a gateway of a
        #: cluster shares its reservations and sets its ALUA states there).
        self.on_open: list[Callable[[LogicalUnit], None]] = []

    def get(self, extent_id: int) -> LogicalUnit | None:
        ent = self._lus.get(extent_id)
        return ent[0] if ent is not None else None

    def all(self) -> list[LogicalUnit]:
        return [lu for lu, _ext in self._lus.values()]

    def rescan_sizes(self) -> list[str]:
        """Re-read the size of every LU on storage that sizes itself (block devices): what
        FreeNAS's ``ctld reload`` did after a zvol grew.  The names of the LUs that changed."""
        return [lu.settings.name for lu in self.all() if lu.refresh_size()]

    async def open_remote(self, model: M.ConfigModel) -> None:
        """Open, each in a thread, the RBD images ``apply(model)`` will need: opening one waits
        for the cluster (a monitor session, the image header), which must not stall the loop."""
        for eid, ext in _wanted(model).items():
            cur = self._lus.get(eid)
            if ext.type != "RBD" or (cur is not None and not _needs_reopen(cur[1], ext)):
                continue
            ready = self._opened.get(eid)
            if ready is not None and ready[0] == ext:
                continue
            self._drop_opened(eid)
            outcome: Backstore | Exception
            try:
                outcome = await asyncio.to_thread(open_backstore, ext, self.ceph)
            except Exception as exc:  # noqa: BLE001 - reported by apply(), as for any extent
                outcome = exc
            self._opened[eid] = (ext, outcome)

    def _drop_opened(self, eid: int) -> None:
        entry = self._opened.pop(eid, None)
        if entry is not None and isinstance(entry[1], Backstore):
            entry[1].close()

    def _take_opened(self, ext: M.Extent) -> Backstore | None:
        entry = self._opened.pop(ext.id, None)
        if entry is None or entry[0] != ext:
            if entry is not None and isinstance(entry[1], Backstore):
                entry[1].close()
            return None
        if isinstance(entry[1], Exception):
            raise entry[1]
        return entry[1]

    def apply(self, model: M.ConfigModel, index: ModelIndex, extent_ids: set[int],
              detach: Callable[[LogicalUnit], None]) -> set[int]:
        """Open, update and close the LUs of the extents ``extent_ids`` (those a change
        touched; extents that could not be opened before are retried too) so that every
        mapped extent has one.  ``detach`` takes an LU out of every target before it is
        closed.  Returns the extents whose LU was opened, reopened or closed."""
        changed: set[int] = set()
        errors = []
        for eid in sorted(extent_ids | self.failed | set(self._opened)):
            ext = model.extents.get(eid)
            wanted = ext is not None and any(m.target in model.targets
                                             for m in index.maps_by_extent.get(eid, {}).values())
            cur = self._lus.get(eid)
            if cur is not None and (ext is None or not wanted or _needs_reopen(cur[1], ext)):
                del self._lus[eid]
                changed.add(eid)
                detach(cur[0])
                try:
                    cur[0].close()
                except Exception:  # noqa: BLE001 - the others must still be reconciled
                    log.exception("closing LU %s", cur[0].name)
                cur = None
            if ext is None or not wanted:
                self.failed.discard(eid)
                continue
            if cur is None:
                try:
                    lu = open_logical_unit(ext, self.registry, self.state, self._take_opened(ext))
                except Exception as e:  # noqa: BLE001 - one bad extent must not block the others
                    log.error("extent %s (%s): cannot open: %s", ext.name, ext.path, e)
                    errors.append(f"{ext.name}: {e}")
                    self.failed.add(eid)
                    continue
                for hook in self.on_open:
                    hook(lu)
                self.failed.discard(eid)
                self._lus[eid] = (lu, ext)
                changed.add(eid)
            elif cur[1] is not ext:
                if cur[1] != ext:
                    reconfigure(cur[0], ext)
                self._lus[eid] = (cur[0], ext)
        for eid in list(self._opened):  # opened for a model that changed meanwhile
            self._drop_opened(eid)
        if errors:
            log.error("extents not served: %s", "; ".join(errors))
        return changed

    async def reopen_rbd(self, lu: LogicalUnit, close_wait: float = 10.0) -> None:
        """Give ``lu`` a new handle on its RBD image, through a new client instance: its client
        was blocklisted (fenced by another gateway), and a fenced client can do nothing more.
        The LU keeps its state (reservations, unit attentions, sessions)."""
        old = lu.backstore
        assert isinstance(old, RbdBackstore)
        new = await asyncio.to_thread(RbdBackstore, old.spec, old.read_only)
        new.on_size_change = lu.resize
        new.attach(asyncio.get_running_loop())
        lu.backstore = new
        lu.resize(new.size)
        old.close()  # in a thread; a fenced image may not close cleanly: never wait for it for long
        if old.closing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(old.closing), close_wait)
            except (TimeoutError, OSError) as exc:
                log.warning("LU %s: closing the fenced image handle: %r", lu.name, exc)
        log.info("LU %s: image reopened with a new client (%s)", lu.name, new.client_address)

    async def close(self, drain: float = 2.0) -> None:
        """Close every LU (after up to ``drain`` seconds for running commands), then let
        the state writer commit what is queued."""
        loop = asyncio.get_running_loop()
        # I/O already in a worker thread cannot be recalled: let it land (briefly) before
        # the logical units flush and close their backstores under it.
        until = loop.time() + drain
        while loop.time() < until and any(lu.tasks for lu in self.all()):
            await asyncio.sleep(0.02)
        for lu in self.all():
            try:
                lu.close()
            except Exception:  # noqa: BLE001 - close the others
                log.exception("closing logical unit %s failed", lu.name)
        # RBD images close in threads (a lock handed back, a flush): the daemon ends after them.
        closing = [lu.backstore.closing for lu in self.all()
                   if isinstance(lu.backstore, RbdBackstore) and lu.backstore.closing is not None]
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        self._lus.clear()
        if self.state is not None:
            await loop.run_in_executor(None, self.state.close)
