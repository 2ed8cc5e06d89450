"""The supported-command list is honest (issue 3, point 6).

* REPORT SUPPORTED OPERATION CODES, asked over the wire, lists exactly the commands the
  dispatcher has, with consistent CDB lengths and service-action flags.
* Every opcode it does not list gets CHECK CONDITION, ILLEGAL REQUEST / INVALID COMMAND
  OPERATION CODE: nothing is silently accepted.
* README.md's "Supported SCSI commands" table names exactly the same commands.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from support.daemon import DEMO_IQN, Daemon
from support.rawclient import RawClient, login_session

from pyscsi_target.scsi.command import cdb_group_len
from pyscsi_target.scsi.command_table import all_commands

README = Path(__file__).resolve().parents[1] / "README.md"
INVALID_OPCODE = (0x20, 0x00)


def rsoc_all(c: RawClient) -> dict[tuple[int, int | None], int]:
    """{(opcode, service action or None): CDB length} from REPORT SUPPORTED OPERATION CODES."""
    alloc = 65535
    r = c.scsi(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0, 0, 0, alloc, 0, 0), read_len=alloc)
    assert r.status == 0, f"RSOC: {r.status:#x} {r.sense.hex()}"
    length = struct.unpack_from(">I", r.data)[0]
    assert length + 4 <= len(r.data), "RSOC answer truncated: raise the allocation length"
    out: dict[tuple[int, int | None], int] = {}
    pos = 4
    while pos < 4 + length:
        op, sa, flags, cdb_len = r.data[pos], struct.unpack_from(">H", r.data, pos + 2)[0], r.data[pos + 5], \
            struct.unpack_from(">H", r.data, pos + 6)[0]
        key = (op, sa if flags & 0x01 else None)
        assert key not in out, f"duplicate descriptor {key}"
        out[key] = cdb_len
        pos += 8 + (12 if flags & 0x02 else 0)  # CTDP: a command timeouts descriptor follows
    return out


def readme_commands(text: str) -> set[tuple[int, int | None]]:
    m = re.search(r"^#+ *Supported SCSI commands *$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert m, f"{README} has no 'Supported SCSI commands' section with the command table"
    out: set[tuple[int, int | None]] = set()
    for line in m.group(1).splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"^[0-9A-F]{2}h\b", cells[0]):
            continue
        ops = [int(x, 16) for x in re.findall(r"\b([0-9A-F]{2})h\b", cells[0])]
        sas: list[int | None] = []
        for part in filter(None, (p.strip() for p in cells[1].split(","))):
            rng = re.fullmatch(r"([0-9A-F]{2})h *- *([0-9A-F]{2})h", part)
            if rng:
                sas += list(range(int(rng.group(1), 16), int(rng.group(2), 16) + 1))
            else:
                sas.append(int(re.fullmatch(r"([0-9A-F]{2})h", part).group(1), 16))  # type: ignore[union-attr]
        out |= {(op, sa) for op in ops for sa in (sas or [None])}
    return out


def test_rsoc_matches_dispatch_and_unlisted_opcodes_are_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state")
    d.start()
    try:
        c = login_session(d.host, d.port, DEMO_IQN)
        try:
            reported = rsoc_all(c)
            table = {(cmd.opcode, cmd.sa): cmd.cdb_len for cmd in all_commands()}
            assert reported == table, (f"RSOC vs dispatcher: only reported {set(reported) - set(table)}, "
                                       f"only dispatched {set(table) - set(reported)}")
            listed = {op for op, _ in reported}
            accepted = []
            for op in range(256):
                if op in listed:
                    continue
                r = c.scsi(bytes([op]) + bytes(cdb_group_len(op) - 1))
                if (r.status, r.sense_key, r.asc_ascq) != (0x02, 0x05, INVALID_OPCODE):
                    accepted.append(f"{op:02X}h -> status {r.status:#x} sense {r.sense.hex()}")
            assert not accepted, "unlisted opcodes not refused as INVALID COMMAND OPERATION CODE:\n" + \
                "\n".join(accepted)
        finally:
            c.close()
    finally:
        d.stop()
    d.assert_clean_log()


def test_readme_table_lists_exactly_the_supported_commands() -> None:
    readme = readme_commands(README.read_text())
    table = {(cmd.opcode, cmd.sa) for cmd in all_commands()}
    assert readme == table, (f"README table vs dispatcher: only in README {sorted(readme - table)}, "
                             f"missing from README {sorted(table - readme)}")
