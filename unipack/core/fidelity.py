"""How faithful one member's reconstruction is, and what simpler answers would have given.

Measured while encoding, on the same float64 values the recorded error uses, so a report can
tell its reader whether the shared subspace earned its bytes:

- ``delta_error``: ||W - Ŵ|| / ||W - M||, the part of what makes this member *different* from
  the mean that did not survive (the plain relative error hides it behind the mean's share).
- ``mean_error``: the relative error of the mean alone (rank 0), rounded to the member's dtype
  exactly as a rank-0 bundle would return it.
- ``svd_error``: the relative error of the per-member alternative at equal bytes: a truncated
  SVD of this member's own delta W - M, with as many values as this member's coefficients plus
  its 1/N share of the basis (the subspace's total bytes, split evenly). It is the exact
  truncation error, from the eigenvalues alone: rounding its factors or its result would only
  add error, so the baseline gets the benefit of the doubt (and costs a third of a full SVD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unipack.core.linalg import eigh_desc, rel_error, rounded_error
from unipack.format import dtypes
from unipack.format.manifest import FidelityRecord

#: Leading eigenvalues kept per tensor for the report's scree curve.
SPECTRUM_LENGTH = 128
#: Largest smaller side of a matrix whose per-member SVD baseline is computed (an eigvalsh of
#: this size per member and tensor); beyond it the baseline is taken at rank 0 (the mean).
SVD_SIDE_LIMIT = 4096


@dataclass(frozen=True)
class MemberFidelity:
    """One member's numbers for one shared tensor (errors relative to ||W|| unless named)."""

    norm: float  # ||W||_F
    delta_error: float  # ||W - Ŵ|| / ||W - M|| (absolute error when W equals the mean)
    mean_error: float  # mean-only baseline
    svd_error: float | None  # per-member truncated SVD at equal bytes; None when not computed
    svd_rank: int | None


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a per-member SVD takes of a tensor: (shape[0], rest), a vector as one row."""
    numel = math.prod(shape)
    return (shape[0], numel // shape[0]) if len(shape) > 1 and shape[0] else (1, numel)


def svd_rank_for_budget(values: float, matrix: tuple[int, int]) -> int:
    """Rank of a per-member truncated SVD (m x r and r x n factors) that fits ``values`` numbers."""
    m, n = matrix
    return int(min(values // (m + n), m, n))


def measure(
    x: np.ndarray,
    out: np.ndarray | None,
    mean: np.ndarray,
    norm: float,
    member_dtype: str,
    coef_dtype: str,
    svd_values: float | None,
    *,
    reference: np.ndarray | None = None,
    error: float | None = None,
) -> MemberFidelity:
    """Fidelity numbers for one member.

    ``x``: the original as a float64 matrix (m x n; either orientation: the SVD does not care),
    ``out``: what extract returns for it, ``mean``: the stored mean (float64, same view),
    ``svd_values``: the per-member SVD's budget in numbers, or None to skip that baseline.
    ``reference``: what the delta error and the SVD's delta are measured from, where not the
    mean (the base model, spec §11.4); the mean-only baseline stays the mean's.
    ``error``: ||x - out||, where the caller has it: then ``out`` may be None (a quantizer that
    made the difference in place of what extract returns).

    The full-size temporaries are made one at a time (the delta only while the SVD needs it,
    the rounded mean made the difference in its own array): a merge of a large tensor peaks here.
    """
    delta: np.ndarray | None = x - (mean if reference is None else reference)
    assert delta is not None
    delta_norm = float(np.linalg.norm(delta.ravel()))
    if svd_values is None:
        delta = None
    if out is not None:
        delta_error = rel_error(x, out, delta_norm)
    elif error is not None:  # rel_error's arithmetic on the caller's ||x - out||
        delta_error = error / delta_norm if delta_norm > 0.0 else error
    else:
        raise ValueError("measure: give out or error")
    mean_diff = rounded_error(x, np.array(mean, dtype=np.float64), member_dtype)  # rel_error's difference
    mean_error = mean_diff / norm if norm > 0.0 else mean_diff
    svd_error = svd_rank = None
    if delta is not None and svd_values is not None:
        svd_error, svd_rank = svd_baseline(delta, delta_norm, norm, mean_error, svd_values)
    return MemberFidelity(norm, delta_error, mean_error, svd_error, svd_rank)


def svd_baseline(
    delta: np.ndarray, delta_norm: float, norm: float, mean_error: float, svd_values: float
) -> tuple[float, int]:
    """The per-member truncated SVD of ``delta`` (a matrix view of W - M) at ``svd_values``
    numbers: its relative error ||W - Ŵ||/||W|| and its rank (0: the mean alone)."""
    svd_rank = 0 if min(delta.shape) > SVD_SIDE_LIMIT else svd_rank_for_budget(svd_values, delta.shape)
    if svd_rank == 0:
        return mean_error, 0
    return truncation_error(delta, svd_rank, delta_norm) / (norm if norm > 0.0 else 1.0), svd_rank


def truncation_error(delta: np.ndarray, rank: int, delta_norm: float) -> float:
    """``||delta - best rank-k approximation||_F``: the energy beyond the top ``rank`` singular
    values, from the eigenvalues of the smaller Gram (no singular vectors needed)."""
    d = delta if delta.shape[0] <= delta.shape[1] else delta.T
    eigenvalues = np.linalg.eigvalsh(d @ d.T)  # ascending
    kept = float(np.clip(eigenvalues[::-1][:rank], 0.0, None).sum())
    return math.sqrt(max(delta_norm**2 - kept, 0.0))


def truncated_svd(delta: np.ndarray, rank: int, coef_dtype: str) -> np.ndarray:
    """Best rank-``rank`` approximation of ``delta`` with both factors rounded to ``coef_dtype``.

    From the eigenvectors of the smaller Gram (m x m or n x n), not a full SVD: the factors
    stored are U (orthonormal) and U^T delta.
    """
    wide = delta.shape[0] <= delta.shape[1]
    d = delta if wide else delta.T
    _, vectors = eigh_desc(d @ d.T)
    u = dtypes.round_trip(vectors[:, :rank], coef_dtype)
    # Least squares on the rounded U keeps the second factor optimal for what is stored.
    v = dtypes.round_trip(np.linalg.lstsq(u, d, rcond=None)[0], coef_dtype)
    approx = u @ v
    return approx if wide else approx.T


def spectrum(eigenvalues: np.ndarray, total: float | None = None) -> tuple[list[float], float]:
    """The leading eigenvalues (for the scree curve) and the total centred variance (``total``
    where ``eigenvalues`` holds only the leading ones)."""
    head = [round_sig(float(v)) for v in eigenvalues[:SPECTRUM_LENGTH]]
    return head, round_sig(float(eigenvalues.sum()) if total is None else total)


def round_sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: report numbers, not bit patterns. Four digits
    are more than a report prints (three) and keep the manifest small (it holds N x tensors of
    them); bundles also stay byte-identical when the last bits depend on the BLAS's summation
    order."""
    if value == 0.0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits - 1}e}")


def round_up(value: float, digits: int = 9) -> float:
    """``value`` rounded up to ``digits`` significant digits.

    The last digits of a float64 norm depend on the BLAS's summation order (its thread count);
    recording 9 digits keeps bundles byte-identical across machines, and rounding up never
    understates an error.
    """
    if value <= 0.0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


#: What a member's raw or exact tensor records: nothing lost, nothing to compare.
EXACT = MemberFidelity(norm=0.0, delta_error=0.0, mean_error=0.0, svd_error=0.0, svd_rank=0)


def fidelity_record(per_tensor: list[MemberFidelity], baselines: bool) -> FidelityRecord:
    """One member's informative numbers, rounded (see ``round_sig``) for the manifest."""

    def column(values: Sequence[float | None]) -> tuple[float, ...]:
        return tuple(round_sig(float(v or 0.0)) for v in values)

    return FidelityRecord(
        norms=column([f.norm for f in per_tensor]),
        delta_errors=column([f.delta_error for f in per_tensor]),
        mean_errors=column([f.mean_error for f in per_tensor]),
        svd_errors=column([f.svd_error for f in per_tensor]) if baselines else None,
        svd_ranks=tuple(int(f.svd_rank or 0) for f in per_tensor) if baselines else None,
    )
