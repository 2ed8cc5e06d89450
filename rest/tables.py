"""Façade tables: a REST resource's fields, each row naming an API field and what it is.

A ``Column`` gives the API's name for a model ``Field`` (whose type carries the rules: see
``pyscsi_target.config.fields``), or a computed value the API shows.  A ``Table`` of
columns turns request bodies into the service's field mappings, the service's errors back
into API field names, model objects into response bodies, and itself into the OpenAPI
schemas of the request and the response.  Each API field name is written once: here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyscsi_target.config.fields import Boolean, Field, FieldType, Integer, Nullable, Schema, Text
from pyscsi_target.config.model import ConfigModel

Show = Callable[[ConfigModel, Any], object]

_NO_EXAMPLE = object()


@dataclass(frozen=True)
class Column:
    api: str
    field: Field[Any] | None = None  # the model field a request sets (and a response shows)
    show: Show | None = None  # a computed value for responses instead of the field's
    schema: Schema | None = None  # the response schema of a computed value
    write_only: bool = False  # accepted in requests, never shown
    create_only: bool = False  # accepted on create (POST) only
    required: bool = False  # required in a create request (documentation; the validator decides)
    aliases: tuple[str, ...] = ()  # other spellings accepted in requests
    error_key: str | None = None  # the API name to report this field's errors under, if not ``api``
    example: object = _NO_EXAMPLE

    def value(self, model: ConfigModel, obj: object) -> object:
        if self.show is not None:
            return self.show(model, obj)
        assert self.field is not None, self.api
        value = getattr(obj, self.field.attr)
        return list(value) if isinstance(value, list) else value

    def output_schema(self) -> Schema:
        if self.schema is not None:
            return self.schema
        assert self.field is not None, self.api
        return self.field.type.schema()


def _strict_schema(kind: FieldType[Any]) -> Schema:
    """A request schema without the lenient forms (``"5"`` for 5): what a strict API takes."""
    if isinstance(kind, Nullable):
        return {**_strict_schema(kind.inner), "nullable": True}
    if isinstance(kind, Boolean):
        return kind.schema()
    if isinstance(kind, Integer):
        out: Schema = {"type": "integer"}
        if kind.lo is not None:
            out["minimum"] = kind.lo
        if kind.hi is not None:
            out["maximum"] = kind.hi
        return out
    return kind.input_schema()


def strict_type_error(kind: FieldType[Any], value: object) -> str | None:
    """Why ``value`` is not of the JSON type ``kind`` takes, for APIs that coerce nothing."""
    if isinstance(kind, Nullable):
        kind = kind.inner
    if isinstance(kind, Boolean) and not isinstance(value, bool):
        return "it must be true or false"
    if isinstance(kind, Text) and not isinstance(value, str):
        return "it must be a string"
    if isinstance(kind, Integer) and (isinstance(value, bool) or not isinstance(value, int)):
        return "it must be an integer"
    return None


class Table:
    """The columns of one resource, in the order responses show them."""

    def __init__(self, name: str, columns: Iterable[Column], *, strict: bool = False) -> None:
        self.name = name  # the OpenAPI schema name of the response body
        self.columns = tuple(columns)
        self.strict = strict  # requests must use the exact JSON types (no "5" for 5)
        self._by_api: dict[str, Column] = {}
        self._errors_as: dict[str, str] = {}
        for col in self.columns:
            for name_ in (col.api, *col.aliases):
                if col.field is not None:
                    self._by_api[name_] = col
            if col.field is not None:
                self._errors_as.setdefault(col.field.attr, col.error_key or col.api)

    def column(self, api: str) -> Column | None:
        """The writable column a request field names (aliases included)."""
        return self._by_api.get(api)

    def to_model(self, body: Mapping[str, object], *, drop_null: bool, create: bool = True) -> dict[str, object]:
        """The service's fields for a request body.  Unknown and read-only fields (and "id")
        are ignored, as tastypie did; ``drop_null`` leaves nulls out (partial update)."""
        out: dict[str, object] = {}
        for api_name, value in body.items():
            col = self._by_api.get(api_name)
            if col is None or col.field is None or (col.create_only and not create):
                continue
            if value is None and drop_null:
                continue
            out[col.field.attr] = value
        return out

    def api_name(self, attr: str) -> str | None:
        """The API name of a model field, as errors report it."""
        return self._errors_as.get(attr)

    def errors_to_api(self, errors: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """Errors keyed by model field -> keyed by API field (``__all__`` for the rest)."""
        out: dict[str, list[str]] = {}
        for key, msgs in errors.items():
            out.setdefault(self.api_name(key) or "__all__", []).extend(msgs)
        return out

    def serialize(self, model: ConfigModel, obj: object) -> dict[str, object]:
        return {c.api: c.value(model, obj) for c in self.columns if not c.write_only}

    # --- OpenAPI ---------------------------------------------------------------------------

    def output_schema(self) -> Schema:
        props = {c.api: c.output_schema() for c in self.columns if not c.write_only}
        return {"type": "object", "properties": props, "additionalProperties": True, "required": list(props)}

    def input_schema(self, *, create: bool = True) -> Schema:
        """Every field optional unless ``required`` on create; unknown fields allowed."""
        props: Schema = {}
        required = []
        for c in self.columns:
            if c.field is None or (c.create_only and not create):
                continue
            kind = c.field.type
            props[c.api] = _strict_schema(kind) if self.strict else kind.input_schema()
            if c.example is not _NO_EXAMPLE:
                props[c.api] = {**props[c.api], "example": c.example}
            if c.required and create:
                required.append(c.api)
        out: Schema = {"type": "object", "properties": props, "additionalProperties": True}
        if required:
            out["required"] = required
        return out

    def example(self, *, create: bool = True) -> dict[str, object]:
        """A request body made of the columns' examples."""
        return {
            c.api: c.example
            for c in self.columns
            if c.field is not None and c.example is not _NO_EXAMPLE and (create or not c.create_only)
        }
