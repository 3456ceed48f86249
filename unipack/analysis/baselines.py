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

import numpy as np

from unipack.bundle.reader import BundleReader
from unipack.core.fidelity import (
    EXACT,
    MemberFidelity,
    fidelity_record,
    matrix_view,
    measure,
    svd_rank_for_budget,
    truncated_svd,
)
from unipack.core.linalg import rel_error
from unipack.format import dtypes
from unipack.format.manifest import FidelityRecord, MemberRecord, TensorRecord
from unipack.schemes import scheme_of
from unipack.schemes.shared import SharedParams
from unipack.sources.checkpoint import Checkpoint

Arrays = dict[str, tuple[str, np.ndarray]]  # name -> (dtype, array held as dtypes.holder(dtype))


def mean_only(bundle: BundleReader, member: str) -> Arrays:
    """The member as a rank-0 bundle would return it (task-specific raw tensors kept)."""
    rec = bundle.member(member)
    out: Arrays = {}
    for t, dtype, array in bundle.iter_arrays(member):
        scheme = scheme_of(t)  # (a LoRA module yields its factors, which no mean replaces)
        if scheme.replaced_by_mean(t, rec):
            mean = scheme.baseline_mean(bundle.manifest, bundle.read_blob, t)
            if mean is not None:
                array = dtypes.from_float(mean, dtype)
        out[t.name] = (dtype, array)
    return out


def _projected(t: TensorRecord, rec: MemberRecord) -> bool:
    """A dense tensor rebuilt from the mean and bases (what the per-member SVD stands in for)."""
    return isinstance(t.params, SharedParams) and scheme_of(t).projected(t, rec)


def per_member_svd(bundle: BundleReader, member: str, original: Checkpoint) -> Arrays:
    """The member as its own truncated SVD at equal bytes (factors rounded like the bundle's)."""
    rec = bundle.member(member)
    coef_dtype = bundle.coef_dtype()
    ranks = _svd_ranks(bundle, rec)
    out: Arrays = {}
    for index, (t, dtype, array) in enumerate(bundle.iter_arrays(member)):
        if _projected(t, rec):
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
    return [
        svd_rank_for_budget(scheme_of(t).svd_budget(t, n), matrix_view(t.shape))
        if _projected(t, rec) and t.shape
        else 0
        for t in bundle.manifest.tensors
    ]


def measure_member(bundle: BundleReader, member: str, original: Checkpoint) -> FidelityRecord:
    """The member's fidelity numbers, recomputed from its original (``report --baselines``)."""
    rec = bundle.member(member)
    coef_dtype = bundle.coef_dtype()
    n = len(bundle.members)
    per_tensor: list[MemberFidelity] = []
    for t, dtype, array in bundle.iter_arrays(member):
        scheme = scheme_of(t)
        if scheme.replaced_by_mean(t, rec) and not _projected(t, rec):  # raw for its bytes, or an override
            x = original.values(t.name)
            norm = float(np.linalg.norm(x.ravel()))
            mean = scheme.baseline_mean(bundle.manifest, bundle.read_blob, t)
            assert mean is not None
            per_tensor.append(MemberFidelity(norm, 0.0, rel_error(x, dtypes.round_trip(mean, dtype), norm), 0.0, 0))
            continue
        if not _projected(t, rec):
            per_tensor.append(EXACT)
            continue
        assert t.shape is not None
        view = matrix_view(t.shape)
        x = original.values(t.name).reshape(view)
        out = dtypes.to_float(array, dtype).reshape(view)
        norm = float(np.linalg.norm(x.ravel()))
        per_tensor.append(
            measure(x, out, bundle.mean_values(t).reshape(view), norm, dtype, coef_dtype, scheme.svd_budget(t, n))
        )
    return fidelity_record(per_tensor, baselines=True)
