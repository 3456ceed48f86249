"""``unipack.open``: an open bundle, its members, and members materialised on demand.

Loading a member reads only the blobs it needs (each tensor's mean and basis, its own
coefficients and raw tensors), never another member's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from unipack.allocator import reuse_freed_memory
from unipack.bundle.base_model import BASE_OPTION, BaseModel, base_text, missing_base_message, needs_base
from unipack.bundle.exact import ExactMember, default_threads
from unipack.bundle.lora import AdapterParts, fan_in_fan_out, update_key
from unipack.bundle.ordered import in_order
from unipack.bundle.summary import BundleSummary, summarize
from unipack.errors import InputError, MemberNotFoundError, UnipackError
from unipack.format import codec, dtypes
from unipack.format.container import BundleFile
from unipack.format.manifest import BaseReference, Manifest, MemberRecord, TensorRecord
from unipack.schemes import MemberView, is_lora, scheme_of
from unipack.schemes.shared import stored_mean

if TYPE_CHECKING:
    import torch


class BundleReader:
    """A validated .upk bundle. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> None:
        self._file = BundleFile(path)
        self.path = self._file.path
        self.manifest: Manifest = self._file.manifest
        self.header = self._file.header
        self._base: BaseModel | None = None
        if base is not None:
            try:
                self.attach_base(base)
            except BaseException:
                self.close()
                raise

    def attach_base(self, base: str | os.PathLike[str]) -> None:
        """Give the base model this bundle's delta tensors are centred on (``merge --base``, spec
        §11): a .safetensors file or a model folder whose referenced tensors have the recorded
        names, dtypes, shapes and sha256s (checked on open, the hashes on every read). A bundle
        that references no base refuses it."""
        if self._base is not None:
            self._base.close()
            self._base = None
        self._base = BaseModel(base, self.manifest, str(self.path))

    @property
    def base_reference(self) -> BaseReference | None:
        """The base model the bundle references but does not store, if any."""
        return self.manifest.base

    def read_base(self, name: str) -> np.ndarray:
        """The base model's tensor for bundle tensor ``name``, checked (the base must be given)."""
        if self._base is None:
            assert self.manifest.base is not None
            raise InputError(
                f"{self.path}: tensor {name!r} is a delta from the base model {base_text(self.manifest.base)}; "
                f"pass {BASE_OPTION} (Python: unipack.open(bundle, base=PATH))"
            )
        return self._base.read(name)

    def _require_base(self, member: MemberRecord) -> None:
        """One line before any decoding where ``member`` needs the base and none was given."""
        if self._base is None and self.manifest.base is not None:
            needed = needs_base(self.manifest, member)
            if needed:
                raise InputError(missing_base_message(str(self.path), member.name, self.manifest.base, needed))

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
            raise MemberNotFoundError(
                f"{self.path}: no member {name!r}; members: {shown} (see `unipack info {self.path}`)"
            ) from None

    def view(self, member: str) -> MemberView:
        """What a scheme needs to rebuild ``member`` (its coefficient blob is read once, here)."""
        rec = self.member(member)
        self._require_base(rec)
        return MemberView.of(self.manifest, rec, self._file.read_blob, self.read_base)

    def iter_arrays(
        self, member: str, *, exact: bool = False, threads: int | None = None
    ) -> Iterator[tuple[TensorRecord, str, np.ndarray]]:
        """``(record, dtype, array)`` for each tensor of ``member``; arrays held as ``holder(dtype)``.
        A LoRA module yields its two factors (records named by their keys), if the member touches it.
        ``exact``: the original bits from the lossless tier (spec §9), each tensor's sha256 checked.
        Either way tensors are rebuilt on ``threads`` threads (default: one per core, up to 4; the
        order is the same, and so are the arrays)."""
        reuse_freed_memory()  # a member's arrays are tensor-sized blocks, made and freed tensor by tensor
        if exact:
            rec = self.member(member)
            self._require_base(rec)
            rebuilt = ExactMember(
                self.manifest,
                rec,
                self._file.read_blob,
                str(self.path),
                threads=threads,
                chunks=self._file,
                read_unverified=self._file.read_unverified,
                read_base=self.read_base,
            )
            yield from rebuilt.arrays()
            return
        with codec.scratch_buffer():  # one zstd output buffer for the member's shared blobs
            view = self.view(member)
        # Tensors rebuilt side by side (``in_order``: the manifest's order, a few ahead at most).
        yield from in_order(
            lambda t: list(scheme_of(t).member_arrays(view, t)),
            self.manifest.tensors,
            default_threads() if threads is None else max(1, threads),
            "unipack-load",
        )

    @property
    def is_lora(self) -> bool:
        """Whether this bundle holds PEFT LoRA adapters (its members are adapters, not models)."""
        return is_lora(self.manifest)

    def mean_values(self, t: TensorRecord) -> np.ndarray:
        """A shared tensor's stored mean as float64, in the tensor's shape."""
        return stored_mean(self.manifest, self._file.read_blob, t)

    def read_blob(self, name: str) -> np.ndarray:
        """One blob's array (held as ``dtypes.holder(dtype)``), checksum verified."""
        return self._file.read_blob(name)

    def coef_dtype(self) -> str:
        """The dtype bases and coefficients are stored in (the merge's ``--dtype``)."""
        return self.manifest.coefficient_dtype()

    def load_numpy(
        self, member: str, *, exact: bool = False, threads: int | None = None
    ) -> dict[str, tuple[str, np.ndarray]]:
        """``{name: (dtype, array)}`` with arrays held as ``dtypes.holder(dtype)`` (``exact``: bit for
        bit, from the lossless tier, on ``threads`` threads as in :meth:`iter_arrays`)."""
        arrays = self.iter_arrays(member, exact=exact, threads=threads)
        return {t.name: (dtype, array) for t, dtype, array in arrays}

    @property
    def has_exact_tier(self) -> bool:
        """Whether every member can be extracted bit for bit (``merge --lossless``)."""
        return all(m.exact is not None for m in self.manifest.members)

    def load(self, member: str, *, lora: str = "factors") -> dict[str, torch.Tensor]:
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
            raise UnipackError(
                f"{self.path}: holds full checkpoints, not LoRA adapters; there are no updates "
                f"to load (use load(member))"
            )
        view = self.view(member)
        transposed = fan_in_fan_out(view.member)
        for t in self.manifest.tensors:
            update = scheme_of(t).member_update(view, t)
            if update is None:
                continue
            dtype = view.member.dtype_of(t)
            yield update_key(t.name), dtype, dtypes.from_float(update.T if transposed else update, dtype)

    def adapter_parts(self, member: str) -> AdapterParts:
        """Adapter ``member`` as changes to its base model's tensors, keyed by the base's names:
        the LoRA updates (float64, rebuilt one at a time) and its own copies of base tensors."""
        if not self.is_lora:
            raise UnipackError(
                f"{self.path}: holds full checkpoints, not LoRA adapters; a base model applies to LoRA bundles only"
            )
        return AdapterParts.of(self.view(member))

    def tensor_entries(self, member: str) -> list[tuple[str, str, tuple[int, ...], int]]:
        """``(name, dtype, shape, nbytes)`` of each tensor of ``member``, in ``iter_arrays`` order,
        from the manifest alone: headers and shard plans are made before any data is read."""
        rec = self.member(member)
        entries = []
        for t in self.manifest.tensors:
            for name, dtype, shape in scheme_of(t).member_entries(t, rec, self.manifest.blobs):
                entries.append((name, dtype, shape, math.prod(shape) * dtypes.itemsize(dtype)))
        return entries

    def verify(self) -> list[str]:
        """Check every blob (checksum, decoding) and rebuild every member; never writes anything.

        Returns one line per problem found; an empty list means the bundle is sound. Opening the
        bundle already validated its header and manifest.
        """
        problems = []
        try:  # the members' numbers (a version-9 section is otherwise read only when shown)
            for m in self.manifest.members:
                m.resolved_numbers  # noqa: B018
        except UnipackError as exc:
            problems.append(str(exc))
        for name in self.manifest.blobs:
            try:
                self._file.read_blob(name)
            except UnipackError as exc:
                problems.append(str(exc))
        if problems:
            return problems
        if self._base is not None and self.manifest.base is not None:
            # A wrong base fails every member alike: said once, about the base.
            try:
                for name in self.manifest.base.tensors:
                    self._base.read(name)
            except UnipackError as exc:
                return [str(exc)]
        skipped = set(self.unverified_members())
        for member in self.members:
            if member in skipped:  # its blobs' checksums were checked above; its rebuild needs the base
                continue
            try:
                for _ in self.iter_arrays(member):
                    pass
                if self.member(member).exact is not None:  # every residual decodes to its sha256
                    for _ in self.iter_arrays(member, exact=True):
                        pass
            except UnipackError as exc:
                problems.append(f"member {member!r}: {exc}")
        return problems

    def unverified_members(self) -> list[str]:
        """Members ``verify`` cannot rebuild: they need the base model, which was not given."""
        if self._base is not None or self.manifest.base is None:
            return []
        return [m.name for m in self.manifest.members if needs_base(self.manifest, m)]

    def header_bytes(self) -> bytes:
        """The file's header as stored (length prefix + JSON + padding), for byte accounting."""
        return self._file.read_header_bytes()

    def summary(self) -> BundleSummary:
        """Bytes by part, ratio and worst errors (what ``unipack info`` prints)."""
        # The header bytes come through the open descriptor: read by name, they could be those
        # of a newer bundle renamed over the path since this one was opened.
        return summarize(self.manifest, self._file.header, self._file.read_header_bytes())

    def close(self) -> None:
        if self._base is not None:
            self._base.close()
            self._base = None
        self._file.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<unipack.Bundle {str(self.path)!r}: {len(self.members)} members>"
