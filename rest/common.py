"""Pieces shared by the two façades."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from pyscsi_target.alerts import SpaceMonitor
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore

from .auth_throttle import AuthThrottle

SERVICE_KEY: web.AppKey[ConfigService] = web.AppKey("service", ConfigService)
STORE_KEY: web.AppKey[ConfigStore] = web.AppKey("store", ConfigStore)
ADMIN_KEY: web.AppKey[tuple[str, str]] = web.AppKey("admin", tuple)
MONITOR_KEY: web.AppKey[SpaceMonitor] = web.AppKey("space_monitor", SpaceMonitor)
THROTTLE_KEY: web.AppKey[AuthThrottle] = web.AppKey("auth_throttle", AuthThrottle)
# Virtual servers the request's credentials may use ([] = all).
ALLOWED_VS_KEY: web.RequestKey[list[int]] = web.RequestKey("allowed_vs", list)


class BadJSON(Exception):
    """The request body is not JSON (or not a JSON object)."""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json", headers=headers)


async def read_object(request: web.Request, *, empty_ok: bool = True) -> dict[str, Any]:
    """The JSON object in the body; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise BadJSON("empty")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadJSON("syntax") from None
    if not isinstance(data, dict):
        raise BadJSON("not an object")
    return data


def add_route(app: web.Application, method: str, path: str, handler: Any) -> None:
    """Register ``path`` with and without its trailing slash (both are used by clients)."""
    base = path.rstrip("/")
    app.router.add_route(method, base, handler)
    app.router.add_route(method, base + "/", handler)
