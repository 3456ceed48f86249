"""``lora`` form ``subspace`` (spec §7.2): shared bases U (out x k_out) and V (in x k_in) of the
adapters' updates, and per adapter a core C_i (k_out x k_in) in its coefficient blob, so that
ΔW_i ≈ U C_i Vᵀ. Extraction turns the core back into PEFT factors of the adapter's own rank
(``core.lora_encode.peft_factors``, the function the merge measured its errors with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.core.linalg import least_squares_projector
from unipack.core.lora import LoraFactors
from unipack.core.lora_encode import peft_factors, product_error
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import BlobRef, Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import MemberView
from unipack.schemes.lora_common import AdapterCandidate, LoraAddContext, LoraParams, LoraScheme
from unipack.schemes.registry import register


@dataclass(frozen=True)
class LoraSubspaceParams(LoraParams):
    scheme_name: ClassVar[str] = "lora-subspace"
    ranks: tuple[int, int] = (0, 0)  # (k_out, k_in), the sizes of U and V
    left: str | None = None  # U, out x k_out (None when k_out is 0)
    right: str | None = None  # V, in x k_in (None when k_in is 0)

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {
            "form": "subspace",
            "ranks": list(self.ranks),
            "left": self.left,
            "right": self.right,
            **self.spectrum_doc(),
        }

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        touched = member is not None and tensor.name in member.lora and not self.overridden(tensor, member)
        return self.ranks if touched and self.ranks[0] * self.ranks[1] > 0 else None

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        assert tensor.shape is not None
        what = f"tensor {tensor.name!r}"
        refs = []
        for side, name, dim, k in (
            ("left", self.left, tensor.shape[0], self.ranks[0]),
            ("right", self.right, tensor.shape[1], self.ranks[1]),
        ):
            if k == 0:
                refs.append(BlobRef(name, side, None, None, absent=f"{side} rank 0 but a {side} blob is named"))
            else:
                refs.append(BlobRef(name, f"{what} {side} basis", (dim, k), "coef"))
        return refs


class LoraSubspaceScheme(LoraScheme):
    name = "lora-subspace"
    variant = ("form", "subspace")

    def parse_params(self, d: Doc, base: TensorRecord) -> LoraSubspaceParams:
        fields = self.parse_lora(d, base)
        assert base.shape is not None
        ranks = d.shape("ranks")
        out_dim, in_dim = base.shape
        if len(ranks) != 2 or ranks[0] > out_dim or ranks[1] > in_dim:
            raise FormatError(f"{d.where}: ranks {list(ranks)} must be [k_out <= {out_dim}, k_in <= {in_dim}]")
        return LoraSubspaceParams(
            ranks=(ranks[0], ranks[1]),
            left=d.text("left", optional=True),
            right=d.text("right", optional=True),
            **fields,
        )

    def bases(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        """U (out x k_out) and V (in x k_in) as float64; empty when a rank is 0."""
        p = _params(t)
        assert t.shape is not None
        sides = []
        for name, dim, k in ((p.left, t.shape[0], p.ranks[0]), (p.right, t.shape[1], p.ranks[1])):
            sides.append(np.zeros((dim, k)) if name is None else view.values(name))
        return sides[0], sides[1]

    def core(self, view: MemberView, t: TensorRecord) -> np.ndarray:
        core = view.coefficients(t)
        return np.zeros(_params(t).ranks) if core is None else core

    def factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        rank, scale = view.member.lora[t.name]
        dtype = view.member.dtype_of(t)
        u, v = self.bases(view, t)
        core = self.core(view, t)
        if not np.isfinite(core).all():
            # §7.2's SVD of the core has no answer (LAPACK fails to converge): a damaged bundle
            # whose checksums were made to match, never one a writer wrote.
            raise FormatError(
                f"member {view.member.name!r}: module {t.name!r}: its core holds NaN or inf; the bundle is damaged"
            )
        b, a = peft_factors(u, core, v, rank, scale, dtype)
        return dtypes.from_float(a, dtype), dtypes.from_float(b, dtype)

    def member_update(self, view: MemberView, t: TensorRecord) -> np.ndarray | None:
        """U C Vᵀ: the bundle's own reconstruction, before the extracted factors are rounded (an
        override: s B A of its own factors)."""
        if t.name not in view.member.lora:
            return None
        if _params(t).overridden(t, view.member):
            return super().member_update(view, t)
        u, v = self.bases(view, t)
        return (u @ self.core(view, t)) @ v.T

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        p = _params(t)
        return {**self.overrides(t, manifest), **{name: "bases" for name in (p.left, p.right) if name is not None}}

    def rank_text(self, t: TensorRecord) -> str:
        k_out, k_in = _params(t).ranks
        return f"{k_out} x {k_in}"  # k_out x k_in of the update space

    def report_scheme(self, t: TensorRecord) -> str | None:
        k_out, k_in = _params(t).ranks
        return f"{k_out}x{k_in}"

    def projected(self, t: TensorRecord, member: MemberRecord) -> bool:
        return t.name in member.lora and not _params(t).overridden(t, member)

    def add_candidate(
        self, ctx: LoraAddContext, t: TensorRecord, f: LoraFactors, dtype: str
    ) -> AdapterCandidate | None:
        """The new member's core on the bundle's bases as stored, fitted as the merge fits one
        (``core.lora_encode.encode``: least squares on the rounded bases, then rounded), and the
        error of the factors extraction then returns."""
        p = _params(t)
        assert t.shape is not None
        out_dim, in_dim = t.shape
        sides = []
        for name, dim, k in ((p.left, out_dim, p.ranks[0]), (p.right, in_dim, p.ranks[1])):
            sides.append(np.zeros((dim, k)) if name is None else dtypes.to_float(ctx.read_blob(name), ctx.coef_dtype))
        u, v = sides
        core = f.scale * ((least_squares_projector(u).T @ f.b) @ (f.a @ least_squares_projector(v)))
        held, values = dtypes.store_as(core, ctx.coef_dtype)
        b, a = peft_factors(u, values, v, f.rank, f.scale, dtype)
        error = product_error(f, LoraFactors(a, b, f.scale))
        k_out, k_in = p.ranks
        touching = 1 + sum(t.name in m.lora and not p.overridden(t, m) for m in ctx.old.members)
        stored = held.reshape(-1) if held.size else None
        return AdapterCandidate(
            "projected",
            ctx.compressed(stored, ctx.coef_dtype) if stored is not None else 0,
            error,
            k_out * k_in + (out_dim * k_out + in_dim * k_in) / touching,
            f"projected onto the bundle's {k_out} x {k_in} update space",
            coefficients=stored,
        )


def _params(t: TensorRecord) -> LoraSubspaceParams:
    assert isinstance(t.params, LoraSubspaceParams)
    return t.params


LORA_SUBSPACE = register(LoraSubspaceScheme())
