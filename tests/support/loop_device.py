"""A loop device over a sparse file: a real block device for Disk-extent tests (root only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """``/dev/loopN`` over ``backing`` (made sparse, ``size`` bytes); detached on exit.
    Skips the test where loop devices cannot be made."""
    if not os.path.exists("/dev/loop-control") or os.geteuid() != 0:
        pytest.skip("needs loop devices (root)")
    backing.write_bytes(b"")
    os.truncate(backing, size)
    out = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"no loop device: {out.stderr.strip()}")
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def grow(dev: str, backing: Path, size: int) -> None:
    """Resize the backing file and have the loop device take its new size (as a zvol's
    ``volsize`` or ``lvextend`` does under a Disk extent)."""
    os.truncate(backing, size)
    subprocess.run(["losetup", "-c", dev], check=True)
