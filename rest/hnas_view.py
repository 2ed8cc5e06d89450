"""The Hitachi NAS v9 view of a target, over the FreeNAS objects of the configuration.

``enableAuthentication`` + ``secret`` map onto the target's target groups: auth type CHAP
and an auth group holding one credential whose user is the target's CHAP name (see
``chap_name``) and whose secret is the target's secret.  The group is "owned" by the target
when no other target (or portal) uses its tag; a shared group is never modified: the
target gets a fresh tag instead.  A /v9-created target is exported on every portal group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.fields import Boolean, Field, FieldSet, Text
from pyscsi_target.config.model import AuthCredential, ConfigModel, Target, TargetGroup
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.targets import TargetFields, build_target
from pyscsi_target.config.transaction import AUTH_CREDENTIALS, TARGET_GROUPS, TARGETS, Draft, copy_of, lookup

Fields = Mapping[str, object]


class HnasTargetFields(FieldSet):
    """The /v9 settings that are not fields of the FreeNAS target."""

    enable_authentication = Field("enable_authentication", Boolean())
    secret = Field("secret", Text(max_len=255))  # free-form, unlike FreeNAS's 12-16 rule
    regenerate_gun = Field("regenerate_gun", Boolean())


def chap_name(target: Target) -> str:
    """The CHAP user name an initiator must send for a /v9 authenticated target."""
    return target.name


def target_auth(model: ConfigModel, target_id: int) -> tuple[bool, str]:
    """(isAuthenticationEnabled, secret) of a target, as the /v9 view shows them."""
    groups = model.groups_of_target(target_id)
    enabled = bool(groups) and all(g.auth_type in ("CHAP", "CHAP Mutual") for g in groups)
    tags = [g.auth_group for g in groups if g.auth_group is not None]
    secret = ""
    if tags:
        creds = sorted(model.auth_group(tags[0]), key=lambda c: c.id)
        if creds:
            secret = creds[0].secret
    return enabled, secret


def _owned_tag(model: ConfigModel, target_id: int) -> int | None:
    tags = {g.auth_group for g in model.groups_of_target(target_id)}
    if len(tags) != 1:
        return None
    tag = next(iter(tags))
    if tag is None:
        return None
    users = {g.target for g in model.target_groups.values() if g.auth_group == tag}
    pgs = {p.discovery_auth_group for p in model.portal_groups.values()}
    return tag if users == {target_id} and tag not in pgs else None


def _default_name(fields: Fields) -> str:
    """Without ``name``, the target name is the alias in lower case, other characters as ``-``."""
    errs = Errors()
    alias = fields.get("alias")
    if alias is None or alias == "":
        errs.add("alias", "This field is required.")
        errs.raise_if_any()
    text = TargetFields.alias.read(fields, errs)
    errs.raise_if_any()
    assert isinstance(text, str)
    return re.sub(r"[^-a-z0-9.:]+", "-", text.lower()).strip("-.:") or "target"


async def create_target(service: ConfigService, fields: Fields) -> Target:
    """POST /v9/storage/iscsi-targets: a target exported on every portal group."""

    def edit(draft: Draft) -> Target:
        name = fields.get("name")
        target_fields = {
            "name": _default_name(fields) if name is None else name,
            "alias": fields.get("alias"),
            "comment": fields.get("comment"),
            "access_config": fields.get("access_config"),
            "virtual_server_id": fields.get("virtual_server_id"),
        }
        t = build_target(draft.model, target_fields, Target(id=0, name=""))
        _check_auth_fields(fields)
        draft.add(TARGETS, t)
        for pg_id in sorted(draft.model.portal_groups):
            draft.add(TARGET_GROUPS, TargetGroup(id=0, target=t.id, portal_group=pg_id))
        _apply_auth(draft, t, fields)
        return copy_of(t)

    return await service.change(edit)


async def patch_target(service: ConfigService, target_id: object, fields: Fields) -> Target:
    """PATCH /v9/storage/iscsi-targets/{id}: alias, comment, accessConfig,
    enableAuthentication, secret, regenerateGUN."""

    def edit(draft: Draft) -> Target:
        current = lookup(draft.model, TARGETS, target_id, "iSCSI target")
        own = (TargetFields.alias, TargetFields.comment, TargetFields.access_config)
        t = build_target(draft.model, {f.attr: fields[f.attr] for f in own if f.attr in fields}, copy_of(current))
        errs = Errors()
        if HnasTargetFields.regenerate_gun.read(fields, errs) is True:
            t.gun_generation += 1
        errs.raise_if_any()
        _check_auth_fields(fields)
        draft.model.targets[t.id] = t
        _apply_auth(draft, t, fields)
        return copy_of(t)

    return await service.change(edit)


def _check_auth_fields(fields: Fields) -> None:
    errs = Errors()
    HnasTargetFields.enable_authentication.read(fields, errs)
    secret = HnasTargetFields.secret.read(fields, errs)
    if isinstance(secret, str) and secret and re.search(r"\s", secret):
        errs.add("secret", "The secret cannot contain white space.")
    errs.raise_if_any()


def _apply_auth(draft: Draft, t: Target, fields: Fields) -> None:
    model = draft.model
    enable = HnasTargetFields.enable_authentication.read(fields, Errors())  # checked already
    secret = fields.get("secret")
    groups = model.groups_of_target(t.id)
    owned = _owned_tag(model, t.id)
    if secret is not None and str(secret):
        if owned is None:
            tag = max((c.tag for c in model.auth_credentials.values()), default=0) + 1
            tag = max(tag, max((g.auth_group or 0 for g in model.target_groups.values()), default=0) + 1)
            draft.add(AUTH_CREDENTIALS, AuthCredential(id=0, tag=tag, user=chap_name(t), secret=str(secret)))
            for g in groups:
                g.auth_group = tag  # a group already enforcing CHAP now uses the new secret
            owned = tag
        else:
            creds = sorted(model.auth_group(owned), key=lambda c: c.id)
            for extra in creds[1:]:
                del model.auth_credentials[extra.id]
            creds[0].secret = str(secret)  # the user name stays: FreeNAS-side clients may rely on it
            if creds[0].peersecret == str(secret):
                creds[0].peeruser = creds[0].peersecret = ""
    if enable is True:
        if not groups:
            msg = "The target is not exported on any portal group, so there is nothing to protect."
            raise ValidationError({"enable_authentication": [msg]})
        usable = [g.auth_group for g in groups if g.auth_group is not None and model.auth_group(g.auth_group)]
        use = owned if owned is not None else (usable[0] if usable else None)
        if use is None:
            raise ValidationError({"secret": ["A secret is required to enable authentication."]})
        for g in groups:
            if g.auth_group is None or not model.auth_group(g.auth_group):
                g.auth_group = use
            if g.auth_type not in ("CHAP", "CHAP Mutual"):
                g.auth_type = "CHAP"
    elif enable is False:
        for g in groups:
            g.auth_type = "None"
