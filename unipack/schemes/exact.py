"""``exact``: one blob that every member holds bit for bit (frozen layers, buffers, integer
tensors identical everywhere; spec §4.3). A member that differs holds its own copy (an override)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core.fidelity import EXACT
from unipack.format.manifest import BlobRef, Manifest, StorageParams, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import AddContext, Array, MemberView, Scheme
from unipack.schemes.registry import register


@dataclass(frozen=True)
class ExactParams(StorageParams):
    scheme_name: ClassVar[str] = "exact"
    blob: str | None = None  # the one blob all members share

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {"blob": self.blob}

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        return [BlobRef(self.blob, f"tensor {tensor.name!r}", tensor.shape, tensor.dtype)]


class ExactScheme(Scheme):
    name = storage = "exact"
    float_only = False

    def parse_params(self, d: Doc, base: TensorRecord) -> ExactParams:
        return ExactParams(blob=d.text("blob"))

    def member_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        own = view.override(t)
        if own is not None:
            yield own
            return
        blob = _blob(t)
        yield t, view.member.dtype_of(t), view.read_blob(blob)

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        return {_blob(t): "exact", **super().blob_parts(t, manifest)}

    def add(self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray) -> TensorRecord:
        shared = ctx.read_blob(_blob(t))
        if dtype == t.dtype and array.tobytes() == shared.tobytes():
            ctx.keep(t, "exact", 0.0, "identical to the bundle's shared copy", EXACT)
            return t
        what = "values differ" if dtype == t.dtype else f"dtype {dtype} differs"
        ctx.store_raw(t, dtype, array, "override", f"its {what} from the bundle's exact copy ({t.dtype}): stored raw")
        return t


def _blob(t: TensorRecord) -> str:
    assert isinstance(t.params, ExactParams) and t.params.blob is not None
    return t.params.blob


EXACT_SCHEME = register(ExactScheme())
