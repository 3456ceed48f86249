"""Factored subspace cores (spec §12): an adapter's core on a module's shared bases, stored as
its factors C = P Q (P: k_out x c, Q: c x k_in) instead of the dense k_out x k_in block.

An adapter's core C = s (U_kᵀ B)(A V_k) has rank at most r, so it is exactly the product of a
k_out x r and an r x k_in factor: r (k_out + k_in) numbers against k_out · k_in (about 3x fewer at
r = 16, k = 100). The factors are balanced (``core.lora_quant``'s gauge, with the scale folded
into the product), then either cast to the coefficient dtype or quantized at L levels with one
step per row of Q and per column of P: the arithmetic of the ``quant`` form (§10.2) applied to
(Q, P) as if they were an adapter's (A, B) of rank c on a k_out x k_in module. So this module
reuses ``QuantSearch``, ``cast_factors`` and ``dequantize`` rather than repeating them.

The budget is the user's, on what extraction returns: ‖ΔW − s B' A'‖ / ‖ΔW‖ with B', A' the
factors rebuilt from U_k (P Q) V_kᵀ (``peft_factors``, the ``subspace`` form's extraction)
and rounded to the member's dtype. The quantization search runs on the small core, where each
try costs k x c products: the core gets what the budget leaves after the bases' own error
(‖ΔW − U_k C V_kᵀ‖, orthogonal to a change inside the bases when they are exact), and every
result is then measured on the extracted factors (``ProductSvd``: from out x r products against
the adapter's own SVD, computed once per adapter in ``AdapterCore``); one that misses is searched
again on a tighter core budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from unipack.core.linalg import least_squares_projector
from unipack.core.lora import LoraFactors, LoraModel
from unipack.core.lora_encode import peft_factors
from unipack.core.lora_quant import QuantSearch, balanced, cast_factors, dequantize, product_svd
from unipack.format import dtypes

#: A core's factors are values, not an adapter's tensors: they reach the extracted factors only
#: through the float64 product P Q, so the searches "round" them to float64 (no rounding).
CORE_DTYPE = "F64"
#: Tries of the core search on a tighter core budget, and the factor each try tightens it by,
#: when the extracted factors miss the rule (the bases' rounding, the member's dtype).
_RETRIES = 4
_TIGHTEN = 0.85


@dataclass(frozen=True)
class StoredBases:
    """A module's U_k and V_k as stored (rounded to the coefficient dtype), with what the
    cores are fitted and measured with."""

    left_held: np.ndarray  # U_k, out x k_out, held as holder(coef dtype)
    right_held: np.ndarray  # V_k, in x k_in
    u: np.ndarray  # float64 values of U_k as read
    v: np.ndarray
    left_proj: np.ndarray  # least-squares projectors onto the stored bases (``encode``'s)
    right_proj: np.ndarray

    @property
    def ranks(self) -> tuple[int, int]:
        return int(self.u.shape[1]), int(self.v.shape[1])


def stored_bases(model: LoraModel, k_out: int, k_in: int, coef_dtype: str) -> StoredBases:
    """The model's bases at (k_out, k_in) rounded to ``coef_dtype``, as ``encode`` stores them."""
    left_held, u = dtypes.store_as(model.u[:, :k_out], coef_dtype)
    right_held, v = dtypes.store_as(model.v[:, :k_in], coef_dtype)
    return StoredBases(left_held, right_held, u, v, least_squares_projector(u), least_squares_projector(v))


def read_bases(u: np.ndarray, v: np.ndarray) -> StoredBases:
    """``StoredBases`` of bases read from a bundle (float64 values; ``add`` fits on them)."""
    return StoredBases(u, v, u, v, least_squares_projector(u), least_squares_projector(v))


def core_rank(rank: int, record_rank: int) -> int:
    """c: the core rank a member of rank r stores under a record's core rank (spec §12.1)."""
    return min(rank, record_rank)


def split_values(values: np.ndarray, rank: int, k_out: int, k_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) from a member's c (k_in + k_out) values in the ``cast`` order: Q in C order, then Pᵀ."""
    split = rank * k_in
    return values[split:].reshape(rank, k_out).T, values[:split].reshape(rank, k_in)


class AdapterCore:
    """One adapter's core on one module's stored bases, computed once for every core rank, cast
    and level count the chooser tries: the balanced factors of C = s (Lᵀ B)(A R) (L, R the
    bases' least-squares projectors), all its directions, strongest first; and the adapter's own
    update as ``ProductSvd``, which measures the extracted factors from out x r products."""

    def __init__(self, f: LoraFactors, bases: StoredBases, member_dtype: str) -> None:
        self.f, self.bases, self.member_dtype = f, bases, member_dtype
        b = f.scale * (bases.left_proj.T @ f.b)  # k_out x r
        a = f.a @ bases.right_proj  # r x k_in
        self._a, self._b, _ = balanced(LoraFactors(a, b, 1.0))
        self._product = product_svd(f)

    def factors(self, record_rank: int) -> LoraFactors:
        """(Q, P) as the (a, b) of a scale-1 ``LoraFactors``: the core's first c = min(r, core
        rank) directions (all of it where c is at least C's rank)."""
        c = core_rank(self.f.rank, record_rank)
        return LoraFactors(self._a[:c], self._b[:, :c], 1.0)

    def error(self, p: np.ndarray, q: np.ndarray) -> float:
        """‖ΔW − s B' A'‖ / ‖ΔW‖ for the factors extraction returns from the core P Q (spec §12.2:
        ``peft_factors``, the subspace form's extraction, then the member's dtype)."""
        if not (np.isfinite(p).all() and np.isfinite(q).all()):
            return math.inf
        f = self.f
        b2, a2 = peft_factors(self.bases.u, p @ q, self.bases.v, f.rank, f.scale, self.member_dtype)
        if not (np.isfinite(a2).all() and np.isfinite(b2).all()):
            return math.inf
        return self._product.error(a2, b2)

    def cast(self, record_rank: int, coef_dtype: str) -> FactoredCore:
        """The core's balanced factors rounded to the coefficient dtype."""
        core = self.factors(record_rank)
        cast = cast_factors(core, coef_dtype, CORE_DTYPE)
        return FactoredCore(core.rank, cast.values_held, None, self.error(cast.b, cast.a))


def cast_core(f: LoraFactors, bases: StoredBases, record_rank: int, coef_dtype: str, member_dtype: str) -> FactoredCore:
    """``AdapterCore.cast`` for one adapter and one core rank."""
    return AdapterCore(f, bases, member_dtype).cast(record_rank, coef_dtype)


@dataclass(frozen=True)
class FactoredCore:
    """One adapter's core as stored: its block of the coefficient blob, its codes, its error."""

    rank: int  # c
    block: np.ndarray  # held as holder(coef dtype): c (k_in + k_out) values (cast) or 2c steps (quant)
    codes: np.ndarray | None  # quant: c k_in codes of Q then c k_out of Pᵀ, unpacked; cast: None
    error: float  # of the factors extraction returns


class FactoredSearch:
    """One adapter's core on one module's stored bases, at one core rank, quantized at one level
    count after another: at each, the coarsest steps whose extracted factors meet ``max_error``."""

    def __init__(
        self,
        core: AdapterCore,
        record_rank: int,
        max_error: float,
        *,
        coef_dtype: str,
    ) -> None:
        self.adapter, self.max_error, self.coef_dtype = core, max_error, coef_dtype
        self.core = core.factors(record_rank)
        self._search = QuantSearch(self.core, step_dtype=coef_dtype, member_dtype=CORE_DTYPE)
        # The core's share of the budget: the unquantized core's own error (what the bases and
        # the core rank leave out, and the member's rounding) is what the quantization cannot
        # touch; in exact bases the two are orthogonal, so their squares add.
        f = core.f
        base_error = core.error(self.core.b, self.core.a)
        allowed = (max_error**2 - base_error**2) * f.norm**2 if f.norm > 0.0 else max_error**2
        core_norm = self.core.norm
        if not allowed > 0.0:
            self._budget: float | None = None
        else:
            self._budget = math.sqrt(allowed) / core_norm if core_norm > 0.0 else max_error

    def fit(self, levels: int) -> FactoredCore | None:
        """The coarsest quantization at ``levels`` meeting the rule, or None if none found does."""
        budget = self._budget
        if budget is None:
            return None
        rank = self.core.rank
        k_out, k_in = self.adapter.bases.ranks
        for _ in range(_RETRIES):
            if not self._search.floor_meets(budget, levels):
                return None
            fitted = self._search.fit(budget, levels)
            steps = dtypes.to_float(fitted.steps_held, self.coef_dtype)
            q, p = dequantize(fitted.codes, steps, levels, rank, k_out, k_in)  # spec §12.2: as a reader
            error = self.adapter.error(p, q)
            if error <= self.max_error:
                return FactoredCore(rank, fitted.steps_held, fitted.codes, error)
            budget *= _TIGHTEN
        return None
