"""The ``rows`` scheme: the paper's mode-1 HOSVD, zero-centred.

Each member's tensor is viewed as a matrix W_i (m x n; N-D tensors as shape[0] x rest). The
rows of all centred D_i = W_i - M are stacked and their principal directions form the basis.
The basis lives on the longer side so that per-member coefficients (m x k or k x n) are the
small part. Working in the "oriented" view X_i (W_i, or W_i^T for a left basis) the basis V
spans X's columns: Ŵ_i = M + C_i V^T with C_i = D_i V.

Statistics are accumulated member by member (sum and Gram X_i^T X_i), so memory holds the
p x p Gram and one member, never all N.
"""

from __future__ import annotations

import math

import numpy as np

from ..format import dtypes
from .decomposition import Encoded, TensorJob, kept_energy, register, store_as
from .linalg import eigh_desc, least_squares_projector, rel_error

#: Columns of V probed per pass when searching the smallest rank that meets a budget.
FIRST_PROBE = 8


class RowsModel:
    scheme = "rows"

    def __init__(self, job: TensorJob, side: str, total: np.ndarray, gram: np.ndarray, norms: np.ndarray) -> None:
        """``total`` = sum of the oriented X_i, ``gram`` = sum of X_i^T X_i, ``norms`` = ||X_i||."""
        self.job, self.side, self.norms = job, side, norms
        m = job.shape[0]
        self.matrix = (m, math.prod(job.shape[1:]))
        self.r, self.p = total.shape
        self.coef_itemsize = dtypes.itemsize(job.coef_dtype)
        n_members = job.n_members
        mean = total / n_members
        held, self.mean_q = store_as(mean, job.mean_dtype)
        self.mean_held = (held if side == "right" else held.T).reshape(job.shape)
        # Gram of the members centred on the *stored* mean: sum (X_i - Mq)^T (X_i - Mq).
        cross = mean.T @ self.mean_q
        gram = gram - n_members * (cross + cross.T) + n_members * (self.mean_q.T @ self.mean_q)
        self.eigenvalues, self.vectors = eigh_desc(gram)

    def _oriented(self, i: int) -> np.ndarray:
        x = self.job.load(i).reshape(self.matrix)
        return x if self.side == "right" else x.T

    def max_rank(self) -> int:
        return min(self.p, self.job.n_members * self.r)

    def bytes_at(self, rank: int) -> int:
        mean = self.job.numel * dtypes.itemsize(self.job.mean_dtype)
        return mean + rank * (self.p + self.job.n_members * self.r) * self.coef_itemsize

    def rank_for_max_error(self, max_error: float, cap: int) -> int | None:
        """Probe V's columns in doubling chunks; stop at the first rank meeting the budget."""
        n_members = self.job.n_members
        # 2% headroom for the rounding that encode() adds on top of the truncation error.
        targets = (max_error * np.where(self.norms > 0, self.norms, 1.0) * 0.98) ** 2
        residual = np.zeros(n_members)
        captured: list[np.ndarray] = []
        start, width = 0, FIRST_PROBE
        while True:
            stop = min(cap, start + width)
            chunk = self.vectors[:, start:stop]
            energies = np.zeros((n_members, stop - start))
            for i in range(n_members):
                d = self._oriented(i) - self.mean_q
                if start == 0:
                    residual[i] = float(np.sum(d * d))
                energies[i] = np.sum((d @ chunk) ** 2, axis=0)
            captured.append(energies)
            left = residual[:, None] - np.cumsum(np.concatenate(captured, axis=1), axis=1)
            ok0 = bool(np.all(residual <= targets))
            if ok0:
                return 0
            ok = np.all(left <= targets[:, None], axis=0)
            if ok.any():
                return int(np.argmax(ok)) + 1
            if stop >= cap:
                return cap if cap > 0 else None
            start, width = stop, width * 2

    def encode(self, rank: int) -> Encoded:
        job = self.job
        basis_held, basis = store_as(self.vectors[:, :rank], job.coef_dtype)
        projector = least_squares_projector(basis)
        coefs, errors = [], []
        for i in range(job.n_members):
            x = self._oriented(i)
            approx = self.mean_q
            coef_held = None
            if rank:
                coef_held, coef = store_as((x - self.mean_q) @ projector, job.coef_dtype)
                approx = self.mean_q + coef @ basis.T
            out = dtypes.round_trip(approx, job.member_dtypes[i])
            errors.append(rel_error(x, out, float(self.norms[i])))
            if coef_held is not None:
                coefs.append(coef_held if self.side == "right" else np.ascontiguousarray(coef_held.T))
        return Encoded(
            scheme="rows", rank=rank, side=self.side, matrix=self.matrix, mean=self.mean_held,
            mean_dtype=job.mean_dtype, basis=basis_held if rank else None, coefs=coefs, errors=errors,
            energy=kept_energy(self.eigenvalues, rank),
            reason="",
        )


def usable_sides(shape: tuple[int, ...], gram_limit: int) -> list[str]:
    """Basis sides whose Gram (side length squared) fits ``gram_limit``."""
    m, n = shape[0], math.prod(shape[1:])
    return [side for side, dim in (("right", n), ("left", m)) if dim <= gram_limit]


@register("rows")
def fit_rows(job: TensorJob) -> list[RowsModel]:
    """One model per usable side, from a single pass over the members.

    Which side gives fewer bytes depends on the data (a shared column space favours a left
    basis even for wide matrices), so both are fitted and ``decompose`` keeps the cheaper.
    """
    sides = usable_sides(job.shape, job.gram_limit)
    m, n = job.shape[0], math.prod(job.shape[1:])
    totals = {side: np.zeros((m, n) if side == "right" else (n, m)) for side in sides}
    grams = {side: np.zeros((n, n) if side == "right" else (m, m)) for side in sides}
    norms = np.zeros(job.n_members)
    for i in range(job.n_members):
        x = job.load(i).reshape(m, n)
        norms[i] = np.linalg.norm(x.ravel())
        for side in sides:
            oriented = x if side == "right" else x.T
            totals[side] += oriented
            grams[side] += oriented.T @ oriented
    return [RowsModel(job, side, totals[side], grams[side], norms) for side in sides]
