"""A session that keeps doing verified I/O in a thread while other tests misbehave.

Negative tests assert, after each abuse, that this session made progress during it and
never saw an error: one bad connection must not harm another.
"""

from __future__ import annotations

import os
import threading
import time

from . import rawclient as R


class BackgroundIO:
    """Write a pattern, read it back, compare; over and over, in LBAs [lba0, lba0+span)."""

    def __init__(self, host: str, port: int, target: str, *, lba0: int = 1_500_000, span: int = 4096,
                 blocks: int = 128) -> None:
        self.host, self.port, self.target = host, port, target
        self.lba0, self.span, self.blocks = lba0, span, blocks
        self.ops = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-io", daemon=True)
        self.client: R.RawClient | None = None

    def start(self) -> BackgroundIO:
        self.client = R.login_session(self.host, self.port, self.target,
                                      initiator="iqn.2026-11.org.pyscsi-target.test:background")
        self._thread.start()
        return self

    def _run(self) -> None:
        c = self.client
        assert c is not None
        i = 0
        try:
            while not self._stop.is_set():
                lba = self.lba0 + (i * self.blocks) % self.span
                data = os.urandom(self.blocks * 512)
                w = c.scsi(R.write10(lba, self.blocks), data=data, timeout=30)
                if w.status != 0:
                    self.errors.append(f"write lba {lba}: status {w.status:#x} sense {w.sense.hex()}")
                    return
                r = c.scsi(R.read10(lba, self.blocks), read_len=len(data), timeout=30)
                if r.status != 0 or r.data != data:
                    self.errors.append(f"read lba {lba}: status {r.status:#x} match={r.data == data}")
                    return
                self.ops += 1
                i += 1
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            self.errors.append(f"{type(e).__name__}: {e}")

    def progressed_since(self, ops_before: int, timeout: float = 10.0) -> bool:
        """True once at least two more verified write+read pairs completed since ``ops_before``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.errors:
                return False
            if self.ops >= ops_before + 2:
                return True
            time.sleep(0.01)
        return False

    def check(self, ops_before: int) -> None:
        assert self.progressed_since(ops_before), (
            f"parallel session stalled or failed: ops {ops_before}->{self.ops}, errors {self.errors}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.client is not None:
            if not self.errors:
                try:
                    self.client.logout()
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"logout: {type(e).__name__}: {e}")
            self.client.close()
