"""Auth credentials (FreeNAS "authcredential"): CHAP users grouped into auth groups by tag."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.fields import Field, FieldSet, Integer, Text
from pyscsi_target.config.model import AuthCredential, ConfigModel

CHAP_MIN, CHAP_MAX = 12, 16  # FreeNAS's secret lengths
DEFAULT_TAG = 1  # FreeNAS's model default: a credential sent without a tag joins group 1


class AuthCredentialFields(FieldSet):
    # Lengths are FreeNAS 11.3's model limits (secrets are further held to 12-16).
    tag = Field("tag", Integer(lo=1, hi=65535))
    user = Field("user", Text(max_len=120))
    secret = Field("secret", Text(max_len=120, min_len=CHAP_MIN))
    peeruser = Field("peeruser", Text(max_len=120))
    peersecret = Field("peersecret", Text(max_len=120, min_len=CHAP_MIN))


def build_auth_credential(fields: Mapping[str, object], ac: AuthCredential) -> AuthCredential:
    F = AuthCredentialFields
    errs = Errors()
    F.tag.assign(ac, fields, errs)
    for f in (F.user, F.secret, F.peeruser, F.peersecret):
        value = f.read(fields, errs)
        if isinstance(value, str):
            if f.attr.endswith("user") and value and re.search(r"\s", value):
                errs.add(f.attr, "User names cannot contain white space.")
            setattr(ac, f.attr, value)
    if not ac.tag and "tag" not in errs:
        errs.add("tag", "This field is required.")
    if not ac.user and "user" not in errs:
        errs.add("user", "This field is required.")
    if "secret" not in errs and not CHAP_MIN <= len(ac.secret) <= CHAP_MAX:
        errs.add("secret", f"Secret must be between {CHAP_MIN} and {CHAP_MAX} characters.")
    if ac.peeruser and not ac.peersecret and "peersecret" not in errs:
        errs.add("peersecret", "The peer secret is required if you set a peer user.")
    if ac.peersecret and not ac.peeruser and "peeruser" not in errs:
        errs.add("peeruser", "The peer user is required if you set a peer secret.")
    if ac.peersecret and "peersecret" not in errs:
        if not CHAP_MIN <= len(ac.peersecret) <= CHAP_MAX:
            errs.add("peersecret", f"Peer secret must be between {CHAP_MIN} and {CHAP_MAX} characters.")
        elif ac.peersecret == ac.secret:
            errs.add("peersecret", "The peer secret cannot be the same as user secret.")
    errs.raise_if_any()
    return ac


def check_auth_group(model: ConfigModel, method: str, tag: int | None, gfield: str) -> None:
    """The auth group an auth method needs exists (CHAP Mutual: with a peer user)."""
    if tag is not None and not model.auth_group(tag):
        raise ValidationError({gfield: [f"Auth group {tag} does not exist."]})
    if method in ("CHAP", "CHAP Mutual") and tag is None:
        raise ValidationError({gfield: [f"An auth group is required for {method}."]})
    if method == "CHAP Mutual" and not any(c.peeruser for c in model.auth_group(tag)):
        raise ValidationError({gfield: ["CHAP Mutual needs a credential with a peer user in the auth group."]})
