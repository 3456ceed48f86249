"""``raw``: every member's own copy of the tensor, bit-exact (spec §4.2).

For task-specific tensors (heads whose shapes differ, ``--raw`` patterns), NaN or integer data
that differs between members, and tensors cheaper raw than decomposed (``raw_cause: budget``,
which a mean-only bundle would still replace by the members' mean).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core.fidelity import EXACT, MemberFidelity
from unipack.core.linalg import rel_error
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import Manifest, MemberRecord, StorageParams, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import AddContext, Array, MemberView, ReadBlob, Scheme
from unipack.schemes.registry import register

#: Why a tensor is raw: asked for (``--raw``, shapes differ), cheaper (``budget``), or its values.
RAW_CAUSES = ("requested", "budget", "values")


@dataclass(frozen=True)
class RawParams(StorageParams):
    scheme_name: ClassVar[str] = "raw"
    raw_cause: str | None = None  # requested | budget | values

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {} if self.raw_cause is None else {"raw_cause": self.raw_cause}

    def member_blobs(self, tensor: TensorRecord, member: MemberRecord) -> list[tuple[str, tuple[int, ...] | None]]:
        return [(tensor.name, tensor.shape)]


class RawScheme(Scheme):
    name = storage = "raw"
    shape_optional = True
    float_only = False

    def parse_params(self, d: Doc, base: TensorRecord) -> RawParams:
        cause = d.doc.get("raw_cause")
        if cause is not None and cause not in RAW_CAUSES:
            raise FormatError(f"{d.where}: field 'raw_cause' is {cause!r}, expected one of {RAW_CAUSES}")
        return RawParams(raw_cause=cause)

    def member_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        own = view.override(t)
        assert own is not None  # the manifest reader checked every member holds it
        yield own

    def compared(self, t: TensorRecord) -> bool:
        return _cause(t) == "budget"

    def replaced_by_mean(self, t: TensorRecord, member: MemberRecord) -> bool:
        # Only tensors kept raw because raw was cheaper: not heads, not NaN or integer data.
        return _cause(t) == "budget"

    def mean_only_change(self, t: TensorRecord, manifest: Manifest, stored: dict[str, int]) -> int:
        if _cause(t) != "budget":
            return 0
        copies = [stored[m.raw[t.name]] for m in manifest.members]
        return -(sum(copies) - max(copies, default=0))  # one mean in place of N copies

    def baseline_mean(self, manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> np.ndarray | None:
        """The members' mean of their copies, at the widest member precision."""
        if _cause(t) != "budget":
            return None
        total = None
        member_dtypes = set()
        for m in manifest.members:
            dtype = m.dtype_of(t)
            member_dtypes.add(dtype)
            values = dtypes.to_float(read_blob(m.raw[t.name]), dtype)
            total = values if total is None else total + values
        assert total is not None
        return dtypes.round_trip(total / len(manifest.members), dtypes.widest_float(frozenset(member_dtypes)))

    def add(self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray) -> TensorRecord:
        """Stored raw, as for every member; the record changes if the new member's shape differs."""
        reason = f"stored raw, as for every member: {t.reason}"
        cause = _cause(t)
        if t.shape is not None and array.shape != t.shape:
            # The record promised one shape for every member; now it varies (spec 3.2), which
            # the spec files under "requested" (a mean-only baseline cannot replace it any more).
            cause = "requested" if cause == "budget" else cause
            t = dataclasses.replace(t, shape=None, params=RawParams(raw_cause=cause))
        fidelity = _mean_only(ctx, t, dtype, array) if cause == "budget" else EXACT
        ctx.store_raw(t, dtype, array, "raw", reason, fidelity=fidelity)
        return t


def _cause(t: TensorRecord) -> str | None:
    assert isinstance(t.params, RawParams)
    return t.params.raw_cause


def _mean_only(ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray) -> MemberFidelity:
    """A tensor the merge kept raw only because raw was cheaper still has a mean-only baseline
    (spec 4.4), as merge records it: the mean of every member's copy, this one's included."""
    values = dtypes.to_float(array, dtype)
    total, kinds = values.copy(), {dtype}
    for m in ctx.old.members:
        kinds.add(m.dtype_of(t))
        total += dtypes.to_float(ctx.read_blob(m.raw[t.name]), m.dtype_of(t))
    mean = dtypes.round_trip(total / (len(ctx.old.members) + 1), dtypes.widest_float(frozenset(kinds)))
    norm = float(np.linalg.norm(values.ravel()))
    with np.errstate(invalid="ignore", over="ignore"):
        mean_error = rel_error(values, dtypes.round_trip(mean, dtype), norm)
    if not (math.isfinite(norm) and math.isfinite(mean_error)):  # NaN/inf somewhere: nothing to compare
        return EXACT
    return MemberFidelity(norm=norm, delta_error=0.0, mean_error=mean_error, svd_error=0.0, svd_rank=0)


RAW = register(RawScheme())
