"""Backoff after CHAP failures (issue 10, defect 7): the schedule, and the login machine refusing
responses unevaluated while an initiator name or a source address backs off."""

from __future__ import annotations

import logging

import pytest
from test_login_flows import SECRET, Client, do_chap, first_keys, policy, status

from pyscsi_target.iscsi.auth_backoff import MAX_KEYS, AuthBackoff, login_keys
from pyscsi_target.iscsi.login import LoginMachine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schedule_free_failures_then_doubling_to_the_cap() -> None:
    clock = Clock()
    b = AuthBackoff(free=3, base=1.0, cap=8.0, clock=clock)
    keys = login_keys("iqn.x:a", "10.0.0.1")
    assert [b.failed(keys) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.wait(keys) == 0.0
    assert [b.failed(keys) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.wait(keys) == 8.0 and b.failures == 8
    clock.now += 8.0
    assert b.wait(keys) == 0.0  # the pause is over (the next failure pauses 8 s again)


def test_name_and_address_are_separate_keys() -> None:
    clock = Clock()
    b = AuthBackoff(free=0, base=5.0, clock=clock)
    b.failed(login_keys("iqn.x:guesser", "10.0.0.1"))
    assert b.wait(login_keys("iqn.x:other", "10.0.0.1")) == 5.0  # same host, another name
    assert b.wait(login_keys("IQN.X:GUESSER", "10.0.0.2")) == 5.0  # same name (case-blind), another host
    assert b.wait(login_keys("iqn.x:other", "10.0.0.2")) == 0.0


def test_success_resets_the_name_not_the_address() -> None:
    clock = Clock()
    b = AuthBackoff(free=1, base=2.0, clock=clock)
    keys = login_keys("iqn.x:a", "10.0.0.1")
    b.failed(keys)
    b.failed(keys)
    b.succeeded(keys)
    assert b.failures_of(("name", "iqn.x:a")) == 0 and b.successes == 1
    # A host holding one valid credential cannot wipe its address's record between guesses.
    assert b.failures_of(("address", "10.0.0.1")) == 2
    assert b.failed(login_keys("iqn.x:rotated", "10.0.0.1")) == 4.0


def test_failures_are_forgotten_after_a_quiet_period() -> None:
    clock = Clock()
    b = AuthBackoff(free=0, base=1.0, forget=60.0, clock=clock)
    keys = login_keys("iqn.x:a", "10.0.0.1")
    b.failed(keys)
    b.failed(keys)
    clock.now += 61.0
    assert b.wait(keys) == 0.0 and b.failed(keys) == 1.0  # counted from one again


def test_the_table_is_bounded() -> None:
    b = AuthBackoff(clock=Clock())
    for i in range(MAX_KEYS + 100):
        b.failed((("address", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),))
    assert len(b._entries) == MAX_KEYS


def chap_login(m: LoginMachine, secret: str) -> int:
    c = Client(m)
    c.send(first_keys(AuthMethod="CHAP"), csg=0)
    r, _ = do_chap(c, 5, secret=secret)
    return status(r)


def test_login_machine_refuses_unevaluated_while_backing_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    b = AuthBackoff(free=2, base=1.0, clock=clock)

    def machine() -> LoginMachine:
        return LoginMachine(policy("CHAP"), backoff=b, peer="10.1.2.3:51000", peer_ip="10.1.2.3")

    assert [chap_login(machine(), "wrong-secret-1") for _ in range(3)] == [0x0201] * 3
    assert b.failures == 3 and b.wait(login_keys("iqn.1994-05.com.redhat:client1", "10.1.2.3")) == 1.0
    assert chap_login(machine(), SECRET) == 0x0201  # the right secret, not even checked
    assert b.throttled == 1 and b.failures == 3
    clock.now += 1.0
    assert chap_login(machine(), SECRET) == 0  # checked again once the pause is over
    assert b.successes == 1
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("login")]
    assert any("login rejected (status 0x0201)" in line for line in lines)
    assert any("not checked for 1s" in line for line in lines)
    assert all(line.startswith("10.1.2.3:51000: ") for line in lines)  # every line names the peer
    assert SECRET not in caplog.text
