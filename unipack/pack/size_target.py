"""``merge --size 200MB`` / ``merge --bits 2.5``: the most faithful bundle that fits a size.

The error rule is the allocation: every tensor of every member is held to the same bounds,
relative to its own weight and to its own fine-tune (``--max-error``, ``--max-delta-error``),
and each tensor takes the cheapest storage that meets them. For the quantity the delta bound
measures (each tensor's error relative to what its fine-tune changed) this is the Lagrangian
allocation at high rate: an entropy-coded uniform quantizer spends log2(1/e) bits per element
for a relative error e, so equal marginal error per byte means equal e on every tensor, and
bytes go where the deltas are hard to code rather than equally to every tensor (which is what
the int-N alternatives of the report do; tests/test_size_target.py checks that at their bytes
the bundle's error is no larger).

So the search has one variable, a scale of the rule's bounds (as ``--max-drop``'s does), and
a monotone target: the bundle's file size. It is a secant search in (log scale, log size) from
the rule given (default: the default rule), bracketed once it straddles the target, that stops
at the first bundle between 99% and 100% of the target (or, after ``MAX_ATTEMPTS`` merges, at
the largest bundle that fits). Every attempt is a complete merge into a temporary file; the
chosen one is rewritten with the search recorded (``stats.size_target``) and the others are
deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from unipack.errors import InputError, OptionsError
from unipack.format.atomic import check_writable
from unipack.format.container import BundleWriter, rewrite_bundle
from unipack.format.manifest import Manifest
from unipack.options import MergeOptions, rule_text
from unipack.pack.dense import MergeProgress
from unipack.pack.executors import Execution
from unipack.pack.lora import adapter_sources
from unipack.pack.merge import MergeResult, merge, read_back
from unipack.sources.checkpoint import close_all, open_inputs

#: A bundle within this fraction below the target is close enough ("met within 1%").
TOLERANCE = 0.01
#: Complete merges the search may run (each costs one merge's time).
MAX_ATTEMPTS = 8
#: The loosest largest bound tried (rule bounds must stay below 1), and the tightest.
LOOSEST = 0.95
TIGHTEST = 1e-5
#: Outside a bracket, extrapolation uses at most this slope (a flatter measured one would
#: leap across the whole range) and moves the scale by at most e^MAX_STEP per attempt.
FLATTEST_SLOPE = -0.25
MAX_STEP = math.log(8.0)
#: Bytes a rewrite may add besides the record itself (header padding to 8 bytes, separators).
HEADER_SLACK = 64
#: d ln(size) / d ln(scale) assumed before two attempts give a measured one: quantized deltas at
#: ~2 bits per element save about 1/ln(2) / 2 of their size per e-fold of the bound.
FIRST_SLOPE = -0.7


@dataclasses.dataclass(frozen=True)
class SizeAttempt:
    max_error: float | None
    max_delta_error: float | None
    file_bytes: int

    @property
    def rule_text(self) -> str:
        return rule_text("max-error", max_error=_short(self.max_error), max_delta_error=_short(self.max_delta_error))


def _short(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def bits_target(paths: Sequence[str | os.PathLike[str]], bits: float, names: Sequence[str] | None = None) -> int:
    """``--bits B`` as bytes: B bits for every parameter of every input (all tensors, heads too)."""
    if not (math.isfinite(bits) and bits > 0):
        raise OptionsError(f"--bits {bits}: give a positive number of bits per parameter, e.g. 2.5")
    checkpoints = open_inputs([Path(p) for p in paths], list(names) if names is not None else None)
    try:
        params = sum(info.numel for c in checkpoints for info in c.tensors.values())
    finally:
        close_all(checkpoints)
    return max(1, int(params * bits / 8))


def merge_to_size(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    target_bytes: int,
    *,
    options: MergeOptions | None = None,
    names: Sequence[str] | None = None,
    force: bool = False,
    progress: MergeProgress | None = None,
    jobs: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    base: str | os.PathLike[str] | None = None,
    on_attempt: Callable[[SizeAttempt], None] | None = None,
) -> MergeResult:
    """Merge at the tightest scale of the error rule whose bundle fits in ``target_bytes``
    (``base``: as for ``merge``; the base is not counted in the size)."""
    Execution(executor, jobs, scheduler)  # refuses a bad --executor/--scheduler/--jobs before any work
    opts = options or MergeOptions()
    if opts.rule != "max-error":
        raise OptionsError(
            "--size/--bits choose the error bounds (--max-error, --max-delta-error); they cannot be "
            "combined with --rank or --energy"
        )
    if target_bytes < 1:
        raise OptionsError(f"--size {target_bytes}: must be at least 1 byte")
    started = time.perf_counter()
    out_path = Path(out)
    check_writable(out_path, force=force, inputs=paths)
    checkpoints = open_inputs([Path(p) for p in paths], list(names) if names is not None else None)
    try:
        adapters = adapter_sources(checkpoints) is not None
    finally:
        close_all(checkpoints)
    if adapters:  # as merge() does
        opts = opts.for_adapters()
    start = (opts.max_error, opts.max_delta_error)
    largest = max(b for b in start if b is not None)
    # The search record is written into the chosen bundle's manifest after the search: a trial
    # fits if it leaves room for the record of the attempts made so far (written as JSON; a
    # compressed manifest needs less).
    widest = 0.12345678901234567  # a float at its longest JSON form

    def room(attempts: Sequence[SizeAttempt]) -> int:
        record = _record(target_bytes, (widest, widest), attempts)
        return target_bytes - len(json.dumps({"size_target": record})) - HEADER_SLACK

    if room([SizeAttempt(widest, widest, target_bytes)]) < 1:
        raise OptionsError(f"--size {target_bytes}: too small for any bundle")
    aim_low = target_bytes * (1 - TOLERANCE)

    def readable(scale: float) -> float:
        """A scale near ``scale`` whose largest bound has 3 significant digits."""
        return float(f"{largest * scale:.3g}") / largest

    lowest, highest = TIGHTEST / largest, LOOSEST / largest
    attempts: list[SizeAttempt] = []
    trials: dict[float, Path] = {}
    try:

        def attempt(scale: float) -> int:
            trial = out_path.parent / f".{out_path.name}.size{len(attempts)}.upk"
            trials[scale] = trial  # before anything can fail, so the cleanup below always sees it
            max_error, max_delta_error = (None if b is None else b * scale for b in start)
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
            a = SizeAttempt(max_error, max_delta_error, result.file_bytes)
            attempts.append(a)
            if on_attempt:
                on_attempt(a)
            return result.file_bytes

        sizes: dict[float, int] = {}
        scale = 1.0
        while len(attempts) < MAX_ATTEMPTS:
            sizes[scale] = attempt(scale)
            aim_high = room(attempts)  # the largest trial that still fits once recorded
            if aim_low <= sizes[scale] <= aim_high:
                break
            aim = math.sqrt(aim_low * aim_high)
            step = _next_scale(sizes, aim, lowest, highest)
            if step is not None and readable(step) in sizes:  # too fine a step to read back
                step = _next_scale(sizes, aim, lowest, highest, bisect=True)
            if step is None or readable(step) in sizes:
                break
            scale = readable(step)
        fitting = [s for s, size in sizes.items() if size <= room(attempts)]
        if not fitting:
            smallest = min(sizes, key=lambda s: sizes[s])
            bounds_there = [None if b is None else b * smallest for b in start]
            # what it would take with the search record added (the record is part of the file)
            with_record = sizes[smallest] + target_bytes - room(attempts)
            found = SizeAttempt(bounds_there[0], bounds_there[1], with_record)
            raise InputError(
                f"--size {target_bytes} bytes: the smallest bundle found is {found.file_bytes} bytes, at "
                f"{found.rule_text} (loosest tried: {max(sizes) * largest:.3g}); give a larger size, or merge "
                f"fewer members"
            )
        chosen = max(fitting, key=lambda s: sizes[s])
        finest = chosen <= lowest * 1.01  # the tightest bounds fit: there is nothing finer to give
        bounds = tuple(None if b is None else b * chosen for b in start)

        def write(met: bool, *, again: bool = False) -> int:
            record = _record(target_bytes, bounds, attempts, met=met)

            def annotate(manifest: Manifest, writer: BundleWriter) -> Manifest:
                return dataclasses.replace(
                    manifest, blobs=writer.blobs, stats={**manifest.stats, "size_target": record}
                )

            # the second write replaces the first (our own output); the first honours --force
            return rewrite_bundle(trials[chosen], annotate, out=out_path, force=force or again)

        # "met" is judged on the file as written (the record itself adds a few hundred bytes),
        # so it is guessed first and, in the rare case the guess was wrong, written again.
        guess = finest or sizes[chosen] >= aim_low
        size = write(guess)
        if not finest and (size >= aim_low) != guess:
            size = write(not guess, again=True)
        return read_back(out_path, size, started)
    finally:
        for trial in trials.values():
            with contextlib.suppress(OSError):
                trial.unlink()


def _next_scale(
    sizes: dict[float, int], aim: float, lowest: float, highest: float, *, bisect: bool = False
) -> float | None:
    """The next scale to try, towards a bundle of ``aim`` bytes; None when there is none left.

    Sizes fall as the scale grows, but not strictly: where the chooser switches a tensor to
    another storage the curve jumps by a few tensors' worth. So the search keeps a bracket, the
    tightest scale that fits (``fit``) and the loosest tighter one still too large (``big``),
    and steps inside it by a secant in (ln scale, ln size), kept 10% away from its ends (or,
    with ``bisect``, to its geometric middle); outside a bracket it extrapolates from the
    nearest two points (slope ``FIRST_SLOPE`` until two points give a falling one), within the
    bounds' limits [``lowest``, ``highest``].
    """
    fitting = [s for s, size in sizes.items() if size <= aim]
    fit = min(fitting, default=None)
    big = max((s for s, size in sizes.items() if size > aim and (fit is None or s < fit)), default=None)
    if fit is not None and big is not None:
        low, high = math.log(big), math.log(fit)
        if bisect:
            return math.exp((low + high) / 2)
        slope = (math.log(sizes[fit]) - math.log(sizes[big])) / (high - low)
        x = low + (math.log(aim) - math.log(sizes[big])) / slope if slope < 0 else (low + high) / 2
        return math.exp(min(max(x, low + 0.1 * (high - low)), high - 0.1 * (high - low)))
    # No bracket: every point is too large (loosen) or every point fits (tighten).
    loosen = fit is None
    edge = max(sizes) if loosen else min(sizes)
    if (loosen and edge >= highest) or (not loosen and edge <= lowest):
        return None
    near = sorted(sizes, reverse=loosen)[:2]
    slope = FIRST_SLOPE
    if len(near) == 2:
        measured = (math.log(sizes[near[0]]) - math.log(sizes[near[1]])) / (math.log(near[0]) - math.log(near[1]))
        # a flat stretch (the chooser keeping its storage) says little about the slope beyond it
        slope = min(measured, FLATTEST_SLOPE)
    step = (math.log(aim) - math.log(sizes[edge])) / slope
    if bisect:  # the guess rounded onto a tried scale: move on by a fixed step
        step = math.log(2.0) if loosen else -math.log(2.0)
    guess = edge * math.exp(min(max(step, -MAX_STEP), MAX_STEP))
    return min(max(guess, lowest), highest)


def _record(
    target: int, bounds: tuple[float | None, ...] | None, attempts: Sequence[SizeAttempt], met: bool = True
) -> dict[str, object]:
    """``stats.size_target`` (spec §3.6)."""
    return {
        "target_bytes": target,
        "max_error": None if bounds is None else bounds[0],
        "max_delta_error": None if bounds is None else bounds[1],
        "met": met,
        "attempts": [dataclasses.asdict(a) for a in attempts],
    }
