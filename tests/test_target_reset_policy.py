"""TARGET WARM / COLD RESET from an initiator (issue 10, defect 2).

One unauthenticated PDU used to end every session of the target, at will.  Now a target
refuses both with "function authorization failed" (RFC 7143 11.6.1 response 6) and nothing
happens, unless its native settings ``allow_warm_reset`` / ``allow_cold_reset`` say otherwise
(``/api/pyscsi/v1/targets/{id}/``); the FreeNAS view does not show them.
"""

from __future__ import annotations

import pytest
from support import rawclient as R
from support.daemon import Daemon, RestError

P = R.P
NATIVE = "/api/pyscsi/v1"
AUTHORIZATION_FAILED = 6


def demo_target(d: Daemon) -> dict[str, object]:
    (t,) = d.rest("GET", "targets/", prefix=NATIVE)
    return t  # type: ignore[no-any-return]


def test_resets_refused_by_default_then_allowed(daemon: Daemon) -> None:
    t = demo_target(daemon)
    assert t["iqn"] == daemon.iqn and t["allow_warm_reset"] is False and t["allow_cold_reset"] is False
    (freenas,) = daemon.rest("GET", "target/")
    assert not any("reset" in k for k in freenas)  # not a FreeNAS field

    a = R.login_session(daemon.host, daemon.port, daemon.iqn)
    b = R.login_session(daemon.host, daemon.port, daemon.iqn)
    try:
        mark = daemon.log_mark()
        for fn in (P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.TARGET_COLD_RESET):
            assert a.tmf(fn).response == AUTHORIZATION_FAILED
        for c in (a, b):  # both sessions live on, with no reset unit attention
            assert c.scsi(R.tur()).status == 0
        refused = [line for line in daemon.log_text()[mark:].splitlines() if "refused" in line]
        assert refused and all("127.0.0.1:" in line for line in refused), refused

        t = daemon.rest("PATCH", f"targets/{t['id']}/", {"allow_cold_reset": True}, prefix=NATIVE)
        assert t["allow_cold_reset"] is True and t["allow_warm_reset"] is False
        assert daemon.rest("GET", f"targets/{t['id']}/", prefix=NATIVE) == t
        assert a.tmf(P.TmfFunction.TARGET_WARM_RESET).response == AUTHORIZATION_FAILED
        assert a.tmf(P.TmfFunction.TARGET_COLD_RESET).response == 0  # allowed: today's behaviour
        a.wait_closed(10)
        b.wait_closed(10)
    finally:
        a.close()
        b.close()


def test_native_target_settings_validation(daemon: Daemon) -> None:
    t = demo_target(daemon)
    with pytest.raises(RestError) as bad:
        daemon.rest("PATCH", f"targets/{t['id']}/", {"allow_warm_reset": "perhaps"}, prefix=NATIVE)
    assert bad.value.status == 400 and "allow_warm_reset" in bad.value.body
    for method in ("GET", "PATCH"):
        with pytest.raises(RestError) as missing:
            daemon.rest(method, "targets/999/", {}, prefix=NATIVE)
        assert missing.value.status == 404
    exported = daemon.rest("GET", "config/", prefix=NATIVE)
    assert exported["targets"][0]["allow_warm_reset"] is False  # kept by export / import
