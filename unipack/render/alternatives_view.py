"""The report's comparison with what a user would store instead (``stats.alternatives``):
a table of every alternative next to the bundle, and the verdict that names the winner."""

from __future__ import annotations

from collections.abc import Iterator

from rich.table import Table
from rich.text import Text

from unipack.analysis.report import Alternatives
from unipack.render.tables import format_bytes
from unipack.render.tables import format_error as _err
from unipack.render.tables import format_times as _times


def alternatives_table(a: Alternatives, file: int, ratio: float) -> Table:
    """Every alternative next to the bundle (``file`` bytes, ``ratio`` to the inputs)."""
    t = Table(
        title=f"instead of unipack: the same members stored another way (measured at merge time; "
        f"meets: tensors on which every member meets {a.rule}, of {a.tensors})",
        title_justify="left",
    )
    for col in ("method", "bytes", "ratio", "meets", "weight error mean / worst"):
        t.add_column(col, justify="left" if col == "method" else "right")

    def errors(values: list[float] | None) -> str:
        return f"{_err(sum(values) / len(values))} / {_err(max(values))}" if values else "-"

    t.add_row(
        "this bundle",
        format_bytes(file),
        f"{ratio:.2f}x",
        f"{a.tensors}" if a.bundle_errors is not None else "-",
        errors(a.bundle_errors),
        style="bold",
    )
    for row in a.rows:
        t.add_row(
            row.label,
            format_bytes(row.bytes),
            f"{row.ratio:.2f}x",
            str(row.tensors_met),
            errors(row.errors),
            style="bold" if row.method == a.smallest_met else None,
        )
    t.caption = (
        "weight error: ||W-Ŵ|| / ||W|| over the compared tensors, per member.  Alternatives are "
        "priced as shipped (dense integers, fp16 scales, no entropy coding), heads included; this "
        "bundle is its whole file."
    )
    return t


def alternatives_verdict(a: Alternatives, file: int, ratio: float) -> Iterator[Text]:
    """Which representation won over the collection, said plainly either way (``file``: the
    bundle's bytes, ``ratio``: its ratio to the inputs)."""
    if a.smallest_met is None:
        yield Text(f"no one-line alternative meets {a.rule} on every tensor; this bundle does, at {ratio:.2f}x")
    else:
        best = a.row(a.smallest_met)
        if file <= best.bytes:
            yield Text(
                f"{_times(best.bytes / file)} smaller than the smallest alternative that meets {a.rule} on every "
                f"tensor ({best.label}, {best.ratio:.2f}x); fp16 cast {a.row('fp16').ratio:.2f}x",
                style="green",
            )
        else:
            yield Text(
                f"{best.label} meets {a.rule} on every tensor in fewer bytes ({best.ratio:.2f}x vs this "
                f"bundle's {ratio:.2f}x): this bundle does not pay for itself",
                style="yellow",
            )
    smaller = [row for row in a.rows if row.bytes < file and row.tensors_met < a.tensors]
    if smaller:
        row = min(smaller, key=lambda x: x.bytes)
        yield Text(
            f"{row.label} is smaller ({row.ratio:.2f}x) but misses {a.rule} on "
            f"{a.tensors - row.tensors_met} of {a.tensors} tensors (weight error up to {_err(max(row.errors))})"
        )
