"""Stand-ins for FreeNAS zvols: block devices at ``/dev/zvol/<pool>/<name>``.

FreeNAS clients name a zvol-backed Disk extent ``zvol/<pool>/<dataset>/<name>`` (democratic-csi,
freenas-proxmox) and find it again by the path FreeNAS showed, ``/dev/zvol/...``.  A test gets
the same names here: a loop device over a sparse file, linked from a pool directory of its own
under /dev/zvol (a unique name, so a host's real zvols are never touched), all removed on exit.
Needs root and losetup, as the test's other block-device tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

ZVOL_DIR = Path("/dev/zvol")


class FakeZvols:
    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("losetup") is None:
            pytest.skip("losetup not available")
        self.tmp = tmp_path
        self.pool = "pst" + secrets.token_hex(3)  # short: clients cap "zvol/<name>" at 63 characters
        self._made_zvol_dir = False
        self._loops: dict[str, str] = {}  # dataset name -> /dev/loopN

    def __enter__(self) -> FakeZvols:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def create(self, dataset: str, size: int) -> str:
        """A zvol ``<pool>/<dataset>`` of ``size`` bytes; returns the extent disk name
        (``zvol/<pool>/<dataset>``) a FreeNAS client sends."""
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
        os.truncate(backing.stdout.strip(), size)
        subprocess.run(["losetup", "-c", loop], check=True)

    def close(self) -> None:
        shutil.rmtree(ZVOL_DIR / self.pool, ignore_errors=True)
        if self._made_zvol_dir:
            try:
                ZVOL_DIR.rmdir()
            except OSError:
                pass
        for loop in self._loops.values():
            subprocess.run(["losetup", "-d", loop], check=False)
        self._loops.clear()
