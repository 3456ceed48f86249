"""What a storage scheme is: one class that owns everything about one way of storing a tensor.

A scheme reads and validates its own manifest fields (``parse_params``; its params class writes
them back), rebuilds a member's tensor from its blobs (``member_arrays``), says which part of
the file each of its blobs is (``blob_parts``), how it compares with the baselines
(``projected``, ``replaced_by_mean``, ``baseline_mean``), and joins a new member (``add``).
The merge side (fitting under a rank rule) lives with the scheme where it has one (``rows``,
``flat``: ``fit``; the LoRA forms: ``unipack.pack.lora``). Defaults below fit a scheme that
stores nothing per member; each scheme overrides what it does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from unipack.core.fidelity import EXACT, MemberFidelity
from unipack.errors import InputError
from unipack.format import dtypes
from unipack.format.manifest import BlobRecord, Manifest, MemberRecord, StorageParams, TensorRecord
from unipack.format.manifest.doc import Doc

if TYPE_CHECKING:
    from unipack.options import MergeOptions

#: (tensor name as a file of the member holds it, dtype, array held as ``dtypes.holder(dtype)``)
Array = tuple[TensorRecord, str, np.ndarray]
ReadBlob = Callable[[str], np.ndarray]
#: The referenced base model's tensor for a bundle tensor name (held as its dtype, its sha256
#: verified); raises where no base was given (``unipack.bundle.base_model``).
ReadBase = Callable[[str], np.ndarray]


def no_base(name: str) -> np.ndarray:
    """A ``ReadBase`` where none was given: reading the bundle's members checks before decoding
    that none needs the base (and says which bundle and member), so reaching this is a bug."""
    raise AssertionError(f"tensor {name!r} needs the base model, and none was given")


@dataclass
class MemberView:
    """What a scheme needs to rebuild one member: the manifest, the member, its blobs."""

    manifest: Manifest
    member: MemberRecord
    read_blob: ReadBlob  # a blob's array, checksum verified
    _coefficients: np.ndarray | None = None
    _offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    _codes: np.ndarray | None = None
    _code_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    read_base: ReadBase = no_base  # the base model's tensors, for delta tensors centred on it

    @classmethod
    def of(
        cls, manifest: Manifest, member: MemberRecord, read_blob: ReadBlob, read_base: ReadBase = no_base
    ) -> MemberView:
        # ``is not None``: a blob may be called "" (blob names are not normative, spec §3.5).
        coefficients = read_blob(member.coefficients) if member.coefficients is not None else None
        codes = read_blob(member.codes) if member.codes is not None else None
        return cls(
            manifest,
            member,
            read_blob,
            coefficients,
            manifest.coef_offsets(member),
            codes,
            manifest.code_offsets(member),
            read_base,
        )

    def codes(self, t: TensorRecord) -> np.ndarray | None:
        """The member's packed codes for ``t`` (uint8 bytes), None if it has none."""
        if t.name not in self._code_offsets or self._codes is None:
            return None
        lo, hi = self._code_offsets[t.name]
        return self._codes[lo:hi]

    def values(self, blob: str) -> np.ndarray:
        """A blob as float64 values."""
        return dtypes.to_float(self.read_blob(blob), self.manifest.blobs[blob].dtype)

    def coefficients(self, t: TensorRecord) -> np.ndarray | None:
        """The member's block of coefficients for ``t`` as float64, in its shape; None if it has none."""
        if t.name not in self._offsets or self._coefficients is None:
            return None
        assert self.member.coefficients is not None
        lo, hi = self._offsets[t.name]
        dtype = self.manifest.blobs[self.member.coefficients].dtype
        return dtypes.to_float(self._coefficients[lo:hi], dtype).reshape(t.coef_shape(self.member))

    def override(self, t: TensorRecord) -> Array | None:
        """The member's own copy of ``t`` where it holds one (raw tensors, overrides, spec §4.4)."""
        if t.name not in self.member.raw:
            return None
        return t, self.member.dtype_of(t), self.read_blob(self.member.raw[t.name])


class AddContext(Protocol):
    """What ``unipack add`` offers a scheme joining a new member to one of its records."""

    old: Manifest
    options: MergeOptions
    coef_dtype: str

    def read_blob(self, name: str) -> np.ndarray:
        """A blob of the bundle being added to, checksum verified."""

    def read_base(self, name: str) -> np.ndarray:
        """The referenced base model's tensor for bundle tensor ``name``, sha256 verified."""

    def store_raw(
        self,
        t: TensorRecord,
        dtype: str,
        array: np.ndarray,
        kind: str,
        reason: str,
        over_budget: bool = False,
        fidelity: MemberFidelity = EXACT,
    ) -> None:
        """Keep the member's own tensor, bit-exact (a raw tensor, or an override)."""

    def keep(
        self,
        t: TensorRecord,
        kind: str,
        error: float,
        reason: str,
        fidelity: MemberFidelity,
        coefficients: np.ndarray | None = None,
        codes: np.ndarray | None = None,
    ) -> None:
        """Record the member's tensor as rebuilt from the record (and its coefficients and packed
        codes, if any)."""


class Scheme(ABC):
    name: str = ""  # registry name; its params class has the same ``scheme_name``
    storage: str = ""  # the manifest's "storage"
    variant: tuple[str, str] | None = None  # (field, value) telling it from the other schemes of its storage
    shape_optional = False
    float_only = True
    min_format_version = 1
    lora = False  # whether its records are LoRA modules (members are adapters)

    @property
    def label(self) -> str:
        """``shared/rows``, ``lora/factors``, ``raw``: how ``info`` counts tensors by storage."""
        return f"{self.storage}/{self.variant[1]}" if self.variant else self.storage

    # -- the manifest ----------------------------------------------------------------------------

    @abstractmethod
    def parse_params(self, d: Doc, base: TensorRecord) -> StorageParams:
        """The scheme's params from its record (``base`` carries the common fields, validated)."""

    # -- reading a member ------------------------------------------------------------------------

    @abstractmethod
    def member_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        """The member's tensor(s) for record ``t``: one for a dense tensor, a LoRA module's two factors."""

    def member_entries(
        self, t: TensorRecord, member: MemberRecord, blobs: dict[str, BlobRecord]
    ) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of what ``member_arrays`` yields, from the manifest alone."""
        shape = blobs[member.raw[t.name]].shape if t.name in member.raw else t.shape
        assert shape is not None
        return [(t.name, member.dtype_of(t), tuple(shape))]

    def member_update(self, view: MemberView, t: TensorRecord) -> np.ndarray | None:
        """A LoRA module's dense update ΔŴ (out x in, float64) for the member, if it touches it."""
        return None

    # -- bytes -----------------------------------------------------------------------------------

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        """Each blob the record owns (its own, and the members' copies) -> its part of the file
        (``means``, ``bases``, ``factors``, ``raw``, ``exact``; coefficient blobs are the members')."""
        return {m.raw[t.name]: "raw" for m in manifest.members if t.name in m.raw}

    def rank(self, t: TensorRecord) -> int | None:
        """The rank of a decomposed tensor (``info``'s rank statistics), None for other storages."""
        return None

    def rank_text(self, t: TensorRecord) -> str:
        return "-"

    def report_scheme(self, t: TensorRecord) -> str | None:
        """The report's scheme column."""
        return None

    def original_bytes(self, t: TensorRecord, member: MemberRecord, manifest: Manifest) -> int:
        """What the member's original holds for this tensor (the weight of its error in a mean)."""
        shape = manifest.blobs[member.raw[t.name]].shape if t.name in member.raw else t.shape or ()
        return math.prod(shape) * dtypes.itemsize(member.dtype_of(t))

    def mean_only_change(self, t: TensorRecord, manifest: Manifest, stored: dict[str, int]) -> int:
        """Bytes a rank-0 bundle would hold for this tensor minus what the bundle holds beyond its
        bases and coefficients (0: the same)."""
        return 0

    # -- baselines -------------------------------------------------------------------------------

    def compared(self, t: TensorRecord) -> bool:
        """Whether the report compares this tensor's members with the baselines."""
        return False

    def projected(self, t: TensorRecord, member: MemberRecord) -> bool:
        """Whether the member's tensor comes from shared bases (not raw, an override or exact)."""
        return False

    def replaced_by_mean(self, t: TensorRecord, member: MemberRecord) -> bool:
        """Whether the mean-only baseline replaces this tensor of this member."""
        return False

    def baseline_mean(self, manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> np.ndarray | None:
        """The mean the mean-only baseline puts in place of the tensor (float64), or None."""
        return None

    def svd_budget(self, t: TensorRecord, n_members: int) -> float:
        """Numbers a member's own SVD may store at equal bytes (its coefficients + 1/N of the bases)."""
        return 0.0

    # -- unipack add -----------------------------------------------------------------------------

    def add(self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray) -> TensorRecord:
        """Join a new member's tensor; returns the record (changed if the member changes it)."""
        raise InputError(
            f"tensor {t.name!r}: adding a member to {self.label} storage is not supported; merge all the members again"
        )


class RebuiltScheme(Scheme):
    """A scheme whose members are rebuilt from the record's blobs (a mean and quantized deltas, a
    subspace), except where a member holds the tensor as its own: an override (spec §4.4), which
    takes precedence when reading, and which ``add`` writes for a new member whose tensor holds
    NaN or inf (no rebuild can be faithful to those)."""

    def member_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        own = view.override(t)
        if own is not None:
            yield own
        else:
            yield from self.rebuilt_arrays(view, t)

    @abstractmethod
    def rebuilt_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        """The member's tensor as the record rebuilds it (the member does not override it)."""

    def add(self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray) -> TensorRecord:
        values = dtypes.to_float(array, dtype)
        if not np.isfinite(values).all():
            ctx.store_raw(t, dtype, array, "override", "holds NaN or inf values: stored raw, bit-exact")
            return t
        return self.add_finite(ctx, t, dtype, array, values)

    @abstractmethod
    def add_finite(
        self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray, values: np.ndarray
    ) -> TensorRecord:
        """``add`` for a new member's finite tensor (``values``: ``array`` as float64)."""
