"""Terminal output: rich consoles (colour only on a terminal), tables, sizes, JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

PIPE_WIDTH = 4096
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, highlight=False)
    # Piped output is not cut at 80 columns: lines stay whole for grep and friends.
    return Console(file=stream, highlight=False, width=PIPE_WIDTH)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    # A column empty in every row (no errors, no comments) only takes width from the others.
    keep = [i for i in range(len(columns)) if any(row[i] for row in cells)] if cells else list(range(len(columns)))
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for i in keep:
        table.add_column(columns[i], overflow="fold")
    for row in cells:
        table.add_row(*(row[i] for i in keep))
    out = console()
    if table.row_count:
        out.print(table)
    else:
        out.print(f"(no {title.lower() if title else 'rows'})")
