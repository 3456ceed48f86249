"""Shared two-sided bases for LoRA adapters of one base model, computed from their factors.

An adapter's update to a module is ΔW_i = s_i · B_i · A_i (A_i: r_i x in, B_i: out x r_i). The
factors are defined only up to an invertible r x r change (B M, M⁻¹ A), so what is compressed is
the update: orthonormal bases U (out x k_out) and V (in x k_in) shared by all adapters, and a
per-adapter core C_i = Uᵀ ΔW_i V, so that ΔW_i ≈ U C_i Vᵀ.

Nothing here forms an out x in (or out x out, in x in) matrix: every step works on the factors,
whose sizes are out x r, r x in and r x r. ``LoraFactors.update`` is the one dense exception,
meant for tests and small modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from unipack.core.decomposition import energy_rank
from unipack.core.linalg import fix_signs

#: Σ r (over the adapters touching a module) above which ``fit`` may sketch the bases instead of
#: taking the exact SVD of the stacked factors. Measured at width 4096, r = 16, a 272-column sketch,
#: one BLAS thread (both sides): the two cost the same near Σ r = 800 (2.7 s); beyond, the SVD
#: grows as (Σ r)² (12.8 s at 1600, 65 s at 3200) and the sketch as Σ r (4.4 s, 8.2 s). Below it
#: every collection keeps the exact bases, and its bundle bit for bit.
SKETCH_FROM = 1024
#: Sketch columns beyond the largest rank asked for, and power iterations (Halko, Martinsson
#: and Tropp 2011, algorithm 4.4): the top ``max_rank`` directions come out accurate to far below
#: any error budget, and every error is measured exactly on the basis found anyway.
OVERSAMPLE = 16
POWER_ITERATIONS = 2
#: The sketch's random test matrix comes from this fixed seed (and the module's shape), never
#: from the machine or the process: the same adapters give the same bases serially, in forked
#: workers and on Dask (as far as the exact SVD's do: both depend on the BLAS's rounding).
SKETCH_SEED = 0x10AA


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scale s: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoraFactors:
    """One adapter's factors for one module: ΔW = scale · b · a.

    ``a`` and ``b`` are float64. Given in float16 or float32 they are held at that width and
    widened (exactly) on each access, so that a module's adapters, all held while it is encoded,
    take the memory of their stored factors rather than 4x (fp16) as float64; every computation
    sees the same float64 values either way."""

    __slots__ = ("_a", "_b", "scale", "_norm")

    def __init__(self, a: np.ndarray, b: np.ndarray, scale: float) -> None:
        a, b = _held(a), _held(b)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA factors need a (r x in) and b (out x r); got a {a.shape}, b {b.shape}")
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be finite, got {scale}")
        self._a, self._b, self.scale = a, b, float(scale)
        self._norm: float | None = None

    @property
    def a(self) -> np.ndarray:  # r x in, float64
        return self._a if self._a.dtype == np.float64 else self._a.astype(np.float64)

    @property
    def b(self) -> np.ndarray:  # out x r, float64
        return self._b if self._b.dtype == np.float64 else self._b.astype(np.float64)

    @property
    def rank(self) -> int:
        return int(self._a.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self._b.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self._a.shape[1])

    @property
    def norm(self) -> float:
        """||ΔW||_F from r x r Grams: ||s B A||² = s² tr((BᵀB)(AAᵀ)) (computed once)."""
        if self._norm is None:
            a, b = self.a, self.b
            sq = self.scale**2 * float(np.sum((b.T @ b) * (a @ a.T)))
            self._norm = math.sqrt(max(sq, 0.0))
        return self._norm

    def update(self) -> np.ndarray:
        """The dense out x in update (tests and small modules only)."""
        return self.scale * (self.b @ self.a)


def _held(x: np.ndarray) -> np.ndarray:
    """Factors as held: float16 and float32 arrays as they are (each widens exactly), else float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float16, np.float32) else np.asarray(x, dtype=np.float64)


class LoraModel:
    """Bases and spectra fitted to one module's adapters; cores and errors at any (k_out, k_in).

    Each adapter is held as its coordinates in the full fitted bases, p_i = Uᵀ B_i (K_out x r)
    and q_i = A_i V (r x K_in), so its full core is s_i p_i q_i and a truncated core is a block
    of it. ``None`` marks an adapter that does not touch the module (a zero update).

    Exact bases span every update, so the coordinates are all there is. Sketched bases (``fit``
    on a large collection) may not: each adapter then also keeps what its factors hold outside
    them, as r x r Grams (``Residual``), and the singular values of its own update; the errors
    stay exact for the bases found, and ``total`` is Σ ||ΔW_i||², which the spectra no longer sum to.
    """

    def __init__(
        self,
        out_dim: int,
        in_dim: int,
        u: np.ndarray,
        left_spectrum: np.ndarray,
        v: np.ndarray,
        right_spectrum: np.ndarray,
        coords: list[tuple[np.ndarray, np.ndarray, float] | None],
        norms: np.ndarray,
        residuals: list[Residual | None] | None = None,
    ) -> None:
        self.out_dim, self.in_dim = out_dim, in_dim
        self.u, self.v = u, v  # out x K_out, in x K_in; orthonormal columns, signs fixed
        # Eigenvalues of Σ ΔW_i ΔW_iᵀ and Σ ΔW_iᵀ ΔW_i, descending (the kept nonzero part).
        self.left_spectrum, self.right_spectrum = left_spectrum, right_spectrum
        self._coords = coords  # per adapter (p_i, q_i, s_i) or None
        self.norms = norms  # ||ΔW_i||_F, one per adapter
        self._residuals = residuals  # None: exact bases (every update inside them)
        # errors() by (k_out, k_in): the rank searches (the subspace's, the factored form's at
        # several budgets) visit many of the same points, each a pass over every adapter.
        self._errors: dict[tuple[int, int], np.ndarray] = {}

    @property
    def sketched(self) -> bool:
        """Whether the bases were sketched (they may miss part of an update)."""
        return self._residuals is not None

    @property
    def total(self) -> float | None:
        """Σ ||ΔW_i||² where the spectra hold only its leading part (sketched bases), else None."""
        return None if self._residuals is None else float(np.sum(self.norms**2))

    @property
    def n_adapters(self) -> int:
        return len(self._coords)

    @property
    def n_touched(self) -> int:
        """Adapters that touch this module: the ones that get a stored core."""
        return sum(c is not None for c in self._coords)

    @property
    def max_ranks(self) -> tuple[int, int]:
        """(K_out, K_in): the fitted bases' sizes; at these ranks every update is rebuilt exactly."""
        return int(self.u.shape[1]), int(self.v.shape[1])

    def stored_values(self, k_out: int, k_in: int) -> int:
        """Numbers stored at (k_out, k_in): both bases plus one core per touched adapter."""
        return self.out_dim * k_out + self.in_dim * k_in + self.n_touched * k_out * k_in

    def cores(self, k_out: int, k_in: int) -> list[np.ndarray]:
        """C_i = s_i (U_kᵀ B_i)(A_i V_k), k_out x k_in; an all-zero core for an untouched module."""
        self._check(k_out, k_in)
        return [np.zeros((k_out, k_in)) if c is None else c[2] * (c[0][:k_out] @ c[1][:, :k_in]) for c in self._coords]

    def errors(self, k_out: int, k_in: int) -> np.ndarray:
        """Each adapter's ||ΔW_i - U_k C_i V_kᵀ||_F / ||ΔW_i||_F (absolute where ||ΔW_i|| = 0).

        In the full bases ΔW_i = U (s p q) Vᵀ (exact up to rounding, since U and V span every
        update's column and row space), so the residual's squared norm is the squared norm of
        the full core outside its top-left k_out x k_in block:
            s² ||p[k_out:] q||² + s² ||p[:k_out] q[:, k_in:]||²,
        each a trace of r x r Grams. Summing the left-out part, rather than subtracting ||C||²
        from ||ΔW||², keeps small errors accurate (no cancellation) and makes the error
        exactly 0 at the full ranks.
        """
        self._check(k_out, k_in)
        known = self._errors.get((k_out, k_in))
        if known is None:
            known = self._errors[(k_out, k_in)] = self._errors_at(k_out, k_in)
        return known.copy()

    def _errors_at(self, k_out: int, k_in: int) -> np.ndarray:
        if self._residuals is not None:
            return self._sketched_errors(k_out, k_in, self._residuals)
        out = np.zeros(self.n_adapters)
        for i, c in enumerate(self._coords):
            if c is None:
                continue
            p, q, s = c
            p_tail, p_head, q_tail = p[k_out:], p[:k_out], q[:, k_in:]
            sq = (
                s
                * s
                * (
                    float(np.sum((p_tail.T @ p_tail) * (q @ q.T)))
                    + float(np.sum((p_head.T @ p_head) * (q_tail @ q_tail.T)))
                )
            )
            err = math.sqrt(max(sq, 0.0))
            out[i] = err / self.norms[i] if self.norms[i] > 0.0 else err
        return out

    def _sketched_errors(self, k_out: int, k_in: int, residuals: list[Residual | None]) -> np.ndarray:
        """``errors`` with bases that may miss part of each update. With B = U_k p_head + B⊥ and
        A = q_head V_kᵀ + A⊥, ΔW - U_k C V_kᵀ = s (B⊥ A + U_k p_head A⊥), two terms with orthogonal
        column spaces, so its squared norm is
            s² tr(B⊥ᵀB⊥ · AAᵀ) + s² tr(p_headᵀp_head · A⊥A⊥ᵀ),
        where B⊥ᵀB⊥ = p_tailᵀp_tail + (what B holds outside U)ᵀ(same), AAᵀ = q qᵀ + (A outside V)(same)ᵀ
        and A⊥A⊥ᵀ = q_tail q_tailᵀ + (A outside V)(same)ᵀ: sums of r x r Grams of parts that are
        each formed entry by entry (no cancellation)."""
        out = np.zeros(self.n_adapters)
        for i, (c, res) in enumerate(zip(self._coords, residuals)):
            if c is None or res is None:
                continue
            p, q, s = c
            p_tail, p_head, q_tail = p[k_out:], p[:k_out], q[:, k_in:]
            b_out = p_tail.T @ p_tail + res.b_gram
            a_out = q_tail @ q_tail.T + res.a_gram
            sq = s * s * (float(np.sum(b_out * (q @ q.T + res.a_gram))) + float(np.sum((p_head.T @ p_head) * a_out)))
            err = math.sqrt(max(sq, 0.0))
            out[i] = err / self.norms[i] if self.norms[i] > 0.0 else err
        return out

    def rank_for_max_error(self, max_error: float) -> tuple[int, int]:
        """(k_out, k_in) storing few numbers with every adapter within ``max_error``.

        Errors only fall as either rank grows, so each search below is a bisection:
        1. the smallest k on the diagonal (k_out, k_in) = (min(k, K_out), min(k, K_in));
        2. from there, shrink one side to its smallest rank with the other fixed, then the other
           side; done in both orders and the cheaper result kept (the first order on a tie).
        The result is a local minimum (neither side can drop by one) that costs no more than the
        best diagonal point; it is not guaranteed to be the global minimum of
        ``stored_values``. No headroom is taken for later rounding: pass a tighter budget for that.
        """
        if not max_error >= 0.0:
            raise ValueError(f"max_error must be >= 0, got {max_error}")
        k_out_max, k_in_max = self.max_ranks

        def ok(k_out: int, k_in: int) -> bool:
            return bool(np.all(self.errors(k_out, k_in) <= max_error))

        k = _smallest(max(k_out_max, k_in_max), lambda k: ok(min(k, k_out_max), min(k, k_in_max)))
        k_out, k_in = min(k, k_out_max), min(k, k_in_max)
        out_first_o = _smallest(k_out, lambda ko: ok(ko, k_in))
        out_first = (out_first_o, _smallest(k_in, lambda ki: ok(out_first_o, ki)))
        in_first_i = _smallest(k_in, lambda ki: ok(k_out, ki))
        in_first = (_smallest(k_out, lambda ko: ok(ko, in_first_i)), in_first_i)
        return min(out_first, in_first, key=lambda ks: self.stored_values(*ks))  # min keeps the first on a tie

    def mean_errors(self, max_values: int = 16 * 2**20) -> np.ndarray | None:
        """The mean-only baseline: each touching adapter's ||ΔW_i - M|| / ||ΔW_i||, with M the mean
        update of the adapters that touch the module (an untouched one keeps its zero update: 0).

        Worked in the full bases, where ΔW_i has the core F_i = s_i p_i q_i and M the mean core F̄
        (K_out x K_in): ||F_i - F̄||² = ||ΔW_i||² - 2 s_i <p_iᵀ F̄, q_i> + ||F̄||². None when F̄
        would exceed ``max_values`` numbers (a huge collection): the baseline is then not measured.
        """
        k_out, k_in = self.max_ranks
        live = [c for c in self._coords if c is not None]
        if not live or k_out * k_in > max_values:
            return None if live else np.zeros(self.n_adapters)
        mean = np.zeros((k_out, k_in))
        for p, q, s in live:
            mean += s * (p @ q)
        mean /= len(live)
        mean_sq = float(np.sum(mean * mean))
        out = np.zeros(self.n_adapters)
        for i, c in enumerate(self._coords):
            if c is None:
                continue
            p, q, s = c
            cross = s * float(np.sum((p.T @ mean) * q))
            sq = max(self.norms[i] ** 2 - 2.0 * cross + mean_sq, 0.0)
            out[i] = math.sqrt(sq) / self.norms[i] if self.norms[i] > 0.0 else math.sqrt(sq)
        return out

    def svd_baseline(self, k_out: int, k_in: int) -> list[tuple[float, int]]:
        """Per adapter, (error, rank) of its own truncated SVD at equal bytes (0, 0 if untouched).

        "Equal bytes": its core plus its 1/n share of both bases, as values, buys a rank-q SVD
        (out + in values per rank), capped at the adapter's own rank. The error is the exact
        truncation error from the singular values of s_i p_i q_i (those of ΔW_i, since U and V
        have orthonormal columns), before any rounding: the baseline gets the benefit of the doubt.
        """
        self._check(k_out, k_in)
        share = k_out * k_in + (self.out_dim * k_out + self.in_dim * k_in) / max(self.n_touched, 1)
        out: list[tuple[float, int]] = []
        for i, c in enumerate(self._coords):
            if c is None:
                out.append((0.0, 0))
                continue
            p, q, s = c
            rank = int(min(share // (self.out_dim + self.in_dim), p.shape[1]))
            res = None if self._residuals is None else self._residuals[i]
            if res is not None:
                sigma = res.sigma  # sketched bases: s p q may miss part of ΔW_i
            else:
                # Singular values of s p q from its r x r core: p = Qp Rp, qᵀ = Qq Rq.
                sigma = np.linalg.svd(s * (_r_factor(p) @ _r_factor(q.T).T), compute_uv=False)
            tail = float(np.sum(sigma[rank:] ** 2))
            err = math.sqrt(tail)
            out.append((err / self.norms[i] if self.norms[i] > 0.0 else err, rank))
        return out

    def energy_rank(self, fraction: float) -> tuple[int, int]:
        """(k_out, k_in): each side's smallest rank whose projection alone keeps ``fraction``
        of the total Σ ||ΔW_i||², read from that side's spectrum. With sketched bases a side
        whose spectrum (its leading part) does not reach the fraction gets one more than its
        basis holds: out of range, for the caller to refuse."""
        if self._residuals is None:
            return energy_rank(self.left_spectrum, fraction), energy_rank(self.right_spectrum, fraction)
        total = float(np.sum(self.norms**2))
        if total <= 0.0 or fraction <= 0.0:
            return 0, 0
        ranks = []
        for spec in (self.left_spectrum, self.right_spectrum):
            kept = np.cumsum(spec) / total
            ranks.append(int(np.searchsorted(kept, fraction - 1e-12)) + 1)  # spec.size + 1 if never reached
        return ranks[0], ranks[1]

    def _check(self, k_out: int, k_in: int) -> None:
        k_out_max, k_in_max = self.max_ranks
        if not (0 <= k_out <= k_out_max and 0 <= k_in <= k_in_max):
            raise ValueError(f"ranks ({k_out}, {k_in}) outside 0..{self.max_ranks}")


@dataclass(frozen=True)
class Residual:
    """What one adapter's factors hold outside sketched bases, and its own update's spectrum."""

    b_gram: np.ndarray  # r x r: (B - U Uᵀ B)ᵀ (B - U Uᵀ B)
    a_gram: np.ndarray  # r x r: (A - A V Vᵀ)(A - A V Vᵀ)ᵀ
    sigma: np.ndarray  # the singular values of ΔW_i (descending)


def fit(
    adapters: Sequence[LoraFactors | None],
    out_dim: int,
    in_dim: int,
    max_rank: int | None = None,
    sketch_from: int | None = None,
) -> LoraModel:
    """Fit shared bases to one module's adapters (``None``: the adapter leaves it untouched).

    The mean is not subtracted, unlike the dense schemes. Updates are already differences from
    the shared base model; an untouched module must come back as exactly zero, which an
    uncentred basis does with an all-zero core; and the mean of N rank-r updates has rank up to
    Σ r_i, so storing it would cost a dense out x in matrix (or as much as the updates
    themselves) and break the factored form. The paper's LoRA results use this uncentred subspace.

    ``max_rank``: the largest rank the caller may keep on either side (None: any). Where Σ r_i
    exceeds ``sketch_from`` (default ``SKETCH_FROM``) and a side's exact basis would hold more than twice
    ``max_rank + OVERSAMPLE`` directions, that side's basis is sketched instead (``_sketch``):
    time and memory linear in the number of adapters, where the exact SVD of the stacked
    factors costs dim · (Σ r_i)² time and dim · Σ r_i memory. Small collections keep the exact
    SVD (and their bundles, bit for bit). The bases then hold max_rank + OVERSAMPLE directions
    at most, and may miss part of an update: the model keeps each adapter's part outside them,
    so every error it reports is still exact for those bases.
    """
    coords_in: list[LoraFactors | None] = []
    for i, f in enumerate(adapters):
        if f is not None and (f.out_dim, f.in_dim) != (out_dim, in_dim):
            raise ValueError(f"adapter {i} is {f.out_dim} x {f.in_dim}, module is {out_dim} x {in_dim}")
        coords_in.append(f)
    live = [f for f in coords_in if f is not None and f.rank > 0]
    # Left: with A_iᵀ = Q_i R_i, ΔW_i = s_i B_i R_iᵀ Q_iᵀ, so Σ ΔW_i ΔW_iᵀ = G Gᵀ for the stack
    # G = [s_i B_i R_iᵀ] (out x Σ r_i). Right, the same with roles swapped: B_i = P_i L_i gives
    # ΔW_iᵀ = s_i A_iᵀ L_iᵀ P_iᵀ. The thin SVD of each stack gives the basis and spectrum without
    # an out x out or in x in Gram, and more accurately than eigh of the stack's own Gram.
    # One stack at a time, each block written straight into it (no list of blocks beside it).
    left_width = sum(min(f.in_dim, f.rank) for f in live)
    right_width = sum(min(f.out_dim, f.rank) for f in live)
    sketch_from = SKETCH_FROM if sketch_from is None else sketch_from
    sketch = None if max_rank is None or sum(f.rank for f in live) <= sketch_from else max(max_rank, 0) + OVERSAMPLE
    sketch_left = sketch is not None and 2 * sketch < min(out_dim, left_width)
    sketch_right = sketch is not None and 2 * sketch < min(in_dim, right_width)
    if sketch_left:
        assert sketch is not None
        r_left = [_r_factor(f.a.T) for f in live]
        u, left_spectrum = _sketch(lambda: (f.scale * (f.b @ r.T) for f, r in zip(live, r_left)), out_dim, sketch)
    else:
        u, left_spectrum = _basis((f.scale * (f.b @ _r_factor(f.a.T).T) for f in live), out_dim, left_width)
    if sketch_right:
        assert sketch is not None
        r_right = [_r_factor(f.b) for f in live]
        v, right_spectrum = _sketch(lambda: (f.scale * (f.a.T @ r.T) for f, r in zip(live, r_right)), in_dim, sketch)
    else:
        v, right_spectrum = _basis((f.scale * (f.a.T @ _r_factor(f.b).T) for f in live), in_dim, right_width)
    sketched = sketch_left or sketch_right
    coords: list[tuple[np.ndarray, np.ndarray, float] | None] = []
    residuals: list[Residual | None] = []
    for f in coords_in:
        if f is None:
            coords.append(None)
            residuals.append(None)
            continue
        p, q = u.T @ f.b, f.a @ v
        coords.append((p, q, f.scale))
        if sketched:
            b_out, a_out = f.b - u @ p, f.a - q @ v.T
            sigma = np.linalg.svd(f.scale * (_r_factor(f.b) @ _r_factor(f.a.T).T), compute_uv=False)
            residuals.append(Residual(b_out.T @ b_out, a_out @ a_out.T, sigma))
    norms = np.array([0.0 if f is None else f.norm for f in coords_in])
    return LoraModel(
        out_dim, in_dim, u, left_spectrum, v, right_spectrum, coords, norms, residuals if sketched else None
    )


def reconstruct_factors(
    u_k: np.ndarray, core: np.ndarray, v_k: np.ndarray, max_rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """PEFT factors (b', a', scale') of rank <= ``max_rank`` for U_k C V_kᵀ.

    With C = X Σ Yᵀ: B' = U_k X √Σ and A' = √Σ Yᵀ V_kᵀ, truncated to the top ``max_rank``
    singular values (the best approximation of that rank, by Eckart-Young, since U_k and V_k are
    orthonormal). Exactly-zero directions are dropped, so r' = min(max_rank, rank of C) and may
    be 0. scale' is 1.0: the extracted adapter sets lora_alpha = r' (or √r' with rsLoRA) so
    that s = 1, or divides B' by its own s. Splitting √Σ evenly keeps B' and A' balanced.
    """
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    x, sigma, yt = np.linalg.svd(core, full_matrices=False)
    tol = sigma[0] * max(core.shape) * np.finfo(np.float64).eps if sigma.size else 0.0
    keep = min(max_rank, int(np.count_nonzero(sigma > tol)))
    x, sigma, yt = x[:, :keep], sigma[:keep], yt[:keep]
    # Determinism: fix X's signs and flip Yᵀ's rows to match (the product is unchanged).
    x_fixed = fix_signs(x)
    flips = np.sum(x_fixed * x, axis=0) if keep else np.ones(0)
    yt = yt * np.sign(flips)[:, None]
    root = np.sqrt(sigma)
    return u_k @ (x_fixed * root), (root[:, None] * yt) @ v_k.T, 1.0


def _basis(blocks: Iterable[np.ndarray], dim: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis (signs fixed) and eigenvalues (σ², descending) of Σ G_i G_iᵀ, for the
    blocks G_i (dim x w_i, w_i summing to ``width``) stacked side by side.

    Directions with σ below the usual numerical-rank tolerance carry only rounding and would be
    chosen arbitrarily by LAPACK; they are dropped so the basis is reproducible.
    """
    if width == 0:
        return np.zeros((dim, 0)), np.zeros(0)
    g = np.empty((dim, width))
    start = 0
    for block in blocks:
        g[:, start : start + block.shape[1]] = block
        start += block.shape[1]
    assert start == width
    basis, sigma, _ = np.linalg.svd(g, full_matrices=False)
    tol = sigma[0] * max(g.shape) * np.finfo(np.float64).eps if sigma.size else 0.0
    keep = int(np.count_nonzero(sigma > tol))
    return fix_signs(basis[:, :keep]), sigma[:keep] ** 2


def _sketch(blocks: Callable[[], Iterable[np.ndarray]], dim: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``_basis`` of at most ``size`` directions, by a randomized range finder with subspace
    iteration over the blocks G_i (dim x w_i), each pass a sum over them (``blocks()`` gives a
    fresh pass): only dim x ``size`` arrays are held, whatever the number of blocks.

    Y = Σ_i G_i Ω_i for a Gaussian Ω (Σ w_i x size, drawn block by block from ``SKETCH_SEED``);
    ``POWER_ITERATIONS`` times Q = orth(Y), Y = Σ_i G_i (G_iᵀ Q); then Q = orth(Y) and the
    Rayleigh-Ritz step: the eigenvectors W of H = Σ_i (Qᵀ G_i)(Qᵀ G_i)ᵀ (size x size) give the
    basis Q W and H's eigenvalues the leading eigenvalues of Σ G_i G_iᵀ. Eigenvalues below
    H's rounding (λ_1 · size · ε) carry nothing reproducible and are dropped.
    """
    rng = np.random.default_rng((SKETCH_SEED, dim, size))
    y = np.zeros((dim, size))
    for g in blocks():
        y += g @ rng.standard_normal((g.shape[1], size))
    for _ in range(POWER_ITERATIONS):
        q = np.linalg.qr(y)[0]
        y = np.zeros((dim, size))
        for g in blocks():
            y += g @ (g.T @ q)
    q = np.linalg.qr(y)[0]
    h = np.zeros((size, size))
    for g in blocks():
        c = q.T @ g
        h += c @ c.T
    eigenvalues, w = np.linalg.eigh(h)
    eigenvalues, w = eigenvalues[::-1], w[:, ::-1]
    tol = eigenvalues[0] * size * np.finfo(np.float64).eps if eigenvalues.size else 0.0
    keep = int(np.count_nonzero(eigenvalues > tol))
    return fix_signs(q @ w[:, :keep]), eigenvalues[:keep]


def _r_factor(x: np.ndarray) -> np.ndarray:
    """R of the thin QR x = Q R (min(rows, cols) x cols); Q is never needed."""
    return np.asarray(np.linalg.qr(x, mode="r"))


def _smallest(hi: int, ok: Callable[[int], bool]) -> int:
    """Smallest k in 0..hi with ok(k), for ok monotone and ok(hi) true."""
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
