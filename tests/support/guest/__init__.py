"""A reusable kernel-initiator guest: Debian's kernel, open-iscsi and friends under qemu.

    from support.guest import GuestOptions, TapNetwork, UserNetwork, run_guest

    run = run_guest(script, UserNetwork(["127.0.0.1:3260"]), env={"PORTAL": "10.0.2.100:3260"})
    assert run.ok, run.describe()

- ``image``: the cached kernel, initramfs and tools disk (built once from the Debian archive);
- ``network``: ``UserNetwork`` (slirp, forwarded loopback portals) and ``TapNetwork`` (a namespace
  with a tap device, the targets inside it);
- ``vm``: ``Guest``/``run_guest`` and what a run returns (``GuestRun``, ``Record``);
- ``lib.sh``: the shell helpers a guest script uses to report steps, checks and data;
- ``interop``: the 8-step open-iscsi interoperability flow on top of all this.

Manual runs: ``PYTHONPATH=tests python3 -m support.guest --help``.
"""

from .image import GuestImage, ensure_image
from .network import GuestNetwork, TapNetwork, UserNetwork
from .vm import Guest, GuestOptions, GuestRun, Record, run_guest

__all__ = ["Guest", "GuestImage", "GuestNetwork", "GuestOptions", "GuestRun", "Record", "TapNetwork", "UserNetwork",
           "ensure_image", "run_guest"]
