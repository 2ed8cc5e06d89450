"""``pyscsi-target ls``: the whole target as a tree, from three API calls.

The configuration comes from the native export (``GET /api/pyscsi/v1/config``, secrets
redacted), live sessions from ``GET /api/pyscsi/v1/sessions`` and the extents' current size
and allocation from ``GET /api/pyscsi/v1/extents``.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.tree import Tree

from .client import NATIVE, ApiClient
from .output import console, human_size, print_json

# ``ls -l`` shows these negotiated parameters, in RFC 7143's spelling.
PARAM_NAMES = (
    ("header_digest", "HeaderDigest"),
    ("data_digest", "DataDigest"),
    ("max_recv_dsl", "MaxRecvDataSegmentLength"),
    ("max_xmit_dsl", "MaxXmitDataSegmentLength"),
    ("max_burst_length", "MaxBurstLength"),
    ("first_burst_length", "FirstBurstLength"),
    ("initial_r2t", "InitialR2T"),
    ("immediate_data", "ImmediateData"),
    ("max_outstanding_r2t", "MaxOutstandingR2T"),
    ("error_recovery_level", "ErrorRecoveryLevel"),
    ("default_time2wait", "DefaultTime2Wait"),
    ("default_time2retain", "DefaultTime2Retain"),
    ("max_connections", "MaxConnections"),
    ("data_pdu_in_order", "DataPDUInOrder"),
    ("data_sequence_in_order", "DataSequenceInOrder"),
)


def fetch(client: ApiClient) -> dict[str, Any]:
    return {
        "config": client.request("GET", f"{NATIVE}/config/", query={"redact": "true"}),
        "sessions": client.request("GET", f"{NATIVE}/sessions/"),
        "extents": client.request("GET", f"{NATIVE}/extents/"),
    }


def _param_value(key: str, value: object) -> str:
    if key.endswith("_digest"):
        return "CRC32C" if value else "None"
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def _session_node(parent: Tree, s: dict[str, Any], long: bool) -> None:
    alias = f" ({escape(s['initiator_alias'])})" if s.get("initiator_alias") else ""
    digests = f"digests {'CRC32C' if s['header_digest'] else 'None'}/{'CRC32C' if s['data_digest'] else 'None'}"
    node = parent.add(
        f"[green]{escape(s['initiator'])}[/]{alias}  from {escape(str(s.get('peer') or '?'))}  "
        f"TSIH {s['tsih']}  ISID {s['isid']}  {digests}  {s['tasks']} task(s)"
    )
    if long:
        params = s.get("params") or {}
        pairs = [f"{name}={_param_value(key, params[key])}" for key, name in PARAM_NAMES if key in params]
        pairs.append(f"CmdSN window {s['exp_cmdsn']}..{s['max_cmdsn']}")
        node.add("[dim]" + escape("  ".join(pairs)) + "[/]")


def _auth_text(g: dict[str, Any]) -> str:
    if g["auth_type"] in ("None", "Auto") and g["auth_group"] is None:
        return "auth none"
    return f"auth {g['auth_type']} (auth group {g['auth_group']})"


def build(data: dict[str, Any], url: str, long: bool = False) -> Tree:
    cfg = data["config"]
    basename = cfg["global_config"]["basename"]
    state = "[green]running[/]" if cfg["service_enabled"] else "[red]stopped[/]"
    root = Tree(f"[bold]pyscsi-target[/] {escape(url)}  basename {escape(basename)}  service {state}")
    pgs = {p["id"]: p for p in cfg["portal_groups"]}
    igs = {i["id"]: i for i in cfg["initiator_groups"]}
    extents = {e["id"]: e for e in cfg["extents"]}
    usage = {u["id"]: u for u in data["extents"]}
    sessions = data["sessions"]

    branch = root.add(f"[bold]Portal groups[/] ({len(pgs)})")
    for pg in pgs.values():
        disc = pg["discovery_auth_method"]
        disc += f" (auth group {pg['discovery_auth_group']})" if pg["discovery_auth_group"] else ""
        comment = f"  [dim]{escape(pg['comment'])}[/]" if pg["comment"] else ""
        branch.add(f"tag {pg['tag']}  {escape(', '.join(pg['listen']))}  discovery auth {disc}{comment}")

    branch = root.add(f"[bold]Targets[/] ({len(cfg['targets'])})")
    for t in cfg["targets"]:
        iqn = t["name"] if t["name"].startswith(("iqn.", "eui.", "naa.")) else f"{basename}:{t['name']}"
        if t.get("gun_generation"):
            iqn += f".g{t['gun_generation']}"
        alias = f"  alias {escape(t['alias'])}" if t.get("alias") else ""
        node = branch.add(f"[bold cyan]{escape(t['name'])}[/]  {escape(iqn)}{alias}")
        for g in (g for g in cfg["target_groups"] if g["target"] == t["id"]):
            pg = pgs.get(g["portal_group"])
            ig = igs.get(g["initiator_group"]) if g["initiator_group"] else None
            who = (f"initiators {escape(ig['initiators'])} from {escape(ig['auth_network'])}"
                   if ig else "any initiator")
            node.add(f"portal group {pg['tag'] if pg else '?'}  {who}  {_auth_text(g)}")
        if t.get("access_config"):
            node.add(f"access {escape(t['access_config'])}")
        for m in sorted((m for m in cfg["lun_maps"] if m["target"] == t["id"]), key=lambda m: m["lunid"]):
            e = extents.get(m["extent"], {})
            u = usage.get(m["extent"], {})
            ro = "  [yellow]read-only[/]" if e.get("ro") else ""
            err = f"  [red]{escape(u['error'])}[/]" if u.get("error") else ""
            node.add(f"LUN {m['lunid']}  [bold]{escape(e.get('name', '?'))}[/]  {e.get('type', '?')} "
                     f"{human_size(u.get('size'))}, {e.get('blocksize', '?')}-byte blocks  "
                     f"{escape(e.get('path', ''))}{ro}{err}")
        mine = [s for s in sessions if s.get("target") == iqn]
        if mine:
            snode = node.add(f"[bold]Sessions[/] ({len(mine)})")
            for s in mine:
                _session_node(snode, s, long)

    branch = root.add(f"[bold]Extents[/] ({len(extents)})")
    for e in extents.values():
        u = usage.get(e["id"], {})
        where = [f"LUN {m['lunid']} of {next((t['name'] for t in cfg['targets'] if t['id'] == m['target']), '?')}"
                 for m in cfg["lun_maps"] if m["extent"] == e["id"]]
        alloc = f" ({human_size(u['allocated'])} allocated)" if u.get("allocated") is not None else ""
        err = f"  [red]{escape(u['error'])}[/]" if u.get("error") else ""
        branch.add(f"[bold]{escape(e['name'])}[/]  {e['type']} {human_size(u.get('size'))}{alloc}  "
                   f"{escape(e['path'])}  {', '.join(where) or '[dim]not mapped[/]'}{err}")

    branch = root.add(f"[bold]Initiator groups[/] ({len(igs)})")
    for ig in igs.values():
        comment = f"  [dim]{escape(ig['comment'])}[/]" if ig["comment"] else ""
        branch.add(f"tag {ig['tag']}  initiators {escape(ig['initiators'])}  "
                   f"networks {escape(ig['auth_network'])}{comment}")

    tags: dict[int, list[dict[str, Any]]] = {}
    for c in cfg["auth_credentials"]:
        tags.setdefault(c["tag"], []).append(c)
    branch = root.add(f"[bold]Auth groups[/] ({len(tags)})")
    for tag, creds in sorted(tags.items()):
        users = ", ".join(escape(c["user"]) + (f" (mutual: {escape(c['peeruser'])})" if c["peeruser"] else "")
                          for c in creds)
        branch.add(f"tag {tag}  CHAP users {users}")

    discovery = [s for s in sessions if s.get("type") == "Discovery"]
    if discovery:
        dnode = root.add(f"[bold]Discovery sessions[/] ({len(discovery)})")
        for s in discovery:
            _session_node(dnode, s, long)
    return root


def run(client: ApiClient, *, long: bool, as_json: bool) -> int:
    data = fetch(client)
    if as_json:
        print_json(data)
    else:
        console().print(build(data, client.conn.url, long))
    return 0
