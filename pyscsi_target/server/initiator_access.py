"""Who may log in to what, through which portal, with which authentication.

One ``PortalPolicy`` per accepted connection answers the login machine's questions
(iscsi/params.py ``LoginPolicy``) from the current model: a target is served on this
portal when one of its target groups names this portal group; an initiator is admitted
when one of those groups' initiator groups lists its name and address and the target's
access config admits its address (read-only or read-write); the auth method and CHAP
credentials are the first such target group's (the discovery ones are the portal
group's).  The config model's credentials are mapped onto the core's own type here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import model as M
from ..iscsi.params import ChapCredential, LoginReject, LoginResult, TargetInfo
from ..iscsi.session import Session
from ..values import LoginStatus, parse_access_config, parse_initiator_names, parse_networks
from .portal_groups import Listener
from .sessions import TargetPort

if TYPE_CHECKING:
    from .engine import Engine


def chap_credentials(model: M.ConfigModel, auth_group: int | None) -> list[ChapCredential]:
    return [ChapCredential(c.user, c.secret, c.peeruser, c.peersecret) for c in model.auth_group(auth_group)]


def target_groups_on(engine: Engine, target_id: int, pg_id: int) -> list[M.TargetGroup]:
    """The target groups exporting ``target_id`` through portal group ``pg_id``."""
    return [g for g in engine.groups_of(target_id) if g.portal_group == pg_id]


def group_allows(model: M.ConfigModel, tg: M.TargetGroup, initiator_name: str, peer_ip: str) -> bool:
    """The target group's initiator group admits this initiator name from this address."""
    if tg.initiator_group is None:
        return True
    ig = model.initiator_groups.get(tg.initiator_group)
    if ig is None:
        return False  # a dangling reference admits nobody
    return parse_initiator_names(ig.initiators).allows(initiator_name) and parse_networks(
        ig.auth_network
    ).allows(peer_ip)


class PortalPolicy:
    """LoginPolicy for one accepted connection (RFC 7143 login decisions from the model)."""

    def __init__(self, engine: Engine, listener: Listener, peer_ip: str, local_ip: str, local_port: int) -> None:
        self.engine = engine
        self.listener = listener
        self.peer_ip = peer_ip
        self.local_ip = local_ip
        self.local_port = local_port
        pg = engine.model.portal_groups.get(listener.pg_id)
        self.portal_group_tag = pg.tag if pg else 1
        self.read_only = False
        self.session: Session | None = None

    def lookup_target(self, name: str) -> TargetInfo | None:
        m = self.engine.model
        if not m.service_enabled:
            return None
        rt = self.engine.target_by_iqn(name)
        if rt is None:
            if self.engine.was_removed(name):
                raise LoginReject(LoginStatus.TARGET_REMOVED, f"target {name!r} was removed")
            return None
        t = m.targets.get(rt.target_id)
        groups = target_groups_on(self.engine, rt.target_id, self.listener.pg_id)
        if t is None or not groups:
            return None
        tg = groups[0]
        return TargetInfo(
            target_id=t.id,
            iqn=rt.iqn,
            alias=t.alias,
            auth_method=tg.auth_type or "None",
            credentials=chap_credentials(m, tg.auth_group),
            strict=self.engine.workbench.is_strict(rt.iqn),
        )

    def initiator_allowed(self, target: TargetInfo, initiator_name: str) -> bool:
        m = self.engine.model
        t = m.targets.get(target.target_id)
        if t is None:
            return False
        groups = target_groups_on(self.engine, t.id, self.listener.pg_id)
        if not any(group_allows(m, g, initiator_name, self.peer_ip) for g in groups):
            return False
        access = parse_access_config(t.access_config).decide(self.peer_ip)
        if access is None:
            return False
        self.read_only = access == "ro"
        return True

    def discovery_auth(self) -> tuple[str, list[ChapCredential]]:
        m = self.engine.model
        pg = m.portal_groups.get(self.listener.pg_id)
        if pg is None:
            return "None", []
        return pg.discovery_auth_method or "None", chap_credentials(m, pg.discovery_auth_group)

    def complete_login(self, result: LoginResult) -> int:
        engine = self.engine
        if engine.shutting_down:
            raise LoginReject(LoginStatus.SERVICE_UNAVAILABLE, "target shutting down")
        port = None
        if result.session_type == "Normal" and result.target is not None and not result.tsih:
            rt = engine.target_by_iqn(result.target.iqn)
            if rt is None:  # removed while this login was under way
                raise LoginReject(LoginStatus.TARGET_REMOVED, f"target {result.target.iqn!r} was removed")
            port = TargetPort(rt.iqn, rt.device, self.portal_group_tag, self.read_only, rt.resets, rt.io_stats)
        self.session = engine.session_registry.bind(result, port)
        return self.session.tsih

    def send_targets(self, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
        return self.engine.send_targets(self, initiator_name, which)
