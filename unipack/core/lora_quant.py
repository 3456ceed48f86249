"""Each adapter's own LoRA factors at a few bits per number: the arithmetic of the ``lora`` forms
``quant`` and ``cast`` (spec §10).

Factors are defined up to an r x r change (B X, X⁻¹ A), and an arbitrary gauge makes a factor's
rounding error count unevenly in the product. So the factors are first *balanced*: with the SVD
B A = P Σ Qᵀ, B' = P √Σ and A' = √Σ Qᵀ (computed from r x r matrices through two thin QRs), so
that row j of A' and column j of B' both have norm √σ_j and s B' A' = s B A.

Quantized (``quant``): every row of A' and every row of B'ᵀ gets its own step, codes are one of
L levels (``core.quantize``'s levels and radix packing). Noise of variance v on an entry of row j
of A' reaches the product multiplied by its partner column of B' (norm √σ_j): the error is
Σ_j σ_j (n_j step_j² / 12). At a fixed entropy-coded rate the error is least with
step_j ∝ 1/√σ_j (Lagrange, as in reverse water-filling): a weak direction gets coarse steps and
may vanish entirely, which is the rank truncation a budget allows. With few levels that step
would clip a strong row's entries too often; its step is then raised to the MSE-optimal step of
L levels for the row (a Gaussian's, ``_gaussian_step``), which clips a little. The multiplier c
of 1/√σ_j is searched to meet the budget as loosely as possible. Everything is measured on
exactly what extraction returns: the factors after the steps' and the member's dtype's
rounding, through ``product_error``.

Cast (``cast``): the balanced factors rounded to the coefficient dtype (F16, BF16).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from unipack.core import quantize
from unipack.core.linalg import fix_signs
from unipack.core.lora import LoraFactors
from unipack.core.lora_encode import product_error
from unipack.format import dtypes

#: The level counts the chooser tries: odd, so that 0 is a level and a row can vanish (an even L
#: has no zero: a dropped direction would still cost ±step/2 everywhere). 3, 5, 7 and 15 pack
#: 5, 3, 2 and 2 codes per byte; 255 is one code per byte, for budgets that need ~8 bits.
LEVELS = (3, 5, 7, 15, 31, 63, 127, 255)

#: Factor between multipliers tried while bracketing, and bisection steps after it (the step is
#: then within 1.3^(1/16), under 2%, of the largest that meets the budget: at most 0.03 bit per
#: number above the best).
_GROW = 1.3
_BISECT = 4
_MAX_TRIES = 40


@functools.cache
def _gaussian_step(levels: int) -> float:
    """The step (in standard deviations) minimising the MSE of L levels on a Gaussian: the finest a
    row should get when its levels are few. Measured on a fixed-seed normal sample: it steers the
    writer's search only (a reader never needs it), and is the same on every run."""
    x = np.random.default_rng(0).standard_normal(1 << 13)
    top = quantize.offset(levels)
    grid = np.geomspace(0.5 / top, 4.0 / top, 160)
    mse = [float(np.mean((x - np.clip(np.round(x / g), -top, top) * g) ** 2)) for g in grid]
    return float(grid[int(np.argmin(mse))])


def balanced(f: LoraFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A', B', σ): A' (r x in) and B' (out x r) with B' A' = B A and row j of A', column j of B'
    both of norm √σ_j (σ descending; zero rows / columns pad an update of rank below r)."""
    a, b, padded, _ = _balanced_svd(f)
    return a, b, padded


def product_svd(f: LoraFactors) -> ProductSvd:
    """``f``'s update as s P diag(σ) Qᵀ: what ``ProductSvd.error`` measures approximations against."""
    return _balanced_svd(f)[3]


def _balanced_svd(f: LoraFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray, ProductSvd]:
    """``balanced(f)`` and the thin SVD B A = P diag(σ) Qᵀ it comes from."""
    rank = f.rank
    q_b, r_b = np.linalg.qr(f.b)  # out x m, m x r with m = min(out, r)
    q_a, r_a = np.linalg.qr(f.a.T)  # in x n, n x r
    x, sigma, yt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    x_fixed = fix_signs(x)  # deterministic signs: LAPACK's are arbitrary
    yt = yt * np.sign(np.sum(x_fixed * x, axis=0))[:, None]
    root = np.sqrt(sigma)
    kept = sigma.size
    a = np.zeros((rank, f.in_dim))
    b = np.zeros((f.out_dim, rank))
    a[:kept] = (root[:, None] * yt) @ q_a.T
    b[:, :kept] = q_b @ (x_fixed * root)
    padded = np.zeros(rank)
    padded[:kept] = sigma
    return a, b, padded, ProductSvd(q_b @ x_fixed, sigma, q_a @ yt.T, f.scale, f.norm)


@dataclass(frozen=True)
class ProductSvd:
    """An update s B A as s P diag(σ) Qᵀ (P, Q with orthonormal columns): the error of any
    approximation s B̂ Â of it from k x r products (k = len(σ)), no QR per approximation."""

    p: np.ndarray  # out x k
    sigma: np.ndarray  # k
    q: np.ndarray  # in x k
    scale: float
    norm: float  # ||s B A||_F as ``LoraFactors.norm`` gives it

    def error(self, a: np.ndarray, b: np.ndarray) -> float:
        """``product_error`` of the factors (a, b) at the same scale: ||s (B A - b a)|| / ||s B A||.

        Split b = P Bp + B⊥ (Bp = Pᵀ b) and a = Aq Qᵀ + A⊥ (Aq = a Q). Then
        B A - b a = P (Σ - Bp Aq) Qᵀ - B⊥ Aq Qᵀ - b A⊥, three parts orthogonal to each other
        (left factors in span P or its complement, right ones in span Q or its complement), so
        the squared norm is the sum of theirs. The first is formed entry by entry (k x k); the
        others are traces of products of r x r Grams, each with a factor off the span (B⊥, A⊥),
        of the error's size: nothing is subtracted from ||ΔW||², so small errors keep their
        accuracy (within ~1e-14 relative of ``product_error``'s two QRs, at a fraction of their
        cost on the chooser's many tries). That holds for approximations of the balanced
        factors, as the search makes them: their rows and columns off the spans are noise. (An
        arbitrary gauge's a can have rows far off span Q that b cancels, when b's columns are
        dependent: there ``product_error``.)"""
        bp = self.p.T @ b
        b_off = b - self.p @ bp
        aq = a @ self.q
        a_off = a - aq @ self.q.T
        core = np.diag(self.sigma) - bp @ aq
        # ||P Bp A⊥||² + ||B⊥ A⊥||² = ||b A⊥||² (the two are orthogonal): one Gram product fewer.
        sq = (
            float(np.vdot(core, core))
            + float(np.vdot(b_off.T @ b_off, aq @ aq.T))
            + float(np.vdot(b.T @ b, a_off @ a_off.T))
        )
        diff = abs(self.scale) * math.sqrt(max(sq, 0.0))
        return diff / self.norm if self.norm > 0.0 else diff


@dataclass(frozen=True)
class QuantizedFactors:
    """One adapter's module at L levels: what is stored and what extraction returns."""

    codes: np.ndarray  # uint8, r*in codes of A' then r*out of B'ᵀ (C order), unpacked (or packed: ``packed_for``)
    steps_held: np.ndarray  # 2r steps as stored (holder(step dtype)): A's rows, then B's columns
    a: np.ndarray | None  # float64 values of the extracted A (rounded to the member's dtype)
    b: np.ndarray | None  # float64 values of the extracted B; both None once ``stored_only``
    error: float  # ||ΔW - s B A|| / ||ΔW|| of exactly those
    packed_for: int | None = None  # ``codes`` are packed for this many levels (``stored_packed``)
    packed_count: int = 0  # then: how many codes they hold

    def stored_only(self) -> QuantizedFactors:
        """Without the extracted values (8 bytes a number against the codes' 1): what the chooser
        keeps of each adapter at each level count it may still pick, so that a module's working
        set grows by the codes alone per adapter."""
        return dataclasses.replace(self, a=None, b=None)

    def stored_packed(self, levels: int) -> QuantizedFactors:
        """``stored_only`` with the codes already packed for ``levels`` as they will be written
        (``quantize.pack``: 2 to 5 codes a byte below 16 levels): what a large collection keeps of
        each adapter's winning codes until the module is written."""
        assert self.packed_for is None
        packed = quantize.pack(self.codes, levels)
        return dataclasses.replace(self, codes=packed, a=None, b=None, packed_for=levels, packed_count=self.codes.size)

    @property
    def code_count(self) -> int:
        return self.packed_count if self.packed_for is not None else self.codes.size

    def packed(self, levels: int) -> np.ndarray:
        """The codes packed for ``levels`` (``quantize.pack``), as a U8 blob holds them."""
        if self.packed_for is None:
            return quantize.pack(self.codes, levels)
        assert self.packed_for == levels, "codes packed for another level count"
        return self.codes


def recode(codes: np.ndarray, levels: int, code_levels: int) -> np.ndarray:
    """Codes of ``levels`` levels written in the alphabet of ``code_levels`` (the same parity, no
    fewer): each shifted by the difference of their offsets, so the same integers q come back."""
    shift = quantize.offset(code_levels) - quantize.offset(levels)
    assert shift >= 0 and shift == int(shift)
    return codes if shift == 0 else (codes.astype(np.int16) + int(shift)).astype(np.uint8)


def dequantize(
    codes: np.ndarray, steps: np.ndarray, levels: int, rank: int, out_dim: int, in_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in float64 from unpacked codes and the 2r steps as float64 (spec §10.2, step 3)."""
    q = codes.astype(np.float64) - quantize.offset(levels)
    split = rank * in_dim
    a = q[:split].reshape(rank, in_dim) * steps[:rank, None]
    b_t = q[split:].reshape(rank, out_dim) * steps[rank:, None]
    return a, b_t.T


def quantize_at(
    f: LoraFactors,
    balanced_a: np.ndarray,
    balanced_b: np.ndarray,
    steps: np.ndarray,
    *,
    levels: int,
    step_dtype: str,
    member_dtype: str,
    error: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> QuantizedFactors:
    """Quantize the balanced factors with the 2r ``steps`` (rounded to ``step_dtype`` first, so
    the codes are nearest for the steps a reader sees) and measure the product's error
    (``error(a, b)`` where the caller has a cheaper one than ``product_error``: ``ProductSvd``)."""
    rank = f.rank
    held, stored = dtypes.store_as(np.asarray(steps, dtype=np.float64), step_dtype)
    a_codes, a = _quantize_rows(balanced_a, stored[:rank], levels, member_dtype)
    b_codes, b_t = _quantize_rows(balanced_b.T, stored[rank:], levels, member_dtype)
    b = b_t.T
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        measured = math.inf
    elif error is not None:
        measured = error(a, b)
    else:
        measured = product_error(f, LoraFactors(a, b, f.scale))
    return QuantizedFactors(np.concatenate([a_codes.reshape(-1), b_codes.reshape(-1)]), held, a, b, measured)


def _quantize_rows(x: np.ndarray, steps: np.ndarray, levels: int, member_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values as extracted) of each row of ``x`` at its step (as stored, float64): what
    ``quantize.quantize`` gives with a zero mean and a group per row, the same IEEE operations
    on every element without its flat copies, its zero mean's array or its error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = x / steps[:, None]
    bad = ~(steps > 0)  # a row of zeros (its step 0) or a NaN step: every code 0
    if bad.any():
        ratio[bad] = 0.0
    q = quantize.nearest_level(ratio, levels)
    codes = (q + quantize.offset(levels)).astype(np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        values = q * steps[:, None]
        values += 0.0  # the zero mean's addition: -0.0 becomes 0.0, as there
        out = dtypes.round_trip(values, member_dtype)
    return codes, out


def fit_quantized(
    f: LoraFactors,
    max_error: float,
    *,
    levels: int,
    step_dtype: str,
    member_dtype: str,
) -> QuantizedFactors | None:
    """The coarsest quantization at ``levels`` whose product error is within ``max_error``
    (relative to ||ΔW||), or None if even the finest steps (the floors) miss it.
    (``QuantSearch`` tries several L.)"""
    search = QuantSearch(f, step_dtype=step_dtype, member_dtype=member_dtype)
    return search.fit(max_error, levels) if search.floor_meets(max_error, levels) else None


class QuantSearch:
    """One adapter's module, searched at one level count after another (the chooser tries each
    of ``LEVELS``): the same result as an independent ``fit_quantized`` per L, bit for bit.

    A quantization depends only on the steps as stored and on the clipping range. Where the
    search at one L tries stored steps already tried at another and no code reached the end of
    either range (nothing was clipped, so nothing would be), the codes are the earlier ones
    shifted by the levels' offset and the factors and error are the same: they are reused rather
    than quantized again. At the finer level counts the floors rarely bind, so their searches
    mostly repeat one another.
    """

    def __init__(
        self,
        f: LoraFactors,
        *,
        step_dtype: str,
        member_dtype: str,
    ) -> None:
        self.f, self.step_dtype, self.member_dtype = f, step_dtype, member_dtype
        self.a, self.b, self.sigma, self._product = _balanced_svd(f)
        a, b = self.a, self.b
        self._absmax = np.concatenate([np.abs(a).max(axis=1, initial=0.0), np.abs(b).max(axis=0, initial=0.0)])
        self._rms = np.concatenate([np.sqrt(np.mean(a * a, axis=1)), np.sqrt(np.mean(b * b, axis=0))])
        self._weight = np.concatenate([np.sqrt(self.sigma), np.sqrt(self.sigma)])
        # stored steps -> (the result, its L, its largest |q|)
        self._tried: dict[bytes, tuple[QuantizedFactors, int, float]] = {}
        self._floors: dict[int, QuantizedFactors] = {}

    def _floor(self, levels: int) -> np.ndarray:
        # Per row (A's rows, then B's columns), the finer of the step that never clips and the
        # MSE-optimal step of L levels for the row's RMS.
        return np.minimum(self._absmax / quantize.offset(levels), _gaussian_step(levels) * self._rms)

    def _steps_for(self, floor: np.ndarray, c: float) -> np.ndarray:
        steps = floor.copy()
        live = self._weight > 0.0
        steps[live] = np.maximum(c / self._weight[live], floor[live])
        return steps

    def at(self, steps: np.ndarray, levels: int) -> QuantizedFactors:
        """``quantize_at`` with these steps, or its result from another L where that is the same."""
        key = dtypes.store_as(np.asarray(steps, dtype=np.float64), self.step_dtype)[1].tobytes()
        top = quantize.offset(levels)
        seen = self._tried.get(key)
        if seen is not None and levels % 2:
            result, seen_levels, reach = seen
            if seen_levels == levels:
                return result
            if reach < quantize.offset(seen_levels) and reach <= top:
                shift = int(top - quantize.offset(seen_levels))
                codes = (result.codes.astype(np.int16) + shift).astype(np.uint8)
                return dataclasses.replace(result, codes=codes)
        result = quantize_at(
            self.f,
            self.a,
            self.b,
            steps,
            levels=levels,
            step_dtype=self.step_dtype,
            member_dtype=self.member_dtype,
            error=self._product.error,
        )
        if levels % 2:  # odd L: q = u - (L - 1)/2 is an integer, comparable across level counts
            codes = result.codes
            reach = float(max(int(codes.max()) - top, top - int(codes.min()))) if codes.size else 0.0
            self._tried[key] = (result, levels, reach)
        return result

    def floor_meets(self, max_error: float, levels: int) -> bool:
        """Whether the finest steps at ``levels`` meet ``max_error`` (else ``fit`` has nothing)."""
        floor_fit = self._floors.get(levels)
        if floor_fit is None:
            floor_fit = self._floors[levels] = self.at(self._steps_for(self._floor(levels), 0.0), levels)
        return floor_fit.error <= max_error

    def fit(self, max_error: float, levels: int) -> QuantizedFactors:
        """The coarsest quantization at ``levels`` within ``max_error``; ``floor_meets`` first."""
        f, sigma = self.f, self.sigma
        floor = self._floor(levels)
        if not self.floor_meets(max_error, levels):
            raise ValueError(f"the finest steps at {levels} levels miss {max_error}: check floor_meets first")
        floor_fit = self._floors[levels]

        def at(c: float) -> QuantizedFactors:
            return self.at(self._steps_for(floor, c), levels)

        n_live = int(np.count_nonzero(sigma))
        if n_live == 0 or f.scale == 0.0:
            return floor_fit
        # Start from the high-rate prediction: error² = s² Σ_j σ_j n_j (c²/σ_j) / 12 = s² c² (in + out) k / 12.
        budget = max_error * f.norm / abs(f.scale)
        c = budget * math.sqrt(12.0 / ((f.in_dim + f.out_dim) * n_live))
        best: tuple[float, QuantizedFactors] = (0.0, floor_fit)
        failed: float | None = None
        for _ in range(_MAX_TRIES):  # bracket: a passing c and a failing one 1.3x above it
            result = at(c)
            if result.error <= max_error:
                best = (c, result)
                if failed is not None:
                    break
                c *= _GROW
            else:
                failed = c
                if best[0] > 0.0:
                    break
                c /= _GROW
        if failed is None:
            return best[1]
        lo, hi = best[0], failed
        if lo == 0.0:
            return best[1]
        for _ in range(_BISECT):
            mid = math.sqrt(lo * hi)
            result = at(mid)
            if result.error <= max_error:
                lo, best = mid, (mid, result)
            else:
                hi = mid
        return best[1]


@dataclass(frozen=True)
class CastFactors:
    """One adapter's module as its balanced factors at the coefficient dtype."""

    values_held: np.ndarray  # r*in of A' then r*out of B'ᵀ, held as holder(coef dtype)
    a: np.ndarray  # float64 values of the extracted A (rounded to the member's dtype)
    b: np.ndarray
    error: float


def cast_factors(f: LoraFactors, coef_dtype: str, member_dtype: str) -> CastFactors:
    """The balanced factors rounded to ``coef_dtype``, then (extraction) to the member's dtype."""
    a, b, _ = balanced(f)
    with np.errstate(over="ignore"):
        held, values = dtypes.store_as(np.concatenate([a.reshape(-1), b.T.reshape(-1)]), coef_dtype)
        out = dtypes.round_trip(values, member_dtype)
    split = a.size
    a_out = out[:split].reshape(a.shape)
    b_out = out[split:].reshape(b.shape[1], b.shape[0]).T
    finite = np.isfinite(out).all()
    error = product_error(f, LoraFactors(a_out, b_out, f.scale)) if finite else math.inf
    return CastFactors(held, a_out, b_out, error)
