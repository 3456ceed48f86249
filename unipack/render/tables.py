"""Table cells and columns for long names: a name is wrapped, never cut short.

rich shrinks a table that is wider than the terminal by cutting its cells with "…"; two tensor
names that share a long prefix (``vit.encoder.layer.0.attention.attention.query.weight`` and
``...key.weight``) then print alike. Here value columns keep their width, a name column takes
what is left and wraps after the dots, and where even that leaves a name too little room the
table prints as one record per row instead.
"""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_times(x: float) -> str:
    """A factor: ``1.95x``, ``1,234x``."""
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def format_error(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


#: The fewest characters a name column may get before a table prints as records instead.
NAME_FLOOR = 24


def name_column(table: Table, header: str) -> None:
    """A column of tensor (or member) names: the one that gives way when the table is too wide
    (wrapped onto more lines, never cut)."""
    table.add_column(header, overflow="fold")


def value_column(table: Table, header: str, justify: str = "right") -> None:
    """A column of short values: kept whole on one line, so that only name columns give way."""
    table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]


class TensorName:
    """A tensor name as a table cell: where the column is narrower than the name, it wraps after
    a dot (``vit.encoder.layer.0.`` / ``attention.attention.`` / ``query.weight``), and folds
    only a part wider than the column; it is never cut short."""

    def __init__(self, name: str) -> None:
        self.name = name
        *heads, last = name.split(".")
        self.parts = [f"{head}." for head in heads] + ([last] if last or not heads else [])

    def __str__(self) -> str:
        return self.name

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widest = max(len(part) for part in self.parts)
        return Measurement(min(widest, options.max_width), min(len(self.name), options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines, line = [], ""
        for part in self.parts:
            if line and len(line) + len(part) > options.max_width:
                lines.append(line)
                line = ""
            line += part
        lines.append(line)
        yield Text("\n".join(lines), overflow="fold")


class FittedTable:
    """A table with name columns (``name_column``) that prints as a table where the terminal
    leaves each name column ``NAME_FLOOR`` characters (or its widest name), and otherwise as one
    record per row: the row's first cell on a line of its own, then ``header value`` for every
    other cell that has one, indented."""

    def __init__(self, table: Table) -> None:
        self.table = table

    @property
    def title(self) -> str:
        return str(self.table.title or "")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        columns = self.table.columns
        widest = [
            max(Measurement.get(console, options, cell).maximum for cell in [c.header, *c.cells]) for c in columns
        ]
        # value columns whole, name columns at least NAME_FLOOR (or their widest name), 2 of padding
        # per cell and a border between and around them all
        needed = sum(w if c.no_wrap else min(w, NAME_FLOOR) for c, w in zip(columns, widest))
        if needed + 3 * len(columns) + 1 <= options.max_width:
            yield self.table
            return
        if self.table.title:
            yield Text(self.title, style="table.title")
        headers = [str(c.header) for c in columns]
        for row in zip(*(list(c.cells) for c in columns)):
            yield Text(str(row[0]), style="bold", overflow="fold")
            pairs = [f"{h} {cell}" for h, cell in zip(headers[1:], row[1:]) if str(cell).strip() not in ("", "-")]
            yield Padding(Text("  ·  ".join(pairs), overflow="fold"), (0, 0, 0, 2))
        if self.table.caption:
            yield Text(str(self.table.caption), style="table.caption")
