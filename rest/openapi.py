"""The OpenAPI 3 document of both APIs, served at ``/api/openapi.json``.

Written to be exact about what the server returns (schemathesis checks every response
against it): every status a handler can produce is declared with its body schema.
"""

from __future__ import annotations

import functools
from typing import Any

from pyscsi_target import __version__

from .freenas import BASE as FN_BASE
from .hnas import BASE as HN_BASE

S = dict[str, Any]


def _str(nullable: bool = False, **kw: Any) -> S:
    return {"type": "string", **({"nullable": True} if nullable else {}), **kw}


def _int(nullable: bool = False, **kw: Any) -> S:
    return {"type": "integer", **({"nullable": True} if nullable else {}), **kw}


def _bool() -> S:
    return {"type": "boolean"}


def _obj(props: S, required: list[str] | None = None, additional: bool = True) -> S:
    out: S = {"type": "object", "properties": props, "additionalProperties": additional}
    if required:
        out["required"] = required
    return out


def _ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


AUTH_METHODS = ["None", "Auto", "CHAP", "CHAP Mutual"]

# Response shapes of the FreeNAS resources (all fields always present).
FN_OBJECTS: dict[str, S] = {
    "Portal": {
        "id": _int(),
        "iscsi_target_portal_tag": _int(),
        "iscsi_target_portal_comment": _str(),
        "iscsi_target_portal_discoveryauthmethod": _str(enum=AUTH_METHODS),
        "iscsi_target_portal_discoveryauthgroup": _int(nullable=True),
        "iscsi_target_portal_ips": {"type": "array", "items": _str()},
    },
    "AuthorizedInitiator": {
        "id": _int(),
        "iscsi_target_initiator_tag": _int(),
        "iscsi_target_initiator_initiators": _str(),
        "iscsi_target_initiator_auth_network": _str(),
        "iscsi_target_initiator_comment": _str(),
    },
    "AuthCredential": {
        "id": _int(),
        "iscsi_target_auth_tag": _int(),
        "iscsi_target_auth_user": _str(),
        "iscsi_target_auth_secret": _str(),
        "iscsi_target_auth_peeruser": _str(),
        "iscsi_target_auth_peersecret": _str(),
    },
    "Target": {"id": _int(), "iscsi_target_name": _str(), "iscsi_target_alias": _str(nullable=True)},
    "TargetGroup": {
        "id": _int(),
        "iscsi_target": _int(),
        "iscsi_target_portalgroup": _int(),
        "iscsi_target_initiatorgroup": _int(nullable=True),
        "iscsi_target_authgroup": _int(nullable=True),
        "iscsi_target_authtype": _str(enum=AUTH_METHODS),
        "iscsi_target_initialdigest": _str(),
    },
    "Extent": {
        "id": _int(),
        "iscsi_target_extent_name": _str(),
        "iscsi_target_extent_type": _str(enum=["File", "Disk", "ZVOL"]),
        "iscsi_target_extent_path": _str(),
        "iscsi_target_extent_disk": _str(),
        "iscsi_target_extent_filesize": _str(),
        "iscsi_target_extent_blocksize": _int(enum=[512, 1024, 2048, 4096]),
        "iscsi_target_extent_pblocksize": _bool(),
        "iscsi_target_extent_rpm": _str(enum=["Unknown", "SSD", "5400", "7200", "10000", "15000"]),
        "iscsi_target_extent_serial": _str(),
        "iscsi_target_extent_naa": _str(pattern="^0x[0-9a-f]{16}$"),
        "iscsi_target_extent_ro": _bool(),
        "iscsi_target_extent_insecure_tpc": _bool(),
        "iscsi_target_extent_xen": _bool(),
        "iscsi_target_extent_avail_threshold": _int(nullable=True),
        "iscsi_target_extent_comment": _str(),
    },
    "TargetToExtent": {
        "id": _int(),
        "iscsi_target": _int(),
        "iscsi_extent": _int(),
        "iscsi_lunid": _int(minimum=0),
    },
}

# Request bodies: every field optional (PUT is partial); ids may be sent as strings.
_ID_IN = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^[0-9]+$"}]}
_NULLABLE_ID_IN = {**_ID_IN, "nullable": True}
FN_INPUTS: dict[str, S] = {
    "PortalInput": {
        "iscsi_target_portal_comment": _str(),
        "iscsi_target_portal_ips": {"type": "array", "items": _str(example="127.0.0.1:3260")},
        "iscsi_target_portal_discoveryauthmethod": _str(enum=AUTH_METHODS),
        "iscsi_target_portal_discoveryauthgroup": _NULLABLE_ID_IN,
    },
    "AuthorizedInitiatorInput": {
        "iscsi_target_initiator_initiators": _str(example="ALL"),
        "iscsi_target_initiator_auth_network": _str(example="ALL"),
        "iscsi_target_initiator_comment": _str(),
    },
    "AuthCredentialInput": {
        "iscsi_target_auth_tag": _ID_IN,
        "iscsi_target_auth_user": _str(),
        "iscsi_target_auth_secret": _str(minLength=12, maxLength=16),
        "iscsi_target_auth_peeruser": _str(),
        "iscsi_target_auth_peersecret": _str(minLength=12, maxLength=16),
    },
    "TargetInput": {
        "iscsi_target_name": _str(pattern="^[-a-z0-9.:]+$"),
        "iscsi_target_alias": _str(nullable=True),
    },
    "TargetGroupInput": {
        "iscsi_target": _ID_IN,
        "iscsi_target_portalgroup": _ID_IN,
        "iscsi_target_initiatorgroup": _NULLABLE_ID_IN,
        "iscsi_target_authgroup": _NULLABLE_ID_IN,
        "iscsi_target_authtype": _str(enum=AUTH_METHODS),
        "iscsi_target_initialdigest": _str(),
    },
    "ExtentInput": {
        "iscsi_target_extent_name": _str(),
        "iscsi_target_extent_type": _str(enum=["File", "Disk"]),
        "iscsi_target_extent_path": _str(example="vol1.img"),
        "iscsi_target_extent_disk": _str(),
        "iscsi_target_extent_filesize": _str(example="10MB"),
        "iscsi_target_extent_blocksize": _int(enum=[512, 1024, 2048, 4096]),
        "iscsi_target_extent_pblocksize": _bool(),
        "iscsi_target_extent_rpm": {"oneOf": [_str(), _int()]},
        "iscsi_target_extent_serial": _str(),
        "iscsi_target_extent_ro": _bool(),
        "iscsi_target_extent_insecure_tpc": _bool(),
        "iscsi_target_extent_xen": _bool(),
        "iscsi_target_extent_avail_threshold": _int(nullable=True, minimum=0, maximum=99),
        "iscsi_target_extent_comment": _str(),
    },
    "TargetToExtentInput": {
        "iscsi_target": _ID_IN,
        "iscsi_extent": _ID_IN,
        "iscsi_lunid": {**_NULLABLE_ID_IN},
    },
}

# Whole-body examples that the server accepts on a fresh state dir (schemathesis starts from these).
INPUT_EXAMPLES: dict[str, S] = {
    "PortalInput": {"iscsi_target_portal_ips": ["127.0.0.1:3270"], "iscsi_target_portal_comment": "lab"},
    "AuthorizedInitiatorInput": {
        "iscsi_target_initiator_initiators": "ALL",
        "iscsi_target_initiator_auth_network": "127.0.0.0/8",
    },
    "AuthCredentialInput": {
        "iscsi_target_auth_tag": 1,
        "iscsi_target_auth_user": "user",
        "iscsi_target_auth_secret": "secretsecret",
    },
    "TargetInput": {"iscsi_target_name": "target0", "iscsi_target_alias": None},
    "TargetGroupInput": {"iscsi_target": 1, "iscsi_target_portalgroup": 1, "iscsi_target_authtype": "None"},
    "ExtentInput": {
        "iscsi_target_extent_name": "extent0",
        "iscsi_target_extent_type": "File",
        "iscsi_target_extent_path": "extent0.img",
        "iscsi_target_extent_filesize": "1MB",
    },
    "TargetToExtentInput": {"iscsi_target": 1, "iscsi_extent": 1, "iscsi_lunid": None},
}

RESOURCE_SCHEMAS = {
    "portal": "Portal",
    "authorizedinitiator": "AuthorizedInitiator",
    "authcredential": "AuthCredential",
    "target": "Target",
    "targetgroup": "TargetGroup",
    "extent": "Extent",
    "targettoextent": "TargetToExtent",
}

HNAS_TARGET: S = {
    "accessConfig": _str(),
    "alias": _str(),
    "comment": _str(),
    "globalUniqueName": _str(),
    "isAuthenticationEnabled": _bool(),
    "iscsiLogicalUnits": {
        "type": "array",
        "items": _obj(
            {"logicalUnit": _int(), "logicalUnitAlias": _str(), "objectId": _str()},
            ["logicalUnit", "logicalUnitAlias", "objectId"],
        ),
    },
    "objectId": _str(),
    "secret": _str(),
    "virtualServerId": _int(),
}

ERROR_DETAIL = _obj(
    {
        "detail": _str(),
        "fault": _str(),
        "fileName": _str(),
        "function": _str(),
        "lineNumber": _int(),
        "message": _str(),
        "reason": _str(),
        "returnedValue": _int(),
        "subCode": _int(),
    }
)


def _json(schema: S, description: str) -> S:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _fn_errors(*codes: int) -> S:
    table = {
        400: _json(_ref("FreeNASError"), "Invalid values, invalid JSON or bad paging parameters"),
        401: _json(_ref("FreeNASError"), "Missing or wrong credentials"),
        404: _json(_ref("FreeNASError"), "No object with this id"),
        409: _json(_ref("FreeNASError"), "Uniqueness conflict or object in use"),
        413: {"description": "Request body too large"},
    }
    return {str(c): table[c] for c in codes}


def _hn_errors(*codes: int) -> S:
    table = {
        400: _json(_ref("HnasBadRequest"), "Bad Request"),
        401: _json(_ref("HnasForbidden"), "Unauthorized - credentials or API key missing or invalid"),
        403: _json(_ref("HnasForbidden"), "Forbidden - the API key does not cover this virtual server"),
        404: _json(_ref("HnasError"), "Not Found - a resource specified was not found"),
        409: _json(_ref("HnasBadRequest"), "Conflict - the name is already used or the target is in use"),
        413: {"description": "Request body too large"},
    }
    return {str(c): table[c] for c in codes}


PAGING = [
    {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 0}},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 20}},
]


def _id_param() -> S:
    return {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}


def _fn_paths() -> S:
    paths: S = {}
    for name, schema in RESOURCE_SCHEMAS.items():
        tag = ["FreeNAS v1.0"]
        body = {"required": False, "content": {"application/json": {"schema": _ref(schema + "Input")}}}
        paths[f"{FN_BASE}/{name}/"] = {
            "get": {
                "tags": tag,
                "operationId": f"list_{name}",
                "summary": f"List {name} objects",
                "parameters": PAGING,
                "responses": {
                    "200": _json({"type": "array", "items": _ref(schema)}, "The objects, by id"),
                    **_fn_errors(400, 401),
                },
            },
            "post": {
                "tags": tag,
                "operationId": f"create_{name}",
                "summary": f"Create a {name}",
                "requestBody": body,
                "responses": {
                    "201": {
                        **_json(_ref(schema), "Created"),
                        "links": {
                            f"{verb.capitalize()}{schema}": {
                                "operationId": f"{verb}_{name}",
                                "parameters": {"id": "$response.body#/id"},
                            }
                            for verb in ("get", "update", "delete")
                        },
                    },
                    **_fn_errors(400, 401, 409, 413),
                },
            },
        }
        item: S = {
            "parameters": [_id_param()],
            "get": {
                "tags": tag,
                "operationId": f"get_{name}",
                "responses": {"200": _json(_ref(schema), "The object"), **_fn_errors(401, 404)},
            },
            "put": {
                "tags": tag,
                "operationId": f"update_{name}",
                "summary": f"Update a {name} (partial; null leaves a value unchanged)",
                "requestBody": body,
                "responses": {"200": _json(_ref(schema), "Updated"), **_fn_errors(400, 401, 404, 409, 413)},
            },
            "delete": {
                "tags": tag,
                "operationId": f"delete_{name}",
                "responses": {"204": {"description": "Deleted"}, **_fn_errors(400, 401, 404, 409, 413)},
            },
        }
        if name == "extent":
            item["delete"]["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": _obj({"delete": _bool()})}},
            }
        paths[f"{FN_BASE}/{name}/{{id}}/"] = item
    gc = _obj(
        {
            "id": _int(),
            "iscsi_basename": _str(),
            "iscsi_isns_servers": _str(),
            "iscsi_pool_avail_threshold": _int(nullable=True),
        },
        ["id", "iscsi_basename", "iscsi_isns_servers", "iscsi_pool_avail_threshold"],
    )
    paths[f"{FN_BASE}/globalconfiguration/"] = {
        "get": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "get_globalconfiguration",
            "responses": {"200": _json(gc, "Global configuration"), **_fn_errors(401)},
        },
        "put": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "update_globalconfiguration",
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": _obj(
                            {
                                "iscsi_basename": _str(example="iqn.2026-11.org.example"),
                                "iscsi_isns_servers": _str(),
                                "iscsi_pool_avail_threshold": _int(nullable=True, minimum=0, maximum=99),
                            }
                        )
                    }
                },
            },
            "responses": {"200": _json(gc, "Updated"), **_fn_errors(400, 401, 413)},
        },
    }
    svc = _obj(
        {
            "id": _int(),
            "srv_service": _str(),
            "srv_enable": _bool(),
            "srv_state": _str(enum=["RUNNING", "STOPPED"]),
        },
        ["id", "srv_service", "srv_enable", "srv_state"],
    )
    paths["/api/v1.0/services/services/"] = {
        "get": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "list_services",
            "parameters": PAGING,
            "responses": {"200": _json({"type": "array", "items": svc}, "Services"), **_fn_errors(400, 401)},
        }
    }
    paths["/api/v1.0/services/services/iscsitarget/"] = {
        "get": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "get_iscsitarget_service",
            "responses": {"200": _json(svc, "The iSCSI service"), **_fn_errors(401)},
        },
        "put": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "update_iscsitarget_service",
            "summary": "Start (true) or stop (false) every portal",
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": _obj({"srv_enable": {"oneOf": [_bool(), _str(enum=["true", "false"])]}})
                    }
                },
            },
            "responses": {"200": _json(svc, "The iSCSI service"), **_fn_errors(400, 401, 413)},
        },
    }
    paths["/api/v1.0/system/version/"] = {
        "get": {
            "tags": ["FreeNAS v1.0"],
            "operationId": "get_version",
            "responses": {
                "200": _json(
                    _obj({"fullversion": _str(), "version": _str(), "name": _str()}, ["fullversion", "name"]),
                    "Version",
                ),
                **_fn_errors(401),
            },
        }
    }
    return paths


def _hn_paths() -> S:
    tag = ["Hitachi NAS v9"]
    sec = [{"basicAuth": []}, {"api_key": []}, {"x_subsystem_user": [], "x_subsystem_password": []}]
    created = _obj({"iscsiTarget": _ref("IscsiTarget"), "uri": _str()}, ["iscsiTarget", "uri"])
    patch_body = _obj(
        {
            "accessConfig": _str(example=""),
            "alias": _str(example="example"),
            "comment": _str(example="This is a comment"),
            "enableAuthentication": _bool(),
            "regenerateGUN": _bool(),
            "secret": _str(example="secret1234"),
        }
    )
    post_body = {
        **_obj(
            {
                **patch_body["properties"],
                "virtualServerId": _int(minimum=0, maximum=255),
                "name": _str(pattern="^[-a-z0-9.:]+$"),
            },
            ["alias"],
        ),
        "example": {"alias": "Target1", "comment": "This is a comment", "accessConfig": "", "virtualServerId": 1},
    }
    oid = {"name": "iscsiTargetObjectId", "in": "path", "required": True, "schema": _str()}
    location = {"Location": {"description": "URI of the object", "schema": _str()}}
    return {
        f"{HN_BASE}": {
            "get": {
                "tags": tag,
                "security": sec,
                "operationId": "list_iscsi_targets",
                "responses": {
                    "200": _json(
                        _obj({"iscsiTargets": {"type": "array", "items": _ref("IscsiTarget")}}, ["iscsiTargets"]),
                        "The iSCSI targets the credentials may see",
                    ),
                    **_hn_errors(401),
                },
            },
            "post": {
                "tags": tag,
                "security": sec,
                "operationId": "create_iscsi_target",
                "requestBody": {"required": True, "content": {"application/json": {"schema": post_body}}},
                "responses": {
                    "201": {
                        **_json(created, "Created"),
                        "headers": location,
                        "links": {
                            f"{verb.capitalize()}IscsiTarget": {
                                "operationId": f"{verb}_iscsi_target",
                                "parameters": {"iscsiTargetObjectId": "$response.body#/iscsiTarget/objectId"},
                            }
                            for verb in ("get", "update", "delete")
                        },
                    },
                    **_hn_errors(400, 401, 403, 409, 413),
                },
            },
        },
        f"{HN_BASE}/{{iscsiTargetObjectId}}": {
            "parameters": [oid],
            "get": {
                "tags": tag,
                "security": sec,
                "operationId": "get_iscsi_target",
                "responses": {
                    "200": _json(_obj({"iscsiTarget": _ref("IscsiTarget")}, ["iscsiTarget"]), "The iSCSI target"),
                    **_hn_errors(401, 403, 404),
                },
            },
            "patch": {
                "tags": tag,
                "security": sec,
                "operationId": "update_iscsi_target",
                "summary": "Update an iSCSI target",
                "requestBody": {"required": False, "content": {"application/json": {"schema": patch_body}}},
                "responses": {
                    "303": {
                        **_json(created, "See Other - the object has been updated by the requested operation"),
                        "headers": location,
                    },
                    **_hn_errors(400, 401, 403, 404, 413),
                },
            },
            "delete": {
                "tags": tag,
                "security": sec,
                "operationId": "delete_iscsi_target",
                "responses": {"204": {"description": "Deleted"}, **_hn_errors(401, 403, 404, 409)},
            },
        },
    }


@functools.cache
def document() -> S:
    schemas: S = {}
    for name, props in FN_OBJECTS.items():
        schemas[name] = _obj(props, list(props))
    for name, props in FN_INPUTS.items():
        schemas[name] = {**_obj(props), "example": INPUT_EXAMPLES[name]}
    schemas["FreeNASError"] = {
        "type": "object",
        "description": '{"field": ["message", ...]} ("__all__" for the whole object) or {"error": "message"}',
        "additionalProperties": {"oneOf": [_str(), {"type": "array", "items": _str()}]},
    }
    schemas["IscsiTarget"] = _obj(HNAS_TARGET, list(HNAS_TARGET))
    schemas["HnasBadRequest"] = _obj({"errorCode": _int(), "errorMsg": _str()}, ["errorCode", "errorMsg"])
    schemas["HnasForbidden"] = _obj({"errorMsg": _str()}, ["errorMsg"])
    schemas["HnasError"] = _obj(
        {"errorCode": _int(), "errorDetail": ERROR_DETAIL, "errorMsg": _str()}, ["errorCode", "errorDetail", "errorMsg"]
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "pyscsi-target management API",
            "version": __version__,
            "description": "FreeNAS v1.0 iSCSI resources and Hitachi NAS v9 iscsi-targets over one configuration. "
            "Trailing slashes are optional on every path.",
        },
        "servers": [{"url": "/"}],
        "security": [{"basicAuth": []}],
        "tags": [{"name": "FreeNAS v1.0"}, {"name": "Hitachi NAS v9"}],
        "paths": {**_fn_paths(), **_hn_paths()},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic"},
                "api_key": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
                "x_subsystem_user": {"type": "apiKey", "in": "header", "name": "X-Subsystem-User"},
                "x_subsystem_password": {"type": "apiKey", "in": "header", "name": "X-Subsystem-Password"},
            },
        },
    }
