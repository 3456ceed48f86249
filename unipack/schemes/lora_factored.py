"""``lora`` form ``subspace-factored`` (spec §12): the ``subspace`` form's shared bases U (out x
k_out) and V (in x k_in), with each member's core stored as its factors, C = P Q (P: k_out x c,
Q: c x k_in, c = min(r, the record's core rank)), so a member's core costs c (k_out + k_in)
numbers instead of k_out · k_in. The factors are cast to the coefficient dtype (``levels``
absent), or quantized at L levels with one step per row of Q and per column of P, the codes of
every touching member in one codes blob per record: the ``quant`` form's layout (§10.1) with
(Q, P, k_in, k_out, c) in place of (A, B, in, out, r). Extraction is the ``subspace`` form's,
from the core P Q (``core.lora_factored``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core import quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_factored import AdapterCore, FactoredCore, FactoredSearch, core_rank, read_bases, split_values
from unipack.core.lora_quant import LEVELS, dequantize, recode
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import FACTORED_CORES_FORMAT_VERSION, BlobRef, Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import MemberView
from unipack.schemes.lora_common import AdapterCandidate, LoraAddContext, member_codes
from unipack.schemes.lora_subspace import LoraSubspaceParams, LoraSubspaceScheme
from unipack.schemes.registry import register


@dataclass(frozen=True)
class LoraFactoredParams(LoraSubspaceParams):
    scheme_name: ClassVar[str] = "lora-subspace-factored"
    core_rank: int = 1  # the largest c a member stores: 1 <= core_rank <= min(k_out, k_in)
    levels: int | None = None  # L of the quantized factors; None: cast to the coefficient dtype
    codes: str | None = None  # U8 blob (quantized only): every touching member's codes, in member order

    def __post_init__(self) -> None:
        # A reader refuses such a record (spec §12.3; ``parse_params`` says why): refuse to make
        # one, so no writer (merge, add) can write a bundle nothing opens. A bug, not the user's.
        k_out, k_in = self.ranks
        quantized = self.levels is not None
        if not (
            k_out >= 1
            and k_in >= 1
            and self.left is not None
            and self.right is not None
            and 1 <= self.core_rank <= min(k_out, k_in)
            and (not quantized or quantize.MIN_LEVELS <= (self.levels or 0) <= quantize.MAX_LEVELS)
            and quantized == (self.codes is not None)
        ):
            raise ValueError(
                f"subspace-factored record: ranks {self.ranks}, core rank {self.core_rank}, levels {self.levels}, "
                f"bases {self.left!r} / {self.right!r}, codes {self.codes!r} break spec section 12.1"
            )

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        quantized = {} if self.levels is None else {"levels": self.levels, "codes": self.codes}
        return {
            "form": "subspace-factored",
            "ranks": list(self.ranks),
            "left": self.left,
            "right": self.right,
            "core_rank": self.core_rank,
            **quantized,
            **self.spectrum_doc(),
        }

    def member_core_rank(self, tensor: TensorRecord, member: MemberRecord | None) -> int | None:
        """The member's c, None where it has no core (it does not touch the module, or overrides it)."""
        if member is None or tensor.name not in member.lora or self.overridden(tensor, member):
            return None
        return core_rank(member.lora[tensor.name][0], self.core_rank)

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        c = self.member_core_rank(tensor, member)
        if c is None:
            return None
        return (2 * c,) if self.levels is not None else (c * (self.ranks[0] + self.ranks[1]),)

    def member_code_bytes(self, tensor: TensorRecord, member: MemberRecord) -> int:
        """P: the member's bytes in the codes blob (0 where it has no quantized core)."""
        c = self.member_core_rank(tensor, member)
        if c is None or self.levels is None:
            return 0
        return quantize.packed_size(c * (self.ranks[0] + self.ranks[1]), self.levels)

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        refs = super().blob_refs(tensor)
        if self.levels is not None:
            refs.append(BlobRef(self.codes, f"tensor {tensor.name!r} codes", None, "U8"))
        return refs

    def sized_by_members(self, tensor: TensorRecord, members: tuple[MemberRecord, ...]) -> dict[str, tuple[int, ...]]:
        if self.levels is None:
            return {}
        assert self.codes is not None  # blob_refs refused a missing name first
        return {self.codes: (sum(self.member_code_bytes(tensor, m) for m in members),)}


class LoraFactoredScheme(LoraSubspaceScheme):
    name = "lora-subspace-factored"
    variant = ("form", "subspace-factored")
    min_format_version = FACTORED_CORES_FORMAT_VERSION

    def parse_params(self, d: Doc, base: TensorRecord) -> LoraFactoredParams:
        fields = self.parse_lora(d, base)
        assert base.shape is not None
        out_dim, in_dim = base.shape
        ranks = d.shape("ranks")
        if len(ranks) != 2 or not (1 <= ranks[0] <= out_dim and 1 <= ranks[1] <= in_dim):
            raise FormatError(
                f"{d.where}: ranks {list(ranks)} must be [1 <= k_out <= {out_dim}, 1 <= k_in <= {in_dim}]"
            )
        k_out, k_in = ranks
        rank = d.integer("core_rank", 1, min(k_out, k_in))
        levels = d.integer("levels", quantize.MIN_LEVELS, quantize.MAX_LEVELS, optional=True)
        codes = d.text("codes", optional=levels is None)
        if levels is None and codes is not None:
            raise FormatError(f"{d.where}: a codes blob without levels (cast cores have none)")
        return LoraFactoredParams(
            ranks=(k_out, k_in),
            left=d.text("left"),
            right=d.text("right"),
            core_rank=rank,
            levels=levels,
            codes=codes,
            **fields,
        )

    def core_factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        """(P, Q) of a member touching the module without overriding it, float64 (spec §12.2 step 1)."""
        p = _params(t)
        c = p.member_core_rank(t, view.member)
        assert c is not None
        k_out, k_in = p.ranks
        block = view.coefficients(t)
        assert block is not None  # the manifest reader checked the member's block exists
        if p.levels is None:
            return split_values(block.reshape(-1), c, k_out, k_in)
        codes = member_codes(p, view, t, c * (k_out + k_in))
        q, factor_p = dequantize(codes, block.reshape(-1), p.levels, c, k_out, k_in)
        return factor_p, q

    def core(self, view: MemberView, t: TensorRecord) -> np.ndarray:
        factor_p, q = self.core_factors(view, t)
        return factor_p @ q

    def appended_blobs(self, t: TensorRecord) -> tuple[str, ...]:
        p = _params(t)
        return () if p.codes is None else (p.codes,)

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        p = _params(t)
        return {**super().blob_parts(t, manifest), **({} if p.codes is None else {p.codes: "coefficients"})}

    def rank_text(self, t: TensorRecord) -> str:
        p = _params(t)
        k_out, k_in = p.ranks
        return f"{k_out} x {k_in}, cores of rank {p.core_rank}" + ("" if p.levels is None else f" at L={p.levels}")

    def report_scheme(self, t: TensorRecord) -> str | None:
        p = _params(t)
        k_out, k_in = p.ranks
        return f"{k_out}x{k_in} r{p.core_rank}" + ("" if p.levels is None else f" L={p.levels}")

    def add_candidate(
        self, ctx: LoraAddContext, t: TensorRecord, f: LoraFactors, dtype: str
    ) -> AdapterCandidate | None:
        """The new member's core on the bundle's bases as stored, factored as the merge factors one
        (``core.lora_factored``) at the record's core rank, and cast, or quantized at the cheapest
        level count of the merge's that the record's code alphabet holds, with the coarsest steps
        meeting the bundle's max-error rule. None where none does (then ``add`` overrides)."""
        p = _params(t)
        assert p.left is not None and p.right is not None  # both ranks are at least 1 (parse_params)
        u = dtypes.to_float(ctx.read_blob(p.left), ctx.coef_dtype)
        v = dtypes.to_float(ctx.read_blob(p.right), ctx.coef_dtype)
        core = AdapterCore(f, read_bases(u, v), dtype)
        budget = ctx.options.budget
        max_error = None if budget is None else budget.max_error
        packed, chosen = None, p.levels
        if p.levels is None:
            fit: FactoredCore | None = core.cast(p.core_rank, ctx.coef_dtype)
            assert fit is not None
            cost = ctx.compressed(fit.block, ctx.coef_dtype)
        elif max_error is None:
            return None  # no error rule to search the steps by (the merge writes this form under one)
        else:
            # As ``quant`` joins a member: the level counts the merge tries that the record's code
            # alphabet holds (no more levels, the same parity), codes shifted into that alphabet.
            code_levels = p.levels
            tried = sorted({n for n in LEVELS if n <= code_levels and (code_levels - n) % 2 == 0} | {code_levels})
            search = FactoredSearch(core, p.core_rank, max_error, coef_dtype=ctx.coef_dtype)
            fit, cost = None, 0
            for n in reversed(tried):  # the first of the cheapest, most levels first (as the merge)
                found = search.fit(n)
                if found is None or found.codes is None:
                    continue
                written = quantize.pack(recode(found.codes, n, code_levels), code_levels)
                price = ctx.compressed(found.block, ctx.coef_dtype) + ctx.compressed(written, "U8")
                if fit is None or price < cost:
                    fit, cost, packed, chosen = found, price, written, n
            if fit is None:
                return None
        assert fit is not None
        k_out, k_in = p.ranks
        out_dim, in_dim = u.shape[0], v.shape[0]
        touching = 1 + sum(t.name in m.lora and not p.overridden(t, m) for m in ctx.old.members)
        itemsize = dtypes.itemsize(ctx.coef_dtype)
        form = (
            f"cast to {ctx.coef_dtype}"
            if p.levels is None
            else f"at {chosen} levels (codes in the record's {p.levels})"
        )
        return AdapterCandidate(
            "projected",
            cost,
            fit.error,
            fit.block.size
            + (0 if packed is None else packed.size / itemsize)
            + (out_dim * k_out + in_dim * k_in) / touching,
            f"projected onto the bundle's {k_out} x {k_in} update space, its core factored at rank {fit.rank} {form}",
            coefficients=fit.block,
            codes=packed,
        )


def _params(t: TensorRecord) -> LoraFactoredParams:
    assert isinstance(t.params, LoraFactoredParams)
    return t.params


LORA_SUBSPACE_FACTORED = register(LoraFactoredScheme())
