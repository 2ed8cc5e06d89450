"""Extent files and devices: where they may be, and creating or growing the files.

File extents live only under the extent roots: a relative path is taken inside the first
root, and both the path as written and the path with symlinks followed must stay inside a
root.  Disk extents name block devices under /dev.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from pyscsi_target.backstore.file import create_sparse
from pyscsi_target.config.errors import Errors, ValidationError

NOT_A_FILE = "You need to specify a filepath not a directory"  # FreeNAS 11.3's words


class ExtentRoots:
    """The directories extent files may live in (created if missing)."""

    def __init__(self, roots: Iterable[Path | str]) -> None:
        resolved = []
        for root in roots:
            Path(root).mkdir(parents=True, exist_ok=True)
            resolved.append(Path(os.path.realpath(root)))
        self.roots = resolved

    def contains(self, path: str | Path) -> bool:
        """True if ``path``, symlinks followed, is inside a root."""
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(root) for root in self.roots)

    def resolve_file(self, errs: Errors, raw: str) -> str | None:
        """An extent file path inside an extent root, or None (message added under "path")."""
        if "\x00" in raw or not raw.strip():
            errs.add("path", "Enter a file path.")
            return None
        if ".." in Path(raw).parts:
            errs.add("path", "'..' is not allowed in an extent path.")
            return None
        if raw.endswith("/"):
            errs.add("path", NOT_A_FILE)
            return None
        candidate = Path(raw) if os.path.isabs(raw) else self.roots[0] / raw
        candidate = Path(os.path.normpath(candidate))
        real = Path(os.path.realpath(candidate))
        # Both the path as written and the path after following symlinks must be in a root.
        if not any(candidate.is_relative_to(r) and real.is_relative_to(r) and real != r for r in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            errs.add("path", f"Extent files must be inside an extent root ({roots}).")
            return None
        try:
            st = os.stat(real)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                return str(candidate)  # nothing there yet: creating it reports any problem
            errs.add("path", f"Invalid extent path: {exc.strerror or exc}.")  # a name too long, say
            return None
        if stat.S_ISDIR(st.st_mode):
            errs.add("path", NOT_A_FILE)
            return None
        if not stat.S_ISREG(st.st_mode):
            errs.add("path", "The extent path exists and is not a regular file.")
            return None
        return str(candidate)

    def realise(self, path: str, size: int) -> bool:
        """Create the parent directories and a sparse file of ``size`` bytes, or grow an
        existing file to ``size`` (never shrink it).  True if the file was created."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Checked again after mkdir: a symlink raced in would be caught here.
            if not self.contains(path):
                raise ValidationError({"path": ["Extent files must be inside an extent root."]})
            if os.path.exists(path):
                _grow_file(path, size)
                return False
            create_sparse(path, size)
            return True
        except OSError as exc:
            field = "filesize" if exc.errno in (errno.EFBIG, errno.ENOSPC) else "path"
            raise ValidationError({field: [f"Could not create the extent file: {exc.strerror or exc}."]}) from exc

    def remove(self, path: str) -> None:
        """Delete an extent's file, if it is a regular file inside a root."""
        real = Path(os.path.realpath(path))
        if self.contains(real) and real.is_file():
            with contextlib.suppress(OSError):
                os.unlink(real)


def _grow_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)


def resolve_disk(errs: Errors, raw: str) -> str | None:
    """A Disk extent's device: ``/dev/<raw>``, a block device under /dev (message under "disk")."""
    name = raw.strip()
    if name.startswith("/dev/"):
        name = name[5:]
    if not name or "\x00" in name or ".." in Path(name).parts or name.startswith("/"):
        errs.add("disk", "Enter a device name such as sdb, ada1 or zvol/tank/volume.")
        return None
    dev = Path("/dev") / name
    real = Path(os.path.realpath(dev))
    if not real.is_relative_to("/dev"):
        errs.add("disk", "The device must be under /dev.")
        return None
    try:
        st = os.stat(real)
    except OSError:
        errs.add("disk", f"Device {dev} does not exist.")
        return None
    if not stat.S_ISBLK(st.st_mode):
        errs.add("disk", f"{dev} is not a block device.")
        return None
    return str(dev)
