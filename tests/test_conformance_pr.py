"""Persistent reservations across initiators and across a daemon crash (issue 3, point 5).

Raw PERSISTENT RESERVE IN/OUT CDBs from sessions with different initiator names (each its own
I_T nexus): each sees the other's registrations and reservation, gets RESERVATION CONFLICT
where SPC-4 5.13 / table 53 say, and the unit attentions SPC-4 names reach the other nexuses.
With APTPL=1 the registrations and the reservation survive a SIGKILL and restart (so they were
persisted before the PR OUT was acknowledged) and still bind the same initiator ports.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from support.daemon import DEMO_IQN, Daemon
from support.rawclient import RawClient, ScsiResult, read10, write10

GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
TUR = bytes(6)  # TEST UNIT READY
WE, EA, WE_RO = 1, 3, 5  # PR types: write exclusive, exclusive access, WE registrants only
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT = 0, 1, 2, 3, 4
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES = 0, 1, 2
KEY_A, KEY_B, KEY_C = 0xA1A1A1A1A1A1A1A1, 0xB2B2B2B2B2B2B2B2, 0xC3C3C3C3C3C3C300
NAMES = {
    "A": ("iqn.2026-11.org.pyscsi-target.test:pr-a", bytes.fromhex("80000000aa01")),
    "B": ("iqn.2026-11.org.pyscsi-target.test:pr-b", bytes.fromhex("80000000bb02")),
    "C": ("iqn.2026-11.org.pyscsi-target.test:pr-c", bytes.fromhex("80000000cc03")),
}
# Unit attention ASC/ASCQ (SPC-4 annex F).
RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED, REGISTRATIONS_PREEMPTED = (0x2A, 0x03), (0x2A, 0x04), (0x2A, 0x05)


def prout(c: RawClient, sa: int, key: int = 0, sakey: int = 0, rtype: int = 0, aptpl: bool = False) -> ScsiResult:
    params = struct.pack(">QQIBBH", key, sakey, 0, 0x01 if aptpl else 0, 0, 0)
    return c.scsi(struct.pack(">BBBHIB", 0x5F, sa, rtype, 0, len(params), 0), data=params)


def prin(c: RawClient, sa: int, alloc: int = 1024) -> bytes:
    r = c.scsi(struct.pack(">BB5sHB", 0x5E, sa, b"", alloc, 0), read_len=alloc)
    assert r.status == GOOD, f"PRIN {sa}: status {r.status:#x} sense {r.sense.hex()}"
    return r.data


def read_keys(c: RawClient) -> tuple[int, list[int]]:
    data = prin(c, READ_KEYS)
    gen, length = struct.unpack_from(">II", data)
    return gen, sorted(struct.unpack_from(f">{length // 8}Q", data, 8))


def read_reservation(c: RawClient) -> tuple[int, int] | None:
    """(holder key, type) or None."""
    data = prin(c, READ_RESERVATION)
    _, length = struct.unpack_from(">II", data)
    if length == 0:
        return None
    assert length == 16, data.hex()
    key, scope_type = struct.unpack_from(">Q", data, 8)[0], data[21]
    assert scope_type >> 4 == 0, "LU_SCOPE expected"
    return key, scope_type & 0x0F


def ptpl_active(c: RawClient) -> bool:
    return bool(prin(c, REPORT_CAPABILITIES, 8)[3] & 0x01)


def ok(r: ScsiResult, what: str) -> None:
    assert r.status == GOOD, f"{what}: status {r.status:#x} sense {r.sense.hex()}"


def conflict(r: ScsiResult, what: str) -> None:
    assert r.status == RESERVATION_CONFLICT, f"{what}: expected RESERVATION CONFLICT, got {r.status:#x} {r.sense.hex()}"


def expect_ua(c: RawClient, asc: tuple[int, int], what: str) -> None:
    r = c.scsi(TUR)
    assert (r.status, r.sense_key, r.asc_ascq) == (CHECK_CONDITION, 0x6, asc), \
        f"{what}: expected UNIT ATTENTION {asc}, got status {r.status:#x} sense {r.sense.hex()}"
    c.clear_unit_attentions()


def no_ua(c: RawClient, what: str) -> None:
    r = c.scsi(TUR)
    assert r.status == GOOD, f"{what}: unexpected status {r.status:#x} sense {r.sense.hex()}"


def session(stack: ExitStack, d: Daemon, who: str) -> RawClient:
    name, isid = NAMES[who]
    c = stack.enter_context(RawClient(d.host, d.port, initiator=name, isid=isid))
    out = c.login(DEMO_IQN)
    assert out.ok, f"login {who}: {out.status:#06x}"
    c.clear_unit_attentions()
    return c


@pytest.fixture
def daemon_pr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("pr"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


BLOCK = b"\x3c" * 512


def test_pr_two_initiators_and_aptpl_survives_sigkill(daemon_pr: Daemon) -> None:
    d = daemon_pr
    with ExitStack() as stack:
        a, b, c = (session(stack, d, w) for w in "ABC")
        ok(prout(a, REGISTER, sakey=KEY_A, aptpl=True), "A REGISTER")
        ok(prout(b, REGISTER, sakey=KEY_B, aptpl=True), "B REGISTER")
        ga, keys_a = read_keys(a)
        gb, keys_b = read_keys(b)
        assert keys_a == keys_b == sorted([KEY_A, KEY_B]) and ga == gb, (keys_a, keys_b, ga, gb)
        assert read_keys(c)[1] == keys_a, "an unregistered nexus reads the same keys"
        assert ptpl_active(a)

        ok(prout(a, RESERVE, key=KEY_A, rtype=WE), "A RESERVE WE")
        assert read_reservation(b) == (KEY_A, WE), "B must see A's reservation"
        assert read_reservation(c) == (KEY_A, WE)
        ok(prout(a, RESERVE, key=KEY_A, rtype=WE), "holder re-reserving the same type")
        conflict(prout(a, RESERVE, key=KEY_A, rtype=EA), "holder changing the type")
        conflict(prout(b, RESERVE, key=KEY_B, rtype=WE), "B reserving while A holds")
        conflict(prout(b, REGISTER, key=0x1234, sakey=0x5678), "B REGISTER with a wrong key")
        conflict(prout(c, RESERVE, key=0x77, rtype=WE), "unregistered C reserving")
        # Write Exclusive: only the holder writes; everyone reads.
        ok(a.scsi(write10(100, 1), data=BLOCK), "holder A WRITE")
        conflict(b.scsi(write10(100, 1), data=b"\0" * 512), "registered B WRITE under WE")
        conflict(c.scsi(write10(100, 1), data=b"\0" * 512), "unregistered C WRITE under WE")
        for who, cl in (("B", b), ("C", c)):
            r = cl.scsi(read10(100, 1), read_len=512)
            assert r.status == GOOD and r.data == BLOCK, f"{who} READ under WE: {r.status:#x}"
        conflict(b.scsi(bytes([0x16, 0, 0, 0, 0, 0])), "SPC-2 RESERVE(6) while a PR is held")
        # A burst of key changes from C, each acknowledged: the kill right after the last
        # GOOD must find exactly the last key (commits are durable and in order).
        key_c = 0
        for i in range(1, 21):
            ok(prout(c, REGISTER, key=key_c, sakey=KEY_C + i, aptpl=True), f"C REGISTER #{i}")
            key_c = KEY_C + i
        keys_before = read_keys(a)[1]
        assert keys_before == sorted([KEY_A, KEY_B, key_c])

    # Crash: the PR state must already be on disk when PR OUT returned GOOD.
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    assert d.stop() == -signal.SIGKILL
    d2 = Daemon(d.state_dir, port=d.port, api_port=d.api_port)
    d2.start()
    try:
        with ExitStack() as stack:
            a, b, c = (session(stack, d2, w) for w in "ABC")
            assert read_keys(b)[1] == keys_before, "registrations lost across the restart"
            ok(prout(c, REGISTER, key=key_c, sakey=0, aptpl=True), "C unregisters")
            assert read_reservation(b) == (KEY_A, WE), "reservation lost across the restart"
            assert ptpl_active(a), "PTPL_A must stay set after a restart"
            # Same initiator port names (name + ISID) => the same holder and registrants.
            ok(a.scsi(write10(101, 1), data=BLOCK), "holder A WRITE after restart")
            conflict(b.scsi(write10(101, 1), data=b"\0" * 512), "B WRITE after restart")
            conflict(prout(b, RESERVE, key=KEY_B, rtype=WE), "B RESERVE after restart")

            # PREEMPT: B's registration goes, B gets REGISTRATIONS PREEMPTED; A none.
            ok(prout(a, PREEMPT, key=KEY_A, sakey=KEY_B, rtype=WE), "A PREEMPT B")
            expect_ua(b, REGISTRATIONS_PREEMPTED, "B after being preempted")
            no_ua(a, "the preempting nexus")
            assert read_keys(c)[1] == [KEY_A]
            conflict(prout(b, RESERVE, key=KEY_B, rtype=WE), "preempted B reserving with its old key")
            ok(prout(a, RELEASE, key=KEY_A, rtype=WE), "A RELEASE")
            assert read_reservation(b) is None
            ok(b.scsi(write10(102, 1), data=BLOCK), "B WRITE after the release")
            ok(prout(a, REGISTER, key=KEY_A, sakey=0), "A unregisters")
            assert read_keys(a)[1] == []
    finally:
        d2.stop()


def test_pr_registrants_only_and_unit_attentions(daemon_pr: Daemon) -> None:
    d = daemon_pr
    with ExitStack() as stack:
        a, b, c = (session(stack, d, w) for w in "ABC")
        ok(prout(a, REGISTER, sakey=KEY_A), "A REGISTER")
        ok(prout(b, REGISTER, sakey=KEY_B), "B REGISTER")
        assert not ptpl_active(a), "no APTPL asked: PTPL_A must be clear"

        # Write Exclusive - Registrants Only: every registrant writes, others conflict.
        ok(prout(a, RESERVE, key=KEY_A, rtype=WE_RO), "A RESERVE WE_RO")
        ok(b.scsi(write10(200, 1), data=BLOCK), "registrant B WRITE under WE_RO")
        conflict(c.scsi(write10(200, 1), data=BLOCK), "unregistered C WRITE under WE_RO")
        # Releasing a registrants-only reservation: RESERVATIONS RELEASED to the other registrants.
        ok(prout(a, RELEASE, key=KEY_A, rtype=WE_RO), "A RELEASE WE_RO")
        expect_ua(b, RESERVATIONS_RELEASED, "registrant B after the release")
        no_ua(a, "the releasing nexus")
        no_ua(c, "an unregistered nexus")

        # Exclusive Access: the others cannot even read; TEST UNIT READY stays allowed.
        ok(prout(a, RESERVE, key=KEY_A, rtype=EA), "A RESERVE EA")
        conflict(b.scsi(read10(200, 1), read_len=512), "B READ under EA")
        conflict(c.scsi(read10(200, 1), read_len=512), "C READ under EA")
        no_ua(b, "TEST UNIT READY under EA")
        r = a.scsi(read10(200, 1), read_len=512)
        assert r.status == GOOD and r.data == BLOCK

        # CLEAR by B: everything goes; RESERVATIONS PREEMPTED to the other registrant A.
        ok(prout(b, CLEAR, key=KEY_B), "B CLEAR")
        expect_ua(a, RESERVATIONS_PREEMPTED, "A after B's CLEAR")
        no_ua(b, "the clearing nexus")
        assert read_keys(c)[1] == [] and read_reservation(c) is None
        ok(c.scsi(read10(200, 1), read_len=512), "C READ after CLEAR")


# SPC-4 5.13.10 (table 53 summarised for READ and WRITE): what the holder, another registrant and
# a non-registrant may do under each reservation type. "AR" types make every registrant a holder.
ACCESS = {
    # type: (registrant read, registrant write, non-registrant read, non-registrant write)
    1: (True, False, True, False),   # Write Exclusive
    3: (False, False, False, False),  # Exclusive Access
    5: (True, True, True, False),    # Write Exclusive - Registrants Only
    6: (True, True, False, False),   # Exclusive Access - Registrants Only
    7: (True, True, True, False),    # Write Exclusive - All Registrants
    8: (True, True, False, False),   # Exclusive Access - All Registrants
}


def test_pr_access_matrix_all_six_types(daemon_pr: Daemon) -> None:
    d = daemon_pr
    with ExitStack() as stack:
        a, b, c = (session(stack, d, w) for w in "ABC")
        ok(prout(a, REGISTER, sakey=KEY_A), "A REGISTER")
        ok(prout(b, REGISTER, sakey=KEY_B), "B REGISTER")
        for rtype, (reg_r, reg_w, non_r, non_w) in ACCESS.items():
            ok(prout(a, RESERVE, key=KEY_A, rtype=rtype), f"A RESERVE type {rtype}")
            holder = read_reservation(c)
            # All-registrants types report a reservation key of zero (SPC-4 6.16.3).
            assert holder == (0 if rtype in (7, 8) else KEY_A, rtype), (rtype, holder)
            ok(a.scsi(write10(300, 1), data=BLOCK), f"holder WRITE under type {rtype}")
            ok(a.scsi(read10(300, 1), read_len=512), f"holder READ under type {rtype}")
            for who, cl, can_r, can_w in (("registrant B", b, reg_r, reg_w), ("non-registrant C", c, non_r, non_w)):
                r = cl.scsi(read10(300, 1), read_len=512)
                (ok if can_r else conflict)(r, f"{who} READ under type {rtype}")
                r = cl.scsi(write10(300, 1), data=BLOCK)
                (ok if can_w else conflict)(r, f"{who} WRITE under type {rtype}")
            ok(prout(a, RELEASE, key=KEY_A, rtype=rtype), f"A RELEASE type {rtype}")
            if rtype in (5, 6, 7, 8):  # registrants-only / all-registrants: the others hear of it
                expect_ua(b, RESERVATIONS_RELEASED, f"B after the release of type {rtype}")
            no_ua(b, f"B after type {rtype}")
            no_ua(c, f"C after type {rtype}")


def test_pr_read_full_status_names_the_initiator_ports(daemon_pr: Daemon) -> None:
    d = daemon_pr
    with ExitStack() as stack:
        a, b = (session(stack, d, w) for w in "AB")
        ok(prout(a, REGISTER, sakey=KEY_A), "A REGISTER")
        ok(prout(b, REGISTER, sakey=KEY_B), "B REGISTER")
        ok(prout(a, RESERVE, key=KEY_A, rtype=WE), "A RESERVE")
        data = prin(b, 3, 4096)  # READ FULL STATUS
        _, length = struct.unpack_from(">II", data)
        found: dict[int, tuple[bool, int, str]] = {}
        pos = 8
        while pos < 8 + length:
            key = struct.unpack_from(">Q", data, pos)[0]
            flags, scope_type = data[pos + 12], data[pos + 13]
            add = struct.unpack_from(">I", data, pos + 20)[0]
            tid = data[pos + 24 : pos + 24 + add]
            assert tid[0] & 0x0F == 0x5, f"iSCSI protocol identifier expected: {tid.hex()}"
            name_len = struct.unpack_from(">H", tid, 2)[0]
            found[key] = (bool(flags & 0x01), scope_type, tid[4 : 4 + name_len].rstrip(b"\0").decode())
            pos += 24 + add
        assert set(found) == {KEY_A, KEY_B}, found
        r_holder, scope_type, port = found[KEY_A]
        assert r_holder and scope_type == WE, found
        assert port.lower() == f"{NAMES['A'][0]},i,0x{NAMES['A'][1].hex()}", port
        assert not found[KEY_B][0] and found[KEY_B][2].lower().startswith(NAMES["B"][0] + ",i,0x"), found
