"""Target groups (FreeNAS "targetgroup"): a target exported on a portal group, with access
by an initiator group and CHAP by an auth group."""

from __future__ import annotations

from collections.abc import Mapping

from pyscsi_target.config.auth_credentials import check_auth_group
from pyscsi_target.config.errors import ConflictError, Errors, ValidationError
from pyscsi_target.config.fields import Choice, Field, FieldSet, Integer, Nullable, Text
from pyscsi_target.config.model import AUTH_METHODS, ConfigModel, TargetGroup

NOT_A_CHOICE = "Select a valid choice. That choice is not one of the available choices."
CHAP_METHODS = ("CHAP", "CHAP Mutual")


class TargetGroupFields(FieldSet):
    target = Field("target", Integer(lo=1))
    portal_group = Field("portal_group", Integer(lo=1))
    initiator_group = Field("initiator_group", Nullable(Integer(lo=1)))
    # -1 is FreeNAS's form value for "no auth group" (opensvc sends it).
    auth_group = Field("auth_group", Nullable(Integer(lo=1), none_words=(-1, "-1")))
    auth_type = Field("auth_type", Choice(Text(), AUTH_METHODS))
    # FreeNAS stored this free-form (its own document PUTs "CHAP"); kept short.
    initial_digest = Field("initial_digest", Text(max_len=120))


def build_target_group(model: ConfigModel, fields: Mapping[str, object], g: TargetGroup) -> TargetGroup:
    F = TargetGroupFields
    errs = Errors()
    for f in (F.target, F.portal_group, F.initiator_group, F.auth_group, F.auth_type, F.initial_digest):
        f.assign(g, fields, errs)
    if "target" not in errs and g.target not in model.targets:
        errs.add("target", NOT_A_CHOICE)
    if "portal_group" not in errs and g.portal_group not in model.portal_groups:
        errs.add("portal_group", NOT_A_CHOICE)
    ig = g.initiator_group
    if "initiator_group" not in errs and ig is not None and ig not in model.initiator_groups:
        errs.add("initiator_group", NOT_A_CHOICE)
    errs.raise_if_any()
    require_target_chap(model, g)
    check_auth_group(model, g.auth_type, g.auth_group, "auth_group")
    for other in model.target_groups.values():
        if other.id != g.id and other.target == g.target and other.portal_group == g.portal_group:
            tag = model.portal_groups[g.portal_group].tag
            raise ConflictError({"portal_group": [f"Portal {tag} cannot be duplicated on a target"]})
    return g


def require_target_chap(model: ConfigModel, g: TargetGroup) -> None:
    """A target that requires authentication (the Hitachi view's ``enableAuthentication``)
    has CHAP on every one of its target groups, those added later through the FreeNAS view
    included: a weaker auth type becomes CHAP, and a group without a usable auth group takes
    the target's own.  Fail closed: the target's setting only ever strengthens a group."""
    t = model.targets.get(g.target)
    if t is None or not t.auth_required:
        return
    if g.auth_type not in CHAP_METHODS:
        g.auth_type = "CHAP"
    if g.auth_group is None or not model.auth_group(g.auth_group):
        g.auth_group = t.auth_group
    if g.auth_group is None or not model.auth_group(g.auth_group):
        msg = f"Target {t.name} requires CHAP and has no credential left: give it a secret first."
        raise ValidationError({"auth_group": [msg]})
