# Two entry points for a fresh Debian machine (as root):
#   make run   install pyscsi-target and serve the demo LUN on 127.0.0.1:3260 (API on 127.0.0.1:8080)
#   make test  install the test tools (libiscsi-bin, qemu, tgt, ...) and run the whole suite
PY ?= python3
PORTAL ?= 127.0.0.1:3260
API ?= 127.0.0.1:8080
# Debian packages the tests drive: libiscsi's tools, qemu-img/qemu-io with their iscsi driver, tgtd for
# the side-by-side bench, strace for the durability cross-check, openssl for the TLS test, gcc for the
# bench's header-digest shim.  (shared/interop/open-iscsi-vm.sh installs what its guest needs itself.)
TEST_DEBS = libiscsi-bin qemu-utils qemu-block-extra tgt strace openssl gcc util-linux

.PHONY: run install test test-deps lint

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

lint:
	$(PY) -m ruff check .

# pytest's exit 5 ("no tests collected") is not a pass: it is turned into a failure, and so is any
# skip (everything a test needs is installed by test-deps).
test: test-deps lint
	PYSCSI_TARGET_NO_SKIPS=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" && rc=1; exit $$rc
