"""``unipack demo``: the whole product on real fine-tunes, in a few minutes on a laptop CPU.

Builds (or reuses from the cache) a population of tiny ViTs fine-tuned on distinct tasks over
scikit-learn's UCI digits, merges them at the default budget, and prints ``unipack report`` with
the demo's own eval function, in brief (summary rows, the most expensive tensors, and the
held-out accuracy of every member as original vs unipack vs the mean alone vs per-member SVD at
equal bytes; ``--tensors``: the full report). Then it extracts every member back to .safetensors
and checks the files score the same, exports one member to ONNX through the demo's model factory
(checked by ONNX Runtime), adds a member held out of the merge with ``unipack add``, and shows a
few other budgets. Each of those seven steps is announced on stderr as ``i/7``; what they find
goes to stdout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from unipack.analysis.report import report
from unipack.api import open as open_bundle
from unipack.demo.population import Member
from unipack.export.onnx import export_onnx
from unipack.pack.add import add
from unipack.pack.merge import merge
from unipack.render.console import ProgressBars, add_summary, format_bytes, merge_summary
from unipack.render.report_view import compact_report_view, difference, report_view
from unipack.usercode import load_eval

#: Task heads have a different number of classes per member: store them raw, per member.
HEAD_PATTERN = "classifier.*"
#: The demo's eval hook and model factory, as a user would name them on the command line.
EVAL_SPEC = "unipack.demo.evaluate:evaluate"
MODEL_SPEC = "unipack.demo.model:build"
#: The demo's steps: population, merge, report, extract, ONNX export, held-out member, other budgets.
STEP_COUNT = 7


class Steps:
    """Announces the demo's steps on stderr as ``i/STEP_COUNT``, so that every step is numbered."""

    def __init__(self, err: Console) -> None:
        self._err = err
        self._done = 0

    def __call__(self, text: str) -> None:
        self._done += 1
        self._err.print(f"[bold]{self._done}/{STEP_COUNT}[/] {text}", highlight=False)


def run_demo(
    workdir: Path, cache_dir: Path | None, out: Console, err: Console, *, small: bool = False, tensors: bool = False
) -> dict[str, Any]:
    """Run the demo; ``small`` uses the tests' quick population (4 members, 1 layer); ``tensors``
    prints the full report (every member's errors, every tensor) instead of the brief one."""
    from safetensors.torch import load_file

    from unipack.demo import build_population, default_cache_dir, evaluate

    workdir.mkdir(parents=True, exist_ok=True)
    step = Steps(err)
    step(f"population of fine-tunes (cache: {cache_dir or default_cache_dir()})")
    started = time.perf_counter()
    members = build_population(cache_dir or default_cache_dir(), log=lambda s: err.print(f"  {s}"), small=small)
    err.print(f"  {len(members)} members ready in {time.perf_counter() - started:.1f} s")
    originals = members[0].path.parent

    bundle_path = workdir / "demo.upk"
    step(f"unipack merge {originals}/*.safetensors -o {bundle_path} --raw '{HEAD_PATTERN}'")
    bars = ProgressBars(err)
    try:
        result = merge([m.path for m in members], bundle_path, force=True, raw=(HEAD_PATTERN,), progress=bars)
    finally:
        bars.stop()
    out.print(merge_summary(result))

    step(f"unipack report {bundle_path}{' --tensors' if tensors else ''} --eval {EVAL_SPEC} --originals {originals}")
    with open_bundle(bundle_path) as bundle:
        rep = report(bundle, originals=originals, hook=load_eval(EVAL_SPEC))
        view = (
            report_view(rep, manifest=bundle.manifest, show_tensors=True)
            if tensors
            else compact_report_view(rep, more="unipack demo --tensors: every member's errors and every tensor")
        )
        for renderable in view:
            out.print(renderable)
        step(f"unipack extract {bundle_path} --all -o {workdir / 'members'}; the files score as the report says")
        extracted = bundle.extract_all(workdir / "members", force=True)
    assert rep.evaluation is not None
    scores = rep.evaluation["members"]
    for member, path in zip(members, extracted):
        again = evaluate(load_file(str(path)), member.name)["accuracy"]
        if again != scores[member.name]["unipack"]["accuracy"]:
            raise RuntimeError(
                f"{path}: scores {again} but the bundle's member scored {scores[member.name]['unipack']['accuracy']}"
            )
    err.print(f"  {len(extracted)} extracted files re-scored: identical to the report's unipack column")

    onnx_max_abs = _export_onnx(bundle_path, members[1].name, workdir, out, step)
    held_out = _held_out(members, workdir, out, step)
    sweep, sweep_rows = _budget_sweep(members, workdir, step)
    out.print(sweep)
    drops = rep.evaluation["drops"]
    worst_drop, mean_drop = drops["unipack"]["worst"], drops["mean-only"]["worst"]
    out.print(
        f"[bold]unipack:[/] {len(members)} members, {format_bytes(result.input_bytes)} -> "
        f"{format_bytes(result.file_bytes)} ({result.ratio:.2f}x) at the default budget, worst relative "
        f"error {result.worst_error:.3g} per tensor; largest accuracy drop {worst_drop:.2f} points. "
        f"The mean alone would be about {rep.bytes.inputs / rep.bytes.mean_only:.2f}x but loses up to "
        f"{mean_drop:.2f} points. A member held out of the merge and added later ({held_out['member']}) "
        f"costs {format_bytes(held_out['bytes_added'])} and scores {held_out['drop']:+.2f} points vs its original."
    )
    alternatives = rep.alternatives
    return {  # every figure the README's demo paragraph quotes (tools/readme_numbers.py checks them)
        "members": len(members),
        "input_bytes": result.input_bytes,
        "file_bytes": result.file_bytes,
        "ratio": result.ratio,
        "ratio_vs_lossless": rep.bytes.ratio_vs_lossless,
        "lossless_bytes": rep.bytes.lossless,
        # how the lossless baseline was measured, as `report` words it
        "lossless_how": f"zstd -{rep.bytes.lossless_level}"
        + (" of byte-grouped floats" if rep.bytes.lossless_grouped else ""),
        "worst_error": result.worst_error,
        "worst_drop": worst_drop,
        "mean_drop": drops["unipack"]["mean"],
        "mean_only_worst_drop": mean_drop,
        "parts": rep.bytes.parts,
        "alternatives": None
        if alternatives is None
        else {row.method: {"ratio": row.ratio, "tensors_met": row.tensors_met} for row in alternatives.rows},
        "smallest_met": None if alternatives is None else alternatives.smallest_met,
        "held_out": held_out,
        "onnx_max_abs": onnx_max_abs,
        "sweep": sweep_rows,
    }


def _export_onnx(bundle_path: Path, member: str, workdir: Path, out: Console, step: Steps) -> float:
    """One member to ONNX through the demo's own model factory, checked by ONNX Runtime; returns
    the largest absolute difference between ONNX Runtime and torch."""
    target = workdir / f"{member}.onnx"
    step(f"unipack export {bundle_path} --member {member} --onnx {target} --model {MODEL_SPEC}")
    with open_bundle(bundle_path) as bundle:
        check = export_onnx(bundle, member, target, model=MODEL_SPEC, force=True)
    for line in check.lines():
        out.print(line, highlight=False)
    return float(check.max_abs_diff)


def _held_out(members: list[Member], workdir: Path, out: Console, step: Steps) -> dict[str, Any]:
    """Merge all members but the last, then ``unipack add`` the last: how well do the others' bases
    serve a fine-tune they never saw? (``add`` stores raw whatever they cannot bring within budget.)"""
    from safetensors.torch import load_file

    from unipack.demo import evaluate

    *merged, last = members
    path = workdir / "held-out.upk"
    step(f"held-out member: merge {len(merged)} members, then unipack add {path} {last.path.name} --name {last.name}")
    merge([m.path for m in merged], path, force=True, raw=(HEAD_PATTERN,))
    result = add(path, last.path, name=last.name)
    out.print(add_summary(result))
    original = evaluate(load_file(str(last.path)), last.name)["accuracy"]
    with open_bundle(path) as bundle:
        added = evaluate(bundle.load(last.name), last.name)["accuracy"]
    out.print(
        f"{last.name} (added): held-out accuracy {added:.2f}% vs {original:.2f}% for its original "
        f"({added - original:+.2f} points)"
    )
    return {"member": last.name, "bytes_added": result.bytes_added, "drop": added - original}


#: Other budgets worth knowing about: (label, merge options).
SWEEP: tuple[tuple[str, dict[str, object]], ...] = (
    ("--max-error 0.02", {"max_error": 0.02}),
    ("--max-delta-error 0.5", {"max_delta_error": 0.5}),
    ("--no-quantize (the subspace alone)", {"quantize": False}),
    ("--rank 4", {"rank": 4}),
)


def _budget_sweep(members: list[Member], workdir: Path, step: Steps) -> tuple[Table, list[dict[str, Any]]]:
    """Ratio, weight error and accuracy drop for a few other budgets: the trade-off at a glance."""
    from safetensors.torch import load_file

    from unipack.demo import evaluate

    step("the same population at other budgets")
    original = {m.name: evaluate(load_file(str(m.path)), m.name)["accuracy"] for m in members}
    scale = max(original.values())  # drops are differences of accuracies of this size
    table = Table(title="other budgets (accuracy drop in points vs the originals)", title_justify="left")
    for col in ("merge options", "ratio", "worst rel. error", "largest drop", "mean drop"):
        table.add_column(col, justify="left" if col == "merge options" else "right")
    rows: list[dict[str, Any]] = []
    for label, options in SWEEP:
        result = merge([m.path for m in members], workdir / "sweep.upk", force=True, raw=(HEAD_PATTERN,), **options)  # type: ignore[arg-type]
        with open_bundle(result.path) as bundle:
            drops = [original[m.name] - evaluate(bundle.load(m.name), m.name)["accuracy"] for m in members]
        table.add_row(
            label,
            f"{result.ratio:.2f}x",
            f"{result.worst_error:.3g}",
            difference(max(drops), scale, ".2f"),
            difference(sum(drops) / len(drops), scale, ".2f"),
        )
        rows.append(
            {
                "options": label,
                "ratio": result.ratio,
                "worst_error": result.worst_error,
                "worst_drop": max(drops),
                "mean_drop": sum(drops) / len(drops),
            }
        )
    (workdir / "sweep.upk").unlink(missing_ok=True)
    return table, rows
