"""Live views of the engine for the API: a session with its connection, CmdSN window,
outstanding tasks, counters and violations; a logical unit with its task set,
reservations, pending unit attentions per I_T nexus and ALUA state.

Snapshots only: plain dicts built on the event loop from the objects themselves.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..iscsi.command import CmdState
from ..iscsi.pdu import AsyncEvent, RejectReason, TmfFunction
from ..iscsi.session import Session
from ..iscsi.stats import clock_ns
from ..scsi import sense as S
from ..scsi.lu import LogicalUnit
from ..scsi.reservations import EA, EA_AR, EA_RO, WE, WE_AR, WE_RO

if TYPE_CHECKING:
    from ..server.engine import Engine

RESERVATION_TYPES = {WE: "write exclusive", EA: "exclusive access", WE_RO: "write exclusive, registrants only",
                     EA_RO: "exclusive access, registrants only", WE_AR: "write exclusive, all registrants",
                     EA_AR: "exclusive access, all registrants"}
# Every (ASC, ASCQ) the SCSI layer names, by value.
ASC_NAMES = {v: k.lower().replace("_", " ") for k, v in vars(S).items()
             if k.isupper() and isinstance(v, tuple) and len(v) == 2}


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum(value).name.lower())
    except ValueError:
        return str(value)


def _itkey(key: tuple[str, int]) -> dict[str, Any]:
    return {"initiator_port": key[0], "relative_target_port": key[1]}


def session_detail(engine: Engine, s: Session) -> dict[str, Any]:
    out: dict[str, Any] = dict(s.describe())
    conn = s.connection
    proto = engine.workbench.session_proto(s.tsih)
    now = clock_ns()
    out["strict"] = s.strict
    out["connections"] = [] if conn is None else [{
        "cid": conn.cid,
        "peer": conn.peer,
        "local": f"{proto.local_addr[0]}:{proto.local_addr[1]}" if proto is not None else None,
        "state": conn.state.value,
        "statsn": conn.statsn,
        "exp_statsn": conn.exp_statsn,
        "max_xmit_data_segment_length": conn.max_xmit,
        "ping_outstanding": conn.ping_ttt is not None,
        "header_digest": conn.output.header_digest,
        "data_digest": conn.output.data_digest,
        "fault_rules": sorted(r.id for r in (proto.hook.rules_in + proto.hook.rules_out + proto.hook.rules_scsi))
        if proto is not None and proto.hook is not None else [],
        "captures": sorted(proto.hook.streams) if proto is not None and proto.hook is not None else [],
    }]
    out["cmdsn_window"] = {"exp_cmdsn": s.exp_cmdsn, "max_cmdsn": s.max_cmdsn, "active": s.active,
                           "queue_depth": s.queue_depth, "waiting_cmdsn": sorted(s.held)}
    out["outstanding_tasks"] = [{
        "itt": cmd.itt,
        "cmdsn": cmd.cmdsn,
        "lun": cmd.lun,
        "cdb": bytes(cmd.cdb).hex(),
        "opcode": cmd.cdb[0] if cmd.cdb else None,
        "state": CmdState(cmd.state).name.lower(),
        "immediate": cmd.immediate,
        "read": cmd.read,
        "write": cmd.write,
        "expected_length": cmd.edtl,
        "received": cmd.received,
        "r2ts": cmd.r2tsn,
        "data_ins": cmd.datasn,
        "age_ms": round((now - cmd.t0) / 1e6, 3),
    } for cmd in sorted(s.tasks.values(), key=lambda c: c.cmdsn)]
    c = s.counters
    out["counters"] = {
        "commands": s.created_ops,
        "rejects": {_name(RejectReason, k): n for k, n in c.rejects.items()},
        "digest_errors": dict(c.digest_errors),
        "task_management": {_name(TmfFunction, k): n for k, n in c.tmfs.items()},
        "nop_outs": c.nop_outs,
        "text_requests": c.texts,
        "async_messages": {_name(AsyncEvent, k): n for k, n in c.async_messages.items()},
        "violations": c.violations,
    }
    out["violations"] = [v.info() for v in s.violations]
    return out


def logical_units(engine: Engine) -> list[dict[str, Any]]:
    maps: dict[int, list[dict[str, Any]]] = {}
    alua: dict[int, list[dict[str, Any]]] = {}
    for rt in engine.targets_by_id():
        tags = rt.device.portal_group_tags()
        for lun, lu in sorted(rt.luns.items()):
            maps.setdefault(id(lu), []).append({"target": rt.iqn, "lun": lun})
            # One target port group per portal group, all active/optimized (REPORT TARGET PORT GROUPS).
            alua.setdefault(id(lu), []).append({"target": rt.iqn, "groups": [
                {"group": t, "state": "active/optimized"} for t in tags]})
    return [lu_state(lu, maps.get(id(lu), []), alua.get(id(lu), [])) for lu in engine.logical_units.all()]


def lu_state(lu: LogicalUnit, maps: list[dict[str, Any]], alua: list[dict[str, Any]]) -> dict[str, Any]:
    pr = lu.pr
    res = pr.reservation
    return {
        "name": lu.name,
        "naa": lu.naa.hex(),
        "serial": lu.serial,
        "block_size": lu.block_size,
        "blocks": lu.num_blocks,
        "read_only": lu.read_only,
        "mapped": maps,
        "tasks": len(lu.tasks),
        "blocked_tasks": len(lu.blocked),
        "stopped": lu.stopped,
        "sanitize": {"running": lu.sanitizing, "failed": lu.sanitize_failed,
                     "progress": round(lu.sanitize_progress, 4)},
        "nexuses": [_itkey(k) for k in sorted(lu.nexuses)],
        "reserve": _itkey(lu.legacy_holder) if lu.legacy_holder is not None else None,
        "persistent_reservations": {
            "generation": pr.generation,
            "aptpl": pr.aptpl,
            "registrations": [{**_itkey(k), "key": f"{v:016x}"} for k, v in sorted(pr.regs.items())],
            "reservation": None if res is None else {**_itkey(res.holder), "type": res.type,
                                                     "type_name": RESERVATION_TYPES.get(res.type, str(res.type))},
        },
        "unit_attentions": [{**_itkey(k), "pending": [
            {"asc": a, "ascq": q, "name": ASC_NAMES.get((a, q), f"{a:02x}h/{q:02x}h")} for a, q in codes]}
            for k, codes in sorted(lu.ua.items()) if codes],
        "alua": alua,
        "time": time.time(),
    }
