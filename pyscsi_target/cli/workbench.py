"""The workbench's commands: ``fault``, ``trace``, ``strict``, ``session`` and ``violations``,
each a thin layer over ``/api/pyscsi/v1/`` (so the API's rules and messages apply)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .client import NATIVE, ApiClient, CliError
from .output import console, human_size, print_json, print_table

# The fault kinds and the options each takes beyond the scope (for `fault add --help`).
KINDS = ("drop", "drop_mid_pdu", "delay", "withhold", "corrupt_header_digest", "corrupt_data_digest",
         "reorder_data_in", "reject", "ignore_nop", "status", "latency", "hold", "async")
FIELDS = {"fault": {"kind": "KIND", "pdu": "--pdu", "target": "--target", "initiator": "--initiator",
                    "session": "--session", "lun": "--lun", "opcode": "--opcode", "lba_first": "--lba",
                    "lba_last": "--lba", "after": "--after", "count": "--count", "probability": "--probability",
                    "expires_in": "--expires", "delay_ms": "--delay", "how": "--how", "status": "--status",
                    "sense_key": "--sense", "asc": "--sense", "ascq": "--sense", "reason": "--reason",
                    "event": "--event", "wait": "--wait", "comment": "--comment"},
          "trace": {"target": "--target", "initiator": "--initiator", "session": "--session", "limit": "--ring",
                    "snaplen": "--snaplen"}}

Adder = Callable[..., Any]


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t).strftime("%H:%M:%S")


# --- fault ---------------------------------------------------------------------------------------


def _lba(text: str) -> tuple[int, int | None]:
    first, sep, last = text.partition("-")
    try:
        return int(first, 0), (int(last, 0) if sep else None)
    except ValueError:
        raise CliError(f"--lba {text!r}: use FIRST or FIRST-LAST (decimal or 0x hex)") from None


def _sense(text: str) -> tuple[int, int, int]:
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise CliError(f"--sense {text!r}: use KEY/ASC[/ASCQ] in hex, e.g. 3/11/0 (MEDIUM ERROR, "
                       "UNRECOVERED READ ERROR)")
    try:
        values = [int(p, 16) for p in parts] + [0] * (3 - len(parts))
    except ValueError:
        raise CliError(f"--sense {text!r}: KEY/ASC/ASCQ are hex numbers") from None
    return values[0], values[1], values[2]


def fault_add(client: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"kind": args.kind}
    for name in ("pdu", "target", "initiator", "session", "lun", "after", "count", "probability", "how", "status",
                 "reason", "event", "wait", "comment"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.opcode is not None:
        body["opcode"] = args.opcode
    if args.lba is not None:
        body["lba_first"], last = _lba(args.lba)
        if last is not None:
            body["lba_last"] = last
    if args.expires is not None:
        body["expires_in"] = args.expires
    if args.delay is not None:
        body["delay_ms"] = args.delay
    if args.sense is not None:
        body["sense_key"], body["asc"], body["ascq"] = _sense(args.sense)
    rule = client.request("POST", f"{NATIVE}/faults/", body)
    if args.json:
        print_json(rule)
    else:
        console().print(f"fault rule {rule['id']} added: {_describe(rule)}")
    return 0


def _describe(r: dict[str, Any]) -> str:
    parts = [r["kind"]]
    for key in ("pdu", "target", "initiator", "session", "lun", "status", "reason", "event", "how"):
        if r.get(key) is not None:
            parts.append(f"{key}={r[key]}")
    if r.get("opcode") is not None:
        parts.append(f"opcode={r['opcode']:#04x}")
    if r.get("lba_first") is not None:
        parts.append(f"lba={r['lba_first']}-{r['lba_last'] if r['lba_last'] is not None else r['lba_first']}")
    if r.get("sense_key") is not None and r.get("status") == "check_condition":
        parts.append(f"sense={r['sense_key']:x}/{r['asc']:02x}/{r['ascq']:02x}")
    if r.get("delay_ms"):
        parts.append(f"delay={r['delay_ms']}ms")
    return " ".join(parts)


def fault_list(client: ApiClient, args: argparse.Namespace) -> int:
    rules = client.request("GET", f"{NATIVE}/faults/")
    if args.json:
        print_json(rules)
        return 0
    rows = [(r["id"], r["state"], _describe(r), f"{r['fired']}/{r['count'] if r['count'] is not None else '-'}",
             r["after"] or "", r["probability"] if r["probability"] < 1 else "",
             f"{r['expires_in']:.0f}s" if r["expires_in"] is not None else "", r["comment"]) for r in rules]
    print_table("Fault rules", ("id", "state", "rule", "fired", "after", "probability", "expires", "comment"), rows)
    return 0


def fault_rm(client: ApiClient, args: argparse.Namespace) -> int:
    if args.all:
        removed = client.request("DELETE", f"{NATIVE}/faults/")["removed"]
        console().print(f"{removed} fault rule(s) removed")
        return 0
    if not args.ids:
        raise CliError("name the rules to remove, or --all")
    for rule_id in args.ids:
        client.request("DELETE", f"{NATIVE}/faults/{rule_id}/")
        console().print(f"fault rule {rule_id} removed")
    return 0


def fault_log(client: ApiClient, args: argparse.Namespace) -> int:
    log = client.request("GET", f"{NATIVE}/fault-log/")
    if args.json:
        print_json(log)
        return 0
    rows = [(_when(f["time"]), f["rule"], f["kind"], f["session"] or "", f["initiator"] or "", f["what"])
            for f in log["firings"]]
    print_table("Fault firings", ("time", "rule", "kind", "session", "initiator", "what"), rows)
    return 0


# --- trace -----------------------------------------------------------------------------------------


def trace_start(client: ApiClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for name, key in (("target", "target"), ("initiator", "initiator"), ("session", "session"), ("ring", "limit"),
                      ("snaplen", "snaplen")):
        value = getattr(args, name)
        if value is not None:
            body[key] = value
    if args.real_ports:
        body["real_ports"] = True
    cap = client.request("POST", f"{NATIVE}/captures/", body)
    if args.json:
        print_json(cap)
    else:
        console().print(f"capture {cap['id']} running ({_scope(cap)}, ring {human_size(cap['limit'])}); "
                        f"`pyscsi-target trace get {cap['id']}` downloads it")
    return 0


def _scope(c: dict[str, Any]) -> str:
    parts = [f"{k} {c[k]}" for k in ("target", "initiator", "session") if c.get(k) is not None]
    return ", ".join(parts) or "every connection"


def trace_list(client: ApiClient, args: argparse.Namespace) -> int:
    caps = client.request("GET", f"{NATIVE}/captures/")
    if args.json:
        print_json(caps)
        return 0
    rows = [(c["id"], c["state"], _scope(c), c["connections"], c["pieces"], human_size(c["bytes"]),
             f"{human_size(c['size'])} / {human_size(c['limit'])}", c["evicted"] or "") for c in caps]
    print_table("Captures", ("id", "state", "scope", "connections", "PDUs", "traffic", "ring", "evicted"), rows)
    return 0


def trace_stop(client: ApiClient, args: argparse.Namespace) -> int:
    cap = client.request("POST", f"{NATIVE}/captures/{args.id}/stop/")
    if args.json:
        print_json(cap)
    else:
        console().print(f"capture {cap['id']} stopped: {cap['pieces']} PDUs, {human_size(cap['bytes'])}")
    return 0


def trace_get(client: ApiClient, args: argparse.Namespace) -> int:
    data = client.request("GET", f"{NATIVE}/captures/{args.id}/pcapng/", raw=True)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        return 0
    path = args.output or f"capture-{args.id}.pcapng"
    with open(path, "wb") as f:
        f.write(data)
    console(stderr=True).print(f"{path}: {human_size(len(data))} (open with `tshark -r {path}` or Wireshark)")
    return 0


def trace_rm(client: ApiClient, args: argparse.Namespace) -> int:
    client.request("DELETE", f"{NATIVE}/captures/{args.id}/")
    console().print(f"capture {args.id} removed")
    return 0


# --- strict, sessions, violations -----------------------------------------------------------------------


def strict_set(client: ApiClient, args: argparse.Namespace) -> int:
    on = args.action == "on"
    out = client.request("PUT" if on else "DELETE", f"{NATIVE}/strict/{args.target}/")
    console().print(f"{out['target']}: strict mode {'on' if on else 'off'}")
    return 0


def strict_list(client: ApiClient, args: argparse.Namespace) -> int:
    out = client.request("GET", f"{NATIVE}/strict/")
    if args.json:
        print_json(out)
        return 0
    print_table("Targets in strict mode", ("target",), [(t,) for t in out["targets"]])
    return 0


def session_show(client: ApiClient, args: argparse.Namespace) -> int:
    s = client.request("GET", f"{NATIVE}/sessions/{args.tsih}/")
    if args.json:
        print_json(s)
        return 0
    out = console()
    w = s["cmdsn_window"]
    out.print(f"session {s['tsih']} ({s['type']}): {s['initiator']} -> {s['target'] or 'discovery'}, ISID {s['isid']}"
              f"{', strict' if s['strict'] else ''}")
    for c in s["connections"]:
        out.print(f"  connection {c['cid']}: {c['peer']} -> {c['local']}, {c['state']}, StatSN {c['statsn']} "
                  f"(acknowledged {c['exp_statsn']}), digests {'CRC32C' if c['header_digest'] else 'None'}/"
                  f"{'CRC32C' if c['data_digest'] else 'None'}"
                  f"{', fault rules ' + ','.join(map(str, c['fault_rules'])) if c['fault_rules'] else ''}"
                  f"{', captures ' + ','.join(map(str, c['captures'])) if c['captures'] else ''}")
    out.print(f"  CmdSN window [{w['exp_cmdsn']}, {w['max_cmdsn']}], {w['active']} of {w['queue_depth']} slots in use"
              f"{', waiting for ' + str(w['waiting_cmdsn']) if w['waiting_cmdsn'] else ''}")
    counters = s["counters"]
    out.print("  counters: " + ", ".join(f"{k} {v}" for k, v in counters.items() if v not in ({}, 0)))
    print_table("Outstanding tasks", ("ITT", "CmdSN", "LUN", "CDB", "state", "age ms"),
                [(f"{t['itt']:#x}", t["cmdsn"], t["lun"], t["cdb"][:20], t["state"], t["age_ms"])
                 for t in s["outstanding_tasks"]])
    _violation_table(s["violations"])
    return 0


def _violation_table(rows: list[dict[str, Any]]) -> None:
    print_table("Violations", ("time", "session", "action", "section", "rule", "PDU"),
                [(_when(v["time"]), v.get("session") or "", v["action"], v["section"], v["rule"], v["pdu"][:100])
                 for v in rows])


def session_logout(client: ApiClient, args: argparse.Namespace) -> int:
    client.request("POST", f"{NATIVE}/sessions/{args.tsih}/logout/", {"within": args.within})
    console().print(f"session {args.tsih} asked to log out within {args.within}s")
    return 0


def session_drop(client: ApiClient, args: argparse.Namespace) -> int:
    client.request("DELETE", f"{NATIVE}/sessions/{args.tsih}/", query={"announce": "true"} if args.announce else None)
    console().print(f"session {args.tsih}: connection dropped")
    return 0


def violations(client: ApiClient, args: argparse.Namespace) -> int:
    rows = client.request("GET", f"{NATIVE}/violations/")
    if args.json:
        print_json(rows)
    else:
        _violation_table(rows)
    return 0


def logical_units(client: ApiClient, args: argparse.Namespace) -> int:
    lus = client.request("GET", f"{NATIVE}/logical-units/")
    if args.json:
        print_json(lus)
        return 0
    rows = []
    for lu in lus:
        pr = lu["persistent_reservations"]
        res = pr["reservation"]
        uas = sum(len(u["pending"]) for u in lu["unit_attentions"])
        rows.append((lu["name"], ", ".join(f"{m['target']} LUN {m['lun']}" for m in lu["mapped"]), lu["tasks"],
                     len(pr["registrations"]), f"{res['type_name']} ({res['initiator_port']})" if res else "",
                     lu["reserve"]["initiator_port"] if lu["reserve"] else "", uas))
    print_table("Logical units", ("extent", "mapped", "tasks", "PR keys", "PR reservation", "RESERVE", "UAs pending"),
                rows)
    return 0


# --- the parsers -------------------------------------------------------------------------------------------


def add_parsers(sub: Any, command: Adder, group: Adder) -> None:
    """Add the commands; ``command``/``group`` are the CLI's own helpers (connection options, --json)."""
    f = group("fault", "fault injection: make the target misbehave on purpose")
    c = command(f, "add", fault_add, "add a fault rule", "fault")
    c.add_argument("kind", metavar="KIND", choices=KINDS, help=", ".join(KINDS))
    scope = c.add_argument_group("scope (all given must match)")
    scope.add_argument("--pdu", help="the PDU kind a transport fault acts on (scsi-command, data-out, nop-out, tmf, "
                                     "text, logout, data-in, r2t, scsi-response, nop-in, login-response, ...)")
    scope.add_argument("--target", help="target name or IQN")
    scope.add_argument("--initiator", help="initiator name")
    scope.add_argument("--session", type=int, metavar="TSIH")
    scope.add_argument("--lun", type=int)
    scope.add_argument("--opcode", help="SCSI operation code, e.g. 0x28")
    scope.add_argument("--lba", metavar="FIRST[-LAST]", help="commands touching this LBA range")
    trig = c.add_argument_group("trigger")
    trig.add_argument("--after", type=int, metavar="N", help="let the first N matches pass")
    trig.add_argument("--count", type=int, metavar="N", help="fire at most N times (0: unlimited; the default is "
                                                            "1 for drop, reject, hold, async and digest faults)")
    trig.add_argument("--probability", type=float, metavar="P", help="fire with probability P (0-1]")
    trig.add_argument("--expires", type=float, metavar="SECONDS", help="remove the rule after SECONDS")
    what = c.add_argument_group("what it does")
    what.add_argument("--delay", type=int, metavar="MS", help="delay and latency: milliseconds")
    what.add_argument("--how", choices=("reset", "close"), help="drop: TCP reset (default) or orderly close")
    what.add_argument("--status", choices=("check_condition", "busy", "task_set_full", "reservation_conflict"),
                      help="status: the SCSI status (default check_condition)")
    what.add_argument("--sense", metavar="KEY/ASC/ASCQ", help="status check_condition: sense in hex, e.g. 3/11/0")
    what.add_argument("--reason", help="reject: the reason (protocol_error, invalid_pdu_field, ...)")
    what.add_argument("--event", choices=("logout", "drop_connection", "drop_all", "renegotiate"),
                      help="async: the Async Message event")
    what.add_argument("--wait", type=int, metavar="SECONDS", help="async: time given to log out / Time2Wait")
    c.add_argument("--comment")
    command(f, "list", fault_list, "list fault rules, how often each matched and fired")
    c = command(f, "rm", fault_rm, "remove fault rules")
    c.add_argument("ids", metavar="ID", nargs="*", type=int)
    c.add_argument("--all", action="store_true", help="remove every rule")
    command(f, "log", fault_log, "the last firings")

    t = group("trace", "PDU capture: what went over the wire, as pcapng for tshark and Wireshark")
    c = command(t, "start", trace_start, "start a capture (of a target, an initiator, a session, or everything)",
                "trace")
    c.add_argument("--target", help="target name or IQN")
    c.add_argument("--initiator", help="initiator name")
    c.add_argument("--session", type=int, metavar="TSIH")
    c.add_argument("--ring", metavar="SIZE", help="ring buffer size, e.g. 64MB (default 16MB): the oldest PDUs go")
    c.add_argument("--snaplen", type=int, metavar="BYTES", help="keep at most BYTES of each PDU's data segment")
    c.add_argument("--real-ports", action="store_true", help="show the portal's real port (else 3260, where "
                                                              "Wireshark looks for iSCSI)")
    command(t, "list", trace_list, "list captures")
    for name, handler, text in (("stop", trace_stop, "stop a capture (it stays downloadable)"),
                                ("rm", trace_rm, "remove a capture")):
        command(t, name, handler, text).add_argument("id", metavar="ID", type=int)
    c = command(t, "get", trace_get, "download a capture as pcapng")
    c.add_argument("id", metavar="ID", type=int)
    c.add_argument("-o", "--output", metavar="FILE", help="default capture-ID.pcapng; - for standard output")

    s = group("strict", "strict mode: refuse what the default mode tolerates, citing the rule")
    for action, text in (("on", "strict mode on for a target"), ("off", "strict mode off")):
        command(s, action, strict_set, text).add_argument("target", metavar="TARGET")
    command(s, "list", strict_list, "targets in strict mode")

    ss = group("session", "one live session in depth; ask it to log out, or drop it")
    command(ss, "show", session_show, "connection, CmdSN window, outstanding tasks, counters, violations") \
        .add_argument("tsih", metavar="TSIH", type=int)
    c = command(ss, "logout", session_logout, "ask the initiator to log out (Async Message)")
    c.add_argument("tsih", metavar="TSIH", type=int)
    c.add_argument("--within", type=int, default=5, metavar="SECONDS")
    c = command(ss, "drop", session_drop, "drop the session's connection")
    c.add_argument("tsih", metavar="TSIH", type=int)
    c.add_argument("--announce", action="store_true", help="send the Async Message 'dropping' first")

    command(sub, "violations", violations, "refused logins and sessions' protocol violations, with the rule broken")
    command(sub, "lu-state", logical_units, "logical units: tasks, reservations, unit attentions, ALUA")

