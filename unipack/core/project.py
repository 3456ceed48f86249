"""Project a member that was not in the merge onto a shared tensor's existing mean and basis.

The bases are fixed (``unipack add`` never changes them), so the new member's coefficients are
the least-squares solution on the *stored*, rounded basis, rounded in turn to the coefficient
dtype. Its error is measured on exactly what ``extract`` will return: the same ``reconstruct``
the reader uses, rounded to the member's own dtype, so the recorded number is the real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from unipack.format import dtypes
from unipack.format.manifest import TensorRecord
from unipack.core.decomposition import store_as
from unipack.core.fidelity import MemberFidelity, matrix_view, measure
from unipack.core.linalg import least_squares_projector, rel_error
from unipack.core.reconstruct import reconstruct


@dataclass(frozen=True)
class Projection:
    """One member's coefficients for one shared tensor, and how faithful they are."""

    coef: np.ndarray | None  # held as holder(coef_dtype), in the record's coef_shape(); None at rank 0
    error: float  # relative error of what extract returns; inf or nan where rounding overflowed
    fidelity: MemberFidelity | None  # None when the error is not finite


def project(t: TensorRecord, x: np.ndarray, mean: np.ndarray, basis: np.ndarray | None, *, member_dtype: str,
            coef_dtype: str, n_members: int, baselines: bool) -> Projection:
    """Project ``x`` (finite float64 values, shape ``t.shape``) onto record ``t``.

    ``mean`` and ``basis`` are the stored blobs widened to float64 (``basis`` None at rank 0),
    ``n_members`` counts the bundle's members including this one (the per-member SVD baseline
    gets its 1/N share of the basis bytes, as at merge time).
    """
    assert t.shape is not None and t.storage == "shared"
    norm = float(np.linalg.norm(x.ravel()))
    coef_held = coef = None
    if t.rank > 0 and basis is not None:
        delta = x - mean
        if t.scheme == "flat":  # C (k,) with W = M + C @ B, B (k, D)
            solved = delta.reshape(-1) @ least_squares_projector(basis.T)
        else:
            assert t.matrix is not None
            d = delta.reshape(t.matrix)
            if t.side == "right":  # C (m, k) with W = M + C @ B^T, B (n, k)
                solved = d @ least_squares_projector(basis)
            else:  # C (k, n) with W = M + B @ C, B (m, k): the right case on W^T
                solved = np.ascontiguousarray((d.T @ least_squares_projector(basis)).T)
        coef_held, coef = store_as(solved, coef_dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing coefficient is reported, not warned
        out = dtypes.round_trip(reconstruct(t, mean, basis, coef), member_dtype)
        error = rel_error(x, out, norm)
    if not math.isfinite(error):
        return Projection(coef_held, error, None)
    # The baselines see the tensor as a matrix (orientation does not matter to them).
    matrix = t.matrix if t.scheme == "rows" and t.matrix is not None else matrix_view(t.shape)
    svd_values = _svd_values(t, n_members) if baselines else None
    fidelity = measure(x.reshape(matrix), out.reshape(matrix), mean.reshape(matrix), norm, member_dtype,
                       coef_dtype, svd_values)
    return Projection(coef_held, error, fidelity)


def _svd_values(t: TensorRecord, n_members: int) -> float:
    """The per-member SVD's budget in numbers: this member's coefficients plus 1/N of the basis,
    computed as merge computes it (``rows.py``, ``flat.py``) so a boundary rounds the same way."""
    if t.scheme == "flat":
        return t.rank * (1 + math.prod(t.shape or ()) / n_members)
    assert t.matrix is not None
    m, n = t.matrix
    rows, length = (m, n) if t.side == "right" else (n, m)
    return t.rank * (rows + length / n_members)
