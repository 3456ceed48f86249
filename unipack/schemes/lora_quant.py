"""``lora`` forms ``quant`` and ``cast`` (spec §10): each adapter's own factors, balanced
(``core.lora_quant``), stored at L levels with one step per row (``quant``) or rounded to the
coefficient dtype (``cast``). Both keep the adapter's rank and scale, so its recorded
``adapter_config.json`` applies unchanged.

A member touching a ``quant`` module holds 2r steps in its coefficient blob (A's r rows, then B's
r columns) and ``ceil(r (in + out) / k)`` bytes in the record's codes blob (the codes of A in C
order, then those of Bᵀ, radix-packed as for ``delta``), which holds every touching member's
bytes in member order. One blob per module, not per member: the modules of one adapter use
different L, and a member-wide blob mixing their byte alphabets costs zstd's Huffman stage about
a bit per code more (measured: 5.0 against 3.8 bits on a MiniLM adapter); a module's codes of
every adapter share one distribution. A member touching a ``cast`` module holds r (in + out)
numbers in its coefficient blob: A in C order, then Bᵀ.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core import quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_quant import dequantize
from unipack.format import dtypes
from unipack.format.manifest import LORA_QUANT_FORMAT_VERSION, BlobRef, Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import MemberView
from unipack.schemes.lora_common import AdapterCandidate, LoraAddContext, LoraParams, LoraScheme, member_codes
from unipack.schemes.registry import register


def _rank(tensor: TensorRecord, member: MemberRecord | None) -> int | None:
    """The member's rank r for the module, None where it does not touch it or holds it as its own
    factors (an override: no block, no codes)."""
    if member is None or tensor.name not in member.lora or tensor.lora_keys[0] in member.raw:
        return None
    return member.lora[tensor.name][0]


@dataclass(frozen=True)
class LoraQuantParams(LoraParams):
    scheme_name: ClassVar[str] = "lora-quant"
    levels: int = 255  # L: a code u stands for u - (L - 1)/2 steps
    codes: str | None = None  # U8 blob: every touching member's packed codes, in member order

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {"form": "quant", "levels": self.levels, "codes": self.codes, **self.spectrum_doc()}

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        rank = _rank(tensor, member)
        return None if rank is None else (2 * rank,)

    def member_code_bytes(self, tensor: TensorRecord, member: MemberRecord) -> int:
        """P: the member's bytes in the codes blob (0 where it does not touch the module)."""
        rank = _rank(tensor, member)
        assert tensor.shape is not None
        return 0 if rank is None else quantize.packed_size(rank * (tensor.shape[0] + tensor.shape[1]), self.levels)

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        return [BlobRef(self.codes, f"tensor {tensor.name!r} codes", None, "U8")]

    def sized_by_members(self, tensor: TensorRecord, members: tuple[MemberRecord, ...]) -> dict[str, tuple[int, ...]]:
        assert self.codes is not None  # blob_refs refused a missing name first
        return {self.codes: (sum(self.member_code_bytes(tensor, m) for m in members),)}


@dataclass(frozen=True)
class LoraCastParams(LoraParams):
    scheme_name: ClassVar[str] = "lora-cast"

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {"form": "cast", **self.spectrum_doc()}

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        rank = _rank(tensor, member)
        if rank is None:
            return None
        assert tensor.shape is not None
        return (rank * (tensor.shape[0] + tensor.shape[1]),)


class _OwnFactorsScheme(LoraScheme):
    """What the two forms share: the member's factors are rebuilt from its own blocks alone."""

    min_format_version = LORA_QUANT_FORMAT_VERSION

    @abstractmethod
    def float_factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) as float64 before rounding to the member's dtype."""

    def factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        dtype = view.member.dtype_of(t)
        a, b = self.float_factors(view, t)
        with np.errstate(over="ignore"):
            return dtypes.from_float(a, dtype), dtypes.from_float(b, dtype)

    def projected(self, t: TensorRecord, member: MemberRecord) -> bool:
        assert isinstance(t.params, LoraParams)
        return t.name in member.lora and not t.params.overridden(t, member)


class LoraQuantScheme(_OwnFactorsScheme):
    name = "lora-quant"
    variant = ("form", "quant")

    def parse_params(self, d: Doc, base: TensorRecord) -> LoraQuantParams:
        return LoraQuantParams(
            levels=d.integer("levels", quantize.MIN_LEVELS, quantize.MAX_LEVELS),
            codes=d.text("codes"),
            **self.parse_lora(d, base),
        )

    def float_factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        p = _quant(t)
        rank = view.member.lora[t.name][0]
        assert t.shape is not None
        out_dim, in_dim = t.shape
        steps = view.coefficients(t)
        assert steps is not None  # the manifest reader checked the block exists
        codes = member_codes(p, view, t, rank * (out_dim + in_dim))
        return dequantize(codes, steps.reshape(-1), p.levels, rank, out_dim, in_dim)

    def add_candidate(
        self, ctx: LoraAddContext, t: TensorRecord, f: LoraFactors, dtype: str
    ) -> AdapterCandidate | None:
        """The new member's balanced factors at the cheapest level count, of the chooser's no more
        than the record's L, that meets the rule; codes written in the record's alphabet."""
        p = _quant(t)
        fit = ctx.quant_fit(f, dtype, p.levels)
        if fit is None:
            return None
        cost, levels, q = fit
        packed = quantize.pack(q.codes, p.levels)
        return AdapterCandidate(
            "quantized",
            cost,
            q.error,
            q.steps_held.size + packed.size / dtypes.itemsize(ctx.coef_dtype),
            f"its balanced factors at {levels} levels (codes in the record's {p.levels}-level alphabet)",
            coefficients=q.steps_held,
            codes=packed,
        )

    def appended_blobs(self, t: TensorRecord) -> tuple[str, ...]:
        p = _quant(t)
        return () if p.codes is None else (p.codes,)

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        p = _quant(t)
        return {**self.overrides(t, manifest), **({} if p.codes is None else {p.codes: "factors"})}

    def rank_text(self, t: TensorRecord) -> str:
        return f"L={_quant(t).levels}"

    def report_scheme(self, t: TensorRecord) -> str | None:
        return f"factors L={_quant(t).levels}"


class LoraCastScheme(_OwnFactorsScheme):
    name = "lora-cast"
    variant = ("form", "cast")

    def parse_params(self, d: Doc, base: TensorRecord) -> LoraCastParams:
        return LoraCastParams(**self.parse_lora(d, base))

    def float_factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        rank = view.member.lora[t.name][0]
        assert t.shape is not None
        out_dim, in_dim = t.shape
        values = view.coefficients(t)
        assert values is not None
        flat = values.reshape(-1)
        split = rank * in_dim
        return flat[:split].reshape(rank, in_dim), flat[split:].reshape(rank, out_dim).T

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        return self.overrides(t, manifest)

    def add_candidate(
        self, ctx: LoraAddContext, t: TensorRecord, f: LoraFactors, dtype: str
    ) -> AdapterCandidate | None:
        """The new member's balanced factors at the coefficient dtype, where the merge would cast."""
        fit = ctx.cast_fit(f, dtype)
        if fit is None:
            return None
        cost, c = fit
        return AdapterCandidate(
            "cast",
            cost,
            c.error,
            float(c.values_held.size),
            f"its balanced factors cast to {ctx.coef_dtype}",
            coefficients=c.values_held,
        )

    def report_scheme(self, t: TensorRecord) -> str | None:
        return "factors cast"


def _quant(t: TensorRecord) -> LoraQuantParams:
    assert isinstance(t.params, LoraQuantParams)
    return t.params


LORA_QUANT = register(LoraQuantScheme())
LORA_CAST = register(LoraCastScheme())
