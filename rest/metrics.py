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

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
PATH = "/metrics"


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup_routes(app: web.Application) -> None:
    engine = app[SERVICE_KEY].engine
    app[METRICS_KEY] = Metrics(engine if isinstance(engine, Engine) else None, app[MONITOR_KEY].board)
    app.router.add_get(PATH, metrics)
