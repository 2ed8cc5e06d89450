"""The one domain model: what the engine serves and what both REST façades show.

Names follow the FreeNAS v1.0 iSCSI resources and iSCSI's own
vocabulary: a *portal group* (FreeNAS "portal") has a tag and listen addresses, an
*initiator group* ("authorizedinitiator") limits who may log in, an *auth group*
is the set of CHAP credentials sharing one tag ("authcredential"), a *target node*
("target") is exported through *target groups* ("targetgroup": target x portal group
x initiator group x auth group), and *LUN maps* ("targettoextent") put *extents* at
LUNs of a target.

The objects are plain dataclasses so that the engine can read a consistent snapshot
and the store can persist them without an ORM.  Invariants (uniqueness, references)
are checked by the config service, not here.

Once committed, an object is *sealed*: the current model, every later draft and the engine
share it (a model copy copies the collections, not the objects, so a change costs what it
changes, not what the configuration holds).  Assigning to a sealed object raises
``SealedError``; an edit replaces the object with a copy instead (``Draft.own``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

DEFAULT_BASENAME = "iqn.2026-11.org.pyscsi-target"


class SealedError(AttributeError):
    """An assignment to a model object that the committed configuration shares."""


class Sealable:
    """Base of the model objects: assignable until ``seal()``."""

    _sealed = False  # a class attribute, not a dataclass field: never stored or compared

    def __setattr__(self, name: str, value: object) -> None:
        if self._sealed:
            raise SealedError(f"{type(self).__name__} {getattr(self, 'id', '')} belongs to the committed "
                              "configuration: edit a copy (Draft.own)")
        object.__setattr__(self, name, value)

    def seal(self) -> None:
        object.__setattr__(self, "_sealed", True)

AUTH_METHODS = ("None", "Auto", "CHAP", "CHAP Mutual")
EXTENT_TYPES = ("File", "Disk", "RBD")
RPM_VALUES = ("Unknown", "SSD", "5400", "7200", "10000", "15000")
BLOCK_SIZES = (512, 1024, 2048, 4096)


@dataclass
class GlobalConfig(Sealable):
    id: int = 1
    basename: str = DEFAULT_BASENAME
    isns_servers: str = ""
    pool_avail_threshold: int | None = None


@dataclass
class PortalGroup(Sealable):
    id: int
    tag: int
    # "IP:PORT" strings, IPv6 as "[addr]:port", exactly as the FreeNAS API shows them.
    listen: list[str] = field(default_factory=list)
    comment: str = ""
    discovery_auth_method: str = "None"
    discovery_auth_group: int | None = None  # an AuthCredential.tag


@dataclass
class InitiatorGroup(Sealable):
    id: int
    tag: int
    initiators: str = "ALL"  # "ALL" or whitespace-separated initiator names
    auth_network: str = "ALL"  # "ALL" or whitespace-separated IPs/CIDRs
    comment: str = ""


@dataclass
class AuthCredential(Sealable):
    id: int
    tag: int  # the auth group number; several credentials may share one tag
    user: str
    secret: str
    peeruser: str = ""
    peersecret: str = ""


@dataclass
class Target(Sealable):
    id: int
    name: str  # short name or a full iqn./eui./naa. name
    alias: str | None = None
    # The Hitachi NAS v9 view: not in the FreeNAS document.
    comment: str = ""
    access_config: str = ""  # "host[(ro|rw)], ..." ; blank = everyone read-write
    virtual_server_id: int = 1
    # Appended to the IQN after a regenerateGUN so initiators see a new name.
    gun_generation: int = 0
    # The Hitachi view's enableAuthentication and secret belong to the target: with
    # auth_required every target group of the target, present or added later, demands CHAP;
    # auth_group is the tag of the auth group holding the target's own credential.
    auth_required: bool = False
    auth_group: int | None = None
    # TARGET WARM/COLD RESET task management from an initiator: refused ("function
    # authorization failed") unless allowed here, as LIO does without its tmr_*_reset node
    # attributes; one unauthenticated PDU must not end every session of the target.
    allow_warm_reset: bool = False
    allow_cold_reset: bool = False


@dataclass
class TargetGroup(Sealable):
    id: int
    target: int
    portal_group: int
    initiator_group: int | None = None
    auth_group: int | None = None  # an AuthCredential.tag
    auth_type: str = "None"  # "None", "Auto", "CHAP", "CHAP Mutual"
    initial_digest: str = "Auto"


@dataclass
class Extent(Sealable):
    id: int
    name: str
    type: str = "File"  # "File", "Disk" or "RBD"
    # file path (File), resolved /dev path (Disk), or the image as pool/[namespace/]image (RBD)
    path: str = ""
    disk: str = ""  # the API's device name for Disk extents ("ada1", "zvol/tank/x")
    filesize: str = "0"  # as given: bytes or "10MB"; "0" = size of the existing file
    blocksize: int = 512
    pblocksize: bool = False  # True disables physical block size reporting
    rpm: str = "SSD"
    serial: str = ""
    naa: str = ""  # "0x" + 16 hex digits
    ro: bool = False
    insecure_tpc: bool = True
    xen: bool = False
    avail_threshold: int | None = None
    comment: str = ""
    # RBD only: how to reach the image's cluster; "" = the daemon's --ceph-* settings (or
    # librados' defaults: /etc/ceph/ceph.conf, client.admin).
    ceph_conf: str = ""
    ceph_client: str = ""
    ceph_keyring: str = ""


@dataclass
class LunMap(Sealable):
    id: int
    target: int
    extent: int
    lunid: int


@dataclass
class ConfigModel:
    """A whole configuration; the engine reconciles itself against one of these."""

    global_config: GlobalConfig = field(default_factory=GlobalConfig)
    portal_groups: dict[int, PortalGroup] = field(default_factory=dict)
    initiator_groups: dict[int, InitiatorGroup] = field(default_factory=dict)
    auth_credentials: dict[int, AuthCredential] = field(default_factory=dict)
    targets: dict[int, Target] = field(default_factory=dict)
    target_groups: dict[int, TargetGroup] = field(default_factory=dict)
    extents: dict[int, Extent] = field(default_factory=dict)
    lun_maps: dict[int, LunMap] = field(default_factory=dict)
    service_enabled: bool = True  # FreeNAS services/iscsitarget srv_enable

    def copy(self) -> ConfigModel:
        """New collections holding the same objects (sealed ones are shared safely: nobody
        can change them), and a private global configuration."""
        return ConfigModel(
            global_config=copy_object(self.global_config),
            portal_groups=dict(self.portal_groups),
            initiator_groups=dict(self.initiator_groups),
            auth_credentials=dict(self.auth_credentials),
            targets=dict(self.targets),
            target_groups=dict(self.target_groups),
            extents=dict(self.extents),
            lun_maps=dict(self.lun_maps),
            service_enabled=self.service_enabled,
        )

    def seal(self) -> None:
        """Seal every object (a model loaded from the store, or handed to the engine)."""
        self.global_config.seal()
        for objs in self.collections():
            for obj in objs.values():
                if not obj._sealed:
                    obj.seal()

    def collections(self) -> tuple[dict[int, Sealable], ...]:
        return (self.portal_groups, self.initiator_groups, self.auth_credentials,  # type: ignore[return-value]
                self.targets, self.target_groups, self.extents, self.lun_maps)

    # --- derived views -------------------------------------------------

    def target_iqn(self, target: Target) -> str:
        name = target.name
        if not name.startswith(("iqn.", "eui.", "naa.")):
            name = f"{self.global_config.basename}:{name}"
        if target.gun_generation:
            name = f"{name}.g{target.gun_generation}"
        return name

    def auth_group(self, tag: int | None) -> list[AuthCredential]:
        if tag is None:
            return []
        return [c for c in self.auth_credentials.values() if c.tag == tag]

    def groups_of_target(self, target_id: int) -> list[TargetGroup]:
        return [g for g in self.target_groups.values() if g.target == target_id]

    def luns_of_target(self, target_id: int) -> dict[int, Extent]:
        return {
            m.lunid: self.extents[m.extent]
            for m in self.lun_maps.values()
            if m.target == target_id and m.extent in self.extents
        }


S = TypeVar("S", bound=Sealable)


def copy_object(obj: S) -> S:
    """An unsealed copy of a model object; its list fields are copied too (nothing shared)."""
    new = dataclasses.replace(obj)  # type: ignore[type-var]
    for f in dataclasses.fields(new):  # type: ignore[arg-type]
        value = getattr(new, f.name)
        if isinstance(value, list):
            setattr(new, f.name, list(value))
    return new
