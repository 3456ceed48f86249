"""``unipack report --png FILE``: the report as one picture.

Three panels, drawn from the dict that ``unipack report --json`` prints:

(a) for every shared tensor, the fraction of centred variance kept against the rank (the
    cumulative spectrum over the total variance), with a dot at the rank the bundle chose, so
    one can see whether a smaller rank would have kept almost as much; for a bundle without
    shared tensors (quantized deltas, the default), the bit allocation instead: every tensor's
    stored bits per parameter, by storage, next to the cheapest one-line alternative that meets
    the rule on it and the 16 bits of a fp16 cast;
(b) rate against distortion: the bundle's bytes and weight error next to every one-line
    alternative the merge measured (fp16 cast, int8/int4/int2 and 1-bit deltas, the paper's
    k = 16), filled where it meets the rule on every tensor;
(c) every member's worst relative error next to the two baselines that cost the same bytes
    (the shared mean alone; a per-member truncated SVD), on a log scale.

matplotlib is an optional extra (``pip install 'unipack[plots]'``). The figure is drawn on a
private ``Figure`` with the Agg canvas, never through pyplot, so it touches no global backend or
figure state of a program that imports unipack.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipack.errors import UnipackError
from unipack.format.atomic import atomic_write

#: 16 x 10 inches at 100 dpi: 1600 x 1000 pixels.
FIGSIZE = (16.0, 10.0)
DPI = 100
#: Shared tensors drawn in colour and named in the legend (the largest by stored bytes).
LABELLED_TENSORS = 8
#: At most this many member names under the bars; the rest are thinned out.
MAX_TICK_LABELS = 40

_SERIES = (  # (label, colour): unipack, then the baselines it must beat
    ("unipack", "#1f77b4"),
    ("mean only", "#b0b0b0"),
    ("per-member SVD (equal bytes)", "#ff7f0e"),
)


def write_png(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw ``report`` (as printed by ``unipack report --json``) into the PNG file ``path``.

    The image is rendered in memory and then written atomically: a failure leaves no file.
    """
    _, canvas_cls = _matplotlib()
    fig = render_figure(report)
    buffer = io.BytesIO()
    canvas_cls(fig).print_png(buffer)
    target = Path(path)
    with atomic_write(target, force=True) as f:
        f.write(buffer.getvalue())
    return target


def render_figure(report: Mapping[str, Any]) -> Any:
    """The report as a ``matplotlib.figure.Figure`` (to embed, or to save in another format)."""
    figure_cls, _ = _matplotlib()
    if not isinstance(report, Mapping):
        raise UnipackError(
            f"--png: the report is a {type(report).__name__}, expected the object that `unipack report --json` prints"
        )
    fig = figure_cls(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    tensors, members = _records(report, "tensors"), _records(report, "members")
    fig.suptitle(
        f"unipack report: {report.get('path', '?')}  ({len(tensors)} tensors, {len(members)} members)", fontsize=15
    )
    grid = fig.add_gridspec(2, 2)
    # Created in this order so that fig.axes is (a), (c), (b): the first two as before (b) came.
    variance, errors, rate = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, :]), fig.add_subplot(grid[0, 1])
    shared = [t for t in tensors if t.get("storage") == "shared"]
    if shared or not tensors:
        _variance_panel(variance, shared)
    else:
        _allocation_panel(variance, tensors)
    _error_panel(errors, members)
    _rate_panel(rate, report)
    return fig


def _rate_panel(ax: Any, report: Mapping[str, Any]) -> None:
    """(b) bytes vs mean weight error: the bundle and each alternative, as one point each."""
    alternatives = report.get("alternatives")
    rows = _records(alternatives, "rows") if isinstance(alternatives, Mapping) else []
    size = report.get("bytes", {}).get("file") if isinstance(report.get("bytes"), Mapping) else None
    if not rows or _num(size) is None:
        _empty(ax, "no alternatives recorded (merged with --no-baselines, or members added since)")
        return
    assert isinstance(alternatives, Mapping)
    tensors = _num(alternatives.get("tensors"))

    def mean(values: object) -> float | None:
        nums = [_num(v) for v in values] if isinstance(values, Sequence) else []
        finite = [v for v in nums if v is not None]
        return sum(finite) / len(finite) if finite and len(finite) == len(nums) else None

    points = [("this bundle", _num(size), mean(alternatives.get("bundle_errors")), True)]
    for row in rows:
        met = _num(row.get("tensors_met")) == tensors
        points.append((str(row.get("label", row.get("method"))), _num(row.get("bytes")), mean(row.get("errors")), met))
    colours = _palette(len(points))
    for (label, nbytes, error, met), colour in zip(points, colours):
        if nbytes is None or error is None or nbytes <= 0:
            continue
        shown = max(error, 1e-7)  # a lossless point still shows on the log axis
        ax.scatter(
            [nbytes],
            [shown],
            s=140 if label == "this bundle" else 70,
            color=colour,
            facecolors=colour if met else "none",
            marker="*" if label == "this bundle" else "o",
            label=f"{label}{'' if met else ' (misses the rule)'}",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes (log)")
    ax.set_ylabel("weight error ||W-Ŵ||/||W||, mean over members (log)")
    ax.set_title(f"(b) rate vs distortion: filled = meets {alternatives.get('rule', 'the rule')} on every tensor")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _matplotlib() -> tuple[type, type]:
    """``(Figure, FigureCanvasAgg)``, or a UnipackError saying how to install the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UnipackError("--png needs matplotlib: pip install 'unipack[plots]'") from None
    return Figure, FigureCanvasAgg


# ------------------------------------------------------------------------------------------
# (a) explained variance
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    name: str
    stored_bytes: float
    kept: list[float] | None  # kept[k]: fraction of the variance the first k components keep
    rank: int | None
    energy: float | None


def _curve(tensor: Mapping[str, Any]) -> _Curve:
    spectrum = [max(v, 0.0) for v in (_num(x) for x in tensor.get("spectrum") or []) if v is not None]
    # ``variance`` counts every eigenvalue, also those past the stored head of the spectrum, so
    # the curve honestly stays below 1 when the head is truncated; without it, use the head.
    total = _num(tensor.get("variance"))
    if total is None or total <= 0:
        total = sum(spectrum)
    kept = None
    if spectrum and total > 0:
        kept, running = [0.0], 0.0
        for value in spectrum:
            running += value
            kept.append(min(running / total, 1.0))
    rank = _num(tensor.get("rank"))
    return _Curve(
        name=str(tensor.get("name", "?")),
        stored_bytes=_num(tensor.get("stored_bytes")) or 0.0,
        kept=kept,
        rank=int(rank) if rank is not None else None,
        energy=_num(tensor.get("energy")),
    )


def _variance_panel(ax: Any, shared: Sequence[Mapping[str, Any]]) -> None:
    # matplotlib is optional, so it is imported only when drawing
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"(a) explained variance of the shared tensors ({len(shared)}); dot = chosen rank", loc="left")
    if not shared:
        _empty(ax, "no shared tensors")
        return
    curves = [_curve(t) for t in shared]
    drawable = [c for c in curves if c.kept is not None or (c.rank is not None and c.energy is not None)]
    if not drawable:
        _empty(ax, f"no spectrum recorded for the {len(shared)} shared tensors")
        return
    largest = sorted(drawable, key=lambda c: -c.stored_bytes)[:LABELLED_TENSORS]
    labelled = {id(c) for c in largest}
    others = [c for c in drawable if id(c) not in labelled]
    # the many first, thin and grey, so that the few labelled ones stay readable on top
    for curve in others:
        if curve.kept is not None:
            ax.plot(range(len(curve.kept)), curve.kept, color="0.6", linewidth=0.7, alpha=0.5)
    grey_dots = [c for c in others if c.rank is not None and c.energy is not None]
    if grey_dots:
        ax.scatter(
            [c.rank for c in grey_dots],
            [c.energy for c in grey_dots],
            s=14,
            color="0.35",
            zorder=3,
            label=f"other tensors ({len(others)})",
        )
    colours = _palette(len(largest))
    for curve, colour in zip(largest, colours):
        label: str | None = f"{_short(curve.name)} ({_bytes(curve.stored_bytes)})"
        if curve.kept is not None:
            ax.plot(range(len(curve.kept)), curve.kept, color=colour, linewidth=1.4, label=label)
            label = None  # one legend entry per tensor
        if curve.rank is not None and curve.energy is not None:
            ax.scatter(
                [curve.rank],
                [curve.energy],
                s=40,
                color=colour,
                edgecolor="black",
                linewidth=0.6,
                zorder=4,
                label=label,
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a rank of 2.5 means nothing
    ax.set_xlim(left=0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("rank (shared basis vectors)")
    ax.set_ylabel("fraction of centred variance kept")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="largest by stored bytes", title_fontsize=8)


def _allocation_panel(ax: Any, tensors: Sequence[Mapping[str, Any]]) -> None:
    """(a) for a bundle without shared tensors: bits per parameter of every tensor, in manifest
    order, coloured by storage, with the cheapest alternative meeting the rule on it (hollow)."""
    ax.set_title("(a) bit allocation: stored bits per parameter of each tensor", loc="left")
    points = []
    for i, t in enumerate(tensors):
        parameters, stored = _num(t.get("parameters")), _num(t.get("stored_bytes"))
        if parameters and parameters > 0 and stored is not None and stored > 0:
            other = _num(t.get("alternative_bytes"))
            points.append((i, str(t.get("storage", "?")), 8 * stored / parameters, other and 8 * other / parameters))
    if not points:
        _empty(ax, "no parameter counts recorded (a LoRA bundle, or a report of an older unipack)")
        return
    storages = sorted({storage for _, storage, _, _ in points})
    for storage, colour in zip(storages, _palette(len(storages))):
        mine = [(i, bits) for i, kind, bits, _ in points if kind == storage]
        ax.scatter(
            [i for i, _ in mine], [b for _, b in mine], s=22, color=colour, zorder=3, label=f"{storage} ({len(mine)})"
        )
    others = [(i, bits) for i, _, _, bits in points if bits]
    if others:
        ax.scatter(
            [i for i, _ in others],
            [b for _, b in others],
            s=22,
            facecolors="none",
            edgecolors="0.3",
            zorder=2,
            label="cheapest alternative meeting the rule",
        )
    ax.axhline(16.0, color="0.5", linestyle="--", linewidth=1.0, label="fp16 cast (16 bits)")
    ax.set_yscale("log")
    # Whole bit counts as plain numbers (a log axis would write 3 x 10^1)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.yaxis.set_major_locator(FixedLocator([0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(-1, len(tensors))
    ax.set_xlabel("tensor (manifest order)")
    ax.set_ylabel("stored bits per parameter, all members (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)


# ------------------------------------------------------------------------------------------
# (c) per-member error against the baselines
# ------------------------------------------------------------------------------------------


def _error_panel(ax: Any, members: Sequence[Mapping[str, Any]]) -> None:
    ax.set_title(
        "(c) worst relative error per member, against the mean alone and per-member SVD at equal bytes "
        "(lower is better)",
        loc="left",
    )
    if not members:
        _empty(ax, "no members")
        return
    columns = [
        [_num(m.get("worst_error")) for m in members],
        [_num((_baseline(m, "mean") or {}).get("worst_error")) for m in members],
        [_num((_baseline(m, "svd") or {}).get("worst_error")) for m in members],
    ]
    series = [
        (label, colour, values)
        for (label, colour), values in zip(_SERIES, columns)
        if any(v is not None for v in values)
    ]
    if not series:
        _empty(ax, f"no errors recorded for the {len(members)} members")
        return
    values = [v for _, _, column in series for v in column if v is not None]
    positive = [v for v in values if v > 0]
    # Log scale: an exact member (error 0) has no place on it; draw it at a floor below the
    # smallest real error, and say so, rather than dropping the bar.
    floor = min(positive) / 10 if positive else 1e-9
    added = [bool(m.get("added")) for m in members]
    n, width = len(members), 0.8 / len(series)
    thin = n > 60  # edges would turn hundreds of narrow bars into a black band
    for i, (label, colour, column) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(n) if column[k] is not None]
        heights = [max(v, floor) for v in column if v is not None]
        bars = ax.bar(
            xs,
            heights,
            width=width,
            color=colour,
            label=label,
            edgecolor="none" if thin else "black",
            linewidth=0 if thin else 0.4,
        )
        if label == "unipack":
            for bar, is_added in zip(bars, [a for a, v in zip(added, column) if v is not None]):
                if is_added:
                    bar.set_hatch("//")
                    bar.set_edgecolor("black")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, max(values + [floor]) * 3)
    step = max(1, math.ceil(n / MAX_TICK_LABELS))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels(
        [_short(str(members[k].get("name", "?")), 24) + (" (added)" if added[k] else "") for k in ticks],
        rotation=0 if n <= 8 else 60,
        ha="center" if n <= 8 else "right",
        fontsize=9 if n <= 40 else 7,
    )
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("member" if step == 1 else f"member ({n} in all; one name every {step})")
    ax.set_ylabel("worst relative error ‖W−Ŵ‖/‖W‖ (log)")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(added):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        labels.append("added after the merge")
    ax.legend(handles, labels, loc="upper right", fontsize=9)
    if any(v <= 0 for v in values):
        ax.text(
            0.005,
            0.98,
            f"error 0 (exact) drawn at {floor:.0e}: a log scale has no 0",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=9,
            color="0.25",
        )


def _baseline(member: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    baselines = member.get("baselines")
    found = baselines.get(name) if isinstance(baselines, Mapping) else None
    return found if isinstance(found, Mapping) else None


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def _records(report: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """``report[key]`` as a list of objects; a missing key is an empty list."""
    items = report.get(key) or []
    return [item for item in items if isinstance(item, Mapping)] if isinstance(items, Sequence) else []


def _num(value: object) -> float | None:
    """A finite real number as float, else None (JSON null, strings, bools, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    distinct = [i for i in range(10) if i != 7]  # tab10's 7th is grey: kept for the unlabelled
    return [cmap(distinct[i % len(distinct)]) for i in range(n)]


def _short(name: str, limit: int = 48) -> str:
    """Keep the informative end of a long dotted name (``…layer.11.attention.query.weight``)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"
