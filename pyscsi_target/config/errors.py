"""Refused configuration changes.

Errors carry a ``{model_field: [message, ...]}`` dict (``"__all__"`` for the whole object)
and a ``kind`` (invalid / conflict / not_found); each REST façade renders its own body and
status from them and maps the model's field names to its own.
"""

from __future__ import annotations

INVALID = "invalid"
CONFLICT = "conflict"
NOT_FOUND = "not_found"

# FreeNAS 11.3's message for names that end up quoted in its ctld.conf (extent names and
# serials, target aliases).
NO_QUOTES = "Double quotes are not allowed"


class ConfigError(Exception):
    """A refused change.  ``errors`` maps model field names (or ``__all__``) to messages."""

    kind = INVALID

    def __init__(self, errors: dict[str, list[str]] | str, field: str = "__all__") -> None:
        if isinstance(errors, str):
            errors = {field: [errors]}
        self.errors = errors
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()))

    @property
    def message(self) -> str:
        """All messages in one line (for APIs with a single error string)."""
        parts = []
        for key, msgs in self.errors.items():
            for msg in msgs:
                parts.append(msg if key == "__all__" else f"{key}: {msg}")
        return "; ".join(parts)


class ValidationError(ConfigError):
    kind = INVALID


class ConflictError(ConfigError):
    kind = CONFLICT


class NotFoundError(ConfigError):
    kind = NOT_FOUND


class Errors:
    """Collects per-field messages so that a client sees every problem at once."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, field: str, msg: str) -> None:
        self.errors.setdefault(field, []).append(msg)

    def __contains__(self, field: str) -> bool:
        return field in self.errors

    def raise_if_any(self, cls: type[ConfigError] = ValidationError) -> None:
        if self.errors:
            raise cls(self.errors)
