"""A reusable kernel-initiator guest: Debian's kernel, open-iscsi and friends under qemu.

    from support.guest import GuestOptions, TapNetwork, UserNetwork, run_guest

    net = UserNetwork([daemon.portal])                      # slirp, the portal forwarded to 10.0.2.100
    run = run_guest(script, net, env={"PORTAL": net.guest_portal(0)}, options=GuestOptions(timeout=120))
    assert run.ok, run.describe()                           # records, console and kernel log tails

The script is busybox ash with lib.sh's helpers: ``begin``/``step``/``check``/``data``/``mark`` report
to the host, ``start_iscsid``, ``iscsi_login``, ``iscsi_session``, ``iscsi_disk`` and
``start_multipath`` drive the initiator.  The guest has open-iscsi, multipath-tools + udev, fio
(libaio), e2fsprogs, util-linux and sg3-utils; /tmp is RAM.

- Target faults while the guest runs: ``with Guest(...) as g``, ``g.wait_for_mark(name, t)``, act on
  the target (kill it, restart it on the same port), ``g.send(event)`` (the script's ``wait_host``),
  then ``g.wait()``.  A user-mode portal is reconnected to per connection, so a restarted target is
  reachable at the same guest address.
- Several paths: ``UserNetwork([portal1, portal2])`` gives 10.0.2.100 and .101; a ``TapNetwork(n)``
  has n target addresses, all on one tap link.
- The realistic path: ``with TapNetwork() as net``, start the target(s) under ``net.entered()``
  (their portal on ``net.target_address``, their REST API on the namespace's loopback, so REST calls
  go under ``entered()`` too), and boot the guest with ``net``: virtio-net, no user-space TCP.

Modules: ``image`` (the cached kernel, initramfs and tools disk, built from the Debian archive),
``network`` (the two modes), ``vm`` (``Guest``, ``run_guest``, ``GuestRun``, ``Record``), ``interop``
(the 8-step open-iscsi flow), ``cpio`` (the initramfs format), ``forwarder`` (slirp's relay).
Under TCG a guest is ready 5-8 s after qemu starts (more on a loaded host); the interop flow takes 20-40 s.

Manual runs: ``PYTHONPATH=tests python3 -m support.guest --help``.
"""

from .image import GuestImage, ensure_image
from .network import GuestNetwork, TapNetwork, UserNetwork
from .vm import Guest, GuestOptions, GuestRun, Record, run_guest

__all__ = ["Guest", "GuestImage", "GuestNetwork", "GuestOptions", "GuestRun", "Record", "TapNetwork", "UserNetwork",
           "ensure_image", "run_guest"]
