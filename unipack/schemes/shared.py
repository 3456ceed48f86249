"""What the two decompositions of ``shared`` storage have in common (spec §4.1): a mean, a basis
of rank k, and per-member coefficients. ``rows`` and ``flat`` differ only in how the tensor is
viewed (a matrix with a basis on one side; one long vector), which their modules define:
the coefficient and basis shapes, the product that rebuilds a member, the least-squares
projection of a new member, and the fitting. Everything else (reading, bytes, baselines,
``unipack add``) is here, once.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unipack.core.decomposition import Encoded, SchemeModel, TensorJob
from unipack.core.fidelity import MemberFidelity, matrix_view, measure, round_up
from unipack.core.linalg import rel_error
from unipack.format import dtypes
from unipack.format.manifest import BlobRef, Manifest, MemberRecord, StorageParams, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import AddContext, Array, MemberView, ReadBlob, RebuiltScheme
from unipack.schemes.registry import SCHEMES


@dataclass(frozen=True)
class SharedParams(StorageParams, ABC):
    rank: int = 0
    mean: str | None = None
    basis: str | None = None  # None at rank 0
    energy: float | None = None  # fraction of centred variance the rank keeps
    spectrum: tuple[float, ...] | None = None  # leading centred eigenvalues, descending (informative)
    variance: float | None = None  # total centred variance, the sum of all eigenvalues (informative)

    @property
    def scheme(self) -> str:
        """The manifest's ``scheme`` field: rows or flat."""
        return self.scheme_name

    def shared_doc(self, variant: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "scheme": variant,
            "rank": self.rank,
            "mean": self.mean,
            "basis": self.basis,
            "energy": self.energy,
        }
        if self.spectrum is not None:
            doc.update(spectrum=list(self.spectrum), variance=self.variance)
        return doc

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        what = f"tensor {tensor.name!r}"
        refs = [BlobRef(self.mean, f"{what} mean", tensor.shape, "float")]
        if self.rank > 0:
            refs.append(BlobRef(self.basis, f"{what} basis", self.basis_shape(tensor), "coef"))
        else:
            refs.append(BlobRef(self.basis, f"{what} basis", None, None, absent="rank 0 but a basis blob is named"))
        return refs

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        if self.rank == 0 or (member is not None and tensor.name in member.raw):
            return None
        return self.coef_shape_at(tensor)

    # The view: defined by rows and flat.
    @abstractmethod
    def coef_shape_at(self, tensor: TensorRecord) -> tuple[int, ...]:
        """One member's coefficient block at the record's rank."""

    @abstractmethod
    def basis_shape(self, tensor: TensorRecord) -> tuple[int, ...]:
        """The basis blob's shape at the record's rank."""

    @abstractmethod
    def rebuild(self, tensor: TensorRecord, mean: np.ndarray, basis: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """mean + the member's delta (float64, in the tensor's shape): the spec's reference arithmetic."""

    @abstractmethod
    def solve(self, tensor: TensorRecord, delta: np.ndarray, basis: np.ndarray) -> np.ndarray:
        """Least-squares coefficients of ``delta`` (x - mean, float64) on the stored basis."""

    def svd_matrix(self, tensor: TensorRecord) -> tuple[int, int]:
        """The 2-D view the per-member SVD baseline takes (orientation does not matter to it)."""
        assert tensor.shape is not None
        return matrix_view(tensor.shape)

    @abstractmethod
    def svd_values(self, tensor: TensorRecord, n_members: int) -> float:
        """The per-member SVD's budget in numbers: coefficients + 1/N of the basis."""


def reconstruct(t: TensorRecord, mean: np.ndarray, basis: np.ndarray | None, coef: np.ndarray | None) -> np.ndarray:
    """float64 values of a shared tensor; ``basis`` and ``coef`` are None at rank 0."""
    assert t.shape is not None and isinstance(t.params, SharedParams)
    values = np.asarray(mean, dtype=np.float64)
    if t.params.rank == 0 or basis is None or coef is None:
        return values.reshape(t.shape).copy()
    return t.params.rebuild(t, values, basis, coef)


@dataclass(frozen=True)
class Projection:
    """One member's coefficients for one shared tensor, and how faithful they are."""

    coef: np.ndarray | None  # held as holder(coef_dtype), in the record's coef shape; None at rank 0
    error: float  # relative error of what extract returns; inf or nan where rounding overflowed
    fidelity: MemberFidelity | None  # None when the error is not finite


def project(
    t: TensorRecord,
    x: np.ndarray,
    mean: np.ndarray,
    basis: np.ndarray | None,
    *,
    member_dtype: str,
    coef_dtype: str,
    n_members: int,
    baselines: bool,
) -> Projection:
    """Project a member that was not in the merge (``x``: finite float64 values, shape ``t.shape``)
    onto the record's stored mean and basis (float64; ``basis`` None at rank 0).

    The coefficients are the least-squares solution on the *stored*, rounded basis, rounded in
    turn to the coefficient dtype; the error is measured on exactly what ``extract`` returns.
    ``n_members`` counts the bundle's members including this one (the per-member SVD baseline gets
    its 1/N share of the basis bytes, as at merge time).
    """
    params = t.params
    assert t.shape is not None and isinstance(params, SharedParams)
    norm = float(np.linalg.norm(x.ravel()))
    coef_held = coef = None
    if params.rank > 0 and basis is not None:
        coef_held, coef = dtypes.store_as(params.solve(t, x - mean, basis), coef_dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing coefficient is reported, not warned
        out = dtypes.round_trip(reconstruct(t, mean, basis, coef), member_dtype)
        error = rel_error(x, out, norm)
    if not math.isfinite(error):
        return Projection(coef_held, error, None)
    matrix = params.svd_matrix(t)
    svd_values = params.svd_values(t, n_members) if baselines else None
    fidelity = measure(
        x.reshape(matrix), out.reshape(matrix), mean.reshape(matrix), norm, member_dtype, coef_dtype, svd_values
    )
    return Projection(coef_held, error, fidelity)


class SharedScheme(RebuiltScheme):
    storage = "shared"

    def parse_shared(self, d: Doc, limit: int) -> dict[str, Any]:
        """The fields both decompositions share (``limit``: the largest rank the view allows)."""
        rank = d.integer("rank", 0, limit)
        energy = d.num("energy", optional=True)
        spectrum = d.numbers("spectrum", optional=True)
        return {
            "rank": rank,
            "energy": energy,
            "spectrum": spectrum,
            "mean": d.text("mean"),
            "basis": d.text("basis", optional=True),
            "variance": d.num("variance", optional=spectrum is None),
        }

    @abstractmethod
    def encoded_params(
        self, enc: Encoded, mean: str, basis: str | None, spectrum: tuple[float, ...], variance: float
    ) -> SharedParams:
        """The params of a tensor the merge encoded as ``enc`` (its blobs already written)."""

    @abstractmethod
    def fit(self, job: TensorJob) -> Sequence[SchemeModel]:
        """Fit the members of one tensor: the candidate models ``decompose`` chooses from."""

    def rebuilt_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        p = _params(t)
        assert p.mean is not None
        mean = view.values(p.mean)
        coef = view.coefficients(t)
        basis = view.values(p.basis) if p.rank > 0 and p.basis is not None and coef is not None else None
        dtype = view.member.dtype_of(t)
        yield t, dtype, dtypes.from_float(reconstruct(t, mean, basis, coef if basis is not None else None), dtype)

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        p = _params(t)
        parts = {p.mean: "means"} if p.mean is not None else {}
        if p.basis is not None:
            parts[p.basis] = "bases"
        return {**parts, **super().blob_parts(t, manifest)}

    def rank(self, t: TensorRecord) -> int | None:
        return _params(t).rank

    def rank_text(self, t: TensorRecord) -> str:
        return str(_params(t).rank)

    def report_scheme(self, t: TensorRecord) -> str | None:
        return self.variant[1] if self.variant else None

    def compared(self, t: TensorRecord) -> bool:
        return True

    def projected(self, t: TensorRecord, member: MemberRecord) -> bool:
        return t.name not in member.raw

    def replaced_by_mean(self, t: TensorRecord, member: MemberRecord) -> bool:
        return True  # also where this member overrides it: a rank-0 bundle would hold the mean

    def baseline_mean(self, manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> np.ndarray | None:
        return stored_mean(manifest, read_blob, t)

    def svd_budget(self, t: TensorRecord, n_members: int) -> float:
        p = _params(t)
        return 0.0 if p.rank == 0 else p.svd_values(t, n_members)

    def add_finite(
        self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray, values: np.ndarray
    ) -> TensorRecord:
        """Project onto the record's mean and basis, or store raw where that cannot be faithful."""
        p = _params(t)
        mean = stored_mean(ctx.old, ctx.read_blob, t)
        basis = None
        if p.rank > 0:
            assert p.basis is not None
            basis = dtypes.to_float(ctx.read_blob(p.basis), ctx.old.blobs[p.basis].dtype)
        projection = project(
            t,
            values,
            mean,
            basis,
            member_dtype=dtype,
            coef_dtype=ctx.coef_dtype,
            n_members=len(ctx.old.members) + 1,
            baselines=ctx.options.baselines,
        )
        if projection.fidelity is None:
            ctx.store_raw(
                t,
                dtype,
                array,
                "override",
                f"its projection overflows the {ctx.coef_dtype} coefficients or {dtype}: stored raw",
            )
            return t
        budget = ctx.options.budget
        if budget is not None and not budget.met([projection.error], [projection.fidelity.delta_error]):
            # Stored raw, bit-exact; a mean-only bundle would still hold the mean here (spec 4.4).
            mean_only = dataclasses.replace(projection.fidelity, delta_error=0.0, svd_error=0.0, svd_rank=0)
            ctx.store_raw(
                t,
                dtype,
                array,
                "override",
                f"projection error {projection.error:.3g} exceeds {budget.text}: stored raw",
                over_budget=True,
                fidelity=mean_only,
            )
            return t
        ctx.keep(
            t,
            "projected",
            round_up(float(projection.error)),
            f"projected onto the bundle's rank-{p.rank} basis ({self.describe(t)})",
            projection.fidelity,
            None if projection.coef is None else projection.coef.reshape(-1),
        )
        return t

    def describe(self, t: TensorRecord) -> str:
        return self.variant[1] if self.variant else self.name


def decomposition(name: str) -> SharedScheme:
    """The ``shared`` scheme called ``name`` (``rows``, ``flat``), which ``--scheme`` chooses from."""
    scheme = SCHEMES[name]
    assert isinstance(scheme, SharedScheme)
    return scheme


def stored_mean(manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> np.ndarray:
    """A shared tensor's stored mean as float64, in the tensor's shape."""
    p = _params(t)
    assert p.mean is not None and t.shape is not None
    return dtypes.to_float(read_blob(p.mean), manifest.blobs[p.mean].dtype).reshape(t.shape)


def _params(t: TensorRecord) -> SharedParams:
    assert isinstance(t.params, SharedParams)
    return t.params
