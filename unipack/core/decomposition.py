"""What a decomposition takes and gives, and the rank rules.

A scheme (``rows``, ``flat``: ``unipack.schemes``) fits a ``TensorJob`` into a ``SchemeModel``: mean, spectrum and
whatever it needs to pick a rank. ``decompose`` then applies the rank rule the user chose,
encodes at that rank (rounding basis and coefficients to their storage dtype and every member
to its own dtype), measures each member's real error, raises the rank while the
``max-error`` budget is missed, and gives up for ``KeepRaw`` where raw storage is cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from unipack.core.fidelity import MemberFidelity
from unipack.format import dtypes
from unipack.options import ErrorBudget, rule_text

#: How much smaller than its plain bytes a decomposition's stored bytes may get (float means,
#: bases and coefficients: zstd saves ~10% on them), when comparing with another storage's
#: stored bytes before fitting.
CEILING_SLACK = 1.25


@dataclass(frozen=True)
class TensorJob:
    """One tensor name across all members, and the rule for its rank."""

    name: str
    shape: tuple[int, ...]
    member_dtypes: tuple[str, ...]  # each member's input dtype (float)
    load: Callable[[int], np.ndarray]  # member i's values as float64, in ``shape``
    rule: str  # max-error | rank | energy
    budget: ErrorBudget | None  # the error bounds of a max-error rule
    rank: int | None
    energy: float | None
    coef_dtype: str  # F32 | F16 | BF16
    gram_limit: int
    baselines: bool = True  # also measure the per-member SVD baseline (see fidelity.py)
    # Stored bytes another storage already needs for this tensor (the quantized deltas): a
    # decomposition is only fitted and searched at ranks whose bytes could come in under it.
    ceiling: int | None = None

    @property
    def affordable_bytes(self) -> int:
        """The bytes (before the lossless codec) a decomposition must stay under: raw storage's,
        or ``ceiling`` x CEILING_SLACK where that is less (the codec shrinks floats by a little,
        not by CEILING_SLACK)."""
        if self.ceiling is None:
            return self.raw_bytes
        return min(self.raw_bytes, int(self.ceiling * CEILING_SLACK))

    @property
    def n_members(self) -> int:
        return len(self.member_dtypes)

    @property
    def product_dtype(self) -> type[np.float32] | type[np.float64]:
        """The precision of products over the members' differences (Grams, projections; their
        sums stay float64): float32, twice as fast, since the differences are small; F64
        members keep float64."""
        return np.float64 if "F64" in self.member_dtypes else np.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def raw_bytes(self) -> int:
        return sum(self.numel * dtypes.itemsize(d) for d in self.member_dtypes)

    @property
    def mean_dtype(self) -> str:
        # The mean is kept at the members' own precision: finer would cost bytes and buy nothing
        # once a member is rounded back to its dtype.
        return dtypes.widest_float(frozenset(self.member_dtypes))


@dataclass
class Encoded:
    """A tensor stored as mean + basis + per-member coefficients (arrays in storage dtypes)."""

    scheme: str
    rank: int
    side: str | None
    matrix: tuple[int, int] | None
    mean: np.ndarray  # held as dtypes.holder(mean_dtype), in the tensor's shape
    mean_dtype: str
    basis: np.ndarray | None  # held as holder(coef dtype); None at rank 0
    coefs: list[np.ndarray]  # one per member, held as holder(coef dtype)
    errors: list[float]  # each member's relative error after all rounding
    energy: float  # fraction of centred variance the rank keeps
    reason: str
    fidelity: list[MemberFidelity]  # one per member: delta error and baselines
    eigenvalues: np.ndarray  # the fitted model's centred spectrum, descending (at least the leading values)
    variance: float | None = None  # the spectrum's total where ``eigenvalues`` holds only the leading values


@dataclass(frozen=True)
class KeepRaw:
    """The tensor is cheaper, or only possible within budget, stored raw per member."""

    reason: str


class SchemeModel(Protocol):
    """A fitted scheme: its spectrum, and encoding at any rank."""

    scheme: str

    @property
    def eigenvalues(self) -> np.ndarray:
        """Descending centred variance per component (the full spectrum)."""

    def max_rank(self) -> int:
        """Largest meaningful rank (beyond it the data is already exact)."""

    def bytes_at(self, rank: int) -> int:
        """Stored bytes (before lossless compression) of mean + basis + all coefficients."""

    def rank_for_max_error(self, budget: ErrorBudget, cap: int) -> int | None:
        """Smallest rank <= cap at which every member is estimated within ``budget`` (of its
        weight and/or of its delta from the stored mean)."""

    def encode(self, rank: int) -> Encoded:
        """Round and encode at ``rank``; errors are measured, not estimated."""

    def rules_out(self, budget: ErrorBudget, cap: int) -> bool:
        """Whether no rank <= cap can meet ``budget``, known cheaply (True skips the rank
        search; False promises nothing)."""


#: A scheme's fitting function returns its candidate models (rows: one per basis side).
Fit = Callable[[TensorJob], Sequence[SchemeModel]]


def energy_rank(eigenvalues: np.ndarray, fraction: float) -> int:
    """Smallest k whose top-k eigenvalues hold ``fraction`` of the total."""
    total = float(eigenvalues.sum())
    if total <= 0.0 or fraction <= 0.0:
        return 0
    kept = np.cumsum(eigenvalues) / total
    return min(int(np.searchsorted(kept, fraction - 1e-12)) + 1, int(eigenvalues.size))


def kept_energy(eigenvalues: np.ndarray, rank: int, total: float | None = None) -> float:
    """The share of the variance (``total``, else all of ``eigenvalues``) the top ``rank`` keep."""
    total = float(eigenvalues.sum()) if total is None else total
    return 1.0 if total <= 0.0 else float(eigenvalues[:rank].sum() / total)


def decompose(job: TensorJob, fits: Sequence[Fit]) -> Encoded | KeepRaw:
    """Fit every candidate scheme (``fits``), keep the one needing the fewest bytes under the
    rank rule, and encode it; or keep the tensor raw where that is cheaper."""
    best: tuple[int, SchemeModel, int, int] | None = None  # (bytes, model, rank, cap)
    for fit in fits:
        for model in fit(job):
            cap = _affordable_rank(model, job.affordable_bytes)
            if cap < 0 or (job.rule == "max-error" and job.budget is not None and model.rules_out(job.budget, cap)):
                continue
            rank = _rank_by_rule(model, job, cap)
            if rank is not None and rank <= cap and (best is None or model.bytes_at(rank) < best[0]):
                best = (model.bytes_at(rank), model, rank, cap)
    if best is None:
        return KeepRaw(_too_costly(job))
    _, model, rank, cap = best
    while True:
        encoded = model.encode(rank)
        if not all(math.isfinite(e) for e in encoded.errors):
            return KeepRaw(
                f"values overflow the {job.coef_dtype} coefficients (stored raw; "
                f"--dtype float32 or bfloat16 avoids this)"
            )
        if meets_rule(job.budget, encoded.errors, [f.delta_error for f in encoded.fidelity]):
            return _with_reason(encoded, _rule_text(job))
        if rank >= cap:
            return KeepRaw(_too_costly(job))
        # Rounding (basis, coefficients, output dtype) pushed a member over: a little more rank.
        rank = grow(rank, cap)


def meets_rule(
    budget: ErrorBudget | None, errors: Sequence[float], delta_errors: Sequence[float] | None = None
) -> bool:
    """Whether an encoding is done: a fixed rank or energy rule (no budget) takes what it gets
    (errors are recorded, not bounded); error bounds need every member within them after all
    rounding."""
    return budget is None or budget.met(errors, delta_errors)


def grow(rank: int, cap: int) -> int:
    """The next rank to try when rounding pushed a member over budget: an eighth more, at least 1."""
    return min(cap, rank + max(1, rank // 8))


def _too_costly(job: TensorJob) -> str:
    rival = "storing the tensor raw" if job.affordable_bytes == job.raw_bytes else "the quantized deltas"
    return f"{_rule_text(job)} needs more bytes than {rival}"


def _rule_text(job: TensorJob) -> str:
    if job.budget is not None:
        return job.budget.text
    return rule_text(job.rule, rank=job.rank, energy=job.energy)


def _rank_by_rule(model: SchemeModel, job: TensorJob, cap: int) -> int | None:
    if job.rule == "rank":
        assert job.rank is not None
        return min(job.rank, model.max_rank())
    if job.rule == "energy":
        assert job.energy is not None
        return energy_rank(model.eigenvalues, job.energy)
    assert job.budget is not None
    return model.rank_for_max_error(job.budget, cap)


def _with_reason(encoded: Encoded, rule: str) -> Encoded:
    encoded.reason = f"{rule}: rank {encoded.rank} of {encoded.scheme}"
    return encoded


def _affordable_rank(model: SchemeModel, raw_bytes: int) -> int:
    """Largest rank <= max_rank() costing fewer bytes than raw storage; -1 if even rank 0 does not."""
    cap = model.max_rank()
    if model.bytes_at(cap) < raw_bytes:
        return cap
    if model.bytes_at(0) >= raw_bytes:
        return -1
    lo, hi = 0, cap  # invariant: bytes_at(lo) < raw_bytes <= bytes_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if model.bytes_at(mid) < raw_bytes:
            lo = mid
        else:
            hi = mid
    return lo
