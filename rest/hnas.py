"""Hitachi NAS v9 ``/v9/storage/iscsi-targets`` over the ConfigService.

A /v9 iSCSI target is a FreeNAS target seen differently: ``globalUniqueName`` is its IQN,
``iscsiLogicalUnits`` are its LUN maps, ``enableAuthentication``/``secret`` are its target
groups' CHAP setting and auth group, ``accessConfig`` is an address allow-list enforced at
login.  Errors use the document's bodies.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from pyscsi_target.config.model import ConfigModel, Target
from pyscsi_target.config.service import ConfigError, ConfigService

from .common import ALLOWED_VS_KEY, SERVICE_KEY, BadJSON, add_route, json_response, read_object

BASE = "/v9/storage/iscsi-targets"

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

# API field -> ConfigService field, for POST and PATCH bodies.
BODY_FIELDS = {
    "accessConfig": "access_config",
    "alias": "alias",
    "comment": "comment",
    "enableAuthentication": "enable_authentication",
    "regenerateGUN": "regenerate_gun",
    "secret": "secret",
}
POST_ONLY_FIELDS = {"virtualServerId": "virtual_server_id", "name": "name"}
_BOOL_FIELDS = {"enableAuthentication", "regenerateGUN"}
_STR_FIELDS = {"accessConfig", "alias", "comment", "secret", "name"}


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
    return json_response({"errorCode": 0, "errorDetail": error_detail(message), "errorMsg": message}, 500)


def _config_error(exc: ConfigError) -> web.Response:
    names = {v: k for k, v in {**BODY_FIELDS, **POST_ONLY_FIELDS}.items()}
    names["name"] = "alias"  # a /v9 target's name derives from its alias
    parts = []
    for key, msgs in exc.errors.items():
        for msg in msgs:
            parts.append(msg if key == "__all__" else f"Invalid {names.get(key, key)} parameter - {msg}")
    message = "; ".join(parts)
    if exc.kind == "not_found":
        return not_found(message)
    if exc.kind == "conflict":
        return json_response({"errorCode": ERR_CONFLICT, "errorMsg": message}, 409)
    return bad_request(message)


def serialize(service: ConfigService, model: ConfigModel, t: Target) -> dict[str, Any]:
    enabled, secret = service.target_auth(model, t.id)
    luns = sorted((m for m in model.lun_maps.values() if m.target == t.id), key=lambda m: m.lunid)
    return {
        "accessConfig": t.access_config,
        "alias": t.alias if t.alias is not None else t.name,
        "comment": t.comment,
        "globalUniqueName": model.target_iqn(t),
        "isAuthenticationEnabled": enabled,
        "iscsiLogicalUnits": [
            {
                "logicalUnit": m.lunid,
                "logicalUnitAlias": model.extents[m.extent].name if m.extent in model.extents else "",
                "objectId": object_id("iscsi-lu", m.id),
            }
            for m in luns
        ],
        "objectId": object_id("iscsi-target", t.id),
        "secret": secret,
        "virtualServerId": t.virtual_server_id,
    }


def _allowed(request: web.Request, vs: int) -> bool:
    allowed = request.get(ALLOWED_VS_KEY) or []
    return not allowed or vs in allowed


def _body_fields(body: dict[str, Any], *, post: bool) -> dict[str, Any] | web.Response:
    fields: dict[str, Any] = {}
    mapping = {**BODY_FIELDS, **POST_ONLY_FIELDS} if post else BODY_FIELDS
    for key, value in body.items():
        attr = mapping.get(key)
        if attr is None:
            continue  # unknown (or read-only, like globalUniqueName) fields are ignored
        if value is None:
            continue
        if key in _BOOL_FIELDS and not isinstance(value, bool):
            return bad_request(f"Invalid {key} parameter - it must be true or false")
        if key in _STR_FIELDS and not isinstance(value, str):
            return bad_request(f"Invalid {key} parameter - it must be a string")
        if key == "virtualServerId" and (isinstance(value, bool) or not isinstance(value, int)):
            return bad_request("Invalid virtualServerId parameter - it must be an integer")
        fields[attr] = value
    return fields


def _lookup(request: web.Request) -> Target | web.Response:
    service = request.app[SERVICE_KEY]
    target_id = parse_object_id(request.match_info["objectId"], "iscsi-target")
    target = service.model.targets.get(target_id) if target_id is not None else None
    if target is None:
        return not_found()
    if not _allowed(request, target.virtual_server_id):
        return forbidden()
    return target


def _created_body(service: ConfigService, t: Target) -> tuple[dict[str, Any], str]:
    uri = f"{BASE}/{object_id('iscsi-target', t.id)}"
    return {"iscsiTarget": serialize(service, service.model, t), "uri": uri}, uri


async def list_targets(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    model = service.model
    targets = [model.targets[k] for k in sorted(model.targets)]
    return json_response(
        {"iscsiTargets": [serialize(service, model, t) for t in targets if _allowed(request, t.virtual_server_id)]}
    )


async def get_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    service = request.app[SERVICE_KEY]
    return json_response({"iscsiTarget": serialize(service, service.model, found)})


async def create_target(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return bad_request("The request body is not a valid JSON object")
    fields = _body_fields(body, post=True)
    if isinstance(fields, web.Response):
        return fields
    if not _allowed(request, int(fields.get("virtual_server_id", 1))):
        return forbidden()
    try:
        target = await service.create_hnas_target(fields)
    except ConfigError as exc:
        return _config_error(exc)
    body_out, uri = _created_body(service, service.model.targets[target.id])
    return json_response(body_out, 201, {"Location": uri})


async def patch_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    service = request.app[SERVICE_KEY]
    try:
        body = await read_object(request)
    except BadJSON:
        return bad_request("The request body is not a valid JSON object")
    fields = _body_fields(body, post=False)
    if isinstance(fields, web.Response):
        return fields
    try:
        target = await service.patch_hnas_target(found.id, fields)
    except ConfigError as exc:
        return _config_error(exc)
    body_out, uri = _created_body(service, service.model.targets[target.id])
    return json_response(body_out, 303, {"Location": uri})


async def delete_target(request: web.Request) -> web.Response:
    found = _lookup(request)
    if isinstance(found, web.Response):
        return found
    service = request.app[SERVICE_KEY]
    try:
        await service.delete_target(found.id)
    except ConfigError as exc:
        return _config_error(exc)
    return web.Response(status=204)


def setup_routes(app: web.Application) -> None:
    add_route(app, "GET", BASE, list_targets)
    add_route(app, "POST", BASE, create_target)
    add_route(app, "GET", BASE + "/{objectId}", get_target)
    add_route(app, "PATCH", BASE + "/{objectId}", patch_target)
    add_route(app, "DELETE", BASE + "/{objectId}", delete_target)
