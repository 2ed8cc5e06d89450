"""A small real filesystem that a test can fill: tmpfs of a given size, mounted on a
directory of the test's own and unmounted (lazily, if something still holds it) at exit.

tmpfs answers ENOSPC exactly as a full disk does, needs no loop device and leaves nothing
behind; it needs root (CAP_SYS_ADMIN), which the suite runs as."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_fs(path: Path, size: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` bytes on ``path`` (created if missing) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, chunk: int = 1 << 16) -> int:
    """Write ``path`` until its filesystem is full; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\xee" * chunk
        while True:
            try:
                n = os.write(fd, block)
            except OSError:
                if chunk <= 4096:
                    return written
                chunk //= 2
                block = block[:chunk]
                continue
            written += n
    finally:
        os.close(fd)
