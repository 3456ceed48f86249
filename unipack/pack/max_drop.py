"""``merge --eval E --max-drop D``: choose the error budget by the metric users care about.

A weight-error budget is a proxy; what users want is "no member loses more than D accuracy
points" in the fewest bytes. Each attempt merges at a budget, scores every reconstructed member
with the user's eval hook, and the search moves the budget both ways from the one the user gave
(default: the default rule): while the target is missed it halves the budget (raising ranks and
bit widths exactly on the tensors short of it), down to budget 0 (every tensor stored raw or
exactly: a drop of 0 for a deterministic metric); while it is met it doubles the budget (fewer
bytes), up to ``LOOSEST``. Two bisection steps between the last passing and the first failing
budget then take back bytes. The budget is one scale applied to every bound the rule has
(``--max-error`` and ``--max-delta-error`` together).

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
from unipack.options import MergeOptions, rule_text
from unipack.pack.dense import MergeProgress
from unipack.pack.executors import Execution
from unipack.pack.lora import adapter_sources
from unipack.pack.merge import MergeResult, merge, read_back
from unipack.sources.checkpoint import close_all, default_name, open_inputs
from unipack.sources.url import as_input, local_inputs
from unipack.usercode import EvalHook, pick_metric

#: Budgets below this are treated as 0 (lossless): halving further would only add attempts.
SMALLEST_BUDGET = 1e-5
#: The loosest bound the search tries when the target is met (options require bounds below 1).
LOOSEST = 0.8
BISECTION_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Attempt:
    max_error: float | None
    worst_drop: float
    worst_member: str
    file_bytes: int
    max_delta_error: float | None = None

    @property
    def rule_text(self) -> str:
        return rule_text("max-error", max_error=_short(self.max_error), max_delta_error=_short(self.max_delta_error))


def _short(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


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
    jobs: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    base: str | os.PathLike[str] | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> MergeResult:
    """Merge, score every member with ``hook``, and (with ``max_drop``) tighten until within it.
    ``base``: as for ``merge``; every trial's members are scored rebuilt from it."""
    Execution(executor, jobs, scheduler)  # refuses a bad --executor/--scheduler/--jobs before any work
    opts = options or MergeOptions()
    if max_drop is not None and opts.rule != "max-error":
        raise OptionsError(
            "--max-drop chooses the error budget (--max-error, --max-delta-error); it cannot be combined with "
            "--rank or --energy"
        )
    if max_drop is not None and opts.tensor_bounds:
        # the search scales the rule's bounds; per-tensor ones would be left behind unscaled
        raise OptionsError("--max-drop scales the error bounds itself: give no tensor_bounds")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise OptionsError(f"--max-drop {max_drop}: must be a non-negative number (in the metric's units)")
    started = time.perf_counter()
    out_path = Path(out)
    check_writable(out_path, force=force, inputs=local_inputs(paths))
    member_names = list(names) if names is not None else [default_name(as_input(p)) for p in paths]
    originals, metric, adapters = _score_originals(paths, member_names, hook, metric)
    if adapters:  # as merge() does
        opts = opts.for_adapters()

    start = (opts.max_error, opts.max_delta_error)
    # The search's variable: one scale of the starting bounds (the largest bound reaches LOOSEST
    # at the top scale; budget 0 at scale 0).
    top = LOOSEST / max(b for b in start if b is not None) if any(start) else 1.0

    def bounds(scale: float) -> tuple[float | None, float | None]:
        return tuple(None if b is None else b * scale for b in start)  # type: ignore[return-value]

    def readable(scale: float) -> float:
        """A scale near ``scale`` whose largest bound has 3 significant digits (a budget a person
        can read back)."""
        largest = max(b for b in start if b is not None)
        return float(f"{largest * scale:.3g}") / largest

    def attempt(scale: float, index: int) -> tuple[Attempt, Path, dict[str, dict[str, float]]]:
        trial = out_path.parent / f".{out_path.name}.attempt{index}.upk"
        trials.append(trial)  # before anything can fail, so the cleanup below always sees it
        max_error, max_delta_error = bounds(scale)
        result = merge(
            paths,
            trial,
            options=dataclasses.replace(opts, max_error=max_error, max_delta_error=max_delta_error),
            names=names,
            force=True,
            progress=progress,
            jobs=jobs,
            executor=executor,
            scheduler=scheduler,
            base=base,
        )
        with BundleReader(trial, base=base if result.manifest.base is not None else None) as b:
            scores = {name: hook(b.load(name), name) for name in b.members}
        drops = {name: originals[name][metric] - scores[name].get(metric, -math.inf) for name in scores}
        worst = max(drops, key=drops.__getitem__)
        a = Attempt(max_error, drops[worst], worst, result.file_bytes, max_delta_error)
        if on_attempt:
            on_attempt(a)
        return a, trial, scores

    attempts: list[Attempt] = []
    trials: list[Path] = []
    try:
        scale = 1.0 if any(start) else 0.0
        best = None
        passing_scale = failing = None
        a, trial, scores = attempt(scale, 0)
        attempts.append(a)
        if max_drop is None or a.worst_drop <= max_drop:
            best, passing_scale = (a, trial, scores), scale
            # Met at the budget given: loosen while it stays met (fewer bytes).
            while max_drop is not None and 0 < scale < top:
                scale = min(scale * 2, top)
                a, trial, scores = attempt(scale, len(attempts))
                attempts.append(a)
                if a.worst_drop > max_drop:
                    failing = scale
                    break
                best, passing_scale = (a, trial, scores), scale
        else:
            # Missed: tighten until met, or until budget 0.
            while True:
                failing = scale
                scale = scale / 2 if max(b or 0.0 for b in bounds(scale / 2)) >= SMALLEST_BUDGET else 0.0
                a, trial, scores = attempt(scale, len(attempts))
                attempts.append(a)
                if a.worst_drop <= max_drop:
                    best, passing_scale = (a, trial, scores), scale
                    break
                if scale == 0.0:
                    best, passing_scale = (a, trial, scores), 0.0  # even lossless misses: not deterministic
                    failing = None
                    break
        if failing is not None and max_drop is not None and passing_scale:
            low, high = passing_scale, failing  # low passes, high fails
            for _ in range(BISECTION_STEPS):
                mid = readable(math.sqrt(low * high))
                a, trial, scores = attempt(mid, len(attempts))
                attempts.append(a)
                if a.worst_drop <= max_drop:
                    low, best = mid, (a, trial, scores)
                else:
                    high = mid
        assert best is not None
        chosen, trial, scores = best
        record = {
            "eval": hook.spec,
            "metric": metric,
            "max_drop": max_drop,
            "max_error": chosen.max_error,
            "max_delta_error": chosen.max_delta_error,
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
        return read_back(out_path, size, started)
    finally:
        for trial in trials:
            with contextlib.suppress(OSError):
                trial.unlink()


def _score_originals(
    paths: Sequence[str | os.PathLike[str]], names: list[str], hook: EvalHook, metric: str | None
) -> tuple[dict[str, dict[str, float]], str, bool]:
    """Every original's scores, the metric, and whether the inputs are LoRA adapters."""
    checkpoints = open_inputs([as_input(p) for p in paths], names)
    try:
        scores = {c.name: hook(c.state_dict(), c.name) for c in checkpoints}
        adapters = adapter_sources(checkpoints) is not None
    finally:
        close_all(checkpoints)
    chosen = pick_metric(next(iter(scores.values())), metric, hook.spec)
    for name, s in scores.items():
        if chosen not in s:
            raise EvalError(f"eval {hook.spec}: metric {chosen!r} missing for member {name!r}")
    return scores, chosen, adapters
