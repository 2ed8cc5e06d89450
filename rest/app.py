"""The management HTTP application: both façades, authentication, OpenAPI document.

``make_app(service, store)`` builds the aiohttp application; ``start_api`` serves it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from math import ceil
from pathlib import Path

from aiohttp import web
from yarl import URL

from pyscsi_target.alerts import SpaceMonitor
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore, admin_credentials, is_disk_full
from pyscsi_target.log_limit import LogLimit

from . import freenas, hnas, metrics, native, openapi, workbench
from .auth_throttle import AuthThrottle
from .common import ADMIN_KEY, ALLOWED_VS_KEY, MONITOR_KEY, SERVICE_KEY, STORE_KEY, THROTTLE_KEY, json_response

DOC_KEY: web.AppKey[openapi.ApiDoc] = web.AppKey("openapi", openapi.ApiDoc)

log = logging.getLogger(__name__)
_full_log = LogLimit()
_auth_log = LogLimit(60.0)

REALM = "pyscsi-target"
# Everything under these prefixes needs credentials, except the public paths: a resource
# added under /api/ (a new namespace, say) is protected without being listed anywhere.
PROTECTED_PREFIXES = ("/api/", "/v9/", "/metrics")
PUBLIC_PATHS = frozenset({"/api/openapi.json"})
MAX_BODY = 1 << 20  # 1 MiB: every legitimate body is tiny; larger ones get 413
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Writes whose body is not JSON: a raw disk image (``pyscsi-target extent import``).
BINARY_BODY_PATHS = frozenset({f"{native.BASE}/extents/import"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_v9(request: web.Request) -> bool:
    return request.path.startswith("/v9/")


def _unauthorized(request: web.Request) -> web.Response:
    body = (
        {"errorMsg": "Unauthorized - the credentials or API key were either missing or invalid"}
        if _is_v9(request)
        else {"error": "Authentication credentials were not provided or are invalid."}
    )
    return json_response(body, 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'})


def _presented_credentials(request: web.Request) -> bool:
    h = request.headers
    return "Authorization" in h or "X-Api-Key" in h or "X-Subsystem-User" in h


def _auth_failed(request: web.Request, throttle: AuthThrottle, peer: str) -> web.Response:
    """401, logged with the peer (at most one line per peer and interval, with the count of
    the rest).  Only a request that presented credentials counts towards the back-off: a
    client's first, credential-less request (a browser's, for the challenge) is no guess."""
    if _presented_credentials(request):
        n = throttle.failed(peer)
        _auth_log.log(log, logging.WARNING, peer, "API authentication failed from %s: %s %s (%d failure(s) in a row)",
                      peer, request.method, request.path, n)
    else:
        _auth_log.log(log, logging.INFO, ("none", peer), "API request without credentials from %s: %s %s",
                      peer, request.method, request.path)
    return _unauthorized(request)


def _write_refusal(request: web.Request) -> tuple[int, str] | None:
    """Why a write must not run, if it must not: a browser sending it from another site
    (cached Basic credentials would otherwise do the foreign page's bidding), or a body that
    is not JSON (a cross-site form can send text/plain without a CORS preflight; JSON
    cannot).  Non-browser clients send neither Origin nor Sec-Fetch-Site, and JSON bodies."""
    if request.method not in WRITE_METHODS:
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return 403, f"Cross-site requests may not change the configuration (Sec-Fetch-Site: {site[:40]})."
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(request, origin):
        return 403, f"Cross-origin requests may not change the configuration (Origin: {origin[:80]})."
    if request.body_exists and not _json_media_type(request.content_type):
        if request.content_type == "application/octet-stream" and request.path.rstrip("/") in BINARY_BODY_PATHS:
            return None
        return 415, "Send the request body as application/json (Content-Type: application/json)."
    return None


def _same_origin(request: web.Request, origin: str) -> bool:
    try:
        return URL(origin).origin() == request.url.origin()
    except ValueError:  # "null" (a sandboxed page, a file: URL) or garbage: not ours
        return False


def _json_media_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _error(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in the body shape of the API the request is for."""
    if _is_v9(request):
        resp = hnas.error_response(message, status)
    elif request.path.startswith(native.BASE):
        resp = native.error(status, message)
    else:
        resp = json_response({"error": message}, status)
    resp.headers.update(headers or {})
    return resp


def _insufficient_storage(request: web.Request, exc: BaseException) -> web.Response:
    """507 (RFC 4918 11.5): the state disk is full, the change was not saved (nothing half
    done: the transaction rolled back); the same request succeeds once space returns."""
    _full_log.log(log, logging.ERROR, "full", "the state disk is full: %s %s refused with 507 (%s)",
                  request.method, request.path, exc)
    return _error(request, 507, "Insufficient storage: the disk holding the configuration database is full; "
                                "the change was not saved.")


def _check_password(app: web.Application, user: str, password: str) -> bool:
    admin_user, admin_password = app[ADMIN_KEY]
    ok_user = hmac.compare_digest(user.encode("utf-8", "surrogateescape"), admin_user.encode())
    ok_pw = hmac.compare_digest(password.encode("utf-8", "surrogateescape"), admin_password.encode())
    return ok_user and ok_pw


def authenticate(request: web.Request) -> list[int] | None:
    """The virtual servers the credentials may use ([] = all); None if not authenticated."""
    app = request.app
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(":")
        return [] if sep and _check_password(app, user, password) else None
    if _is_v9(request):
        key = request.headers.get("X-Api-Key")
        if key:
            return app[STORE_KEY].check_api_key(key)
        sub_user = request.headers.get("X-Subsystem-User")
        sub_pw = request.headers.get("X-Subsystem-Password")
        if sub_user is not None and sub_pw is not None:
            return [] if _check_password(app, sub_user, sub_pw) else None
    return None


_SLASHES = re.compile(r"//+")


@web.middleware
async def merge_slashes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Serve ``/a//b`` as ``/a/b``, as nginx (``merge_slashes on``) did in front of FreeNAS.

    opensvc's driver POSTs to ``.../target//``: FreeNAS served it, so we do.  Not a redirect
    (a POST would not survive one in every client): the request is routed again on the merged
    path, and everything after this (authentication included) sees only the merged path."""
    raw = request.rel_url.raw_path
    if "//" not in raw:
        return await handler(request)
    url = URL.build(path=_SLASHES.sub("/", raw), query_string=request.rel_url.raw_query_string, encoded=True)
    merged = request.clone(rel_url=url)
    match_info = await request.app.router.resolve(merged)
    match_info.add_app(request.app)
    match_info.freeze()
    merged._match_info = match_info  # what Application._handle does once a route is resolved
    return await api_middleware(merged, match_info.handler)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication for the two APIs and a JSON body for every error (never an HTML 500)."""
    protected = request.path.startswith(PROTECTED_PREFIXES) and request.path not in PUBLIC_PATHS
    if protected:
        throttle = request.app[THROTTLE_KEY]
        peer = request.remote or "unknown"
        wait = throttle.retry_after(peer)
        if wait > 0:  # before the credentials are even looked at: guessing costs time
            return _error(request, 429, f"Too many failed logins from {peer}: try again in {ceil(wait)} s.",
                          {"Retry-After": str(ceil(wait))})
        allowed = authenticate(request)
        if allowed is None:
            return _auth_failed(request, throttle, peer)
        throttle.succeeded(peer)
        request[ALLOWED_VS_KEY] = allowed
        refusal = _write_refusal(request)
        if refusal is not None:
            return _error(request, *refusal)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if _is_v9(request):
            if exc.status == 404:
                return hnas.not_found()
            return json_response({"errorCode": hnas.ERR_GENERIC, "errorMsg": exc.reason}, exc.status, headers)
        return json_response({"error": exc.reason}, exc.status, headers)
    except Exception as exc:
        if is_disk_full(exc):
            return _insufficient_storage(request, exc)
        log.exception("unhandled error serving %s %s", request.method, request.path)
        if _is_v9(request):
            return hnas.server_error("Internal error")
        return json_response({"error": "Internal server error."}, 500)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    # FreeNAS (tastypie) answers with Vary: Accept; caches between clients and us rely on it.
    vary = response.headers.get("Vary")
    if not vary:
        response.headers["Vary"] = "Accept"
    elif "accept" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Accept"


async def _openapi_handler(request: web.Request) -> web.Response:
    return json_response(request.app[DOC_KEY].document())


async def _start_monitor(app: web.Application) -> None:
    app[MONITOR_KEY].start()


async def _stop_monitor(app: web.Application) -> None:
    await app[MONITOR_KEY].stop()


def make_app(
    service: ConfigService,
    store: ConfigStore | None = None,
    *,
    extent_roots: list[Path | str] | None = None,
    admin: tuple[str, str] | None = None,
    monitor: SpaceMonitor | None = None,
) -> web.Application:
    """The REST application.

    ``store`` defaults to ``service.store``; ``extent_roots``, when given, replaces the
    service's extent roots; ``admin`` (user, password) defaults to ``admin_credentials()``;
    ``monitor`` (the space thresholds' watcher, whose alerts ``system/alert`` shows) defaults
    to one over ``service``, checking periodically while the application runs.
    """
    store = store or service.store
    if extent_roots is not None:
        service.set_extent_roots(extent_roots)
    app = web.Application(middlewares=[merge_slashes, api_middleware], client_max_size=MAX_BODY)
    app[SERVICE_KEY] = service
    app[STORE_KEY] = store
    app[ADMIN_KEY] = admin or admin_credentials(store.state_dir)
    app[MONITOR_KEY] = monitor or SpaceMonitor(lambda: service.model, lambda: service.extent_roots)
    app[THROTTLE_KEY] = AuthThrottle()  # its counters are the metrics of failed logins
    app.on_startup.append(_start_monitor)
    app.on_cleanup.append(_stop_monitor)
    app.on_response_prepare.append(_on_prepare)
    app.router.add_get("/api/openapi.json", _openapi_handler)
    doc = app[DOC_KEY] = openapi.new_doc()
    freenas.setup_routes(app, doc)
    hnas.setup_routes(app, doc)
    native.setup_routes(app, doc)
    workbench.setup_routes(app, doc)
    metrics.setup_routes(app, doc)
    return app


async def start_api(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve ``app``; the caller stops it with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    log.info("REST API listening on %s://%s:%d", "https" if ssl_context else "http", host, port)
    return runner


def ssl_context_from_files(cert: Path | str, key: Path | str | None = None) -> ssl.SSLContext:
    """A server TLS context for ``--api-cert``/``--api-key-file``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
