"""The FreeNAS v1.0 resources' field tables: every FreeNAS field name, once.

Rows are in the order FreeNAS showed the fields; each names the model field whose rules
(``pyscsi_target/config/<resource>.py``) apply, or computes what FreeNAS showed.
"""

from __future__ import annotations

from typing import Any

from pyscsi_target import __version__
from pyscsi_target.config.auth_credentials import AuthCredentialFields as AC
from pyscsi_target.config.extents import ExtentFields as EX
from pyscsi_target.config.global_settings import GlobalFields as GC
from pyscsi_target.config.global_settings import ServiceFields
from pyscsi_target.config.initiator_groups import InitiatorGroupFields as IG
from pyscsi_target.config.lun_maps import LunMapFields as LM
from pyscsi_target.config.model import ConfigModel, Extent
from pyscsi_target.config.portal_groups import PortalGroupFields as PG
from pyscsi_target.config.target_groups import TargetGroupFields as TG
from pyscsi_target.config.targets import TargetFields as TN

from .tables import Column, Table

ID = Column("id", show=lambda model, obj: obj.id, schema={"type": "integer"})

PORTAL = Table(
    "Portal",
    (
        ID,
        Column("iscsi_target_portal_tag", PG.tag),
        Column("iscsi_target_portal_comment", PG.comment, example="lab"),
        Column("iscsi_target_portal_discoveryauthmethod", PG.discovery_auth_method),
        Column("iscsi_target_portal_discoveryauthgroup", PG.discovery_auth_group),
        Column("iscsi_target_portal_ips", PG.listen, required=True, example=["127.0.0.1:3270"]),
    ),
)

AUTHORIZED_INITIATOR = Table(
    "AuthorizedInitiator",
    (
        ID,
        Column("iscsi_target_initiator_tag", IG.tag),
        Column("iscsi_target_initiator_initiators", IG.initiators, example="ALL"),
        Column("iscsi_target_initiator_auth_network", IG.auth_network, example="127.0.0.0/8"),
        # "scsi_": the document's own spelling in one example.
        Column("iscsi_target_initiator_comment", IG.comment, aliases=("scsi_target_initiator_comment",)),
    ),
)

AUTH_CREDENTIAL = Table(
    "AuthCredential",
    (
        ID,
        Column("iscsi_target_auth_tag", AC.tag, example=1),  # default 1, as FreeNAS
        Column("iscsi_target_auth_user", AC.user, required=True, example="user"),
        Column("iscsi_target_auth_secret", AC.secret, required=True, example="secretsecret"),
        Column("iscsi_target_auth_peeruser", AC.peeruser),
        Column("iscsi_target_auth_peersecret", AC.peersecret),
    ),
)

TARGET = Table(
    "Target",
    (
        ID,
        Column("iscsi_target_name", TN.name, required=True, example="target0"),
        Column("iscsi_target_alias", TN.alias, example=None),
    ),
)

TARGET_GROUP = Table(
    "TargetGroup",
    (
        ID,
        Column("iscsi_target", TG.target, required=True, example=1),
        Column("iscsi_target_portalgroup", TG.portal_group, required=True, example=1),
        Column("iscsi_target_initiatorgroup", TG.initiator_group),
        Column("iscsi_target_authgroup", TG.auth_group),
        Column("iscsi_target_authtype", TG.auth_type, example="None"),
        Column("iscsi_target_initialdigest", TG.initial_digest),
    ),
)


def _extent_type(model: ConfigModel, e: Extent) -> str:
    # FreeNAS showed a zvol-backed Disk extent as "ZVOL".
    return "ZVOL" if e.type == "Disk" and e.disk.startswith("zvol/") else e.type


EXTENT = Table(
    "Extent",
    (
        ID,
        Column("iscsi_target_extent_name", EX.name, required=True, example="extent0"),
        Column("iscsi_target_extent_type", EX.type, show=_extent_type, schema=EX.type.type.schema(), example="File"),
        Column("iscsi_target_extent_path", EX.path, example="extent0.img"),
        Column("iscsi_target_extent_disk", EX.disk),
        Column("iscsi_target_extent_filesize", EX.filesize, example="1MB"),
        Column("iscsi_target_extent_blocksize", EX.blocksize),
        Column("iscsi_target_extent_pblocksize", EX.pblocksize),
        Column("iscsi_target_extent_rpm", EX.rpm),
        Column("iscsi_target_extent_serial", EX.serial),
        Column(
            "iscsi_target_extent_naa",
            EX.naa,
            schema={"type": "string", "pattern": "^0x[0-9a-f]{16}$"},  # shown in lower case
        ),
        Column("iscsi_target_extent_ro", EX.ro),
        Column("iscsi_target_extent_insecure_tpc", EX.insecure_tpc),
        Column("iscsi_target_extent_xen", EX.xen),
        Column("iscsi_target_extent_avail_threshold", EX.avail_threshold),
        Column("iscsi_target_extent_comment", EX.comment),
        # Not in the FreeNAS document: type "RBD" names a Ceph image in the path (pool/image or
        # pool/namespace/image) and its cluster here (empty: the daemon's --ceph-* settings).
        Column("iscsi_target_extent_ceph_conf", EX.ceph_conf),
        Column("iscsi_target_extent_ceph_client", EX.ceph_client),
        Column("iscsi_target_extent_ceph_keyring", EX.ceph_keyring),
    ),
)

TARGET_TO_EXTENT = Table(
    "TargetToExtent",
    (
        ID,
        Column("iscsi_target", LM.target, required=True, example=1),
        Column("iscsi_extent", LM.extent, required=True, example=1),
        Column("iscsi_lunid", LM.lunid, schema={"type": "integer", "minimum": 0}, example=None),
    ),
)

GLOBAL_CONFIGURATION = Table(
    "GlobalConfiguration",
    (
        ID,
        Column("iscsi_basename", GC.basename, example="iqn.2026-11.org.example"),
        Column("iscsi_isns_servers", GC.isns_servers),
        Column("iscsi_pool_avail_threshold", GC.pool_avail_threshold),
    ),
)


def _service_enabled(model: ConfigModel, _: Any) -> bool:
    return model.service_enabled


ISCSI_SERVICE = Table(
    "Service",
    (
        Column("id", show=lambda model, _: 4, schema={"type": "integer"}),
        Column("srv_service", show=lambda model, _: "iscsitarget", schema={"type": "string"}),
        Column("srv_enable", ServiceFields.enabled, show=_service_enabled),
        Column(
            "srv_state",
            show=lambda model, _: "RUNNING" if model.service_enabled else "STOPPED",
            schema={"type": "string", "enum": ["RUNNING", "STOPPED"]},
        ),
    ),
)

# The release clients are told they talk to.  They pick their code path from it:
# democratic-csi and freenas-proxmox read /api/v2.0/system/version/ and use the v1.0 API for
# 11.2 (democratic-csi: "11.2" exactly; freenas-proxmox: below 11.3-U1) and v2.0 above, which
# is not served here.  11.2 and 11.3 served the same v1.0 iSCSI resources.
FREENAS_RELEASE = "FreeNAS-11.2-U8"

# /api/v1.0/system/version/ as FreeNAS 11.2 answered it ("version" was empty there).
SYSTEM_VERSION = Table(
    "Version",
    (
        Column(
            "fullversion",
            show=lambda model, _: f"{FREENAS_RELEASE} (pyscsi-target {__version__})",
            schema={"type": "string"},
        ),
        Column("name", show=lambda model, _: "FreeNAS", schema={"type": "string"}),
        Column("version", show=lambda model, _: "", schema={"type": "string"}),
    ),
)


# /api/v1.0/system/alert/ as FreeNAS 11.3 showed alert.list (gui/api/resources.py AlertResource).
SYSTEM_ALERT = Table(
    "Alert",
    (
        Column("id", show=lambda model, a: a.id, schema={"type": "string"}),
        Column("level", show=lambda model, a: a.level, schema={"type": "string", "example": "WARNING"}),
        Column("message", show=lambda model, a: a.message, schema={"type": "string"}),
        Column("dismissed", show=lambda model, a: a.dismissed, schema={"type": "boolean"}),
        Column("timestamp", show=lambda model, a: int(a.since), schema={"type": "integer"}),
    ),
)
