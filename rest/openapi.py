"""The OpenAPI 3 document, served at ``/api/openapi.json``, generated from the routes.

Every route is registered through ``ApiDoc.add`` with its operation: request and response
schemas (from the resources' tables), statuses and parameters.  The document is exact
about what the server returns (schemathesis checks every response against it), and a new
resource appears in it by being routed, with nothing written here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from pyscsi_target import __version__
from pyscsi_target.config.fields import Schema

from .common import add_route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: Schema, required: Sequence[str] = ()) -> Schema:
    out: Schema = {"type": "object", "properties": props, "additionalProperties": True}
    if required:
        out["required"] = list(required)
    return out


@dataclass(frozen=True)
class Response:
    description: str
    schema: Schema | None = None
    headers: Schema | None = None
    links: Schema | None = None
    media_type: str = "application/json"

    def render(self) -> Schema:
        out: Schema = {"description": self.description}
        if self.schema is not None:
            out["content"] = {self.media_type: {"schema": self.schema}}
        if self.headers is not None:
            out["headers"] = self.headers
        if self.links is not None:
            out["links"] = self.links
        return out


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # as documented; routed with and without its trailing slash
    handler: Handler
    operation_id: str
    tag: str
    responses: Mapping[int, Response]
    summary: str | None = None
    request: Schema | None = None
    request_required: bool = False
    query: Sequence[Schema] = ()
    path_params: Sequence[Schema] = ()
    security: Sequence[Schema] | None = None  # None: the document's default (HTTP Basic)

    def render(self) -> Schema:
        out: Schema = {"tags": [self.tag], "operationId": self.operation_id}
        if self.summary:
            out["summary"] = self.summary
        if self.security is not None:
            out["security"] = list(self.security)
        if self.query:
            out["parameters"] = list(self.query)
        if self.request is not None:
            out["requestBody"] = {
                "required": self.request_required,
                "content": {"application/json": {"schema": self.request}},
            }
        out["responses"] = {str(code): r.render() for code, r in sorted(self.responses.items())}
        return out


@dataclass
class ApiDoc:
    """The routes of the application and the document describing them."""

    title: str
    description: str
    security_schemes: Schema
    operations: list[Operation] = field(default_factory=list)
    schemas: dict[str, Schema] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    _document: Schema | None = None

    def component(self, name: str, schema: Schema) -> Schema:
        """Register a named schema; returns its ``$ref``."""
        self.schemas[name] = schema
        return ref(name)

    def add(self, app: web.Application, op: Operation) -> None:
        add_route(app, op.method, op.path, op.handler)
        self.operations.append(op)
        if op.tag not in self.tags:
            self.tags.append(op.tag)
        self._document = None

    def document(self) -> Schema:
        if self._document is None:
            self._document = self._render()
        return self._document

    def _render(self) -> Schema:
        paths: dict[str, Schema] = {}
        for op in self.operations:
            item = paths.setdefault(op.path, {})
            if op.path_params:
                item["parameters"] = list(op.path_params)
            item[op.method.lower()] = op.render()
        return {
            "openapi": "3.0.3",
            "info": {"title": self.title, "version": __version__, "description": self.description},
            "servers": [{"url": "/"}],
            "security": [{"basicAuth": []}],
            "tags": [{"name": t} for t in self.tags],
            "paths": paths,
            "components": {"schemas": dict(self.schemas), "securitySchemes": self.security_schemes},
        }


def crud_links(operation_ids: Mapping[str, str], parameter: str, source: str) -> Schema:
    """201 links from a created object to the operations on it (schemathesis follows them)."""
    return {
        label: {"operationId": op_id, "parameters": {parameter: source}} for label, op_id in operation_ids.items()
    }


def new_doc() -> ApiDoc:
    return ApiDoc(
        title="pyscsi-target management API",
        description="FreeNAS v1.0 iSCSI resources and Hitachi NAS v9 iscsi-targets over one configuration. "
        "Trailing slashes are optional on every path.",
        security_schemes={
            "basicAuth": {"type": "http", "scheme": "basic"},
            "api_key": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            "x_subsystem_user": {"type": "apiKey", "in": "header", "name": "X-Subsystem-User"},
            "x_subsystem_password": {"type": "apiKey", "in": "header", "name": "X-Subsystem-Password"},
        },
    )


def common_errors(body: Schema) -> dict[int, Response]:
    """The answers every API gives outside its handlers (rest/app.py), in its error ``body``."""
    return {
        415: Response("The write's body is not application/json", body),
        429: Response("Too many failed logins from this address: retry after Retry-After seconds", body),
        507: Response("The disk holding the configuration database is full: nothing was saved", body),
    }


def with_common_errors(codes: tuple[int, ...]) -> tuple[int, ...]:
    """``codes`` plus what the middleware may answer: 429 wherever credentials are checked
    (401), and for writes (a body, hence 413) 403 (cross-site), 415 and 507."""
    extra: tuple[int, ...] = (429,) if 401 in codes else ()
    if 413 in codes:
        extra += (403, 415, 507)
    return tuple(dict.fromkeys((*codes, *extra)))
