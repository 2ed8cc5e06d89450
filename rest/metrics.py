"""``GET /metrics``: Prometheus's text exposition format (pyscsi_target/metrics.py).

It needs the API's credentials like everything under ``/api/``: the label values name
targets, initiators and extents, which someone who can merely reach the API port should
not learn.  Prometheus scrapes with ``basic_auth`` in its scrape configuration.
"""

from __future__ import annotations

from aiohttp import web

from pyscsi_target.metrics import CONTENT_TYPE, Metrics
from pyscsi_target.server.engine import Engine

from .auth_throttle import AuthThrottle
from .common import MONITOR_KEY, SERVICE_KEY, THROTTLE_KEY
from .openapi import ApiDoc, Operation, Response

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
PATH = "/metrics"


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    engine = app[SERVICE_KEY].engine
    m = app[METRICS_KEY] = Metrics(engine if isinstance(engine, Engine) else None, app[MONITOR_KEY].board)
    _add_guard_sources(m, engine if isinstance(engine, Engine) else None, app[THROTTLE_KEY])
    doc.add(app, Operation("GET", PATH, metrics, "metrics", "metrics", {
        200: Response("Prometheus text exposition format", {"type": "string"}, media_type="text/plain"),
        401: Response("Missing or wrong credentials", {"type": "object"})},
        summary="Prometheus metrics (scrape with basic_auth)"))


def _add_guard_sources(m: Metrics, engine: Engine | None, throttle: AuthThrottle) -> None:
    """The counters the brute-force, admission and write-budget guards keep (issue 10)."""
    m.add_source("rest_auth_failures_total", "REST logins refused with 401", lambda: throttle.failures)
    m.add_source("rest_auth_throttled_total", "REST requests answered 429 while their address backs off",
                 lambda: throttle.throttled)
    if engine is None:
        return
    chap, adm, wb = engine.auth_backoff, engine.admission, engine.write_budget
    m.add_source("chap_responses_total", "CHAP responses by outcome (throttled: refused unchecked, backing off)",
                 lambda: {("failed",): chap.failures, ("throttled",): chap.throttled,
                          ("succeeded",): chap.successes}, labels=("outcome",))
    m.add_source("connections_refused_total", "Connections closed by admission control, by reason",
                 lambda: {("per_address",): adm.refused_per_address, ("evicted",): adm.evicted},
                 labels=("reason",))
    m.add_source("accept_paused_total", "Times the portals stopped accepting to keep descriptors for the API",
                 lambda: adm.accept_paused)
    m.add_source("accept_errors_total", "accept() failures (EMFILE, ENFILE...)", lambda: adm.accept_errors)
    m.add_source("write_buffer_bytes", "WRITE data reserved by all sessions", lambda: wb.used, kind="gauge")
    m.add_source("write_buffer_budget_bytes", "The daemon-wide budget for WRITE data", lambda: wb.total,
                 kind="gauge")
    m.add_source("write_buffer_refused_total", "WRITE commands refused with TASK SET FULL (budget spent)",
                 lambda: wb.refused)
