"""``unipack demo``: the whole product on real fine-tunes, in a few minutes on a laptop CPU.

Builds (or reuses from the cache) a population of tiny ViTs fine-tuned on distinct tasks over
scikit-learn's UCI digits, merges them at the default budget, prints ``info``, extracts every
member back to .safetensors, and scores each extracted member on its task's held-out split
next to the original and next to the plain mean (rank 0) as a baseline.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api.bundle import open as open_bundle
from ..api.merge import merge
from ..render import ProgressBars, format_bytes, info_table, merge_summary

#: Task heads have a different number of classes per member: store them raw, per member.
HEAD_PATTERN = "classifier.*"


def run_demo(workdir: Path, cache_dir: Path | None, out: Console, err: Console, *,
             small: bool = False) -> dict[str, float]:
    """Run the demo; ``small`` uses the tests' quick population (4 members, 1 layer)."""
    from safetensors.torch import load_file

    from . import build_population, default_cache_dir, evaluate

    workdir.mkdir(parents=True, exist_ok=True)
    err.print(f"[bold]1/4[/] population of fine-tunes (cache: {cache_dir or default_cache_dir()})")
    started = time.perf_counter()
    members = build_population(cache_dir or default_cache_dir(), log=lambda s: err.print(f"  {s}"), small=small)
    err.print(f"  {len(members)} members ready in {time.perf_counter() - started:.1f} s")

    err.print(f"[bold]2/4[/] unipack merge {len(members)} members -> {workdir / 'demo.upk'} (--raw '{HEAD_PATTERN}')")
    bars = ProgressBars(err)
    try:
        result = merge([m.path for m in members], workdir / "demo.upk", force=True, raw=(HEAD_PATTERN,),
                       progress=bars)
    finally:
        bars.stop()
    err.print(merge_summary(result))
    # The honest baseline: the mean alone (rank 0 everywhere, heads still raw).
    baseline = merge([m.path for m in members], workdir / "mean-only.upk", force=True, raw=(HEAD_PATTERN,),
                     rank=0)

    err.print(f"[bold]3/4[/] unipack info {result.path}")
    with open_bundle(result.path) as bundle:
        for renderable in info_table(bundle.summary()):
            out.print(renderable)
        err.print(f"[bold]4/4[/] unipack extract --all -> {workdir / 'members'}; scoring every member")
        extracted = bundle.extract_all(workdir / "members", force=True)
        errors = {m.name: max(m.errors) for m in bundle.manifest.members}

    table = Table(title="held-out accuracy (%): original vs unipack vs mean only", title_justify="left")
    for col in ("member", "classes", "original", "unipack", "Δ points", "mean only", "worst rel. error"):
        table.add_column(col, justify="left" if col == "member" else "right")
    worst_drop = mean_drop = 0.0
    with open_bundle(baseline.path) as mean_only:
        for member, path in zip(members, extracted):
            original = evaluate(load_file(str(member.path)), member.name)["accuracy"]
            packed = evaluate(load_file(str(path)), member.name)["accuracy"]
            mean_acc = evaluate(mean_only.load(member.name), member.name)["accuracy"]
            worst_drop = max(worst_drop, original - packed)
            mean_drop = max(mean_drop, original - mean_acc)
            table.add_row(member.name, str(member.task.num_labels), f"{original:.2f}", f"{packed:.2f}",
                          f"{packed - original:+.2f}", f"{mean_acc:.2f}", f"{errors[member.name]:.3g}")
    out.print(table)
    sweep = _budget_sweep(members, workdir, err)
    out.print(sweep)
    out.print(
        f"[bold]unipack:[/] {len(members)} members, {format_bytes(result.input_bytes)} -> "
        f"{format_bytes(result.file_bytes)} ({result.ratio:.2f}x) at the default budget, worst relative "
        f"error {result.worst_error:.3g} per tensor; largest accuracy drop {worst_drop:.2f} points. "
        f"The mean alone is {baseline.ratio:.2f}x but loses up to {mean_drop:.2f} points."
    )
    return {"ratio": result.ratio, "worst_error": result.worst_error, "worst_drop": worst_drop}


#: Other budgets worth knowing about: (label, merge options).
SWEEP: tuple[tuple[str, dict[str, object]], ...] = (
    ("--max-error 0.02", {"max_error": 0.02}),
    ("--max-error 0.05", {"max_error": 0.05}),
    ("--max-error 0.02 --dtype float16", {"max_error": 0.02, "dtype": "float16"}),
    ("--rank 4", {"rank": 4}),
)


def _budget_sweep(members: list, workdir: Path, err: Console) -> Table:  # type: ignore[type-arg]
    """Ratio, weight error and accuracy drop for a few other budgets: the trade-off at a glance."""
    from safetensors.torch import load_file

    from . import evaluate

    err.print("[bold]+[/] the same population at other budgets")
    original = {m.name: evaluate(load_file(str(m.path)), m.name)["accuracy"] for m in members}
    table = Table(title="other budgets (accuracy drop in points vs the originals)", title_justify="left")
    for col in ("merge options", "ratio", "worst rel. error", "largest drop", "mean drop"):
        table.add_column(col, justify="left" if col == "merge options" else "right")
    for label, options in SWEEP:
        result = merge([m.path for m in members], workdir / "sweep.upk", force=True, raw=(HEAD_PATTERN,),
                       **options)  # type: ignore[arg-type]
        with open_bundle(result.path) as bundle:
            drops = [original[m.name] - evaluate(bundle.load(m.name), m.name)["accuracy"] for m in members]
        table.add_row(label, f"{result.ratio:.2f}x", f"{result.worst_error:.3g}", f"{max(drops):.2f}",
                      f"{sum(drops) / len(drops):.2f}")
    (workdir / "sweep.upk").unlink(missing_ok=True)
    return table
