"""Login-stage negative cases against the real daemon, each with its RFC 7143 status
(section 11.13.5), while a parallel session keeps doing verified I/O.

After a login reject the target must close the connection (RFC 7143 6.2/11.13.5); every
case checks that too.
"""

from __future__ import annotations

import itertools
import random

import pytest
from support import rawclient as R
from support.background import BackgroundIO
from support.daemon import Daemon

USER, SECRET = "neg-user", "negsecret-12345"
PEER, PEER_SECRET = "neg-target", "negtarget-54321"
ALLOWED = "iqn.2026-11.org.pyscsi-target.test:allowed-only"


class Env:
    def __init__(self, d: Daemon, bg: BackgroundIO, chap_iqn: str, mutual_iqn: str, locked_iqn: str) -> None:
        self.d, self.bg = d, bg
        self.chap_iqn, self.mutual_iqn, self.locked_iqn = chap_iqn, mutual_iqn, locked_iqn
        self._hosts = itertools.count(2)

    def client(self, **kw: object) -> R.RawClient:
        # Each from its own loopback address: the CHAP failures of one case must not put the
        # next case's correct login under the target's per-address backoff (issue 10).
        n = next(self._hosts)
        return R.RawClient(self.d.host, self.d.port, source=f"127.0.{n // 250}.{n % 250}", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("negative-login")).start()
    bg = None
    try:
        d.add_auth(2, USER, SECRET, PEER, PEER_SECRET)
        chap = d.add_target("chap", auth_type="CHAP", auth_group=2)
        mutual = d.add_target("mutual", auth_type="CHAP Mutual", auth_group=2)
        locked = d.add_target("locked", initiators=ALLOWED)
        bg = BackgroundIO(d.host, d.port, d.iqn).start()
        yield Env(d, bg, chap, mutual, locked)
        bg.stop()
        assert not bg.errors, bg.errors
        # Rejected logins are warnings; nothing may be an error or a traceback.
    finally:
        if bg is not None:
            bg.stop()
        d.stop()


def rejected(env: Env, c: R.RawClient, out: R.LoginOutcome, status: int) -> None:
    assert out.status == status, f"expected login status {status:#06x}, got {out.status:#06x} {out.keys}"
    last = out.responses[-1]
    assert last.transit == 0 or last.status_class != 0
    c.wait_closed(timeout=5)  # the target closes the connection after a login reject
    c.close()


@pytest.fixture(autouse=True)
def parallel_session_keeps_working(env: Env):
    before, mark = env.bg.ops, env.d.log_mark()
    yield
    env.bg.check(before)
    errors = env.d.errors_since(mark)
    assert not errors, "daemon logged errors during this test:\n" + "\n".join(errors[:30])


def test_chap_correct_secret_logs_in(env: Env) -> None:
    with env.client() as c:
        out = c.login(env.chap_iqn, chap=(USER, SECRET))
        assert out.ok and out.keys.get("AuthMethod") == "CHAP" and c.tsih != 0
        c.clear_unit_attentions()
        c.logout()


def test_wrong_chap_secret_is_0201(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.chap_iqn, chap=(USER, "wrong-secret-00")), 0x0201)
    log = env.d.log_text()
    assert "wrong-secret-00" not in log and SECRET not in log


def test_unknown_chap_user_is_0201(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.chap_iqn, chap=("nobody", SECRET)), 0x0201)


def test_chap_target_without_chap_offer_is_0201(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.chap_iqn), 0x0201)


def test_mutual_target_refuses_one_way_chap(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.mutual_iqn, chap=(USER, SECRET)), 0x0201)


def test_mutual_chap_succeeds_and_target_proves_itself(env: Env) -> None:
    with env.client() as c:
        out = c.login(env.mutual_iqn, chap=(USER, SECRET), mutual=(PEER, PEER_SECRET))  # verifies CHAP_N/CHAP_R
        assert out.ok and out.keys.get("CHAP_N") == PEER
        c.logout()


def test_reflected_chap_challenge_is_refused(env: Env) -> None:
    # Mutual CHAP where the initiator sends back the target's own challenge: answering it
    # would let an attacker use the target as an oracle (RFC 7143 12.1.3).
    c = env.client()
    rsp = c.login_exchange([("InitiatorName", R.INITIATOR), ("SessionType", "Normal"),
                            ("TargetName", env.mutual_iqn), ("AuthMethod", "CHAP")], csg=0, nsg=1, transit=False)
    assert rsp.status_class == 0
    rsp = c.login_exchange([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
    keys = dict(R.P.parse_text(rsp.data))
    ident, challenge = R._int_value(keys["CHAP_I"]), R._hexval(keys["CHAP_C"])
    answer = R.chap_response(5, ident, SECRET.encode(), challenge)
    rsp = c.login_exchange([("CHAP_N", USER), ("CHAP_R", "0x" + answer.hex()), ("CHAP_I", str(ident)),
                            ("CHAP_C", keys["CHAP_C"])], csg=0, nsg=1, transit=True)
    assert (rsp.status_class, rsp.status_detail) == (0x02, 0x01), rsp
    assert "CHAP_R" not in dict(R.P.parse_text(rsp.data))
    c.wait_closed(timeout=5)
    c.close()


def test_unknown_target_is_0203(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.d.basename() + ":no-such-target"), 0x0203)


def test_forbidden_initiator_is_0202(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.locked_iqn), 0x0202)
    with env.client(initiator=ALLOWED) as ok:
        assert ok.login(env.locked_iqn).ok
        ok.logout()


def test_forbidden_target_hidden_from_sendtargets(env: Env) -> None:
    with env.client() as c:
        assert c.login(discovery=True).ok
        names = c.text([("SendTargets", "All")]).get("TargetName", [])
        assert env.d.iqn in names and env.locked_iqn not in names
        c.logout()


def test_missing_initiator_name_is_0207(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(env.d.iqn, send_initiator_name=False), 0x0207)


def test_missing_target_name_on_normal_session_is_0207(env: Env) -> None:
    c = env.client()
    rejected(env, c, c.login(None), 0x0207)


def test_unsupported_version_is_0205(env: Env) -> None:
    c = env.client()
    req = c.login_pdu([("InitiatorName", R.INITIATOR), ("TargetName", env.d.iqn)], csg=0, nsg=1, transit=True)
    req.version_min = req.version_max = 1  # RFC 7143 is version 0x00
    c.send(req)
    rsp = c.expect(R.P.LoginResponse)
    assert (rsp.status_class, rsp.status_detail) == (0x02, 0x05), rsp
    c.wait_closed(timeout=5)
    c.close()


def test_scsi_command_before_login_completes_is_020b(env: Env) -> None:
    c = env.client()
    rsp = c.login_exchange([("InitiatorName", R.INITIATOR), ("SessionType", "Normal"), ("TargetName", env.d.iqn),
                            ("AuthMethod", "None")], csg=0, nsg=1, transit=False)
    assert rsp.status_class == 0
    # Still in the security stage: a SCSI READ now is "invalid during login" (RFC 7143 11.13.5).
    c.send(c.scsi_pdu(R.read10(0, 1), read_len=512))
    got = c.wait_closed(timeout=5)
    assert got and isinstance(got[0], R.P.LoginResponse), got
    assert (got[0].status_class, got[0].status_detail) == (0x02, 0x0B), got[0]
    c.close()


def test_scsi_command_as_first_pdu_is_refused(env: Env) -> None:
    c = env.client()
    c.send(c.scsi_pdu(R.read10(0, 1), read_len=512))
    got = c.wait_closed(timeout=5)
    # Either a login reject (0x020b) or a plain drop; never data.
    assert all(isinstance(p, R.P.LoginResponse) and p.status_class == 0x02 for p in got), got
    c.close()


def test_oversized_login_pdu_is_rejected(env: Env) -> None:
    c = env.client()
    pairs = [("InitiatorName", R.INITIATOR), ("TargetName", env.d.iqn), ("X-com.example.pad", "a" * 9000)]
    c.send(c.login_pdu(pairs, csg=0, nsg=1, transit=True))
    got = c.wait_closed(timeout=5)
    assert all(isinstance(p, R.P.LoginResponse) and p.status_class == 0x02 for p in got), got
    c.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_before_login_dropped(env: Env, seed: int) -> None:
    rng = random.Random(seed)
    c = env.client()
    if seed == 0:
        # 7 bytes are not even a BHS: the target waits for more; a close must be handled quietly.
        c.send_bytes(rng.randbytes(7))
        c.close()
        return
    # 64 KiB covers any AHS length a random BHS can claim, so the target sees a whole header.
    c.send_bytes(rng.randbytes(64 * 1024))
    got = c.wait_closed(timeout=10)
    assert all(isinstance(p, R.P.LoginResponse) and p.status_class == 0x02 for p in got), got
    c.close()


def test_discovery_chap_required_by_portal(env: Env) -> None:
    env.d.set_discovery_auth("CHAP", 2)
    try:
        c = env.client()
        rejected(env, c, c.login(discovery=True), 0x0201)
        c = env.client()
        rejected(env, c, c.login(discovery=True, chap=(USER, "wrong-secret-00")), 0x0201)
        with env.client() as c:
            assert c.login(discovery=True, chap=(USER, SECRET)).ok
            assert env.d.iqn in c.text([("SendTargets", "All")]).get("TargetName", [])
            c.logout()
        # Normal sessions to an open target are not affected by the portal's discovery auth.
        with R.login_session(env.d.host, env.d.port, env.d.iqn) as c:
            c.logout()
    finally:
        env.d.set_discovery_auth("None", None)


def test_login_after_all_that_still_works(env: Env) -> None:
    with R.login_session(env.d.host, env.d.port, env.d.iqn) as c:
        r = c.scsi(R.inquiry(), read_len=96)
        assert r.status == 0 and r.data[8:16] == b"PYSCSI  "
        c.logout()
