"""Field types and field tables: the one statement of each configuration field's rules.

A ``Field`` names a model attribute and its ``FieldType``; a ``FieldSet`` subclass lists
the fields of one resource.  The same objects drive

- the service's validators (``Field.read`` coerces what a client sent, collecting errors),
- the REST façades' tables (which only add the API's own names), and
- the OpenAPI document (``FieldType.schema`` / ``input_schema``).

Coercion is lenient the way FreeNAS clients need it (ids as strings, numbers where strings
are meant, booleans as words) and its messages are Django's, which FreeNAS returned.  The
domain values behind a field (sizes, listen addresses, names, ...) are parsed by
``pyscsi_target.values`` only; this module knows JSON shapes, lengths, ranges and choices.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pyscsi_target.config.errors import Errors

T = TypeVar("T")
Schema = dict[str, Any]

_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")
_INT_RE = re.compile(r"\s*[-+]?\d{1,18}\s*")


def utf8_text(text: str) -> str:
    """``text``, if it can travel as UTF-8 (iSCSI text keys, the database, logs); ValueError
    for a lone surrogate, which JSON's ``\\uD800`` escapes can carry but no encoding can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"Enter valid text: U+{ord(text[exc.start]):04X} (position {exc.start + 1}) "
                         "is half of a surrogate pair, not a character.") from None
    return text


class Unset(enum.Enum):
    """What ``Field.read`` returns for a field that was not sent (or was refused)."""

    UNSET = 0


UNSET = Unset.UNSET


class FieldType(Generic[T]):
    """How a JSON value becomes a model value.  ``parse`` raises ValueError(message)."""

    accepts_none: ClassVar[bool] = False

    def parse(self, value: object) -> T:
        raise NotImplementedError

    def schema(self) -> Schema:
        """The value as the API shows it."""
        raise NotImplementedError

    def input_schema(self) -> Schema:
        """What a client may send (the schema of the shown value, with its limits)."""
        return self.schema()


@dataclass(frozen=True)
class Text(FieldType[str]):
    """A string; numbers are taken as their decimal text (clients send rpm 7200)."""

    max_len: int = 1024
    allow_ctrl: bool = False
    pattern: str | None = None  # documentation only: the validator states the real rule
    min_len: int | None = None  # documentation only, as ``pattern``

    def parse(self, value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("This field must be a string.")
        text = utf8_text(value) if isinstance(value, str) else str(value)
        if len(text) > self.max_len:
            raise ValueError(f"Ensure this value has at most {self.max_len} characters (it has {len(text)}).")
        if not self.allow_ctrl and _CTRL_RE.search(text):
            raise ValueError("Control characters are not allowed.")
        return text

    def schema(self) -> Schema:
        return {"type": "string"}

    def input_schema(self) -> Schema:
        out: Schema = {"type": "string", "maxLength": self.max_len}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.min_len is not None:
            out["minLength"] = self.min_len
        return out


@dataclass(frozen=True)
class Integer(FieldType[int]):
    """A whole number; integral floats and decimal strings are accepted."""

    lo: int | None = None
    hi: int | None = None

    def parse(self, value: object) -> int:
        if isinstance(value, bool):
            raise ValueError("Enter a whole number.")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and _INT_RE.fullmatch(value):
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("Enter a whole number.")
        if self.lo is not None and value < self.lo:
            raise ValueError(f"Ensure this value is greater than or equal to {self.lo}.")
        if self.hi is not None and value > self.hi:
            raise ValueError(f"Ensure this value is less than or equal to {self.hi}.")
        return value

    def schema(self) -> Schema:
        return {"type": "integer"}

    def input_schema(self) -> Schema:
        number: Schema = {"type": "integer"}
        if self.lo is not None:
            number["minimum"] = self.lo
        if self.hi is not None:
            number["maximum"] = self.hi
        return {"oneOf": [number, {"type": "string", "pattern": "^[0-9]+$"}]}


_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class Boolean(FieldType[bool]):
    """true/false, 0/1, or a word (``"true"``, ``"yes"``, ...) as form-minded clients send."""

    true_words: tuple[str, ...] = _TRUE_WORDS
    false_words: tuple[str, ...] = _FALSE_WORDS
    numbers: bool = True  # 0 and 1 accepted

    def parse(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if self.numbers and isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in self.true_words:
                return True
            if low in self.false_words:
                return False
        raise ValueError("Enter a boolean (true or false).")

    def schema(self) -> Schema:
        return {"type": "boolean"}

    def input_schema(self) -> Schema:
        return {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": [*self.true_words, *self.false_words]}]}


@dataclass(frozen=True)
class Choice(FieldType[T]):
    """One of ``values`` after ``base`` coercion; ``aliases`` (upper-cased keys) map onto them."""

    base: FieldType[T]
    values: Sequence[T]
    aliases: Mapping[str, T] = field(default_factory=dict)
    shown: Sequence[T] = ()  # values the API may show beyond ``values`` (FreeNAS's "ZVOL")

    def parse(self, value: object) -> T:
        parsed = self.base.parse(value)
        if isinstance(parsed, str):
            parsed = self.aliases.get(parsed.upper(), parsed)
        if parsed not in self.values:
            raise ValueError(f"Select a valid choice: {', '.join(str(v) for v in self.values)}.")
        return parsed

    def schema(self) -> Schema:
        return {**self.base.schema(), "enum": [*self.values, *self.shown]}

    def input_schema(self) -> Schema:
        named: Schema = {**self.base.schema(), "enum": [*self.values, *self.aliases]}
        numbers = [int(v) for v in self.values if isinstance(v, str) and v.isdigit()]
        if isinstance(self.base, Text) and numbers:  # rpm: 7200 as well as "7200"
            return {"oneOf": [named, {"type": "integer", "enum": numbers}]}
        return named


@dataclass(frozen=True)
class Nullable(FieldType[T | None]):
    """``null`` or ``""`` stores None (FreeNAS's way of clearing a reference); so do the
    ``none_words`` a form sent for "none" (FreeNAS's auth group choice ``-1``)."""

    inner: FieldType[T]
    none_words: tuple[object, ...] = ()
    accepts_none: ClassVar[bool] = True

    def parse(self, value: object) -> T | None:
        if value is None or value == "" or (not isinstance(value, bool) and value in self.none_words):
            return None
        return self.inner.parse(value)

    def schema(self) -> Schema:
        return {**self.inner.schema(), "nullable": True}

    def input_schema(self) -> Schema:
        if self.none_words:
            return {"oneOf": [self.inner.input_schema(), {"enum": list(self.none_words)}], "nullable": True}
        return {**self.inner.input_schema(), "nullable": True}


@dataclass(frozen=True)
class StringList(FieldType[list[object]]):
    """A JSON array of strings, or one string of white-space separated items.  Only the
    shape is checked here: the validator checks each item and reports each bad one."""

    item: Schema = field(default_factory=lambda: {"type": "string"})
    message: str = "Enter a list of strings."

    def parse(self, value: object) -> list[object]:
        if isinstance(value, str):
            return list(utf8_text(value).split())
        if not isinstance(value, list):
            raise ValueError(self.message)
        for item in value:
            if isinstance(item, str):
                utf8_text(item)
        return list(value)

    def schema(self) -> Schema:
        return {"type": "array", "items": self.item}


# A space threshold in percent: null or 1-99, as FreeNAS 11.3's model validators (0 is refused).
THRESHOLD = Nullable(Integer(lo=1, hi=99))


@dataclass(frozen=True)
class Field(Generic[T]):
    """One model attribute and the rules for setting it."""

    attr: str
    type: FieldType[T]

    def read(self, fields: Mapping[str, object], errs: Errors) -> T | Unset:
        """The coerced value of this field in ``fields``; UNSET when absent, sent as null
        (for a non-nullable field: "leave it as it is"), or refused (message added)."""
        if self.attr not in fields:
            return UNSET
        value = fields[self.attr]
        if value is None and not self.type.accepts_none:
            return UNSET
        try:
            return self.type.parse(value)
        except ValueError as exc:
            errs.add(self.attr, str(exc))
            return UNSET

    def assign(self, obj: object, fields: Mapping[str, object], errs: Errors) -> None:
        """``read`` and store the value on ``obj`` when one was given and accepted."""
        value = self.read(fields, errs)
        if value is not UNSET:
            setattr(obj, self.attr, value)


class FieldSet:
    """The fields of one resource, declared as class attributes (typed, go-to-definition)."""

    @classmethod
    def fields(cls) -> Iterator[Field[Any]]:
        for value in vars(cls).values():
            if isinstance(value, Field):
                yield value
