"""Prometheus ``/metrics``: credentials needed, ``promtool check metrics`` accepts it, and the
values follow what happened: I/O per LUN and per target, sessions and logins, refused
logins by status, digest errors, Rejects, TMFs, faults fired, space alerts, and sources
registered by other components."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import rawclient as R
from support.daemon import Daemon
from support.workbench import add_rule, clear_rules, daemon, fetch

from pyscsi_target.metrics import Metrics

P = R.P
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) checks /metrics")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("metrics")) as d:
        yield d


def scrape(d: Daemon) -> tuple[bytes, Samples]:
    status, body, headers = fetch(d, "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8", headers
    samples: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return body, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def promtool(body: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=body.decode(), capture_output=True, text=True,
                          timeout=60)


def test_metrics_need_credentials(target: Daemon) -> None:
    status, _body, headers = fetch(target, "/metrics", auth=False)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")


def test_io_sessions_and_events_are_counted_and_promtool_accepts_them(target: Daemon) -> None:
    _, before = scrape(target)
    lun = {"target": target.iqn, "lun": "0"}
    with R.login_session(target.host, target.port, target.iqn) as c:
        for i in range(5):
            assert c.scsi(R.read10(i * 8, 8), read_len=4096).status == 0
        assert c.scsi(R.write10(0, 8), data=bytes(4096)).status == 0
        assert c.scsi(R.read16(1 << 40, 1), read_len=512).status == 2  # an error
        c.send(P.SnackRequest(type=0, itt=P.RESERVED_TAG, expstatsn=c.expstatsn))
        c.expect(P.Reject)
        c.tmf(P.TmfFunction.ABORT_TASK, rtt=0x4242)
        c.tmf(P.TmfFunction.LOGICAL_UNIT_RESET)
        # A data digest error needs DataDigest: a second session with it.
        _, during = scrape(target)
        assert value(during, "pyscsi_target_sessions", target=target.iqn, type="Normal") == 1
        c.logout()
    with R.login_session(target.host, target.port, target.iqn, data_digest="CRC32C") as d2:
        wire = bytearray(d2.encode(P.NopOut(itt=d2.next_itt(), cmdsn=d2.cmdsn, expstatsn=d2.expstatsn,
                                            immediate=True, data=b"x" * 8)))
        wire[-1] ^= 0xFF  # the data digest
        d2.send_bytes(bytes(wire))
        assert d2.expect(P.Reject).reason == P.RejectReason.DATA_DIGEST_ERROR
        d2.logout()
    bad = R.RawClient(target.host, target.port)
    assert bad.login("iqn.2026-11.org.pyscsi-target:nosuch").status == 0x0203
    bad.close()
    body, after = scrape(target)
    check = promtool(body)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pyscsi_target_lun_command_latency_seconds_count", **lun, op="read") == 6
    assert delta("pyscsi_target_lun_bytes_total", **lun, op="read") == 5 * 4096
    assert delta("pyscsi_target_lun_command_errors_total", **lun, op="read") == 1
    assert delta("pyscsi_target_lun_command_latency_seconds_count", **lun, op="write") == 1
    assert delta("pyscsi_target_lun_bytes_total", **lun, op="write") == 4096
    assert delta("pyscsi_target_target_command_latency_seconds_count", target=target.iqn, op="read") == 6
    assert delta("pyscsi_target_lun_command_latency_seconds_bucket", **lun, op="read", le="+Inf") == 6
    assert 0 < delta("pyscsi_target_lun_command_latency_seconds_sum", **lun, op="read") < 5
    assert value(after, "pyscsi_target_lun_info", **lun, extent="demo") == 1
    assert delta("pyscsi_target_logins_total", type="Normal") == 2
    assert value(after, "pyscsi_target_sessions", target=target.iqn, type="Normal") == 0
    assert delta("pyscsi_target_login_failures_total", status_class="0x02", status_detail="0x03",
                 status="not_found") == 1
    assert delta("pyscsi_target_rejects_total", reason="command_not_supported") == 1
    assert delta("pyscsi_target_rejects_total", reason="data_digest_error") == 1
    assert delta("pyscsi_target_digest_errors_total", digest="data") == 1
    assert delta("pyscsi_target_task_management_functions_total", function="abort_task") == 1
    assert delta("pyscsi_target_task_management_functions_total", function="logical_unit_reset") == 1
    assert delta("pyscsi_target_violations_total") >= 4  # SNACK, LBA out of range, digest, unknown target


def test_faults_fired_and_alerts(target: Daemon) -> None:
    add_rule(target, kind="status", status="busy", opcode=0x28, count=2)
    with R.login_session(target.host, target.port, target.iqn) as c:
        assert [c.scsi(R.read10(0, 1), read_len=512).status for _ in range(3)] == [8, 8, 0]
        c.logout()
    clear_rules(target)
    # The pool alert fires when the free share is at or below N% (FreeNAS's meaning); no filesystem
    # holding the extent root here is more than 99% free, so 99 raises it.
    target.rest("PUT", "globalconfiguration/", {"iscsi_pool_avail_threshold": 99})
    target.rest("GET", "/api/v1.0/system/alert/", prefix="")
    body, after = scrape(target)
    assert value(after, "pyscsi_target_faults_fired_total", kind="status") == 2
    assert value(after, "pyscsi_target_fault_rules", state="active") == 0
    assert value(after, "pyscsi_target_alerts", kind="pool") == 1
    assert value(after, "pyscsi_target_alert_crossings_total", kind="pool") == 1
    assert promtool(body).returncode == 0


def test_registered_sources() -> None:
    """Other components (the CHAP and REST authentication guards) register their counters."""
    m = Metrics(None)
    failures = {("chap",): 3, ("rest",): 1}
    m.add_source("auth_failures_total", "Authentication failures by guard", lambda: failures, labels=("guard",))
    m.add_source("guard_blocked_clients", "Clients in backoff now", lambda: 2, kind="gauge")
    with pytest.raises(ValueError):
        m.add_source("x", "y", lambda: 1, kind="summary")
    body = m.exposition()
    text = body.decode()
    assert 'pyscsi_target_auth_failures_total{guard="chap"} 3.0' in text
    assert "pyscsi_target_guard_blocked_clients 2.0" in text
    failures[("chap",)] = 4
    assert 'pyscsi_target_auth_failures_total{guard="chap"} 4.0' in m.exposition().decode()
    assert promtool(body).returncode == 0


def test_guard_counters_are_exposed(target: Daemon) -> None:
    """The issue-10 guards' counters (REST and CHAP back-off, admission control, the write
    budget) are metric families; a refused REST login counts."""
    _, before = scrape(target)
    status, _b, _h = fetch(target, "/api/v1.0/services/iscsi/target/", auth=False)
    assert status == 401
    wrong = urllib.request.Request(target.api_url + "/api/v1.0/services/iscsi/target/",
                                   headers={"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code == 401
    body, after = scrape(target)
    assert value(after, "pyscsi_target_rest_auth_failures_total") - value(
        before, "pyscsi_target_rest_auth_failures_total") == 1
    for name, labels in [("pyscsi_target_chap_responses_total", {"outcome": "failed"}),
                         ("pyscsi_target_connections_refused_total", {"reason": "per_address"}),
                         ("pyscsi_target_write_buffer_refused_total", {})]:
        assert (name, tuple(sorted(labels.items()))) in after, name
    assert value(after, "pyscsi_target_write_buffer_budget_bytes") > 0
    assert promtool(body).returncode == 0
