"""A writer for the cpio "newc" format, the one Linux unpacks as an initramfs.

Written here rather than calling cpio(1) so that an archive is built from (path, bytes) pairs in
memory, in a fixed order and with fixed owners and times: the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: ``name`` without a leading slash; ``data`` is the link target for a symlink."""

    name: str
    mode: int  # full st_mode: file type bits and permissions
    data: bytes = b""

    @staticmethod
    def dir(name: str, perm: int = 0o755) -> Entry:
        return Entry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> Entry:
        return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, nlink: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, 0, 0, len(name), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    return head + name + _pad4(len(head) + len(name))


def archive(entries: Iterable[Entry]) -> bytes:
    """The newc archive of ``entries`` (parents must come before their children), with its trailer."""
    out = bytearray()
    ino = 0
    for ino, e in enumerate(entries, start=1):
        if e.name.startswith("/") or not e.name:
            raise ValueError(f"cpio member names are relative and not empty: {e.name!r}")
        out += _header(ino, e, 2 if stat.S_ISDIR(e.mode) else 1)
        out += e.data + _pad4(len(e.data))
    out += _header(ino + 1, Entry(_TRAILER, 0), 1)
    return bytes(out)


def tree_entries(root: Path, prefix: str = "") -> list[Entry]:
    """Every directory, file and symlink below ``root`` (not ``root`` itself), parents first."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            arc = f"{prefix}{rel}"
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry.symlink(arc, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry.dir(arc, stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry.file(arc, Path(path).read_bytes(), stat.S_IMODE(st.st_mode)))
    # os.walk lists a directory's entries before descending, so parents precede children.
    return out
