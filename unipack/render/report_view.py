"""Terminal rendering of ``unipack report``: bytes, fidelity, baselines, spectra, eval scores.

Every table here has a ``--json`` twin in ``Report.to_dict()``; nothing is printed that the
JSON does not carry. Ratios always come with the error that goes with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from unipack.analysis.report import METHODS, Report, TensorReport
from unipack.format.manifest import Manifest
from unipack.render.alternatives_view import alternatives_table, alternatives_verdict
from unipack.render.tables import FittedTable, TensorName, format_bytes, name_column, value_column
from unipack.render.tables import format_error as _err
from unipack.render.tables import format_times as _times
from unipack.schemes import scheme_of

LABELS = {"unipack": "unipack", "mean-only": "mean only", "svd": "per-member SVD", "original": "original"}
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 24
#: Tensors the compact report lists (the most expensive ones); ``--tensors`` lists them all.
DIGEST_TENSORS = 5
#: A difference of scores this small against the scores themselves is float noise (a mean of
#: drops that cancel leaves ~1e-15): it prints as 0.
NOISE = 1e-9


def sparkline(spectrum: list[float], variance: float | None, width: int = SPARK_WIDTH) -> str:
    """The explained-variance curve (fraction kept at rank 1, 2, ...) as block characters."""
    if not spectrum or not variance:
        return ""
    out, kept = [], 0.0
    for value in spectrum[:width]:
        kept += value
        out.append(SPARK[min(len(SPARK) - 1, int(kept / variance * (len(SPARK) - 1) + 0.5))])
    return "".join(out)


def difference(value: float, scale: float, spec: str = ".3g") -> str:
    """``value`` (a difference of two scores of size ``scale``) formatted, or 0 where it is only
    the rounding left by subtracting and averaging those scores."""
    if abs(value) <= NOISE * max(abs(scale), 1.0):
        value = 0.0
    return format(value + 0.0, spec)  # + 0.0: -0.0 prints as 0


def report_view(
    r: Report, *, member: str | None = None, manifest: Manifest | None = None, show_tensors: bool = False
) -> Iterator[RenderableType]:
    yield _title(r)
    yield _headline(r)
    yield _bytes_table(r)
    yield _members_table(r)
    yield _baselines_table(r)
    if r.alternatives is not None:
        yield alternatives_table(r.alternatives, r.bytes.file, r.bytes.ratio)
    yield from _verdict(r)
    if show_tensors and member is None:
        yield _tensors_table(r)
    if member is not None and manifest is not None:
        yield _member_tensors_table(r, member, manifest)
    if r.evaluation is not None:
        yield _eval_table(r.evaluation)


def compact_report_view(r: Report, *, more: str = "--tensors lists every tensor") -> Iterator[RenderableType]:
    """The report in brief: a few summary rows, the most expensive tensors, and the eval table.
    ``more`` says how to see the full report (the caller's own flag)."""
    yield _title(r)
    yield _summary_table(r)
    yield _digest_table(r, more)
    if r.evaluation is not None:
        yield _eval_table(r.evaluation)


def _title(r: Report) -> Text:
    added = sum(1 for m in r.members if m.added)
    return Text.assemble(
        (r.path, "bold"),
        f"  ·  {r.created_by}  ·  format v{r.format_version}  ·  "
        f"{len(r.members)} members{f' ({added} added)' if added else ''}  ·  {r.rule}",
    )


def _summary_table(r: Report) -> Table:
    t = Table(title="summary", show_header=False, title_justify="left")
    t.add_column(no_wrap=True, style="bold")
    t.add_column()
    headline = _headline(r)
    t.add_row("ratio", headline[len("ratio ") :])
    total = r.bytes.file or 1
    t.add_row(
        "bytes by part",
        ", ".join(f"{name} {format_bytes(n)} ({100 * n / total:.0f}%)" for name, n in r.bytes.parts.items() if n),
    )
    errors = r.overall["mean_error"]
    t.add_row(
        "baselines",
        "mean relative error: "
        + ", ".join(
            f"{LABELS[m]}{' (equal bytes)' if m == 'svd' else ''} {_err(errors[m])}"
            for m in METHODS
            if errors[m] is not None
        ),
    )
    for line in _verdict(r):
        t.add_row("verdict", line)
    return t


def _digest_table(r: Report, more: str) -> FittedTable:
    top = sorted(r.tensors, key=lambda x: x.stored_bytes, reverse=True)[:DIGEST_TENSORS]
    t = Table(
        title=f"most expensive tensors ({len(top)} of {len(r.tensors)}; mean relative error over members)",
        title_justify="left",
        caption=more,
        caption_justify="left",
    )
    name_column(t, "tensor")
    for col in ("storage", "rank", "bytes", "share", "unipack", "mean only"):
        value_column(t, col, "left" if col == "storage" else "right")
    for x in top:
        t.add_row(
            TensorName(x.name),
            f"{x.storage}/{x.scheme}" if x.scheme else x.storage,
            "-" if x.rank is None else str(x.rank),
            format_bytes(x.stored_bytes),
            f"{100 * x.stored_bytes / r.bytes.file:.1f}%" if r.bytes.file else "-",
            _err(x.errors["unipack"]),
            _err(x.errors["mean-only"]),
        )
    return FittedTable(t)


def _headline(r: Report) -> Text:
    b = r.bytes
    worst = max((m.errors["unipack"].worst for m in r.members if m.errors["unipack"]), default=0.0)
    text = Text.assemble(
        ("ratio ", "bold"), f"{b.ratio:.2f}x vs the inputs ({format_bytes(b.inputs)} -> {format_bytes(b.file)})"
    )
    if b.ratio_vs_lossless is not None:
        how = f"zstd -{b.lossless_level}" + (" of byte-grouped floats" if b.lossless_grouped else "")
        text.append(
            f", {b.ratio_vs_lossless:.2f}x vs the inputs compressed losslessly ({how}: "
            f"{format_bytes(b.lossless or 0)}{', estimated from samples' if b.lossless_sampled else ''})"
        )
    if b.ratio_vs_zipnn is not None:
        text.append(f", {b.ratio_vs_zipnn:.2f}x vs ZipNN ({format_bytes(b.zipnn or 0)})")
    if b.base is not None:
        text.append(
            f"; every ratio leaves out the base model {b.base_source} ({format_bytes(b.base)}), "
            f"referenced, not stored: extraction needs it (--base)"
        )
    text.append(", at worst relative error ")
    text.append(f"{worst:.3g}", style="bold")
    if b.exact_tier:
        text.append(" (the lossy tier; extract --exact gives every member bit for bit)")
    return text


def _bytes_table(r: Report) -> Table:
    t = Table(title="bytes by part", title_justify="left")
    for col, justify in (("part", "left"), ("bytes", "right"), ("share", "right"), ("", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, n in r.bytes.parts.items():
        share = n / r.bytes.file if r.bytes.file else 0.0
        t.add_row(name, format_bytes(n), f"{100 * share:.1f}%", "█" * round(30 * share))
    t.add_row("total", format_bytes(r.bytes.file), "100.0%", "", style="bold")
    return t


def _members_table(r: Report) -> FittedTable:
    t = Table(title="members (relative errors; mean = weighted by tensor bytes)", title_justify="left")
    for col in ("member", "own bytes", "with share", "worst", "mean", "delta lost", "on tensor"):
        if col in ("member", "on tensor"):
            name_column(t, col)
        else:
            value_column(t, col)
    for m in r.members:
        u = m.errors["unipack"]
        t.add_row(
            m.name + (" (added)" if m.added else ""),
            format_bytes(m.own_bytes),
            format_bytes(m.amortized_bytes),
            _err(u.worst if u else None),
            _err(u.mean if u else None),
            _err(m.delta_error),
            TensorName(u.worst_tensor) if u and u.worst_tensor else "-",
        )
    t.caption = (
        "own bytes: its coefficients and raw tensors; with share: plus 1/N of the means, bases and "
        "header.  delta lost: ||W-Ŵ|| / ||W-mean||"
        + (" (||W-base|| on tensors centred on the base model)" if r.bytes.base is not None else "")
        + ", how much of what makes the member different did not survive."
    )
    return FittedTable(t)


def _baselines_table(r: Report) -> Table:
    t = Table(
        title="baselines (per member: mean of byte-weighted errors / worst; per tensor: who wins)", title_justify="left"
    )
    for col in ("method", "bytes", "mean error", "worst error", "tensors won"):
        t.add_column(col, justify="left" if col == "method" else "right")
    sizes = {"unipack": r.bytes.file, "mean-only": r.bytes.mean_only, "svd": r.bytes.file}
    for method in METHODS:
        worsts = [m.errors[method].worst for m in r.members if m.errors[method] is not None]  # type: ignore[union-attr]
        measured = len(worsts) == len(r.members) and worsts
        label = LABELS[method] + (" (equal bytes)" if method == "svd" else "")
        t.add_row(
            label,
            format_bytes(sizes[method]),
            _err(r.overall["mean_error"][method]),
            _err(max(worsts) if measured else None),
            str(r.overall["tensors_won"][method]),
            style="bold" if r.overall["winner"] == method else None,
        )
    return t


def _verdict(r: Report) -> Iterator[Text]:
    if r.alternatives is not None:
        yield from alternatives_verdict(r.alternatives, r.bytes.file, r.bytes.ratio)
    errors = r.overall["mean_error"]
    ours, mean, svd = errors["unipack"], errors["mean-only"], errors["svd"]
    if mean is None:
        yield Text(
            "baselines were not measured (merged with --no-baselines): "
            "`unipack report --baselines --originals DIR` measures them",
            style="yellow",
        )
        return
    winner = r.overall["winner"]
    if winner == "mean-only" and r.bytes.base is not None and r.bytes.mean_only >= r.bytes.file:
        # Deltas from a referenced base (spec §11) store no mean: a rank-0 bundle would add them.
        yield Text(
            f"the members' mean alone is about as close (mean error {mean:.3g} vs {ours:.3g}), but it is not "
            f"stored: a bundle of means would take {format_bytes(r.bytes.mean_only)}, this one "
            f"{format_bytes(r.bytes.file)}"
        )
    elif winner == "mean-only":
        yield Text(
            f"the mean alone does as well as the subspace here (mean error {mean:.3g} vs {ours:.3g}): "
            f"the bases and coefficients buy nothing; --rank 0 gives a smaller bundle",
            style="yellow",
        )
    elif winner == "svd":
        yield Text(
            f"per-member SVD at equal bytes beats the shared subspace (mean error {svd:.3g} vs {ours:.3g}): "
            f"the members do not share a useful subspace",
            style="yellow",
        )
    else:
        parts = [f"{_times(mean / ours)} lower than the mean alone" if ours else "exact where the mean alone is not"]
        if svd is not None and ours:
            parts.append(f"{_times(svd / ours)} lower than per-member SVD at equal bytes")
        # Name what actually stores the bundle: quantized deltas where any tensor uses them.
        what = "unipack (quantized deltas)" if any(t.storage == "delta" for t in r.tensors) else "the shared subspace"
        yield Text(f"{what} wins: mean error {ours:.3g}, " + ", ".join(parts), style="green")


def _tensors_table(r: Report) -> FittedTable:
    t = Table(
        title=f"tensors: explained variance by rank (first {SPARK_WIDTH} ranks), mean error over members",
        title_justify="left",
    )
    name_column(t, "tensor")
    columns = ["storage", "rank", "energy kept", "scree", "bytes", "unipack", "mean only", "SVD", "best"]
    if r.alternatives is not None:
        columns.append("rival")
        t.caption = "rival: the cheapest one-line alternative that meets the rule on the tensor (none: none does)"
    for col in columns:
        value_column(
            t, col, "right" if col in ("rank", "energy kept", "bytes", "unipack", "mean only", "SVD") else "left"
        )
    for x in r.tensors:
        storage = f"{x.storage}/{x.scheme}" if x.scheme else x.storage
        t.add_row(
            TensorName(x.name),
            storage,
            "-" if x.rank is None else str(x.rank),
            "-" if x.energy is None else f"{x.energy:.4f}",
            sparkline(x.spectrum, x.variance),
            format_bytes(x.stored_bytes),
            _err(x.errors["unipack"]),
            _err(x.errors["mean-only"]),
            _err(x.errors["svd"]),
            LABELS.get(x.winner or "", "-"),
            *([_cheapest_alternative(x)] if r.alternatives is not None else []),
        )
    return FittedTable(t)


def _cheapest_alternative(x: TensorReport) -> str:
    if x.alternative is None or x.alternative_bytes is None:
        return "none" if x.errors["unipack"] is not None else "-"
    return f"{x.alternative} {format_bytes(x.alternative_bytes)}"


def _member_tensors_table(r: Report, name: str, manifest: Manifest) -> FittedTable:
    m = manifest.member(name)
    t = Table(title=f"member {name}: per tensor (relative errors)", title_justify="left")
    name_column(t, "tensor")
    for col in ("storage", "rank", "unipack", "delta lost", "mean only", "SVD", "SVD rank"):
        value_column(t, col, "left" if col == "storage" else "right")
    f = m.fidelity
    for i, rec in enumerate(manifest.tensors):
        scheme = scheme_of(rec)
        storage = "raw (override)" if scheme.name != "raw" and rec.name in m.raw else rec.storage
        cause = getattr(rec.params, "raw_cause", None)
        if cause:
            storage += f" ({cause})"
        # Numbers are shown where they were measured: rank, delta lost and SVD for tensors rebuilt
        # from shared bases, the mean-only error wherever that baseline replaces the tensor.
        projected = scheme.projected(rec, m)
        rank = scheme.rank(rec)
        t.add_row(
            TensorName(rec.name),
            storage,
            (str(rank) if rank is not None else scheme.rank_text(rec)) if projected else "-",
            _err(m.errors[i]),
            _err(f.delta_errors[i]) if f and projected else "-",
            _err(f.mean_errors[i]) if f and scheme.replaced_by_mean(rec, m) else "-",
            _err(f.svd_errors[i]) if f and f.svd_errors and projected else "-",
            str(f.svd_ranks[i]) if f and f.svd_ranks and projected else "-",
        )
    return FittedTable(t)


def _eval_table(ev: dict[str, Any]) -> Table:
    metric = ev["metric"]
    t = Table(title=f"{metric} by member ({ev['eval']}); drop from the original in brackets", title_justify="left")
    columns = ("original", "unipack", "mean-only", "svd")
    name_column(t, "member")
    for col in columns:
        value_column(t, LABELS[col] + (" (equal bytes)" if col == "svd" else ""))
    # Drops are differences of scores of this size: what is left of them below rounding is noise.
    scale = max(
        (
            abs(scores[metric])
            for row in ev["members"].values()
            for scores in row.values()
            if scores and metric in scores
        ),
        default=1.0,
    )
    for name, row in ev["members"].items():
        cells = [name]
        original = (row.get("original") or {}).get(metric)
        for col in columns:
            scores = row.get(col)
            if not scores or metric not in scores:
                cells.append("-")
                continue
            value = scores[metric]
            recorded = col == "original" and name in ev.get("original_recorded", [])
            cell = f"{value:.4g}" + (" (recorded)" if recorded else "")
            if col != "original" and original is not None:
                cell += f" ({difference(value - original, scale, '+.3g')})"
            cells.append(cell)
        t.add_row(*cells)
    drops = ev["drops"]
    summary = ["largest / mean drop", ""]
    for col in columns[1:]:
        d = drops.get(col)
        summary.append(f"{difference(d['worst'], scale)} / {difference(d['mean'], scale)}" if d else "-")
    t.add_row(*summary, style="bold")
    return t
