"""``GET /metrics``: Prometheus's text exposition format (pyscsi_target/metrics.py).

It needs the API's credentials like everything under ``/api/``: the label values name
targets, initiators and extents, which someone who can merely reach the API port should
not learn.  Prometheus scrapes with ``basic_auth`` in its scrape configuration.
"""

from __future__ import annotations

from aiohttp import web

from pyscsi_target.metrics import CONTENT_TYPE, Metrics
from pyscsi_target.server.engine import Engine

from .common import MONITOR_KEY, SERVICE_KEY
from .openapi import ApiDoc, Operation, Response

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
PATH = "/metrics"


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    engine = app[SERVICE_KEY].engine
    app[METRICS_KEY] = Metrics(engine if isinstance(engine, Engine) else None, app[MONITOR_KEY].board)
    doc.add(app, Operation("GET", PATH, metrics, "metrics", "metrics", {
        200: Response("Prometheus text exposition format", {"type": "string"}, media_type="text/plain"),
        401: Response("Missing or wrong credentials", {"type": "object"})},
        summary="Prometheus metrics (scrape with basic_auth)"))
