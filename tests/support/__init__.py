"""Test support for end-to-end, negative and interop tests.

- ``daemon``: run ``python3 -m pyscsi_target serve --demo`` on free loopback ports (``Daemon``;
  pytest fixtures ``daemon``/``daemon_factory`` in tests/conftest.py), REST helpers to add
  targets/LUNs/CHAP, log assertions.
- ``rawclient``: a synchronous raw-PDU initiator (login, CHAP/mutual CHAP, digests, R2T
  writes, NOP/Text/TMF/Logout) for negative tests.
- ``background``: a session doing verified I/O in a thread while other tests misbehave.
- ``tgtd``: a private Debian tgtd (C reference target) on given ports for A/B runs.
- ``tools``: libiscsi/qemu-img wrappers.
- ``guest``: the kernel-initiator guest (Debian's kernel, open-iscsi, multipath-tools, fio under
  qemu), its two network modes and the open-iscsi interop flow; ``python3 -m support.guest`` runs it
  by hand (PYTHONPATH=tests).
- ``testcu_score``: per-test verdicts of an ``iscsi-test-cu -V`` log (a skip is not a pass).
"""
