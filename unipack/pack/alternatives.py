"""What a user would have stored instead, measured during the merge on the same members.

For every tensor the merge decomposes (same shape in every member, finite, not identical) this
module prices and measures the one-line alternatives of ``core.alternatives`` and the paper's
own recipe, on the values the merge already has at hand:

- ``fp16``: every member cast to fp16 (``.half()``); 16-bit inputs stay as they are.
- ``int8``, ``int4``, ``int2``: the members' mean once plus per-row absmax deltas at b bits.
- ``1-bit``: the mean plus sign(delta) times one scale per tensor (BitDelta without training).
- ``paper-k16``: the paper's Algorithm 1 as its code runs it: the stacked rows of all members,
  zero-centred, PCA at k = 16, basis and coefficients in fp32 (unipack's ``rows`` scheme at a
  fixed rank, on the side that costs fewer bytes), with no fallback to raw storage.

Each is priced as a user would ship it (dense integers and fp16 scales, no entropy coding;
``core.alternatives``), and each member's error is measured after rounding to its own dtype.
A tensor counts as *met* by an alternative when every member is within the merge's error rule
(``--max-error``/``--max-delta-error``) or, under a rank or energy rule that bounds nothing,
at least as close as the bundle itself. Tensors every method must keep (task-specific heads,
identical and non-finite tensors) are charged to every alternative at their raw size (cast for
``fp16``), so the totals compare whole collections.

The results go into ``stats.alternatives`` (spec §3.6): per method, its total bytes, how many
tensors it meets, and each member's overall relative error; per tensor, the cheapest method
that meets it. The report reads them back; nothing here changes what the bundle stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from unipack.core import alternatives as alt
from unipack.core.alternatives import BASE_METHODS, METHODS, PAPER_RANK
from unipack.core.decomposition import SchemeModel, TensorJob
from unipack.core.linalg import least_squares_projector, rounded_error, top_eigh_of
from unipack.format import dtypes
from unipack.options import ErrorBudget
from unipack.schemes.rows import RowsModel, cheapest_side, fit_rows

INT_BITS = {"int8": 8, "int4": 4, "int2": 2, "base-int8": 8, "base-int4": 4, "base-int2": 2}
#: Where the side the recipe keeps is longer than this, its basis comes from randomized subspace
#: iteration over the members (``_paper_randomized``: what the paper's code runs, sklearn's
#: randomized PCA) instead of a full Gram of that side, which costs O(N r p^2) to form: on a
#: 20M-parameter model that Gram was a quarter of a default merge. Shorter sides keep the exact
#: Gram (cheap, and no less faithful).
PAPER_EXACT_SIDE = 128
#: Members of one tensor are kept in memory (float64) for the measurement up to this many bytes;
#: larger tensors are re-read member by member, so memory stays flat in N.
CACHE_BYTES = 256 << 20


def cast_itemsize(dtype: str) -> int:
    """Bytes per element after ``.half()``: 16-bit inputs are left as they are."""
    return min(dtypes.itemsize(dtype), 2) if dtype in dtypes.FLOAT_DTYPES else dtypes.itemsize(dtype)


@dataclass
class Tally:
    """The running totals of one method over a merge."""

    bytes: int = 0
    met: int = 0
    err2: list[float] = field(default_factory=list)  # per member: sum over tensors of ||W - Ŵ||^2
    worst: list[float] = field(default_factory=list)  # per member: worst relative tensor error


@dataclass(frozen=True)
class MeasuredApart:
    """The alternatives of one large tensor, measured in a job of their own (``dense``'s
    ``AlternativesItem``) beside the tensor's: the meter adds them to its tallies once the
    tensor's own job has said (``deferred``) with which of the bundle's errors."""

    name: str
    outcomes: dict[str, TensorOutcome] | None  # None: the tensor is not compared (identical, non-finite)
    norms: list[float]


@dataclass(frozen=True)
class TensorOutcome:
    """One method on one tensor: bytes for all members, and each member's errors."""

    bytes: int
    errors: list[float]  # ||W - Ŵ|| / ||W||
    delta_errors: list[float]  # ||W - Ŵ|| / ||W - M||
    err2: list[float]  # ||W - Ŵ||^2


class AlternativesMeter:
    """Accumulates every method's bytes and errors over the tensors of one merge."""

    def __init__(
        self,
        n_members: int,
        budget: ErrorBudget | None,
        with_base: bool = False,
        tensor_budget: Callable[[str], ErrorBudget | None] | None = None,
    ) -> None:
        """``budget``: the merge's rule; ``tensor_budget(name)``: a tensor's own bounds where they
        differ (``merge --size`` allocating them per tensor), each alternative judged by them."""
        self.n, self.budget, self.tensor_budget = n_members, budget, tensor_budget
        #: With a base model (``merge --base``), also its int-b deltas (``BASE_METHODS``).
        self.methods = METHODS + BASE_METHODS if with_base else METHODS
        self.tallies = {m: Tally(err2=[0.0] * n_members, worst=[0.0] * n_members) for m in self.methods}
        self.norm2 = [0.0] * n_members
        self.compared = 0
        self.cheapest: dict[str, tuple[str | None, int]] = {}
        #: The bundle's errors on tensors whose alternatives are measured apart, until they come.
        self.pending: dict[str, list[float]] = {}

    def kept(self, numel_by_member: Sequence[int], member_dtypes: Sequence[str], *, once: bool) -> None:
        """A tensor every method keeps as it is (``once``: one copy, identical in every member)."""
        pairs = list(zip(numel_by_member, member_dtypes))[: 1 if once else None]
        for method, tally in self.tallies.items():
            per = cast_itemsize if method == "fp16" else dtypes.itemsize
            tally.bytes += sum(numel * per(dtype) for numel, dtype in pairs)

    def measure(
        self,
        job: TensorJob,
        bundle_errors: Sequence[float],
        rows_models: Sequence[SchemeModel] | None = None,
        base: np.ndarray | None = None,
    ) -> None:
        """Every method on one decomposable tensor; ``bundle_errors``: the bundle's own relative
        errors on it (the bar under a rank or energy rule); ``rows_models``: the rows scheme's
        models the merge already fitted to this tensor with fp32 coefficients, if any; ``base``:
        the base model's tensor (float64) where the merge was given one that holds it: the delta
        bound is then relative to ||W - base|| for every method, as the merge's rule is."""
        self._record(job.name, *self.outcomes(job, rows_models, base), bundle_errors)

    def deferred(self, name: str, bundle_errors: Sequence[float]) -> None:
        """Tensor ``name`` is compared, its alternatives measured apart: ``bundle_errors`` wait
        for them (``take``)."""
        self.pending[name] = list(bundle_errors)

    def take(self, measured: MeasuredApart) -> None:
        """A tensor's alternatives measured apart, added as ``measure`` would have added them."""
        bundle_errors = self.pending.pop(measured.name, None)
        if measured.outcomes is None:
            # Its survey kept it whole (identical or non-finite members): so did the tensor's
            # job, which said so itself (``kept``) instead of deferring.
            assert bundle_errors is None, measured.name
            return
        assert bundle_errors is not None, f"{measured.name}: the tensor's own job comes first"
        self._record(measured.name, measured.outcomes, measured.norms, bundle_errors)

    def outcomes(
        self,
        job: TensorJob,
        rows_models: Sequence[SchemeModel] | None = None,
        base: np.ndarray | None = None,
    ) -> tuple[dict[str, TensorOutcome], list[float]]:
        """Every method's outcome on one decomposable tensor, and the members' norms (``measure``'s
        arithmetic, before anything is added to the tallies)."""
        load = _cached(job)
        center = load(0).copy()
        for i in range(1, job.n_members):
            center += load(i)
        center /= job.n_members  # M of the delta rule, in float64 (summed and divided in place)
        mean = dtypes.round_trip(center, job.mean_dtype)  # what the alternatives store
        reference = center if base is None else base.reshape(center.shape)
        outcomes = {m: TensorOutcome(0, [], [], []) for m in self.methods if m != "paper-k16"}
        norms: list[float] = []
        for i, dtype in enumerate(job.member_dtypes):
            x = load(i)
            norm = float(np.linalg.norm(x))
            delta_norm = float(np.linalg.norm(x - reference))
            norms.append(norm)
            for method, approximation in _approximations(
                list(outcomes), x, dtype, mean, reference if base is not None else None
            ):
                # Rounded to the member's dtype and made the difference, in the approximation's
                # own array (each is made for this member and method alone; fp16 of a 2-byte
                # member is x itself, which stays as it is).
                e = rounded_error(x, approximation.copy() if approximation is x else approximation, dtype)
                del approximation
                o = outcomes[method]
                o.errors.append(e / norm if norm > 0 else 0.0 if e == 0 else math.inf)
                o.delta_errors.append(e / delta_norm if delta_norm > 0 else 0.0 if e == 0 else math.inf)
                o.err2.append(e * e)
        for method in outcomes:
            outcomes[method] = replace(outcomes[method], bytes=_bytes(method, job, base is not None))
        outcomes["paper-k16"] = _paper(job, load, norms, rows_models, mean)
        return outcomes, norms

    def replay(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Add the tensors a ``RecordingMeter`` measured (in a worker process), in their order."""
        for method, args in calls:
            if method == "kept":
                numels, member_dtypes, once = args
                self.kept(numels, member_dtypes, once=once)
            elif method == "deferred":
                self.deferred(*args)
            else:
                self._record(*args)

    def _record(
        self, name: str, outcomes: dict[str, TensorOutcome], norms: list[float], bundle_errors: Sequence[float]
    ) -> None:
        self.compared += 1
        for i, norm in enumerate(norms):
            self.norm2[i] += norm * norm
        best: tuple[str | None, int] = (None, 0)
        for method in self.methods:
            o, tally = outcomes[method], self.tallies[method]
            tally.bytes += o.bytes
            for i in range(self.n):
                tally.err2[i] += o.err2[i]
                tally.worst[i] = max(tally.worst[i], o.errors[i])
            if self._met(o, bundle_errors, self.tensor_budget(name) if self.tensor_budget else self.budget):
                tally.met += 1
                if best[0] is None or o.bytes < best[1]:
                    best = (method, o.bytes)
        self.cheapest[name] = best

    def _met(self, o: TensorOutcome, bundle_errors: Sequence[float], budget: ErrorBudget | None) -> bool:
        if not all(math.isfinite(e) for e in o.errors):
            return False
        if budget is not None:
            return budget.met(o.errors, o.delta_errors)
        return all(e <= b * (1 + 1e-9) + 1e-12 for e, b in zip(o.errors, bundle_errors))

    def to_stats(self) -> dict[str, Any]:
        """``stats.alternatives`` (spec §3.6): numbers rounded to 6 significant digits."""
        methods = {}
        for method, tally in self.tallies.items():
            errors = [
                _sig(math.sqrt(e2 / n2)) if n2 > 0 else 0.0 for e2, n2 in zip(tally.err2, self.norm2, strict=True)
            ]
            methods[method] = {
                "bytes": tally.bytes,
                "tensors_met": tally.met,
                "errors": errors,
                "worst_errors": [_sig(w) for w in tally.worst],
            }
        return {
            "tensors": self.compared,
            "methods": methods,
            "cheapest": {name: [method, size] for name, (method, size) in self.cheapest.items()},
        }


def _sig(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else -1.0


def _approximations(
    methods: Sequence[str], x: np.ndarray, dtype: str, mean: np.ndarray, base: np.ndarray | None
) -> Iterator[tuple[str, np.ndarray]]:
    """Each method's reconstruction of member ``x`` (float64, before its rounding to ``dtype``),
    one at a time: int-b deltas from the stored ``mean``, or for ``BASE_METHODS`` from ``base``
    (from the mean on tensors the base lacks), the delta and row maxima computed once per center."""
    for method in methods:
        if method == "fp16":
            yield method, dtypes.round_trip(x, "F16") if dtypes.itemsize(dtype) > 2 else x
        elif method == "1-bit":
            yield method, alt.sign_delta(x, mean)
    for on_base in (False, True):
        center = base if on_base and base is not None else mean
        widths = [m for m in methods if m in INT_BITS and (m in BASE_METHODS) == on_base]
        yield from zip(widths, alt.int_deltas(x, center, [INT_BITS[m] for m in widths]))


def _bytes(method: str, job: TensorJob, on_base: bool = False) -> int:
    n, shape = job.n_members, job.shape
    if method == "fp16":
        return sum(job.numel * cast_itemsize(d) for d in job.member_dtypes)
    # Deltas from the base store no center: the base is referenced, not stored.
    mean = 0 if on_base and method in BASE_METHODS else job.numel * dtypes.itemsize(job.mean_dtype)
    if method == "1-bit":
        return mean + n * alt.sign_delta_bytes(shape)
    return mean + n * alt.int_delta_bytes(shape, INT_BITS[method])


def _paper(
    job: TensorJob,
    load: Callable[[int], np.ndarray],
    norms: list[float],
    models: Sequence[SchemeModel] | None,
    mean: np.ndarray,
) -> TensorOutcome:
    """Rows PCA at k = 16 in fp32 on the cheaper side: the subspace, whatever it costs. The
    models depend on the members and the coefficient dtype only, not on the rank rule."""
    paper_job = replace(_paper_job(job), load=load)
    if models:  # the merge's own rows models, encoding for the recipe's job
        models = [m.for_job(paper_job) for m in models if isinstance(m, RowsModel)]
    elif len(job.shape) >= 1:  # a scalar has no rows to stack
        # Only the side the recipe keeps (fewer bytes at k = 16, known from the shapes) is
        # fitted: the other side's Gram would be formed just to lose.
        side = cheapest_side(paper_job, PAPER_RANK)
        if side is not None and _side_length(job.shape, side) > PAPER_EXACT_SIDE:
            return _paper_randomized(paper_job, load, norms, side, mean)
        models = fit_rows(paper_job, sides=[side]) if side is not None else []
    if not models:  # a scalar, or both sides beyond --gram-limit: counted as stored as it is (raw bytes)
        return TensorOutcome(job.raw_bytes, [0.0] * job.n_members, [0.0] * job.n_members, [0.0] * job.n_members)
    model = _cheapest_at_paper_rank(models)
    encoded = model.encode(min(PAPER_RANK, model.max_rank()))
    errors = [float(e) for e in encoded.errors]
    return TensorOutcome(
        bytes=model.bytes_at(encoded.rank),
        errors=errors,
        delta_errors=[float(f.delta_error) for f in encoded.fidelity],
        err2=[(e * n) ** 2 for e, n in zip(errors, norms)],
    )


def _cheapest_at_paper_rank(models: Sequence[SchemeModel]) -> SchemeModel:
    """The model storing k = 16 in the fewest bytes (the first on a tie): the recipe's side."""
    return min(models, key=lambda m: m.bytes_at(min(PAPER_RANK, m.max_rank())))


def paper_model(job: TensorJob, models: Sequence[SchemeModel] | None) -> list[SchemeModel] | None:
    """Of the rows models a merge fitted to ``job``'s tensor, the one the paper's recipe uses
    (``measure``'s ``rows_models``), so that a caller can drop the other side's (a Gram and a
    mean each) before the alternatives are measured. None where there are none."""
    if not models:
        return None
    rows = [m for m in models if isinstance(m, RowsModel)]
    if not rows:
        return list(models)  # nothing to choose from: measure decides as it would have
    paper_job = _paper_job(job)
    return [_cheapest_at_paper_rank([m.for_job(paper_job) for m in rows])]


def _paper_job(job: TensorJob) -> TensorJob:
    """``job`` as the paper's recipe runs it: rank 16, fp32 coefficients, nothing else."""
    return replace(
        job, rule="rank", budget=None, rank=PAPER_RANK, energy=None, coef_dtype="F32", baselines=False, ceiling=None
    )


def _side_length(shape: tuple[int, ...], side: str) -> int:
    """The length of a rows basis vector on ``side``: the Gram of that side is this squared."""
    return math.prod(shape[1:]) if side == "right" else shape[0]


def _paper_randomized(
    job: TensorJob, load: Callable[[int], np.ndarray], norms: list[float], side: str, mean: np.ndarray
) -> TensorOutcome:
    """The paper's recipe on a wide side, as its own code runs it (randomized PCA of the stacked
    rows): the top k = 16 directions of sum_i Y_i^T Y_i (Y_i the member centred on the stored
    mean) by subspace iteration on the members, never forming the p x p Gram, then the same
    fp32 encoding as the rows scheme (least-squares coefficients on the rounded basis), each
    member's error measured after rounding to its dtype. ``mean``: the members' mean as stored
    (``measure``'s, in the tensor's shape)."""
    n_members = job.n_members
    m, n = job.shape[0], math.prod(job.shape[1:])
    r, p = (m, n) if side == "right" else (n, m)

    def oriented(x: np.ndarray) -> np.ndarray:
        x = x.reshape(m, n)
        return x if side == "right" else x.T

    mean_q = oriented(mean)
    # The products run in float32 (members' differences are small: no cancellation to fear),
    # summed in float64, as fit_rows does; F64 members stay in float64.
    work = job.product_dtype
    keep = n_members * r * p * np.dtype(work).itemsize <= CACHE_BYTES
    cache = [(oriented(load(i)) - mean_q).astype(work) for i in range(n_members)] if keep else []

    def centred(i: int) -> np.ndarray:
        return cache[i] if cache else (oriented(load(i)) - mean_q).astype(work)

    def apply(block: np.ndarray) -> np.ndarray:
        b = block.astype(work)
        out = np.zeros(block.shape)
        for i in range(n_members):
            y = centred(i)
            out += y.T @ (y @ b)
        return out

    k = min(PAPER_RANK, p, n_members * r)
    _, vectors = top_eigh_of(apply, p, k)
    cache.clear()
    _, basis = dtypes.store_as(vectors, job.coef_dtype)
    projector = least_squares_projector(basis)
    errors, delta_errors, err2 = [], [], []
    for i, dtype in enumerate(job.member_dtypes):
        x = oriented(load(i))
        centred_x = x - mean_q
        delta_norm = float(np.linalg.norm(centred_x.ravel()))
        coef = dtypes.round_trip(centred_x @ projector, job.coef_dtype)
        del centred_x
        out = coef @ basis.T
        out += mean_q  # mean_q + coef @ basis.T, in the product's array
        e = rounded_error(x, out, dtype)
        del out
        errors.append(e / norms[i] if norms[i] > 0 else e)
        delta_errors.append(e / delta_norm if delta_norm > 0 else e)
        err2.append(e * e)
    stored = job.numel * dtypes.itemsize(job.mean_dtype) + k * (p + n_members * r) * dtypes.itemsize(job.coef_dtype)
    return TensorOutcome(bytes=stored, errors=errors, delta_errors=delta_errors, err2=err2)


def _cached(job: TensorJob) -> Callable[[int], np.ndarray]:
    """``job.load``, reading each member once where all members of this tensor fit CACHE_BYTES."""
    if job.numel * 8 * job.n_members > CACHE_BYTES:
        return job.load
    values = [job.load(i) for i in range(job.n_members)]
    return values.__getitem__


class RecordingMeter(AlternativesMeter):
    """The meter in a worker process: measures a tensor like ``AlternativesMeter`` and records
    the calls that add it to the tallies, for the merging process to ``replay`` in order (the
    tallies are sums and maxima over tensors: their order must not depend on the workers)."""

    def __init__(self, n_members: int, budget: ErrorBudget | None, with_base: bool = False) -> None:
        super().__init__(n_members, budget, with_base)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def kept(self, numel_by_member: Sequence[int], member_dtypes: Sequence[str], *, once: bool) -> None:
        self.calls.append(("kept", (list(numel_by_member), list(member_dtypes), once)))

    def deferred(self, name: str, bundle_errors: Sequence[float]) -> None:
        self.calls.append(("deferred", (name, list(bundle_errors))))

    def _record(
        self, name: str, outcomes: dict[str, TensorOutcome], norms: list[float], bundle_errors: Sequence[float]
    ) -> None:
        self.calls.append(("record", (name, outcomes, norms, list(bundle_errors))))
