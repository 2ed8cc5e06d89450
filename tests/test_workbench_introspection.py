"""Live introspection: a session's connection, CmdSN window, outstanding tasks and counters;
a logical unit's reservations, pending unit attentions per I_T nexus and ALUA state; asking
a session to log out (Async Message) and dropping its connection."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from support import rawclient as R
from support.daemon import Daemon, RestError
from support.workbench import add_rule, api, clear_rules, cli, daemon

P = R.P


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("introspection")) as d:
        yield d


def pr_out(action: int, key: int, sa_key: int = 0, rtype: int = 0) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT CDB and its 24-byte parameter list."""
    params = struct.pack(">QQ", key, sa_key) + bytes(8)
    return struct.pack(">BBBxxIB", 0x5F, action, rtype, len(params), 0), params


def test_session_in_depth(target: Daemon) -> None:
    with R.login_session(target.host, target.port, target.iqn) as c:
        add_rule(target, kind="hold", opcode=0x28)
        held = c.scsi_pdu(R.read10(16, 8), read_len=4096)
        c.send(held)
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.3)
        s = api(target, "GET", f"sessions/{c.tsih}/")
        assert (s["initiator"], s["target"], s["type"], s["strict"]) == (R.INITIATOR, target.iqn, "Normal", False)
        conn = s["connections"][0]
        assert conn["state"] == "full feature phase" and conn["peer"].startswith("127.0.0.1:")
        assert conn["local"] == f"{target.host}:{target.port}" and conn["max_xmit_data_segment_length"] == 262144
        w = s["cmdsn_window"]
        assert w["exp_cmdsn"] == c.cmdsn and w["active"] == 1 and w["max_cmdsn"] == c.maxcmdsn
        [task] = s["outstanding_tasks"]
        assert (task["itt"], task["cmdsn"], task["lun"], task["opcode"], task["state"]) == (
            held.itt, held.cmdsn, 0, 0x28, "submitted")
        assert task["age_ms"] >= 300 and task["expected_length"] == 4096
        assert s["params"]["max_burst_length"] == 262144 and s["counters"]["commands"] >= 2
        c.tmf(P.TmfFunction.ABORT_TASK, rtt=held.itt, refcmdsn=held.cmdsn)
        clear_rules(target)
        s = api(target, "GET", f"sessions/{c.tsih}/")
        assert s["outstanding_tasks"] == [] and s["counters"]["task_management"] == {"abort_task": 1}
        out = cli(target, "session", "show", str(c.tsih))
        assert out.returncode == 0 and "CmdSN window" in out.stdout and R.INITIATOR in out.stdout, out.stderr
        c.logout()
    with pytest.raises(RestError) as e:
        api(target, "GET", f"sessions/{c.tsih}/")
    assert e.value.status == 404


def test_logical_unit_state(target: Daemon) -> None:
    a = R.login_session(target.host, target.port, target.iqn)
    b = R.RawClient(target.host, target.port, initiator="iqn.2026-11.org.pyscsi-target.test:second")
    assert b.login(target.iqn).ok  # b's POWER ON RESET unit attention stays pending (no TUR yet)
    try:
        cdb, params = pr_out(0x00, 0, 0xABCDEF)  # REGISTER
        assert a.scsi(cdb, data=params).status == 0
        cdb, params = pr_out(0x01, 0xABCDEF, rtype=1)  # RESERVE, write exclusive
        assert a.scsi(cdb, data=params).status == 0
        [lu] = [x for x in api(target, "GET", "logical-units/") if x["name"] == "demo"]
        assert lu["mapped"] == [{"target": target.iqn, "lun": 0}]
        pr = lu["persistent_reservations"]
        port_a = f"{R.INITIATOR},i,0x{a.isid.hex()}"
        assert pr["registrations"] == [{"initiator_port": port_a, "relative_target_port": 1, "key": "0000000000abcdef"}]
        assert pr["reservation"]["type_name"] == "write exclusive" and pr["reservation"]["initiator_port"] == port_a
        assert pr["generation"] == 1
        uas = {u["initiator_port"]: [p["name"] for p in u["pending"]] for u in lu["unit_attentions"]}
        assert uas == {f"iqn.2026-11.org.pyscsi-target.test:second,i,0x{b.isid.hex()}": ["power on reset"]}
        assert lu["alua"] == [{"target": target.iqn, "groups": [{"group": 1, "state": "active/optimized"}]}]
        assert len(lu["nexuses"]) == 2
        out = cli(target, "lu-state")
        assert out.returncode == 0 and "write exclusive" in out.stdout, out.stdout
        cdb, params = pr_out(0x03, 0xABCDEF)  # CLEAR
        assert a.scsi(cdb, data=params).status == 0
    finally:
        a.close()
        b.close()


def test_ask_a_session_to_log_out_and_drop_one(target: Daemon) -> None:
    with R.login_session(target.host, target.port, target.iqn) as c:
        assert api(target, "POST", f"sessions/{c.tsih}/logout/", {"within": 9}) == {"tsih": c.tsih, "within": 9}
        c.nop()
        assert [(e.event, e.param3) for e in c.async_events] == [(P.AsyncEvent.LOGOUT_REQUEST, 9)]
        c.logout()
    with R.login_session(target.host, target.port, target.iqn) as c:
        assert cli(target, "session", "drop", str(c.tsih), "--announce").returncode == 0
        got = c.wait_closed(5)
        assert [(p.event, p.param2) for p in got if isinstance(p, P.AsyncMessage)] == [
            (P.AsyncEvent.DROP_ALL_CONNECTIONS, 2)]
    with pytest.raises(RestError) as e:
        api(target, "POST", "sessions/9999/logout/", {})
    assert e.value.status == 404
    with pytest.raises(RestError) as e:
        api(target, "POST", f"sessions/{c.tsih}/logout/", {"within": 0})
    assert e.value.status == 400
