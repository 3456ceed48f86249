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

Sizes are not continuous in the scale: where the chooser switches a tensor's storage or level
count the bundle jumps by that tensor's worth, and a target inside a jump leaves the search a few
% short. Then the bounds are allocated per tensor (``_plan``). A tensor's storage depends only on
its own bounds, so a bundle in which each tensor takes the bounds of one of the attempts holds,
for that tensor, exactly what that attempt held: the same errors (``_tensor_errors``: recorded
error times norm, squared, summed over members), the same blobs of its own; only the members'
codes and coefficient blobs, which pack every tensor together (one zstd frame), mix them. So the
bytes of such a pick are priced by assembling those blobs from the attempts' parts and
compressing them as the writer would (``_Assembly``). Each tensor's step to a tighter attempt
is priced alone (``_priced``; a tensor's share of a blob is not what it adds to it), the steps
are taken greedily by error saved per byte along each tensor's lower convex hull of the attempts
and then any that still fits (``_allocate``: the Lagrangian fill of the multiple-choice
knapsack), and the whole pick priced again (cut back, by bisection over the steps in order, to
what fits). One more merge with those bounds per tensor (``MergeOptions.tensor_bounds``) is kept
if it fits, is larger, and its total squared error is no larger than the uniform bundle's; a
second corrects the first's estimate where it missed the 1% (``ALLOCATION_ATTEMPTS``). The
rule's bounds recorded are the loosest any tensor took, so they still hold for every tensor.
LoRA adapter collections keep the uniform search: their modules are stored by ``pack/lora.py``,
which takes one rule for all.
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

import numpy as np

from unipack.errors import InputError, OptionsError
from unipack.format import codec, dtypes
from unipack.format.atomic import check_writable
from unipack.format.container import BundleFile, BundleWriter, blob_level, rewrite_bundle
from unipack.format.manifest import Manifest, code_runs
from unipack.options import MergeOptions, rule_text, tensor_bounds_doc
from unipack.pack.dense import MergeProgress, chunk_bytes_for
from unipack.pack.executors import Execution
from unipack.pack.lora import adapter_sources
from unipack.pack.merge import MergeResult, merge, read_back
from unipack.sources.checkpoint import close_all, open_inputs
from unipack.sources.url import as_input, local_inputs

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
#: Merges with bounds per tensor after the scale search, when it ended short of the 1% (a jump).
ALLOCATION_ATTEMPTS = 2
#: The first allocation aims this share of the 1% band below the largest size that fits (its
#: per-tensor bytes are estimates: room both ways).
ALLOCATION_AIM = 0.1
#: Steps (a tensor at another attempt's bounds) are priced exactly, each by compressing the
#: members' codes and coefficient blobs once more (``_priced``), where that compresses at most
#: this many bytes in all; beyond, they are estimated (``_profile``) and only the plans priced.
PRICED_BYTES = 1 << 30

TensorBounds = tuple[tuple[str, float | None, float | None], ...]


@dataclasses.dataclass(frozen=True)
class SizeAttempt:
    max_error: float | None
    max_delta_error: float | None
    file_bytes: int
    #: An allocation's merge: the tensors it gave other bounds than ``max_error`` and
    #: ``max_delta_error`` (``MergeOptions.tensor_bounds``) and the size it was estimated at;
    #: None for an attempt of the scale search.
    tensor_bounds: TensorBounds | None = None
    estimated_bytes: int | None = None

    @property
    def rule_text(self) -> str:
        text = rule_text("max-error", max_error=_short(self.max_error), max_delta_error=_short(self.max_delta_error))
        if self.tensor_bounds is not None:
            text += f", {len(self.tensor_bounds)} tensors tighter (allocated per tensor)"
        return text

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "max_error": self.max_error,
            "max_delta_error": self.max_delta_error,
            "file_bytes": self.file_bytes,
        }
        if self.tensor_bounds is not None:
            d["tensor_bounds"] = tensor_bounds_doc(self.tensor_bounds)
            d["estimated_bytes"] = self.estimated_bytes
        return d


def _short(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def bits_target(paths: Sequence[str | os.PathLike[str]], bits: float, names: Sequence[str] | None = None) -> int:
    """``--bits B`` as bytes: B bits for every parameter of every input (all tensors, heads too)."""
    if not (math.isfinite(bits) and bits > 0):
        raise OptionsError(f"--bits {bits}: give a positive number of bits per parameter, e.g. 2.5")
    checkpoints = open_inputs([as_input(p) for p in paths], list(names) if names is not None else None)
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
    allocate: bool = True,
) -> MergeResult:
    """Merge at the tightest scale of the error rule whose bundle fits in ``target_bytes``
    (``base``: as for ``merge``; the base is not counted in the size); where that leaves the
    bundle more than 1% short, with bounds allocated per tensor (``allocate=False``: never)."""
    Execution(executor, jobs, scheduler)  # refuses a bad --executor/--scheduler/--jobs before any work
    opts = options or MergeOptions()
    if opts.rule != "max-error":
        raise OptionsError(
            "--size/--bits choose the error bounds (--max-error, --max-delta-error); they cannot be "
            "combined with --rank or --energy"
        )
    if opts.tensor_bounds:
        raise OptionsError("--size/--bits allocate the bounds per tensor themselves: give no tensor_bounds")
    if target_bytes < 1:
        raise OptionsError(f"--size {target_bytes}: must be at least 1 byte")
    started = time.perf_counter()
    out_path = Path(out)
    check_writable(out_path, force=force, inputs=local_inputs(paths))  # -o onto an input would destroy it
    checkpoints = open_inputs([as_input(p) for p in paths], list(names) if names is not None else None)
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
        record = _record(target_bytes, (widest, widest), attempts, allocated=2**31)
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

        def run(
            scale: float, key: float | None = None, tensor_bounds: TensorBounds = (), estimated: int | None = None
        ) -> int:
            """A merge at ``scale`` of the rule (``tensor_bounds``: for the tensors named), its
            trial file in ``trials`` under ``key`` (default: ``scale``)."""
            trial = out_path.parent / f".{out_path.name}.size{len(attempts)}.upk"
            # before anything can fail, so the cleanup below always sees it
            trials[scale if key is None else key] = trial
            max_error, max_delta_error = _bounds_at(start, scale)
            result = merge(
                paths,
                trial,
                options=dataclasses.replace(
                    opts, max_error=max_error, max_delta_error=max_delta_error, tensor_bounds=tensor_bounds
                ),
                names=names,
                force=True,
                progress=progress,
                jobs=jobs,
                executor=executor,
                scheduler=scheduler,
                base=base,
            )
            allocation = tensor_bounds if estimated is not None else None
            a = SizeAttempt(max_error, max_delta_error, result.file_bytes, allocation, estimated)
            attempts.append(a)
            if on_attempt:
                on_attempt(a)
            return result.file_bytes

        sizes: dict[float, int] = {}
        scale = 1.0
        while len(attempts) < MAX_ATTEMPTS:
            sizes[scale] = run(scale)
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
            bounds_there = _bounds_at(start, smallest)
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
        chosen_bounds: TensorBounds = ()
        tighter = any(s < chosen for s in sizes)  # an attempt to take tensors' bounds from
        if allocate and tighter and not adapters and not finest and sizes[chosen] < aim_low:
            # Sizes here are trial files' (no record yet), held against room(): the file once the
            # record is written is within 1% below the target when its trial is within
            # band = target - aim_low below the room.
            profiles = {s: _profile(trials[s]) for s in sizes}

            def group_bytes(scale: float) -> int:
                """An entry of ``tensor_bounds`` without its names, as the manifest holds it (a
                JSON string: quotes escaped), twice (the options, and the search record)."""
                e, d = _bounds_at(start, scale)
                return 2 * len(json.dumps(json.dumps({"max_error": e, "max_delta_error": d, "tensors": []}) + ", "))

            uniform, best, from_scale = _squared_error(profiles[chosen]), sizes[chosen], chosen
            band = target_bytes - aim_low
            correction = 0
            planned: list[dict[str, float]] = []
            with _Assembly({s: trials[s] for s in sizes}, chosen, chunk_bytes_for(opts)) as assembly:
                for _ in range(ALLOCATION_ATTEMPTS):
                    upper = room([*attempts, SizeAttempt(widest, widest, target_bytes, (), target_bytes)])
                    budget = int(upper - ALLOCATION_AIM * band) - correction
                    plan = _plan(profiles, assembly, from_scale, budget, group_bytes)
                    if plan is None:
                        break
                    per_tensor, estimated = plan
                    if per_tensor in planned:  # the correction changed nothing: no merge to learn from
                        break
                    planned.append(per_tensor)
                    loosest = max(per_tensor.values())
                    key = -float(len(attempts))  # a key of its own in ``trials`` (scales are positive)
                    size = run(loosest, key, _tensor_bounds(start, loosest, per_tensor), estimated)
                    fits = size <= room(attempts)
                    if fits and size > best and _manifest_error(trials[key]) <= uniform:
                        best, chosen, chosen_bounds = size, key, attempts[-1].tensor_bounds or ()
                        sizes[key] = size
                    if fits and size >= room(attempts) - band:
                        break
                    correction += size - estimated  # the next aims where this one's estimate would have landed
        bounds = _bounds_at(start, chosen) if chosen > 0 else _kept_bounds(attempts, chosen)

        def write(met: bool, *, again: bool = False) -> int:
            record = _record(target_bytes, bounds, attempts, met=met, allocated=len(chosen_bounds))

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
        for trial in set(trials.values()):
            with contextlib.suppress(OSError):
                trial.unlink()


def _bounds_at(start: tuple[float | None, float | None], scale: float) -> tuple[float | None, float | None]:
    max_error, max_delta_error = (None if b is None else b * scale for b in start)
    return max_error, max_delta_error


def _kept_bounds(attempts: Sequence[SizeAttempt], key: float) -> tuple[float | None, float | None]:
    """The rule's bounds of the allocation attempt ``key`` (minus its index) ran."""
    a = attempts[int(-key)]
    return a.max_error, a.max_delta_error


def _tensor_bounds(
    start: tuple[float | None, float | None], loosest: float, per_tensor: dict[str, float]
) -> TensorBounds:
    """``MergeOptions.tensor_bounds`` for tensors at their own scale (the others at ``loosest``),
    each bound exactly as the attempt at that scale computed it."""
    return tuple(sorted((name, *_bounds_at(start, s)) for name, s in per_tensor.items() if s != loosest))


@dataclasses.dataclass(frozen=True)
class TensorCost:
    """What one tensor took in one attempt: its bytes (estimated where blobs are shared) and its
    squared error summed over members, sum ||W - What||^2."""

    nbytes: float
    squared_error: float


@dataclasses.dataclass(frozen=True)
class Profile:
    """A trial bundle per tensor (``costs``), and its bytes that belong to no tensor (header,
    manifest: ``fixed``)."""

    costs: dict[str, TensorCost]
    fixed: int


def _profile(path: Path) -> Profile:
    """Each tensor's bytes and squared error in the bundle at ``path``.

    Blobs a tensor owns (its mean, basis, exact copy, a member's raw copy or residual) count as
    stored. A member's coefficient and codes blobs hold every tensor's part in one stream: each
    part is compressed alone (as the writer would: same codec, level, shuffling) and the blob's
    stored bytes shared out in proportion. Errors: each member's recorded relative error times
    its recorded norm (both rounded up to 3 digits in the manifest).
    """
    with BundleFile(path) as bundle:
        manifest = bundle.manifest
        stored = {name: e.nbytes for name, e in bundle.header.tensors.items()}
        nbytes = {n: float(b) for n, b in _owned_bytes(bundle).items()}
        level = int(manifest.options.get("zstd_level") or 3)
        name_of = str(manifest.options.get("codec") or "zstd")
        for m in manifest.members:
            shared = [
                (m.coefficients, manifest.coef_offsets(m)),
                (m.codes, manifest.code_offsets(m)),
            ]
            for blob, offsets in shared:
                if blob is None or not offsets:
                    continue
                dtype = manifest.blobs[blob].dtype
                size = dtypes.itemsize(dtype)
                array = np.asarray(bundle.read_blob(blob)).reshape(-1)
                level_here = blob_level(dtype, level)
                alone = {
                    tensor: len(codec.encode(dtypes.to_bytes(array[lo:hi], dtype), size, name_of, level_here)[0])
                    for tensor, (lo, hi) in offsets.items()
                }
                total = sum(alone.values()) or 1
                for tensor, n in alone.items():
                    nbytes[tensor] += stored[blob] * n / total
        errors = _tensor_errors(manifest)
        fixed = bundle.header.file_size - sum(stored.values())
    return Profile({n: TensorCost(nbytes[n], errors[n]) for n in nbytes}, fixed)


def _tensor_errors(manifest: Manifest) -> dict[str, float]:
    """Each tensor's squared error summed over members, sum ||W - What||^2, from the recorded
    relative errors and norms (both rounded up to 3 digits in the manifest)."""
    errors = dict.fromkeys((t.name for t in manifest.tensors), 0.0)
    for m in manifest.members:
        fidelity = m.fidelity
        for i, t in enumerate(manifest.tensors):
            norm = fidelity.norms[i] if fidelity is not None else 0.0
            errors[t.name] += (m.errors[i] * norm) ** 2
    return errors


def _manifest_error(path: Path) -> float:
    with BundleFile(path) as bundle:
        return sum(_tensor_errors(bundle.manifest).values())


def _squared_error(profile: Profile) -> float:
    return sum(c.squared_error for c in profile.costs.values())


def _plan(
    profiles: dict[float, Profile],
    assembly: _Assembly,
    chosen: float,
    budget: int,
    group_bytes: Callable[[float], int],
) -> tuple[dict[str, float], int] | None:
    """Each tensor's scale for a bundle within ``budget`` (room() bytes: the trial and the names
    its record adds) with less total squared error than the uniform one at ``chosen``, and the
    trial file's bytes it is priced at; None where no tensor can be tightened within it.

    ``_allocate`` orders the steps by their estimated bytes; each pick is then priced exactly by
    ``assembly`` (the blobs it would store, compressed): where the steps' estimate fell short of
    the budget, once more with the shortfall given; where over it, the longest run of the steps
    (in their order) that fits, by bisection.
    """
    reference = {name: chosen for name in profiles[chosen].costs}
    errors = {s: {n: c.squared_error for n, c in p.costs.items()} for s, p in profiles.items()}

    def priced(moves: Sequence[tuple[str, float]]) -> tuple[dict[str, float], int, int]:
        pick = dict(reference)
        pick.update(moves)
        names = _Recorded(pick, group_bytes).bytes_with(None, 0.0)
        trial = assembly.nbytes(pick) + names // 2
        return pick, trial, trial + names - names // 2

    def error(pick: dict[str, float]) -> float:
        return sum(errors[s][n] for n, s in pick.items())

    uniform = error(reference)
    profiles = _priced(profiles, assembly, chosen)
    best: tuple[dict[str, float], int] | None = None
    given = budget
    for _ in range(2):
        moves = _allocate(profiles, chosen, given, group_bytes)
        if not moves:
            break
        pick, trial, total = priced(moves)
        if total > budget:  # the longest run of the steps that fits (the empty run does)
            fit, over = 0, len(moves)
            while over - fit > 1:
                middle = (fit + over) // 2
                if priced(moves[:middle])[2] <= budget:
                    fit = middle
                else:
                    over = middle
            pick, trial, total = priced(moves[:fit])
        if error(pick) < (error(best[0]) if best is not None else uniform) and total <= budget:
            best = pick, trial
        if total >= budget or given > budget:
            break
        given += budget - total  # priced below the budget (the estimate was high): give it what is left
    return best


def _priced(profiles: dict[float, Profile], assembly: _Assembly, chosen: float) -> dict[float, Profile]:
    """``profiles`` with each tensor's bytes at each scale that would lower its error replaced by
    what the bundle at ``chosen`` grows by when that tensor alone takes that scale, priced
    exactly by ``assembly``, where that compresses at most ``PRICED_BYTES``. A tensor's
    share of a codes blob is not what it adds to it: the blob's zstd block shares one literal
    table between every tensor of a level count (on the test population, a layer's step cost
    0.4x its share, the embedding's 3.6x)."""
    reference = {name: chosen for name in profiles[chosen].costs}
    steps = [
        (s, n)
        for s, p in profiles.items()
        if s != chosen
        for n, c in p.costs.items()
        if c.squared_error < profiles[chosen].costs[n].squared_error
    ]
    if not steps or len(steps) * assembly.shared_bytes > PRICED_BYTES:
        return profiles
    base = assembly.nbytes(reference)
    costs = {s: dict(p.costs) for s, p in profiles.items()}
    for s, n in steps:
        grown = assembly.nbytes({**reference, n: s}) - base
        costs[s][n] = TensorCost(profiles[chosen].costs[n].nbytes + grown, costs[s][n].squared_error)
    return {s: Profile(costs[s], p.fixed) for s, p in profiles.items()}


def _allocate(
    profiles: dict[float, Profile], chosen: float, budget: int, group_bytes: Callable[[float], int]
) -> list[tuple[str, float]]:
    """The steps ``(tensor, scale)`` that tighten tensors from the uniform bundle at ``chosen``
    to other attempts' bounds, in the order taken, for a bundle of at most ``budget`` bytes by
    their estimated bytes (``Profile``) with the least total squared error.

    A greedy fill of the multiple-choice knapsack: steps along each tensor's lower convex hull of
    (bytes, error) over the attempts, in order of error saved per byte while the estimate fits
    (Lagrangian: the steps taken are those worth more than the last one's price), then what is
    left filled with the best step to any attempt (on the hull or not) that still fits. The
    estimate is the uniform bundle's fixed bytes and the tensors' bytes at their scales, plus the
    bytes the per-tensor bounds add to the manifest (``_Recorded``).
    """
    scales = sorted(s for s in profiles if s > 0)
    names = list(profiles[chosen].costs)
    fixed = profiles[chosen].fixed

    def point(name: str, s: float) -> tuple[float, float, float]:
        c = profiles[s].costs[name]
        return c.nbytes, c.squared_error, s

    pick = dict.fromkeys(names, chosen)
    chains: dict[str, list[tuple[float, float, float]]] = {}
    for name in names:
        first = point(name, chosen)
        points = [point(name, s) for s in scales]
        # (an attempt smaller and better is taken by the fill below, its names counted)
        chains[name] = _lower_hull(first, [p for p in points if p[0] > first[0] and p[1] < first[1]])
    used = sum(chains[n][0][0] for n in names)
    recorded = _Recorded(pick, group_bytes)
    taken: list[tuple[str, float]] = []
    steps = sorted(
        (
            ((a[1] - b[1]) / (b[0] - a[0]), name, k)
            for name, chain in chains.items()
            for k, (a, b) in enumerate(zip(chain, chain[1:]), start=1)
        ),
        key=lambda step: (-step[0], step[1], step[2]),
    )
    at = dict.fromkeys(names, 0)
    blocked: set[str] = set()
    for _, name, k in steps:
        if name in blocked or at[name] != k - 1:
            continue
        chain = chains[name]
        grow = chain[k][0] - chain[k - 1][0]
        if fixed + used + grow + recorded.bytes_with(name, chain[k][2]) > budget:
            blocked.add(name)  # its later steps depend on this one
            continue
        used += grow
        at[name] = k
        recorded.move(name, chain[k][2])
        taken.append((name, chain[k][2]))
    # What is left: steps to any attempt (on the hull or not) that still fit, the most error saved
    # per byte first, in passes until none is taken (a pass moves each tensor at most once).
    moved = True
    while moved:
        moved = False
        candidates = sorted(
            (
                ((now[1] - p[1]) / max(p[0] - now[0], 1.0), name, p)
                for name in names
                for now in [point(name, pick[name])]
                for p in (point(name, s) for s in scales)
                if p[1] < now[1]
            ),
            key=lambda m: (-m[0], m[1], m[2][2]),
        )
        done: set[str] = set()
        for _, name, p in candidates:
            grow = p[0] - point(name, pick[name])[0]
            if name in done or fixed + used + grow + recorded.bytes_with(name, p[2]) > budget:
                continue
            used += grow
            recorded.move(name, p[2])
            taken.append((name, p[2]))
            done.add(name)
            moved = True
    return taken


class _Assembly:
    """The attempts' bundles, open, to price a pick of a scale per tensor exactly: each tensor's
    own blobs (mean, basis, raw copies) as its attempt stored them, and each member's codes and
    coefficient blobs assembled from the attempts' parts and compressed as the writer would. Its
    header and manifest are taken to be the reference attempt's (they differ by the tensors'
    reasons and the codes' parts: a few bytes each)."""

    def __init__(self, paths: dict[float, Path], reference: float, chunk_bytes: int | None) -> None:
        self.files: dict[float, BundleFile] = {}
        try:
            for s, path in paths.items():
                self.files[s] = BundleFile(path)
        except BaseException:
            self.close()
            raise
        ref = self.files[reference]
        self.names = [t.name for t in ref.manifest.tensors]
        self.members = len(ref.manifest.members)
        self.fixed = ref.header.file_size - sum(e.nbytes for e in ref.header.tensors.values())
        self.codec = str(ref.manifest.options.get("codec") or "zstd")
        self.level = int(ref.manifest.options.get("zstd_level") or 3)
        self.chunk_bytes = chunk_bytes
        self.owned = {s: _owned_bytes(f) for s, f in self.files.items()}
        # the bytes one pricing compresses: every member's codes and coefficients
        blobs = ref.manifest.blobs
        shared = [b for m in ref.manifest.members for b in (m.codes, m.coefficients) if b is not None]
        self.shared_bytes = sum(math.prod(blobs[b].shape) * dtypes.itemsize(blobs[b].dtype) for b in shared)
        self.index = {s: {t.name: k for k, t in enumerate(f.manifest.tensors)} for s, f in self.files.items()}
        self._ranges: dict[tuple[float, int, str], dict[str, tuple[int, int]]] = {}

    def nbytes(self, pick: dict[str, float]) -> int:
        total = self.fixed + sum(self.owned[pick[n]][n] for n in self.names)
        records = [self.files[pick[n]].manifest.tensors[self.index[pick[n]][n]] for n in self.names]
        for i in range(self.members):
            raw = {n for n in self.names if n in self.files[pick[n]].manifest.members[i].raw}
            for kind in ("codes", "coefficients"):
                pieces, dtype = [], "U8"
                decoded: dict[float, np.ndarray] = {}
                for n in self.names:
                    f = self.files[pick[n]]
                    member = f.manifest.members[i]
                    blob = member.codes if kind == "codes" else member.coefficients
                    offsets = self._offsets(pick[n], i, kind)
                    if blob is None or n not in offsets:
                        continue
                    if pick[n] not in decoded:
                        decoded[pick[n]] = np.asarray(f.read_blob(blob)).reshape(-1)
                    dtype = f.manifest.blobs[blob].dtype
                    lo, hi = offsets[n]
                    pieces.append(decoded[pick[n]][lo:hi])
                if not pieces:
                    continue
                data = dtypes.to_bytes(np.concatenate(pieces), dtype)
                parts = code_runs(records, raw) if kind == "codes" else None
                level = blob_level(dtype, self.level)
                stored = codec.encode(data, dtypes.itemsize(dtype), self.codec, level, self.chunk_bytes, parts)[0]
                total += len(stored)
        return total

    def _offsets(self, scale: float, i: int, kind: str) -> dict[str, tuple[int, int]]:
        """Each tensor's range in member ``i``'s ``kind`` blob (codes or coefficients) at ``scale``."""
        key = (scale, i, kind)
        if key not in self._ranges:
            manifest = self.files[scale].manifest
            member = manifest.members[i]
            ranges = manifest.code_offsets(member) if kind == "codes" else manifest.coef_offsets(member)
            self._ranges[key] = ranges
        return self._ranges[key]

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> _Assembly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _owned_bytes(bundle: BundleFile) -> dict[str, int]:
    """Each tensor's stored bytes in blobs of its own: those its record names, and each member's
    raw copy and lossless-tier residual of it."""
    manifest = bundle.manifest
    stored = {name: e.nbytes for name, e in bundle.header.tensors.items()}
    owned = dict.fromkeys((t.name for t in manifest.tensors), 0)
    for t in manifest.tensors:
        for ref in t.params.blob_refs(t):
            if ref.name is not None and ref.name in stored:
                owned[t.name] += stored[ref.name]
    for m in manifest.members:
        for tensor, blob in m.raw.items():
            owned[tensor] += stored[blob]
        for tensor, entry in (m.exact or {}).items():
            if entry.blob is not None:
                owned[tensor] += stored[entry.blob]
    return owned


class _Recorded:
    """Bytes a pick's per-tensor bounds add to the manifest, in its options and in the search
    record (each an upper bound: a large manifest is compressed): per tensor named, its name (as
    an escaped JSON string inside the manifest string, twice), per distinct scale ``group_bytes``.
    ``pick`` is updated in place by ``move``; each answer costs a step per distinct scale."""

    def __init__(self, pick: dict[str, float], group_bytes: Callable[[float], int]) -> None:
        self.pick, self.group_bytes = pick, group_bytes
        self.name_bytes = {n: 2 * len(json.dumps(json.dumps(n) + ", ")) for n in pick}
        self.counts: dict[float, int] = {}  # per scale: how many tensors, and their names' bytes
        self.names: dict[float, int] = {}
        for n, s in pick.items():
            self._shift(self.counts, self.names, n, s, 1)

    def _shift(self, counts: dict[float, int], names: dict[float, int], name: str, scale: float, sign: int) -> None:
        counts[scale] = counts.get(scale, 0) + sign
        names[scale] = names.get(scale, 0) + sign * self.name_bytes[name]
        if not counts[scale]:
            del counts[scale], names[scale]

    def move(self, name: str, scale: float) -> None:
        self._shift(self.counts, self.names, name, self.pick[name], -1)
        self._shift(self.counts, self.names, name, scale, 1)
        self.pick[name] = scale

    def bytes_with(self, name: str | None, scale: float) -> int:
        """The bytes with ``name`` moved to ``scale`` (None: as it is)."""
        counts, names = dict(self.counts), dict(self.names)
        if name is not None:
            self._shift(counts, names, name, self.pick[name], -1)
            self._shift(counts, names, name, scale, 1)
        loosest = max(counts)
        named = [s for s in counts if s != loosest]
        if not named:
            return 0
        return OPTION_BYTES + sum(self.group_bytes(s) + names[s] for s in named)


#: The key that names per-tensor bounds in the options, as the manifest holds it (a JSON string).
OPTION_BYTES = len(json.dumps('"tensor_bounds": [], '))


def _lower_hull(
    first: tuple[float, float, float], points: list[tuple[float, float, float]]
) -> list[tuple[float, float, float]]:
    """``first`` and the points of the lower convex hull of ``points`` in (bytes, error) that
    follow it, bytes rising and error falling, each step saving less error per byte than the last."""
    hull = [first]
    for p in sorted(points):
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:  # hull[-1] not below the chord
                hull.pop()
            else:
                break
        if p[1] < hull[-1][1]:
            hull.append(p)
    return hull


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
    target: int,
    bounds: tuple[float | None, ...] | None,
    attempts: Sequence[SizeAttempt],
    met: bool = True,
    allocated: int = 0,
) -> dict[str, object]:
    """``stats.size_target`` (spec §3.6); ``allocated``: how many tensors the bundle kept holds
    to bounds of their own (its ``options.tensor_bounds``)."""
    return {
        "target_bytes": target,
        "max_error": None if bounds is None else bounds[0],
        "max_delta_error": None if bounds is None else bounds[1],
        "met": met,
        "allocated_tensors": allocated,
        "attempts": [a.to_dict() for a in attempts],
    }
