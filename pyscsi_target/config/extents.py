"""Extents (FreeNAS "extent"): a file, a block device or a Ceph RBD image exported as a
logical unit.

An RBD extent names its image in ``path`` as ``pool/[namespace/]image`` and its cluster in
``ceph_conf``/``ceph_client``/``ceph_keyring`` (empty: the daemon's).  Its ``filesize`` is
what the image should have: "0" takes the image as it is, a size creates a missing image or
grows a smaller one (config/rbd_images.py does that before the change is committed).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping

from pyscsi_target.config.errors import NO_QUOTES, ConflictError, Errors
from pyscsi_target.config.extent_files import ExtentRoots, resolve_disk
from pyscsi_target.config.fields import THRESHOLD, Boolean, Choice, Field, FieldSet, Integer, Text
from pyscsi_target.config.model import BLOCK_SIZES, EXTENT_TYPES, RPM_VALUES, ConfigModel, Extent
from pyscsi_target.values import parse_naa, parse_rbd_image, parse_size

_SERIAL_RE = re.compile(r"^[\x21-\x7e]{1,16}$")
_CEPH_CLIENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ExtentFields(FieldSet):
    # Lengths are FreeNAS 11.3's model limits.
    name = Field("name", Text(max_len=120))
    type = Field("type", Choice(Text(), EXTENT_TYPES, aliases={"ZVOL": "Disk"}, shown=("ZVOL",)))
    path = Field("path", Text(max_len=120))
    disk = Field("disk", Text(max_len=120))  # FreeNAS kept the device in the path column
    filesize = Field("filesize", Text(max_len=120))
    blocksize = Field("blocksize", Choice(Integer(), BLOCK_SIZES))
    pblocksize = Field("pblocksize", Boolean())
    rpm = Field("rpm", Choice(Text(), RPM_VALUES))
    serial = Field("serial", Text(max_len=16))
    naa = Field("naa", Text(max_len=34, pattern="^0x[0-9a-fA-F]{16}$"))
    ro = Field("ro", Boolean())
    insecure_tpc = Field("insecure_tpc", Boolean())
    xen = Field("xen", Boolean())
    # democratic-csi sends null for "no threshold" (it turns its own 0 into null first).
    avail_threshold = Field("avail_threshold", THRESHOLD)
    comment = Field("comment", Text(max_len=120))
    # RBD: the image's cluster (absent from the FreeNAS document)
    ceph_conf = Field("ceph_conf", Text(max_len=1024))
    ceph_client = Field("ceph_client", Text(max_len=64, pattern="^[A-Za-z0-9_.-]{1,64}$"))
    ceph_keyring = Field("ceph_keyring", Text(max_len=1024))


def _read_fields(fields: Mapping[str, object], e: Extent, errs: Errors) -> None:
    F = ExtentFields
    name = F.name.read(fields, errs)
    if isinstance(name, str):
        if '"' in name:
            errs.add("name", NO_QUOTES)
        e.name = name.strip()
    if not e.name and "name" not in errs:
        errs.add("name", "This field is required.")
    for f in (F.type, F.comment, F.pblocksize, F.ro, F.insecure_tpc, F.xen, F.blocksize, F.rpm, F.avail_threshold):
        f.assign(e, fields, errs)
    serial = F.serial.read(fields, errs)
    if isinstance(serial, str):
        if '"' in serial:
            errs.add("serial", NO_QUOTES)
        elif serial and not _SERIAL_RE.match(serial):
            errs.add("serial", "A serial is 1-16 printable ASCII characters without spaces.")
        else:
            e.serial = serial
    naa = F.naa.read(fields, errs)
    if isinstance(naa, str):
        try:
            e.naa = parse_naa(naa) if naa else naa
        except ValueError as exc:
            errs.add("naa", str(exc))
    size = F.filesize.read(fields, errs)
    if isinstance(size, str):
        e.filesize = size.strip()
    F.path.assign(e, fields, errs)
    F.disk.assign(e, fields, errs)
    for f in (F.ceph_conf, F.ceph_client, F.ceph_keyring):
        f.assign(e, fields, errs)


def _file_size(errs: Errors, e: Extent) -> int | None:
    """The size to create or grow the file to; None when there is nothing to create (size 0:
    the existing file as it is) or the size is refused (message under "filesize")."""
    try:
        wanted = parse_size(e.filesize or "0")
    except ValueError as exc:
        errs.add("filesize", str(exc))
        return None
    exists = os.path.exists(e.path)
    current = os.path.getsize(e.path) if exists else 0
    if wanted == 0:
        if not exists:
            errs.add("path", "The file must exist if the extent size is set to auto (0)")  # FreeNAS's words
        elif current < e.blocksize or current % e.blocksize:
            errs.add("filesize", f"The file's size ({current}) is not a multiple of the block size.")
    elif wanted % e.blocksize:
        errs.add("filesize", "File size must be a multiple of block size")  # FreeNAS's words
    elif exists and wanted < current:
        errs.add("filesize", f"The file is already {current} bytes; extents are never shrunk.")
    elif wanted > (1 << 63) - 1:
        errs.add("filesize", "The size is too large.")
    else:
        return wanted
    return None


def build_extent(
    model: ConfigModel, roots: ExtentRoots, fields: Mapping[str, object], e: Extent, old: Extent | None
) -> tuple[Extent, int | None]:
    """Validate; returns the extent and the file size to create or grow to (File only)."""
    errs = Errors()
    _read_fields(fields, e, errs)
    size: int | None = None
    if e.type == "Disk" and "type" not in errs:
        if not e.disk and "disk" not in errs:
            errs.add("disk", "This field is required for a Disk extent.")
        elif "disk" not in errs and (old is None or old.disk != e.disk or old.type != e.type):
            dev = resolve_disk(errs, e.disk)
            if dev is not None:
                e.path = dev
                e.disk = dev[len("/dev/") :]
        e.filesize = "0"
    elif e.type == "File" and "type" not in errs:
        e.disk = ""
        if not e.path and "path" not in errs:
            errs.add("path", "This field is required for a File extent.")
        elif "path" not in errs:
            resolved = roots.resolve_file(errs, e.path)
            if resolved is not None:
                e.path = resolved
        if "filesize" not in errs and "path" not in errs and "blocksize" not in errs:
            size = _file_size(errs, e)
    elif e.type == "RBD" and "type" not in errs:
        _rbd_fields(errs, e)
    if e.type != "RBD":
        e.ceph_conf = e.ceph_client = e.ceph_keyring = ""
    errs.raise_if_any()
    _fill_identity(model, e)
    _check_unique(model, e)
    return e, size


def _rbd_fields(errs: Errors, e: Extent) -> None:
    """What an RBD extent's fields must hold; whether the cluster has the image is checked
    against the cluster itself (config/rbd_images.py)."""
    e.disk = ""
    if not e.path and "path" not in errs:
        errs.add("path", "This field is required for an RBD extent: pool/image or pool/namespace/image.")
    elif "path" not in errs:
        try:
            e.path = str(parse_rbd_image(e.path))
        except ValueError as exc:
            errs.add("path", str(exc))
    if "filesize" not in errs:
        try:
            size = parse_size(e.filesize or "0")
        except ValueError as exc:
            errs.add("filesize", str(exc))
        else:
            if size % e.blocksize:
                errs.add("filesize", "File size must be a multiple of block size")
    for name in ("ceph_conf", "ceph_keyring"):
        value = getattr(e, name)
        if value and not os.path.isabs(value):
            errs.add(name, "Give an absolute path.")
        elif value and not os.path.isfile(value):
            errs.add(name, f"{value} is not a file.")
    if e.ceph_client and not _CEPH_CLIENT_RE.match(e.ceph_client):
        errs.add("ceph_client", "A Ceph client id is 1-64 letters, digits, '_', '.' or '-' (admin for client.admin).")


def _fill_identity(model: ConfigModel, e: Extent) -> None:
    if not e.serial:
        e.serial = secrets.token_hex(7)
    if not e.naa:
        used = {x.naa for x in model.extents.values()}
        while True:
            # NAA type 3 (locally assigned, 64 bits), like the document's example.
            naa = "0x3" + secrets.token_hex(8)[1:]
            if naa not in used:
                e.naa = naa
                break


def _check_unique(model: ConfigModel, e: Extent) -> None:
    for other in model.extents.values():
        if other.id == e.id:
            continue
        if other.name == e.name:
            raise ConflictError({"name": ["Extent name must be unique"]})
        if other.naa == e.naa:
            raise ConflictError({"naa": ["Extent naa must be unique"]})
        if (other.path, other.ceph_conf) == (e.path, e.ceph_conf):
            field = "disk" if e.type == "Disk" else "path"
            raise ConflictError({field: [f"{e.path} is already used by extent {other.name}."]})
