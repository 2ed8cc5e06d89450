"""What a configuration change changed, found by object identity.

Committed model objects are sealed and shared by every later model (config/model.py), so an
object that a change did not touch is the *same object* in the old and the new model: the
ids whose object differs (or exists on one side only) are exactly what changed, found with
one identity test per object instead of a field-by-field comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .model import ConfigModel


def changed_ids(old: Mapping[int, object], new: Mapping[int, object]) -> set[int]:
    """Ids added, removed, or whose object was replaced."""
    out = old.keys() ^ new.keys()
    get = old.get
    out.update(k for k, v in new.items() if get(k) is not v)
    return out


@dataclass(frozen=True)
class ModelDelta:
    portal_groups: set[int]
    initiator_groups: set[int]
    auth_credentials: set[int]
    targets: set[int]
    target_groups: set[int]
    extents: set[int]
    lun_maps: set[int]
    #: the base name (every generated IQN) changed
    basename: bool
    service_enabled: bool

    @classmethod
    def between(cls, old: ConfigModel, new: ConfigModel) -> ModelDelta:
        return cls(
            portal_groups=changed_ids(old.portal_groups, new.portal_groups),
            initiator_groups=changed_ids(old.initiator_groups, new.initiator_groups),
            auth_credentials=changed_ids(old.auth_credentials, new.auth_credentials),
            targets=changed_ids(old.targets, new.targets),
            target_groups=changed_ids(old.target_groups, new.target_groups),
            extents=changed_ids(old.extents, new.extents),
            lun_maps=changed_ids(old.lun_maps, new.lun_maps),
            basename=old.global_config.basename != new.global_config.basename,
            service_enabled=old.service_enabled != new.service_enabled,
        )
