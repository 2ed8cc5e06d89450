"""The demo target through libiscsi's own tools: discovery, INQUIRY, iscsi-test-cu -t iSCSI."""

from __future__ import annotations

import pytest
from support.daemon import Daemon
from support.tools import LIBISCSI_TOOLS, missing, run, score_testcu

pytestmark = pytest.mark.skipif(
    bool(missing(*LIBISCSI_TOOLS)),
    reason=f"libiscsi-bin tools missing: {missing(*LIBISCSI_TOOLS)} (apt-get install libiscsi-bin)")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("libiscsi-tools")).start()
    try:
        yield d
    finally:
        d.stop()


def test_iscsi_ls_lists_demo_target(target: Daemon) -> None:
    r = run("iscsi-ls", "-s", f"iscsi://{target.portal}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Target:{target.iqn} Portal:{target.portal},1" in r.stdout
    # -s also logs in and lists the LUNs: the demo's 1 GiB disk at LUN 0.
    assert "Lun:0    Type:DIRECT_ACCESS (Size:1023M)" in r.stdout, r.stdout


def test_iscsi_inq_standard_and_vpd(target: Daemon) -> None:
    r = run("iscsi-inq", target.url(0))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Peripheral Device Type:DIRECT_ACCESS" in r.stdout
    assert "Vendor:PYSCSI" in r.stdout
    r = run("iscsi-inq", "-e", "1", "-c", "0", target.url(0))  # VPD supported pages
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("0x00", "0x80", "0x83"):
        assert page in r.stdout.lower() or page.upper() in r.stdout, r.stdout
    r = run("iscsi-inq", "-e", "1", "-c", "131", target.url(0))  # device identification
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Designator Type:(3) NAA" in r.stdout, r.stdout


def test_iscsi_readcapacity16(target: Daemon) -> None:
    if missing("iscsi-readcapacity16"):
        pytest.skip("iscsi-readcapacity16 missing")
    r = run("iscsi-readcapacity16", target.url(0))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RETURNED LOGICAL BLOCK ADDRESS:2097151" in r.stdout, r.stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in r.stdout
    assert "Total size:1073741824" in r.stdout


def test_iscsi_test_cu_iscsi_family_no_failure(target: Daemon, tmp_path) -> None:
    # -d (dataloss) lets the write residual and TMF tests run instead of skipping.
    r = run("iscsi-test-cu", "-d", "-V", "-t", "iSCSI", target.url(0), timeout=300)
    log = r.stdout + r.stderr
    (tmp_path / "iscsi-test-cu.log").write_text(log)
    scores = score_testcu(log)
    failed = sorted(k for k, v in scores.items() if v == "fail")
    assert len(scores) == 15, f"expected the 15 iSCSI-family tests, scored {len(scores)}: {scores}"
    assert not failed, f"iscsi-test-cu failures: {failed}\n{log[-3000:]}"
    assert all(v == "pass" for v in scores.values()), scores
    assert r.returncode == 0, log[-2000:]


def test_log_clean(target: Daemon) -> None:
    # Runs last in this module: nothing above may have produced a warning or error.
    target.assert_clean_log()
