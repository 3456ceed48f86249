"""``lora`` form ``factors`` (spec §7.1): each adapter's own A and B, bit-exact, under their own
keys in its raw map; kept where the update-space subspace would not save bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from unipack.format.manifest import Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.schemes.base import MemberView
from unipack.schemes.lora_common import LoraParams, LoraScheme, factor_shapes
from unipack.schemes.registry import register


@dataclass(frozen=True)
class LoraFactorsParams(LoraParams):
    scheme_name: ClassVar[str] = "lora-factors"

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        return {"form": "factors", **self.spectrum_doc()}

    def overridden(self, tensor: TensorRecord, member: MemberRecord | None) -> bool:
        return False  # the members' own factors are this form's storage, not an override

    def member_blobs(self, tensor: TensorRecord, member: MemberRecord) -> list[tuple[str, tuple[int, ...] | None]]:
        return factor_shapes(tensor, member)


class LoraFactorsScheme(LoraScheme):
    name = "lora-factors"
    variant = ("form", "factors")
    keeps_factors = True

    def parse_params(self, d: Doc, base: TensorRecord) -> LoraFactorsParams:
        return LoraFactorsParams(**self.parse_lora(d, base))

    def factors(self, view: MemberView, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
        a_key, b_key = t.lora_keys
        return view.read_blob(view.member.raw[a_key]), view.read_blob(view.member.raw[b_key])

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        return {m.raw[key]: "factors" for m in manifest.members for key in t.lora_keys if key in m.raw}

    def report_scheme(self, t: TensorRecord) -> str | None:
        return "factors"


LORA_FACTORS = register(LoraFactorsScheme())
