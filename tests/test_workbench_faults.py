"""Fault injection through the API, against the real daemon, observed by a raw-PDU initiator:
every kind does what it says to the PDUs it matches and nothing else, the trigger (after,
count, probability, expiry) and scope (target, initiator, session, LUN, opcode, LBA range)
hold, every firing is counted and logged, and a connection no rule covers carries no hook."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import rawclient as R
from support.daemon import Daemon, RestError, wait_for
from support.workbench import add_rule, api, clear_rules, cli, daemon

P = R.P
OTHER_INITIATOR = "iqn.2026-11.org.pyscsi-target.test:other"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("faults")) as d:
        yield d


@pytest.fixture(autouse=True)
def no_rules(target: Daemon) -> Iterator[None]:
    clear_rules(target)
    yield
    clear_rules(target)


def session(d: Daemon, **kw: object) -> R.RawClient:
    initiator = str(kw.pop("initiator", R.INITIATOR))
    c = R.RawClient(d.host, d.port, initiator=initiator)
    out = c.login(d.iqn, **kw)  # type: ignore[arg-type]
    assert out.ok, out
    c.clear_unit_attentions()
    return c


def hooked(d: Daemon, tsih: int) -> list[int]:
    return list(api(d, "GET", f"sessions/{tsih}/")["connections"][0]["fault_rules"])


def test_bad_sector_range_answers_check_condition_with_the_chosen_sense(target: Daemon) -> None:
    rule = add_rule(target, kind="status", lba_first=1000, lba_last=1007, sense_key=3, asc=0x11, ascq=0,
                    comment="bad sector")
    with session(target) as c:
        r = c.scsi(R.read10(1004, 8), read_len=4096)  # overlaps the range from inside
        assert r.status == 2 and r.sense_key == 3 and r.asc_ascq == (0x11, 0)
        assert r.sense[0] == 0xF0 and struct.unpack_from(">I", r.sense, 3)[0] == 1004  # VALID, INFORMATION = LBA
        r = c.scsi(R.read10(996, 8), read_len=4096)  # overlaps from below: the first bad LBA is reported
        assert r.status == 2 and struct.unpack_from(">I", r.sense, 3)[0] == 1000
        assert c.scsi(R.read10(1008, 8), read_len=4096).status == 0  # just after
        assert c.scsi(R.read10(992, 8), read_len=4096).status == 0  # just before
        assert c.scsi(R.write10(1000, 1), data=bytes(512)).status == 2  # writes too (no opcode in the scope)
        c.logout()
    got = api(target, "GET", f"faults/{rule['id']}/")
    assert got["fired"] == 3 and got["matched"] == 3 and got["state"] == "active"
    log = api(target, "GET", "fault-log/")
    assert log["fired_by_kind"]["status"] >= 3
    assert [f["rule"] for f in log["firings"][-3:]] == [rule["id"]] * 3


@pytest.mark.parametrize("status,code", [("busy", 0x08), ("task_set_full", 0x28), ("reservation_conflict", 0x18)])
def test_status_busy_task_set_full(target: Daemon, status: str, code: int) -> None:
    add_rule(target, kind="status", status=status, opcode="0x28", count=1)
    with session(target) as c:
        r = c.scsi(R.read10(0, 1), read_len=512)
        assert r.status == code and not r.sense
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0  # count=1: spent
        c.logout()


def test_scope_by_initiator_and_lun(target: Daemon) -> None:
    add_rule(target, kind="status", initiator=OTHER_INITIATOR, opcode=0x28, sense_key=5, asc=0x24)
    lun3 = add_rule(target, kind="status", lun=3, opcode=0x28, sense_key=5, asc=0x25)  # LUN 0 is not LUN 3
    with session(target) as c:
        # The other initiator's rule does not even sit on this connection.
        assert hooked(target, c.tsih) == [lun3["id"]]
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        c.logout()
    with session(target, initiator=OTHER_INITIATOR) as c:
        r = c.scsi(R.read10(0, 1), read_len=512)
        assert r.status == 2 and r.asc_ascq == (0x24, 0)
        c.logout()


def test_after_count_and_expiry(target: Daemon) -> None:
    rule = add_rule(target, kind="status", opcode=0x28, after=2, count=2, sense_key=4, asc=0x44)
    with session(target) as c:
        statuses = [c.scsi(R.read10(0, 1), read_len=512).status for _ in range(6)]
        assert statuses == [0, 0, 2, 2, 0, 0]
        got = api(target, "GET", f"faults/{rule['id']}/")
        assert (got["matched"], got["fired"], got["state"]) == (4, 2, "spent")
        # A spent rule comes off the connection: the plain path again.
        assert wait_for(lambda: hooked(target, c.tsih) == [], 5)
        short = add_rule(target, kind="status", opcode=0x28, sense_key=4, asc=0x44, expires_in=0.5)
        assert c.scsi(R.read10(0, 1), read_len=512).status == 2
        time.sleep(0.8)
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        assert api(target, "GET", f"faults/{short['id']}/")["state"] == "expired"
        assert wait_for(lambda: hooked(target, c.tsih) == [], 5)
        c.logout()


def test_probability(target: Daemon) -> None:
    add_rule(target, kind="status", opcode=0x28, probability=0.5, sense_key=4, asc=0x44)
    with session(target) as c:
        statuses = [c.scsi(R.read10(0, 1), read_len=512).status for _ in range(200)]
        c.logout()
    fired = statuses.count(2)
    assert 40 < fired < 160, fired  # binomial(200, 0.5): outside this range once in ~10^15 runs


def test_latency_delays_execution(target: Daemon) -> None:
    add_rule(target, kind="latency", delay_ms=400, opcode=0x28)
    with session(target) as c:
        t0 = time.monotonic()
        assert c.scsi(R.read10(0, 8), read_len=4096).status == 0
        slow = time.monotonic() - t0
        t0 = time.monotonic()
        assert c.scsi(R.tur()).status == 0  # not a READ(10): no latency
        fast = time.monotonic() - t0
        c.logout()
    assert slow >= 0.4 and fast < 0.3, (slow, fast)


def test_hold_until_abort_task(target: Daemon) -> None:
    add_rule(target, kind="hold", opcode=0x28)
    with session(target) as c:
        cmd = c.scsi_pdu(R.read10(8, 8), read_len=4096)
        c.send(cmd)
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.5)
        s = api(target, "GET", f"sessions/{c.tsih}/")
        assert [(t["itt"], t["state"]) for t in s["outstanding_tasks"]] == [(cmd.itt, "submitted")]
        rsp = c.tmf(P.TmfFunction.ABORT_TASK, rtt=cmd.itt, refcmdsn=cmd.cmdsn)
        assert rsp.response == P.TmfResponse.COMPLETE
        assert c.scsi(R.read10(8, 8), read_len=4096).status == 0  # count 1: the retry goes through
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)  # and the aborted one never answered
        assert api(target, "GET", f"sessions/{c.tsih}/")["outstanding_tasks"] == []
        c.logout()


def test_hold_released_when_the_rule_goes(target: Daemon) -> None:
    rule = add_rule(target, kind="hold", opcode=0x28)
    with session(target) as c:
        cmd = c.scsi_pdu(R.read10(8, 8), read_len=4096)
        c.send(cmd)
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)
        api(target, "DELETE", f"faults/{rule['id']}/")
        assert c.complete(cmd).status == 0
        c.logout()


def test_drop_after_n_commands(target: Daemon) -> None:
    add_rule(target, kind="drop", pdu="scsi-command", opcode=0x28, after=2)
    with session(target) as c:
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        c.send(c.scsi_pdu(R.read10(0, 1), read_len=512))
        assert c.wait_closed(5) == []  # reset: no answer to the third
    with session(target) as c:  # count 1 (the default for drop): a new session is left alone
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        c.logout()


def test_drop_after_a_response_with_an_orderly_close(target: Daemon) -> None:
    with session(target) as c:
        add_rule(target, kind="drop", pdu="scsi-response", how="close")  # rules reach live sessions too
        c.send(c.scsi_pdu(R.tur()))
        got = c.wait_closed(5)
        assert len(got) == 1 and isinstance(got[0], P.ScsiResponse)  # the response went out, then FIN


def test_drop_in_the_middle_of_a_data_in(target: Daemon) -> None:
    add_rule(target, kind="drop_mid_pdu", pdu="data-in")
    with session(target) as c:
        c.send(c.scsi_pdu(R.read10(0, 64), read_len=32768))
        # Half of the PDU arrives, then the connection closes: the framer never sees a whole PDU.
        assert c.wait_closed(5) == []
        assert 0 < c.reader._end - c.reader._start < 48 + 32768


def test_delay_output_keeps_other_pdus_going(target: Daemon) -> None:
    add_rule(target, kind="delay", pdu="scsi-response", opcode=0x00, delay_ms=800)
    with session(target) as c:
        cmd = c.scsi_pdu(R.tur())
        c.send(cmd)
        t0 = time.monotonic()
        assert c.nop().itt != cmd.itt  # the NOP-In is not held behind the delayed response
        assert time.monotonic() - t0 < 0.5
        r = c.complete(cmd)
        assert r.status == 0 and time.monotonic() - t0 >= 0.5  # the loop's clock may be a little behind
        c.logout()


def test_delay_input_lets_abort_task_reach_the_command_first(target: Daemon) -> None:
    """A delayed SCSI Command is not there yet when the initiator gives up: ABORT TASK answers
    'function complete' (RFC 7143 11.5.1) and the command is discarded when it arrives."""
    add_rule(target, kind="delay", pdu="scsi-command", opcode=0x28, delay_ms=700)
    with session(target) as c:
        cmd = c.scsi_pdu(R.read10(0, 8), read_len=4096)
        c.send(cmd)
        rsp = c.tmf(P.TmfFunction.ABORT_TASK, rtt=cmd.itt, refcmdsn=cmd.cmdsn)
        assert rsp.response == P.TmfResponse.COMPLETE
        time.sleep(1.0)
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.2)
        assert c.scsi(R.read10(0, 8), read_len=4096).status == 0  # the window moved past its CmdSN
        c.logout()


def test_withhold_r2t(target: Daemon) -> None:
    add_rule(target, kind="withhold", pdu="r2t")
    with session(target, operational={"ImmediateData": "No"}) as c:
        cmd = c.scsi_pdu(R.write10(0, 8), write_len=4096)
        c.send(cmd)
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.5)
        c.close()  # the command waits for its R2T until the connection goes


def test_ignore_nop_and_async_logout_request(target: Daemon) -> None:
    add_rule(target, kind="ignore_nop", count=1)
    with session(target) as c:
        with pytest.raises(TimeoutError):
            c.nop(timeout=0.5)
        c.nop()  # count 1: the next ping is answered
        add_rule(target, kind="async", event="logout", wait=7, session=c.tsih)
        c.nop()
        assert [(e.event, e.param3) for e in c.async_events] == [(P.AsyncEvent.LOGOUT_REQUEST, 7)]
        c.logout()


def test_async_renegotiate_and_drop_connection(target: Daemon) -> None:
    with session(target) as c:
        add_rule(target, kind="async", event="renegotiate", wait=3, session=c.tsih)
        c.nop()
        assert [(e.event, e.param3) for e in c.async_events] == [(P.AsyncEvent.RENEGOTIATE, 3)]
        add_rule(target, kind="async", event="drop_connection", wait=1, pdu="nop-out", session=c.tsih)
        c.nop()  # the Async Message comes first, then the target drops the connection as it announced
        assert [(e.event, e.param1, e.param2) for e in c.async_events[1:]] == [(P.AsyncEvent.DROP_CONNECTION, 0, 1)]
        assert c.wait_closed(5) == []


def test_reject_consumes_the_cmdsn(target: Daemon) -> None:
    add_rule(target, kind="reject", pdu="scsi-command", opcode=0x28, reason="command_not_supported")
    with session(target) as c:
        cmd = c.scsi_pdu(R.read10(0, 1), read_len=512)
        c.send(cmd)
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.COMMAND_NOT_SUPPORTED and rej.data[16:20] == cmd.itt.to_bytes(4, "big")
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0
        c.logout()
    # A fault's Reject is not the initiator's violation.
    assert all(v["section"] != "fault" for v in api(target, "GET", "violations/"))


def test_corrupt_digests(target: Daemon) -> None:
    add_rule(target, kind="corrupt_data_digest", pdu="data-in")
    with session(target, header_digest="CRC32C", data_digest="CRC32C") as c:
        c.send(c.scsi_pdu(R.read10(0, 8), read_len=4096))
        ev = c.recv_event()
        assert isinstance(ev, P.DigestError) and ev.kind == "data" and isinstance(ev.pdu, P.DataIn)
        add_rule(target, kind="corrupt_header_digest", pdu="nop-in")
        c.send(P.NopOut(itt=c.next_itt(), cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True))
        ev = c.recv_event()
        assert isinstance(ev, P.DigestError) and ev.kind == "header"
    # Without the digest negotiated the rule cannot act, so it does not fire.
    rule = add_rule(target, kind="corrupt_data_digest", pdu="data-in")
    with session(target) as c:
        assert c.scsi(R.read10(0, 8), read_len=4096).status == 0
        c.logout()
    assert api(target, "GET", f"faults/{rule['id']}/")["fired"] == 0


def test_reorder_data_in(target: Daemon) -> None:
    add_rule(target, kind="reorder_data_in", count=1)
    with session(target) as c:
        c.send(c.scsi_pdu(R.read10(0, 2048), read_len=1 << 20))  # four Data-In of 256 KiB
        pdus = [c.recv() for _ in range(4)]
        assert all(isinstance(p, P.DataIn) for p in pdus)
        assert [p.offset for p in pdus] == [768 << 10, 512 << 10, 256 << 10, 0]
        assert pdus[0].has_status and [p.datasn for p in pdus] == [3, 2, 1, 0]
        c.logout()


def test_rule_validation(target: Daemon) -> None:
    for body, field in (({"kind": "explode"}, "kind"), ({"kind": "delay"}, "delay_ms"),
                        ({"kind": "status"}, "sense_key"), ({"kind": "withhold", "pdu": "scsi-command"}, "pdu"),
                        ({"kind": "status", "sense_key": 3, "asc": 0x11, "lba_first": 9, "lba_last": 2}, "lba_last"),
                        ({"kind": "drop", "probability": 0}, "probability"), ({"kind": "hold", "delay_ms": 5},
                                                                                 "delay_ms"),
                        ({"kind": "drop", "target": "nosuch"}, "target"), ({"kind": "hold", "bogus": 1}, "bogus")):
        with pytest.raises(RestError) as e:
            add_rule(target, **body)
        assert e.value.status == 400 and field in e.value.body, (body, e.value.body)
    assert api(target, "GET", "faults/") == []


def test_no_rule_no_hook(target: Daemon) -> None:
    with session(target) as c:
        s = api(target, "GET", f"sessions/{c.tsih}/")
        assert s["connections"][0]["fault_rules"] == [] and s["connections"][0]["captures"] == []
        rule = add_rule(target, kind="status", sense_key=5, asc=0x20, opcode=0xEE)
        assert hooked(target, c.tsih) == [rule["id"]]
        api(target, "DELETE", f"faults/{rule['id']}/")
        assert hooked(target, c.tsih) == []
        c.logout()


def test_cli_fault_add_list_log_rm(target: Daemon, tmp_path: Path) -> None:
    out = cli(target, "fault", "add", "status", "--target", "demo", "--lba", "100-107", "--sense", "3/11/0",
               "--comment", "bad sector")
    assert out.returncode == 0, out.stderr
    assert "fault rule" in out.stdout and "lba=100-107" in out.stdout and "sense=3/11/00" in out.stdout
    with session(target) as c:
        assert c.scsi(R.read10(100, 1), read_len=512).status == 2
        c.logout()
    out = cli(target, "fault", "list")
    assert out.returncode == 0 and "bad sector" in out.stdout and "1/-" in out.stdout, out.stdout
    out = cli(target, "fault", "log")
    assert out.returncode == 0 and "status" in out.stdout and "28000000006400" in out.stdout, out.stdout
    bad = cli(target, "fault", "add", "delay")
    assert bad.returncode == 1 and "--delay" in bad.stderr, bad.stderr
    out = cli(target, "fault", "rm", "--all")
    assert out.returncode == 0 and "1 fault rule(s) removed" in out.stdout
    assert api(target, "GET", "faults/") == []
