"""FreeNAS v1.0 iSCSI resources (``/api/v1.0/services/iscsi/...``) over the ConfigService.

Behaviour follows what FreeNAS 9.3-11.3 did and what its clients depend on: bare JSON
arrays for lists with ``offset``/``limit`` paging, 201/200/204, partial PUT where null
leaves a value as it is, ids accepted as strings, ``{"field": ["message"]}`` errors,
409 with FreeNAS's own conflict messages.  Field names and rules: ``freenas_tables``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pyscsi_target.config.errors import ConfigError, Errors
from pyscsi_target.config.fields import UNSET, Boolean, Field, FieldSet, Schema, Text
from pyscsi_target.config.global_settings import ServiceFields
from pyscsi_target.config.model import ConfigModel
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.transaction import (
    AUTH_CREDENTIALS,
    EXTENTS,
    INITIATOR_GROUPS,
    LUN_MAPS,
    PORTAL_GROUPS,
    TARGET_GROUPS,
    TARGETS,
    Kind,
)

from . import freenas_tables as tables
from .common import MONITOR_KEY, SERVICE_KEY, BadJSON, json_response, read_object
from .openapi import ApiDoc, Operation, Response, common_errors, crud_links, obj, ref, with_common_errors
from .tables import Table

BASE = "/api/v1.0/services/iscsi"
TAG = "FreeNAS v1.0"
_ID_RE = re.compile(r"^[0-9]{1,18}$")  # ASCII digits only: int() would take "²" or 5000 digits badly
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000

Fields = Mapping[str, object]


@dataclass(frozen=True)
class Resource:
    """One FreeNAS CRUD resource: its URL name, table, model collection and service methods."""

    name: str
    table: Table
    kind: Kind[Any]
    label: str  # "<label> not found."
    create: Callable[[ConfigService, Fields], Awaitable[Any]]
    update: Callable[[ConfigService, int, Fields], Awaitable[Any]]
    delete: Callable[[ConfigService, int], Awaitable[None]]
    removes_file: bool = False  # DELETE takes {"delete": true} to remove the backing file too


RESOURCES: tuple[Resource, ...] = (
    Resource(
        "portal",
        tables.PORTAL,
        PORTAL_GROUPS,
        "Portal",
        ConfigService.create_portal_group,
        ConfigService.update_portal_group,
        ConfigService.delete_portal_group,
    ),
    Resource(
        "authorizedinitiator",
        tables.AUTHORIZED_INITIATOR,
        INITIATOR_GROUPS,
        "Authorized initiator",
        ConfigService.create_initiator_group,
        ConfigService.update_initiator_group,
        ConfigService.delete_initiator_group,
    ),
    Resource(
        "authcredential",
        tables.AUTH_CREDENTIAL,
        AUTH_CREDENTIALS,
        "Auth credential",
        ConfigService.create_auth_credential,
        ConfigService.update_auth_credential,
        ConfigService.delete_auth_credential,
    ),
    Resource(
        "target",
        tables.TARGET,
        TARGETS,
        "Target",
        ConfigService.create_target,
        ConfigService.update_target,
        ConfigService.delete_target,
    ),
    Resource(
        "targetgroup",
        tables.TARGET_GROUP,
        TARGET_GROUPS,
        "Target group",
        ConfigService.create_target_group,
        ConfigService.update_target_group,
        ConfigService.delete_target_group,
    ),
    Resource(
        "extent",
        tables.EXTENT,
        EXTENTS,
        "Extent",
        ConfigService.create_extent,
        ConfigService.update_extent,
        ConfigService.delete_extent,
        removes_file=True,
    ),
    Resource(
        "targettoextent",
        tables.TARGET_TO_EXTENT,
        LUN_MAPS,
        "Target to extent",
        ConfigService.create_lun_map,
        ConfigService.update_lun_map,
        ConfigService.delete_lun_map,
    ),
)

# FreeNAS: DELETE of an extent with {"delete": true} also removes the file; default keeps it.
DELETE_FILE = Field("delete", Boolean(true_words=("true", "1", "yes"), false_words=(), numbers=False))


# --- responses -------------------------------------------------------------------------------


def _error_response(exc: ConfigError, table: Table) -> web.Response:
    status = {"invalid": 400, "conflict": 409, "not_found": 404}[exc.kind]
    return json_response(table.errors_to_api(exc.errors), status)


async def _body(request: web.Request) -> dict[str, object] | web.Response:
    """The request's JSON object, or the 400 FreeNAS gave for anything else."""
    try:
        return await read_object(request)
    except BadJSON:
        return json_response({"error": "Request is not valid JSON."}, 400)


def _not_found(res: Resource) -> web.Response:
    return json_response({"error": f"{res.label} not found."}, 404)


def _page(request: web.Request, items: Sequence[Any]) -> Sequence[Any] | web.Response:
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


def _existing_id(request: web.Request, res: Resource) -> int | None:
    """The URL's object id when it names an existing object of ``res``."""
    raw = request.match_info["id"]
    if not _ID_RE.match(raw):
        return None
    obj_id = int(raw)
    return obj_id if obj_id in res.kind.of(request.app[SERVICE_KEY].model) else None


# --- the CRUD handlers -------------------------------------------------------------------------


def _list_handler(res: Resource) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        model = request.app[SERVICE_KEY].model
        objs = res.kind.of(model)
        page = _page(request, [objs[k] for k in sorted(objs)])
        if isinstance(page, web.Response):
            return page
        return json_response([res.table.serialize(model, o) for o in page])

    return handler


def _get_handler(res: Resource) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        model = request.app[SERVICE_KEY].model
        obj_id = _existing_id(request, res)
        if obj_id is None:
            return _not_found(res)
        return json_response(res.table.serialize(model, res.kind.of(model)[obj_id]))

    return handler


def _save_handler(res: Resource, *, create: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST (create: 201) or PUT (partial update of an existing object: 200)."""

    async def handler(request: web.Request) -> web.Response:
        service = request.app[SERVICE_KEY]
        obj_id = None if create else _existing_id(request, res)
        if obj_id is None and not create:
            return _not_found(res)
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        fields = res.table.to_model(body, drop_null=not create, create=create)
        try:
            saved = await (res.create(service, fields) if obj_id is None else res.update(service, obj_id, fields))
        except ConfigError as exc:
            return _error_response(exc, res.table)
        return json_response(res.table.serialize(service.model, saved), 201 if create else 200)

    return handler


def _delete_handler(res: Resource) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        service = request.app[SERVICE_KEY]
        obj_id = _existing_id(request, res)
        if obj_id is None:
            return _not_found(res)
        try:
            if res.removes_file:
                body = await _body(request)
                if isinstance(body, web.Response):
                    return body
                await service.delete_extent(obj_id, delete_file=DELETE_FILE.read(body, Errors()) is True)
            else:
                await res.delete(service, obj_id)
        except ConfigError as exc:
            return _error_response(exc, res.table)
        return web.Response(status=204, content_type="application/json")

    return handler


# --- globalconfiguration, services/iscsitarget, system/version ----------------------------------


async def get_global(request: web.Request) -> web.Response:
    model = request.app[SERVICE_KEY].model
    return json_response(tables.GLOBAL_CONFIGURATION.serialize(model, model.global_config))


async def put_global(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    table = tables.GLOBAL_CONFIGURATION
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    try:
        await service.update_global(table.to_model(body, drop_null=True, create=False))
    except ConfigError as exc:
        return _error_response(exc, table)
    return json_response(table.serialize(service.model, service.model.global_config))


def _iscsi_service(model: ConfigModel) -> dict[str, object]:
    return tables.ISCSI_SERVICE.serialize(model, None)


async def get_iscsi_service(request: web.Request) -> web.Response:
    return json_response(_iscsi_service(request.app[SERVICE_KEY].model))


async def list_services(request: web.Request) -> web.Response:
    page = _page(request, [_iscsi_service(request.app[SERVICE_KEY].model)])
    return page if isinstance(page, web.Response) else json_response(page)


async def put_iscsi_service(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    table = tables.ISCSI_SERVICE
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    errs = Errors()
    enabled = ServiceFields.enabled.read(table.to_model(body, drop_null=True), errs)
    if errs.errors:
        return json_response(table.errors_to_api(errs.errors), 400)
    if enabled is not UNSET:
        try:
            await service.set_service_enabled(enabled)
        except ConfigError as exc:
            return json_response({"__all__": [exc.message]}, 400)
    return json_response(_iscsi_service(service.model))


async def get_version(request: web.Request) -> web.Response:
    return json_response(tables.SYSTEM_VERSION.serialize(request.app[SERVICE_KEY].model, None))


# --- system/alert ----------------------------------------------------------------------------


class AlertDismissFields(FieldSet):
    """The body of ``PUT system/alert/dismiss/``: which alert, dismissed or restored."""

    id = Field("id", Text(max_len=64))
    dismiss = Field("dismiss", Boolean())


_TIMESTAMP_FILTERS = {"timestamp": int.__eq__, "timestamp__gte": int.__ge__, "timestamp__lte": int.__le__}


async def list_alerts(request: web.Request) -> web.Response:
    """The space alerts in effect, measured now (FreeNAS's ``timestamp`` filters and paging)."""
    alerts = await request.app[MONITOR_KEY].check()
    for name, keep in _TIMESTAMP_FILTERS.items():
        raw = request.query.get(name)
        if raw is None:
            continue
        if not re.fullmatch(r"[0-9]{1,18}", raw):
            return json_response({"error": f"Invalid {name} '{raw[:40]}'."}, 400)
        alerts = [a for a in alerts if keep(int(a.since), int(raw))]
    page = _page(request, alerts)
    if isinstance(page, web.Response):
        return page
    model = request.app[SERVICE_KEY].model
    return json_response([tables.SYSTEM_ALERT.serialize(model, a) for a in page])


async def dismiss_alert(request: web.Request) -> web.Response:
    """Dismiss (``"dismiss": true``) or restore an alert: 202, as FreeNAS answered."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    F, errs = AlertDismissFields, Errors()
    alert_id, dismiss = F.id.read(body, errs), F.dismiss.read(body, errs)
    for f, value in ((F.id, alert_id), (F.dismiss, dismiss)):
        if value is UNSET and f.attr not in errs:
            errs.add(f.attr, "This field is required.")
    if errs.errors:
        return json_response(errs.errors, 400)
    assert isinstance(alert_id, str) and isinstance(dismiss, bool)
    if not request.app[MONITOR_KEY].board.dismiss(alert_id, dismiss):
        return json_response({"error": "Alert not found."}, 404)
    return web.Response(status=202)


async def get_v2_version(request: web.Request) -> web.Response:
    """The one v2.0 resource served: clients probe it first to choose their API (a JSON string)."""
    return json_response(tables.FREENAS_RELEASE)


# --- routes and their documentation ----------------------------------------------------------


def errors(*codes: int) -> dict[int, Response]:
    table = {
        400: Response("Invalid values, invalid JSON or bad paging parameters", ref("FreeNASError")),
        403: Response("A browser write from another site", ref("FreeNASError")),
        401: Response("Missing or wrong credentials", ref("FreeNASError")),
        404: Response("No object with this id", ref("FreeNASError")),
        409: Response("Uniqueness conflict or object in use", ref("FreeNASError")),
        413: Response("Request body too large"),
        **common_errors(ref("FreeNASError")),
    }
    return {c: table[c] for c in with_common_errors(codes)}


PAGING: tuple[Schema, ...] = (
    {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 0}},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 20}},
)
ID_PARAM: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}


def _add_resource(app: web.Application, doc: ApiDoc, res: Resource) -> None:
    name, table = res.name, res.table
    out = doc.component(table.name, table.output_schema())
    body = doc.component(table.name + "Input", {**table.input_schema(), "example": table.example()})
    changes = doc.component(table.name + "Update", table.input_schema(create=False))
    links = crud_links(
        {f"{verb.capitalize()}{table.name}": f"{verb}_{name}" for verb in ("get", "update", "delete")},
        "id",
        "$response.body#/id",
    )
    base, item = f"{BASE}/{name}/", f"{BASE}/{name}/{{id}}/"
    ops = (
        Operation(
            "GET", base, _list_handler(res), f"list_{name}", TAG,
            {200: Response("The objects, by id", {"type": "array", "items": out}), **errors(400, 401)},
            summary=f"List {name} objects", query=PAGING,
        ),
        Operation(
            "POST", base, _save_handler(res, create=True), f"create_{name}", TAG,
            {201: Response("Created", out, links=links), **errors(400, 401, 409, 413)},
            summary=f"Create a {name}", request=body,
        ),
        Operation(
            "GET", item, _get_handler(res), f"get_{name}", TAG,
            {200: Response("The object", out), **errors(401, 404)}, path_params=(ID_PARAM,),
        ),
        Operation(
            "PUT", item, _save_handler(res, create=False), f"update_{name}", TAG,
            {200: Response("Updated", out), **errors(400, 401, 404, 409, 413)},
            summary=f"Update a {name} (partial; null leaves a value unchanged)", request=changes,
            path_params=(ID_PARAM,),
        ),
        Operation(
            "DELETE", item, _delete_handler(res), f"delete_{name}", TAG,
            {204: Response("Deleted"), **errors(400, 401, 404, 409, 413)},
            request=obj({"delete": DELETE_FILE.type.schema()}) if res.removes_file else None,
            path_params=(ID_PARAM,),
        ),
    )
    for op in ops:
        doc.add(app, op)


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    doc.component(
        "FreeNASError",
        {
            "type": "object",
            "description": '{"field": ["message", ...]} ("__all__" for the whole object) or {"error": "message"}',
            "additionalProperties": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        },
    )
    for res in RESOURCES:
        _add_resource(app, doc, res)
    gc = tables.GLOBAL_CONFIGURATION
    gc_out = gc.output_schema()
    svc = tables.ISCSI_SERVICE
    svc_out = svc.output_schema()
    alert = doc.component(tables.SYSTEM_ALERT.name, tables.SYSTEM_ALERT.output_schema())
    services = "/api/v1.0/services/services"
    for op in (
        Operation(
            "GET", f"{BASE}/globalconfiguration/", get_global, "get_globalconfiguration", TAG,
            {200: Response("Global configuration", gc_out), **errors(401)},
        ),
        Operation(
            "PUT", f"{BASE}/globalconfiguration/", put_global, "update_globalconfiguration", TAG,
            {200: Response("Updated", gc_out), **errors(400, 401, 413)},
            request=gc.input_schema(create=False),
        ),
        Operation(
            "GET", f"{services}/", list_services, "list_services", TAG,
            {200: Response("Services", {"type": "array", "items": svc_out}), **errors(400, 401)}, query=PAGING,
        ),
        Operation(
            "GET", f"{services}/iscsitarget/", get_iscsi_service, "get_iscsitarget_service", TAG,
            {200: Response("The iSCSI service", svc_out), **errors(401)},
        ),
        Operation(
            "PUT", f"{services}/iscsitarget/", put_iscsi_service, "update_iscsitarget_service", TAG,
            {200: Response("The iSCSI service", svc_out), **errors(400, 401, 413)},
            summary="Start (true) or stop (false) every portal", request=svc.input_schema(create=False),
        ),
        Operation(
            "GET", "/api/v1.0/system/version/", get_version, "get_version", TAG,
            {200: Response("Version", tables.SYSTEM_VERSION.output_schema()), **errors(401)},
        ),
        Operation(
            "GET", "/api/v1.0/system/alert/", list_alerts, "list_alerts", TAG,
            {
                200: Response(
                    "The space alerts in effect (iscsi_pool_avail_threshold, extent avail_threshold)",
                    {"type": "array", "items": alert},
                ),
                **errors(400, 401),
            },
            query=(*PAGING, *({"name": n, "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}}
                              for n in _TIMESTAMP_FILTERS)),
        ),
        Operation(
            "PUT", "/api/v1.0/system/alert/dismiss/", dismiss_alert, "dismiss_alert", TAG,
            {202: Response("Dismissed (or restored)"), **errors(400, 401, 404, 413)},
            summary="Dismiss an alert (dismiss: true) or restore it (false)",
            request=obj({f.attr: f.type.input_schema() for f in AlertDismissFields.fields()}, ["id", "dismiss"]),
            request_required=True,
        ),
        Operation(
            "GET", "/api/v2.0/system/version/", get_v2_version, "get_v2_version", TAG,
            {
                200: Response(
                    "The release, as FreeNAS 11.2 answered the v2.0 probe (only this v2.0 path is served)",
                    {"type": "string", "example": tables.FREENAS_RELEASE},
                ),
                **errors(401),
            },
        ),
    ):
        doc.add(app, op)
