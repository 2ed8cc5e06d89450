"""The daemon-wide write-buffer budget (issue 10, defect 1): fair shares, caps, refusals, and the
transport's per-burst allocation under it.  End-to-end attacks: tests/test_write_budget_attack.py."""

from __future__ import annotations

import random

from test_connection_ffp import BS, Harness, data_out, rw10

from pyscsi_target.iscsi import pdu as P
from pyscsi_target.iscsi.write_budget import WriteBudget

MiB = 1 << 20


def test_floor_is_guaranteed_while_others_hold_the_rest() -> None:
    b = WriteBudget(256 * MiB, floor=16 * MiB)
    attackers = [b.account() for _ in range(6)]
    held = sum(64 * MiB for a in attackers for _ in range(4) if a.take(64 * MiB))
    assert held <= 256 * MiB and b.used == held
    victim = b.account()
    assert b.floor == 16 * MiB  # min(16 MiB, 256 MiB / (2 * 7))
    assert all(victim.take(MiB) for _ in range(16))  # its whole floor, whatever the others hold
    assert not victim.take(MiB)  # beyond the floor: nothing left to borrow
    assert victim.refused == 1 and b.refused >= 1
    victim.give(4 * MiB)
    assert victim.take(4 * MiB)


def test_borrowing_beyond_the_floor_and_the_session_cap() -> None:
    b = WriteBudget(256 * MiB, floor=16 * MiB)
    a = b.account()
    assert b.session_cap == 64 * MiB
    assert a.take(64 * MiB)  # one maximal command, borrowed beyond the floor
    assert not a.take(1)  # the cap
    other = b.account()
    assert other.take(64 * MiB) and b.used == 128 * MiB
    a.give(64 * MiB)
    assert a.used == 0 and b.used == 64 * MiB


def test_borrowing_leaves_the_floors_of_idle_sessions() -> None:
    b = WriteBudget(128 * MiB, floor=16 * MiB, session_cap=128 * MiB)
    idle = [b.account() for _ in range(3)]
    busy = b.account()
    assert b.floor == 16 * MiB
    assert not busy.take(128 * MiB - 3 * 16 * MiB + 1)  # would eat into the idle sessions' floors
    assert busy.take(128 * MiB - 3 * 16 * MiB)
    assert all(a.take(16 * MiB) for a in idle)  # each still gets its floor
    assert b.used == b.total


def test_closing_an_account_returns_everything_once() -> None:
    b = WriteBudget(256 * MiB)
    a = b.account()
    assert a.take(10 * MiB)
    a.close()
    assert b.used == 0 and b.sessions == 0
    a.give(10 * MiB)  # a command finishing after its session ended: already given back
    assert b.used == 0 and not a.take(1)


def test_random_take_give_keeps_the_books() -> None:
    rnd = random.Random(7)
    b = WriteBudget(64 * MiB, floor=8 * MiB, session_cap=32 * MiB)
    accounts = [b.account() for _ in range(5)]
    held: list[tuple[int, int]] = []
    for _ in range(5000):
        if held and rnd.random() < 0.45:
            i, n = held.pop(rnd.randrange(len(held)))
            accounts[i].give(n)
        else:
            i = rnd.randrange(len(accounts))
            n = rnd.choice([4096, 65536, MiB, 4 * MiB, 16 * MiB])
            if accounts[i].take(n):
                held.append((i, n))
        assert b.used == sum(a.used for a in accounts) == sum(n for _i, n in held)
        assert all(a.used <= b.session_cap for a in accounts)
        assert b.used <= b.total  # no session joined late: the budget is never exceeded


# --- the transport: memory follows the data, burst by burst ------------------------------


def test_write_without_data_allocates_nothing() -> None:
    h = Harness(initial_r2t=True, immediate_data=False, max_burst_length=4 * BS)
    c = h.cmd(rw10(0x2A, 0, 16), write=True, edtl=16 * BS)
    (r2t,) = h.send(c)
    assert isinstance(r2t, P.R2T) and r2t.desired_length == 4 * BS
    cmd = h.session.tasks[c.itt]
    assert cmd.reserved == 16 * BS and h.session.writes.used == 16 * BS  # admitted whole...
    assert [s.buf for s in cmd.seqs.values()] == [None] and cmd.parts == []  # ...but nothing allocated
    assert h.send(data_out(c.itt, r2t.ttt, 0, 0, bytes(BS), False)) == []
    (seq,) = cmd.seqs.values()
    assert seq.buf is not None and len(seq.buf) == 4 * BS  # the first burst, once its data came


def test_bursts_are_handed_to_the_scsi_layer_as_they_are() -> None:
    h = Harness(initial_r2t=False, immediate_data=True, first_burst_length=2 * BS, max_burst_length=3 * BS)
    payload = bytes(range(256)) * (8 * BS // 256)
    c = h.cmd(rw10(0x2A, 0, 8), write=True, edtl=8 * BS, data=payload[:BS], final=False)
    (r2t,) = h.send(c)  # immediate data, then unsolicited up to 2 blocks; R2T for blocks 2..4
    assert (r2t.offset, r2t.desired_length) == (2 * BS, 3 * BS)
    assert h.send(data_out(c.itt, P.RESERVED_TAG, 0, BS, payload[BS : 2 * BS], True)) == []
    (r2t2,) = h.send(data_out(c.itt, r2t.ttt, 0, 2 * BS, payload[2 * BS : 5 * BS], True))
    (rsp,) = h.send(data_out(c.itt, r2t2.ttt, 0, 5 * BS, payload[5 * BS :], True))
    assert rsp.status == 0
    (task,) = h.dev.submitted
    assert isinstance(task.data_out, list) and [len(v) for v in task.data_out] == [2 * BS, 3 * BS, 3 * BS]
    assert b"".join(task.data_out) == payload
    assert h.session.writes.used == 0  # given back once the SCSI layer answered
