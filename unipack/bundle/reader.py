"""``unipack.open``: an open bundle, its members, and members materialised on demand.

Loading a member reads only the blobs it needs (each tensor's mean and basis, its own
coefficients and raw tensors), never another member's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unipack.core.reconstruct import reconstruct
from unipack.errors import MemberNotFoundError, UnipackError
from unipack.format import dtypes
from unipack.format.container import BundleFile
from unipack.format.manifest import Manifest, MemberRecord, TensorRecord
from unipack.bundle.lora import dense_update, factor_arrays, factor_entries, fan_in_fan_out, update_key
from unipack.bundle.summary import BundleSummary, summarize

if TYPE_CHECKING:
    import torch



class BundleReader:
    """A validated .upk bundle. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = BundleFile(path)
        self.path = self._file.path
        self.manifest: Manifest = self._file.manifest
        self.header = self._file.header

    @property
    def members(self) -> list[str]:
        return [m.name for m in self.manifest.members]

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.manifest.tensors]

    def member(self, name: str) -> MemberRecord:
        try:
            return self.manifest.member(name)
        except KeyError:
            shown = ", ".join(self.members[:8]) + (" ..." if len(self.members) > 8 else "")
            raise MemberNotFoundError(f"{self.path}: no member {name!r}; members: {shown} "
                                      f"(see `unipack info {self.path}`)") from None

    def iter_arrays(self, member: str) -> Iterator[tuple[TensorRecord, str, np.ndarray]]:
        """``(record, dtype, array)`` for each tensor of ``member``; arrays held as ``holder(dtype)``."""
        rec = self.member(member)
        coefs = self._file.read_blob(rec.coefficients) if rec.coefficients else None
        offsets = self.manifest.coef_offsets(rec)
        for t in self.manifest.tensors:
            dtype = rec.dtype_of(t)
            if t.storage == "lora":  # a LoRA module: the member's two factors, if it touches it
                core = self._core(t, coefs, offsets)
                yield from factor_arrays(self.manifest, self._file.read_blob, t, rec, core)
            elif t.name in rec.raw:  # a raw tensor, or one this member overrides (spec §4.4)
                yield t, dtype, self._file.read_blob(rec.raw[t.name])
            elif t.storage == "exact":
                assert t.blob is not None
                yield t, dtype, self._file.read_blob(t.blob)
            else:
                yield t, dtype, dtypes.from_float(self._shared_values(t, coefs, offsets), dtype)

    def _shared_values(self, t: TensorRecord, coefs: np.ndarray | None,
                       offsets: dict[str, tuple[int, int]]) -> np.ndarray:
        assert t.mean is not None
        mean_blob = self.manifest.blobs[t.mean]
        mean = dtypes.to_float(self._file.read_blob(t.mean), mean_blob.dtype)
        if t.rank == 0 or coefs is None or t.basis is None:
            return reconstruct(t, mean, None, None)
        basis_blob = self.manifest.blobs[t.basis]
        basis = dtypes.to_float(self._file.read_blob(t.basis), basis_blob.dtype)
        lo, hi = offsets[t.name]
        coef = dtypes.to_float(coefs[lo:hi], basis_blob.dtype).reshape(t.coef_shape())
        return reconstruct(t, mean, basis, coef)

    def _core(self, t: TensorRecord, coefs: np.ndarray | None,
              offsets: dict[str, tuple[int, int]]) -> np.ndarray | None:
        """A LoRA module's core for the member whose coefficients are ``coefs`` (float64), if stored."""
        if t.name not in offsets or coefs is None:
            return None
        lo, hi = offsets[t.name]
        basis = t.left or t.right  # a stored core means both ranks > 0; cores share the bases' dtype
        assert basis is not None
        return dtypes.to_float(coefs[lo:hi], self.manifest.blobs[basis].dtype).reshape(t.coef_shape())

    @property
    def is_lora(self) -> bool:
        """Whether this bundle holds PEFT LoRA adapters (its members are adapters, not models)."""
        return any(t.storage == "lora" for t in self.manifest.tensors)

    def mean_values(self, t: TensorRecord) -> np.ndarray:
        """A shared tensor's stored mean as float64, in the tensor's shape."""
        assert t.mean is not None and t.shape is not None
        return dtypes.to_float(self._file.read_blob(t.mean), self.manifest.blobs[t.mean].dtype).reshape(t.shape)

    def read_blob(self, name: str) -> np.ndarray:
        """One blob's array (held as ``dtypes.holder(dtype)``), checksum verified."""
        return self._file.read_blob(name)

    def coef_dtype(self) -> str:
        """The dtype bases and coefficients are stored in (the merge's ``--dtype``)."""
        for t in self.manifest.tensors:
            for blob in (t.basis, t.left, t.right):
                if blob is not None:
                    return self.manifest.blobs[blob].dtype
        return {"float16": "F16", "bfloat16": "BF16"}.get(str(self.manifest.options.get("dtype")), "F32")

    def load_numpy(self, member: str) -> dict[str, tuple[str, np.ndarray]]:
        """``{name: (dtype, array)}`` with arrays held as ``dtypes.holder(dtype)``."""
        return {t.name: (dtype, array) for t, dtype, array in self.iter_arrays(member)}

    def load(self, member: str, *, lora: str = "factors") -> dict[str, "torch.Tensor"]:
        """Member ``member`` as a torch state dict (same names, shapes and dtypes as its original).

        For a LoRA bundle, ``lora="factors"`` (the default) gives the adapter file's keys (PEFT
        factors and modules_to_save tensors); ``lora="updates"`` gives only the dense updates
        ΔŴ, keyed by the base model's weight they add to (``<module>.weight``, in that weight's
        layout), in the member's dtype.
        """
        from unipack.format.torch_bridge import to_torch

        if lora not in ("factors", "updates"):
            raise ValueError(f"lora must be 'factors' or 'updates', not {lora!r}")
        if lora == "updates":
            return {key: to_torch(array, dtype) for key, dtype, array in self.iter_updates(member)}
        return {t.name: to_torch(array, dtype) for t, dtype, array in self.iter_arrays(member)}

    def iter_updates(self, member: str) -> Iterator[tuple[str, str, np.ndarray]]:
        """``(base weight key, dtype, ΔŴ)`` for each LoRA module ``member`` touches (one at a time:
        a dense update is out x in, so only one is held)."""
        if not self.is_lora:
            raise UnipackError(f"{self.path}: holds full checkpoints, not LoRA adapters; there are no updates "
                               f"to load (use load(member))")
        rec = self.member(member)
        coefs = self._file.read_blob(rec.coefficients) if rec.coefficients else None
        offsets = self.manifest.coef_offsets(rec)
        transposed = fan_in_fan_out(rec)
        for t in self.manifest.tensors:
            if t.storage != "lora" or t.name not in rec.lora:
                continue
            update = dense_update(self.manifest, self._file.read_blob, t, rec, self._core(t, coefs, offsets))
            dtype = rec.dtype_of(t)
            yield update_key(t.name), dtype, dtypes.from_float(update.T if transposed else update, dtype)

    def tensor_entries(self, member: str) -> list[tuple[str, str, tuple[int, ...], int]]:
        """``(name, dtype, shape, nbytes)`` of each tensor of ``member``, in ``iter_arrays`` order,
        from the manifest alone: headers and shard plans are made before any data is read."""
        rec = self.member(member)
        entries = []
        for t in self.manifest.tensors:
            dtype = rec.dtype_of(t)
            if t.storage == "lora":
                entries.extend((key, dtype, shape, shape[0] * shape[1] * dtypes.itemsize(dtype))
                               for key, shape in factor_entries(t, rec))
                continue
            shape = self.manifest.blobs[rec.raw[t.name]].shape if t.name in rec.raw else t.shape
            assert shape is not None
            numel = 1
            for d in shape:
                numel *= d
            entries.append((t.name, dtype, tuple(shape), numel * dtypes.itemsize(dtype)))
        return entries

    def verify(self) -> list[str]:
        """Check every blob (checksum, decoding) and rebuild every member; never writes anything.

        Returns one line per problem found; an empty list means the bundle is sound. Opening the
        bundle already validated its header and manifest.
        """
        problems = []
        for name in self.manifest.blobs:
            try:
                self._file.read_blob(name)
            except UnipackError as exc:
                problems.append(str(exc))
        if problems:
            return problems
        for member in self.members:
            try:
                for _ in self.iter_arrays(member):
                    pass
            except UnipackError as exc:
                problems.append(f"member {member!r}: {exc}")
        return problems

    def header_bytes(self) -> bytes:
        """The file's header as stored (length prefix + JSON + padding), for byte accounting."""
        return self._file.read_header_bytes()

    def summary(self) -> BundleSummary:
        """Bytes by part, ratio and worst errors (what ``unipack info`` prints)."""
        return summarize(self.manifest, self._file.header)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<unipack.Bundle {str(self.path)!r}: {len(self.members)} members>"
