"""CHAP guessing against the daemon (issue 10, defect 7): after three failures from an address
(or under an initiator name) the target stops checking CHAP responses for a while, doubling
the pause with each further failure; the guesser cannot tell, other hosts are unaffected, and
every failure line in the log names the peer."""

from __future__ import annotations

import time

from support import rawclient as R
from support.daemon import Daemon

USER, SECRET = "guarded", "guardedsecret1"


def attempt(d: Daemon, iqn: str, source: str, initiator: str, secret: str) -> int:
    with R.RawClient(d.host, d.port, source=source, initiator=initiator) as c:
        return c.login(iqn, chap=(USER, secret)).status


def test_guessing_is_throttled_per_address_and_name(daemon: Daemon) -> None:
    daemon.add_auth(3, USER, SECRET)
    iqn = daemon.add_target("guarded", auth_type="CHAP", auth_group=3)
    guesser, name = "127.0.0.50", "iqn.2026-11.org.pyscsi-target.test:guesser"
    mark = daemon.log_mark()
    assert [attempt(daemon, iqn, guesser, name, f"wrong-secret-{i}") for i in range(4)] == [0x0201] * 4
    # Backing off now: even the right secret is refused, exactly as a wrong one.
    assert attempt(daemon, iqn, guesser, name, SECRET) == 0x0201
    assert attempt(daemon, iqn, guesser, "iqn.2026-11.org.pyscsi-target.test:renamed", SECRET) == 0x0201
    assert attempt(daemon, iqn, "127.0.0.51", name, SECRET) == 0x0201  # the name backs off too
    # Another host under another name is not affected.
    assert attempt(daemon, iqn, "127.0.0.52", "iqn.2026-11.org.pyscsi-target.test:bystander", SECRET) == 0
    time.sleep(1.2)  # the first pause is 1 s
    assert attempt(daemon, iqn, guesser, name, SECRET) == 0
    lines = [line for line in daemon.log_text()[mark:].splitlines() if "WARNING" in line]
    assert any("login rejected (status 0x0201)" in line for line in lines)
    assert any("not checked for 1s" in line for line in lines)
    assert all("127.0.0.5" in line for line in lines), lines  # every failure line names the peer
    assert SECRET not in daemon.log_text()
