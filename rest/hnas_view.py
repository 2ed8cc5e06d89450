"""The Hitachi NAS v9 view of a target, over the FreeNAS objects of the configuration.

``enableAuthentication`` and ``secret`` belong to the target (``Target.auth_required``,
``Target.auth_group``): the secret is the credential in the target's own auth group, whose
user is the target's CHAP name (see ``chap_name``); while authentication is enabled every
target group of the target demands CHAP with it, including groups added later through the
FreeNAS view (``require_target_chap``).  The group is the target's own when nothing else
uses its tag; a shared group is never modified: the target gets a fresh tag instead.  A
/v9-created target is exported on every portal group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.fields import UNSET, Boolean, Field, FieldSet, Text
from pyscsi_target.config.model import AuthCredential, ConfigModel, Target, TargetGroup
from pyscsi_target.config.service import ConfigService
from pyscsi_target.config.target_groups import CHAP_METHODS, require_target_chap
from pyscsi_target.config.targets import TargetFields, build_target
from pyscsi_target.config.transaction import AUTH_CREDENTIALS, TARGET_GROUPS, TARGETS, Draft, copy_of, lookup

Fields = Mapping[str, object]


# The shortest /v9 CHAP secret: 10 characters, the length of the HNAS document's own example
# ("secret1234"), which must keep working as printed.  RFC 7143 (9.2.1, 12.1.3) asks for
# random secrets of up to 128 bits and for IPsec below 96 random bits, and FreeNAS and the
# Windows initiator require 12-16 characters; LIO (targetcli) and open-iscsi accept any
# length.  No length makes a typed secret random, so the floor only keeps out the trivially
# short (the 1-character secret that was accepted); the per-initiator CHAP back-off is what
# stops guessing on the wire.
HNAS_SECRET_MIN = 10


class HnasTargetFields(FieldSet):
    """The /v9 settings that are not fields of the FreeNAS target."""

    enable_authentication = Field("enable_authentication", Boolean())
    secret = Field("secret", Text(max_len=255, min_len=HNAS_SECRET_MIN))  # not FreeNAS's 12-16 rule
    regenerate_gun = Field("regenerate_gun", Boolean())


def chap_name(target: Target) -> str:
    """The CHAP user name an initiator must send for a /v9 authenticated target."""
    return target.name


def _auth_tag(model: ConfigModel, t: Target) -> int | None:
    """The auth group whose secret the /v9 view shows: the target's own, else (a target set
    up through the FreeNAS view) the one its first target group uses."""
    if t.auth_group is not None:
        return t.auth_group
    return next((g.auth_group for g in model.groups_of_target(t.id) if g.auth_group is not None), None)


def target_auth(model: ConfigModel, t: Target) -> tuple[bool, str]:
    """(isAuthenticationEnabled, secret) of a target, as the /v9 view shows them: enabled
    when the target requires it or every target group demands CHAP; the secret as stored."""
    groups = model.groups_of_target(t.id)
    enabled = t.auth_required or (bool(groups) and all(g.auth_type in CHAP_METHODS for g in groups))
    creds = sorted(model.auth_group(_auth_tag(model, t)), key=lambda c: c.id)
    return enabled, creds[0].secret if creds else ""


def _owned(model: ConfigModel, t: Target, tag: int | None) -> bool:
    """True if only this target uses auth group ``tag`` (no other target, none of its target
    groups, no portal's discovery auth): then its credential may be changed for the target."""
    if tag is None:
        return False
    if any(g.auth_group == tag and g.target != t.id for g in model.target_groups.values()):
        return False
    if any(o.auth_group == tag and o.id != t.id for o in model.targets.values()):
        return False
    return all(p.discovery_auth_group != tag for p in model.portal_groups.values())


def _adoptable_tag(model: ConfigModel, t: Target) -> int | None:
    """A target without its own auth group adopts the one all its target groups use, if
    nothing else uses it (CHAP set up through the FreeNAS view keeps its user name)."""
    tags = {g.auth_group for g in model.groups_of_target(t.id)}
    tag = next(iter(tags)) if len(tags) == 1 else None
    return tag if _owned(model, t, tag) else None


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
    elif isinstance(secret, str) and secret and len(secret) < HNAS_SECRET_MIN:
        errs.add("secret", f"The secret must be at least {HNAS_SECRET_MIN} characters long.")
    errs.raise_if_any()


def _apply_auth(draft: Draft, t: Target, fields: Fields) -> None:
    """Store ``secret`` and ``enableAuthentication`` on the target and put them into effect
    on its target groups (``require_target_chap`` keeps them there for groups added later)."""
    model = draft.model
    enable = HnasTargetFields.enable_authentication.read(fields, Errors())  # checked already
    secret = fields.get("secret")
    if enable is UNSET and not secret:
        return  # a PATCH of other fields leaves authentication as it is
    # Our own copies: the committed groups and credentials are sealed (shared with the model).
    groups = [draft.own(TARGET_GROUPS, g) for g in model.groups_of_target(t.id)]
    if t.auth_group is None:
        t.auth_group = _adoptable_tag(model, t)
    if isinstance(secret, str) and secret:
        tag = t.auth_group if _owned(model, t, t.auth_group) else None
        creds = sorted(model.auth_group(tag), key=lambda c: c.id)
        if not creds:
            if tag is None:  # a shared group is never modified: the target gets its own
                used = [c.tag for c in model.auth_credentials.values()]
                used += [g.auth_group or 0 for g in model.target_groups.values()]
                used += [o.auth_group or 0 for o in model.targets.values()]
                used += [p.discovery_auth_group or 0 for p in model.portal_groups.values()]
                tag = max(used, default=0) + 1
            creds = [draft.add(AUTH_CREDENTIALS, AuthCredential(id=0, tag=tag, user=chap_name(t), secret=secret))]
        creds[0] = draft.own(AUTH_CREDENTIALS, creds[0])
        for extra in creds[1:]:
            del model.auth_credentials[extra.id]
        creds[0].secret = secret  # the user name stays: FreeNAS-side clients may rely on it
        if creds[0].peersecret == secret:
            creds[0].peeruser = creds[0].peersecret = ""
        t.auth_group = tag
        for g in groups:
            g.auth_group = tag  # a group already enforcing CHAP now uses the new secret
    if enable is True:
        if not model.auth_group(t.auth_group):
            usable = [g.auth_group for g in groups if model.auth_group(g.auth_group)]
            if not usable:
                raise ValidationError({"secret": ["A secret is required to enable authentication."]})
            t.auth_group = usable[0]
        t.auth_required = True
        for g in groups:
            require_target_chap(model, g)
    elif enable is False:
        t.auth_required = False
        for g in groups:
            g.auth_type = "None"
