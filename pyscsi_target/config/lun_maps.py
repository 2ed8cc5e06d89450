"""LUN maps (FreeNAS "targettoextent"): an extent at a LUN of a target."""

from __future__ import annotations

from collections.abc import Mapping

from pyscsi_target.config.errors import ConflictError, Errors
from pyscsi_target.config.fields import UNSET, Field, FieldSet, Integer, Nullable
from pyscsi_target.config.model import ConfigModel, LunMap
from pyscsi_target.config.target_groups import NOT_A_CHOICE

MAX_LUN = 1023  # FreeNAS/ctld limit; also keeps REPORT LUNS in peripheral/flat addressing


class LunMapFields(FieldSet):
    target = Field("target", Integer(lo=1))
    extent = Field("extent", Integer(lo=1))
    lunid = Field("lunid", Nullable(Integer(lo=0, hi=MAX_LUN)))  # null: the lowest free LUN


def build_lun_map(model: ConfigModel, fields: Mapping[str, object], m: LunMap, auto_lun: bool) -> LunMap:
    F = LunMapFields
    errs = Errors()
    F.target.assign(m, fields, errs)
    F.extent.assign(m, fields, errs)
    lunid = F.lunid.read(fields, errs)
    if lunid is not UNSET and lunid is not None:
        m.lunid = lunid
        auto_lun = False
    if "target" not in errs and m.target not in model.targets:
        errs.add("target", NOT_A_CHOICE)
    if "extent" not in errs and m.extent not in model.extents:
        errs.add("extent", NOT_A_CHOICE)
    errs.raise_if_any()
    others = [o for o in model.lun_maps.values() if o.id != m.id and o.target == m.target]
    if any(o.extent == m.extent for o in others):
        raise ConflictError({"extent": ["Extent is already in this target."]})
    used = {o.lunid for o in others}
    if auto_lun:
        free = next((n for n in range(MAX_LUN + 1) if n not in used), None)
        if free is None:
            raise ConflictError({"lunid": ["No free LUN ID left in this target."]})
        m.lunid = free
    elif m.lunid in used:
        raise ConflictError({"lunid": ["LUN ID is already being used for this target."]})
    return m
