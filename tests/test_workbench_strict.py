"""Strict mode: what the default mode tolerates, a strict target refuses, and every refusal
(and every Reject, refused login and initiator-caused CHECK CONDITION in either mode) names
the section of the standard and the rule, in the log and in the violation reports."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from support import rawclient as R
from support.daemon import Daemon
from support.workbench import api, cli, daemon

P = R.P


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("strict")) as d:
        yield d


@pytest.fixture
def strict(target: Daemon) -> Iterator[None]:
    api(target, "PUT", "strict/demo/")
    try:
        yield
    finally:
        api(target, "DELETE", "strict/demo/")


def login(d: Daemon, **kw: Any) -> tuple[R.RawClient, R.LoginOutcome]:
    c = R.RawClient(d.host, d.port, initiator=kw.pop("initiator", R.INITIATOR), isid=kw.pop("isid", None))
    return c, c.login(d.iqn, **kw)


def last_login_violation(d: Daemon) -> dict[str, Any]:
    return [v for v in api(d, "GET", "violations/") if v["session"] is None][-1]


# What the default mode lets through, each a login a strict target refuses with 0x0200.
LOGINS = [
    pytest.param({"operational": {"InitiatorName": R.INITIATOR}}, "RFC 7143 6.3", "declared once, in the first",
                 id="identity-key-repeated"),
    pytest.param({"security_extra": [("MaxRecvDataSegmentLength", "65536")]}, "RFC 7143 6.3",
                 "may not be declared again", id="declarative-redeclared"),
    pytest.param({"initiator": "iqn.2026-11.org.Example:Mixed-Case"}, "RFC 7143 4.2.7", "normalised form",
                 id="name-not-normalised"),
    pytest.param({"isid": bytes((0xC0, 0, 0, 0, 0, 1))}, "RFC 7143 11.12.5", "reserved", id="isid-type-reserved"),
]


@pytest.mark.parametrize("how,section,words", LOGINS)
def test_login_tolerated_by_default_refused_when_strict(target: Daemon, how: dict[str, Any], section: str,
                                                       words: str) -> None:
    c, out = login(target, **dict(how))
    assert out.ok, out
    c.logout()
    api(target, "PUT", "strict/demo/")
    try:
        mark = target.log_mark()
        c, out = login(target, **dict(how))
        c.close()
        assert out.status == 0x0200, out
        v = last_login_violation(target)
        assert v["section"] == section and words in v["rule"] and v["strict"], v
        assert v["action"] == "login 0x0200"
        # The log line names the rule too.
        assert re.search(rf"login rejected \(status 0x0200\).*\[{re.escape(section)}: ", target.log_text()[mark:])
    finally:
        api(target, "DELETE", "strict/demo/")


def _session_violations(d: Daemon, tsih: int) -> list[dict[str, Any]]:
    return list(api(d, "GET", f"sessions/{tsih}/")["violations"])


def test_reserved_task_attribute(target: Daemon) -> None:
    c = R.login_session(target.host, target.port, target.iqn)
    cmd = c.scsi_pdu(R.read10(0, 1), read_len=512)
    cmd.attr = 5
    c.send(cmd)
    assert c.complete(cmd).status == 0  # default: taken as SIMPLE
    api(target, "PUT", "strict/demo/")  # applies to the live session at once
    try:
        cmd = c.scsi_pdu(R.read10(0, 1), read_len=512)
        cmd.attr = 6
        c.send(cmd)
        rej = c.expect(P.Reject)
        assert rej.reason == P.RejectReason.INVALID_PDU_FIELD
        assert c.scsi(R.read10(0, 1), read_len=512).status == 0  # its CmdSN was consumed
        v = _session_violations(target, c.tsih)[-1]
        assert (v["section"], v["action"], v["strict"]) == ("RFC 7143 11.3.1", "Reject (invalid pdu field)", True)
        assert "task attributes 5-7 are reserved" in v["rule"] and "attr=6" in v["pdu"]
        c.logout()
    finally:
        api(target, "DELETE", "strict/demo/")


def test_nop_out_answers(target: Daemon, strict: None) -> None:
    with R.login_session(target.host, target.port, target.iqn) as c:
        # A NOP-Out claiming to answer a ping the target never sent.
        c.send(P.NopOut(itt=P.RESERVED_TAG, ttt=0x1234, cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True))
        assert c.expect(P.Reject).reason == P.RejectReason.INVALID_PDU_FIELD
        # A one-way NOP-Out (ITT 0xffffffff) without the I bit.
        c.send(P.NopOut(itt=P.RESERVED_TAG, cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=False))
        assert c.expect(P.Reject).reason == P.RejectReason.PROTOCOL_ERROR
        sections = [(v["section"], v["strict"]) for v in _session_violations(target, c.tsih)]
        assert sections == [("RFC 7143 11.18.2", True), ("RFC 7143 11.18.1", True)]
        c.logout()
    api(target, "DELETE", "strict/demo/")
    with R.login_session(target.host, target.port, target.iqn) as c:  # the default mode: both ignored
        c.send(P.NopOut(itt=P.RESERVED_TAG, ttt=0x1234, cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=True))
        c.send(P.NopOut(itt=P.RESERVED_TAG, cmdsn=c.cmdsn, expstatsn=c.expstatsn, immediate=False))
        assert c.nop().itt  # the next PDU is the answer to this ping: nothing came before it
        assert _session_violations(target, c.tsih) == []
        c.logout()


def test_default_mode_rejects_and_check_conditions_cite_the_rule(target: Daemon) -> None:
    with R.login_session(target.host, target.port, target.iqn) as c:
        c.send(P.SnackRequest(type=0, itt=P.RESERVED_TAG, expstatsn=c.expstatsn))
        assert c.expect(P.Reject).reason == P.RejectReason.COMMAND_NOT_SUPPORTED
        assert c.scsi(bytes([0xEE]) + bytes(9)).status == 2  # no such opcode
        assert c.scsi(R.read16(1 << 40, 1), read_len=512).status == 2  # past the end
        r = c.scsi(R.inquiry(alloc=96, evpd=0, page=0x80))  # a page code with EVPD=0
        assert r.status == 2
        got = {v["section"]: v for v in _session_violations(target, c.tsih)}
        assert "SNACK" in got["RFC 7143 11.16"]["rule"] and got["RFC 7143 11.16"]["action"].startswith("Reject")
        assert "INVALID COMMAND OPERATION CODE" in got["SPC-4 4.5.6"]["rule"]
        assert "LOGICAL BLOCK ADDRESS OUT OF RANGE" in got["SBC-3 4.5"]["rule"]
        # The sense-key-specific field pointer says which CDB byte was wrong, and what it held.
        assert got["SPC-4 4.5.2.4.2"]["rule"] == "INVALID FIELD IN CDB: CDB byte 2 (= 0x80)"
        assert got["SPC-4 4.5.2.4.2"]["action"] == "CHECK CONDITION 05/24/00"
        assert not any(v["strict"] for v in got.values())
        # A unit attention is the logical unit's news, not the initiator's fault.
        assert all("29/00" not in v["action"] for v in got.values())
        c.logout()


def test_libiscsi_logs_in_by_default_but_not_on_a_strict_target(target: Daemon, strict: None) -> None:
    """With credentials in its URL libiscsi starts with a security stage; when the target
    settles on AuthMethod=None it repeats InitiatorName/TargetName/SessionType in the
    operational stage."""
    url = target.url(0, user="someone", secret="some-secret-12")
    out = subprocess.run(["iscsi-inq", url], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    v = last_login_violation(target)
    assert v["section"] == "RFC 7143 6.3" and "declared once, in the first request" in v["rule"], v
    api(target, "DELETE", "strict/demo/")
    out = subprocess.run(["iscsi-inq", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_cli_strict_and_violations(target: Daemon) -> None:
    out = cli(target, "strict", "on", "demo")
    assert out.returncode == 0 and target.iqn in out.stdout, out.stderr
    assert target.iqn in cli(target, "strict", "list").stdout
    c, res = login(target, operational={"InitiatorName": R.INITIATOR})
    c.close()
    assert res.status == 0x0200
    out = cli(target, "violations")
    assert out.returncode == 0 and "RFC 7143 6.3" in out.stdout and "login 0x0200" in out.stdout, out.stdout
    assert cli(target, "strict", "off", "demo").returncode == 0
    assert api(target, "GET", "strict/") == {"targets": []}
    assert cli(target, "strict", "on", "nosuch").returncode == 1
