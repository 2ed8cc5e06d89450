"""Configuration export and import: the whole model as one versioned JSON document.

The export holds every object with its id (both APIs show ids, and clients cache them),
the id sequences (so an imported configuration never hands out an id the original had
used), the global settings and the API keys (as their hashes).  With ``redact`` the CHAP
secrets and key hashes are left out (``null``); importing such a document takes each
redacted secret from the credential with the same id in the configuration it replaces.

An import is validated as a whole before anything changes: each object goes through its
resource's validator (the API's rules and messages; errors are keyed
``targets[2].name``), in reference order, against the objects imported before it.  It is
then applied as one change: rows that differ are written, missing extent files are created
sparse (and listed in the report), and the engine reconciles, so targets the import does
not touch keep their sessions.  Removing (or renaming) a target that has sessions is
refused unless forced, as deleting it through the API is.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyscsi_target import __version__
from pyscsi_target.config.auth_credentials import build_auth_credential
from pyscsi_target.config.errors import ConfigError, ConflictError, ValidationError
from pyscsi_target.config.extent_files import ExtentRoots
from pyscsi_target.config.extents import build_extent
from pyscsi_target.config.global_settings import build_global
from pyscsi_target.config.initiator_groups import build_initiator_group
from pyscsi_target.config.lun_maps import build_lun_map
from pyscsi_target.config.model import ConfigModel, GlobalConfig, PortalGroup
from pyscsi_target.config.portal_groups import build_portal_group
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.store import ConfigStore
from pyscsi_target.config.target_groups import build_target_group
from pyscsi_target.config.targets import build_target
from pyscsi_target.config.transaction import (
    AUTH_CREDENTIALS,
    EXTENTS,
    INITIATOR_GROUPS,
    LUN_MAPS,
    PORTAL_GROUPS,
    TARGET_GROUPS,
    TARGETS,
    Draft,
    Kind,
)
from pyscsi_target.values import parse_size

FORMAT = "pyscsi-target-config"
VERSION = 1
REDACTED, INCLUDED = "redacted", "included"
SECRET_FIELDS = ("secret", "peersecret")  # of auth credentials

Raw = Mapping[str, object]
Builder = Callable[[ConfigModel, Raw, Any, ExtentRoots], Any]


def _credential(model: ConfigModel, raw: Raw, obj: Any, roots: ExtentRoots) -> Any:
    try:
        return build_auth_credential(raw, obj)
    except ValidationError as exc:
        # The /v9 view stores a target's CHAP secret free-form (1-255 characters without white
        # space) where FreeNAS wants 12-16: a configuration may hold both kinds.
        secret = raw.get("secret")
        if set(exc.errors) == {"secret"} and isinstance(secret, str) and 0 < len(secret) <= 255 \
                and not any(ch.isspace() for ch in secret):
            return obj
        raise


def _extent(model: ConfigModel, raw: Raw, obj: Any, roots: ExtentRoots) -> Any:
    return build_extent(model, roots, raw, obj, None)[0]


# Reference order: credentials before the portal groups and target groups naming their tags,
# targets and extents before the target groups and LUN maps joining them.
BUILDERS: tuple[tuple[Kind[Any], Builder], ...] = (
    (AUTH_CREDENTIALS, _credential),
    (INITIATOR_GROUPS, lambda model, raw, obj, roots: build_initiator_group(raw, obj)),
    (PORTAL_GROUPS, lambda model, raw, obj, roots: build_portal_group(model, raw, obj)),
    (TARGETS, lambda model, raw, obj, roots: build_target(model, raw, obj)),
    (EXTENTS, _extent),
    (TARGET_GROUPS, lambda model, raw, obj, roots: build_target_group(model, raw, obj)),
    (LUN_MAPS, lambda model, raw, obj, roots: build_lun_map(model, raw, obj, auto_lun=False)),
)
KINDS = tuple(kind for kind, _build in BUILDERS)


def _fields(obj: Any) -> dict[str, object]:
    data: dict[str, object] = dataclasses.asdict(obj)  # a deep copy: lists included
    return data


def export_config(model: ConfigModel, store: ConfigStore, *, redact: bool = False) -> dict[str, object]:
    """The export document of ``model`` (the service's current one)."""
    doc: dict[str, object] = {
        "format": FORMAT,
        "version": VERSION,
        "generator": f"pyscsi-target {__version__}",
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "secrets": REDACTED if redact else INCLUDED,
        "service_enabled": model.service_enabled,
        "global_config": {k: v for k, v in _fields(model.global_config).items() if k != "id"},
    }
    for kind in KINDS:
        objs = kind.of(model)
        rows = [_fields(objs[k]) for k in sorted(objs)]
        if redact and kind is AUTH_CREDENTIALS:
            for row in rows:
                for key in SECRET_FIELDS:
                    if row[key]:
                        row[key] = None
        doc[kind.attr] = rows
    doc["id_sequences"] = store.id_sequences()
    doc["api_keys"] = None if redact else store.api_key_rows()
    return doc


# --- import --------------------------------------------------------------------------------


@dataclass
class ImportPlan:
    """A validated import: the model it makes and how it differs from the current one."""

    model: ConfigModel
    changes: dict[str, dict[str, list[int]]]  # kind -> added/changed/removed ids
    global_changed: bool
    files_to_realise: dict[int, tuple[str, int]]  # extent id -> (path, size): missing or smaller files
    id_sequences: dict[str, int]
    api_keys: list[dict[str, Any]] | None  # None: leave the stored keys as they are
    sessions_dropped: dict[int, int] = field(default_factory=dict)  # target id -> live sessions

    def report(self) -> dict[str, object]:
        return {
            "changes": self.changes,
            "global_config_changed": self.global_changed,
            "files_created": sorted(p for p, _size in self.files_to_realise.values() if not os.path.exists(p)),
            "files_grown": sorted(p for p, _size in self.files_to_realise.values() if os.path.exists(p)),
            "api_keys_replaced": self.api_keys is not None,
            "sessions_dropped": sum(self.sessions_dropped.values()),
        }


def _type_ok(annotation: str, value: object) -> bool:
    for alt in (a.strip() for a in annotation.split("|")):
        if alt == "None" and value is None:
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt in ("str", "bool") and type(value).__name__ == alt:
            return True
        if alt == "list[str]" and isinstance(value, list) and all(isinstance(x, str) for x in value):
            return True
    return False


def _shape(cls: type, raw: object, where: str, errors: dict[str, list[str]], *, with_id: bool) -> dict[str, object]:
    """``raw``'s fields checked against the dataclass's field types (unknown fields refused)."""
    if not isinstance(raw, dict):
        errors.setdefault(where, []).append("Expected a JSON object.")
        return {}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out: dict[str, object] = {}
    for key, value in raw.items():
        if key not in types or (key == "id" and not with_id):
            errors.setdefault(f"{where}.{key}", []).append("Unknown field.")
        elif not _type_ok(types[key], value):
            errors.setdefault(f"{where}.{key}", []).append(f"Expected {types[key]}, not {type(value).__name__}.")
        else:
            out[key] = value
    if with_id and "id" in out and not (isinstance(out["id"], int) and out["id"] >= 1):
        errors.setdefault(f"{where}.id", []).append("An id is a whole number from 1.")
    elif with_id and "id" not in out and f"{where}.id" not in errors:
        errors.setdefault(f"{where}.id", []).append("This field is required.")
    return out


def _check_header(doc: object) -> Mapping[str, object]:
    if not isinstance(doc, dict):
        raise ValidationError("The configuration must be a JSON object.")
    if doc.get("format") != FORMAT:
        raise ValidationError({"format": [f"Not a pyscsi-target configuration (format must be {FORMAT!r})."]})
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValidationError({"version": ["The version must be a whole number."]})
    if version > VERSION:
        raise ValidationError({"version": [f"Version {version} is newer than this pyscsi-target reads ({VERSION})."]})
    known = {"format", "version", "generator", "exported", "secrets", "service_enabled", "global_config",
             "id_sequences", "api_keys", *(k.attr for k in KINDS)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValidationError({k: ["Unknown field."] for k in unknown})
    return doc


def _restore_secrets(raw: dict[str, object], current: ConfigModel, where: str, errors: dict[str, list[str]]) -> None:
    """Fill redacted (null) secrets from the current credential with the same id and user."""
    for key in SECRET_FIELDS:
        if key not in raw or raw[key] is not None:
            continue
        obj_id = raw.get("id")
        old = current.auth_credentials.get(obj_id) if isinstance(obj_id, int) else None
        if old is None or old.user != raw.get("user"):
            errors.setdefault(f"{where}.{key}", []).append(
                "Redacted in the export, and there is no credential with this id and user to keep it from."
            )
        else:
            raw[key] = getattr(old, key)


def plan_import(
    doc: object,
    current: ConfigModel,
    roots: ExtentRoots,
    session_count: Callable[[int], int] = lambda target_id: 0,
    *,
    current_api_keys: list[dict[str, Any]] | None = None,
    force: bool = False,
) -> ImportPlan:
    """Validate ``doc`` as a whole; raises ConfigError keyed by ``kind[index].field``."""
    body = _check_header(doc)
    errors: dict[str, list[str]] = {}
    model = ConfigModel(service_enabled=current.service_enabled)
    if "service_enabled" in body:
        if isinstance(body["service_enabled"], bool):
            model.service_enabled = body["service_enabled"]
        else:
            errors["service_enabled"] = ["Expected true or false."]
    global_raw = _shape(GlobalConfig, body.get("global_config", {}), "global_config", errors, with_id=False)
    try:
        model.global_config = build_global(model, global_raw)
    except ConfigError as exc:
        for key, msgs in exc.errors.items():
            errors.setdefault(f"global_config.{key}", []).extend(msgs)
    for kind, build in BUILDERS:
        rows = body.get(kind.attr, [])
        if not isinstance(rows, list):
            errors.setdefault(kind.attr, []).append("Expected a list.")
            continue
        seen: set[int] = set()
        for index, item in enumerate(rows):
            where = f"{kind.attr}[{index}]"
            if kind is AUTH_CREDENTIALS and isinstance(item, dict):
                item = dict(item)
                _restore_secrets(item, current, where, errors)
            raw = _shape(kind.cls, item, where, errors, with_id=True)
            obj_id = raw.get("id")
            if not isinstance(obj_id, int) or any(k.startswith(where + ".") for k in errors):
                continue
            if obj_id in seen:
                errors.setdefault(f"{where}.id", []).append(f"Id {obj_id} appears twice.")
                continue
            seen.add(obj_id)
            obj = kind.cls(**raw)
            if isinstance(obj, PortalGroup):
                # Addresses the current portal group listens on are not checked again.
                old = current.portal_groups.get(obj_id)
                obj.listen = list(old.listen) if old is not None else []
            try:
                kind.of(model)[obj_id] = build(model, {k: v for k, v in raw.items() if k != "id"}, obj, roots)
            except ConfigError as exc:
                for key, msgs in exc.errors.items():
                    errors.setdefault(where if key == "__all__" else f"{where}.{key}", []).extend(msgs)
    sequences, api_keys = _sequences_and_keys(body, errors)
    if api_keys is not None and api_keys == current_api_keys:
        api_keys = None  # the same keys: nothing to replace
    if errors:
        raise ValidationError(errors)
    plan = ImportPlan(
        model=model,
        changes=_diff(current, model),
        global_changed=current.global_config != model.global_config or current.service_enabled != model.service_enabled,
        files_to_realise=_files_to_realise(model),
        id_sequences=sequences,
        api_keys=api_keys,
    )
    for target_id, target in current.targets.items():
        new = model.targets.get(target_id)
        if new is None or model.target_iqn(new) != current.target_iqn(target):
            count = session_count(target_id)
            if count:
                plan.sessions_dropped[target_id] = count
    if plan.sessions_dropped and not force:
        names = ", ".join(current.targets[t].name for t in plan.sessions_dropped)
        raise ConflictError(f"Target is in use: the import removes or renames {names}, which have sessions "
                            "(force to drop them).")
    return plan


def _files_to_realise(model: ConfigModel) -> dict[int, tuple[str, int]]:
    out = {}
    for e in model.extents.values():
        size = parse_size(e.filesize or "0")
        if e.type == "File" and size and (not os.path.exists(e.path) or os.path.getsize(e.path) < size):
            out[e.id] = (e.path, size)
    return out


def _sequences_and_keys(
    body: Mapping[str, object], errors: dict[str, list[str]]
) -> tuple[dict[str, int], list[dict[str, Any]] | None]:
    sequences: dict[str, int] = {}
    raw_seq = body.get("id_sequences", {})
    if not isinstance(raw_seq, dict) or not all(
        k in {kind.attr for kind in KINDS} and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in raw_seq.items()
    ):
        errors.setdefault("id_sequences", []).append("Expected {kind: last id} for the object kinds.")
    else:
        sequences = dict(raw_seq)
    raw_keys = body.get("api_keys")
    if raw_keys is None:
        return sequences, None
    keys: list[dict[str, Any]] = []
    if not isinstance(raw_keys, list):
        errors.setdefault("api_keys", []).append("Expected a list or null.")
        return sequences, None
    for index, row in enumerate(raw_keys):
        ok = (
            isinstance(row, dict)
            and set(row) == {"id", "hash", "virtual_servers", "created"}
            and isinstance(row["id"], int)
            and isinstance(row["hash"], str)
            and len(row["hash"]) == 64
            and isinstance(row["virtual_servers"], list)
            and all(isinstance(v, int) for v in row["virtual_servers"])
            and isinstance(row["created"], int | float)
        )
        if not ok:
            errors.setdefault(f"api_keys[{index}]", []).append(
                "Expected {id, hash (SHA-256 hex), virtual_servers, created}."
            )
        else:
            keys.append(dict(row))
    return sequences, keys


def _diff(old: ConfigModel, new: ConfigModel) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for kind in KINDS:
        before, after = kind.of(old), kind.of(new)
        out[kind.attr] = {
            "added": sorted(after.keys() - before.keys()),
            "changed": sorted(k for k in after.keys() & before.keys() if after[k] != before[k]),
            "removed": sorted(before.keys() - after.keys()),
        }
    return out


async def apply_import(service: ConfigService, plan: ImportPlan) -> dict[str, object]:
    """Make ``plan.model`` the configuration, as one change; returns the plan's report."""

    def edit(draft: Draft) -> None:
        for kind in KINDS:
            objs = kind.of(draft.model)
            objs.clear()
            objs.update({k: dataclasses.replace(v) for k, v in kind.of(plan.model).items()})
        draft.model.global_config = dataclasses.replace(plan.model.global_config)
        draft.model.service_enabled = plan.model.service_enabled
        for kind_name, last in plan.id_sequences.items():
            draft.store.raise_id_sequence(kind_name, last)
        for kind in KINDS:  # ids taken now are never handed out again either
            if kind.of(draft.model):
                draft.store.raise_id_sequence(kind.attr, max(kind.of(draft.model)))
        if plan.api_keys is not None:
            draft.store.replace_api_keys(plan.api_keys)
        for path, size in plan.files_to_realise.values():
            if service.roots.realise(path, size):
                draft.on_undo(lambda p=path: service.roots.remove(p))  # type: ignore[misc]

    report = plan.report()  # before the files exist: it tells created from grown
    await service.change(edit)
    return report
