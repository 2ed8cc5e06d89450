"""The native namespace, ``/api/pyscsi/v1/``: what the FreeNAS and Hitachi documents have no
words for.

- ``GET sessions``: live sessions with their negotiated parameters (``Engine.sessions()``).
- ``GET targets``, ``GET targets/{id}``, ``PATCH targets/{id}``: the settings of a target the
  FreeNAS and Hitachi documents have no field for: ``allow_warm_reset`` / ``allow_cold_reset``
  (TARGET WARM/COLD RESET from initiators, refused by default).
- ``GET extents``: extents with what their files or devices measure now (size, allocation).
- ``POST extents``: create a File extent with ``allocation`` sparse, preallocate or zero, or
  (``type`` RBD) an extent on a Ceph RBD image, made when missing, as a job (202 + ``Location``
  of the job); ``POST extents/{id}/resize`` grows one the same way;
  ``POST extents/import?name=...`` takes a raw image as the body (``dry_run=true`` validates
  the query and ``size`` without a body, so a client can check before sending gigabytes).
- ``GET jobs``, ``GET jobs/{id}``, ``DELETE jobs/{id}`` (cancel a running job; forget a
  finished one).
- ``GET config`` (``redact=true`` leaves secrets out) and ``PUT config`` (``dry_run``, ``force``):
  export and import of the whole configuration (``pyscsi_target.config.export``).

Errors are ``{"error": "one line", "fields": {"field": ["message", ...]}}`` with 400, 404,
409 or 411; the field names are this namespace's (the model's).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from pyscsi_target.config.errors import ConfigError, Errors
from pyscsi_target.config.export import apply_import, export_config, plan_import
from pyscsi_target.config.extent_allocation import SPARSE
from pyscsi_target.config.extent_jobs import (
    preview_new_file_extent,
    run_import,
    start_create,
    start_create_rbd,
    start_resize,
)
from pyscsi_target.config.fields import UNSET, Boolean, Field, Schema
from pyscsi_target.jobs import RUNNING, SUCCEEDED, JobError, JobRegistry

from . import native_tables as tables
from .common import SERVICE_KEY, STORE_KEY, BadJSON, json_response, read_object
from .openapi import ApiDoc, Operation, Response, common_errors, obj, ref, with_common_errors
from .tables import Table

BASE = "/api/pyscsi/v1"
TAG = "pyscsi-target"
JOBS_KEY: web.AppKey[JobRegistry] = web.AppKey("jobs", JobRegistry)
MAX_CONFIG = 64 << 20  # an export of thousands of objects is a few MiB
FLAG = Boolean()


# --- responses -------------------------------------------------------------------------------


def error(status: int, message: str, fields: dict[str, list[str]] | None = None) -> web.Response:
    return json_response({"error": message, "fields": fields or {}}, status)


def _config_error(exc: ConfigError, table: Table | None = None) -> web.Response:
    status = {"invalid": 400, "conflict": 409, "not_found": 404}[exc.kind]
    fields = table.errors_to_api(exc.errors) if table is not None else exc.errors
    message = "; ".join(msg if key == "__all__" else f"{key}: {msg}" for key, msgs in fields.items() for msg in msgs)
    return error(status, message, fields)


def _flag(request: web.Request, name: str) -> bool | web.Response:
    if name not in request.query:
        return False
    value = Field(name, FLAG).read(request.query, errs := Errors())
    if value is UNSET:
        return error(400, f"{name}: {errs.errors[name][0]}", errs.errors)
    return bool(value)


async def _body(request: web.Request) -> dict[str, object] | web.Response:
    try:
        return await read_object(request)
    except BadJSON:
        return error(400, "The request body is not a JSON object.")


def _jobs(request: web.Request) -> JobRegistry:
    return request.app[JOBS_KEY]


def _job_created(job: Any) -> web.Response:
    resp = json_response(tables.job_body(job), 202)
    resp.headers["Location"] = f"{BASE}/jobs/{job.id}"
    return resp


# --- sessions and extents --------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    engine = request.app[SERVICE_KEY].engine
    # The engine's snapshots; a configuration without an engine (tests, offline) has none.
    sessions = getattr(engine, "sessions", None)
    snaps: list[dict[str, Any]] = sessions() if callable(sessions) else []
    model = request.app[SERVICE_KEY].model
    return json_response([tables.SESSION.serialize(model, s) for s in sorted(snaps, key=lambda s: s["tsih"])])


def _target_id(request: web.Request) -> int | None:
    text = request.match_info["id"]
    return int(text) if text.isdigit() and len(text) < 19 else None


async def list_targets(request: web.Request) -> web.Response:
    model = request.app[SERVICE_KEY].model
    return json_response([tables.TARGET.serialize(model, model.targets[k]) for k in sorted(model.targets)])


async def get_target(request: web.Request) -> web.Response:
    model = request.app[SERVICE_KEY].model
    t = model.targets.get(_target_id(request) or 0)
    if t is None:
        return error(404, f"Target {request.match_info['id']} does not exist.")
    return json_response(tables.TARGET.serialize(model, t))


async def update_target(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    service = request.app[SERVICE_KEY]
    try:
        t = await service.update_target(request.match_info["id"], tables.TARGET.to_model(body, drop_null=True))
    except ConfigError as exc:
        return _config_error(exc, tables.TARGET)
    return json_response(tables.TARGET.serialize(service.model, t))


async def list_extents(request: web.Request) -> web.Response:
    model = request.app[SERVICE_KEY].model
    extents = [model.extents[k] for k in sorted(model.extents)]
    ceph = request.app[SERVICE_KEY].ceph
    usages = await asyncio.to_thread(lambda: [tables.ExtentUsage(e, ceph) for e in extents])  # stat may block
    return json_response([tables.EXTENT_USAGE.serialize(model, u) for u in usages])


def _allocation(fields: dict[str, object]) -> str:
    value = fields.pop("allocation", None)
    return SPARSE if value is None else str(value)


async def create_extent(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    fields = tables.EXTENT_CREATE.to_model(body, drop_null=True)
    allocation = _allocation(fields)
    try:
        if fields.get("type") == "RBD":
            job = start_create_rbd(request.app[SERVICE_KEY], _jobs(request), fields)
        else:
            job = start_create(request.app[SERVICE_KEY], _jobs(request), {**fields, "type": "File"}, allocation)
    except ConfigError as exc:
        return _config_error(exc, tables.EXTENT_CREATE)
    except JobError as exc:
        return error(exc.status, str(exc))
    return _job_created(job)


async def resize_extent(request: web.Request) -> web.Response:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    fields = tables.EXTENT_RESIZE.to_model(body, drop_null=True)
    if "filesize" not in fields:
        return error(400, "filesize: This field is required.", {"filesize": ["This field is required."]})
    allocation = _allocation(fields)
    try:
        job = start_resize(request.app[SERVICE_KEY], _jobs(request), request.match_info["id"], fields["filesize"],
                           allocation)
    except ConfigError as exc:
        return _config_error(exc, tables.EXTENT_RESIZE)
    except JobError as exc:
        return error(exc.status, str(exc))
    return _job_created(job)


def _import_size(request: web.Request) -> int | web.Response:
    declared = request.query.get("size")
    length = request.content_length
    if declared is not None:
        if not declared.isdigit() or len(declared) > 19:
            return error(400, "size: Enter the image size in bytes.", {"size": ["Enter the image size in bytes."]})
        if length is not None and length and int(declared) != length:
            return error(400, f"size {declared} differs from the body's length {length}.")
        return int(declared)
    if length is None:
        return error(411, "Send the image with a Content-Length (or its size in the size parameter).")
    return length


async def import_extent(request: web.Request) -> web.Response:
    size = _import_size(request)
    if isinstance(size, web.Response):
        return size
    dry_run = _flag(request, "dry_run")
    if isinstance(dry_run, web.Response):
        return dry_run
    query = {k: v for k, v in request.query.items() if k not in ("size", "dry_run")}
    fields = {**tables.EXTENT_IMPORT.to_model(query, drop_null=True), "type": "File"}
    service, jobs = request.app[SERVICE_KEY], _jobs(request)
    try:
        if dry_run:  # validation only: no job, no file
            e, _size = preview_new_file_extent(service, {**fields, "filesize": str(size)})
            return json_response({"name": e.name, "path": e.path, "size": size, "dry_run": True})
        job = await run_import(service, jobs, fields, size, request.content.iter_chunked(1 << 20))
    except ConfigError as exc:
        return _config_error(exc, tables.EXTENT_IMPORT)
    except JobError as exc:
        return error(exc.status, str(exc))
    if job.state != SUCCEEDED:
        return json_response({"error": job.message, "fields": {}, "job": tables.job_body(job)}, 400)
    return json_response(tables.job_body(job), 201)


# --- jobs --------------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.Response:
    jobs = sorted(_jobs(request).list(), key=lambda j: j.created)
    return json_response([tables.job_body(j) for j in jobs])


async def get_job(request: web.Request) -> web.Response:
    try:
        return json_response(tables.job_body(_jobs(request).get(request.match_info["id"])))
    except JobError as exc:
        return error(exc.status, str(exc))


async def delete_job(request: web.Request) -> web.Response:
    registry, job_id = _jobs(request), request.match_info["id"]
    try:
        job = registry.get(job_id)
        if job.state == RUNNING:
            return json_response(tables.job_body(registry.cancel(job_id)), 202)
        registry.forget(job_id)
    except JobError as exc:
        return error(exc.status, str(exc))
    return web.Response(status=204, content_type="application/json")


# --- configuration export/import ---------------------------------------------------------------


async def get_config(request: web.Request) -> web.Response:
    redact = _flag(request, "redact")
    if isinstance(redact, web.Response):
        return redact
    service = request.app[SERVICE_KEY]
    return json_response(export_config(service.model, request.app[STORE_KEY], redact=redact))


async def put_config(request: web.Request) -> web.Response:
    flags = [_flag(request, name) for name in ("dry_run", "force")]
    for flag in flags:
        if isinstance(flag, web.Response):
            return flag
    dry_run, force = (bool(f) for f in flags)
    # StreamReader.read(n) returns what has arrived, not n bytes: gather to the end.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_CONFIG:
            return error(413, f"A configuration larger than {MAX_CONFIG} bytes is refused.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return error(400, "The request body is not JSON.")
    service = request.app[SERVICE_KEY]
    engine = service.engine
    try:
        plan = plan_import(doc, service.model, service.roots,
                           engine.session_count if engine is not None else lambda _t: 0,
                           current_api_keys=request.app[STORE_KEY].api_key_rows(), force=force)
        report = plan.report() if dry_run else await apply_import(service, plan)
    except ConfigError as exc:
        return _config_error(exc)
    return json_response({**report, "applied": not dry_run})


# --- routes ------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int, Response]:
    table = {
        400: Response("Invalid values or body", ref("NativeError")),
        401: Response("Missing or wrong credentials", ref("NativeError")),
        404: Response("No such object", ref("NativeError")),
        409: Response("Conflict (name or path in use, target in use, job not cancellable)", ref("NativeError")),
        411: Response("The image's length is missing", ref("NativeError")),
        413: Response("Request body too large", ref("NativeError")),
        403: Response("A browser write from another site", ref("NativeError")),
        **common_errors(ref("NativeError")),
    }
    return {c: table[c] for c in with_common_errors(codes)}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    out: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


# The import's fields travel in the query, and a request line is at most 8190 bytes: the
# document promises what fits (ASCII, shorter strings) even percent-encoded.
_QUERY_MAX = {"name": 64, "path": 1024, "comment": 256}


def _query_schema(name: str, schema: Schema) -> Schema:
    if schema.get("type") != "string" or "enum" in schema:
        return schema
    return {"pattern": "^[ -~]*$", **schema, "maxLength": min(schema.get("maxLength", 256), _QUERY_MAX.get(name, 64))}


_FLAG_SCHEMA: Schema = {"type": "boolean"}
_REPORT: Schema = obj({
    "changes": {"type": "object", "additionalProperties": True},
    "global_config_changed": {"type": "boolean"},
    "files_created": {"type": "array", "items": {"type": "string"}},
    "files_grown": {"type": "array", "items": {"type": "string"}},
    "api_keys_replaced": {"type": "boolean"},
    "sessions_dropped": {"type": "integer"},
    "applied": {"type": "boolean"},
}, required=("changes", "applied"))


async def _close_jobs(app: web.Application) -> None:
    await app[JOBS_KEY].close()


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    app[JOBS_KEY] = JobRegistry()
    app.on_shutdown.append(_close_jobs)
    doc.component("NativeError", obj({"error": {"type": "string"},
                                      "fields": {"type": "object", "additionalProperties": True}}, ("error",)))
    session = doc.component("Session", tables.SESSION.output_schema())
    target = doc.component("NativeTarget", tables.TARGET.output_schema())
    job = doc.component("Job", tables.JOB.output_schema())
    usage = doc.component("ExtentUsage", tables.EXTENT_USAGE.output_schema())
    job_id: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    object_id: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
    accepted = Response("The job started", job, headers={"Location": {"schema": {"type": "string"}}})
    import_query = [_query(c.api, _query_schema(c.api, c.field.type.input_schema()))
                    for c in tables.EXTENT_IMPORT.columns if c.field and c is not tables.IMPORT_SIZE]
    ops = (
        Operation("GET", f"{BASE}/sessions/", list_sessions, "native_list_sessions", TAG,
                  {200: Response("Live sessions", {"type": "array", "items": session}), **_errors(401)},
                  summary="Live iSCSI sessions with their negotiated parameters"),
        Operation("GET", f"{BASE}/targets/", list_targets, "native_list_targets", TAG,
                  {200: Response("Targets with their native settings", {"type": "array", "items": target}),
                   **_errors(401)}),
        Operation("GET", f"{BASE}/targets/{{id}}/", get_target, "native_get_target", TAG,
                  {200: Response("The target's native settings", target), **_errors(401, 404)},
                  path_params=(object_id,)),
        Operation("PATCH", f"{BASE}/targets/{{id}}/", update_target, "native_update_target", TAG,
                  {200: Response("The target's native settings, changed", target), **_errors(400, 401, 404)},
                  summary="Allow or refuse TARGET WARM/COLD RESET from initiators",
                  request=tables.TARGET.input_schema(create=False), request_required=True,
                  path_params=(object_id,)),
        Operation("GET", f"{BASE}/extents/", list_extents, "native_list_extents", TAG,
                  {200: Response("Extents and their current size", {"type": "array", "items": usage}),
                   **_errors(401)}),
        Operation("POST", f"{BASE}/extents/", create_extent, "native_create_extent", TAG,
                  {202: accepted, **_errors(400, 401, 409, 413)},
                  summary="Create a File extent (sparse, preallocated or zero-filled) or an RBD extent (a job)",
                  request=tables.EXTENT_CREATE.input_schema(), request_required=True),
        Operation("POST", f"{BASE}/extents/{{id}}/resize/", resize_extent, "native_resize_extent", TAG,
                  {202: accepted, **_errors(400, 401, 404, 409, 413)},
                  summary="Grow a File extent, allocating the new range (a job)",
                  request=tables.EXTENT_RESIZE.input_schema(), request_required=True, path_params=(object_id,)),
        Operation("POST", f"{BASE}/extents/import/", import_extent, "native_import_extent", TAG,
                  {200: Response("dry_run: the import would be accepted", {"type": "object"}),
                   201: Response("The image is imported (the finished job)", job),
                   **_errors(400, 401, 409, 411)},
                  summary="Import a raw image (the body) into a new File extent",
                  request={"type": "string", "format": "binary"},
                  query=(*import_query, _query("size", {"type": "integer", "minimum": 0}, "image size in bytes"),
                         _query("dry_run", _FLAG_SCHEMA, "validate only; no body needed"))),
        Operation("GET", f"{BASE}/jobs/", list_jobs, "native_list_jobs", TAG,
                  {200: Response("Jobs, oldest first", {"type": "array", "items": job}), **_errors(401)}),
        Operation("GET", f"{BASE}/jobs/{{id}}/", get_job, "native_get_job", TAG,
                  {200: Response("The job", job), **_errors(401, 404)}, path_params=(job_id,)),
        Operation("DELETE", f"{BASE}/jobs/{{id}}/", delete_job, "native_delete_job", TAG,
                  {202: Response("Cancelling the running job", job), 204: Response("Forgotten"),
                   **_errors(401, 404, 409)},
                  summary="Cancel a running job, or forget a finished one", path_params=(job_id,)),
        Operation("GET", f"{BASE}/config/", get_config, "native_export_config", TAG,
                  {200: Response("The whole configuration (versioned)", {"type": "object"}), **_errors(400, 401)},
                  query=(_query("redact", _FLAG_SCHEMA, "leave CHAP secrets and API key hashes out"),)),
        Operation("PUT", f"{BASE}/config/", put_config, "native_import_config", TAG,
                  {200: Response("What the import changed (or would change)", _REPORT),
                   **_errors(400, 401, 404, 409, 413)},
                  summary="Import a configuration: the difference is applied as one change",
                  request={"type": "object"}, request_required=True,
                  query=(_query("dry_run", _FLAG_SCHEMA, "validate and report only"),
                         _query("force", _FLAG_SCHEMA, "drop sessions of targets the import removes"))),
    )
    for op in ops:
        doc.add(app, op)
