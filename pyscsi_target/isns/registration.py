"""What the target wants registered with iSNS, derived from the configuration.

A ``Registration`` is one Network Entity (RFC 4171 2.2.1) with the iSCSI target nodes
and the portals, and for every node x portal pair the Portal Group Tag the node is
reached under there, or None (a NULL PGT, 5.6.5.1): a server creates a PG with tag 1
for every pair of an entity that has no PG, so the pairs that do not exist must be
registered as NULL to keep a target off the portals it is not exported on.

``desired_state`` is a pure function of the ``ConfigModel``, the addresses the engine
actually listens on, and the entity identifier.  It follows SendTargets: a target is
registered when at least one listening portal exports it.  Wildcard listeners (0.0.0.0,
::) stay wildcards here; each server connection resolves them to the local address it
uses (``Registration.resolved``), the address that server's clients can reach.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..config.model import ConfigModel, TargetGroup
from ..values import ListenAddress, parse_isns_servers, parse_listen

DEFAULT_PERIOD = 900  # seconds asked for; the server may impose its own (open-isns does)
MAX_ENTITY_ID = 255  # bytes, NUL excluded (RFC 4171 6.2.1: 4-256 bytes with the NUL)


@dataclass(frozen=True, slots=True)
class Portal:
    address: str  # an IP literal in canonical form
    port: int

    def sort_key(self) -> tuple[int, bytes, int]:
        ip = self.ip
        return ip.version, ip.packed, self.port

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.address)

    @property
    def wildcard(self) -> bool:
        return self.ip.is_unspecified

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def _ordered(tags: dict[Portal, int]) -> tuple[tuple[Portal, int], ...]:
    if len(tags) < 2:  # the usual node, on one portal: no address to parse for sorting
        return tuple(tags.items())
    return tuple(sorted(tags.items(), key=lambda item: item[0].sort_key()))


@dataclass(frozen=True, slots=True)
class Node:
    """A target node; ``tags`` maps each portal it is exported on to the PG tag there."""

    name: str
    alias: str = ""
    tags: tuple[tuple[Portal, int], ...] = ()

    def tag_at(self, portal: Portal) -> int | None:
        for p, tag in self.tags:
            if p == portal:
                return tag
        return None


@dataclass(frozen=True, slots=True)
class Registration:
    entity_id: str
    portals: tuple[Portal, ...] = ()
    nodes: tuple[Node, ...] = ()
    period: int = DEFAULT_PERIOD

    @property
    def empty(self) -> bool:
        return not self.nodes

    def node(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def resolved(self, local_address: str) -> Registration:
        """Wildcard portals replaced by ``local_address`` where its family can be served by the
        wildcard (asyncio listens IPv6-only on ::); a wildcard of the other family is dropped.
        An explicit portal that the resolution would duplicate wins over the wildcard."""
        local = ipaddress.ip_address(local_address.split("%", 1)[0])
        if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
            local = local.ipv4_mapped
        explicit = {p for p in self.portals if not p.wildcard}
        mapping: dict[Portal, Portal | None] = {}
        for p in self.portals:
            if not p.wildcard:
                mapping[p] = p
                continue
            concrete = Portal(str(local), p.port)
            mapping[p] = concrete if p.ip.version == local.version and concrete not in explicit else None
        portals = tuple(sorted({q for q in mapping.values() if q is not None}, key=Portal.sort_key))
        nodes = []
        for n in self.nodes:
            tags: dict[Portal, int] = {}
            for p, tag in n.tags:
                q = mapping.get(p)
                if q is not None:
                    tags.setdefault(q, tag)
            if tags:
                nodes.append(replace(n, tags=_ordered(tags)))
        used = {p for n in nodes for p, _ in n.tags}
        return replace(self, portals=tuple(p for p in portals if p in used), nodes=tuple(nodes))


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything the client reconciles: the servers and what to register with each."""

    servers: tuple[ListenAddress, ...]
    registration: Registration
    rejected_servers: tuple[str, ...] = ()  # entries of isns_servers that are not IP[:port]


def default_entity_id(state_dir: Path | str | None = None) -> str:
    """A stable, host-unique Entity Identifier: the host name, plus the state directory when
    given (two daemons on one host are two entities).  Stable across restarts, so a restart
    replaces what a crashed run left registered instead of adding a second entity.  The
    plain host name, not the FQDN: resolving that may wait on DNS."""
    eid = socket.gethostname()
    if state_dir is not None:
        eid = f"{eid}:{Path(state_dir).resolve()}"
    if len(eid.encode()) > MAX_ENTITY_ID:
        digest = hashlib.sha256(eid.encode()).hexdigest()[:16]
        eid = f"{socket.gethostname()[:MAX_ENTITY_ID - 17]}:{digest}"
    return eid


def desired_state(
    model: ConfigModel,
    bound: Mapping[tuple[str, int], tuple[str, int]] | None = None,
    *,
    entity_id: str,
    period: int = DEFAULT_PERIOD,
) -> DesiredState:
    """The registration ``model`` asks for.

    ``bound`` maps each configured listen address, as (host, port) parsed from a portal
    group's ``listen``, to the (host, port) the engine actually bound (port 0 resolved);
    configured addresses missing from it are not listening and are not registered.  None
    takes every configured address as listening.  When the iSCSI service is disabled
    nothing listens, so nothing is registered.
    """
    servers, rejected = parse_isns_servers(model.global_config.isns_servers)
    pg_portals: dict[int, list[Portal]] = {}
    if model.service_enabled:
        for pg in model.portal_groups.values():
            for text in pg.listen:
                try:
                    a = parse_listen(text, allow_zero=True)
                except ValueError:
                    continue
                actual = (a.host, a.port) if bound is None else bound.get((a.host, a.port))
                if actual is None or actual[1] == 0:
                    continue
                pg_portals.setdefault(pg.id, []).append(Portal(str(ipaddress.ip_address(actual[0])), actual[1]))
    groups_by_target: dict[int, list[TargetGroup]] = {}
    for tg in sorted(model.target_groups.values(), key=lambda g: g.id):  # one pass: O(N), not O(N^2)
        groups_by_target.setdefault(tg.target, []).append(tg)
    nodes: list[Node] = []
    for target in sorted(model.targets.values(), key=lambda t: t.id):
        tags: dict[Portal, int] = {}
        for tg in groups_by_target.get(target.id, ()):
            group = model.portal_groups.get(tg.portal_group)
            if group is None:
                continue
            for portal in pg_portals.get(group.id, ()):
                tags.setdefault(portal, group.tag)
        if tags:
            nodes.append(Node(model.target_iqn(target), target.alias or "", _ordered(tags)))
    used = sorted({p for n in nodes for p, _ in n.tags}, key=Portal.sort_key)
    registration = Registration(entity_id, tuple(used), tuple(nodes), period)
    return DesiredState(servers, registration, rejected)
