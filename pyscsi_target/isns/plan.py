"""From a registration the server holds to the one we want: the iSNSP requests, in order.

Pure functions.  A full registration is a DevAttrReg keyed by the Entity Identifier with
the Replace flag (RFC 4171 5.6.5.1: the server drops whatever the entity held before, e.g.
targets deleted while we were down).  A change is incremental, so that initiators
registered for SCNs see only what changed: DevAttrReg (no Replace) for new portals, new
or renamed-alias nodes and every PG whose tag is new or changed, then DevDereg for the
nodes and portals that went (a server drops their PGs with them).

Every message fits one PDU of ``SEND_PDU_LIMIT`` bytes: work that does not fit is spread
over several messages, each keyed by the entity.  The source of each message is one of
our nodes that the server holds (or creates with that very message).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .messages import Request
from .registration import Node, Portal, Registration
from .wire import HEADER_SIZE, SEND_PDU_LIMIT, Attribute, EntityProtocol, Function, NodeType, Tag, ip_value

Item = tuple[Attribute, ...]  # the attributes of one object, never split across messages


def portal_item(p: Portal) -> Item:
    return (Attribute(Tag.PORTAL_IP_ADDRESS, ip_value(p.address)), Attribute(Tag.PORTAL_PORT, p.port))


def node_item(n: Node, *, with_empty_alias: bool = False) -> Item:
    attrs = [Attribute(Tag.ISCSI_NAME, n.name), Attribute(Tag.ISCSI_NODE_TYPE, int(NodeType.TARGET))]
    if n.alias or with_empty_alias:
        attrs.append(Attribute(Tag.ISCSI_ALIAS, n.alias))
    return tuple(attrs)


def pg_item(n: Node, p: Portal) -> Item:
    return (
        Attribute(Tag.PG_ISCSI_NAME, n.name),
        Attribute(Tag.PG_PORTAL_IP_ADDRESS, ip_value(p.address)),
        Attribute(Tag.PG_PORTAL_PORT, p.port),
        Attribute(Tag.PG_TAG, n.tag_at(p)),  # None: a NULL PGT, no access through this portal
    )


def _eid(reg: Registration) -> Attribute:
    return Attribute(Tag.ENTITY_IDENTIFIER, reg.entity_id)


def _entity_item(reg: Registration) -> Item:
    return (_eid(reg), Attribute(Tag.ENTITY_PROTOCOL, int(EntityProtocol.ISCSI)),
            Attribute(Tag.REGISTRATION_PERIOD, reg.period))


def _pack(function: Function, source: str, key: Item, head: Item, rest_head: Item, items: Iterable[Item],
          replace: bool = False, limit: int = SEND_PDU_LIMIT) -> list[Request]:
    """Requests carrying ``items`` in order, as few as fit ``limit`` bytes each.  The first
    request's operating attributes start with ``head``, the following ones with ``rest_head``;
    only the first carries ``replace``."""
    fixed = HEADER_SIZE + Attribute(Tag.ISCSI_NAME, source).size + sum(a.size for a in key) + 8
    out: list[Request] = []
    current: list[Attribute] = list(head)
    size = fixed + sum(a.size for a in head)
    has_items = False
    for item in items:
        item_size = sum(a.size for a in item)
        if has_items and size + item_size > limit:
            out.append(Request(function, source, key, tuple(current), replace and not out))
            current = list(rest_head)
            size = fixed + sum(a.size for a in rest_head)
        current.extend(item)
        size += item_size
        has_items = True
    if has_items or current:
        out.append(Request(function, source, key, tuple(current), replace and not out))
    return out


def register_all(reg: Registration) -> list[Request]:
    """The whole entity, replacing whatever the server holds under its identifier."""
    if reg.empty:
        return []
    items: list[Item] = [portal_item(p) for p in reg.portals]
    for n in reg.nodes:
        items.append(node_item(n))
        items.extend(pg_item(n, p) for p in reg.portals)
    return _pack(Function.DEV_ATTR_REG, reg.nodes[0].name, (_eid(reg),), _entity_item(reg), (_eid(reg),), items,
                 replace=True)


def deregister_all(reg: Registration) -> list[Request]:
    if reg.empty:
        return []
    return [Request(Function.DEV_DEREG, reg.nodes[0].name, (), (_eid(reg),))]


def refresh(reg: Registration) -> Request:
    """A query for our own entity's registration period: it refreshes the registration
    (RFC 4171 6.2.6 names exactly this), tells us the period the server applies, and an
    answer without our entity says the server lost it."""
    return Request(Function.DEV_ATTR_QRY, reg.nodes[0].name, (_eid(reg),),
                   (Attribute(Tag.ENTITY_IDENTIFIER), Attribute(Tag.REGISTRATION_PERIOD)))


def update(old: Registration, new: Registration) -> list[Request]:
    """Requests taking a server from ``old`` (what it holds) to ``new``."""
    if new.empty:
        return deregister_all(old)
    kept = [n.name for n in new.nodes if old.node(n.name) is not None]
    if old.empty or old.entity_id != new.entity_id or not kept:
        first = deregister_all(old) if old.entity_id != new.entity_id else []
        return first + register_all(new)
    source = kept[0]
    old_portals = set(old.portals)
    items: list[Item] = [portal_item(p) for p in new.portals if p not in old_portals]
    for n in new.nodes:
        before = old.node(n.name)
        if before is None:
            items.append(node_item(n))
        elif before.alias != n.alias:
            items.append(node_item(n, with_empty_alias=True))
        for p in new.portals:
            if before is None or p not in old_portals or before.tag_at(p) != n.tag_at(p):
                items.append(pg_item(n, p))
    head: Item = (_eid(new),)
    if old.period != new.period:
        head += (Attribute(Tag.REGISTRATION_PERIOD, new.period),)
    requests: list[Request] = []
    if len(head) > 1 or items:
        requests += _pack(Function.DEV_ATTR_REG, source, (_eid(new),), head, (_eid(new),), items)
    gone: list[Item] = [(Attribute(Tag.ISCSI_NAME, n.name),) for n in old.nodes if new.node(n.name) is None]
    gone += [portal_item(p) for p in old.portals if p not in set(new.portals)]
    if gone:
        requests += _pack(Function.DEV_DEREG, source, (), (), (), gone)
    return requests


def describe(requests: Sequence[Request]) -> str:
    """A short log form: "DEV_ATTR_REG(replace) x2, DEV_DEREG"."""
    parts: list[str] = []
    for r in requests:
        name = r.function.name + ("(replace)" if r.replace else "")
        if parts and parts[-1].split(" x")[0] == name:
            count = int(parts[-1].split(" x")[1]) + 1 if " x" in parts[-1] else 2
            parts[-1] = f"{name} x{count}"
        else:
            parts.append(name)
    return ", ".join(parts) or "nothing"
