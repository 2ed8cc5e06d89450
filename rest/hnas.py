"""Hitachi NAS v9 ``/v9/storage/iscsi-targets`` over the ConfigService.

A /v9 iSCSI target is a FreeNAS target seen differently: ``globalUniqueName`` is its IQN,
``iscsiLogicalUnits`` are its LUN maps, ``enableAuthentication``/``secret`` are its target
groups' CHAP setting and auth group (see ``hnas_view``), ``accessConfig`` is an address
allow-list enforced at login.  Requests must use exact JSON types; errors use the
document's bodies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from pyscsi_target.config.errors import ConfigError
from pyscsi_target.config.fields import Schema
from pyscsi_target.config.model import ConfigModel, Target
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.targets import TargetFields as TN

from . import hnas_view
from .common import ALLOWED_VS_KEY, SERVICE_KEY, BadJSON, json_response, read_object
from .hnas_view import HnasTargetFields as HV
from .openapi import ApiDoc, Operation, Response, common_errors, crud_links, obj, with_common_errors
from .tables import Column, Table, strict_type_error

BASE = "/v9/storage/iscsi-targets"
TAG = "Hitachi NAS v9"

# errorCode values: the document's examples for "invalid parameter" and "not found";
# the others are ours, in the same range.
ERR_INVALID = 1081353
ERR_NOT_FOUND = 1081345
ERR_CONFLICT = 1081356
ERR_GENERIC = 1081344

FORBIDDEN_MSG = "Forbidden request - the client does not have the required permissions to perform the operation"
NOT_FOUND_MSG = "Cannot find the object of the operation on the device"

_OID_SUFFIX = ":::OID_$#!@%_V"
_OID_RE = re.compile(r"^[0-9a-fA-F]{2,256}$")


def object_id(kind: str, obj_id: int) -> str:
    """An opaque hex id in the document's style (hex of ``<id>:::<kind>:::OID_...``)."""
    return f"{obj_id}:::{kind}{_OID_SUFFIX}".encode().hex()


def parse_object_id(oid: str, kind: str) -> int | None:
    if not _OID_RE.match(oid) or len(oid) % 2:
        return None
    try:
        text = bytes.fromhex(oid).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    parts = text.split(":::")
    if len(parts) != 3 or parts[1] != kind or not parts[0].isdigit() or f":::{parts[2]}" != _OID_SUFFIX:
        return None
    return int(parts[0])


def _luns(model: ConfigModel, t: Target) -> list[dict[str, object]]:
    maps = sorted((m for m in model.lun_maps.values() if m.target == t.id), key=lambda m: m.lunid)
    return [
        {
            "logicalUnit": m.lunid,
            "logicalUnitAlias": model.extents[m.extent].name if m.extent in model.extents else "",
            "objectId": object_id("iscsi-lu", m.id),
        }
        for m in maps
    ]


_STR = {"type": "string"}
_LUN = obj(
    {"logicalUnit": {"type": "integer"}, "logicalUnitAlias": _STR, "objectId": _STR},
    ["logicalUnit", "logicalUnitAlias", "objectId"],
)

ISCSI_TARGET = Table(
    "IscsiTarget",
    (
        Column("accessConfig", TN.access_config, example=""),
        Column(
            "alias",
            TN.alias,
            show=lambda model, t: t.alias if t.alias is not None else t.name,
            schema=_STR,
            required=True,
            example="example",
        ),
        Column("comment", TN.comment, example="This is a comment"),
        Column("globalUniqueName", show=lambda model, t: model.target_iqn(t), schema=_STR),
        Column(
            "isAuthenticationEnabled",
            show=lambda model, t: hnas_view.target_auth(model, t)[0],
            schema={"type": "boolean"},
        ),
        Column("iscsiLogicalUnits", show=_luns, schema={"type": "array", "items": _LUN}),
        Column("objectId", show=lambda model, t: object_id("iscsi-target", t.id), schema=_STR),
        Column(
            "secret",
            HV.secret,
            show=lambda model, t: hnas_view.target_auth(model, t)[1],
            schema=_STR,
            example="secret1234",
        ),
        Column("virtualServerId", TN.virtual_server_id, create_only=True, example=1),
        Column("enableAuthentication", HV.enable_authentication, write_only=True),
        Column("regenerateGUN", HV.regenerate_gun, write_only=True),
        # Without a name, a /v9 target's name derives from its alias: errors are the alias's.
        Column("name", TN.name, write_only=True, create_only=True, error_key="alias"),
    ),
    strict=True,
)


# --- responses -------------------------------------------------------------------------------


def error_detail(message: str) -> dict[str, Any]:
    return {
        "detail": "",
        "fault": "",
        "fileName": "hnas.py",
        "function": "iscsi_targets",
        "lineNumber": 0,
        "message": message,
        "reason": message,
        "returnedValue": 0,
        "subCode": 0,
    }


def bad_request(message: str) -> web.Response:
    return json_response({"errorCode": ERR_INVALID, "errorMsg": message}, 400)


def forbidden() -> web.Response:
    return json_response({"errorMsg": FORBIDDEN_MSG}, 403)


def not_found(reason: str = "The iSCSI target does not exist") -> web.Response:
    return json_response(
        {"errorCode": ERR_NOT_FOUND, "errorDetail": error_detail(reason), "errorMsg": NOT_FOUND_MSG}, 404
    )


def server_error(message: str) -> web.Response:
    return error_response(message, 500)


def error_response(message: str, status: int) -> web.Response:
    """The body of a failure on the server's side (500, 507)."""
    return json_response({"errorCode": 0, "errorDetail": error_detail(message), "errorMsg": message}, status)


def _config_error(exc: ConfigError) -> web.Response:
    parts = []
    for key, msgs in exc.errors.items():
        name = ISCSI_TARGET.api_name(key) or key
        for msg in msgs:
            parts.append(msg if key == "__all__" else f"Invalid {name} parameter - {msg}")
    message = "; ".join(parts)
    if exc.kind == "not_found":
        return not_found(message)
    if exc.kind == "conflict":
        return json_response({"errorCode": ERR_CONFLICT, "errorMsg": message}, 409)
    return bad_request(message)


# --- handlers --------------------------------------------------------------------------------


def _allowed(request: web.Request, vs: int) -> bool:
    allowed = request.get(ALLOWED_VS_KEY) or []
    return not allowed or vs in allowed


def _body_fields(body: Mapping[str, object], *, create: bool) -> dict[str, object] | web.Response:
    """The service's fields; the first value of the wrong JSON type is a 400."""
    for key, value in body.items():
        col = ISCSI_TARGET.column(key)
        if col is None or col.field is None or value is None or (col.create_only and not create):
            continue  # unknown (or read-only, like globalUniqueName) fields are ignored
        problem = strict_type_error(col.field.type, value)
        if problem is not None:
            return bad_request(f"Invalid {key} parameter - {problem}")
    return ISCSI_TARGET.to_model(body, drop_null=True, create=create)


def _lookup(request: web.Request) -> Target | web.Response:
    model = request.app[SERVICE_KEY].model
    target_id = parse_object_id(request.match_info["iscsiTargetObjectId"], "iscsi-target")
    target = model.targets.get(target_id) if target_id is not None else None
    if target is None:
        return not_found()
    if not _allowed(request, target.virtual_server_id):
        return forbidden()
    return target


def _changed(service: ConfigService, t: Target, status: int) -> web.Response:
    uri = f"{BASE}/{object_id('iscsi-target', t.id)}"
    model = service.model
    body = {"iscsiTarget": ISCSI_TARGET.serialize(model, model.targets[t.id]), "uri": uri}
    return json_response(body, status, {"Location": uri})


async def list_targets(request: web.Request) -> web.Response:
    model = request.app[SERVICE_KEY].model
    targets = [model.targets[k] for k in sorted(model.targets)]
    shown = [ISCSI_TARGET.serialize(model, t) for t in targets if _allowed(request, t.virtual_server_id)]
    return json_response({"iscsiTargets": shown})


async def get_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    return json_response({"iscsiTarget": ISCSI_TARGET.serialize(request.app[SERVICE_KEY].model, found)})


async def create_target(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return bad_request("The request body is not a valid JSON object")
    fields = _body_fields(body, create=True)
    if isinstance(fields, web.Response):
        return fields
    vs = fields.get(TN.virtual_server_id.attr, 1)
    if not _allowed(request, vs if isinstance(vs, int) else 1):
        return forbidden()
    try:
        target = await hnas_view.create_target(service, fields)
    except ConfigError as exc:
        return _config_error(exc)
    return _changed(service, target, 201)


async def patch_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return bad_request("The request body is not a valid JSON object")
    fields = _body_fields(body, create=False)
    if isinstance(fields, web.Response):
        return fields
    try:
        target = await hnas_view.patch_target(service, found.id, fields)
    except ConfigError as exc:
        return _config_error(exc)
    return _changed(service, target, 303)


async def delete_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    try:
        await request.app[SERVICE_KEY].delete_target(found.id)
    except ConfigError as exc:
        return _config_error(exc)
    return web.Response(status=204)


# --- routes and their documentation ----------------------------------------------------------


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    code = {"type": "integer"}
    bad = doc.component("HnasBadRequest", obj({"errorCode": code, "errorMsg": _STR}, ["errorCode", "errorMsg"]))
    denied = doc.component("HnasForbidden", obj({"errorMsg": _STR}, ["errorMsg"]))
    detail = obj({k: code if isinstance(v, int) else _STR for k, v in error_detail("").items()})
    error = doc.component(
        "HnasError",
        obj({"errorCode": code, "errorDetail": detail, "errorMsg": _STR}, ["errorCode", "errorDetail", "errorMsg"]),
    )
    target = doc.component(ISCSI_TARGET.name, ISCSI_TARGET.output_schema())

    def errors(*codes: int) -> dict[int, Response]:
        table = {
            400: Response("Bad Request", bad),
            401: Response("Unauthorized - credentials or API key missing or invalid", denied),
            403: Response("Forbidden - the API key does not cover this virtual server, or a browser write from "
                          "another site", denied),
            404: Response("Not Found - a resource specified was not found", error),
            409: Response("Conflict - the name is already used or the target is in use", bad),
            413: Response("Request body too large"),
            **common_errors(error),
        }
        return {c: table[c] for c in with_common_errors(codes)}

    sec: tuple[Schema, ...] = ({"basicAuth": []}, {"api_key": []}, {"x_subsystem_user": [], "x_subsystem_password": []})
    changed = obj({"iscsiTarget": target, "uri": _STR}, ["iscsiTarget", "uri"])
    location = {"Location": {"description": "URI of the object", "schema": _STR}}
    oid = {"name": "iscsiTargetObjectId", "in": "path", "required": True, "schema": _STR}
    item = f"{BASE}/{{iscsiTargetObjectId}}"
    post_body = {**ISCSI_TARGET.input_schema(create=True), "example": ISCSI_TARGET.example(create=True)}
    links = crud_links(
        {f"{verb.capitalize()}IscsiTarget": f"{verb}_iscsi_target" for verb in ("get", "update", "delete")},
        "iscsiTargetObjectId",
        "$response.body#/iscsiTarget/objectId",
    )
    for op in (
        Operation(
            "GET", BASE, list_targets, "list_iscsi_targets", TAG,
            {
                200: Response(
                    "The iSCSI targets the credentials may see",
                    obj({"iscsiTargets": {"type": "array", "items": target}}, ["iscsiTargets"]),
                ),
                **errors(401),
            },
            security=sec,
        ),
        Operation(
            "POST", BASE, create_target, "create_iscsi_target", TAG,
            {201: Response("Created", changed, location, links), **errors(400, 401, 403, 409, 413)},
            request=post_body, request_required=True, security=sec,
        ),
        Operation(
            "GET", item, get_target, "get_iscsi_target", TAG,
            {200: Response("The iSCSI target", obj({"iscsiTarget": target}, ["iscsiTarget"])), **errors(401, 403, 404)},
            path_params=(oid,), security=sec,
        ),
        Operation(
            "PATCH", item, patch_target, "update_iscsi_target", TAG,
            {
                303: Response("See Other - the object has been updated by the requested operation", changed, location),
                **errors(400, 401, 403, 404, 413),
            },
            summary="Update an iSCSI target", request=ISCSI_TARGET.input_schema(create=False),
            path_params=(oid,), security=sec,
        ),
        Operation(
            "DELETE", item, delete_target, "delete_iscsi_target", TAG,
            {204: Response("Deleted"), **errors(401, 403, 404, 409)},
            path_params=(oid,), security=sec,
        ),
    ):
        doc.add(app, op)
