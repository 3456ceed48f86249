"""``merge --eval E --max-drop D``: choose ranks by the metric users care about.

A weight-error budget is a proxy; what users want is "no member loses more than D accuracy
points". Starting from the error budget the user gave (``--max-error``, default 0.01), each
attempt merges, scores every reconstructed member with the user's eval hook, and tightens the
budget (halving it, which raises ranks on exactly the tensors that were short of it) until every
member's drop from its original is within D. Two bisection steps between the last failing and
the first passing budget then take back bytes the halving over-spent. Tightening ends, at
worst, at budget 0: every tensor stored raw or exactly, a drop of 0 for a deterministic metric.

The chosen budget, the target, every attempt, and each member's original and reconstructed
scores are recorded in the bundle's manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from unipack.bundle.reader import BundleReader
from unipack.errors import EvalError, OptionsError
from unipack.format.atomic import check_writable
from unipack.format.container import BundleWriter, rewrite_bundle
from unipack.format.manifest import Manifest
from unipack.options import MergeOptions
from unipack.pack.dense import MergeProgress
from unipack.pack.merge import MergeResult, merge, peak_rss_bytes
from unipack.sources.checkpoint import close_all, default_name, open_inputs
from unipack.usercode import EvalHook, pick_metric

#: Budgets below this are treated as 0 (lossless): halving further would only add attempts.
SMALLEST_BUDGET = 1e-5
BISECTION_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Attempt:
    max_error: float
    worst_drop: float
    worst_member: str
    file_bytes: int


def merge_with_eval(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    hook: EvalHook,
    *,
    max_drop: float | None,
    metric: str | None = None,
    options: MergeOptions | None = None,
    names: Sequence[str] | None = None,
    force: bool = False,
    progress: MergeProgress | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> MergeResult:
    """Merge, score every member with ``hook``, and (with ``max_drop``) tighten until within it."""
    opts = options or MergeOptions()
    if max_drop is not None and opts.rule != "max-error":
        raise OptionsError("--max-drop chooses the --max-error budget; it cannot be combined with --rank or --energy")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise OptionsError(f"--max-drop {max_drop}: must be a non-negative number (in the metric's units)")
    started = time.perf_counter()
    out_path = Path(out)
    check_writable(out_path, force=force)
    member_names = list(names) if names is not None else [default_name(Path(p)) for p in paths]
    originals, metric = _score_originals(paths, member_names, hook, metric)

    def attempt(budget: float, index: int) -> tuple[Attempt, Path, dict[str, dict[str, float]]]:
        trial = out_path.parent / f".{out_path.name}.attempt{index}.upk"
        trials.append(trial)  # before anything can fail, so the cleanup below always sees it
        result = merge(
            paths,
            trial,
            options=dataclasses.replace(opts, max_error=budget),
            names=names,
            force=True,
            progress=progress,
        )
        with BundleReader(trial) as b:
            scores = {name: hook(b.load(name), name) for name in b.members}
        drops = {name: originals[name][metric] - scores[name].get(metric, -math.inf) for name in scores}
        worst = max(drops, key=drops.__getitem__)
        a = Attempt(budget, drops[worst], worst, result.file_bytes)
        if on_attempt:
            on_attempt(a)
        return a, trial, scores

    attempts: list[Attempt] = []
    trials: list[Path] = []
    try:
        budget = float(opts.max_error or 0.0)
        best = None
        failing = None
        while True:
            a, trial, scores = attempt(budget, len(attempts))
            attempts.append(a)
            if max_drop is None or a.worst_drop <= max_drop:
                best = (a, trial, scores)
                break
            failing = budget
            budget = budget / 2 if budget / 2 >= SMALLEST_BUDGET else 0.0
            if failing == 0.0:
                best = (a, trial, scores)  # even lossless misses: the metric is not deterministic
                break
        if failing is not None and max_drop is not None and best[0].max_error > 0:
            low, high = best[0].max_error, failing  # low passes, high fails
            for _ in range(BISECTION_STEPS):
                mid = float(f"{math.sqrt(low * high):.3g}")  # a budget a person can read back
                a, trial, scores = attempt(mid, len(attempts))
                attempts.append(a)
                if a.worst_drop <= max_drop:
                    low, best = mid, (a, trial, scores)
                else:
                    high = mid
        chosen, trial, scores = best
        record = {
            "eval": hook.spec,
            "metric": metric,
            "max_drop": max_drop,
            "max_error": chosen.max_error,
            "worst_drop": chosen.worst_drop,
            "worst_member": chosen.worst_member,
            "met": max_drop is None or chosen.worst_drop <= max_drop,
            "attempts": [dataclasses.asdict(x) for x in attempts],
        }

        def annotate(manifest: Manifest, writer: BundleWriter) -> Manifest:
            members = tuple(
                dataclasses.replace(m, metrics={"original": originals[m.name], "unipack": scores[m.name]})
                for m in manifest.members
            )
            return dataclasses.replace(
                manifest, members=members, blobs=writer.blobs, stats={**manifest.stats, "evaluation": record}
            )

        size = rewrite_bundle(trial, annotate, out=out_path, force=force)
        with BundleReader(out_path) as b:
            manifest = b.manifest
        return MergeResult(
            out_path,
            size,
            int(manifest.stats["input_bytes"]),
            manifest,
            time.perf_counter() - started,
            peak_rss_bytes(),
        )
    finally:
        for trial in trials:
            with contextlib.suppress(OSError):
                trial.unlink()


def _score_originals(
    paths: Sequence[str | os.PathLike[str]], names: list[str], hook: EvalHook, metric: str | None
) -> tuple[dict[str, dict[str, float]], str]:
    checkpoints = open_inputs([Path(p) for p in paths], names)
    try:
        scores = {c.name: hook(c.state_dict(), c.name) for c in checkpoints}
    finally:
        close_all(checkpoints)
    chosen = pick_metric(next(iter(scores.values())), metric, hook.spec)
    for name, s in scores.items():
        if chosen not in s:
            raise EvalError(f"eval {hook.spec}: metric {chosen!r} missing for member {name!r}")
    return scores, chosen
