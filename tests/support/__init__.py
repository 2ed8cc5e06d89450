"""Test support for end-to-end, negative and interop tests.

- ``daemon``: run ``python3 -m pyscsi_target serve --demo`` on free loopback ports (``Daemon``;
  pytest fixtures ``daemon``/``daemon_factory`` in tests/conftest.py), REST helpers to add
  targets/LUNs/CHAP, log assertions.
- ``rawclient``: a synchronous raw-PDU initiator (login, CHAP/mutual CHAP, digests, R2T
  writes, NOP/Text/TMF/Logout) for negative tests.
- ``background``: a session doing verified I/O in a thread while other tests misbehave.
- ``tgtd``: a private Debian tgtd (C reference target) on given ports for A/B runs.
- ``tools``: libiscsi/qemu-img wrappers and the iscsi-test-cu scorer.

The open-iscsi guest harness (../shared/interop/open-iscsi-vm.sh) was validated against
tgtd here: ``-b`` builds the kernel+initramfs cache in ~25 s once; a default run (32 MiB,
mkfs) takes 17-45 s under TCG depending on host load, e.g.::

    open-iscsi-vm.sh -a 127.0.0.1:PORT                                   # no auth
    open-iscsi-vm.sh -a 127.0.0.1:PORT -u USER -p SECRET -U TUSER -P TSECRET -d CRC32C
    open-iscsi-vm.sh -a 127.0.0.1:PORT -T IQN -l 2 -s 256 -t 900         # LUN 2, 256 MiB

tgtd passes every mode except that its default HeaderDigest/DataDigest is None only (the
helper enables ``None,CRC32C``) and it does not enforce discovery CHAP (-C passes anyway).
"""
