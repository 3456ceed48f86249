"""``rows`` (storage ``shared``): the paper's mode-1 HOSVD, zero-centred (spec §4.1.1).

Each member's tensor is viewed as a matrix W_i (m x n; N-D tensors as shape[0] x rest). The
rows of all centred D_i = W_i - M are stacked and their principal directions form the basis.
The basis lives on the side that costs fewer bytes, so that per-member coefficients (m x k or
k x n) are the small part. Working in the "oriented" view X_i (W_i, or W_i^T for a left basis)
the basis V spans X's columns: Ŵ_i = M + C_i V^T with C_i = D_i V.

Statistics are accumulated member by member (sum and Gram X_i^T X_i), so memory holds the
p x p Gram and one member, never all N.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from unipack.core.alternatives import PAPER_RANK
from unipack.core.decomposition import Encoded, TensorJob, kept_energy
from unipack.core.fidelity import measure
from unipack.core.linalg import eigh_desc, least_squares_projector, rounded_error, top_eigh
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.options import DELTA_FLOOR, ErrorBudget
from unipack.schemes.registry import register
from unipack.schemes.shared import SharedParams, SharedScheme

SIDES = ("right", "left")


@dataclass(frozen=True)
class RowsParams(SharedParams):
    scheme_name: ClassVar[str] = "rows"
    side: str = "right"  # the basis spans the right (columns) or left (rows) side
    matrix: tuple[int, int] = (0, 0)  # the 2-D view (shape[0], prod(shape[1:]))

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {**self.shared_doc("rows"), "side": self.side, "matrix": list(self.matrix)}

    def coef_shape_at(self, tensor: TensorRecord) -> tuple[int, ...]:
        m, n = self.matrix
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    def basis_shape(self, tensor: TensorRecord) -> tuple[int, ...]:
        m, n = self.matrix
        return (n, self.rank) if self.side == "right" else (m, self.rank)

    def rebuild(self, tensor: TensorRecord, mean: np.ndarray, basis: np.ndarray, coef: np.ndarray) -> np.ndarray:
        assert tensor.shape is not None
        delta = coef @ basis.T if self.side == "right" else basis @ coef  # (m,k)@(k,n) or (m,k)@(k,n)
        return (mean.reshape(self.matrix) + delta).reshape(tensor.shape)

    def solve(self, tensor: TensorRecord, delta: np.ndarray, basis: np.ndarray) -> np.ndarray:
        d = delta.reshape(self.matrix)
        if self.side == "right":  # C (m, k) with W = M + C @ B^T, B (n, k)
            return d @ least_squares_projector(basis)
        # C (k, n) with W = M + B @ C, B (m, k): the right case on W^T
        return np.ascontiguousarray((d.T @ least_squares_projector(basis)).T)

    def svd_matrix(self, tensor: TensorRecord) -> tuple[int, int]:
        return self.matrix

    def svd_values(self, tensor: TensorRecord, n_members: int) -> float:
        m, n = self.matrix
        rows, length = (m, n) if self.side == "right" else (n, m)
        return rows_svd_values(self.rank, rows, length, n_members)


def rows_svd_values(rank: int, rows: int, length: int, n_members: int) -> float:
    """A member's coefficients (rows x rank) plus its 1/N share of the basis (length x rank), in
    numbers: the per-member SVD's budget at equal bytes. One formula for merge and add, so that
    a boundary rounds the same way in both."""
    return rank * (rows + length / n_members)


class RowsScheme(SharedScheme):
    name = "rows"
    variant = ("scheme", "rows")

    def parse_params(self, d: Doc, base: TensorRecord) -> RowsParams:
        shape = base.shape
        assert shape is not None
        side = d.choice("side", SIDES)
        matrix = d.shape("matrix")
        if len(shape) < 1 or len(matrix) != 2 or matrix[0] != shape[0] or matrix[0] * matrix[1] != math.prod(shape):
            raise FormatError(f"{d.where}: matrix {list(matrix)} is not the 2-D view of shape {list(shape)}")
        limit = matrix[1] if side == "right" else matrix[0]
        return RowsParams(side=side, matrix=(matrix[0], matrix[1]), **self.parse_shared(d, limit))

    def encoded_params(
        self, enc: Encoded, mean: str, basis: str | None, spectrum: tuple[float, ...], variance: float
    ) -> RowsParams:
        assert enc.side is not None and enc.matrix is not None
        return RowsParams(
            rank=enc.rank,
            mean=mean,
            basis=basis,
            energy=round(enc.energy, 6),
            spectrum=spectrum,
            variance=variance,
            side=enc.side,
            matrix=enc.matrix,
        )

    def describe(self, t: TensorRecord) -> str:
        assert isinstance(t.params, RowsParams)
        return f"rows, {t.params.side}"

    def fit(self, job: TensorJob) -> list[RowsModel]:
        return fit_rows(job, sides=sides_worth_fitting(job))


def sides_worth_fitting(job: TensorJob) -> list[str] | None:
    """Under a rank rule, the sides a merge can use: the one ``decompose`` keeps (at a fixed
    rank a side's bytes follow from the shapes alone, ``cheapest_side``; the other side's Gram,
    the costliest step of such a merge, would be formed just to lose) and the one the report's
    paper recipe keeps at k = 16 in fp32 (its alternative reuses the merge's models): the same
    side unless the ranks tell them apart. None (every usable side) under the other rules, whose
    choice depends on the spectra. The kept side is the one a fit of both sides would have kept:
    the cheaper side is cheaper at every rank it can reach, so it is affordable whenever the
    other is, and ties go to the first of ``usable_sides`` in both."""
    if job.rule != "rank" or job.rank is None:
        return None
    wanted = {cheapest_side(job, job.rank), cheapest_side(replace(job, coef_dtype="F32"), PAPER_RANK)}
    return [side for side in usable_sides(job.shape, job.gram_limit) if side in wanted]


#: Columns of V probed per pass when searching the smallest rank that meets a budget.
FIRST_PROBE = 8
#: ``leading(k)`` is randomized while k x LEADING_SHARE is below the Gram's side: beyond that the
#: subspace iteration costs about what a full eigh does.
LEADING_SHARE = 4
#: ``rules_out`` takes the leading Ritz values times this as the top eigenvalues' sum: four power
#: iterations fell short by at most 1% on flat (worst-case) spectra.
RITZ_SLACK = 1.02


class RowsModel:
    scheme = "rows"

    def __init__(
        self,
        job: TensorJob,
        side: str,
        shift: np.ndarray,
        total: np.ndarray,
        gram: np.ndarray,
        norms: np.ndarray,
        sibling: RowsModel | None = None,
    ) -> None:
        """Statistics of the oriented members relative to ``shift`` (member 0): ``total`` = sum of
        Y_i = X_i - shift, ``gram`` = sum of Y_i^T Y_i (taken over: centred in place), ``norms`` =
        ||X_i||. ``sibling``: the
        other side's model of the same members, whose stored mean this one shares (transposed:
        the same numbers, one array for both sides)."""
        self.job, self.side, self.norms = job, side, norms
        m = job.shape[0]
        self.matrix = (m, math.prod(job.shape[1:]))
        self.r, self.p = total.shape
        self.coef_itemsize = dtypes.itemsize(job.coef_dtype)
        n_members = job.n_members
        self.mean_q: np.ndarray
        self.mean_held: np.ndarray
        if sibling is not None:
            assert sibling.side != side and sibling.mean_q.shape == total.shape[::-1]
            self.mean_q = sibling.mean_q.T
            self.mean_held = sibling.mean_held
        else:
            mean = shift + total / n_members
            held, self.mean_q = dtypes.store_as(mean, job.mean_dtype)
            del mean
            self.mean_held = (held if side == "right" else held.T).reshape(job.shape)
        # Centre on the *stored* mean: with c = Mq - shift,
        # sum (Y_i - c)^T (Y_i - c) = G - c^T T - T^T c + N c^T c = G - A - A^T, A = c^T (T - N c / 2):
        # one p x p product instead of two (on a tensor's wide side each costs as much as two
        # members' Grams), in the members' Gram precision (``TensorJob.product_dtype``: c and T - N c / 2
        # are differences of the same size as the Y_i, so it loses no more than their products
        # did) and subtracted in float64. Worked in ``gram``'s own array (``fit_rows`` hands each
        # model its Gram): a p x p array is as large as the tensor when it is square.
        work = job.product_dtype
        c = self.mean_q - shift
        half = c * (-n_members / 2)
        half += total
        c_work = c.astype(work, copy=False)
        del c
        half_work = half.astype(work, copy=False)
        del half
        cross = c_work.T @ half_work
        del c_work, half_work
        gram -= cross
        gram -= cross.T
        del cross
        self._gram: np.ndarray | None = gram
        # The total centred variance: sum ||X_i - M||^2, the trace (every eigenvalue's sum).
        self.variance = max(float(np.trace(self._gram)), 0.0)
        # Eigenpairs are computed when asked for: all of them (``_full``) where a rule needs the
        # spectrum or a large rank, only the leading ones (``_leading``, randomized) where the
        # rank is far below the side; many tensors need neither (``rules_out``).
        self._full: tuple[np.ndarray, np.ndarray] | None = None
        self._leading: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def eigenvalues(self) -> np.ndarray:
        return self._spectrum()[0]

    @property
    def vectors(self) -> np.ndarray:
        return self._spectrum()[1]

    def _spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        if self._full is None:
            assert self._gram is not None
            self._full = eigh_desc(self._gram)
            self._gram = None  # the full decomposition answers every later question
        return self._full

    def leading(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` eigenvalues and eigenvectors: randomized (``top_eigh``) where k is far
        below the side and nothing more is known, else from the full decomposition. Once a set
        is computed it serves every smaller k: a rank searched on the top ``cap`` vectors is
        encoded with those same vectors."""
        known = min((j for j in self._leading if j >= k), default=None)
        if known is None:
            if self._full is not None or k * LEADING_SHARE >= self.p:
                values, vectors = self._spectrum()
                return values[:k], vectors[:, :k]
            assert self._gram is not None
            self._leading[k] = top_eigh(self._gram, k)
            known = k
        values, vectors = self._leading[known]
        return values[:k], vectors[:, :k]

    def _known_head(self) -> np.ndarray:
        """The leading eigenvalues already computed, for the informative ``spectrum`` record:
        the full spectrum where it was needed, else the largest randomized head (at least the
        encoded rank). Not computed further for the record: on a wide side that would cost
        more than the whole search."""
        if self._full is not None:
            return self._full[0]
        if not self._leading:
            return np.zeros(0)
        return self._leading[max(self._leading)][0]

    def for_job(self, job: TensorJob) -> RowsModel:
        """This model (same members, mean and spectrum) encoding for ``job``: another coefficient
        dtype or rank rule, e.g. the paper's recipe measured beside the merge's own choice."""
        assert job.member_dtypes == self.job.member_dtypes and job.mean_dtype == self.job.mean_dtype
        model = copy.copy(self)
        model.job, model.coef_itemsize = job, dtypes.itemsize(job.coef_dtype)
        return model

    def rules_out(self, budget: ErrorBudget, cap: int) -> bool:
        """Whether no rank up to ``cap`` can meet ``budget``, judged without the full spectrum:
        at rank k the members' squared errors sum to at least the variance beyond the top k
        eigenvalues (PCA is optimal), while the rule allows them at most ``_allowed(budget)``.
        The top k come from ``leading`` (Ritz values can only fall short of the true ones), with
        RITZ_SLACK of headroom for that shortfall."""
        allowed = self._allowed(budget)
        if cap <= 0:
            return self.variance > allowed
        values, _ = self.leading(cap)
        return self.variance - RITZ_SLACK * float(values.sum()) > allowed

    def _allowed(self, budget: ErrorBudget) -> float:
        """An upper bound on sum_i budget_i^2 (``ErrorBudget.absolute`` of each member) from what
        the model knows without a pass over the members: their norms and the total variance."""
        squares = float(np.sum(self.norms**2))
        bounds = []
        if budget.max_error is not None:
            bounds.append(budget.max_error**2 * squares)
        if budget.max_delta_error is not None:
            bounds.append(budget.max_delta_error**2 * self.variance + DELTA_FLOOR**2 * squares)
        return min(bounds) if bounds else math.inf

    def _oriented(self, i: int) -> np.ndarray:
        x = self.job.load(i).reshape(self.matrix)
        return x if self.side == "right" else x.T

    def max_rank(self) -> int:
        return min(self.p, self.job.n_members * self.r)

    def bytes_at(self, rank: int) -> int:
        mean = self.job.numel * dtypes.itemsize(self.job.mean_dtype)
        return mean + rank * (self.p + self.job.n_members * self.r) * self.coef_itemsize

    def rank_for_max_error(self, budget: ErrorBudget, cap: int) -> int | None:
        """Probe V's columns in doubling chunks; stop at the first rank meeting the budget."""
        n_members = self.job.n_members
        targets = np.zeros(n_members)
        residual = np.zeros(n_members)
        captured: list[np.ndarray] = []
        start, width = 0, FIRST_PROBE
        vectors = self.leading(cap)[1]
        while True:
            stop = min(cap, start + width)
            chunk = vectors[:, start:stop]
            energies = np.zeros((n_members, stop - start))
            for i in range(n_members):
                d = self._oriented(i) - self.mean_q
                if start == 0:
                    residual[i] = float(np.sum(d * d))
                energies[i] = np.sum((d @ chunk) ** 2, axis=0)
            if start == 0:  # ||d_i||^2 is the rank-0 residual
                # 2% headroom for the rounding that encode() adds on top of the truncation error.
                targets = np.array(
                    [(budget.absolute(float(w), math.sqrt(r)) * 0.98) ** 2 for w, r in zip(self.norms, residual)]
                )
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
        values, vectors = self.leading(rank)
        basis_held, basis = dtypes.store_as(vectors, job.coef_dtype)
        projector = least_squares_projector(basis)
        coefs, errors, fidelity = [], [], []
        # The per-member SVD baseline gets this member's coefficients plus its share of the basis.
        svd_values = rows_svd_values(rank, self.r, self.p, job.n_members) if job.baselines else None
        for i in range(job.n_members):
            x = self._oriented(i)
            coef_held = None
            dtype, norm = job.member_dtypes[i], float(self.norms[i])
            # What extract returns, rounded and then made the difference x - out in one array
            # (a large tensor's encoding would otherwise hold three more full-size copies).
            if rank:
                coef_held, coef = dtypes.store_as((x - self.mean_q) @ projector, job.coef_dtype)
                approx = coef @ basis.T
                approx += self.mean_q  # mean_q + coef @ basis.T
            else:
                approx = self.mean_q.copy()
            error = rounded_error(x, approx, dtype)  # ||x - out||, as rel_error sums it
            del approx
            errors.append(error / norm if norm > 0.0 else error)
            fidelity.append(measure(x, None, self.mean_q, norm, dtype, job.coef_dtype, svd_values, error=error))
            if coef_held is not None:
                coefs.append(coef_held if self.side == "right" else np.ascontiguousarray(coef_held.T))
        return Encoded(
            scheme="rows",
            rank=rank,
            side=self.side,
            matrix=self.matrix,
            mean=self.mean_held,
            mean_dtype=job.mean_dtype,
            basis=basis_held if rank else None,
            coefs=coefs,
            errors=errors,
            energy=kept_energy(values, rank, self.variance),
            reason="",
            fidelity=fidelity,
            eigenvalues=self._known_head(),
            variance=self.variance,
        )


def usable_sides(shape: tuple[int, ...], gram_limit: int) -> list[str]:
    """Basis sides whose Gram (side length squared) fits ``gram_limit``."""
    m, n = shape[0], math.prod(shape[1:])
    return [side for side, dim in (("right", n), ("left", m)) if dim <= gram_limit]


def fit_rows(job: TensorJob, sides: Sequence[str] | None = None) -> list[RowsModel]:
    """One model per usable side (of ``sides``, where given), from a single pass over the members.

    Which side gives fewer bytes depends on the data (a shared column space favours a left
    basis even for wide matrices), so both are fitted and ``decompose`` keeps the cheaper.
    Members are taken relative to member 0: the differences are small, so their Gram products
    can run in float32 (twice as fast as float64) without the cancellation that plain
    ``sum X^T X - N M^T M`` would suffer; sums are kept in float64. F64 inputs stay in float64.
    """
    m, n = job.shape[0], math.prod(job.shape[1:])
    sides = [
        side
        for side in usable_sides(job.shape, job.gram_limit)
        if _may_pay(job, side, m, n) and (sides is None or side in sides)
    ]
    if not sides:
        return []
    work = job.product_dtype
    shift = job.load(0).reshape(m, n)
    total = np.zeros((m, n))
    grams = {side: np.zeros((n, n) if side == "right" else (m, m)) for side in sides}
    norms = np.zeros(job.n_members)
    norms[0] = np.linalg.norm(shift.ravel())
    for i in range(1, job.n_members):
        x = job.load(i).reshape(m, n)
        norms[i] = np.linalg.norm(x.ravel())
        y = x - shift
        total += y
        y_work = y.astype(work)
        del x, y  # the next member's arrays are made before these names are rebound
        for side in sides:
            grams[side] += y_work.T @ y_work if side == "right" else y_work @ y_work.T
        del y_work  # nor are the last member's kept while the models are made
    models: list[RowsModel] = []
    for side in sides:
        oriented_shift, oriented_total = (shift, total) if side == "right" else (shift.T, total.T)
        sibling = models[0] if models else None
        models.append(RowsModel(job, side, oriented_shift, oriented_total, grams.pop(side), norms, sibling))
    return models


def cheapest_side(job: TensorJob, rank: int) -> str | None:
    """The usable side whose model stores ``rank`` (capped at its ``max_rank``) in the fewest
    bytes, the first of ``usable_sides`` on a tie: ``RowsModel.bytes_at`` and ``max_rank``
    depend on the shapes alone, so this is known before any Gram is formed (and only that
    side need be fitted where nothing else asks for the other)."""
    m, n = job.shape[0], math.prod(job.shape[1:])
    best: tuple[int, str] | None = None
    for side in usable_sides(job.shape, job.gram_limit):
        r, p = (m, n) if side == "right" else (n, m)
        k = min(rank, p, job.n_members * r)
        size = job.numel * dtypes.itemsize(job.mean_dtype) + k * (p + job.n_members * r) * dtypes.itemsize(
            job.coef_dtype
        )
        if best is None or size < best[0]:
            best = (size, side)
    return None if best is None else best[1]


def _may_pay(job: TensorJob, side: str, m: int, n: int) -> bool:
    """Whether rank 1 on ``side`` stays under another storage's bytes (``job.ceiling``); without
    one, every side is fitted. Rank 0 (the mean alone) is what quantized deltas with every code
    zero store, so it is never the reason to fit."""
    if job.ceiling is None:
        return True
    rows, length = (m, n) if side == "right" else (n, m)
    mean = job.numel * dtypes.itemsize(job.mean_dtype)
    return mean + (length + job.n_members * rows) * dtypes.itemsize(job.coef_dtype) < job.affordable_bytes


ROWS = register(RowsScheme())
