"""What the Linux kernel initiator does that libiscsi's tools do not, replayed with raw PDUs
against the real daemon so it is caught without booting a guest (issue 6, item 3).

- login with open-iscsi's key set (obsolete IFMarker/OFMarker keys included);
- unsolicited data: InitialR2T=No, immediate data + unsolicited Data-Out up to
  FirstBurstLength, then R2Ts of MaxBurstLength for the rest, one outstanding at a time;
- a deep queue (open-iscsi's cmds_max) with CmdSN windowing;
- its NOP-Out pings (ITT set, no data, immediate);
- SCSI error handling on timeouts: ABORT TASK for a command stuck waiting for data,
  LOGICAL UNIT RESET, TARGET WARM RESET (refused unless the target allows it), then logout;
- sd_mod's scan sequence (REPORT LUNS, VPD pages, READ CAPACITY(16), MODE SENSE caching page).

The target's own NOP-In keepalive is covered in-process by test_engine_loopback.py (its
interval is 30 s in the daemon).
"""

from __future__ import annotations

import os
import struct

import pytest
from support import rawclient as R
from support.daemon import Daemon

P = R.P
KERNEL_INITIATOR = "iqn.2026-11.org.pyscsi-target.test:linux-like"
# The operational keys open-iscsi 2.1.8 offers (iscsid.conf defaults), markers included.
OPEN_ISCSI_KEYS = {
    "HeaderDigest": "None", "DataDigest": "None", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
    "IFMarker": "No", "OFMarker": "No", "ErrorRecoveryLevel": "0", "InitialR2T": "No", "ImmediateData": "Yes",
    "MaxBurstLength": "16776192", "FirstBurstLength": "262144", "MaxOutstandingR2T": "1", "MaxConnections": "1",
    "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes", "MaxRecvDataSegmentLength": "262144",
}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("kernel-paths")).start()
    try:
        yield d
        d.assert_clean_log()
    finally:
        d.stop()


def kernel_session(d: Daemon, **ops: str) -> R.RawClient:
    c = R.RawClient(d.host, d.port, initiator=KERNEL_INITIATOR)
    out = c.login(d.iqn, operational={**OPEN_ISCSI_KEYS, **ops})
    assert out.ok, f"login status {out.status:#06x}"
    for k in ("IFMarker", "OFMarker"):
        # Markers are gone from RFC 7143; RFC 3720 targets answer No, newer ones NotUnderstood.
        assert out.keys.get(k) in (None, "No", "NotUnderstood", "Irrelevant"), out.keys
    c.clear_unit_attentions()
    return c


def test_open_iscsi_key_set_negotiates(target: Daemon) -> None:
    with kernel_session(target) as c:
        assert c.params["InitialR2T"] == "No" and c.params["ImmediateData"] == "Yes"
        assert int(c.params["FirstBurstLength"]) <= 262144
        assert int(c.params["MaxBurstLength"]) <= 16776192
        assert c.params["ErrorRecoveryLevel"] == "0" and c.params["MaxConnections"] == "1"
        c.logout()


def test_unsolicited_data_then_r2t_bursts(target: Daemon) -> None:
    with kernel_session(target, MaxBurstLength="262144") as c:
        first_burst = int(c.params["FirstBurstLength"])
        max_burst = int(c.params["MaxBurstLength"])
        data = os.urandom(2 << 20)  # 2 MiB: one unsolicited burst + R2T-driven bursts
        blocks = len(data) // 512
        imm = 64 * 1024
        cmd = c.scsi_pdu(R.write10(10_000, blocks), write_len=len(data), immediate_data=data[:imm])
        cmd.final = 0  # F=0: unsolicited Data-Out PDUs follow (RFC 7143 11.3.1)
        wire = [c.encode(cmd)]
        # Unsolicited Data-Out (TTT 0xffffffff) for the rest of the first burst, F on the last.
        off, sn = imm, 0
        while off < first_burst:
            n = min(65536, first_burst - off)
            wire.append(c.encode(P.DataOut(final=int(off + n == first_burst), lun=cmd.lun, itt=cmd.itt,
                                           expstatsn=c.expstatsn, datasn=sn, offset=off, data=data[off:off + n])))
            off, sn = off + n, sn + 1
        c.send_bytes(b"".join(wire))
        expected_off = first_burst
        r2tsn = 0
        while True:
            pdu = c.recv()
            if isinstance(pdu, P.ScsiResponse):
                break
            assert isinstance(pdu, P.R2T), pdu
            assert pdu.itt == cmd.itt and pdu.r2tsn == r2tsn
            assert pdu.offset == expected_off, f"R2T offset {pdu.offset} != {expected_off}"
            assert pdu.desired_length == min(max_burst, len(data) - expected_off)
            c.send_data_out(cmd, data, pdu.offset, pdu.desired_length, ttt=pdu.ttt)
            expected_off += pdu.desired_length
            r2tsn += 1
        assert pdu.status == 0 and expected_off == len(data)
        assert r2tsn == (len(data) - first_burst + max_burst - 1) // max_burst
        r = c.scsi(R.read10(10_000, blocks), read_len=len(data))
        assert r.status == 0 and r.data == data
        c.logout()


def test_deep_queue_with_cmdsn_window(target: Daemon) -> None:
    with kernel_session(target) as c:
        window = (c.maxcmdsn - c.cmdsn + 1) & 0xFFFFFFFF
        assert 1 <= window <= 4096
        depth = min(window, 64)
        data = os.urandom(depth * 4096)
        for i in range(depth):
            assert c.scsi(R.write10(20_000 + 8 * i, 8), data=data[i * 4096:(i + 1) * 4096]).status == 0
        cmds = [c.scsi_pdu(R.read10(20_000 + 8 * i, 8), read_len=4096) for i in range(depth)]
        c.send_bytes(b"".join(c.encode(x) for x in cmds))  # all in flight at once
        got: dict[int, bytes] = {}
        while len(got) < depth:
            pdu = c.recv()
            assert isinstance(pdu, P.DataIn | P.ScsiResponse), pdu
            if isinstance(pdu, P.DataIn):
                assert pdu.offset == 0 and len(pdu.data) == 4096
                got[pdu.itt] = bytes(pdu.data)
                assert pdu.has_status and pdu.status == 0  # phase collapse
            else:
                pytest.fail(f"unexpected separate response {pdu!r}")
        for i, x in enumerate(cmds):
            assert got[x.itt] == data[i * 4096:(i + 1) * 4096]
        assert (c.maxcmdsn - c.cmdsn + 1) & 0xFFFFFFFF >= 1  # window reopened
        c.logout()


def test_nop_out_ping_without_data(target: Daemon) -> None:
    with kernel_session(target) as c:
        sn = c.cmdsn
        rsp = c.nop()
        assert rsp.ttt == P.RESERVED_TAG and len(rsp.data) == 0
        assert c.cmdsn == sn  # immediate: CmdSN not advanced
        c.logout()


def _stuck_write(c: R.RawClient, lba: int) -> P.ScsiCommand:
    cmd = c.scsi_pdu(R.write10(lba, 2048), write_len=1 << 20)
    c.send(cmd)
    r2t = c.expect(P.R2T)
    assert r2t.itt == cmd.itt
    return cmd  # the target now waits for Data-Out that never comes


def test_abort_task_for_command_waiting_for_data(target: Daemon) -> None:
    with kernel_session(target, InitialR2T="Yes", ImmediateData="No") as c:
        cmd = _stuck_write(c, 30_000)
        rsp = c.tmf(1, rtt=cmd.itt, refcmdsn=cmd.cmdsn)  # ABORT TASK
        assert rsp.response == 0, rsp  # function complete
        # The aborted task gets no SCSI Response; the session goes on.
        assert bytes(c.nop(b"after-abort").data) == b"after-abort"
        # Aborting it again: the task no longer exists.
        assert c.tmf(1, rtt=cmd.itt, refcmdsn=cmd.cmdsn).response in (0, 1)
        assert c.scsi(R.read10(30_000, 8), read_len=4096).status == 0
        c.logout()


def test_lun_reset_then_unit_attention(target: Daemon) -> None:
    with kernel_session(target, InitialR2T="Yes", ImmediateData="No") as c:
        _stuck_write(c, 31_000)
        rsp = c.tmf(5, lun=0)  # LOGICAL UNIT RESET
        assert rsp.response == 0, rsp
        r = c.scsi(R.tur())
        assert r.status == 2 and r.sense_key == 0x6 and r.asc_ascq is not None and r.asc_ascq[0] == 0x29, r.sense.hex()
        assert c.scsi(R.tur()).status == 0
        c.logout()


def test_target_warm_reset_keeps_session(target: Daemon) -> None:
    with kernel_session(target) as c:
        # Refused by default (issue 10): Linux then goes on to session recovery.
        assert c.tmf(6).response == P.TmfResponse.AUTHORIZATION_FAILED
        (t,) = target.rest("GET", "targets/", prefix="/api/pyscsi/v1")
        target.rest("PATCH", f"targets/{t['id']}/", {"allow_warm_reset": True}, prefix="/api/pyscsi/v1")
        rsp = c.tmf(6)  # TARGET WARM RESET, allowed
        target.rest("PATCH", f"targets/{t['id']}/", {"allow_warm_reset": False}, prefix="/api/pyscsi/v1")
        assert rsp.response == 0, rsp
        r = c.scsi(R.tur())
        assert r.status == 2 and r.sense_key == 0x6 and r.asc_ascq is not None and r.asc_ascq[0] == 0x29
        assert c.scsi(R.tur()).status == 0
        c.logout()


def test_logout_close_session_then_target_closes(target: Daemon) -> None:
    c = kernel_session(target)
    itt = c.next_itt()
    c.send(P.LogoutRequest(reason=0, itt=itt, cid=0, cmdsn=c.cmdsn, expstatsn=c.expstatsn))
    rsp = c.expect(P.LogoutResponse)
    assert rsp.itt == itt and rsp.response == 0
    c.wait_closed(timeout=5)
    c.close()


def test_sd_scan_sequence(target: Daemon) -> None:
    with kernel_session(target) as c:
        r = c.scsi(R.report_luns(), read_len=4096)
        assert r.status == 0 and struct.unpack_from(">I", r.data)[0] >= 8
        r = c.scsi(R.inquiry(36), read_len=36)
        assert r.status == 0 and r.data[0] & 0x1F == 0
        r = c.scsi(R.inquiry(255, evpd=1, page=0x00), read_len=255)
        pages = set(r.data[4:4 + r.data[3]])
        assert {0x00, 0x80, 0x83} <= pages
        for page in sorted(pages):
            r = c.scsi(R.inquiry(255, evpd=1, page=page), read_len=255)
            assert r.status == 0 and r.data[1] == page
        r = c.scsi(R.inquiry(255, evpd=1, page=0x89), read_len=255)  # ATA information: not a SATL
        if 0x89 not in pages:
            assert r.status == 2 and r.sense_key == 0x5 and r.asc_ascq == (0x24, 0x00)
        r = c.scsi(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), read_len=32)  # RC(16)
        assert r.status == 0 and struct.unpack_from(">QI", r.data) == ((1 << 30) // 512 - 1, 512)
        r = c.scsi(bytes([0x1A, 0x08, 0x08, 0x00, 0xFF, 0x00]), read_len=255)  # MODE SENSE(6) caching, DBD
        assert r.status == 0 and r.data[4] & 0x3F == 0x08, r.data.hex()
        c.logout()


def test_final_bit_on_command_ends_unsolicited_data(target: Daemon) -> None:
    # InitialR2T=No but the command PDU has F=1: only the immediate data is unsolicited, so
    # the first R2T asks for everything after it.
    with kernel_session(target, MaxBurstLength="262144") as c:
        data = os.urandom(512 * 1024)
        imm = 8192
        cmd = c.scsi_pdu(R.write10(12_000, len(data) // 512), write_len=len(data), immediate_data=data[:imm])
        c.send(cmd)
        r2t = c.expect(P.R2T)
        assert (r2t.offset, r2t.desired_length) == (imm, min(262144, len(data) - imm))
        c.send_data_out(cmd, data, r2t.offset, r2t.desired_length, ttt=r2t.ttt)
        res = c.complete(cmd, data)
        assert res.status == 0
        assert c.scsi(R.read10(12_000, len(data) // 512), read_len=len(data)).data == data
        c.logout()


def test_session_reinstatement_same_isid_closes_old_session(target: Daemon) -> None:
    # After a timeout at ERL 0, open-iscsi logs in again with the same ISID and TSIH 0: the
    # target must reinstate (close the old session) rather than keep both (RFC 7143 6.3.5).
    old = kernel_session(target, InitialR2T="Yes", ImmediateData="No")
    _stuck_write(old, 32_000)  # something in flight on the old session
    new = R.RawClient(target.host, target.port, initiator=KERNEL_INITIATOR, isid=old.isid)
    try:
        out = new.login(target.iqn, operational=OPEN_ISCSI_KEYS)
        assert out.ok and new.tsih != old.tsih
        old.wait_closed(timeout=10)
        new.clear_unit_attentions()
        data = os.urandom(4096)
        assert new.scsi(R.write10(32_000, 8), data=data).status == 0
        assert new.scsi(R.read10(32_000, 8), read_len=4096).data == data
        new.logout()
    finally:
        old.close()
        new.close()
