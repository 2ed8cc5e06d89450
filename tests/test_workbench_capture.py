"""PDU capture: tshark decodes a capture of a whole session (login, text, SCSI command, R2T,
Data-Out, Data-In, response, TMF, NOP and logout) with the right opcodes and fields; the
bytes captured are exactly the bytes that crossed the socket; scope, snaplen and the ring
bound hold; the CLI drives it; libiscsi's login captured and opened in tshark."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import rawclient as R
from support.daemon import Daemon, RestError
from support.workbench import api, cli, daemon, download_capture, tshark_fields

P = R.P
OTHER = "iqn.2026-11.org.pyscsi-target.test:other"

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark (Debian tshark) decodes the captures")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("capture"), clean_log=True) as d:
        yield d


class Recording(R.RawClient):
    """A raw initiator that keeps every byte it received (to compare with the capture)."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.received = bytearray()
        real = self.sock

        class Sock:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def recv(s, n: int) -> bytes:  # noqa: N805 - a proxy
                data = real.recv(n)
                self.received += data
                return data

        self.sock = Sock()  # type: ignore[assignment]


def num(text: str) -> int:
    """A number as tshark prints a field (decimal or 0x hex)."""
    return int(text, 0)


def full_session(d: Daemon, initiator: str = R.INITIATOR) -> Recording:
    c = Recording(d.host, d.port, initiator=initiator)
    assert c.login(d.iqn, operational={"InitialR2T": "Yes", "ImmediateData": "No"}).ok
    c.clear_unit_attentions()
    assert c.text([("SendTargets", "All")])["TargetName"] == [d.iqn]
    c.nop(b"ping")
    data = os.urandom(8192)
    assert c.scsi(R.write10(64, 16), data=data).status == 0  # SCSI command, R2T, Data-Out, response
    assert c.scsi(R.read10(64, 16), read_len=8192).data == data  # Data-In with status
    assert c.tmf(P.TmfFunction.ABORT_TASK, rtt=0x7777, refcmdsn=c.cmdsn - 1).response == P.TmfResponse.NO_SUCH_TASK
    c.logout()
    return c


def test_tshark_decodes_a_whole_session(target: Daemon, tmp_path: Path) -> None:
    cap = api(target, "POST", "captures/", {"initiator": R.INITIATOR})
    c = full_session(target)
    api(target, "POST", f"captures/{cap['id']}/stop/")
    pcap = download_capture(target, cap["id"], tmp_path / "session.pcapng")
    api(target, "DELETE", f"captures/{cap['id']}/")
    rows = tshark_fields(pcap, "iscsi.opcode", "iscsi.initiatortasktag", "iscsi.cmdsn", "iscsi.statsn",
                         "iscsi.keyvalue", "iscsi.r2tsn", "iscsi.desireddatalength", "iscsi.bufferOffset",
                         "iscsi.datasn", "iscsi.scsidata.S", "iscsi.scsiresponse.status",
                         "iscsi.taskmanfun.function", "iscsi.taskmanfun.response", "iscsi.logout.reason",
                         "iscsi.pingdata", "scsi_sbc.opcode", "iscsi.tsih")
    ops = [int(v, 16) for r in rows for v in r["iscsi.opcode"].split(",")]
    for opcode, name in ((0x03, "login request"), (0x23, "login response"), (0x04, "text request"),
                         (0x24, "text response"), (0x01, "SCSI command"), (0x31, "R2T"), (0x05, "Data-Out"),
                         (0x25, "Data-In"), (0x21, "SCSI response"), (0x02, "TMF request"), (0x22, "TMF response"),
                         (0x00, "NOP-Out"), (0x20, "NOP-In"), (0x06, "logout request"), (0x26, "logout response")):
        assert opcode in ops, f"no {name} ({opcode:#04x}) decoded: {ops}"

    def first(opcode: int) -> dict[str, str]:
        return next(r for r in rows if int(r["iscsi.opcode"].split(",")[0], 16) == opcode)

    login = first(0x03)
    assert f"InitiatorName={R.INITIATOR}" in login["iscsi.keyvalue"]
    assert f"TargetName={target.iqn}" in login["iscsi.keyvalue"]
    assert any(num(r["iscsi.tsih"] or "0") == c.tsih for r in rows if r["iscsi.opcode"] == "0x23")
    assert "SendTargets=All" in first(0x04)["iscsi.keyvalue"]
    assert f"TargetName={target.iqn}" in first(0x24)["iscsi.keyvalue"]
    r2t = first(0x31)
    assert [num(r2t[f]) for f in ("iscsi.r2tsn", "iscsi.desireddatalength", "iscsi.bufferOffset")] == [0, 8192, 0]
    writes = [r for r in rows if "0x2a" in r["scsi_sbc.opcode"].split(",")]
    assert writes, "WRITE(10) not decoded as SCSI"
    data_out = first(0x05)
    assert num(data_out["iscsi.bufferOffset"]) == 0 and num(data_out["iscsi.datasn"]) == 0
    data_in = first(0x25)
    assert data_in["iscsi.scsidata.S"] in ("1", "True") and num(data_in["iscsi.scsiresponse.status"]) == 0
    assert num(first(0x02)["iscsi.taskmanfun.function"]) == 1  # ABORT TASK
    assert num(first(0x22)["iscsi.taskmanfun.response"]) == 1  # task does not exist
    assert first(0x00)["iscsi.pingdata"].replace(":", "") == b"ping".hex()
    assert num(first(0x06)["iscsi.logout.reason"]) == 0
    # No malformed or unreassembled PDU anywhere.
    bad = subprocess.run(["tshark", "-r", str(pcap), "-Y", "_ws.malformed || _ws.expert.severity >= error"],
                         capture_output=True, text=True, check=True).stdout
    assert not bad.strip(), bad


def _stream(pcap: Path, src_port: int) -> bytes:
    """The TCP payload one side sent, in sequence order, from the capture."""
    rows = tshark_fields(pcap, "tcp.seq_raw", "tcp.payload", display_filter=f"tcp.srcport == {src_port}")
    out = bytearray()
    for r in sorted(rows, key=lambda r: int(r["tcp.seq_raw"])):
        out += bytes.fromhex(r["tcp.payload"].replace(":", ""))
    return bytes(out)


def test_the_capture_holds_exactly_what_crossed_the_socket(target: Daemon, tmp_path: Path) -> None:
    cap = api(target, "POST", "captures/", {"initiator": R.INITIATOR, "real_ports": True})
    c = full_session(target)
    api(target, "POST", f"captures/{cap['id']}/stop/")
    pcap = download_capture(target, cap["id"], tmp_path / "exact.pcapng")
    api(target, "DELETE", f"captures/{cap['id']}/")
    assert _stream(pcap, target.port) == bytes(c.received)
    # The synthesised TCP checksums verify.
    out = subprocess.run(["tshark", "-r", str(pcap), "-o", "tcp.check_checksum:TRUE", "-o",
                          "ip.check_checksum:TRUE", "-Y", "tcp.checksum.status == 0 || ip.checksum.status == 0"],
                         capture_output=True, text=True, check=True).stdout
    assert not out.strip(), out


def test_scope_snaplen_and_ring(target: Daemon, tmp_path: Path) -> None:
    mine = api(target, "POST", "captures/", {"initiator": OTHER, "snaplen": 16})
    ring = api(target, "POST", "captures/", {"target": "demo", "limit": "64KB"})
    full_session(target)  # not OTHER: only the target-scoped capture sees it
    full_session(target, initiator=OTHER)
    for _ in range(4):
        with R.login_session(target.host, target.port, target.iqn, initiator=OTHER) as x:
            x.scsi(R.read10(0, 256), read_len=128 << 10)
            x.logout()
    caps = {k["id"]: k for k in api(target, "GET", "captures/")}
    assert caps[mine["id"]]["connections"] == 5 and caps[ring["id"]]["connections"] == 6
    assert caps[ring["id"]]["evicted"] > 0 and caps[ring["id"]]["size"] <= 64 << 10
    pcap = download_capture(target, mine["id"], tmp_path / "snap.pcapng")
    # Truncated PDUs keep their headers (and 16 data bytes): tshark still decodes every Data-In.
    rows = tshark_fields(pcap, "iscsi.opcode", "iscsi.datasegmentlength", "frame.cap_len", "frame.len",
                         display_filter="iscsi.opcode == 0x25")
    assert len(rows) >= 5 and any(int(r["frame.cap_len"]) < int(r["frame.len"]) for r in rows)
    assert {r["iscsi.datasegmentlength"] for r in rows} >= {"8192", "131072"}
    assert R.INITIATOR not in subprocess.run(["tshark", "-r", str(pcap), "-V"], capture_output=True, text=True,
                                             check=True).stdout
    for k in (mine, ring):
        api(target, "DELETE", f"captures/{k['id']}/")
    assert not {mine["id"], ring["id"]} & {k["id"] for k in api(target, "GET", "captures/")}


def test_cli_trace(target: Daemon, tmp_path: Path) -> None:
    out = cli(target, "trace", "start", "--target", "demo", "--ring", "1MB")
    assert out.returncode == 0, out.stderr
    cap_id = int(out.stdout.split()[1])
    with R.login_session(target.host, target.port, target.iqn) as c:
        c.scsi(R.read10(0, 8), read_len=4096)
        c.logout()
    assert "running" in cli(target, "trace", "list").stdout
    assert cli(target, "trace", "stop", str(cap_id)).returncode == 0
    dest = tmp_path / "cli.pcapng"
    out = cli(target, "trace", "get", str(cap_id), "-o", str(dest))
    assert out.returncode == 0, out.stderr
    rows = tshark_fields(dest, "iscsi.opcode")
    assert {"0x03", "0x23", "0x01", "0x25", "0x06", "0x26"} <= {r["iscsi.opcode"].split(",")[0] for r in rows}
    assert cli(target, "trace", "rm", str(cap_id)).returncode == 0
    assert cli(target, "trace", "get", str(cap_id), "-o", str(dest)).returncode == 1


def test_libiscsi_login_captured(target: Daemon, tmp_path: Path) -> None:
    """The README's third example: capture a libiscsi login and open it in tshark."""
    cap = api(target, "POST", "captures/", {"target": "demo"})
    out = subprocess.run(["iscsi-inq", "-i", "iqn.2026-11.org.pyscsi-target.test:libiscsi", target.url(0)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pcap = download_capture(target, cap["id"], tmp_path / "libiscsi.pcapng")
    api(target, "DELETE", f"captures/{cap['id']}/")
    summary = subprocess.run(["tshark", "-r", str(pcap)], capture_output=True, text=True, check=True).stdout
    assert "Login Command" in summary and "Login Response (Success)" in summary, summary
    assert "Inquiry" in summary and "Logout Command" in summary, summary


def test_capture_needs_a_known_target(target: Daemon) -> None:
    with pytest.raises(RestError) as e:
        api(target, "POST", "captures/", {"target": "nosuch"})
    assert e.value.status == 400 and "target" in e.value.body
