"""Terminal rendering with rich: merge progress, the merge summary, ``info`` tables.

Every ratio printed here is printed next to the fidelity that goes with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from unipack.analysis.report import recorded_alternatives, rule_text
from unipack.bundle.summary import BundleSummary
from unipack.format.manifest import BaseReference, Manifest
from unipack.options import rule_text as bounds_text
from unipack.pack.add import AddResult
from unipack.pack.merge import MergeResult
from unipack.render.alternatives_view import alternatives_verdict
from unipack.render.documents import worst_member
from unipack.render.tables import FittedTable, TensorName, format_bytes, name_column, value_column
from unipack.schemes import scheme_of


class ProgressBars:
    """Two bars: tensors done, and member reads within the current tensor (several passes)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            # No bars where nobody watches (logs, pipes): they would only leave blank lines behind.
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._tensors = self._progress.add_task("tensors", total=None)
        self._reads = self._progress.add_task("member reads", total=None)
        self._progress.start()

    def start(self, n_tensors: int, n_members: int) -> None:
        self._progress.update(self._tensors, total=n_tensors)

    def tensor(self, index: int, name: str) -> None:
        short = name if len(name) <= 48 else "…" + name[-47:]
        self._progress.update(self._tensors, completed=index + 1, description=f"stored {short}")
        self._progress.reset(self._reads, total=None, description="member reads")

    def member_read(self) -> None:
        self._progress.advance(self._reads)

    def lossless(self, done: int, total: int) -> None:
        self._progress.update(self._tensors, total=total, completed=done, description="lossless baseline (zstd)")

    def stop(self) -> None:
        self._progress.stop()


def size_ratio(ratio: float) -> str:
    """``2.50x smaller``, or ``1.60x larger`` for a bundle bigger than its inputs ("0.62x smaller"
    would read as a saving)."""
    if ratio >= 1 or ratio <= 0:
        return f"{ratio:.2f}x smaller"
    return f"{1 / ratio:.2f}x larger"


def merge_summary(result: MergeResult) -> Table:
    """The merge summary; ``render.documents.merge_document`` is its ``--json`` twin."""
    worst_name, worst = worst_member(result)
    t = Table(title="merge summary", show_header=False, title_justify="left")
    t.add_row("inputs", f"{len(result.manifest.members)} members, {format_bytes(result.input_bytes)}")
    t.add_row("output", f"{result.path} ({format_bytes(result.file_bytes)})")
    base = result.manifest.base
    excluded = "" if base is None else f" (not counting the base model: {format_bytes(base.nbytes)} referenced)"
    t.add_row("ratio", f"{size_ratio(result.ratio)}{excluded}, at worst relative error {worst:.3g} ({worst_name})")
    t.add_row("rule", rule_text(result.manifest.options))
    if result.base is not None:
        t.add_row("base", result.base.text)
        t.add_row(
            "",
            f"referenced, not stored: {base_line(base)}; extract, add and export need --base"
            if base is not None
            else "no tensor was cheaper as deltas from the base: the bundle does not reference it",
        )
    mismatched = result.shape_mismatched
    if mismatched:
        shown = ", ".join(mismatched[:3]) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
        t.add_row(
            "task-specific",
            f"{len(mismatched)} tensor{'s' if len(mismatched) != 1 else ''} whose shape "
            f"differs between members stored raw per member: {shown}",
        )
    alternatives = recorded_alternatives(result.manifest)
    if alternatives is not None:
        for line in alternatives_verdict(alternatives, result.file_bytes, result.ratio):
            t.add_row("alternatives", line)
    evaluation = result.manifest.stats.get("evaluation")
    if isinstance(evaluation, dict):
        target = evaluation.get("max_drop")
        verdict = (
            ""
            if target is None
            else (
                f" (target {target}: {'met' if evaluation.get('met') else 'NOT met'}, "
                f"{len(evaluation.get('attempts', []))} attempts)"
            )
        )
        t.add_row(
            "eval",
            f"{evaluation.get('metric')}: largest drop {evaluation.get('worst_drop', 0):.3g} "
            f"({evaluation.get('worst_member')}){verdict}",
        )
    sized = result.manifest.stats.get("size_target")
    if isinstance(sized, dict):
        t.add_row("size target", size_target_line(sized, result.file_bytes))
    t.add_row("time", f"{result.seconds:.1f} s")
    t.add_row("peak memory", format_bytes(result.peak_rss_bytes))
    t.add_row("next", f"unipack report {result.path}   (bytes by part, errors vs baselines, spectra)")
    return t


def base_line(base: BaseReference) -> str:
    """A referenced base model in one phrase: how many tensors, their bytes, its name and digest."""
    return (
        f"{len(base.tensors)} tensors, {format_bytes(base.nbytes)} of {base.source} "
        f"(sha256 of its tensors {base.sha256[:12]}...)"
    )


def size_target_line(record: dict[str, Any], file_bytes: int) -> str:
    """What ``merge --size/--bits`` asked for and got (``stats.size_target``)."""
    target = int(record.get("target_bytes") or 0)
    rule = bounds_text(
        "max-error", max_error=_sig3(record.get("max_error")), max_delta_error=_sig3(record.get("max_delta_error"))
    )
    own = record.get("allocated_tensors")
    if isinstance(own, int) and own > 0:  # the per-tensor step after the scale search (spec 3.6)
        rule += f", {own} tensors tighter (allocated per tensor)"
    share = file_bytes / target if target else math.nan
    verdict = "met within 1%" if record.get("met") else f"fits, at {share:.1%} of it (no closer bundle found)"
    return (
        f"{format_bytes(target)}: {format_bytes(file_bytes)} at {rule}, {verdict} "
        f"({len(record.get('attempts') or [])} merges)"
    )


def _sig3(value: Any) -> float | None:
    return float(f"{value:.3g}") if isinstance(value, (int, float)) else None


def info_table(s: BundleSummary, manifest: Manifest | None = None) -> Iterator[RenderableType]:
    yield Text.assemble(
        (f"{s.path}", "bold"),
        f"  ·  {s.created_by}  ·  format v{s.format_version}  ·  ",
        f"{len(s.members)} members  ·  {rule_text(s.options)}",
    )
    yield Text.assemble(
        ("ratio ", "bold"),
        f"{s.ratio:.2f}x ",
        f"({format_bytes(s.input_bytes)} of inputs -> ",
        f"{format_bytes(s.file_bytes)}) at worst relative error ",
        (f"{s.worst_error:.3g}", "bold"),
    )
    if s.base is not None:
        yield Text.assemble(
            ("base ", "bold"),
            f"referenced, not stored: {s.base['tensors']} tensors, {format_bytes(s.base['bytes'])} of "
            f"{s.base['source']} (sha256 of its tensors {str(s.base['sha256'])[:12]}...); the ratio leaves it "
            f"out, and extract, add and export need it (--base)",
        )
    if s.parts.get("residuals"):
        lossy = s.file_bytes - s.parts["residuals"]
        yield Text.assemble(
            ("tiers ", "bold"),
            f"lossy {format_bytes(lossy)} ({s.input_bytes / max(lossy, 1):.2f}x)  ·  lossless residuals ",
            f"{format_bytes(s.parts['residuals'])}  ·  every member bit for bit (extract --exact) in ",
            f"{format_bytes(s.file_bytes)} ({s.ratio:.2f}x)",
        )
    parts = Table(title="bytes by part", title_justify="left")
    parts.add_column("part")
    parts.add_column("bytes", justify="right")
    parts.add_column("share", justify="right")
    for name, n in s.parts.items():
        parts.add_row(name, format_bytes(n), f"{100 * n / s.file_bytes:.1f}%" if s.file_bytes else "-")
    parts.add_row("total", format_bytes(s.file_bytes), "100.0%", style="bold")
    yield parts
    storage = Table(title="tensors by storage", title_justify="left")
    storage.add_column("storage")
    storage.add_column("tensors", justify="right")
    for key, n in sorted(s.storage_counts.items()):
        storage.add_row(key, str(n))
    if s.rank_min is not None:
        storage.caption = f"shared ranks: min {s.rank_min}, median {s.rank_median:g}, max {s.rank_max}"
    yield storage
    members = Table(title="members", title_justify="left")
    name_column(members, "member")
    name_column(members, "source")
    for col in ("source size", "own bytes", "worst error"):
        value_column(members, col)
    name_column(members, "on tensor")
    for m in s.members:
        members.add_row(
            m.name,
            m.source,
            format_bytes(m.source_bytes),
            format_bytes(m.own_bytes),
            f"{m.worst_error:.3g}",
            TensorName(m.worst_tensor) if m.worst_tensor else "-",
        )
    yield FittedTable(members)
    if manifest is not None:
        tensors = Table(title="tensors", title_justify="left")
        name_column(tensors, "tensor")
        for col in ("storage", "scheme", "rank", "energy kept"):
            value_column(tensors, col, "left")
        tensors.add_column("why")
        for t in manifest.tensors:
            scheme = scheme_of(t)
            tensors.add_row(
                TensorName(t.name),
                t.storage,
                scheme.variant[1] if scheme.variant else "-",
                scheme.rank_text(t),
                f"{t.params.energy:.4f}" if t.params.energy is not None else "-",
                t.reason,
            )
        yield FittedTable(tensors)


def add_summary(result: AddResult) -> RenderableType:
    """What ``unipack add`` stored: projected vs raw tensors, the worst error, the bytes it cost,
    and, plainly, where the bundle's bases could not meet its error budget; for a LoRA adapter,
    then each module's form and error."""
    if not result.lora:
        return _add_table(result)
    modules = Table(title="modules of the added adapter", title_justify="left")
    modules.add_column("module")
    modules.add_column("stored as")
    modules.add_column("error", justify="right")
    modules.add_column("why")
    for o in result.outcomes:
        modules.add_row(o.tensor, o.kind, f"{o.error:.3g}", o.reason)
    return Group(_add_table(result), modules)


def _add_table(result: AddResult) -> Table:
    options = result.options
    t = Table(title="add summary", show_header=False, title_justify="left")
    t.add_row("member", f"{result.member} (from {result.record.source}, {format_bytes(result.record.source_bytes)})")
    if result.lora:
        kinds = sorted({o.kind for o in result.outcomes})
        t.add_row(
            "modules",
            ", ".join(f"{result.count(kind)} {LORA_KINDS.get(kind, kind)}" for kind in kinds)
            + f" (format v{result.format_version})",
        )
    else:
        t.add_row(
            "tensors",
            f"{result.count('projected')} projected onto the bundle's bases, {result.count('raw')} raw, "
            f"{result.count('exact')} identical to the bundle's exact copy, "
            f"{result.overrides} stored raw for this member (overrides)"
            # kinds a newer storage scheme adds (e.g. quantized deltas) are counted too, never dropped
            + "".join(f", {result.count(kind)} {kind}" for kind in _other_kinds(result)),
        )
    worst = f" ({result.worst_tensor})" if result.worst_tensor else " (every tensor bit-exact)"
    t.add_row("error", f"worst relative error {result.worst_error:.3g}{worst}")
    over = [o for o in result.outcomes if o.over_budget]
    within = "the records' forms" if result.lora else "the bundle's mean and bases"
    what = "module" if result.lora else "tensor"
    stored_as = "as the member's own factors" if result.lora else "raw"
    if options.rule != "max-error":
        t.add_row("budget", rule_text(options.to_dict()))
    elif over:
        t.add_row(
            "budget",
            f"{options.rule_text} not met within {within} for {len(over)} "
            f"{what}{'s' if len(over) != 1 else ''}: stored them "
            f"{stored_as} "
            f"(+{format_bytes(sum(o.stored_bytes for o in over))})",
            style="bold yellow",
        )
    else:
        t.add_row("budget", f"{options.rule_text} met within {within}")
    other = [o for o in result.outcomes if o.kind == "override" and not o.over_budget]
    if other:
        why = "its exact factors cost less" if result.lora else "exact copy differs, or NaN/inf values"
        t.add_row(
            "overrides",
            f"{len(other)} more stored raw ({why}): +{format_bytes(sum(o.stored_bytes for o in other))}",
        )
    t.add_row(
        "bytes",
        f"+{format_bytes(result.bytes_added)}: {result.path} is now "
        f"{format_bytes(result.file_bytes_after)} (was {format_bytes(result.file_bytes_before)})",
    )
    t.add_row(
        "ratio",
        f"{size_ratio(result.ratio)} than its inputs"
        + (
            f" (not counting the base model: {format_bytes(result.base_bytes)} referenced)"
            if result.base_bytes is not None
            else ""
        )
        + f", at worst relative error {result.bundle_worst_error:.3g} over all members",
    )
    return t


#: The outcome kinds of a LoRA adapter's records, in words.
LORA_KINDS = {
    "projected": "projected onto the bundle's bases",
    "quantized": "own factors quantized",
    "cast": "own factors cast",
    "factors": "own factors (the record's form)",
    "override": "own factors, bit-exact (overrides)",
    "untouched": "not adapted",
    "raw": "raw (heads, biases)",
}

#: The outcome kinds the add summary names in words.
NAMED_KINDS = ("projected", "raw", "exact", "override")


def _other_kinds(result: AddResult) -> list[str]:
    return sorted({o.kind for o in result.outcomes} - set(NAMED_KINDS))
