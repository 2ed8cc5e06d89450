"""The table of every SCSI command the device server implements: lookup by CDB, the list
REPORT SUPPORTED OPERATION CODES returns (its handler is here, since it reports the table),
and the README section generated from it."""

from __future__ import annotations

import struct

from pyscsi_target.scsi import pr, sanitize, sbc, spc, tpc
from pyscsi_target.scsi import sense as S
from pyscsi_target.scsi.command import Command, F, set_data_in, usage
from pyscsi_target.scsi.lu import LogicalUnit
from pyscsi_target.scsi.task import ScsiTask


def _timeouts(cmd: Command) -> bytes:
    return struct.pack(">HBBII", 0x0A, 0, 0, cmd.timeout, cmd.timeout)


def report_supported_opcodes(lu: LogicalUnit, task: ScsiTask) -> None:
    cdb = task.cdb
    rctd = bool(cdb[2] & 0x80)
    opt = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = struct.unpack_from(">H", cdb, 4)[0]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if opt == 0:
        out = bytearray()
        for c in all_commands():
            flags = (0x02 if rctd else 0) | (0x01 if c.sa is not None else 0)
            out += struct.pack(">BBHBBH", c.opcode, 0, c.sa or 0, 0, flags, c.cdb_len)
            if rctd:
                out += _timeouts(c)
        data = struct.pack(">I", len(out)) + out
    elif opt in (1, 2, 3):
        entry = COMMANDS_BY_OPCODE.get(req_op)
        cmd: Command | None
        if isinstance(entry, dict):
            if opt == 1:
                raise S.invalid_cdb(2, 0)
            cmd = entry.get(req_sa)
        else:
            if opt == 2 and entry is not None:
                raise S.invalid_cdb(2, 0)
            cmd = entry if (opt != 3 or req_sa == 0) else None
        if cmd is None:
            data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
        else:
            body = cmd.usage
            data = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(body)) + body
            if rctd:
                data += _timeouts(cmd)
    else:
        raise S.invalid_cdb(2, 2)
    set_data_in(task, data, alloc)
    lu.done(task)


_RSOC = Command(0xA3, 0x0C, "REPORT SUPPORTED OPERATION CODES", report_supported_opcodes,
                usage(0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
                spc.RO_FLAGS & ~F.UA_EXEMPT)

#: opcode -> its Command, or for opcodes with service actions: service action -> Command.
COMMANDS_BY_OPCODE: dict[int, Command | dict[int, Command]] = {}

for _c in [*spc.COMMANDS, *sbc.COMMANDS, *sanitize.COMMANDS, *pr.COMMANDS, *tpc.COMMANDS, _RSOC]:
    if _c.sa is None:
        COMMANDS_BY_OPCODE[_c.opcode] = _c
    else:
        _entry = COMMANDS_BY_OPCODE.setdefault(_c.opcode, {})
        assert isinstance(_entry, dict)
        _entry[_c.sa] = _c


def lookup(cdb: bytes) -> Command | None:
    entry = COMMANDS_BY_OPCODE.get(cdb[0])
    if entry is None or isinstance(entry, Command):
        return entry
    return entry.get(cdb[1] & 0x1F)


def all_commands() -> list[Command]:
    out: list[Command] = []
    for op in sorted(COMMANDS_BY_OPCODE):
        entry = COMMANDS_BY_OPCODE[op]
        if isinstance(entry, dict):
            out.extend(entry[sa] for sa in sorted(entry))
        else:
            out.append(entry)
    return out


_STANDARD = {"spc": "SPC-4", "pr": "SPC-4", "command_table": "SPC-4", "tpc": "SPC-4 (third-party copy)",
             "sbc": "SBC-3", "sanitize": "SBC-3"}


def command_table_markdown() -> str:
    """The "Supported SCSI commands" section for README.md, generated from the dispatch
    table so the two cannot drift (tests/test_conformance_commands.py compares them)."""
    rows = ["## Supported SCSI commands", "", "| Opcode | SA | Command | Standard |", "|---|---|---|---|"]
    for c in all_commands():
        sa = f"{c.sa:02X}h" if c.sa is not None else ""
        standard = _STANDARD[c.handler.__module__.rsplit(".", 1)[-1]]
        rows.append(f"| {c.opcode:02X}h | {sa} | {c.name} | {standard} |")
    return "\n".join(rows) + "\n"
