"""SendTargets (RFC 7143 appendix C): which targets an initiator sees, and at which addresses.

A target is listed when its access config admits the initiator's address and one of its
target groups admits the initiator; each such group contributes every listen address of
its portal group as "addr:port,tag".  A wildcard listener (0.0.0.0, ::) is reported as the
address the asking connection came in on, and a port 0 of the model as the port bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.model import PortalGroup
from ..values import format_listen, parse_access_config, parse_listen
from .initiator_access import group_allows

if TYPE_CHECKING:
    from .engine import Engine
    from .initiator_access import PortalPolicy


def send_targets(engine: Engine, policy: PortalPolicy, initiator_name: str, which: str) -> list[tuple[str, list[str]]]:
    """(iqn, ["addr:port,tag", ...]) per visible target; ``which`` is "All", a target name,
    or "" (the session's own target)."""
    m = engine.model
    if not m.service_enabled:
        return []
    if which == "All":
        candidates = engine.targets_by_id()
    else:
        name = which or (policy.session.target.iqn if policy.session and policy.session.target else "")
        rt = engine.target_by_iqn(name) if name else None
        candidates = [rt] if rt is not None else []
    out = []
    entries: dict[int, list[str]] = {}  # portal group -> its "addr:port,tag" entries, built once per request
    for rt in candidates:
        t = m.targets.get(rt.target_id)
        if t is None or parse_access_config(t.access_config).decide(policy.peer_ip) is None:
            continue
        addrs: list[str] = []
        for tg in engine.groups_of(t.id):
            if not group_allows(m, tg, initiator_name, policy.peer_ip):
                continue
            pg = m.portal_groups.get(tg.portal_group)
            if pg is None:
                continue
            pg_entries = entries.get(pg.id)
            if pg_entries is None:
                pg_entries = entries[pg.id] = _entries(engine, pg, policy.local_ip)
            for entry in pg_entries:
                if entry not in addrs:
                    addrs.append(entry)
        if addrs:
            out.append((rt.iqn, addrs))
    return out


def _entries(engine: Engine, pg: PortalGroup, local_ip: str) -> list[str]:
    out = []
    for addr in pg.listen:
        a = parse_listen(addr, allow_zero=True)
        host, port = a.host, engine.portals.bound_port(a.host, a.port)
        if host in ("0.0.0.0", "::", ""):
            # A wildcard listener: report the address this connection came in on.
            host = local_ip
        out.append(f"{format_listen(host, port)},{pg.tag}")
    return out
