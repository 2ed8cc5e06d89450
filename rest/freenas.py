"""FreeNAS v1.0 iSCSI resources (``/api/v1.0/services/iscsi/...``) over the ConfigService.

Behaviour follows what FreeNAS 9.3-11.3 did and what its clients depend on: bare JSON
arrays for lists with ``offset``/``limit`` paging, 201/200/204, partial PUT where null
leaves a value as it is, ids accepted as strings, ``{"field": ["message"]}`` errors,
409 with FreeNAS's own conflict messages.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pyscsi_target import __version__
from pyscsi_target.config.model import ConfigModel
from pyscsi_target.config.service import ConfigError, ConfigService

from .common import SERVICE_KEY, BadJSON, add_route, json_response, read_object

BASE = "/api/v1.0/services/iscsi"
_ID_RE = re.compile(r"^[0-9]{1,18}$")  # ASCII digits only: int() would take "²" or 5000 digits badly
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


@dataclasses.dataclass(frozen=True)
class Resource:
    """One FreeNAS resource: URL name, model collection, API field <-> model field map."""

    name: str
    kind: str
    label: str
    fields: dict[str, str]  # API field -> model attribute
    serialize: Callable[[ConfigModel, Any], dict[str, Any]]
    create: str
    update: str
    delete: str

    def to_model(self, body: dict[str, Any], *, drop_null: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for api_name, value in body.items():
            attr = self.fields.get(api_name)
            if attr is None:
                continue  # unknown fields (and "id") are ignored, as tastypie did
            if value is None and drop_null:
                continue
            out[attr] = value
        return out

    def errors_to_api(self, errors: dict[str, list[str]]) -> dict[str, list[str]]:
        reverse: dict[str, str] = {}
        for api_name, attr in self.fields.items():
            reverse.setdefault(attr, api_name)
        out: dict[str, list[str]] = {}
        for key, msgs in errors.items():
            out.setdefault(reverse.get(key, "__all__"), []).extend(msgs)
        return out


def _portal(model: ConfigModel, pg: Any) -> dict[str, Any]:
    return {
        "id": pg.id,
        "iscsi_target_portal_tag": pg.tag,
        "iscsi_target_portal_comment": pg.comment,
        "iscsi_target_portal_discoveryauthmethod": pg.discovery_auth_method,
        "iscsi_target_portal_discoveryauthgroup": pg.discovery_auth_group,
        "iscsi_target_portal_ips": list(pg.listen),
    }


def _initiator(model: ConfigModel, ig: Any) -> dict[str, Any]:
    return {
        "id": ig.id,
        "iscsi_target_initiator_tag": ig.tag,
        "iscsi_target_initiator_initiators": ig.initiators,
        "iscsi_target_initiator_auth_network": ig.auth_network,
        "iscsi_target_initiator_comment": ig.comment,
    }


def _authcred(model: ConfigModel, ac: Any) -> dict[str, Any]:
    return {
        "id": ac.id,
        "iscsi_target_auth_tag": ac.tag,
        "iscsi_target_auth_user": ac.user,
        "iscsi_target_auth_secret": ac.secret,
        "iscsi_target_auth_peeruser": ac.peeruser,
        "iscsi_target_auth_peersecret": ac.peersecret,
    }


def _target(model: ConfigModel, t: Any) -> dict[str, Any]:
    return {"id": t.id, "iscsi_target_name": t.name, "iscsi_target_alias": t.alias}


def _targetgroup(model: ConfigModel, g: Any) -> dict[str, Any]:
    return {
        "id": g.id,
        "iscsi_target": g.target,
        "iscsi_target_portalgroup": g.portal_group,
        "iscsi_target_initiatorgroup": g.initiator_group,
        "iscsi_target_authgroup": g.auth_group,
        "iscsi_target_authtype": g.auth_type,
        "iscsi_target_initialdigest": g.initial_digest,
    }


def _extent(model: ConfigModel, e: Any) -> dict[str, Any]:
    kind = "ZVOL" if e.type == "Disk" and e.disk.startswith("zvol/") else e.type
    return {
        "id": e.id,
        "iscsi_target_extent_name": e.name,
        "iscsi_target_extent_type": kind,
        "iscsi_target_extent_path": e.path,
        "iscsi_target_extent_disk": e.disk,
        "iscsi_target_extent_filesize": e.filesize,
        "iscsi_target_extent_blocksize": e.blocksize,
        "iscsi_target_extent_pblocksize": e.pblocksize,
        "iscsi_target_extent_rpm": e.rpm,
        "iscsi_target_extent_serial": e.serial,
        "iscsi_target_extent_naa": e.naa,
        "iscsi_target_extent_ro": e.ro,
        "iscsi_target_extent_insecure_tpc": e.insecure_tpc,
        "iscsi_target_extent_xen": e.xen,
        "iscsi_target_extent_avail_threshold": e.avail_threshold,
        "iscsi_target_extent_comment": e.comment,
    }


def _lunmap(model: ConfigModel, m: Any) -> dict[str, Any]:
    return {"id": m.id, "iscsi_target": m.target, "iscsi_extent": m.extent, "iscsi_lunid": m.lunid}


RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            "portal", "portal_groups", "Portal",
            {
                "iscsi_target_portal_tag": "tag",
                "iscsi_target_portal_comment": "comment",
                "iscsi_target_portal_ips": "listen",
                "iscsi_target_portal_discoveryauthmethod": "discovery_auth_method",
                "iscsi_target_portal_discoveryauthgroup": "discovery_auth_group",
            },
            _portal, "create_portal_group", "update_portal_group", "delete_portal_group",
        ),
        Resource(
            "authorizedinitiator", "initiator_groups", "Authorized initiator",
            {
                "iscsi_target_initiator_tag": "tag",
                "iscsi_target_initiator_initiators": "initiators",
                "iscsi_target_initiator_auth_network": "auth_network",
                "iscsi_target_initiator_comment": "comment",
                "scsi_target_initiator_comment": "comment",  # the document's own spelling
            },
            _initiator, "create_initiator_group", "update_initiator_group", "delete_initiator_group",
        ),
        Resource(
            "authcredential", "auth_credentials", "Auth credential",
            {
                "iscsi_target_auth_tag": "tag",
                "iscsi_target_auth_user": "user",
                "iscsi_target_auth_secret": "secret",
                "iscsi_target_auth_peeruser": "peeruser",
                "iscsi_target_auth_peersecret": "peersecret",
            },
            _authcred, "create_auth_credential", "update_auth_credential", "delete_auth_credential",
        ),
        Resource(
            "target", "targets", "Target",
            {"iscsi_target_name": "name", "iscsi_target_alias": "alias"},
            _target, "create_target", "update_target", "delete_target",
        ),
        Resource(
            "targetgroup", "target_groups", "Target group",
            {
                "iscsi_target": "target",
                "iscsi_target_portalgroup": "portal_group",
                "iscsi_target_initiatorgroup": "initiator_group",
                "iscsi_target_authgroup": "auth_group",
                "iscsi_target_authtype": "auth_type",
                "iscsi_target_initialdigest": "initial_digest",
            },
            _targetgroup, "create_target_group", "update_target_group", "delete_target_group",
        ),
        Resource(
            "extent", "extents", "Extent",
            {
                f"iscsi_target_extent_{n}": n
                for n in (
                    "name", "type", "path", "disk", "filesize", "blocksize", "pblocksize", "rpm", "serial",
                    "naa", "ro", "insecure_tpc", "xen", "avail_threshold", "comment",
                )
            },
            _extent, "create_extent", "update_extent", "delete_extent",
        ),
        Resource(
            "targettoextent", "lun_maps", "Target to extent",
            {"iscsi_target": "target", "iscsi_extent": "extent", "iscsi_lunid": "lunid"},
            _lunmap, "create_lun_map", "update_lun_map", "delete_lun_map",
        ),
    )
}

GLOBAL_FIELDS = {
    "iscsi_basename": "basename",
    "iscsi_isns_servers": "isns_servers",
    "iscsi_pool_avail_threshold": "pool_avail_threshold",
}


def _error_response(exc: ConfigError, resource: Resource | None) -> web.Response:
    if resource is not None:
        body = resource.errors_to_api(exc.errors)
    else:
        reverse = {v: k for k, v in GLOBAL_FIELDS.items()}
        body = {reverse.get(k, k): v for k, v in exc.errors.items()}
    status = {"invalid": 400, "conflict": 409, "not_found": 404}[exc.kind]
    return json_response(body, status)


def _bad_json() -> web.Response:
    return json_response({"error": "Request is not valid JSON."}, 400)


def _page(request: web.Request, items: list[Any]) -> list[Any] | web.Response:
    """``offset``/``limit`` as tastypie: limit 20 by default, 0 = all, at most 1000."""
    values = {}
    for name, default in (("offset", 0), ("limit", DEFAULT_LIMIT)):
        raw = request.query.get(name)
        if raw is None or raw == "":
            values[name] = default
            continue
        value = int(raw) if re.fullmatch(r"[0-9]{1,18}", raw) else -1
        if value < 0:
            msg = f"Invalid {name} '{raw[:40]}' provided. Please provide a positive integer."
            return json_response({"error": msg}, 400)
        values[name] = value
    limit = values["limit"]
    if limit == 0 or limit > MAX_LIMIT:
        limit = MAX_LIMIT
    offset = values["offset"]
    return items[offset : offset + limit]


def _list_handler(res: Resource) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        service = request.app[SERVICE_KEY]
        model = service.model
        objs = [getattr(model, res.kind)[k] for k in sorted(getattr(model, res.kind))]
        page = _page(request, objs)
        if isinstance(page, web.Response):
            return page
        return json_response([res.serialize(model, o) for o in page])

    return handler


def _existing_id(request: web.Request, res: Resource) -> int | None:
    """The URL's object id when it names an existing object of ``res``."""
    raw = request.match_info["id"]
    if not _ID_RE.match(raw):
        return None
    obj_id = int(raw)
    return obj_id if obj_id in getattr(request.app[SERVICE_KEY].model, res.kind) else None


def _not_found(res: Resource) -> web.Response:
    return json_response({"error": f"{res.label} not found."}, 404)


def _get_handler(res: Resource) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        service = request.app[SERVICE_KEY]
        obj_id = _existing_id(request, res)
        if obj_id is None:
            return _not_found(res)
        return json_response(res.serialize(service.model, getattr(service.model, res.kind)[obj_id]))

    return handler


def _create_handler(res: Resource) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        service: ConfigService = request.app[SERVICE_KEY]
        try:
            body = await read_object(request)
        except BadJSON:
            return _bad_json()
        try:
            obj = await getattr(service, res.create)(res.to_model(body, drop_null=False))
        except ConfigError as exc:
            return _error_response(exc, res)
        return json_response(res.serialize(service.model, obj), 201)

    return handler


def _update_handler(res: Resource) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        service: ConfigService = request.app[SERVICE_KEY]
        obj_id = _existing_id(request, res)
        if obj_id is None:
            return _not_found(res)
        try:
            body = await read_object(request)
        except BadJSON:
            return _bad_json()
        try:
            obj = await getattr(service, res.update)(obj_id, res.to_model(body, drop_null=True))
        except ConfigError as exc:
            return _error_response(exc, res)
        return json_response(res.serialize(service.model, obj), 200)

    return handler


def _delete_handler(res: Resource) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        service: ConfigService = request.app[SERVICE_KEY]
        obj_id = _existing_id(request, res)
        if obj_id is None:
            return _not_found(res)
        kwargs: dict[str, Any] = {}
        if res.name == "extent":
            # FreeNAS: DELETE with {"delete": true} also removes the file; default keeps it.
            try:
                body = await read_object(request)
            except BadJSON:
                return _bad_json()
            flag = body.get("delete", False)
            kwargs["delete_file"] = flag is True or (isinstance(flag, str) and flag.lower() in ("true", "1", "yes"))
        try:
            await getattr(service, res.delete)(obj_id, **kwargs)
        except ConfigError as exc:
            return _error_response(exc, res)
        return web.Response(status=204, content_type="application/json")

    return handler


# --- globalconfiguration (a singleton on the list URL) -----------------------------------


def _global(model: ConfigModel) -> dict[str, Any]:
    gc = model.global_config
    return {
        "id": gc.id,
        "iscsi_basename": gc.basename,
        "iscsi_isns_servers": gc.isns_servers,
        "iscsi_pool_avail_threshold": gc.pool_avail_threshold,
    }


async def get_global(request: web.Request) -> web.Response:
    return json_response(_global(request.app[SERVICE_KEY].model))


async def put_global(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return _bad_json()
    changes = {GLOBAL_FIELDS[k]: v for k, v in body.items() if k in GLOBAL_FIELDS and v is not None}
    try:
        await service.update_global(changes)
    except ConfigError as exc:
        return _error_response(exc, None)
    return json_response(_global(service.model))


# --- services/iscsitarget and system/version ----------------------------------------------


def _iscsi_service(service: ConfigService) -> dict[str, Any]:
    enabled = service.model.service_enabled
    return {
        "id": 4,
        "srv_service": "iscsitarget",
        "srv_enable": enabled,
        "srv_state": "RUNNING" if enabled else "STOPPED",
    }


async def get_iscsi_service(request: web.Request) -> web.Response:
    return json_response(_iscsi_service(request.app[SERVICE_KEY]))


async def list_services(request: web.Request) -> web.Response:
    page = _page(request, [_iscsi_service(request.app[SERVICE_KEY])])
    return page if isinstance(page, web.Response) else json_response(page)


async def put_iscsi_service(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return _bad_json()
    value = body.get("srv_enable")
    if value is not None:
        if isinstance(value, bool):
            enabled = value
        elif isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            enabled = value.strip().lower() in ("true", "1")
        elif isinstance(value, int) and value in (0, 1):
            enabled = bool(value)
        else:
            return json_response({"srv_enable": ["Enter a boolean (true or false)."]}, 400)
        try:
            await service.set_service_enabled(enabled)
        except ConfigError as exc:
            return json_response({"__all__": [exc.message]}, 400)
    return json_response(_iscsi_service(service))


async def get_version(request: web.Request) -> web.Response:
    # Clients (democratic-csi, proxmox plugins) parse "FreeNAS-<version>" out of fullversion.
    return json_response(
        {
            "fullversion": f"FreeNAS-11.3-U5 (pyscsi-target {__version__})",
            "name": "FreeNAS",
            "version": "11.3-U5",
        }
    )


def setup_routes(app: web.Application) -> None:
    for res in RESOURCES.values():
        base = f"{BASE}/{res.name}"
        add_route(app, "GET", base, _list_handler(res))
        add_route(app, "POST", base, _create_handler(res))
        add_route(app, "GET", base + "/{id}", _get_handler(res))
        add_route(app, "PUT", base + "/{id}", _update_handler(res))
        add_route(app, "DELETE", base + "/{id}", _delete_handler(res))
    add_route(app, "GET", f"{BASE}/globalconfiguration", get_global)
    add_route(app, "PUT", f"{BASE}/globalconfiguration", put_global)
    add_route(app, "GET", "/api/v1.0/services/services", list_services)
    add_route(app, "GET", "/api/v1.0/services/services/iscsitarget", get_iscsi_service)
    add_route(app, "PUT", "/api/v1.0/services/services/iscsitarget", put_iscsi_service)
    add_route(app, "GET", "/api/v1.0/system/version", get_version)
