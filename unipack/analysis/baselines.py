"""The simple answers a bundle is compared against, as whole members.

- *mean only*: every shared tensor replaced by its mean (rank 0); raw and exact tensors kept.
  Built from the bundle alone.
- *per-member SVD at equal bytes*: each member's own delta from the mean, truncated to the
  rank its share of the bundle's bytes buys (its coefficients plus 1/N of the bases). Needs the
  member's original weights.

The per-tensor numbers (``FidelityRecord``) are recorded at merge time; this module rebuilds
whole state dicts (for ``--eval``) and recomputes the numbers for bundles merged without them.
"""

from __future__ import annotations

import math

import numpy as np

from unipack.core.linalg import rel_error
from unipack.core.fidelity import MemberFidelity, matrix_view, measure, svd_rank_for_budget, truncated_svd
from unipack.format import dtypes
from unipack.format.manifest import FidelityRecord, MemberRecord, TensorRecord
from unipack.bundle.reader import BundleReader
from unipack.sources.checkpoint import Checkpoint
from unipack.core.fidelity import EXACT, fidelity_record

Arrays = dict[str, tuple[str, np.ndarray]]  # name -> (dtype, array held as dtypes.holder(dtype))


def is_projected(t: TensorRecord, member: MemberRecord) -> bool:
    """Whether this member's tensor comes from the mean and bases (not raw, override or exact), or
    its LoRA update from the shared update-space bases."""
    if t.storage == "lora":
        return t.form == "subspace" and t.name in member.lora
    return t.storage == "shared" and t.name not in member.raw


def replaced_by_mean(t: TensorRecord, member: MemberRecord) -> bool:
    """Whether the mean-only baseline replaces this tensor: every shared one (also where this
    member overrides it), and those the merge kept raw only because raw was cheaper -- not
    task-specific heads, not NaN or integer data. A LoRA module the member touches is replaced
    by the mean update of the adapters touching it, in either form."""
    if t.storage == "lora":
        return t.name in member.lora
    return t.storage == "shared" or (t.storage == "raw" and t.raw_cause == "budget")


def svd_budget(t: TensorRecord, n_members: int) -> float:
    """Numbers a member's SVD may store for ``t``: its coefficients plus 1/N of the basis."""
    if t.rank == 0:
        return 0.0
    return math.prod(t.coef_shape()) + math.prod(t.basis_shape()) / n_members


def mean_only(bundle: BundleReader, member: str) -> Arrays:
    """The member as a rank-0 bundle would return it (task-specific raw tensors kept)."""
    rec = bundle.member(member)
    out: Arrays = {}
    for t, dtype, array in bundle.iter_arrays(member):
        if t.storage == "shared":
            array = dtypes.from_float(bundle.mean_values(t), dtype)
        elif replaced_by_mean(t, rec):
            array = dtypes.from_float(_raw_mean(bundle, t), dtype)
        out[t.name] = (dtype, array)
    return out


def _raw_mean(bundle: BundleReader, t: TensorRecord) -> np.ndarray:
    """The members' mean of a tensor the bundle holds raw, at the widest member precision."""
    total = None
    member_dtypes = set()
    for m in bundle.manifest.members:
        dtype = m.dtype_of(t)
        member_dtypes.add(dtype)
        values = dtypes.to_float(bundle.read_blob(m.raw[t.name]), dtype)
        total = values if total is None else total + values
    assert total is not None
    return dtypes.round_trip(total / len(bundle.manifest.members), dtypes.widest_float(frozenset(member_dtypes)))


def per_member_svd(bundle: BundleReader, member: str, original: Checkpoint) -> Arrays:
    """The member as its own truncated SVD at equal bytes (factors rounded like the bundle's)."""
    rec = bundle.member(member)
    coef_dtype = bundle.coef_dtype()
    ranks = _svd_ranks(bundle, rec)
    out: Arrays = {}
    for index, (t, dtype, array) in enumerate(bundle.iter_arrays(member)):
        if is_projected(t, rec):
            assert t.shape is not None
            view = matrix_view(t.shape)
            mean = bundle.mean_values(t).reshape(view)
            approx = mean
            if ranks[index]:
                delta = original.values(t.name).reshape(view) - mean
                approx = mean + truncated_svd(delta, ranks[index], coef_dtype)
            array = dtypes.from_float(approx.reshape(t.shape), dtype)
        out[t.name] = (dtype, array)
    return out


def _svd_ranks(bundle: BundleReader, rec: MemberRecord) -> list[int]:
    if rec.fidelity is not None and rec.fidelity.svd_ranks is not None:
        return list(rec.fidelity.svd_ranks)
    n = len(bundle.members)
    return [svd_rank_for_budget(svd_budget(t, n), matrix_view(t.shape)) if is_projected(t, rec) and t.shape
            else 0 for t in bundle.manifest.tensors]


def measure_member(bundle: BundleReader, member: str, original: Checkpoint) -> FidelityRecord:
    """The member's fidelity numbers, recomputed from its original (``report --baselines``)."""
    rec = bundle.member(member)
    coef_dtype = bundle.coef_dtype()
    n = len(bundle.members)
    per_tensor: list[MemberFidelity] = []
    for t, dtype, array in bundle.iter_arrays(member):
        if replaced_by_mean(t, rec) and not is_projected(t, rec):  # raw for its bytes, or an override
            x = original.values(t.name)
            norm = float(np.linalg.norm(x.ravel()))
            mean = bundle.mean_values(t) if t.storage == "shared" else _raw_mean(bundle, t)
            per_tensor.append(MemberFidelity(norm, 0.0, rel_error(x, dtypes.round_trip(mean, dtype), norm), 0.0, 0))
            continue
        if not is_projected(t, rec):
            per_tensor.append(EXACT)
            continue
        assert t.shape is not None
        view = matrix_view(t.shape)
        x = original.values(t.name).reshape(view)
        out = dtypes.to_float(array, dtype).reshape(view)
        norm = float(np.linalg.norm(x.ravel()))
        per_tensor.append(measure(x, out, bundle.mean_values(t).reshape(view), norm, dtype, coef_dtype,
                                  svd_budget(t, n)))
    return fidelity_record(per_tensor, baselines=True)
