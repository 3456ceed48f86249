"""Small linear-algebra helpers with the determinism a byte-identical bundle needs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from unipack.format import dtypes


def eigh_desc(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric PSD matrix.

    Each eigenvector's sign is fixed so that its largest-magnitude entry is positive: the
    decomposition is otherwise defined only up to sign, and a bundle must be reproducible.
    """
    sym = (gram + gram.T) * 0.5  # accumulated Grams drift from exact symmetry by rounding
    values, vectors = np.linalg.eigh(sym)
    order = np.arange(values.size - 1, -1, -1)
    values = np.clip(values[order], 0.0, None)
    vectors = vectors[:, order]
    return values, fix_signs(vectors)


#: Power iterations of ``top_eigh``: each multiplies the gap between kept and dropped
#: eigenvalues, so four leave the leading sum within ~1e-4 of the exact one on the fine-tune
#: spectra we measured (a few strong directions over a flat bulk).
POWER_ITERATIONS = 4


def top_eigh(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The leading ``k`` eigenpairs (descending, signs fixed as in ``eigh_desc``) of a symmetric
    PSD matrix, by randomized subspace iteration: O(n^2 k) instead of eigh's O(n^3), for a rank
    far below the matrix's side. Ritz values never exceed the true eigenvalues. The start is a
    fixed-seed Gaussian block, so the result is reproducible (a bundle's bytes depend on it).
    """
    sym = (gram + gram.T) * 0.5
    q = _iterated_block(lambda block: sym @ block, gram.shape[0], k)
    return _ritz(q, q.T @ sym @ q, k)


def top_eigh_of(apply: Callable[[np.ndarray], np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``top_eigh`` of a symmetric PSD operator known only by its product with an n x w block,
    e.g. ``S @ B = sum_i Y_i^T (Y_i @ B)`` for a Gram ``S`` of stacked members that is never
    formed: each product then costs O(N r n w) instead of the Gram's O(N r n^2)."""
    q = _iterated_block(apply, n, k)
    projected = q.T @ apply(q)
    return _ritz(q, (projected + projected.T) * 0.5, k)


def _iterated_block(apply: Callable[[np.ndarray], np.ndarray], n: int, k: int) -> np.ndarray:
    """An orthonormal n x w block (w = k plus oversampling) spanning the operator's leading
    directions after ``POWER_ITERATIONS``, from a fixed-seed Gaussian start."""
    width = min(n, k + max(8, k // 2))  # oversampling: the k-th direction converges like the width-th gap
    block = np.random.default_rng(0).standard_normal((n, width))
    q = np.linalg.qr(apply(block))[0]
    for _ in range(POWER_ITERATIONS):
        q = np.linalg.qr(apply(q))[0]
    return q


def _ritz(q: np.ndarray, projected: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, small = np.linalg.eigh(projected)
    order = np.arange(values.size - 1, values.size - 1 - k, -1)
    return np.clip(values[order], 0.0, None), fix_signs(q @ small[:, order])


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip columns so that each column's largest-magnitude entry is positive."""
    if vectors.size == 0:
        return vectors
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def least_squares_projector(basis: np.ndarray) -> np.ndarray:
    """``P`` with ``X @ P`` the best coefficients of rows of X on the columns of ``basis``.

    A rounded (fp16/bf16) basis is no longer exactly orthonormal; solving the normal equations
    instead of multiplying by ``basis`` keeps the coefficients optimal for the stored basis.
    """
    gram = basis.T @ basis
    return np.linalg.solve(gram, basis.T).T if gram.size else basis


def rounded_error(x: np.ndarray, work: np.ndarray, dtype: str) -> float:
    """``||x - round_trip(work, dtype)||_F``, made in ``work``'s own array (float64, of ``x``'s
    shape; the caller no longer needs it: it is left holding the difference). Summed in C order,
    as ``rel_error`` sums its difference: one full-size array where the plain expression makes
    three (a merge of a large tensor peaks in these)."""
    np.subtract(x, dtypes.round_trip_in_place(work, dtype), out=work)
    return float(np.linalg.norm(work.reshape(-1)))


def rel_error(original: np.ndarray, approx: np.ndarray, norm: float) -> float:
    """``||original - approx||_F / ||original||_F``; for an all-zero original, the absolute error.

    An all-zero tensor has no relative error; dividing by 1 instead keeps the number finite,
    zero exactly when the tensor is rebuilt exactly, and comparable with a budget.
    """
    diff = float(np.linalg.norm((original - approx).ravel()))
    return diff / norm if norm > 0.0 else diff
