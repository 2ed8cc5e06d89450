"""Target nodes (FreeNAS "target"): a name, an alias and the Hitachi view's settings."""

from __future__ import annotations

from collections.abc import Mapping

from pyscsi_target.config.errors import NO_QUOTES, ConflictError, Errors
from pyscsi_target.config.fields import UNSET, Boolean, Field, FieldSet, Integer, Nullable, Text
from pyscsi_target.config.model import ConfigModel, Target
from pyscsi_target.values import MAX_ISCSI_NAME, check_iscsi_name, parse_access_config


class TargetFields(FieldSet):
    # FreeNAS 11.3's model lengths (the IQN the name makes is also held to 223 bytes).
    name = Field("name", Text(max_len=120, pattern="^[-a-z0-9.:]+$"))
    alias = Field("alias", Nullable(Text(max_len=120)))
    comment = Field("comment", Text())
    access_config = Field("access_config", Text(max_len=8192))
    virtual_server_id = Field("virtual_server_id", Integer(lo=0, hi=255))
    # Native settings (not in the FreeNAS or Hitachi documents): target resets from initiators.
    allow_warm_reset = Field("allow_warm_reset", Boolean())
    allow_cold_reset = Field("allow_cold_reset", Boolean())


def build_target(model: ConfigModel, fields: Mapping[str, object], t: Target) -> Target:
    F = TargetFields
    errs = Errors()
    F.name.assign(t, fields, errs)
    if not t.name and "name" not in errs:
        errs.add("name", "This field is required.")
    elif "name" not in errs:
        try:
            check_iscsi_name(t.name)
        except ValueError as exc:
            errs.add("name", str(exc))
        else:
            if len(model.target_iqn(t).encode()) > MAX_ISCSI_NAME:
                errs.add("name", "The target's IQN would be longer than 223 bytes.")
    alias = F.alias.read(fields, errs)
    if isinstance(alias, str) and '"' in alias:
        errs.add("alias", NO_QUOTES)
    elif alias == "target":
        errs.add("alias", "target is a reserved word")  # FreeNAS 11.3's rule and words
    elif alias is not UNSET:
        t.alias = alias
    F.comment.assign(t, fields, errs)
    text = F.access_config.read(fields, errs)
    if isinstance(text, str):
        try:
            parse_access_config(text)
            t.access_config = text.strip()
        except ValueError as exc:
            errs.add("access_config", str(exc))
    F.virtual_server_id.assign(t, fields, errs)
    F.allow_warm_reset.assign(t, fields, errs)
    F.allow_cold_reset.assign(t, fields, errs)
    errs.raise_if_any()
    iqn = model.target_iqn(t)
    for other in model.targets.values():
        if other.id == t.id:
            continue
        if other.name == t.name:
            raise ConflictError({"name": ["Target name already exists"]})
        if t.alias is not None and other.alias == t.alias:
            raise ConflictError({"alias": ["Alias already exists"]})
        # Equal IQNs contain the other's name: test that first, it spares building every IQN.
        if other.name in iqn and model.target_iqn(other) == iqn:
            raise ConflictError({"name": ["Target name already exists"]})
    return t
