"""A stand-in for a FreeNAS pool: its zvols at ``/dev/zvol/<pool>/...``, its mount point
``/mnt/<pool>``.

FreeNAS clients name a zvol-backed Disk extent ``zvol/<pool>/<dataset>`` (democratic-csi,
freenas-proxmox) and find it again by the path FreeNAS showed, ``/dev/zvol/...``; File extents
they put at ``/mnt/<pool>/...`` (opensvc).  A test gets the same names here: zvols are loop
devices over sparse files, linked from a directory of the pool's own under /dev/zvol, and the
mount point is a directory (the daemon's extent root in the test).  The pool name is unique,
so nothing of the host is touched, and everything is removed on exit.  Zvols need root and
losetup, as the other block-device tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

from support.loop_device import grow

ZVOL_DIR = Path("/dev/zvol")


MNT = Path("/mnt")


class FakePool:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.pool = "pst" + secrets.token_hex(3)  # short: clients cap "zvol/<name>" at 63 characters
        self._made_zvol_dir = False
        self._loops: dict[str, str] = {}  # dataset name -> /dev/loopN

    def __enter__(self) -> FakePool:
        return self

    @property
    def mountpoint(self) -> Path:
        """``/mnt/<pool>``, made on first use."""
        path = MNT / self.pool
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def zvol(self, dataset: str, size: int) -> str:
        """A zvol ``<pool>/<dataset>`` of ``size`` bytes; returns the extent disk name
        (``zvol/<pool>/<dataset>``) a FreeNAS client sends."""
        if shutil.which("losetup") is None:
            pytest.skip("losetup not available")
        image = self.tmp / f"zvol-{len(self._loops)}.img"
        image.write_bytes(b"")
        os.truncate(image, size)
        made = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot create a loop device: {made.stderr.strip()}")
        loop = made.stdout.strip()
        self._loops[dataset] = loop
        if not ZVOL_DIR.exists():
            ZVOL_DIR.mkdir()
            self._made_zvol_dir = True
        link = ZVOL_DIR / self.pool / dataset
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(loop)
        return f"zvol/{self.pool}/{dataset}"

    def resize(self, dataset: str, size: int) -> None:
        """Grow the zvol, as ``zfs set volsize=`` does (the loop device re-reads its file)."""
        loop = self._loops[dataset]
        backing = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True, text=True)
        grow(loop, Path(backing.stdout.strip()), size)

    def close(self) -> None:
        shutil.rmtree(MNT / self.pool, ignore_errors=True)
        shutil.rmtree(ZVOL_DIR / self.pool, ignore_errors=True)
        if self._made_zvol_dir:
            try:
                ZVOL_DIR.rmdir()
            except OSError:
                pass
        for loop in self._loops.values():
            subprocess.run(["losetup", "-d", loop], check=False)
        self._loops.clear()
