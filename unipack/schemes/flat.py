"""``flat`` (storage ``shared``): each member's whole tensor is one vector; per member k numbers
(spec §4.1.2).

With N members the centred vectors span at most N-1 directions, found from the N x N Gram of
inner products (never a D x D matrix). Blocks of members are held while the Gram is filled, with
the block size capped in bytes, so memory does not grow with N. Per-member truncation errors
follow exactly from the Gram's eigendecomposition, so no probing pass is needed to pick a rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core.decomposition import Encoded, TensorJob, kept_energy
from unipack.core.fidelity import matrix_view, measure
from unipack.core.linalg import eigh_desc, fix_signs, least_squares_projector, rel_error
from unipack.format import dtypes
from unipack.format.manifest import TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.options import ErrorBudget
from unipack.schemes.registry import register
from unipack.schemes.shared import SharedParams, SharedScheme


@dataclass(frozen=True)
class FlatParams(SharedParams):
    scheme_name: ClassVar[str] = "flat"

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return self.shared_doc("flat")

    def coef_shape_at(self, tensor: TensorRecord) -> tuple[int, ...]:
        return (self.rank,)

    def basis_shape(self, tensor: TensorRecord) -> tuple[int, ...]:
        assert tensor.shape is not None
        return (self.rank, math.prod(tensor.shape))

    def rebuild(self, tensor: TensorRecord, mean: np.ndarray, basis: np.ndarray, coef: np.ndarray) -> np.ndarray:
        assert tensor.shape is not None
        return (mean.reshape(-1) + coef @ basis).reshape(tensor.shape)  # (k,) @ (k, D)

    def solve(self, tensor: TensorRecord, delta: np.ndarray, basis: np.ndarray) -> np.ndarray:
        return delta.reshape(-1) @ least_squares_projector(basis.T)  # C (k,) with W = M + C @ B, B (k, D)

    def svd_values(self, tensor: TensorRecord, n_members: int) -> float:
        return flat_svd_values(self.rank, math.prod(tensor.shape or ()), n_members)


def flat_svd_values(rank: int, dim: int, n_members: int) -> float:
    """A member's k coefficients plus its 1/N share of the basis (k x D), in numbers."""
    return rank * (1 + dim / n_members)


class FlatScheme(SharedScheme):
    name = "flat"
    variant = ("scheme", "flat")

    def parse_params(self, d: Doc, base: TensorRecord) -> FlatParams:
        assert base.shape is not None
        return FlatParams(**self.parse_shared(d, math.prod(base.shape)))

    def encoded_params(
        self, enc: Encoded, mean: str, basis: str | None, spectrum: tuple[float, ...], variance: float
    ) -> FlatParams:
        return FlatParams(
            rank=enc.rank, mean=mean, basis=basis, energy=round(enc.energy, 6), spectrum=spectrum, variance=variance
        )

    def fit(self, job: TensorJob) -> list[FlatModel]:
        return [FlatModel(job)]


#: Bytes of members held at once while filling the Gram (a constant: memory must not grow with N).
BLOCK_BYTES = 64 * 1024 * 1024


class FlatModel:
    scheme = "flat"

    def __init__(self, job: TensorJob) -> None:
        self.job = job
        self.dim = job.numel
        self.coef_itemsize = dtypes.itemsize(job.coef_dtype)
        self._fit()

    def rules_out(self, budget: ErrorBudget, cap: int) -> bool:
        return False  # its N x N Gram is cheap: the rank search itself decides

    def _vector(self, i: int) -> np.ndarray:
        return self.job.load(i).reshape(-1)

    def _fit(self) -> None:
        job, n_members = self.job, self.job.n_members
        total = np.zeros(self.dim)
        self.norms = np.zeros(n_members)
        for i in range(n_members):
            x = self._vector(i)
            total += x
            self.norms[i] = np.linalg.norm(x)
        total /= n_members  # the mean, in place (no second full-size array)
        held, self.mean_q = dtypes.store_as(total, job.mean_dtype)
        del total
        self.mean_held = held.reshape(job.shape)
        self.gram = self._centred_gram()
        self.eigenvalues, self.q = eigh_desc(self.gram)

    def _centred_gram(self) -> np.ndarray:
        """N x N inner products of the centred members, holding at most BLOCK_BYTES of them.

        The block is float32 for float16/32 inputs (half the memory and twice the speed): rounding
        in the products only perturbs the rank estimate, and ``encode`` measures every member's
        real error in float64. It is filled in place, so no second copy of it ever exists.
        """
        n_members = self.job.n_members
        work = self.job.product_dtype
        gram = np.zeros((n_members, n_members))
        rows = max(1, min(n_members, BLOCK_BYTES // (np.dtype(work).itemsize * max(self.dim, 1))))
        held = np.empty((rows, self.dim), dtype=work)
        for lo in range(0, n_members, rows):
            hi = min(n_members, lo + rows)
            block = held[: hi - lo]
            for k, i in enumerate(range(lo, hi)):
                # x - mean_q in float64, rounded into the block's row (no float64 temporary)
                np.subtract(self._vector(i), self.mean_q, out=block[k], casting="same_kind")
            gram[lo:hi, lo:hi] = block @ block.T
            for j in range(hi, n_members):
                col = block @ (self._vector(j) - self.mean_q).astype(work)
                gram[lo:hi, j] = col
                gram[j, lo:hi] = col
        return gram

    def max_rank(self) -> int:
        tol = float(self.eigenvalues[0]) * 1e-12 if self.eigenvalues.size else 0.0
        return int(np.sum(self.eigenvalues > tol)) if tol > 0 else 0

    def bytes_at(self, rank: int) -> int:
        mean = self.dim * dtypes.itemsize(self.job.mean_dtype)
        return mean + rank * (self.dim + self.job.n_members) * self.coef_itemsize

    def rank_for_max_error(self, budget: ErrorBudget, cap: int) -> int | None:
        # ||d_i||^2 (the Gram's diagonal) is the rank-0 residual; 2% headroom for encode()'s rounding.
        targets = np.array(
            [
                (budget.absolute(float(w), math.sqrt(max(float(g), 0.0))) * 0.98) ** 2
                for w, g in zip(self.norms, np.diag(self.gram))
            ]
        )
        residual = np.diag(self.gram)[:, None] - np.concatenate(
            [np.zeros((self.job.n_members, 1)), np.cumsum(self.q**2 * self.eigenvalues, axis=1)], axis=1
        )
        ok = np.all(residual[:, : cap + 1] <= targets[:, None], axis=0)
        return int(np.argmax(ok)) if ok.any() else (cap if cap > 0 else None)

    def encode(self, rank: int) -> Encoded:
        job = self.job
        basis_held = None
        basis = np.zeros((0, self.dim))
        if rank:
            # basis_j = sum_i q_ij d_i / sqrt(lambda_j): unit vectors along the principal directions.
            scale = self.q[:, :rank] / np.sqrt(self.eigenvalues[:rank])
            acc = np.zeros((rank, self.dim))
            for i in range(job.n_members):
                acc += np.outer(scale[i], self._vector(i) - self.mean_q)
            acc = fix_signs(acc.T).T
            basis_held, basis = dtypes.store_as(acc, job.coef_dtype)
        projector = least_squares_projector(basis.T)
        coefs, errors, fidelity = [], [], []
        svd_values = flat_svd_values(rank, self.dim, job.n_members) if job.baselines else None
        # The per-member SVD baseline sees the tensor as a matrix, as the rows scheme does.
        matrix = matrix_view(job.shape)
        for i in range(job.n_members):
            x = self._vector(i)
            approx = self.mean_q
            if rank:
                coef_held, coef = dtypes.store_as((x - self.mean_q) @ projector, job.coef_dtype)
                coefs.append(coef_held)
                approx = self.mean_q + coef @ basis
            out = dtypes.round_trip(approx, job.member_dtypes[i])
            errors.append(rel_error(x, out, float(self.norms[i])))
            fidelity.append(
                measure(
                    x.reshape(matrix),
                    out.reshape(matrix),
                    self.mean_q.reshape(matrix),
                    float(self.norms[i]),
                    job.member_dtypes[i],
                    job.coef_dtype,
                    svd_values,
                )
            )
        return Encoded(
            scheme="flat",
            rank=rank,
            side=None,
            matrix=None,
            mean=self.mean_held,
            mean_dtype=job.mean_dtype,
            basis=basis_held,
            coefs=coefs,
            errors=errors,
            energy=kept_energy(self.eigenvalues, rank),
            reason="",
            fidelity=fidelity,
            eigenvalues=self.eigenvalues,
        )


FLAT = register(FlatScheme())
