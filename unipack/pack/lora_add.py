"""``unipack add`` for a bundle of LoRA adapters: one more PEFT adapter of the same base model.

Each module record keeps the form the merge chose for it, and every old member keeps its bytes:
the new adapter's module is stored in the record's form where that meets the bundle's recorded
rule and costs fewer compressed bytes than its exact factors, else as its exact factors (an
*override*, spec §7.4, format version 8). In the record's form means: projected onto the stored
bases (``subspace``); its own balanced factors at the cheapest level count of the merge's chooser
(``pack.lora.Pricing``) no finer than the record's ``levels``, codes written in the record's
alphabet and appended to the record's one codes blob (``quant``, which is why that blob is
rewritten); cast (``cast``); its core on the stored bases factored at the record's core rank,
cast or quantized as a ``quant`` member is (``subspace-factored``, codes appended likewise); its
factors, bit-exact (``factors``). Non-LoRA tensors
(``modules_to_save`` heads) are stored raw, as for every member.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from unipack.core.fidelity import EXACT, MemberFidelity, round_up
from unipack.core.lora import LoraFactors
from unipack.core.lora_encode import product_error
from unipack.core.lora_quant import LEVELS, CastFactors, QuantizedFactors
from unipack.errors import InputError
from unipack.format import codec, dtypes
from unipack.format.container import BundleWriter
from unipack.format.manifest import LORA_OVERRIDE_FORMAT_VERSION, Manifest, MemberRecord, TensorRecord
from unipack.pack.lora import Pricing, own_fidelity
from unipack.schemes import scheme_of
from unipack.schemes.base import AddContext, MemberView
from unipack.schemes.lora_common import LoraScheme
from unipack.sources import PeftAdapterSource
from unipack.sources.checkpoint import Checkpoint


class Adder(AddContext, Protocol):
    """What ``pack.add``'s adder offers the LoRA join: the schemes' ``AddContext`` and more."""

    writer: BundleWriter
    index: int
    checkpoint: Checkpoint
    raw: dict[str, str]

    def record_blobs(
        self,
        t: TensorRecord,
        kind: str,
        reason: str,
        fidelity: MemberFidelity,
        blobs: tuple[str, ...],
        over_budget: bool = False,
    ) -> None: ...


def check_adapter(manifest: Manifest, checkpoint: Checkpoint, bundle: Path) -> PeftAdapterSource:
    """The new input is a PEFT adapter whose modules the bundle's records hold, at their shapes,
    with the same non-LoRA tensors as the bundle's adapters (headers only)."""
    source = checkpoint.source
    if not isinstance(source, PeftAdapterSource):
        raise InputError(
            f"{checkpoint.path}: is a full checkpoint, but bundle {bundle} holds LoRA adapters; add a PEFT "
            f"adapter of the same base model, or merge checkpoints into a bundle of their own"
        )
    records = {t.name: t for t in manifest.tensors}
    for m in source.lora_modules.values():
        t = records.get(m.name)
        if t is None or not scheme_of(t).lora:
            raise InputError(
                f"{checkpoint.path}: adapts module {m.name!r}, which bundle {bundle} has no LoRA record for; "
                f"an added adapter must target modules the bundle's adapters target (merge all the adapters again)"
            )
        assert t.shape is not None
        if (m.out_dim, m.in_dim) != tuple(t.shape):
            raise InputError(
                f"{checkpoint.path}: module {m.name!r} is {m.out_dim} x {m.in_dim}, but {t.shape[0]} x "
                f"{t.shape[1]} in bundle {bundle}; adapters of one bundle must be of one base model"
            )
        a_dtype, b_dtype = source.tensors[m.a_key].dtype, source.tensors[m.b_key].dtype
        if a_dtype != b_dtype or a_dtype not in dtypes.FLOAT_DTYPES:
            raise InputError(
                f"{checkpoint.path}: module {m.name!r} has lora_A in {a_dtype} but lora_B in {b_dtype}; "
                f"save both factors in one float dtype"
            )
    extras = {t.name: t for t in manifest.tensors if not scheme_of(t).lora}
    if set(source.extra_tensors) != set(extras):
        missing = sorted(set(extras) - set(source.extra_tensors))[:3]
        extra = sorted(set(source.extra_tensors) - set(extras))[:3]
        raise InputError(
            f"{checkpoint.path}: its non-LoRA tensors (modules_to_save, biases) differ from bundle {bundle}'s "
            f"(lacks {missing}, has extra {extra}); adapters of one bundle must save the same ones"
        )
    for name, t in extras.items():
        dtype = source.tensors[name].dtype
        if (dtype in dtypes.FLOAT_DTYPES) != (t.dtype in dtypes.FLOAT_DTYPES):
            raise InputError(
                f"{checkpoint.path}: tensor {name!r} is {dtype} but {t.dtype} in bundle {bundle}: float and "
                f"non-float versions of one tensor cannot be mixed"
            )
    return source


def rewritten_blobs(manifest: Manifest) -> set[str]:
    """Blobs that hold every member's data of a record (the ``quant`` codes), which ``add``
    writes again with the new member's appended: ``rewrite_bundle`` must not copy them."""
    out: set[str] = set()
    for t in manifest.tensors:
        scheme = scheme_of(t)
        if isinstance(scheme, LoraScheme):
            out.update(scheme.appended_blobs(t))
    return out


class LoraJoin:
    """The new adapter's records, in the bundle's order; ``lora``, ``dtypes`` and ``overrides``
    for its member record afterwards. Also the ``LoraAddContext`` the LoRA forms price with."""

    def __init__(self, adder: Adder, adapter: PeftAdapterSource) -> None:
        self.adder, self.adapter = adder, adapter
        self.old, self.options, self.coef_dtype = adder.old, adder.options, adder.coef_dtype
        self.lora: dict[str, tuple[int, float]] = {}
        self.dtypes: dict[str, str] = {}
        self.overrides = 0
        self._views: dict[str, MemberView] = {}
        self._shared: dict[str, np.ndarray] = {}  # record-level blobs read once (bases, codes)
        self._record_blobs = {r.name for t in self.old.tensors for r in t.params.blob_refs(t) if r.name is not None}

    @property
    def format_version(self) -> int:
        return max(self.old.format_version, LORA_OVERRIDE_FORMAT_VERSION if self.overrides else 0)

    def records(self) -> list[TensorRecord]:
        c = self.adder.checkpoint
        out = []
        for t in self.old.tensors:
            scheme = scheme_of(t)
            if isinstance(scheme, LoraScheme):
                out.append(self._module(t, scheme))
            else:  # a modules_to_save head or a bias: raw, as for every member
                dtype = c.tensors[t.name].dtype
                if dtype != t.dtype:
                    self.dtypes[t.name] = dtype
                out.append(scheme.add(self.adder, t, dtype, c.read(t.name)))
        return out

    # -- LoraAddContext ------------------------------------------------------------------------

    def read_blob(self, name: str) -> np.ndarray:
        if name not in self._record_blobs:  # a member's own blob: read by one view, once
            return self.adder.read_blob(name)
        if name not in self._shared:
            self._shared[name] = self.adder.read_blob(name)
        return self._shared[name]

    def compressed(self, array: np.ndarray, dtype: str) -> int:
        writer = self.adder.writer
        data = dtypes.to_bytes(array, dtype)
        stored, _, _ = codec.encode(data, dtypes.itemsize(dtype), writer.codec_name, writer.level_for(dtype))
        return len(stored)

    @property
    def pricing(self) -> Pricing:
        return Pricing(self.options, self.coef_dtype, self.compressed)

    def quant_fit(self, f: LoraFactors, dtype: str, code_levels: int) -> tuple[int, int, QuantizedFactors] | None:
        # The chooser's level counts a code of the record's alphabet can hold: no more levels, the
        # same parity (q = u - (L - 1)/2 stays an integer, or a half-integer for an even L).
        levels = tuple(sorted({n for n in LEVELS if n <= code_levels and (code_levels - n) % 2 == 0} | {code_levels}))
        found = self.pricing.quant_candidate([f], [dtype], levels=levels, code_levels=code_levels)
        if found is None:
            return None
        cost, (n, fits) = found
        assert fits[0] is not None
        return cost, n, fits[0]

    def cast_fit(self, f: LoraFactors, dtype: str) -> tuple[int, CastFactors] | None:
        found = self.pricing.cast_candidate([f], [dtype])
        if found is None:
            return None
        assert found[1][0] is not None
        return found[0], found[1][0]

    # -- one module ----------------------------------------------------------------------------

    def _module(self, t: TensorRecord, scheme: LoraScheme) -> TensorRecord:
        adder, c = self.adder, self.adder.checkpoint
        appended: dict[str, np.ndarray] = {}
        m = self.adapter.lora_modules.get(t.name)
        if m is None:
            adder.keep(t, "untouched", 0.0, "the adapter does not adapt this module", EXACT)
        else:
            a, b = c.values(m.a_key), c.values(m.b_key)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise InputError(
                    f"{c.path}: module {m.name!r} holds NaN or inf in its LoRA factors; the adapter is broken, "
                    f"retrain or drop it"
                )
            dtype = c.tensors[m.a_key].dtype
            self.lora[t.name] = (m.rank, m.scale)
            if dtype != t.dtype:
                self.dtypes[t.name] = dtype
            f = LoraFactors(a, b, m.scale)
            appended = self._store(t, scheme, f, dtype, (m.a_key, m.b_key))
        for name in scheme.appended_blobs(t):
            # Every member's codes in member order: the old bytes, then the new member's (if any).
            old = self.read_blob(name)
            adder.writer.add(name, np.concatenate([old, appended.get(name, old[:0])]), "U8")
        return t

    def _store(
        self, t: TensorRecord, scheme: LoraScheme, f: LoraFactors, dtype: str, keys: tuple[str, str]
    ) -> dict[str, np.ndarray]:
        """Store the module as the record's form or as its exact factors; returns the bytes to
        append to the record's shared blobs."""
        adder, c = self.adder, self.adder.checkpoint
        mean_error = self._mean_error(t, f)
        arrays = [c.read(key) for key in keys]
        exact_cost = sum(self.compressed(x, dtype) for x in arrays)
        exact_fidelity = MemberFidelity(
            norm=f.norm, delta_error=0.0, mean_error=mean_error, svd_error=0.0, svd_rank=f.rank
        )
        rule = self.options.rule_text
        if scheme.keeps_factors:
            blobs = self._write_factors(keys, arrays, dtype)
            adder.record_blobs(t, "factors", "the record's form: its own factors, bit-exact", exact_fidelity, blobs)
            return {}
        candidate = scheme.add_candidate(self, t, f, dtype)
        budget = self.options.budget
        meets = candidate is not None and (budget is None or budget.met([candidate.error]))
        if candidate is not None and meets and candidate.cost < exact_cost:
            fidelity = own_fidelity(f, candidate.error, candidate.numbers, mean_error, self.options.baselines)
            priced = f"{candidate.cost:,} B compressed vs its exact factors' {exact_cost:,} B"
            adder.keep(
                t,
                candidate.kind,
                round_up(float(candidate.error)),
                f"{rule}: {candidate.reason} ({priced})",
                fidelity,
                coefficients=candidate.coefficients,
            )
            appended = {}
            if candidate.codes is not None:
                (name,) = scheme.appended_blobs(t)
                appended[name] = candidate.codes
            return appended
        if candidate is None:
            # quant: no level count within the record's meets the rule; cast: that, or the
            # coefficient dtype is no narrower than the adapter's own (nothing to gain)
            form = scheme.variant[1] if scheme.variant else scheme.name
            why = f"the record's form ({form}) has no encoding of it within {rule}"
        elif not meets:
            why = f"the record's form misses {rule} for it (error {candidate.error:.3g})"
        else:
            why = f"the record's form costs {candidate.cost:,} B, its exact factors {exact_cost:,} B"
        self.overrides += 1
        blobs = self._write_factors(keys, arrays, dtype)
        adder.record_blobs(
            t, "override", f"{why}: its own factors, bit-exact", exact_fidelity, blobs, over_budget=not meets
        )
        return {}

    def _write_factors(self, keys: tuple[str, str], arrays: list[np.ndarray], dtype: str) -> tuple[str, ...]:
        adder = self.adder
        for key, array in zip(keys, arrays):
            adder.raw[key] = adder.writer.add(f"raw/{adder.index}/{key}", array, dtype)
        return tuple(adder.raw[key] for key in keys)

    def _mean_error(self, t: TensorRecord, f: LoraFactors) -> float:
        """The mean-only baseline as the merge records it (spec 7.2): ||ΔW - M̄|| / ||ΔW|| with M̄
        the mean update of the adapters touching the module, the old ones as the bundle rebuilds
        them. M̄ = (1/n) Σ s_i B_i A_i is itself a factored update (the factors stacked), so
        ``product_error`` measures it from two thin QRs, never forming out x in."""
        scheme = scheme_of(t)
        assert isinstance(scheme, LoraScheme)
        a_parts, b_parts = [f.a], [f.scale * f.b]
        for member in self.old.members:
            if t.name not in member.lora:
                continue
            dtype = member.dtype_of(t)
            a, b = scheme.held_factors(self._view(member), t)
            a_parts.append(dtypes.to_float(a, dtype))
            b_parts.append(member.lora[t.name][1] * dtypes.to_float(b, dtype))
        mean = LoraFactors(np.concatenate(a_parts), np.concatenate(b_parts, axis=1), 1.0 / len(a_parts))
        error = product_error(f, mean)
        return error if math.isfinite(error) else 0.0

    def _view(self, member: MemberRecord) -> MemberView:
        view = self._views.get(member.name)
        if view is None:
            view = self._views[member.name] = MemberView.of(self.old, member, self.read_blob)
        return view
