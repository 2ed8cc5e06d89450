"""The workbench in the native namespace (``/api/pyscsi/v1/``): live introspection, fault
injection, PDU capture and strict mode, for people developing and testing initiators.

- ``GET sessions/{tsih}``: one session in depth (connection, CmdSN window, outstanding tasks,
  counters, violation report); ``POST sessions/{tsih}/logout`` asks it to log out (Async
  Message, ``within`` seconds); ``DELETE sessions/{tsih}`` drops its connection
  (``announce=true`` sends the Async Message "dropping all connections" first).
- ``GET logical-units``: each LU's task set, reservations, unit attentions pending per I_T
  nexus and ALUA state.
- ``GET violations``: the recent refused logins and every live session's violations, each
  with the section of the standard and the rule.
- ``GET|POST|DELETE faults``, ``GET|DELETE faults/{id}``, ``GET fault-log``: fault rules
  (pyscsi_target/workbench/faults.py says what each kind does).
- ``GET|POST captures``, ``GET|DELETE captures/{id}``, ``POST captures/{id}/stop``,
  ``GET captures/{id}/pcapng``: PDU captures.
- ``GET strict``, ``PUT|DELETE strict/{target}``: strict mode per target.

None of it is persisted: it lasts until removed or until the daemon stops.  Errors are the
namespace's ``{"error": ..., "fields": {...}}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pyscsi_target.config.fields import Schema
from pyscsi_target.server.engine import Engine
from pyscsi_target.values import parse_size
from pyscsi_target.workbench import Workbench
from pyscsi_target.workbench.capture import DEFAULT_LIMIT, MAX_LIMIT, Capture
from pyscsi_target.workbench.faults import (
    ASYNC_EVENTS,
    DROP_HOW,
    FIELDS,
    KINDS,
    REJECT_REASONS,
    STATUSES,
    FaultError,
    Scope,
    rule_from_request,
)
from pyscsi_target.workbench.introspection import logical_units, session_detail

from .common import SERVICE_KEY, BadJSON, json_response, read_object
from .native import BASE, TAG, error
from .openapi import ApiDoc, Operation, Response, obj

PCAPNG = "application/x-pcapng"


def _engine(request: web.Request) -> Engine | web.Response:
    engine = request.app[SERVICE_KEY].engine
    if not isinstance(engine, Engine):
        return error(503, "No iSCSI engine runs behind this API.")
    return engine


def _wb(request: web.Request) -> Workbench | web.Response:
    engine = _engine(request)
    return engine if isinstance(engine, web.Response) else engine.workbench


def _engine_and_id(request: web.Request, name: str) -> tuple[Engine, int] | web.Response:
    """The engine and the integer path parameter ``name`` (404 if it is not a number)."""
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    text = request.match_info[name]
    if not text.isdigit() or len(text) > 9:
        return error(404, f"No such {name}.")
    return engine, int(text)


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        return await read_object(request)
    except BadJSON:
        return error(400, "The request body is not a JSON object.")


def _resolve_target(engine: Engine, name: str) -> str | None:
    """A target's IQN from its IQN or its short name (as the FreeNAS API names it)."""
    rt = engine.target_by_iqn(name)
    if rt is not None:
        return rt.iqn
    model = engine.model
    for t in model.targets.values():
        if t.name == name:
            return model.target_iqn(t)
    return None


def _fault_error(exc: FaultError) -> web.Response:
    return error(400, str(exc), {exc.field: [exc.message]})


# --- sessions, logical units, violations -------------------------------------------------------


async def get_session(request: web.Request) -> web.Response:
    found = _engine_and_id(request, "tsih")
    if isinstance(found, web.Response):
        return found
    engine, tsih = found
    s = engine.session_registry.by_tsih.get(tsih)
    if s is None:
        return error(404, f"No session with TSIH {tsih}.")
    return json_response(session_detail(engine, s))


async def drop_session(request: web.Request) -> web.Response:
    found = _engine_and_id(request, "tsih")
    if isinstance(found, web.Response):
        return found
    engine, tsih = found
    proto = engine.workbench.session_proto(tsih)
    if proto is None:
        return error(404, f"No session with TSIH {tsih} has a connection.")
    announce = request.query.get("announce", "").lower() in ("1", "true", "yes")
    proto.close(abort_tasks=True, announce=announce)
    return web.Response(status=204, content_type="application/json")


async def logout_session(request: web.Request) -> web.Response:
    found = _engine_and_id(request, "tsih")
    if isinstance(found, web.Response):
        return found
    engine, tsih = found
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    within = body.get("within", 5)
    if isinstance(within, bool) or not isinstance(within, int) or not 1 <= within <= 3600:
        return error(400, "within: Enter seconds from 1 to 3600.", {"within": ["Enter seconds from 1 to 3600."]})
    proto = engine.workbench.session_proto(tsih)
    if proto is None:
        return error(404, f"No session with TSIH {tsih} has a connection.")
    proto.request_logout(within)
    return json_response({"tsih": tsih, "within": within}, 202)


async def list_logical_units(request: web.Request) -> web.Response:
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    return json_response(logical_units(engine))


async def list_violations(request: web.Request) -> web.Response:
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    out: list[dict[str, Any]] = [{**v.info(), "session": None} for v in engine.workbench.login_violations]
    for s in engine.session_registry.by_tsih.values():
        out += [{**v.info(), "session": s.tsih, "initiator": s.initiator_name,
                 "target": s.target.iqn if s.target else None} for v in s.violations]
    out.sort(key=lambda v: v["time"])
    return json_response(out)


# --- faults ------------------------------------------------------------------------------------


async def list_faults(request: web.Request) -> web.Response:
    wb = _wb(request)
    if isinstance(wb, web.Response):
        return wb
    return json_response([r.describe() for r in wb.faults.rules.values()])


async def add_fault(request: web.Request) -> web.Response:
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    try:
        rule = rule_from_request(body, lambda name: _resolve_target(engine, name))
        engine.workbench.add_rule(rule)
    except FaultError as exc:
        return _fault_error(exc)
    return json_response(rule.describe(), 201, {"Location": f"{BASE}/faults/{rule.id}"})


async def clear_faults(request: web.Request) -> web.Response:
    wb = _wb(request)
    if isinstance(wb, web.Response):
        return wb
    return json_response({"removed": wb.clear_rules()})


async def get_fault(request: web.Request) -> web.Response:
    found = _engine_and_id(request, "id")
    if isinstance(found, web.Response):
        return found
    engine, rule_id = found
    rule = engine.workbench.faults.rules.get(rule_id)
    if rule is None:
        return error(404, f"No fault rule {rule_id}.")
    return json_response(rule.describe())


async def delete_fault(request: web.Request) -> web.Response:
    found = _engine_and_id(request, "id")
    if isinstance(found, web.Response):
        return found
    engine, rule_id = found
    if engine.workbench.remove_rule(rule_id) is None:
        return error(404, f"No fault rule {rule_id}.")
    return web.Response(status=204, content_type="application/json")


async def fault_log(request: web.Request) -> web.Response:
    wb = _wb(request)
    if isinstance(wb, web.Response):
        return wb
    return json_response({"fired_by_kind": dict(wb.faults.fired_by_kind),
                          "firings": [f.describe() for f in wb.faults.firings]})


# --- captures ----------------------------------------------------------------------------------


def _capture_scope(engine: Engine, body: dict[str, Any]) -> Scope | web.Response:
    unknown = sorted(set(body) - {"target", "initiator", "session", "limit", "snaplen", "real_ports"})
    if unknown:
        return error(400, f"{unknown[0]}: Unknown field.", {unknown[0]: ["Unknown field."]})
    scope = Scope()
    target = body.get("target")
    if target is not None:
        iqn = _resolve_target(engine, target) if isinstance(target, str) else None
        if iqn is None:
            return error(400, f"target: No target {target!r}.", {"target": ["No such target."]})
        scope.target = iqn.lower()
    initiator = body.get("initiator")
    if initiator is not None:
        if not isinstance(initiator, str) or not initiator.strip():
            return error(400, "initiator: Enter an initiator name.", {"initiator": ["Enter an initiator name."]})
        scope.initiator = initiator.strip().lower()
    session = body.get("session")
    if session is not None:
        if isinstance(session, bool) or not isinstance(session, int) or not 1 <= session <= 0xFFFF:
            return error(400, "session: Enter a TSIH (1-65535).", {"session": ["Enter a TSIH (1-65535)."]})
        scope.session = session
    return scope


async def start_capture(request: web.Request) -> web.Response:
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    scope = _capture_scope(engine, body)
    if isinstance(scope, web.Response):
        return scope
    try:
        limit = parse_size(body.get("limit", DEFAULT_LIMIT))
    except (ValueError, TypeError) as exc:
        return error(400, f"limit: {exc}", {"limit": [str(exc)]})
    if not 4096 <= limit <= MAX_LIMIT:
        msg = f"Enter a ring size from 4KB to {MAX_LIMIT >> 20}MB."
        return error(400, f"limit: {msg}", {"limit": [msg]})
    snaplen = body.get("snaplen")
    if snaplen is not None and (isinstance(snaplen, bool) or not isinstance(snaplen, int) or snaplen < 0):
        return error(400, "snaplen: Enter the data bytes to keep per PDU (0 or more).",
                     {"snaplen": ["Enter the data bytes to keep per PDU (0 or more)."]})
    real_ports = body.get("real_ports", False)
    if not isinstance(real_ports, bool):
        return error(400, "real_ports: Enter true or false.", {"real_ports": ["Enter true or false."]})
    try:
        cap = engine.workbench.captures.start(scope, limit, snaplen, real_ports)
    except ValueError as exc:
        return error(409, str(exc))
    engine.workbench.start_capture(cap)
    return json_response(cap.describe(), 201, {"Location": f"{BASE}/captures/{cap.id}"})


async def list_captures(request: web.Request) -> web.Response:
    wb = _wb(request)
    if isinstance(wb, web.Response):
        return wb
    return json_response([c.describe() for c in wb.captures.captures.values()])


def _capture(request: web.Request) -> tuple[Workbench, Capture] | web.Response:
    found = _engine_and_id(request, "id")
    if isinstance(found, web.Response):
        return found
    engine, cap_id = found
    cap = engine.workbench.captures.captures.get(cap_id)
    if cap is None:
        return error(404, f"No capture {cap_id}.")
    return engine.workbench, cap


async def get_capture(request: web.Request) -> web.Response:
    found = _capture(request)
    if isinstance(found, web.Response):
        return found
    return json_response(found[1].describe())


async def stop_capture(request: web.Request) -> web.Response:
    found = _capture(request)
    if isinstance(found, web.Response):
        return found
    wb, cap = found
    wb.stop_capture(cap)
    return json_response(cap.describe())


async def delete_capture(request: web.Request) -> web.Response:
    found = _capture(request)
    if isinstance(found, web.Response):
        return found
    wb, cap = found
    wb.remove_capture(cap.id)
    return web.Response(status=204, content_type="application/json")


async def download_capture(request: web.Request) -> web.StreamResponse:
    found = _capture(request)
    if isinstance(found, web.Response):
        return found
    _wb, cap = found
    resp = web.StreamResponse(headers={"Content-Type": PCAPNG,
                                       "Content-Disposition": f'attachment; filename="capture-{cap.id}.pcapng"'})
    await resp.prepare(request)
    for chunk in cap.pcapng():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


# --- strict mode -------------------------------------------------------------------------------


async def list_strict(request: web.Request) -> web.Response:
    wb = _wb(request)
    if isinstance(wb, web.Response):
        return wb
    return json_response({"targets": sorted(wb.strict)})


async def set_strict(request: web.Request) -> web.Response:
    engine = _engine(request)
    if isinstance(engine, web.Response):
        return engine
    iqn = _resolve_target(engine, request.match_info["target"])
    if iqn is None:
        return error(404, f"No target {request.match_info['target']!r}.")
    on = request.method == "PUT"
    engine.workbench.set_strict(iqn, on)
    return json_response({"target": iqn, "strict": on})


# --- routes ------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int, Response]:
    table = {400: "Invalid values or body", 401: "Missing or wrong credentials", 404: "No such object",
             409: "Too many captures", 503: "No iSCSI engine behind this API"}
    return {c: Response(table[c], {"$ref": "#/components/schemas/NativeError"}) for c in codes}


def _rule_schema() -> Schema:
    s: Schema = {"type": "string"}
    i: Schema = {"type": "integer", "minimum": 0}
    ni: Schema = {"type": "integer", "minimum": 0, "nullable": True}
    ns: Schema = {"type": "string", "nullable": True}
    return obj({
        "id": {"type": "integer"}, "kind": {"type": "string", "enum": list(KINDS)}, "pdu": ns, "target": ns,
        "initiator": ns, "session": ni, "lun": ni, "opcode": ni, "lba_first": ni, "lba_last": ni, "after": i,
        "count": ni, "probability": {"type": "number"}, "expires_in": {"type": "number", "nullable": True},
        "delay_ms": i, "comment": s, "created": {"type": "number"}, "matched": i, "fired": i,
        "last_fired": {"type": "number", "nullable": True},
        "state": {"type": "string", "enum": ["active", "spent", "expired"]},
        "how": {"type": "string", "enum": list(DROP_HOW)}, "status": {"oneOf": [s, i]}, "sense_key": i, "asc": i,
        "ascq": i, "reason": s, "event": s, "wait": i,
    }, ("id", "kind", "state", "fired"))


def _rule_request() -> Schema:
    intish: Schema = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}
    return {"type": "object", "required": ["kind"], "additionalProperties": False, "properties": {
        "kind": {"type": "string", "enum": list(KINDS), "description": "; ".join(f"{k}: {v.doc}"
                                                                                    for k, v in KINDS.items())},
        "pdu": {"type": "string", "description": "the PDU kind a transport fault acts on"},
        "target": {"type": "string", "description": "target name or IQN"},
        "initiator": {"type": "string"}, "session": {"type": "integer", "minimum": 1, "maximum": 65535},
        "lun": {"type": "integer", "minimum": 0, "maximum": 16383}, "opcode": intish, "lba_first": intish,
        "lba_last": intish, "after": {"type": "integer", "minimum": 0},
        "count": {"type": "integer", "minimum": 0, "description": "firings at most; 0: unlimited"},
        "probability": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "expires_in": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 604800},
        "delay_ms": {"type": "integer", "minimum": 1}, "how": {"type": "string", "enum": list(DROP_HOW)},
        "status": {"type": "string", "enum": list(STATUSES)}, "sense_key": intish, "asc": intish, "ascq": intish,
        "reason": {"type": "string", "enum": list(REJECT_REASONS)},
        "event": {"type": "string", "enum": list(ASYNC_EVENTS)}, "wait": {"type": "integer", "minimum": 0},
        "comment": {"type": "string", "maxLength": 256},
    }}


def _capture_schema() -> Schema:
    i: Schema = {"type": "integer"}
    ns: Schema = {"type": "string", "nullable": True}
    return obj({"id": i, "target": ns, "initiator": ns, "session": {"type": "integer", "nullable": True},
                "state": {"type": "string", "enum": ["running", "stopped"]}, "started": {"type": "number"},
                "stopped": {"type": "number", "nullable": True}, "limit": i,
                "snaplen": {"type": "integer", "nullable": True}, "real_ports": {"type": "boolean"}, "size": i,
                "pieces": i, "bytes": i, "evicted": i, "connections": i}, ("id", "state"))


def setup_routes(app: web.Application, doc: ApiDoc) -> None:
    assert set(_rule_request()["properties"]) == set(FIELDS)
    rule = doc.component("FaultRule", _rule_schema())
    capture = doc.component("Capture", _capture_schema())
    violation = doc.component("Violation", obj({
        "time": {"type": "number"}, "section": {"type": "string"}, "rule": {"type": "string"},
        "strict": {"type": "boolean"}, "action": {"type": "string"}, "pdu": {"type": "string"},
        "session": {"type": "integer", "nullable": True}}, ("section", "rule", "action")))
    detail = doc.component("SessionDetail", obj({
        "tsih": {"type": "integer"}, "connections": {"type": "array", "items": {"type": "object"}},
        "cmdsn_window": {"type": "object"}, "outstanding_tasks": {"type": "array", "items": {"type": "object"}},
        "counters": {"type": "object"}, "violations": {"type": "array", "items": violation},
        "strict": {"type": "boolean"}}, ("tsih", "connections", "outstanding_tasks", "counters", "violations")))
    lu = doc.component("LogicalUnitState", obj({
        "name": {"type": "string"}, "naa": {"type": "string"}, "tasks": {"type": "integer"},
        "persistent_reservations": {"type": "object"}, "reserve": {"type": "object", "nullable": True},
        "unit_attentions": {"type": "array", "items": {"type": "object"}},
        "alua": {"type": "array", "items": {"type": "object"}}}, ("name", "naa")))
    tsih: Schema = {"name": "tsih", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
    rid: Schema = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
    target: Schema = {"name": "target", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "target name or IQN"}
    strict_body: Schema = obj({"target": {"type": "string"}, "strict": {"type": "boolean"}}, ("target", "strict"))
    created = {"Location": {"schema": {"type": "string"}}}
    ops = (
        Operation("GET", f"{BASE}/sessions/{{tsih}}/", get_session, "native_get_session", TAG,
                  {200: Response("The session in depth", detail), **_errors(401, 404, 503)},
                  summary="One session: connection, CmdSN window, outstanding tasks, counters, violations",
                  path_params=(tsih,)),
        Operation("DELETE", f"{BASE}/sessions/{{tsih}}/", drop_session, "native_drop_session", TAG,
                  {204: Response("The connection is being dropped"), **_errors(401, 404, 503)},
                  summary="Drop the session's connection (announce=true: Async Message first)",
                  path_params=(tsih,), query=({"name": "announce", "in": "query", "required": False,
                                               "schema": {"type": "boolean"}},)),
        Operation("POST", f"{BASE}/sessions/{{tsih}}/logout/", logout_session, "native_logout_session", TAG,
                  {202: Response("Asked to log out", obj({"tsih": {"type": "integer"},
                                                          "within": {"type": "integer"}})),
                   **_errors(400, 401, 404, 503)},
                  summary="Ask the session to log out (Async Message, event 1)",
                  request=obj({"within": {"type": "integer", "minimum": 1, "maximum": 3600}}),
                  path_params=(tsih,)),
        Operation("GET", f"{BASE}/logical-units/", list_logical_units, "native_list_logical_units", TAG,
                  {200: Response("Logical units", {"type": "array", "items": lu}), **_errors(401, 503)},
                  summary="Task sets, reservations, unit attentions per I_T nexus, ALUA state"),
        Operation("GET", f"{BASE}/violations/", list_violations, "native_list_violations", TAG,
                  {200: Response("Violations, oldest first", {"type": "array", "items": violation}),
                   **_errors(401, 503)},
                  summary="Refused logins and each live session's violations, with the rule broken"),
        Operation("GET", f"{BASE}/faults/", list_faults, "native_list_faults", TAG,
                  {200: Response("Fault rules", {"type": "array", "items": rule}), **_errors(401, 503)}),
        Operation("POST", f"{BASE}/faults/", add_fault, "native_add_fault", TAG,
                  {201: Response("The rule, in force", rule, headers=created), **_errors(400, 401, 503)},
                  summary="Add a fault injection rule", request=_rule_request(), request_required=True),
        Operation("DELETE", f"{BASE}/faults/", clear_faults, "native_clear_faults", TAG,
                  {200: Response("Removed", obj({"removed": {"type": "integer"}})), **_errors(401, 503)},
                  summary="Remove every fault rule"),
        Operation("GET", f"{BASE}/faults/{{id}}/", get_fault, "native_get_fault", TAG,
                  {200: Response("The rule", rule), **_errors(401, 404, 503)}, path_params=(rid,)),
        Operation("DELETE", f"{BASE}/faults/{{id}}/", delete_fault, "native_delete_fault", TAG,
                  {204: Response("Removed"), **_errors(401, 404, 503)}, path_params=(rid,)),
        Operation("GET", f"{BASE}/fault-log/", fault_log, "native_fault_log", TAG,
                  {200: Response("Firings by kind, and the last ones", obj({
                      "fired_by_kind": {"type": "object", "additionalProperties": {"type": "integer"}},
                      "firings": {"type": "array", "items": {"type": "object"}}})), **_errors(401, 503)}),
        Operation("GET", f"{BASE}/captures/", list_captures, "native_list_captures", TAG,
                  {200: Response("Captures", {"type": "array", "items": capture}), **_errors(401, 503)}),
        Operation("POST", f"{BASE}/captures/", start_capture, "native_start_capture", TAG,
                  {201: Response("The capture, running", capture, headers=created), **_errors(400, 401, 409, 503)},
                  summary="Start a PDU capture (a target, an initiator, a session, or everything)",
                  request=obj({"target": {"type": "string"}, "initiator": {"type": "string"},
                               "session": {"type": "integer", "minimum": 1, "maximum": 65535},
                               "limit": {"oneOf": [{"type": "integer"}, {"type": "string"}],
                                         "description": "ring size, e.g. 16MB"},
                               "snaplen": {"type": "integer", "minimum": 0,
                                           "description": "data-segment bytes kept per PDU"},
                               "real_ports": {"type": "boolean"}})),
        Operation("GET", f"{BASE}/captures/{{id}}/", get_capture, "native_get_capture", TAG,
                  {200: Response("The capture", capture), **_errors(401, 404, 503)}, path_params=(rid,)),
        Operation("DELETE", f"{BASE}/captures/{{id}}/", delete_capture, "native_delete_capture", TAG,
                  {204: Response("Removed"), **_errors(401, 404, 503)}, path_params=(rid,)),
        Operation("POST", f"{BASE}/captures/{{id}}/stop/", stop_capture, "native_stop_capture", TAG,
                  {200: Response("The capture, stopped", capture), **_errors(401, 404, 503)}, path_params=(rid,)),
        Operation("GET", f"{BASE}/captures/{{id}}/pcapng/", download_capture, "native_download_capture", TAG,
                  {200: Response("The ring as pcapng", {"type": "string", "format": "binary"}, media_type=PCAPNG),
                   **_errors(401, 404, 503)}, summary="Download the capture (tshark -r, Wireshark)",
                  path_params=(rid,)),
        Operation("GET", f"{BASE}/strict/", list_strict, "native_list_strict", TAG,
                  {200: Response("Targets in strict mode", obj({"targets": {"type": "array",
                                                                           "items": {"type": "string"}}})),
                   **_errors(401, 503)}),
        Operation("PUT", f"{BASE}/strict/{{target}}/", set_strict, "native_set_strict", TAG,
                  {200: Response("Strict mode on", strict_body), **_errors(401, 404, 503)},
                  summary="Strict mode on: refuse what the default mode tolerates", path_params=(target,)),
        Operation("DELETE", f"{BASE}/strict/{{target}}/", set_strict, "native_clear_strict", TAG,
                  {200: Response("Strict mode off", strict_body), **_errors(401, 404, 503)}, path_params=(target,)),
    )
    for op in ops:
        doc.add(app, op)
