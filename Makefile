# Two entry points for a fresh Debian bookworm machine (as root):
#   make run   install pyscsi-target and serve the demo LUN on 127.0.0.1:3260 (API on 127.0.0.1:8080)
#   make test  install the test tools (libiscsi-bin, qemu, tgt, ...) and run lint and the whole suite
PY ?= python3
PORTAL ?= 127.0.0.1:3260
API ?= 127.0.0.1:8080
# Debian packages the tests drive:
#   libiscsi-bin (iscsi-test-cu, iscsi-ls, iscsi-perf ...), qemu-utils + qemu-block-extra (qemu-img/qemu-io
#   over iSCSI), tgt (the side-by-side reference target), strace (durability cross-check), openssl (TLS test),
#   gcc (the bench's header-digest shim), util-linux (losetup), ceph-mon + ceph-osd + ceph-common (the
#   throwaway cluster of the RBD tests; librbd1 comes with them), open-isns-server + open-isns-utils (isnsd,
#   isnsadm for the iSNS tests), fio (the RBD bench's ceiling row), tgt-rbd (tgtd's RBD backing store, the RBD
#   bench's reference row);
# and the kernel-initiator guest (tests/support/guest): qemu-system-x86 boots it; apt, dpkg, kmod and
# e2fsprogs build its image from the Debian archive; iproute2 makes its tap namespace; busybox-static and
# cpio check its shell and initramfs on the host; tshark decodes the workbench's captures and prometheus
# (promtool) checks its /metrics.
TEST_DEBS = libiscsi-bin qemu-utils qemu-block-extra tgt strace openssl gcc util-linux \
            ceph-mon ceph-osd ceph-common open-isns-server open-isns-utils fio tgt-rbd \
            qemu-system-x86 kmod e2fsprogs iproute2 busybox-static cpio systemd tshark prometheus

.PHONY: run install test test-deps lint guest-image

install:
	$(PY) -m pip install -q --disable-pip-version-check -e .

run: install
	$(PY) -m pyscsi_target serve --demo --portal $(PORTAL) --api $(API)

test-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'

# ruff over the tree; mypy as configured in pyproject.toml (strict on iscsi/ and scsi/).
lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

# The guest's kernel, initramfs and tools disk, downloaded and built once (~20 s), then cached in
# $XDG_CACHE_HOME/pyscsi-target/guest (default ~/.cache/...).
guest-image:
	PYTHONPATH=tests $(PY) -m support.guest build >/dev/null

# pytest's exit 5 ("no tests collected") is not a pass: it is turned into a failure, and so is any
# skip (everything a test needs is installed by test-deps).
test: test-deps lint guest-image
	PYSCSI_TARGET_NO_SKIPS=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" && rc=1; exit $$rc
