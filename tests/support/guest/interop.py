"""The open-iscsi interoperability flow (interop.sh) as a guest run.

Eight steps, each a record of the run: discovery (SendTargets, optionally with CHAP), login
(CHAP/mutual CHAP, digests), params (the negotiated values, as data records ``negotiated.*``), disk
(the LUN's block device: ``disk.*``), write (O_DIRECT, plus 1 MiB at the disk's end), readback
(O_DIRECT and buffered reads checked against what was written), fs (mkfs.ext4, a file, e2fsck -f,
read-only remount) and logout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .network import GuestNetwork, parse_portal
from .vm import GuestOptions, GuestRun, run_guest

SCRIPT = Path(__file__).with_name("interop.sh")
STEPS = ("discovery", "login", "params", "disk", "write", "readback", "fs", "logout")
DIGESTS = ("None", "CRC32C", "CRC32C,None", "None,CRC32C")
_CHAP_TEXT = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class InteropOptions:
    """What the flow does; ``validate()`` refuses combinations open-iscsi could not express."""

    portal: str  # ADDRESS:PORT as the guest reaches it
    iqn: str = ""  # empty: the first target SendTargets lists
    lun: int | None = None  # None: the lowest-numbered disk LUN
    chap_user: str = ""
    chap_secret: str = ""
    mutual_user: str = ""
    mutual_secret: str = ""
    discovery_chap: bool = False
    header_digest: str = "None"
    data_digest: str = "None"
    size_mib: int = 32
    fs: bool = True
    tcp_window: int | None = 4 << 20  # node.conn[0].tcp.window_size; None leaves open-iscsi's default
    chap_algs: str = ""  # e.g. "MD5" or "SHA3-256,SHA256,SHA1,MD5"

    def validate(self) -> InteropOptions:
        parse_portal(self.portal)
        if self.iqn and not re.match(r"^(iqn\.\d{4}-\d{2}\.\S+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$",
                                     self.iqn):
            raise ValueError(f"iqn must be an iqn., eui. or naa. name, got {self.iqn!r}")
        if self.lun is not None and not 0 <= self.lun <= 16383:
            raise ValueError(f"lun must be 0-16383, got {self.lun}")
        for name in ("header_digest", "data_digest"):
            if getattr(self, name) not in DIGESTS:
                raise ValueError(f"{name} must be one of {DIGESTS}, got {getattr(self, name)!r}")
        for name in ("chap_user", "chap_secret", "mutual_user", "mutual_secret"):
            value = getattr(self, name)
            if value and not _CHAP_TEXT.match(value):
                raise ValueError(f"{name} must be 1-255 printable characters without blanks")
        if bool(self.chap_user) != bool(self.chap_secret):
            raise ValueError("CHAP needs both chap_user and chap_secret")
        if bool(self.mutual_user) != bool(self.mutual_secret):
            raise ValueError("mutual CHAP needs both mutual_user and mutual_secret")
        if self.mutual_user and not self.chap_user:
            raise ValueError("mutual CHAP needs the one-way CHAP credentials too")
        if self.discovery_chap and not self.chap_user:
            raise ValueError("discovery CHAP needs chap_user and chap_secret")
        if not 1 <= self.size_mib <= 4096:
            raise ValueError(f"size_mib must be 1-4096, got {self.size_mib}")
        if self.tcp_window is not None and not 4096 <= self.tcp_window <= 64 << 20:
            raise ValueError(f"tcp_window must be 4 KiB-64 MiB, got {self.tcp_window}")
        if self.chap_algs and not re.match(r"^(MD5|SHA1|SHA256|SHA3-256)(,(MD5|SHA1|SHA256|SHA3-256))*$",
                                           self.chap_algs):
            raise ValueError(f"chap_algs must list MD5, SHA1, SHA256 or SHA3-256, got {self.chap_algs!r}")
        return self

    @property
    def steps(self) -> tuple[str, ...]:
        return STEPS if self.fs else tuple(s for s in STEPS if s != "fs")

    def env(self) -> dict[str, str]:
        """The script's environment (see interop.sh)."""
        self.validate()
        return {
            "IO_PORTAL": self.portal, "IO_IQN": self.iqn, "IO_LUN": "auto" if self.lun is None else str(self.lun),
            "IO_CHAP_USER": self.chap_user, "IO_CHAP_SECRET": self.chap_secret,
            "IO_MCHAP_USER": self.mutual_user, "IO_MCHAP_SECRET": self.mutual_secret,
            "IO_DISCOVERY_CHAP": "1" if self.discovery_chap else "0",
            "IO_HDIGEST": self.header_digest, "IO_DDIGEST": self.data_digest,
            "IO_SIZE_MIB": str(self.size_mib), "IO_FS": "1" if self.fs else "0",
            "IO_TCP_WINDOW": "default" if self.tcp_window is None else str(self.tcp_window),
            "IO_CHAP_ALGS": self.chap_algs,
        }

    def guest_memory_mib(self) -> int:
        # The pattern written and read back is kept in the guest's tmpfs.
        return 448 + self.size_mib


def run_interop(network: GuestNetwork, options: InteropOptions, *, timeout: float = 300.0, accel: str = "auto",
                run_dir: Path | None = None, on_console: Callable[[str], None] | None = None) -> GuestRun:
    env = options.env()
    guest = GuestOptions(timeout=timeout, mem_mib=options.guest_memory_mib(), accel=accel)
    return run_guest(SCRIPT.read_text(), network, env=env, options=guest, run_dir=run_dir, on_console=on_console)


def missing_steps(run: GuestRun, options: InteropOptions) -> list[str]:
    """The steps of the flow that did not pass (empty: the flow passed)."""
    steps = run.steps
    return [s for s in options.steps if s not in steps or steps[s].status != "PASS"]
