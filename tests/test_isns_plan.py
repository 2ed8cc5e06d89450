"""From the configuration to the desired iSNS registration, and from one registration to the next.

``desired_state`` follows SendTargets (a target is registered where a listening portal
exports it) and gives every node x portal pair a PG: the portal group's tag, or NULL
where the node is not exported.  ``plan.update`` sends only what changed.
"""

from __future__ import annotations

import ipaddress

from pyscsi_target.config import model as M
from pyscsi_target.isns import plan
from pyscsi_target.isns.messages import Request
from pyscsi_target.isns.registration import (
    Node,
    Portal,
    Registration,
    default_entity_id,
    desired_state,
)
from pyscsi_target.isns.wire import SEND_PDU_LIMIT, Function, Tag
from pyscsi_target.values import ListenAddress, parse_isns_servers

BASE = M.DEFAULT_BASENAME


def model() -> M.ConfigModel:
    m = M.ConfigModel()
    m.global_config.isns_servers = "192.0.2.10 [2001:db8::10]:3300, 192.0.2.11:3205 isns.example.com"
    m.portal_groups[1] = M.PortalGroup(1, 1, ["192.0.2.1:3260", "[2001:db8::1]:3260"])
    m.portal_groups[2] = M.PortalGroup(2, 7, ["0.0.0.0:3261"])
    m.targets[1] = M.Target(1, "alpha", alias="Alpha disk")
    m.targets[2] = M.Target(2, "iqn.2026-01.org.example:beta")
    m.targets[3] = M.Target(3, "hidden")  # exported nowhere
    m.target_groups[1] = M.TargetGroup(1, 1, 1)
    m.target_groups[2] = M.TargetGroup(2, 2, 1)
    m.target_groups[3] = M.TargetGroup(3, 2, 2)
    return m


P1, P6, PW = Portal("192.0.2.1", 3260), Portal("2001:db8::1", 3260), Portal("0.0.0.0", 3261)


def test_servers_are_ip_and_optional_port_with_3205_by_default() -> None:
    servers, rejected = parse_isns_servers(model().global_config.isns_servers)
    assert servers == (ListenAddress("192.0.2.10", 3205), ListenAddress("2001:db8::10", 3300),
                       ListenAddress("192.0.2.11", 3205))
    assert rejected == ("isns.example.com",)


def test_desired_state_from_config() -> None:
    d = desired_state(model(), entity_id="host.example")
    assert d.rejected_servers == ("isns.example.com",)
    reg = d.registration
    assert reg.entity_id == "host.example"
    assert reg.portals == (PW, P1, P6)
    assert reg.nodes == (
        Node(f"{BASE}:alpha", "Alpha disk", ((P1, 1), (P6, 1))),
        Node("iqn.2026-01.org.example:beta", "", ((PW, 7), (P1, 1), (P6, 1))),
    )


def test_only_bound_listeners_are_registered_with_their_actual_ports() -> None:
    m = model()
    bound = {("192.0.2.1", 3260): ("192.0.2.1", 3260), ("0.0.0.0", 3261): ("0.0.0.0", 3261)}
    reg = desired_state(m, bound, entity_id="e").registration
    assert reg.portals == (PW, P1)  # [2001:db8::1]:3260 failed to bind
    m.portal_groups[3] = M.PortalGroup(3, 9, ["127.0.0.1:0"])
    m.target_groups[4] = M.TargetGroup(4, 1, 3)
    reg = desired_state(m, {**bound, ("127.0.0.1", 0): ("127.0.0.1", 40123)}, entity_id="e").registration
    assert reg.node(f"{BASE}:alpha") == Node(f"{BASE}:alpha", "Alpha disk", ((Portal("127.0.0.1", 40123), 9), (P1, 1)))


def test_nothing_is_registered_when_the_service_is_off() -> None:
    m = model()
    m.service_enabled = False
    assert desired_state(m, entity_id="e").registration.empty


def test_gun_generation_changes_the_registered_name() -> None:
    m = model()
    m.targets[1].gun_generation = 2
    names = [n.name for n in desired_state(m, entity_id="e").registration.nodes]
    assert f"{BASE}:alpha.g2" in names


def test_wildcards_resolve_to_the_local_address_of_their_family() -> None:
    reg = desired_state(model(), entity_id="e").registration
    v4 = reg.resolved("198.51.100.5")
    assert v4.portals == (P1, Portal("198.51.100.5", 3261), P6)
    v6 = reg.resolved("2001:db8::99")
    assert PW not in v6.portals and all(not p.wildcard for p in v6.portals)
    beta = v6.node("iqn.2026-01.org.example:beta")
    assert beta is not None and beta.tags == ((P1, 1), (P6, 1))  # its 0.0.0.0 portal cannot be reached over IPv6
    assert reg.resolved("::ffff:198.51.100.5") == v4  # a v4-mapped local address is IPv4


def test_an_explicit_portal_wins_over_a_wildcard_resolving_to_it() -> None:
    a, w = Portal("10.0.0.1", 3260), Portal("0.0.0.0", 3260)
    reg = Registration("e", (w, a), (Node("iqn.x:a", "", ((a, 5),)), Node("iqn.x:b", "", ((w, 6),))))
    r = reg.resolved("10.0.0.1")
    assert r.portals == (a,)
    assert r.nodes == (Node("iqn.x:a", "", ((a, 5),)),)


def test_default_entity_id_is_stable_and_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert default_entity_id(tmp_path) == default_entity_id(tmp_path)
    assert default_entity_id(tmp_path) != default_entity_id(tmp_path / "other")
    assert len(default_entity_id(tmp_path / ("x" * 300)).encode()) <= 255


# --- plans ----------------------------------------------------------------------------------

A, B = Portal("192.0.2.1", 3260), Portal("192.0.2.2", 3260)
N1 = Node("iqn.2026-01.org.example:one", "One", ((A, 1),))
N2 = Node("iqn.2026-01.org.example:two", "", ((A, 1), (B, 2)))
REG = Registration("ent", (A, B), (N1, N2), period=300)


def attrs(r: Request) -> list[tuple[int, object]]:
    return [(a.tag, a.value) for a in r.operating]


def ip(text: str) -> object:
    return ipaddress.ip_address(text)


def test_full_registration_is_one_replace_with_every_object_and_null_pgs() -> None:
    (r,) = plan.register_all(REG)
    assert r.function == Function.DEV_ATTR_REG and r.replace and r.source == N1.name
    assert [(a.tag, a.value) for a in r.key] == [(Tag.ENTITY_IDENTIFIER, "ent")]
    assert attrs(r) == [
        (Tag.ENTITY_IDENTIFIER, "ent"), (Tag.ENTITY_PROTOCOL, 2), (Tag.REGISTRATION_PERIOD, 300),
        (Tag.PORTAL_IP_ADDRESS, ip("192.0.2.1")), (Tag.PORTAL_PORT, 3260),
        (Tag.PORTAL_IP_ADDRESS, ip("192.0.2.2")), (Tag.PORTAL_PORT, 3260),
        (Tag.ISCSI_NAME, N1.name), (Tag.ISCSI_NODE_TYPE, 1), (Tag.ISCSI_ALIAS, "One"),
        (Tag.PG_ISCSI_NAME, N1.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.1")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 1),
        (Tag.PG_ISCSI_NAME, N1.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.2")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, None),  # not exported there: NULL, or the server would give it tag 1
        (Tag.ISCSI_NAME, N2.name), (Tag.ISCSI_NODE_TYPE, 1),
        (Tag.PG_ISCSI_NAME, N2.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.1")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 1),
        (Tag.PG_ISCSI_NAME, N2.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.2")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 2),
    ]


def test_no_change_no_request() -> None:
    assert plan.update(REG, REG) == []


def test_a_new_target_registers_the_node_and_its_pgs_only() -> None:
    n3 = Node("iqn.2026-01.org.example:three", "Three", ((B, 2),))
    (r,) = plan.update(REG, Registration("ent", (A, B), (N1, N2, n3), period=300))
    assert r.function == Function.DEV_ATTR_REG and not r.replace and r.source == N1.name
    assert attrs(r) == [
        (Tag.ENTITY_IDENTIFIER, "ent"),
        (Tag.ISCSI_NAME, n3.name), (Tag.ISCSI_NODE_TYPE, 1), (Tag.ISCSI_ALIAS, "Three"),
        (Tag.PG_ISCSI_NAME, n3.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.1")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, None),
        (Tag.PG_ISCSI_NAME, n3.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.2")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 2),
    ]


def test_a_removed_target_is_deregistered_by_name_from_a_kept_source() -> None:
    (r,) = plan.update(REG, Registration("ent", (A, B), (N2,), period=300))
    assert r.function == Function.DEV_DEREG and r.source == N2.name and r.key == ()
    assert attrs(r) == [(Tag.ISCSI_NAME, N1.name)]


def test_a_portal_no_target_uses_any_more_is_deregistered_with_its_pgs() -> None:
    n2 = Node(N2.name, "", ((A, 1),))
    (r,) = plan.update(REG, Registration("ent", (A,), (N1, n2), period=300))
    assert r.function == Function.DEV_DEREG and r.source == N1.name
    assert attrs(r) == [(Tag.PORTAL_IP_ADDRESS, ip("192.0.2.2")), (Tag.PORTAL_PORT, 3260)]


def test_tag_alias_and_portal_changes() -> None:
    c = Portal("192.0.2.3", 3260)
    n1 = Node(N1.name, "", ((A, 1), (c, 4)))  # alias cleared, now also on C
    n2 = Node(N2.name, "", ((A, 3), (B, 2)))  # tag at A changes 1 -> 3
    reqs = plan.update(REG, Registration("ent", (A, B, c), (n1, n2), period=300))
    assert [r.function for r in reqs] == [Function.DEV_ATTR_REG]
    assert attrs(reqs[0]) == [
        (Tag.ENTITY_IDENTIFIER, "ent"),
        (Tag.PORTAL_IP_ADDRESS, ip("192.0.2.3")), (Tag.PORTAL_PORT, 3260),
        (Tag.ISCSI_NAME, N1.name), (Tag.ISCSI_NODE_TYPE, 1), (Tag.ISCSI_ALIAS, ""),
        (Tag.PG_ISCSI_NAME, N1.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.3")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 4),
        (Tag.PG_ISCSI_NAME, N2.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.1")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, 3),
        (Tag.PG_ISCSI_NAME, N2.name), (Tag.PG_PORTAL_IP_ADDRESS, ip("192.0.2.3")), (Tag.PG_PORTAL_PORT, 3260),
        (Tag.PG_TAG, None),
    ]


def test_everything_replaced_or_gone() -> None:
    other = Node("iqn.2026-01.org.example:other", "", ((A, 1),))
    (r,) = plan.update(REG, Registration("ent", (A,), (other,), period=300))
    assert r.replace and r.source == other.name  # nothing kept: one replace says it all
    (r,) = plan.update(REG, Registration("ent", period=300))
    assert r.function == Function.DEV_DEREG and attrs(r) == [(Tag.ENTITY_IDENTIFIER, "ent")]
    moved = plan.update(REG, Registration("ent2", (A, B), (N1, N2), period=300))
    assert [(r.function, r.replace) for r in moved] == [(Function.DEV_DEREG, False), (Function.DEV_ATTR_REG, True)]
    assert attrs(moved[0]) == [(Tag.ENTITY_IDENTIFIER, "ent")]


def test_period_change_updates_the_entity() -> None:
    (r,) = plan.update(REG, Registration("ent", (A, B), (N1, N2), period=60))
    assert attrs(r) == [(Tag.ENTITY_IDENTIFIER, "ent"), (Tag.REGISTRATION_PERIOD, 60)]


def test_large_registrations_are_split_into_messages_that_fit_one_pdu() -> None:
    portals = tuple(Portal(f"192.0.2.{i}", 3260) for i in range(1, 5))
    nodes = tuple(Node(f"iqn.2026-01.org.example.storage:{'x' * 150}{i:04d}", f"disk {i}",
                       ((portals[i % 4], i % 4 + 1),)) for i in range(120))
    reg = Registration("ent", portals, nodes)
    reqs = plan.register_all(reg)
    assert len(reqs) > 3
    assert all(len(r.encode(1)) <= SEND_PDU_LIMIT for r in reqs)
    assert [r.replace for r in reqs] == [True] + [False] * (len(reqs) - 1)
    assert all(r.source == nodes[0].name for r in reqs)
    assert any(a.value == nodes[0].name for a in reqs[0].operating)  # the source exists after message 1
    seen = [a for r in reqs for a in r.operating if a.tag != Tag.ENTITY_IDENTIFIER]
    one = plan.register_all(Registration("ent", portals, nodes[:1]))[0]
    assert len([a for a in seen if a.tag == Tag.PG_ISCSI_NAME]) == 120 * 4
    assert [a.tag for a in one.operating][:3] == [Tag.ENTITY_IDENTIFIER, Tag.ENTITY_PROTOCOL, Tag.REGISTRATION_PERIOD]
    for r in reqs[1:]:
        assert r.operating[0].tag == Tag.ENTITY_IDENTIFIER and r.operating[1].tag != Tag.ENTITY_PROTOCOL
        assert r.operating[1].tag in (Tag.ISCSI_NAME, Tag.PG_ISCSI_NAME)  # objects are never cut
    gone = plan.update(reg, Registration("ent", portals, nodes[:1]))
    assert all(r.function == Function.DEV_DEREG and len(r.encode(1)) <= SEND_PDU_LIMIT for r in gone)
    assert sum(len(r.operating) for r in gone) == 119


def test_describe() -> None:
    r = Request(Function.DEV_ATTR_REG, "iqn.x", replace=True)
    assert plan.describe([r, Request(Function.DEV_ATTR_REG, "iqn.x"), Request(Function.DEV_ATTR_REG, "iqn.x"),
                          Request(Function.DEV_DEREG, "iqn.x")]) == "DEV_ATTR_REG(replace), DEV_ATTR_REG x2, DEV_DEREG"
    assert plan.describe([]) == "nothing"
