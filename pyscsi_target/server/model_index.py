"""The engine's indexes over its current model: a target's target groups and LUN maps, and
the LUN maps of an extent, kept up to date from each change's delta (so that a login, a
SendTargets and an apply never scan every target group or LUN map of the configuration)."""

from __future__ import annotations

from typing import TypeVar

from ..config import model as M
from ..config.delta import ModelDelta


class ModelIndex:
    def __init__(self) -> None:
        self.groups_by_target: dict[int, dict[int, M.TargetGroup]] = {}
        self.maps_by_target: dict[int, dict[int, M.LunMap]] = {}
        self.maps_by_extent: dict[int, dict[int, M.LunMap]] = {}

    @classmethod
    def of(cls, model: M.ConfigModel) -> ModelIndex:
        """The index of ``model`` built from scratch."""
        index = cls()
        empty = M.ConfigModel()
        index.update(empty, model, ModelDelta.between(empty, model))
        return index

    def update(self, old: M.ConfigModel, new: M.ConfigModel, delta: ModelDelta) -> None:
        for gid in delta.target_groups:
            g = old.target_groups.get(gid)
            if g is not None:
                _drop(self.groups_by_target, g.target, gid)
            g = new.target_groups.get(gid)
            if g is not None:
                self.groups_by_target.setdefault(g.target, {})[gid] = g
        for mid in delta.lun_maps:
            m = old.lun_maps.get(mid)
            if m is not None:
                _drop(self.maps_by_target, m.target, mid)
                _drop(self.maps_by_extent, m.extent, mid)
            m = new.lun_maps.get(mid)
            if m is not None:
                self.maps_by_target.setdefault(m.target, {})[mid] = m
                self.maps_by_extent.setdefault(m.extent, {})[mid] = m

    def groups_of(self, target_id: int) -> list[M.TargetGroup]:
        """The target groups of a target, in id order (as the model's dict holds them)."""
        groups = self.groups_by_target.get(target_id)
        return sorted(groups.values(), key=lambda g: g.id) if groups else []

    def luns_of(self, model: M.ConfigModel, target_id: int) -> dict[int, M.Extent]:
        """LUN -> extent of a target (maps whose extent is gone are left out)."""
        maps = self.maps_by_target.get(target_id)
        if not maps:
            return {}
        return {m.lunid: model.extents[m.extent] for m in maps.values() if m.extent in model.extents}

    def targets_of_extent(self, extent_id: int) -> set[int]:
        return {m.target for m in self.maps_by_extent.get(extent_id, {}).values()}


V = TypeVar("V")


def _drop(index: dict[int, dict[int, V]], key: int, obj_id: int) -> None:
    entries = index.get(key)
    if entries is not None:
        entries.pop(obj_id, None)
        if not entries:
            del index[key]
