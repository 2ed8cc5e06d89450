"""The global iSCSI settings (FreeNAS "globalconfiguration") and the service switch."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.fields import UNSET, Boolean, Field, FieldSet, Integer, Nullable, Text
from pyscsi_target.config.model import ConfigModel, GlobalConfig
from pyscsi_target.values import MAX_ISCSI_NAME, check_iscsi_name, is_full_iscsi_name

_ISNS_SERVER_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9a-fA-F:.]+\](:\d{1,5})?")


class GlobalFields(FieldSet):
    basename = Field("basename", Text(max_len=MAX_ISCSI_NAME))
    isns_servers = Field("isns_servers", Text())
    # 0 is taken as "none", as for extents.
    pool_avail_threshold = Field("pool_avail_threshold", Nullable(Integer(lo=0, hi=99)))


class ServiceFields(FieldSet):
    """FreeNAS services/iscsitarget: ``srv_enable`` starts or stops every portal."""

    enabled = Field("enabled", Boolean(true_words=("true", "1"), false_words=("false", "0")))


def build_global(model: ConfigModel, changes: Mapping[str, object]) -> GlobalConfig:
    """Validate ``changes`` into ``model.global_config`` (edited in place)."""
    F = GlobalFields
    gc = model.global_config
    errs = Errors()
    basename = F.basename.read(changes, errs)
    if isinstance(basename, str):
        try:
            check_iscsi_name(basename)
        except ValueError:
            ok = False
        else:
            ok = True
        if not is_full_iscsi_name(basename) or (not ok and not basename.startswith("iqn.")):
            errs.add("basename", "Base name must be an iqn., eui. or naa. name in lower case.")
        elif not ok:
            errs.add("basename", "Base name must look like iqn.yyyy-mm.reversed.domain.")
        else:
            gc.basename = basename
    servers = F.isns_servers.read(changes, errs)
    if isinstance(servers, str):
        for entry in servers.split():
            if not _ISNS_SERVER_RE.fullmatch(entry):
                errs.add("isns_servers", f"{entry!r} is not a host name or address.")
        gc.isns_servers = " ".join(servers.split())
    if "pool_avail_threshold" in changes:
        threshold = F.pool_avail_threshold.read(changes, errs)
        if threshold is not UNSET:
            gc.pool_avail_threshold = threshold or None
    errs.raise_if_any()
    for target in model.targets.values():
        if len(model.target_iqn(target)) > MAX_ISCSI_NAME:
            raise ValidationError({"basename": [f"Target {target.name} would get an IQN over 223 bytes."]})
    return gc
