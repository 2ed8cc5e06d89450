"""Initiator groups (FreeNAS "authorizedinitiator"): who may log in, by name and address."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pyscsi_target.config.errors import Errors
from pyscsi_target.config.fields import Field, FieldSet, Integer, Text
from pyscsi_target.config.model import InitiatorGroup
from pyscsi_target.values import initiator_names_text, networks_text


class InitiatorGroupFields(FieldSet):
    # Lengths are FreeNAS 11.3's model limits.
    tag = Field("tag", Integer(lo=1, hi=65535))
    initiators = Field("initiators", Text(max_len=2048, allow_ctrl=True))
    auth_network = Field("auth_network", Text(max_len=2048, allow_ctrl=True))
    comment = Field("comment", Text(max_len=120))


def build_initiator_group(fields: Mapping[str, object], ig: InitiatorGroup) -> InitiatorGroup:
    F = InitiatorGroupFields
    errs = Errors()
    F.tag.assign(ig, fields, errs)
    F.comment.assign(ig, fields, errs)
    stored: tuple[tuple[Field[str], Callable[[str], str]], ...] = (
        (F.initiators, initiator_names_text),
        (F.auth_network, networks_text),
    )
    for f, normalise in stored:
        text = f.read(fields, errs)
        if isinstance(text, str):
            try:
                setattr(ig, f.attr, normalise(text))
            except ValueError as exc:
                errs.add(f.attr, str(exc))
    errs.raise_if_any()
    return ig
