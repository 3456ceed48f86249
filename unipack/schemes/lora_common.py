"""What the LoRA forms (storage ``lora``, spec §7, §10) share: a record is one LoRA module, shape
[out, in] of its update, standing for two keys of an adapter file, ``<module>.lora_A.weight``
(r x in) and ``<module>.lora_B.weight`` (out x r), in the members that touch it.

A member joined by ``unipack add`` may hold a module of any form as its own exact factors under
those two keys of its raw map (an *override*, spec §7.4): the record's shared bases, or its one
level count, were fitted without it and may not meet the bundle's rule for it."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from unipack.core import quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_quant import CastFactors, QuantizedFactors
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import (
    FORMAT_VERSION,
    LORA_OVERRIDE_FORMAT_VERSION,
    Manifest,
    MemberRecord,
    StorageParams,
    TensorRecord,
)
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import Array, MemberView, Scheme

if TYPE_CHECKING:
    from unipack.options import MergeOptions


@dataclass(frozen=True)
class LoraParams(StorageParams):
    lora_module: ClassVar[bool] = True
    per_member_blocks: ClassVar[bool] = True  # a member's blocks follow the modules it touches
    overridable: ClassVar[bool] = False  # its factors are stored under their own keys
    spectrum: tuple[float, ...] | None = None
    variance: float | None = None

    @property
    def form(self) -> str:
        """The manifest's ``form`` field: subspace or factors."""
        return self.scheme_name.removeprefix("lora-")

    def spectrum_doc(self) -> dict[str, Any]:
        return {} if self.spectrum is None else {"spectrum": list(self.spectrum), "variance": self.variance}

    def overridden(self, tensor: TensorRecord, member: MemberRecord | None) -> bool:
        """Whether ``member`` holds the module as its own factors instead of the form's storage
        (spec §7.4): it touches the module and its raw map has the module's A key."""
        return member is not None and tensor.name in member.lora and tensor.lora_keys[0] in member.raw

    def member_blobs(self, tensor: TensorRecord, member: MemberRecord) -> list[tuple[str, tuple[int, ...] | None]]:
        return factor_shapes(tensor, member) if self.overridden(tensor, member) else []

    def member_format_version(self, tensor: TensorRecord, member: MemberRecord) -> int:
        return LORA_OVERRIDE_FORMAT_VERSION if self.overridden(tensor, member) else FORMAT_VERSION


@dataclass(frozen=True)
class AdapterCandidate:
    """A new member's module stored in the record's own form, as ``unipack add`` would keep it;
    ``add`` compares it with the member's exact factors (an override) and keeps the cheaper one
    that meets the bundle's rule."""

    kind: str  # the add's outcome kind: projected (subspace) | quantized | cast
    cost: int  # its bytes in the bundle, compressed as written
    error: float  # ||ΔW - s B A|| / ||ΔW|| of the factors extraction returns
    numbers: float  # numbers at the coefficient dtype it takes (the SVD baseline at equal bytes)
    reason: str
    coefficients: np.ndarray | None = None  # its block of the member's coefficient blob
    codes: np.ndarray | None = None  # its packed codes, appended to the record's codes blob


class LoraAddContext(Protocol):
    """What ``unipack add`` offers a LoRA form pricing a new member's module (``pack.lora_add``,
    through the merge's own chooser, ``pack.lora.Pricing``)."""

    old: Manifest
    options: MergeOptions
    coef_dtype: str

    def read_blob(self, name: str) -> np.ndarray:
        """A blob of the bundle being added to, checksum verified."""

    def compressed(self, array: np.ndarray, dtype: str) -> int:
        """Bytes ``array`` (held as ``dtype``) takes in the bundle, compressed as written."""

    def quant_fit(self, f: LoraFactors, dtype: str, code_levels: int) -> tuple[int, int, QuantizedFactors] | None:
        """(bytes, level count, fit): the cheapest level count of the chooser's, no more than
        ``code_levels``, meeting the rule, its codes in ``code_levels``' alphabet; None if none does."""

    def cast_fit(self, f: LoraFactors, dtype: str) -> tuple[int, CastFactors] | None:
        """(bytes, fit): the balanced factors cast, where the merge would take that; else None."""


class LoraScheme(Scheme):
    storage = "lora"
    min_format_version = 2
    lora = True
    keeps_factors = False  # whether the form's storage is the members' own factors, bit-exact

    def parse_lora(self, d: Doc, base: TensorRecord) -> dict[str, Any]:
        assert base.shape is not None
        if len(base.shape) != 2 or 0 in base.shape:
            raise FormatError(f"{d.where}: a lora module's shape must be [out, in], got {list(base.shape)}")
        spectrum = d.numbers("spectrum", optional=True)
        return {"spectrum": spectrum, "variance": d.num("variance", optional=spectrum is None)}

    @abstractmethod
    def factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        """The member's factors (A, B) held as ``holder(dtype)``, from the form's storage; it
        touches the module and does not override it."""

    def held_factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        """The member's factors (A, B) as extraction returns them: its override, or the form's."""
        if _lora(t).overridden(t, view.member):
            a_key, b_key = t.lora_keys
            return view.read_blob(view.member.raw[a_key]), view.read_blob(view.member.raw[b_key])
        return self.factors(view, t)

    def overrides(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        """The override blobs of every member (``blob_parts``: the members' own factors)."""
        p = _lora(t)
        return {
            m.raw[key]: "factors" for m in manifest.members if p.overridden(t, m) for key in t.lora_keys if key in m.raw
        }

    def add_candidate(
        self, ctx: LoraAddContext, t: TensorRecord, f: LoraFactors, dtype: str
    ) -> AdapterCandidate | None:
        """A new member's module in this form (``f``: its factors, ``dtype``: theirs); None where
        the form keeps members' own factors anyway (``factors``) or cannot hold it."""
        return None

    def appended_blobs(self, t: TensorRecord) -> tuple[str, ...]:
        """Blobs of the record holding every member's data, which a new member's is appended to
        (``add`` rewrites them: the ``quant`` form's codes)."""
        return ()

    def member_update(self, view: MemberView, t: TensorRecord) -> np.ndarray | None:
        """s B A, from the factors extraction returns (rounded to the member's dtype)."""
        if t.name not in view.member.lora:
            return None
        _, scale = view.member.lora[t.name]
        dtype = view.member.dtype_of(t)
        a_held, b_held = self.held_factors(view, t)
        return scale * (dtypes.to_float(b_held, dtype) @ dtypes.to_float(a_held, dtype))

    def member_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        if t.name not in view.member.lora:
            return
        dtype = view.member.dtype_of(t)
        a_key, b_key = t.lora_keys
        a_held, b_held = self.held_factors(view, t)
        yield replace(t, name=a_key, shape=tuple(a_held.shape)), dtype, a_held
        yield replace(t, name=b_key, shape=tuple(b_held.shape)), dtype, b_held

    def member_entries(
        self, t: TensorRecord, member: MemberRecord, blobs: dict[str, Any]
    ) -> list[tuple[str, str, tuple[int, ...]]]:
        if t.name not in member.lora:
            return []
        assert t.shape is not None
        rank, dtype = member.lora[t.name][0], member.dtype_of(t)
        a_key, b_key = t.lora_keys
        return [(a_key, dtype, (rank, t.shape[1])), (b_key, dtype, (t.shape[0], rank))]

    def original_bytes(self, t: TensorRecord, member: MemberRecord, manifest: Manifest) -> int:
        assert t.shape is not None
        rank = member.lora[t.name][0] if t.name in member.lora else 0
        return rank * (t.shape[0] + t.shape[1]) * dtypes.itemsize(member.dtype_of(t))

    def mean_only_change(self, t: TensorRecord, manifest: Manifest, stored: dict[str, int]) -> int:
        # The adapters' own factors go; the mean update comes, stored as cheaply as it can be:
        # dense, or factored with the rank of the sum (at most the sum of the ranks).
        change = -sum(stored[m.raw[k]] for m in manifest.members for k in t.lora_keys if k in m.raw)
        assert t.shape is not None
        out_dim, in_dim = t.shape
        rank_sum = sum(m.lora[t.name][0] for m in manifest.members if t.name in m.lora)
        return change + min(out_dim * in_dim, rank_sum * (out_dim + in_dim)) * dtypes.itemsize(t.dtype)

    def compared(self, t: TensorRecord) -> bool:
        return True

    def replaced_by_mean(self, t: TensorRecord, member: MemberRecord) -> bool:
        # By the mean update of the adapters touching the module, in either form.
        return t.name in member.lora


def factor_shapes(t: TensorRecord, member: MemberRecord) -> list[tuple[str, tuple[int, ...] | None]]:
    """The keys of a member's two factors with their shapes: A is r x in, B is out x r."""
    if t.name not in member.lora:
        return []
    assert t.shape is not None
    rank = member.lora[t.name][0]
    a_key, b_key = t.lora_keys
    return [(a_key, (rank, t.shape[1])), (b_key, (t.shape[0], rank))]


class RecordCodes(Protocol):
    """A LoRA record with one codes blob holding every touching member's packed codes, in member
    order (``quant``, spec §10.1; ``subspace-factored``, §12.1)."""

    @property
    def levels(self) -> int | None: ...

    @property
    def codes(self) -> str | None: ...

    def member_code_bytes(self, tensor: TensorRecord, member: MemberRecord) -> int:
        """The member's bytes in the codes blob (0 where it has none)."""


def code_range(params: RecordCodes, manifest: Manifest, t: TensorRecord, member: MemberRecord) -> tuple[int, int]:
    """The member's byte range in the record's codes blob (whose length the manifest reader
    checked against every member's)."""
    lo = 0
    for m in manifest.members:
        if m.name == member.name:
            return lo, lo + params.member_code_bytes(t, m)
        lo += params.member_code_bytes(t, m)
    raise KeyError(member.name)


def member_codes(params: RecordCodes, view: MemberView, t: TensorRecord, count: int) -> np.ndarray:
    """The member's ``count`` codes (unpacked) from the record's codes blob; a byte that is not a
    packing of codes below L is one clear error."""
    levels = params.levels
    assert params.codes is not None and levels is not None  # the manifest reader checked both
    lo, hi = code_range(params, view.manifest, t, view.member)
    packed = view.read_blob(params.codes)[lo:hi]
    if not quantize.valid_bytes(packed, levels):
        raise FormatError(
            f"member {view.member.name!r}: module {t.name!r}: a code byte is not a packing of codes < {levels}"
        )
    return quantize.unpack(packed, levels, count)


def _lora(t: TensorRecord) -> LoraParams:
    assert isinstance(t.params, LoraParams)
    return t.params


def prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
