"""A member bit for bit, from the bundle's lossless tier (spec §9.2): ``extract --exact``.

Each tensor is the lossy tier's array where that is already exact (raw and exact storage, a
member's overrides), else its residual blob decoded against its prediction (the stored mean
rounded to the member's dtype, or another member's exact tensor). Every tensor's bytes are
checked against the sha256 the merge recorded from the original, so a damaged bundle or a
reader that rebuilt a prediction differently fails loudly instead of returning other bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from unipack.core import residual
from unipack.errors import ChecksumError, UnipackError
from unipack.format import codec, dtypes
from unipack.format.manifest import ExactEntry, Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.records import MEAN_BASE
from unipack.schemes import MemberView, scheme_of
from unipack.schemes.delta import DeltaParams

ReadBlob = Callable[[str], np.ndarray]
Array = tuple[TensorRecord, str, np.ndarray]


def mean_values(t: TensorRecord, read_blob: ReadBlob, blob_dtype: str) -> np.ndarray:
    """A ``shared`` or ``delta`` tensor's stored mean as float64 (spec §9.2: the mean prediction)."""
    held = read_blob(t.mean)
    if isinstance(t.params, DeltaParams):
        return t.params.mean_values(held, blob_dtype)
    return dtypes.to_float(held, blob_dtype)


def mean_prediction(values: np.ndarray, dtype: str) -> np.ndarray:
    """The mean rounded to the member's dtype (spec §4 step 3; F16 directly from float64), as bits."""
    return residual.as_bits(dtypes.from_float(values, dtype))


def stored_mean_prediction(t: TensorRecord, read_blob: ReadBlob, blob_dtype: str, dtype: str) -> np.ndarray:
    """The mean prediction of spec §9.2 as bits. A float mean blob already at the member's dtype is
    its own rounding (widening is exact, and rounding an exact value gives it back; a mean holds no
    NaN), so its bits are used as they are: two passes over a float64 copy fewer."""
    if blob_dtype == dtype and getattr(t.params, "mean_step", None) is None:
        return residual.as_bits(read_blob(t.mean))
    return mean_prediction(mean_values(t, read_blob, blob_dtype), dtype)


class ExactMember:
    """Rebuilds one member's tensors bit for bit (``view``: the member's lossy view)."""

    def __init__(self, manifest: Manifest, member: MemberRecord, read_blob: ReadBlob, where: str) -> None:
        if member.exact is None:
            raise UnipackError(
                f"{where}: member {member.name!r} has no lossless tier (only members merged with "
                f"--lossless have one); extract it without --exact for the lossy member"
            )
        self.manifest, self.member, self.read_blob, self.where = manifest, member, read_blob, where
        self._views: dict[str, MemberView] = {}

    def _view(self, member: MemberRecord) -> MemberView:
        if member.name not in self._views:
            self._views[member.name] = MemberView.of(self.manifest, member, self.read_blob)
        return self._views[member.name]

    def arrays(self) -> Iterator[Array]:
        assert self.member.exact is not None
        for t in self.manifest.tensors:
            dtype = self.member.dtype_of(t)
            entry = self.member.exact[t.name]
            if entry.blob is None:
                for record, dt, array in scheme_of(t).member_arrays(self._view(self.member), t):
                    self._check(self.member, t, entry, dtypes.to_bytes(array, dt))
                    yield record, dt, array
                continue
            bits = self._bits(self.member, t, entry)
            yield t, dtype, bits.view(dtypes.holder(dtype)).reshape(t.shape or ())

    def _bits(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry) -> np.ndarray:
        """The member's exact bits of ``t``, checked against the recorded sha256."""
        dtype = member.dtype_of(t)
        if entry.blob is None:  # a base member whose lossy tier is exact (raw, override)
            arrays = list(scheme_of(t).member_arrays(self._view(member), t))
            bits = residual.as_bits(np.ascontiguousarray(arrays[0][2], dtype=dtypes.holder(dtype)))
        else:
            r = residual.as_bits(self.read_blob(entry.blob))
            prediction = None
            if entry.base == MEAN_BASE:
                prediction = stored_mean_prediction(t, self.read_blob, self.manifest.blobs[t.mean].dtype, dtype)
            elif entry.base is not None:
                base = self.manifest.member(entry.base)
                assert base.exact is not None  # checked when the manifest was read
                prediction = self._bits(base, t, base.exact[t.name])
            bits = residual.decode(r, prediction, str(entry.coding))
        self._check(member, t, entry, bits.view(np.uint8).data)  # hashed in place, not copied
        return bits

    def _check(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry, data: bytes | memoryview) -> None:
        if codec.sha256(data) != entry.sha256:
            raise ChecksumError(
                f"{self.where}: member {member.name!r} tensor {t.name!r} does not match the sha256 of its "
                f"original (the lossless tier is damaged); re-download or re-merge the bundle"
            )
