"""Merging PEFT LoRA adapters: compress what each adapter does to a module, not its factors.

Per LoRA module, the adapters that touch it give updates ΔW_i = s_i B_i A_i. Every form that
meets the user's rule is priced at its compressed bytes and the cheapest is kept: shared bases
U, V and one small core per adapter (``core.lora``, at the ranks the rule picks); each adapter's
own factors, balanced and quantized to L levels for each L of ``core.lora_quant.LEVELS``, or
rounded to a narrower ``--dtype`` (``schemes.lora_quant``); the factors themselves, bit-exact;
or, under a max-error rule, the shared bases with each core stored as its factors, cast or
quantized (``subspace-factored``, ``core.lora_factored``). A tie goes to the earlier of exact,
cast, quantized, subspace, factored. Tensors that are not LoRA factors
(``modules_to_save`` heads, trained biases) are stored raw per adapter. Nothing out x in is ever
formed, and a module's factors are held only while it is being encoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from unipack.core import quantize
from unipack.core.decomposition import grow, meets_rule
from unipack.core.fidelity import EXACT, MemberFidelity, round_up, spectrum
from unipack.core.lora import LoraFactors, LoraModel, fit
from unipack.core.lora_encode import EncodedLora, encode, factor_bytes, stored_bytes
from unipack.core.lora_factored import AdapterCore, FactoredCore, FactoredSearch, StoredBases, stored_bases
from unipack.core.lora_quant import (
    LEVELS,
    CastFactors,
    QuantizedFactors,
    QuantSearch,
    balanced,
    cast_factors,
    recode,
)
from unipack.errors import InputError
from unipack.format import dtypes
from unipack.format.manifest import LORA_FORMAT_VERSION, Manifest, TensorRecord
from unipack.options import MergeOptions
from unipack.pack import parallel
from unipack.pack.dense import Merger, StoredTensor, worker_merger
from unipack.pack.executors import Execution, Inputs
from unipack.schemes.lora_common import LoraParams, LoraScheme
from unipack.schemes.lora_factored import LoraFactoredParams
from unipack.schemes.lora_factors import LoraFactorsParams
from unipack.schemes.lora_quant import LoraCastParams, LoraQuantParams
from unipack.schemes.lora_subspace import LoraSubspaceParams
from unipack.schemes.raw import RAW, RawParams
from unipack.sources import PeftAdapterSource
from unipack.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class ModulePlan:
    """One LoRA module across the adapters: its update's shape and who touches it."""

    name: str
    out_dim: int
    in_dim: int
    dtype: str  # the first touching adapter's factor dtype
    touched: tuple[bool, ...]


@dataclass(frozen=True)
class ExtraPlan:
    """A tensor that is not a LoRA factor (a modules_to_save head, a trained bias): raw per adapter."""

    name: str
    shape: tuple[int, ...] | None  # None where adapters disagree (heads of different tasks)
    dtypes: tuple[str, ...]


def adapter_sources(checkpoints: list[Checkpoint]) -> list[PeftAdapterSource] | None:
    """Each checkpoint's PEFT source if every input is a PEFT adapter, None if none is."""
    adapters = [c.source for c in checkpoints if isinstance(c.source, PeftAdapterSource)]  # typed for mypy
    if not adapters:
        return None
    if len(adapters) != len(checkpoints):
        odd = next(c for c in checkpoints if not c.is_adapter)
        raise InputError(
            f"{odd.path}: is a full checkpoint, but other inputs are PEFT adapters; merge adapters "
            f"and checkpoints into separate bundles"
        )
    return adapters


def plan_lora(
    checkpoints: list[Checkpoint], adapters: list[PeftAdapterSource]
) -> tuple[list[ModulePlan], list[ExtraPlan]]:
    """Modules in first-seen order (a module no adapter shares with the first comes after its
    modules), and the extra tensors, which every adapter must have (the same set of keys)."""
    found: dict[str, tuple[int, int, str, Checkpoint]] = {}
    for c, a in zip(checkpoints, adapters):
        for m in a.lora_modules.values():
            a_info, b_info = a.tensors[m.a_key], a.tensors[m.b_key]
            if a_info.dtype != b_info.dtype:
                raise InputError(
                    f"{c.path}: module {m.name!r} has lora_A in {a_info.dtype} but lora_B in "
                    f"{b_info.dtype}; save both factors in one dtype"
                )
            seen = found.get(m.name)
            if seen is None:
                found[m.name] = (m.out_dim, m.in_dim, a_info.dtype, c)
            elif seen[:2] != (m.out_dim, m.in_dim):
                raise InputError(
                    f"{c.path}: module {m.name!r} is {m.out_dim} x {m.in_dim}, but "
                    f"{seen[0]} x {seen[1]} in {seen[3].path}; adapters must be of one base model"
                )
    modules = [
        ModulePlan(name, out_dim, in_dim, dtype, tuple(name in a.lora_modules for a in adapters))
        for name, (out_dim, in_dim, dtype, _) in found.items()
    ]
    first, first_adapter = checkpoints[0], adapters[0]
    reference = set(first_adapter.extra_tensors)
    for c, a in zip(checkpoints[1:], adapters[1:]):
        if set(a.extra_tensors) != reference:
            missing = sorted(reference - set(a.extra_tensors))[:3]
            extra = sorted(set(a.extra_tensors) - reference)[:3]
            raise InputError(
                f"{c.path}: its non-LoRA tensors (modules_to_save, biases) differ from {first.path}'s "
                f"(lacks {missing}, has extra {extra}); adapters of one bundle must save the same ones"
            )
    clash = reference & set(found)
    if clash:
        raise InputError(f"{first.path}: {sorted(clash)[0]!r} is both a LoRA module and a tensor name; rename one")
    extras = []
    for name in first_adapter.extra_tensors:
        infos = [a.tensors[name] for a in adapters]
        shapes = {i.shape for i in infos}
        extras.append(ExtraPlan(name, infos[0].shape if len(shapes) == 1 else None, tuple(i.dtype for i in infos)))
    return modules, extras


class LoraMerger(Merger):
    """``Merger`` for PEFT adapters: one record per LoRA module, then the extra tensors raw."""

    format_version = LORA_FORMAT_VERSION

    def run_lora(
        self, modules: list[ModulePlan], extras: list[ExtraPlan], execution: Execution | None = None
    ) -> Manifest:
        """Every module, then every extra tensor, in plan order. ``execution``: where the
        modules' jobs run (default: in this process; an automatic ``--jobs`` forks from
        ``parallel.LORA_PARALLEL_FROM_BYTES`` of inputs); the lossless baseline runs beside them.
        The bundle's bytes do not depend on it."""
        self._take_adapters()
        self._lora: list[dict[str, tuple[int, float]]] = [{} for _ in self.checkpoints]
        for module in modules:  # each adapter's map in module order, as the manifest lists them
            for i, adapter in enumerate(self.adapters):
                m = adapter.lora_modules.get(module.name)
                if m is not None:
                    self._lora[i][module.name] = (m.rank, m.scale)
        if self.progress:
            self.progress.start(len(modules) + len(extras), len(self.checkpoints))
        with self._executor(execution, len(modules), parallel.LORA_PARALLEL_FROM_BYTES) as pool:
            measured = self._start_lossless(pool)
            records = list(self._stored(pool, self._store_module, module_job, modules))
            for index, extra in enumerate(extras, start=len(modules)):
                if self.progress:
                    self.progress.tensor(index, extra.name)
                records.append(self._store_extra(extra))
            self._take_lossless(measured)
        return self._manifest(records)

    def _take_adapters(self) -> None:
        adapters = [c.source for c in self.checkpoints]
        assert all(isinstance(a, PeftAdapterSource) for a in adapters)
        self.adapters: list[PeftAdapterSource] = adapters  # type: ignore[assignment]

    # -- LoRA modules --------------------------------------------------------------------------------

    def _factors(self, module: ModulePlan) -> tuple[list[LoraFactors | None], list[str | None]]:
        factors: list[LoraFactors | None] = []
        member_dtypes: list[str | None] = []
        for c, adapter in zip(self.checkpoints, self.adapters):
            m = adapter.lora_modules.get(module.name)
            if m is None:
                factors.append(None)
                member_dtypes.append(None)
                continue
            a, b = c.values(m.a_key), c.values(m.b_key)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise InputError(
                    f"{c.path}: module {m.name!r} holds NaN or inf in its LoRA factors; "
                    f"the adapter is broken, retrain or drop it"
                )
            if self.progress:
                self.progress.member_read()
            # Held at their stored width (F16 as float16; BF16, F32 as float32: exact), widened per use.
            held = {"F16": np.float16, "BF16": np.float32, "F32": np.float32}.get(c.tensors[m.a_key].dtype, np.float64)
            factors.append(LoraFactors(a.astype(held, copy=False), b.astype(held, copy=False), m.scale))
            member_dtypes.append(c.tensors[m.a_key].dtype)
        return factors, member_dtypes

    def _store_module(self, module: ModulePlan) -> TensorRecord:
        factors, member_dtypes = self._factors(module)
        own_bytes = factor_bytes(factors, member_dtypes)
        max_rank = self._max_rank(module, sum(f is not None for f in factors), own_bytes)
        model = fit(factors, module.out_dim, module.in_dim, max_rank)
        pattern = self.options.raw_pattern_for(module.name)
        if pattern is not None:
            return self._store_factors(
                module, model, factors, f"--raw {pattern!r}: the adapters' own factors", "requested"
            )
        chosen = self._choose(model, factors, member_dtypes, own_bytes)
        exact_cost = self._exact_cost(module)
        best: tuple[int, str] = (exact_cost, "exact")
        cast = self._cast_candidate(factors, member_dtypes)
        if cast is not None and cast[0] < best[0]:
            best = (cast[0], "cast")
        quant = self._quant_candidate(factors, member_dtypes)
        if quant is not None and quant[0] < best[0]:
            best = (quant[0], "quant")
        subspace_cost = None if isinstance(chosen, str) else self._subspace_cost(chosen)
        if subspace_cost is not None and subspace_cost < best[0]:
            best = (subspace_cost, "subspace")
        factored = self.pricing.factored_candidate(model, factors, member_dtypes, bound=best[0])
        if factored is not None and factored[0] < best[0]:
            best = (factored[0], "factored")
        priced = f"{best[0]:,} B compressed vs the exact factors' {exact_cost:,} B"
        if best[1] == "factored":
            assert factored is not None
            return self._store_factored(module, model, factors, factored[1], priced)
        if best[1] == "subspace":
            assert not isinstance(chosen, str)
            return self._store_subspace(module, model, factors, chosen)
        if best[1] == "cast":
            assert cast is not None
            reason = f"{self._rule_text()}: each adapter's factors balanced and cast to {self.coef_dtype} ({priced})"
            return self._store_cast(module, model, factors, cast[1], reason)
        if best[1] == "quant":
            assert quant is not None
            levels, fits = quant[1]
            reason = f"{self._rule_text()}: each adapter's balanced factors at {levels} levels ({priced})"
            return self._store_quant(module, model, factors, levels, fits, reason)
        reason = chosen if isinstance(chosen, str) else f"{self._rule_text()}: no other form costs fewer bytes"
        return self._store_factors(module, model, factors, reason, "budget")

    # -- the adapters' own factors, cast or quantized (spec §10) -------------------------------------

    def _exact_cost(self, module: ModulePlan) -> int:
        """Compressed bytes of the adapters' factors as they are (the ``factors`` form)."""
        cost = 0
        for c, adapter in zip(self.checkpoints, self.adapters):
            m = adapter.lora_modules.get(module.name)
            if m is not None:
                cost += sum(self._compressed(c.read(key), c.tensors[key].dtype) for key in (m.a_key, m.b_key))
        return cost

    @property
    def pricing(self) -> Pricing:
        return Pricing(self.options, self.coef_dtype, self._compressed)

    def _cast_candidate(
        self, factors: list[LoraFactors | None], member_dtypes: list[str | None]
    ) -> tuple[int, list[CastFactors | None]] | None:
        return self.pricing.cast_candidate(factors, member_dtypes)

    def _quant_candidate(
        self, factors: list[LoraFactors | None], member_dtypes: list[str | None]
    ) -> tuple[int, tuple[int, list[QuantizedFactors | None]]] | None:
        return self.pricing.quant_candidate(factors, member_dtypes)

    def _subspace_cost(self, enc: EncodedLora) -> int:
        cost = 0
        for side in (enc.left, enc.right):
            if side is not None:
                cost += self._compressed(side, self.coef_dtype)
        cores = [c.reshape(-1) for c in enc.cores if c is not None and c.size]
        if cores:
            cost += self._compressed(np.concatenate(cores), self.coef_dtype)
        return cost

    def _own_fidelity(
        self, model: LoraModel, factors: list[LoraFactors | None], errors: list[float], numbers: list[float]
    ) -> None:
        """Errors and fidelity numbers of a form that keeps each adapter's own factors."""
        baselines = self._baselines(model, 0, 0)
        for i, (f, err) in enumerate(zip(factors, errors)):
            if f is None:
                self.errors[i].append(0.0)
                self.fidelity[i].append(EXACT)
                continue
            self.errors[i].append(round_up(float(err)))
            self.fidelity[i].append(own_fidelity(f, err, numbers[i], baselines[i][0], self.options.baselines))

    def _store_quant(
        self,
        module: ModulePlan,
        model: LoraModel,
        factors: list[LoraFactors | None],
        levels: int,
        fits: list[QuantizedFactors | None],
        reason: str,
    ) -> TensorRecord:
        for i, q in enumerate(fits):
            if q is not None:
                self.coefs[i].append(q.steps_held)
        packed = np.concatenate([q.packed(levels) for q in fits if q is not None])
        codes = self.writer.add(f"codes/{module.name}", packed, "U8")
        errors = [0.0 if q is None else q.error for q in fits]
        itemsize = dtypes.itemsize(self.coef_dtype)
        numbers = [
            0.0 if q is None else q.steps_held.size + quantize.packed_size(q.code_count, levels) / itemsize
            for q in fits
        ]
        self._own_fidelity(model, factors, errors, numbers)
        return _module_record(module, model, reason, LoraQuantParams, levels=levels, codes=codes)

    def _store_cast(
        self,
        module: ModulePlan,
        model: LoraModel,
        factors: list[LoraFactors | None],
        casts: list[CastFactors | None],
        reason: str,
    ) -> TensorRecord:
        for i, c in enumerate(casts):
            if c is not None:
                self.coefs[i].append(c.values_held)
        errors = [0.0 if c is None else c.error for c in casts]
        self._own_fidelity(model, factors, errors, [0.0 if c is None else float(c.values_held.size) for c in casts])
        return _module_record(module, model, reason, LoraCastParams)

    def _max_rank(self, module: ModulePlan, n_touched: int, own_bytes: int) -> int:
        """The largest rank ``_choose`` may keep on a side: one past the largest k at which the
        subspace at (k, k) still costs fewer bytes than the adapters' own factors (the rank rule's
        rank, where smaller). The bases need no more directions than that (``fit``)."""
        itemsize = dtypes.itemsize(self.coef_dtype)
        width, n = module.out_dim + module.in_dim, max(n_touched, 1)
        # The largest k with (width · k + n · k²) · itemsize < own_bytes, from the quadratic's root.
        k = max(int((math.sqrt(width * width + 4.0 * n * own_bytes / itemsize) - width) / (2 * n)) + 1, 0)
        while k > 0 and (width * k + n * k * k) * itemsize >= own_bytes:
            k -= 1
        while (width * (k + 1) + n * (k + 1) ** 2) * itemsize < own_bytes:
            k += 1
        cap = k + 1
        if self.options.rule == "rank":
            assert self.options.rank is not None
            return min(self.options.rank, cap)
        return cap

    def _choose(
        self, model: LoraModel, factors: list[LoraFactors | None], member_dtypes: list[str | None], own_bytes: int
    ) -> EncodedLora | str:
        """Encode at the rule's ranks (raised while rounding breaks a ``max-error`` budget); or the
        reason to keep the adapters' own factors, when they cost no more bytes."""
        opts, (k_out_max, k_in_max) = self.options, model.max_ranks
        if opts.rule == "rank":
            assert opts.rank is not None
            ranks = (min(opts.rank, k_out_max), min(opts.rank, k_in_max))
        elif opts.rule == "energy":
            assert opts.energy is not None
            ranks = model.energy_rank(opts.energy)
            if ranks[0] > k_out_max or ranks[1] > k_in_max:  # only with sketched bases (``fit``)
                return (
                    f"{self._rule_text()} needs ranks beyond the {k_out_max} x {k_in_max} sketched update space, "
                    f"whose subspace costs no fewer bytes than the adapters' own factors: stored as factors, exactly"
                )
        else:
            assert opts.max_error is not None
            ranks = model.rank_for_max_error(opts.max_error)
        while True:
            cost = stored_bytes(model, *ranks, self.coef_dtype)
            if cost >= own_bytes:
                return (
                    f"{self._rule_text()} needs ranks {ranks[0]} x {ranks[1]} ({cost:,} B), no fewer bytes than "
                    f"the adapters' own factors ({own_bytes:,} B): stored as factors, exactly"
                )
            encoded = encode(model, factors, *ranks, self.coef_dtype, member_dtypes)
            if meets_rule(opts.budget, encoded.errors):
                return encoded
            if ranks == (k_out_max, k_in_max):
                return (
                    f"{self._rule_text()} is missed at full rank after rounding to {self.coef_dtype}: "
                    f"stored as factors, exactly"
                )
            # Rounding (bases, cores, the adapter's dtype) pushed an adapter over: a little more rank.
            ranks = (grow(ranks[0], k_out_max), grow(ranks[1], k_in_max))

    def _rule_text(self) -> str:
        return self.options.rule_text

    def _store_subspace(
        self, module: ModulePlan, model: LoraModel, factors: list[LoraFactors | None], enc: EncodedLora
    ) -> TensorRecord:
        k_out, k_in = enc.ranks
        left = self.writer.add(f"left/{module.name}", enc.left, self.coef_dtype) if enc.left is not None else None
        right = self.writer.add(f"right/{module.name}", enc.right, self.coef_dtype) if enc.right is not None else None
        baselines = self._baselines(model, k_out, k_in)
        for i, (f, core, err) in enumerate(zip(factors, enc.cores, enc.errors)):
            if f is None:
                self.errors[i].append(0.0)
                self.fidelity[i].append(EXACT)
                continue
            if core is not None and core.size:
                self.coefs[i].append(core.reshape(-1))
            self.errors[i].append(round_up(float(err)))
            mean_error, svd_error, svd_rank = baselines[i]
            self.fidelity[i].append(
                MemberFidelity(
                    norm=f.norm, delta_error=err, mean_error=mean_error, svd_error=svd_error, svd_rank=svd_rank
                )
            )
        reason = f"{self._rule_text()}: ranks {k_out} x {k_in} of the update space ({model.n_touched} adapters)"
        return _module_record(module, model, reason, LoraSubspaceParams, ranks=(k_out, k_in), left=left, right=right)

    def _store_factored(
        self,
        module: ModulePlan,
        model: LoraModel,
        factors: list[LoraFactors | None],
        choice: FactoredChoice,
        priced: str,
    ) -> TensorRecord:
        bases, levels = choice.bases, choice.levels
        k_out, k_in = bases.ranks
        left = self.writer.add(f"left/{module.name}", bases.left_held, self.coef_dtype)
        right = self.writer.add(f"right/{module.name}", bases.right_held, self.coef_dtype)
        codes = None
        if levels is not None:
            packed = [quantize.pack(c.codes, levels) for c in choice.cores if c is not None and c.codes is not None]
            codes = self.writer.add(f"codes/{module.name}", np.concatenate(packed), "U8")
        itemsize = dtypes.itemsize(self.coef_dtype)
        bases_share = (module.out_dim * k_out + module.in_dim * k_in) / max(model.n_touched, 1)
        errors, numbers = [], []
        for i, core in enumerate(choice.cores):
            if core is not None:
                self.coefs[i].append(core.block)
            errors.append(0.0 if core is None else core.error)
            numbers.append(0.0 if core is None else choice.numbers(core, itemsize) + bases_share)
        self._own_fidelity(model, factors, errors, numbers)
        stored = f"cast to {self.coef_dtype}" if levels is None else f"at {levels} levels"
        reason = (
            f"{self._rule_text()}: ranks {k_out} x {k_in} of the update space ({model.n_touched} adapters), "
            f"each core as factors of rank {choice.core_rank} {stored} ({priced})"
        )
        return _module_record(
            module,
            model,
            reason,
            LoraFactoredParams,
            ranks=(k_out, k_in),
            left=left,
            right=right,
            core_rank=choice.core_rank,
            levels=levels,
            codes=codes,
        )

    def _store_factors(
        self, module: ModulePlan, model: LoraModel, factors: list[LoraFactors | None], reason: str, cause: str
    ) -> TensorRecord:
        baselines = self._baselines(model, 0, 0)
        for i, (c, f) in enumerate(zip(self.checkpoints, factors)):
            self.errors[i].append(0.0)
            if f is None:
                self.fidelity[i].append(EXACT)
                continue
            m = self.adapters[i].lora_modules[module.name]
            for key in (m.a_key, m.b_key):
                self.raw[i][key] = self.writer.add(f"raw/{i}/{key}", c.read(key), c.tensors[key].dtype)
            # A factors-form module loses nothing; its mean-only baseline still counts against the mean.
            mean_error = baselines[i][0]
            self.fidelity[i].append(
                MemberFidelity(norm=f.norm, delta_error=0.0, mean_error=mean_error, svd_error=0.0, svd_rank=f.rank)
            )
        return _module_record(module, model, reason, LoraFactorsParams)

    def _baselines(self, model: LoraModel, k_out: int, k_in: int) -> list[tuple[float, float | None, int | None]]:
        """Per adapter: (mean-only error, per-member SVD error at equal bytes, its rank); the SVD
        pair is None without ``--baselines``, the mean error 0 where it is not measured."""
        means = model.mean_errors()
        mean_errors = [0.0] * model.n_adapters if means is None else [float(e) for e in means]
        if not self.options.baselines:
            return [(e, None, None) for e in mean_errors]
        return [
            (e, svd_error, svd_rank) for e, (svd_error, svd_rank) in zip(mean_errors, model.svd_baseline(k_out, k_in))
        ]

    # -- extra tensors -------------------------------------------------------------------------------

    def _store_extra(self, extra: ExtraPlan) -> TensorRecord:
        for i, c in enumerate(self.checkpoints):
            self.raw[i][extra.name] = self.writer.add(f"raw/{i}/{extra.name}", c.read(extra.name), extra.dtypes[i])
            self.errors[i].append(0.0)
            self.fidelity[i].append(EXACT)
        return TensorRecord(
            extra.name,
            RAW.storage,
            extra.dtypes[0],
            extra.shape,
            "not a LoRA factor (modules_to_save, bias): stored per adapter",
            RawParams(raw_cause="requested"),
        )

    # -- manifest hooks ------------------------------------------------------------------------------

    def _member_dtypes(self, c: Checkpoint, records: list[TensorRecord]) -> dict[str, str]:
        out = {}
        for r in records:
            key = r.lora_keys[0] if r.params.lora_module else r.name
            info = c.tensors.get(key)
            if info is not None and info.dtype != r.dtype:
                out[r.name] = info.dtype
        return out

    def _member_lora(self, i: int) -> dict[str, tuple[int, float]]:
        return self._lora[i]


#: The factored form's bases are tried at the ranks meeting each of these fractions of the
#: max-error budget: the rest is the cores' quantization's (a larger basis leaves the cores more
#: room, at more bytes of bases; the chooser keeps the cheapest that meets the rule).
FACTORED_HEADROOMS = (1.0, 0.8, 0.6, 0.4)
#: The quantized cores are also tried truncated to the least core rank whose cast cores meet this
#: fraction of the budget (the rest is the quantization's).
CORE_TRUNCATION = 0.7


@dataclass(frozen=True)
class FactoredChoice:
    """A module in the ``subspace-factored`` form (spec §12), as the chooser found it."""

    bases: StoredBases
    core_rank: int
    levels: int | None  # None: the cores' factors cast to the coefficient dtype
    cores: list[FactoredCore | None]  # per adapter; None where it does not touch the module

    def numbers(self, core: FactoredCore, itemsize: int) -> float:
        """Numbers at the coefficient dtype a core takes: its block, and its packed codes."""
        if self.levels is None or core.codes is None:
            return float(core.block.size)
        return core.block.size + quantize.packed_size(core.codes.size, self.levels) / itemsize


#: From this many adapters on, a module's quantized candidates are priced adapter by adapter and
#: only the winner's codes are kept (``Pricing._quant_priced_apart``); fewer are priced exactly.
PRICED_APART_FROM = 64


@dataclass(frozen=True)
class Pricing:
    """The per-module chooser's prices of each adapter's own factors, quantized or cast (spec §10):
    used by the merge for every adapter of a module, and by ``unipack add`` for the one it joins."""

    options: MergeOptions
    coef_dtype: str
    compressed: Callable[[np.ndarray, str], int]  # bytes an array takes in the bundle, as written

    def meets(self, errors: list[float]) -> bool:
        budget = self.options.budget
        return budget is not None and budget.met(errors)

    def cast_candidate(
        self, factors: list[LoraFactors | None], member_dtypes: list[str | None]
    ) -> tuple[int, list[CastFactors | None]] | None:
        """The balanced factors at the coefficient dtype, where it is narrower than the adapters'
        (``--dtype float16``) and, under an error rule, meets it; under a rank or energy rule the
        user's ``--dtype`` is taken as asked."""
        narrower = any(d is not None and dtypes.itemsize(self.coef_dtype) < dtypes.itemsize(d) for d in member_dtypes)
        if not narrower:
            return None
        casts: list[CastFactors | None] = [
            None if f is None or d is None else cast_factors(f, self.coef_dtype, d)
            for f, d in zip(factors, member_dtypes)
        ]
        errors = [c.error for c in casts if c is not None]
        if self.options.budget is not None and not self.meets(errors):
            return None
        held = [c.values_held for c in casts if c is not None]
        return self.compressed(np.concatenate(held), self.coef_dtype), casts

    def quant_candidate(
        self,
        factors: list[LoraFactors | None],
        member_dtypes: list[str | None],
        levels: tuple[int, ...] = LEVELS,
        code_levels: int | None = None,
    ) -> tuple[int, tuple[int, list[QuantizedFactors | None]]] | None:
        """The cheapest level count (of ``levels``, every one tried) whose quantized factors meet
        the rule for every adapter, with its compressed bytes (codes and steps).

        Adapter by adapter, each searched at every level count still open (``QuantSearch``
        shares quantizations between them); a level count closes for all once an adapter's
        finest steps miss the rule at it. Only one adapter's search is held at a time.

        ``code_levels``: the codes are written in the alphabet of that (odd) level count whatever
        the level count found, each code shifted by the difference of their offsets, so the same
        integers q come back (``add`` joining a record of one ``levels``: at most that many)."""
        budget = self.options.budget
        if not self.options.quantize or budget is None or budget.max_error is None:
            return None
        if code_levels is None and sum(f is not None for f in factors) >= PRICED_APART_FROM:
            return self._quant_priced_apart(factors, member_dtypes, levels)
        open_levels = sorted(levels, reverse=True)
        fits: dict[int, list[QuantizedFactors | None]] = {n: [] for n in open_levels}
        for f, d in zip(factors, member_dtypes):
            if f is None or d is None:
                for n in open_levels:
                    fits[n].append(None)
                continue
            search = QuantSearch(f, step_dtype=self.coef_dtype, member_dtype=d)
            open_levels = [n for n in open_levels if search.floor_meets(budget.max_error, n)]
            for n in open_levels:
                fits[n].append(search.fit(budget.max_error, n).stored_only())
            if not open_levels:
                return None
        best: tuple[int, tuple[int, list[QuantizedFactors | None]]] | None = None
        for n in open_levels:
            written = fits[n] if code_levels is None else [_recoded(q, n, code_levels) for q in fits[n]]
            live = [q for q in written if q is not None]
            if not live:
                continue  # no adapter touches the module
            cost = self._price(live, n if code_levels is None else code_levels)
            if best is None or cost < best[0]:
                best = (cost, (n, written))
        return best

    def _quant_priced_apart(
        self, factors: list[LoraFactors | None], member_dtypes: list[str | None], levels: tuple[int, ...]
    ) -> tuple[int, tuple[int, list[QuantizedFactors | None]]] | None:
        """``quant_candidate`` for a large collection, in memory that does not grow with the
        candidates: each level count still open is priced by the sum of each adapter's codes and
        steps compressed on their own (nothing of them kept), and only the winner's are made
        again, adapter by adapter, and kept (``fit`` at one level count gives what it gives
        with the others searched beside it). Keeping every open level count's codes for every
        adapter, as the exact pricing does, was a worker's peak: about 1 MB per adapter of a
        4096-wide module. The winner can differ from the exact pricing's only where
        compressing adapters one by one and all together rank two level counts differently."""
        budget = self.options.budget
        assert budget is not None and budget.max_error is not None
        open_levels = sorted(levels, reverse=True)
        priced: dict[int, int] = dict.fromkeys(open_levels, 0)
        for f, d in zip(factors, member_dtypes):
            if f is None or d is None:
                continue
            search = QuantSearch(f, step_dtype=self.coef_dtype, member_dtype=d)
            open_levels = [n for n in open_levels if search.floor_meets(budget.max_error, n)]
            if not open_levels:
                return None
            for n in open_levels:
                priced[n] += self._price([search.fit(budget.max_error, n)], n)
        if not open_levels:
            return None
        # The first of the cheapest in the order searched (most levels first), as the exact path.
        winner = min(open_levels, key=lambda n: priced[n])
        written: list[QuantizedFactors | None] = []
        for f, d in zip(factors, member_dtypes):
            if f is None or d is None:
                written.append(None)
                continue
            search = QuantSearch(f, step_dtype=self.coef_dtype, member_dtype=d)
            # Packed now, as they will be written: half to a fifth of the unpacked codes' bytes,
            # for every adapter until the module is written.
            written.append(search.fit(budget.max_error, winner).stored_packed(winner))
        return self._price([q for q in written if q is not None], winner), (winner, written)

    def factored_candidate(
        self,
        model: LoraModel,
        factors: list[LoraFactors | None],
        member_dtypes: list[str | None],
        bound: int | None = None,
    ) -> tuple[int, FactoredChoice] | None:
        """The cheapest ``subspace-factored`` encoding meeting a max-error rule, with its
        compressed bytes (bases, blocks, codes); None under another rule, or where none found
        meets it (or costs under ``bound``, the best other form's bytes: bases that alone cost
        that much are not tried).

        For the ranks of each of ``FACTORED_HEADROOMS``, the cores' factors cast to the
        coefficient dtype, and (unless ``--no-quantize``) quantized at each level count of
        ``LEVELS`` at which every adapter's core meets the rule (``FactoredSearch``); each at the
        core ranks ``_factored_fits`` tries."""
        budget = self.options.budget
        if budget is None or budget.max_error is None:
            return None
        ranks_of = [f.rank for f in factors if f is not None]
        if not ranks_of:
            return None
        best: tuple[int, FactoredChoice] | None = None
        tried: set[tuple[int, int]] = set()
        for headroom in FACTORED_HEADROOMS:
            ranks = model.rank_for_max_error(budget.max_error * headroom)
            if ranks in tried or 0 in ranks:
                continue
            tried.add(ranks)
            bases = stored_bases(model, *ranks, self.coef_dtype)
            full_rank = min(max(ranks_of), *ranks)
            bases_cost = self.compressed(bases.left_held, self.coef_dtype)
            bases_cost += self.compressed(bases.right_held, self.coef_dtype)
            limits = [c for c in (bound, None if best is None else best[0]) if c is not None]
            if limits and bases_cost >= min(limits):
                # A smaller fraction needs no smaller ranks: bases holding these columns and more,
                # whose bytes (float mantissas hardly compress) are no fewer. No rank search more.
                break
            for choice in self._factored_fits(bases, full_rank, factors, member_dtypes, budget.max_error):
                live = [c for c in choice.cores if c is not None]
                cost = bases_cost + self.compressed(np.concatenate([c.block for c in live]), self.coef_dtype)
                if choice.levels is not None:
                    packed = [quantize.pack(c.codes, choice.levels) for c in live if c.codes is not None]
                    cost += self.compressed(np.concatenate(packed), "U8")
                if best is None or cost < best[0]:
                    best = (cost, choice)
        return best

    def _factored_fits(
        self,
        bases: StoredBases,
        full_rank: int,
        factors: list[LoraFactors | None],
        member_dtypes: list[str | None],
        max_error: float,
    ) -> list[FactoredChoice]:
        """Every encoding of the cores on ``bases`` that meets ``max_error`` for each adapter: cast
        at the least core rank that does (a core's weak directions cost as much as its strong
        ones), and quantized at each level count still open after every adapter's search, at the
        full core rank and at the least one leaving the quantization ``1 - CORE_TRUNCATION`` of
        the budget (the search may zero weak directions itself, but each still costs its steps)."""
        cores = [None if f is None or d is None else AdapterCore(f, bases, d) for f, d in zip(factors, member_dtypes)]
        found: list[FactoredChoice] = []
        full = self._cast_cores(cores, full_rank)
        full_errors = [c.error for c in full if c is not None]
        if self.meets(full_errors):
            rank = self._least_core_rank(cores, full_rank, max_error)
            found.append(
                FactoredChoice(bases, rank, None, full if rank == full_rank else self._cast_cores(cores, rank))
            )
        if not self.options.quantize:
            return found
        ranks = [full_rank]
        target = CORE_TRUNCATION * max_error
        if full_errors and max(full_errors) <= target:
            tight = self._least_core_rank(cores, full_rank, target)
            if tight < full_rank:
                ranks.append(tight)
        for rank in ranks:
            found.extend(self._quantized_cores(bases, cores, rank, max_error))
        return found

    def _cast_cores(self, cores: list[AdapterCore | None], rank: int) -> list[FactoredCore | None]:
        return [None if c is None else c.cast(rank, self.coef_dtype) for c in cores]

    def _least_core_rank(self, cores: list[AdapterCore | None], full_rank: int, target: float) -> int:
        """The least core rank R (at most ``full_rank``, where every adapter's cast core is within
        ``target``) at which each still is: adapter by adapter, a bisection above the rank the
        adapters before it need (a truncated core's error only grows as directions go)."""
        need = 1
        for core in cores:
            if core is None:
                continue
            lo, hi = need, min(core.f.rank, full_rank)
            while lo < hi:
                mid = (lo + hi) // 2
                if core.cast(mid, self.coef_dtype).error <= target:
                    hi = mid
                else:
                    lo = mid + 1
            need = max(need, lo)
        return need

    def _quantized_cores(
        self, bases: StoredBases, cores: list[AdapterCore | None], rank: int, max_error: float
    ) -> list[FactoredChoice]:
        """The cores at core rank ``rank`` quantized at each level count at which every adapter's
        search meets ``max_error`` (a level count closes for all at the first that misses)."""
        open_levels = sorted(LEVELS, reverse=True)
        fits: dict[int, list[FactoredCore | None]] = {n: [] for n in open_levels}
        for core in cores:
            if core is None:
                for n in open_levels:
                    fits[n].append(None)
                continue
            search = FactoredSearch(core, rank, max_error, coef_dtype=self.coef_dtype)
            still_open = []
            for n in open_levels:
                fit = search.fit(n)
                if fit is not None:
                    fits[n].append(fit)
                    still_open.append(n)
            open_levels = still_open
            if not open_levels:
                return []
        return [FactoredChoice(bases, rank, n, fits[n]) for n in open_levels]

    def _price(self, fits: Sequence[QuantizedFactors], packing: int) -> int:
        """The stored bytes of these adapters' quantized factors: their codes packed for
        ``packing`` levels as one U8 blob, their steps as one at the coefficient dtype."""
        codes = np.concatenate([q.packed(packing) for q in fits])
        steps = np.concatenate([q.steps_held for q in fits])
        return self.compressed(codes, "U8") + self.compressed(steps, self.coef_dtype)


def _recoded(q: QuantizedFactors | None, levels: int, code_levels: int) -> QuantizedFactors | None:
    """``q``'s codes (of ``levels`` levels) in the alphabet of ``code_levels`` (same parity, no fewer)."""
    if q is None or levels == code_levels:
        return q
    assert q.packed_for is None
    return replace(q, codes=recode(q.codes, levels, code_levels))


def own_fidelity(f: LoraFactors, error: float, numbers: float, mean_error: float, baselines: bool) -> MemberFidelity:
    """Fidelity numbers of an adapter's module stored in a form that keeps its own factors. The
    SVD baseline (spec §10.2) is the adapter's own truncated SVD at equal bytes: rank
    q = min(r, floor(numbers / (out + in))) for the ``numbers`` (at the coefficient dtype) its
    block and codes take, with the exact truncation error from ΔW's singular values."""
    svd_error: float | None = None
    svd_rank: int | None = None
    if baselines:
        sigma = balanced(f)[2]
        svd_rank = int(min(f.rank, numbers // (f.out_dim + f.in_dim)))
        total = float(np.sum(sigma**2))
        svd_error = math.sqrt(float(np.sum(sigma[svd_rank:] ** 2)) / total) if total > 0 else 0.0
    return MemberFidelity(norm=f.norm, delta_error=error, mean_error=mean_error, svd_error=svd_error, svd_rank=svd_rank)


def _module_record(
    module: ModulePlan, model: LoraModel, reason: str, params: type[LoraParams], **fields: Any
) -> TensorRecord:
    """A LoRA module's record in any form, with the informative spectrum of its update space."""
    head, variance = spectrum(model.left_spectrum, model.total)
    return TensorRecord(
        module.name,
        LoraScheme.storage,
        module.dtype,
        (module.out_dim, module.in_dim),
        reason,
        params(spectrum=tuple(head), variance=variance, **fields),
    )


def module_job(inputs: Inputs, options: MergeOptions, module: ModulePlan) -> StoredTensor:
    """Everything the merge writes for one LoRA module, computed where this runs (an executor's
    worker: see ``dense.tensor_job``)."""
    merger = worker_merger(LoraMerger, inputs, options)
    assert isinstance(merger, LoraMerger)
    merger._take_adapters()
    return merger._apart(lambda m: LoraMerger._store_module(m, module))  # type: ignore[arg-type]
