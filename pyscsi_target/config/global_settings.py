"""The global iSCSI settings (FreeNAS "globalconfiguration") and the service switch."""

from __future__ import annotations

from collections.abc import Mapping

from pyscsi_target.config.errors import Errors, ValidationError
from pyscsi_target.config.fields import THRESHOLD, Boolean, Field, FieldSet, Text
from pyscsi_target.config.model import ConfigModel, GlobalConfig
from pyscsi_target.values import MAX_ISCSI_NAME, check_iscsi_name, is_full_iscsi_name, parse_isns_servers


class GlobalFields(FieldSet):
    basename = Field("basename", Text(max_len=120))  # FreeNAS's model length
    isns_servers = Field("isns_servers", Text())
    pool_avail_threshold = Field("pool_avail_threshold", THRESHOLD)


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
        for entry in parse_isns_servers(servers)[1]:
            errs.add("isns_servers", f'Server "{entry}" is not a valid IP(:PORT)? tuple.')  # FreeNAS's words
        gc.isns_servers = " ".join(servers.replace(",", " ").split())
    F.pool_avail_threshold.assign(gc, changes, errs)
    errs.raise_if_any()
    for target in model.targets.values():
        if len(model.target_iqn(target)) > MAX_ISCSI_NAME:
            raise ValidationError({"basename": [f"Target {target.name} would get an IQN over 223 bytes."]})
    return gc
