"""Password guessing on the REST API (issue 10, defect 7, REST half): after a few failures an
address is closed for a growing time (429 + Retry-After, the credentials not even checked),
every 401 is logged with the peer (rate-limited), counters for metrics; /v9 CHAP secrets
have a floor the HNAS document's own example meets."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

import pytest
from support.rest_harness import ADMIN, FN, HN, aio, basic, harness

from rest.auth_throttle import FREE_FAILURES, MAX_BLOCK, AuthThrottle
from rest.common import THROTTLE_KEY


def test_backoff_grows_and_success_clears() -> None:
    now = [0.0]
    t = AuthThrottle(clock=lambda: now[0])
    for _ in range(FREE_FAILURES):
        t.failed("10.0.0.1")
        assert t.retry_after("10.0.0.1") == 0  # a few mistakes cost nothing
    waits = []
    for _ in range(10):
        t.failed("10.0.0.1")
        waits.append(t.retry_after("10.0.0.1"))
        now[0] += waits[-1]  # the guesser waits exactly as long as told
    assert waits[:4] == [1, 2, 4, 8] and waits[-1] == MAX_BLOCK
    assert t.retry_after("10.0.0.2") == 0  # other addresses are not affected
    assert t.blocked_now() == 0
    t.failed("10.0.0.1")
    assert t.blocked_now() == 1 and t.failures == FREE_FAILURES + 11 and t.throttled >= 10
    t.succeeded("10.0.0.1")
    assert t.retry_after("10.0.0.1") == 0


@aio
async def test_guessing_is_throttled_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with harness(tmp_path) as h:
        assert h.client is not None
        throttle = h.client.app[THROTTLE_KEY]
        throttle.clock = lambda: 1000.0  # time stands still: the counts below are exact on a slow machine
        wrong = basic(ADMIN[0], "guess")
        statuses = []
        with caplog.at_level(logging.INFO, logger="rest.app"):
            started = time.monotonic()
            for _ in range(200):
                status, body, headers = await h.call("GET", f"{FN}/target/", auth=False, headers=wrong)
                statuses.append(status)
            elapsed = time.monotonic() - started
        assert statuses[:FREE_FAILURES + 1] == [401] * (FREE_FAILURES + 1)
        assert statuses.count(401) == FREE_FAILURES + 1 and statuses.count(429) == 200 - FREE_FAILURES - 1
        assert elapsed < 10  # refused fast, not by holding connections
        assert int(headers["Retry-After"]) >= 1 and set(body) == {"error"} and "Too many failed logins" in body["error"]
        # The right password is refused too while the address is closed (no oracle) ...
        status, _, _ = await h.call("GET", f"{FN}/target/")
        assert status == 429
        # ... and HNAS clients get their error shape.
        status, body, _ = await h.call("GET", HN, auth=False, headers=wrong)
        assert status == 429 and "errorMsg" in body
        # One log line for the burst (with the peer), not one per request.
        lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
        assert len(lines) == 1 and "127.0.0.1" in lines[0], lines
        assert throttle.failures == FREE_FAILURES + 1 and throttle.throttled >= 190 and throttle.blocked_now() == 1


@aio
async def test_requests_without_credentials_do_not_lock_out(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for _ in range(20):  # a browser's first request, a probe: no credentials, no guess
            assert (await h.call("GET", f"{FN}/target/", auth=False))[0] == 401
        assert (await h.call("GET", f"{FN}/target/"))[0] == 200


@aio
async def test_hnas_secret_floor(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        status, body, _ = await h.call("POST", HN, {"alias": "a", "enableAuthentication": True, "secret": "x"})
        assert status == 400 and "at least 10 characters" in body["errorMsg"], body
        status, body, _ = await h.call("POST", HN, {"alias": "b", "enableAuthentication": True, "secret": "secret123"})
        assert status == 400, body
        # the document's own example
        status, body, _ = await h.call("POST", HN, {"alias": "c", "enableAuthentication": True, "secret": "secret1234"})
        assert status == 201 and body["iscsiTarget"]["secret"] == "secret1234", body


@aio
async def test_basic_header_garbage_counts_as_a_failure(tmp_path: Path) -> None:
    """Malformed Basic credentials are a presented credential like any other."""
    async with harness(tmp_path) as h:
        assert h.client is not None
        h.client.app[THROTTLE_KEY].clock = lambda: 1000.0
        bad = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
        for _ in range(FREE_FAILURES + 1):
            assert (await h.call("GET", f"{FN}/target/", auth=False, headers=bad))[0] == 401
        assert (await h.call("GET", f"{FN}/target/", auth=False, headers=bad))[0] == 429
