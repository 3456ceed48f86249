"""The dense merge, one tensor name at a time: plan, decompose, stream blobs, build the manifest.

``Merger`` holds only the manifest's records and each member's coefficients until the end;
``merge_lora.LoraMerger`` reuses its bookkeeping for PEFT adapters. A tensor's work is also a job
(``tensor_job``: a top-level function of plain data) that an executor (``executors``) runs in
another process: it returns a ``StoredTensor``, which the merging process applies in plan order.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from unipack.allocator import reuse_freed_memory
from unipack.bundle.exact import held_center_prediction, stored_mean_prediction
from unipack.core.decomposition import Encoded, Fit, KeepRaw, SchemeModel, TensorJob, decompose
from unipack.core.fidelity import (
    EXACT,
    MemberFidelity,
    fidelity_record,
    matrix_view,
    round_up,
    spectrum,
    svd_baseline,
)
from unipack.core.linalg import rel_error
from unipack.format import codec, dtypes
from unipack.format.container import BundleWriter, blob_level
from unipack.format.manifest import (
    BASE_REF_FORMAT_VERSION,
    FORMAT_VERSION,
    ExactEntry,
    Manifest,
    MemberNumbers,
    MemberRecord,
    TensorRecord,
    code_runs,
)
from unipack.options import MergeOptions
from unipack.pack import exact_tier, lossless, parallel
from unipack.pack.alternatives import AlternativesMeter, MeasuredApart, RecordingMeter, paper_model
from unipack.pack.base_match import base_reference, base_tensor
from unipack.pack.executors import Execution, Executor, Inputs, opened
from unipack.pack.plan import TensorPlan
from unipack.schemes import delta, scheme_of
from unipack.schemes.exact import EXACT_SCHEME, ExactParams
from unipack.schemes.raw import RAW, RawParams
from unipack.schemes.shared import decomposition
from unipack.sources.checkpoint import Checkpoint
from unipack.version import __version__


class MergeProgress(Protocol):
    """What a front end may show while merging (the CLI draws rich progress bars)."""

    def start(self, n_tensors: int, n_members: int) -> None: ...
    # Tensor ``index`` (plan order) is stored: called once its result is in, so the time since
    # the previous call is this tensor's (in one process; with workers, the wait for it).
    def tensor(self, index: int, name: str) -> None: ...
    def member_read(self) -> None: ...
    def lossless(self, done: int, total: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class EncodedBlob:
    """A blob a worker compressed (``codec.encode``), for ``BundleWriter.add_encoded``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stored: bytes
    codec: str
    shuffled: bool


class RecordingWriter:
    """Stands in for the bundle writer in a worker: compresses each blob exactly as the writer
    would (``codec_name`` at zstd ``level``) and keeps it, in order, for the parent to append."""

    def __init__(self, codec_name: str, level: int, chunk_bytes: int | None = None) -> None:
        self._codec, self._level, self.chunk_bytes = codec_name, level, chunk_bytes
        self.made: list[EncodedBlob] = []

    def level_for(self, dtype: str) -> int:
        return blob_level(dtype, self._level)

    def add(self, name: str, array: np.ndarray, dtype: str) -> str:
        data = dtypes.to_bytes(array, dtype)
        level = self.level_for(dtype)
        stored, used, shuffled = codec.encode(data, dtypes.itemsize(dtype), self._codec, level, self.chunk_bytes)
        shape = tuple(int(d) for d in array.shape)
        self.made.append(EncodedBlob(name, dtype, shape, bytes(stored), used, shuffled))
        return name

    def add_encoded(
        self, name: str, dtype: str, shape: tuple[int, ...], stored: codec.Buffer, codec_name: str, shuffled: bool
    ) -> str:
        self.made.append(EncodedBlob(name, dtype, shape, bytes(stored), codec_name, shuffled))
        return name

    def read_blob(self, name: str) -> np.ndarray:
        """A blob made in this job, decoded as the bundle writer's ``read_blob`` decodes it (the
        lossless tier predicts from a tensor's stored mean in the same job)."""
        blob = self._made(name)
        nbytes = math.prod(blob.shape) * dtypes.itemsize(blob.dtype)
        data = codec.decode(
            blob.stored, blob.codec, blob.shuffled, dtypes.itemsize(blob.dtype), nbytes, f"job: {name!r}"
        )
        return dtypes.from_bytes(data, blob.dtype, blob.shape)

    def dtype_of(self, name: str) -> str:
        return self._made(name).dtype

    def _made(self, name: str) -> EncodedBlob:
        return next(blob for blob in self.made if blob.name == name)


#: Tensors of at least this many elements have the report's alternatives measured in a job of
#: their own (``AlternativesItem``), beside the tensor's: on a large tensor they are a third of its
#: work (the int-b and 1-bit deltas, the paper's recipe), and one tensor's job is the merge's
#: critical path when it holds much of the model (a real MiniLM's embedding: half of its
#: parameters, three quarters of its merge on one core). A rule of the plan alone, never of the
#: executor, so the bytes stay the same whatever runs the jobs.
ALTERNATIVES_APART_FROM = 1 << 22


#: A job's result beyond its blobs (records, errors, numbers), at most, for ``_result_bound``.
RESULT_SLACK = 1 << 16


@dataclasses.dataclass(frozen=True)
class AlternativesItem:
    """The job that measures a large tensor's alternatives (``Merger._measure_alternatives``)."""

    plan: TensorPlan

    @property
    def name(self) -> str:
        return self.plan.name


@dataclasses.dataclass
class StoredTensor:
    """Everything storing one tensor writes: its record, blobs, and each member's parts."""

    record: TensorRecord
    blobs: list[EncodedBlob]
    coefs: list[list[np.ndarray]]
    codes: list[list[np.ndarray]]
    raw: list[dict[str, str]]
    errors: list[list[float]]
    fidelity: list[list[MemberFidelity]]
    meter_calls: list[tuple[str, tuple[Any, ...]]]
    exact: list[dict[str, ExactEntry]]  # the lossless tier's entry of each member (merge --lossless)


class Merger:
    def __init__(
        self,
        checkpoints: list[Checkpoint],
        options: MergeOptions,
        writer: BundleWriter,
        progress: MergeProgress | None,
        with_base: bool = False,
    ) -> None:
        self.checkpoints, self.options, self.writer, self.progress = checkpoints, options, writer, progress
        self.coef_dtype = dtypes.STORAGE_DTYPES[options.dtype]
        n = len(checkpoints)
        self.coefs: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.codes: list[list[np.ndarray]] = [[] for _ in range(n)]  # packed codes of delta tensors
        self.raw: list[dict[str, str]] = [{} for _ in range(n)]
        self.errors: list[list[float]] = [[] for _ in range(n)]
        self.fidelity: list[list[MemberFidelity]] = [[] for _ in range(n)]
        self.lossless: list[lossless.LosslessSize | None] = [None] * n
        self.zipnn: list[int | None] = [None] * n  # ZipNN of each input, next to a lossless tier
        self.exact: list[dict[str, ExactEntry]] = [{} for _ in range(n)]  # the lossless tier's entries
        # What the one-line alternatives would cost, measured with the baselines (--no-baselines
        # skips both: they are what the report compares the bundle with, not what it stores).
        self.alternatives = (
            AlternativesMeter(n, options.budget, with_base, tensor_budget=lambda name: options.for_tensor(name).budget)
            if options.baselines
            else None
        )

    def run(self, plans: list[TensorPlan], execution: Execution | None = None) -> Manifest:
        """Every tensor stored in plan order; ``execution``: where the tensors' jobs run (default:
        in this process). The bundle's bytes do not depend on it."""
        if self.progress:
            self.progress.start(len(plans), len(self.checkpoints))
        items = self._items(plans)
        with self._executor(execution, len(items), parallel.PARALLEL_FROM_BYTES) as pool:
            measured = self._start_lossless(pool)
            records = list(self._stored(pool, self._store_item, item_job, items))
            self._take_lossless(measured)
        manifest = self._manifest(records)
        if self.options.exact_tier:
            manifest = exact_tier.with_exact_tier(manifest, self.exact, self.writer, self.options.codec)
        base = base_reference(records, plans)
        if base is None:
            return manifest
        version = max(manifest.format_version, BASE_REF_FORMAT_VERSION)
        return dataclasses.replace(manifest, base=base, format_version=version)

    def _stored(
        self,
        pool: Executor,
        here: Callable[[Any], TensorRecord | MeasuredApart],
        job: Callable[[Inputs, MergeOptions, Any], StoredTensor | MeasuredApart],
        items: Sequence[Any],
    ) -> Iterator[TensorRecord]:
        """Each item's record in order: ``here(item)`` where the pool runs jobs in this process,
        else ``job(inputs, options, item)`` on its workers, whose blobs are written here
        (``_apply``). Each is reported to the progress once stored. An item whose job measured
        alternatives apart (``MeasuredApart``) yields no record: the meter takes it."""
        if pool.in_process:
            parts = pool.in_order(here, [(item,) for item in items])
        else:
            inputs = Inputs.of(self.checkpoints)
            bounds = [self._result_bound(item) for item in items]
            parts = pool.in_order(
                job,
                [(inputs, self.options, item) for item in items],
                None if any(b is None for b in bounds) else [b for b in bounds if b is not None],
            )
        index = 0
        for part in parts:
            if isinstance(part, MeasuredApart):  # follows its tensor's record: adds nothing to the bundle
                assert self.alternatives is not None
                self.alternatives.take(part)
                continue
            if self.progress:
                self.progress.tensor(index, part.record.name if isinstance(part, StoredTensor) else part.name)
            index += 1
            yield part if pool.in_process else self._apply(part)

    def _result_bound(self, item: object) -> int | None:
        """At most the bytes of ``item``'s job's result, for the executor's window (None: not
        known, the window is a count of jobs): a tensor never stores more than its members' own
        bytes, twice that with the lossless tier's residuals; an alternatives job returns numbers."""
        if isinstance(item, AlternativesItem):
            return RESULT_SLACK
        if not isinstance(item, TensorPlan):
            return None
        inputs = sum(c.tensors[item.name].numel * dtypes.itemsize(c.tensors[item.name].dtype) for c in self.checkpoints)
        return inputs * (2 if self.options.exact_tier else 1) + RESULT_SLACK

    def _items(self, plans: Sequence[TensorPlan]) -> list[TensorPlan | AlternativesItem]:
        """The merge's jobs in order: each tensor's, followed by its alternatives' where those are
        measured apart (``measured_apart``)."""
        items: list[TensorPlan | AlternativesItem] = []
        for plan in plans:
            items.append(plan)
            if self._measured_apart(plan):
                items.append(AlternativesItem(plan))
        return items

    def _measured_apart(self, plan: TensorPlan) -> bool:
        return (
            self.alternatives is not None
            and plan.storage == "shared"
            and plan.shape is not None
            and math.prod(plan.shape) >= ALTERNATIVES_APART_FROM
        )

    def _store_item(self, item: TensorPlan | AlternativesItem) -> TensorRecord | MeasuredApart:
        if isinstance(item, AlternativesItem):
            return self._measure_alternatives(item.plan)
        return self._store(item)

    def _measure_alternatives(self, plan: TensorPlan) -> MeasuredApart:
        """The alternatives of ``plan``'s tensor, as ``_store_lossy`` measures them where the
        tensor reached the decomposition, but on the paper recipe's own fit (the tensor's job
        keeps its rows models to itself)."""
        assert self.alternatives is not None and plan.shape is not None
        identical, non_finite = self._survey(plan)
        if identical or non_finite is not None:  # kept whole by the tensor's job too
            return MeasuredApart(plan.name, None, [])
        found = base_tensor(plan)
        base = None if found is None else dtypes.to_float(*found)
        outcomes, norms = self.alternatives.outcomes(self._tensor_job(plan), base=base)
        return MeasuredApart(plan.name, outcomes, norms)

    def _executor(self, execution: Execution | None, n_jobs: int, from_bytes: int) -> Executor:
        return (execution or Execution(jobs=1)).open(self.checkpoints, n_jobs, from_bytes)

    def _start_lossless(self, pool: Executor) -> list[Callable[[], Any]]:
        """The lossless baseline (a second or so per member) started beside the tensors, not before them."""
        mode = lossless.plan_mode(
            self.options.lossless, sum(c.file_size for c in self.checkpoints), exact_tier=self.options.exact_tier
        )
        if not mode:
            return []
        if pool.in_process:
            return [pool.start(self._measure_lossless, i) for i in range(len(self.checkpoints))]
        inputs = Inputs.of(self.checkpoints)
        return [pool.start(lossless_job, inputs, self.options, i) for i in range(len(self.checkpoints))]

    def _take_lossless(self, measured: list[Callable[[], Any]]) -> None:
        for i, wait in enumerate(measured):
            if self.progress:
                self.progress.lossless(i, len(self.checkpoints))
            self.lossless[i], self.zipnn[i] = wait()

    def _store_apart(self, plan: TensorPlan) -> StoredTensor:
        """``_store`` in a worker: everything it would write, recorded for ``_apply``."""
        return self._apart(lambda merger: merger._store(plan), with_base=plan.base is not None)

    def _apart(self, store: Callable[[Merger], TensorRecord], with_base: bool = False) -> StoredTensor:
        """``store`` run on a copy of this merger that records what it writes, for ``_apply``."""
        n = len(self.checkpoints)
        apart = copy.copy(self)
        apart.progress = None
        apart.writer = RecordingWriter(self.options.codec, self.options.zstd_level, chunk_bytes_for(self.options))  # type: ignore[assignment]
        apart.coefs, apart.codes = [[] for _ in range(n)], [[] for _ in range(n)]
        apart.raw, apart.errors, apart.fidelity = [{} for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        apart.exact = [{} for _ in range(n)]
        if self.alternatives is not None:
            apart.alternatives = RecordingMeter(n, self.options.budget, with_base)
        record = store(apart)
        return StoredTensor(
            record=record,
            blobs=apart.writer.made,  # type: ignore[attr-defined]
            coefs=apart.coefs,
            codes=apart.codes,
            raw=apart.raw,
            errors=apart.errors,
            fidelity=apart.fidelity,
            meter_calls=apart.alternatives.calls if isinstance(apart.alternatives, RecordingMeter) else [],
            exact=apart.exact,
        )

    def _apply(self, part: StoredTensor) -> TensorRecord:
        """What ``_store_apart`` recorded, written as ``_store`` would have written it."""
        for blob in part.blobs:
            self.writer.add_encoded(blob.name, blob.dtype, blob.shape, blob.stored, blob.codec, blob.shuffled)
        for i in range(len(self.checkpoints)):
            self.coefs[i].extend(part.coefs[i])
            self.codes[i].extend(part.codes[i])
            self.raw[i].update(part.raw[i])
            self.errors[i].extend(part.errors[i])
            self.fidelity[i].extend(part.fidelity[i])
            self.exact[i].update(part.exact[i])
        if self.alternatives is not None:
            self.alternatives.replay(part.meter_calls)
        return part.record

    def _store(self, plan: TensorPlan) -> TensorRecord:
        record = self._store_lossy(plan)
        if self.options.exact_tier:
            self._store_exact_tier(plan, record)
        return record

    def _store_exact_tier(self, plan: TensorPlan, t: TensorRecord) -> None:
        """The lossless tier's entries of this tensor (``exact_tier.tensor_entries``), its residual
        blobs written beside the tensor's own."""

        def predict(dtype: str) -> np.ndarray:
            if t.params.base_centred(t):
                found = base_tensor(plan)
                assert found is not None  # a record is centred on the base only where it has one
                return held_center_prediction(found[0], found[1], dtype)
            assert t.mean is not None
            return stored_mean_prediction(t, self.writer.read_blob, self.writer.dtype_of(t.mean), dtype)

        raw = [plan.name in self.raw[i] for i in range(len(self.checkpoints))]
        entries = exact_tier.tensor_entries(
            self.checkpoints, t, plan.dtypes, raw, predict, self.writer, self.options.codec
        )
        for i, entry in enumerate(entries):
            self.exact[i][t.name] = entry

    def _store_lossy(self, plan: TensorPlan) -> TensorRecord:
        record, job = self._choose_and_store(plan)
        if self.alternatives is None:
            return record
        if job is not None and self._measured_apart(plan):  # in its own job: the bundle's errors wait for it
            self._fitted.clear()
            self.alternatives.deferred(plan.name, [errors[-1] for errors in self.errors])
        elif job is not None:  # decomposable: every alternative is measured on it
            # The paper's recipe is the rows scheme at rank 16 in fp32: where the merge fitted it,
            # the same models serve (their Gram and spectrum do not depend on the coefficients'
            # dtype), one Gram pass fewer per tensor.
            found = base_tensor(plan)
            base = None if found is None else dtypes.to_float(*found)
            # Only the side the recipe uses is kept while the alternatives are measured (each
            # side's model holds a Gram and a mean); the others are dropped here.
            reuse = paper_model(job, self._fitted.pop("rows", None))
            self._fitted.clear()
            self.alternatives.measure(job, [errors[-1] for errors in self.errors], rows_models=reuse, base=base)
        else:  # heads, identical and non-finite tensors: every alternative keeps them too
            numels = [c.tensors[plan.name].numel for c in self.checkpoints]
            self.alternatives.kept(numels, plan.dtypes, once=record.storage == EXACT_SCHEME.storage)
        return record

    def _remembered_fit(self, name: str) -> Fit:
        """The scheme's fit, its models kept (for this tensor only) for the alternatives."""
        fit = decomposition(name).fit
        if name != "rows":  # only the rows models serve the paper's recipe
            return fit

        def remembered(job: TensorJob) -> Sequence[SchemeModel]:
            self._fitted[name] = models = fit(job)
            return models

        return remembered

    def _choose_and_store(self, plan: TensorPlan) -> tuple[TensorRecord, TensorJob | None]:
        """The tensor's record, and its job where it reached the decomposition (None: stored
        raw or exact before any fitting)."""
        self._fitted: dict[str, Sequence[SchemeModel]] = {}
        if plan.storage == "raw":
            return self._store_raw(plan, plan.reason, "requested"), None
        identical, non_finite = self._survey(plan)
        if identical:
            return self._store_exact(plan), None
        if plan.storage == "exact-candidate":
            return (
                self._store_raw(plan, f"{plan.dtypes[0]} tensor differs between members (stored exactly)", "values"),
                None,
            )
        if non_finite is not None:
            reason = f"member {non_finite!r} holds NaN or inf values (stored raw, bit-exact)"
            return self._store_raw(plan, reason, "values"), None
        assert plan.shape is not None
        # With two families of candidates, the per-member SVD baselines (an eigendecomposition per
        # member) are measured once, for the winner, instead of inside every candidate's encoding.
        lazy_baselines = self.options.baselines and self._quantizing()
        opts = self.options.for_tensor(plan.name)  # its own bounds where --size allocated them
        job = dataclasses.replace(self._tensor_job(plan), baselines=self.options.baselines and not lazy_baselines)
        # The quantized deltas first: their bytes are a ceiling under which a decomposition must
        # come, which rules most decompositions out before their eigendecomposition (the costliest
        # step of a merge) and bounds the rank searched in the others.
        quantized = self._fit_delta(plan, job, opts)
        ceiling = None if quantized is None else quantized.stored_bytes
        result = decompose(
            dataclasses.replace(job, ceiling=ceiling), [self._remembered_fit(name) for name in plan.schemes]
        )
        if quantized is not None:
            rival = self._raw_cost(plan) if isinstance(result, KeepRaw) else self._shared_cost(result)
            if quantized.stored_bytes < rival:
                if lazy_baselines:
                    values = [
                        (c.size + s.nbytes) / dtypes.itemsize(self.coef_dtype)
                        for c, s in zip(quantized.codes, quantized.scales)
                    ]
                    # Each member's own SVD of its delta from what the rule measures it from.
                    if quantized.reference is not None:
                        mean = quantized.reference
                    else:
                        mean = delta.DeltaParams(mean_step=quantized.mean_step).mean_values(
                            quantized.mean, quantized.mean_dtype
                        )
                    quantized.fidelity = self._svd_baselines(plan, quantized.fidelity, mean, values)
                return self._store_delta(plan, quantized, opts), job
        if isinstance(result, KeepRaw):
            return self._store_raw(plan, result.reason, "budget"), job
        return self._store_shared(plan, result, lazy_baselines), job

    def _tensor_job(self, plan: TensorPlan) -> TensorJob:
        """``plan``'s tensor as the decomposition sees it (its members read on demand)."""
        assert plan.shape is not None
        return TensorJob(
            name=plan.name,
            shape=plan.shape,
            member_dtypes=plan.dtypes,
            load=lambda i: self._values(i, plan.name),
            rule=self.options.rule,
            budget=self.options.for_tensor(plan.name).budget,  # its own bounds where --size allocated them
            rank=self.options.rank,
            energy=self.options.energy,
            coef_dtype=self.coef_dtype,
            gram_limit=self.options.gram_limit,
            baselines=self.options.baselines,
        )

    def _quantizing(self) -> bool:
        return self.options.quantize and self.options.budget is not None

    def _svd_baselines(
        self, plan: TensorPlan, fidelity: list[MemberFidelity], mean: np.ndarray, values: list[float]
    ) -> list[MemberFidelity]:
        """``fidelity`` with each member's own truncated SVD at ``values[i]`` numbers filled in."""
        assert plan.shape is not None
        matrix = matrix_view(plan.shape)
        out = []
        for i, f in enumerate(fidelity):
            d = self._values(i, plan.name).reshape(matrix) - mean.reshape(matrix)
            error, rank = svd_baseline(d, float(np.linalg.norm(d.ravel())), f.norm, f.mean_error, values[i])
            out.append(dataclasses.replace(f, svd_error=error, svd_rank=rank))
        return out

    # -- the per-tensor choice: every candidate priced at its compressed bytes ------------------

    def _compressed(self, array: np.ndarray, dtype: str) -> int:
        """Bytes ``array`` (held as ``dtype``) takes in the bundle, compressed as the writer will."""
        data = dtypes.byte_view(array, dtype)  # the array's own bytes where it is contiguous: no copy
        level = self.writer.level_for(dtype)
        stored, _, _ = codec.encode(data, dtypes.itemsize(dtype), self.options.codec, level)
        return len(stored)

    def _raw_cost(self, plan: TensorPlan) -> int:
        return sum(self._compressed(c.read(plan.name), dtype) for c, dtype in zip(self.checkpoints, plan.dtypes))

    def _shared_cost(self, enc: Encoded) -> int:
        cost = self._compressed(enc.mean, enc.mean_dtype)
        if enc.basis is not None:
            cost += self._compressed(enc.basis, self.coef_dtype)
        if enc.coefs:
            cost += self._compressed(np.concatenate([c.reshape(-1) for c in enc.coefs]), self.coef_dtype)
        return cost

    def _fit_delta(self, plan: TensorPlan, job: TensorJob, opts: MergeOptions) -> delta.DeltaEncoded | None:
        """The cheapest quantized-delta storage meeting the error rule (``opts``: the options as
        they apply to this tensor), or None (not asked for, a rank or energy rule, or no
        candidate meets the rule)."""
        budget = opts.budget
        if not self._quantizing() or budget is None or job.shape is None:
            return None
        return delta.fit(
            shape=job.shape,
            member_dtypes=job.member_dtypes,
            load=job.load,
            budget=budget,
            scale_dtype=self.coef_dtype,
            compressed=self._compressed,
            base=base_tensor(plan),
        )

    def _store_delta(self, plan: TensorPlan, enc: delta.DeltaEncoded, opts: MergeOptions) -> TensorRecord:
        if enc.on_base:  # referenced, not stored: the manifest's base table names it (base_reference)
            params = delta.DeltaParams(levels=enc.levels, group=enc.group, center=delta.BASE_CENTER)
            reason = f"{opts.rule_text} of the change from the base: quantized deltas ({enc.reason})"
        else:
            mean = self.writer.add(f"mean/{plan.name}", enc.mean, enc.mean_dtype)
            params = delta.DeltaParams(mean=mean, levels=enc.levels, group=enc.group, mean_step=enc.mean_step)
            reason = f"{opts.rule_text}: mean + quantized deltas ({enc.reason})"
        for i in range(len(self.checkpoints)):
            self.coefs[i].append(enc.scales[i].reshape(-1))
            self.codes[i].append(enc.codes[i])
            self.errors[i].append(round_up(float(enc.errors[i])))
            self.fidelity[i].append(enc.fidelity[i])
        return TensorRecord(plan.name, delta.DELTA.storage, plan.dtypes[0], plan.shape, reason, params)

    def _measure_lossless(self, i: int) -> tuple[lossless.LosslessSize | None, int | None]:
        """Member ``i``'s inputs compressed losslessly, for the report: the baseline (byte-grouped
        zstd of the whole files) and, with a lossless tier, ZipNN where installed."""
        sizes = [c.file_size for c in self.checkpoints]
        tier = self.options.exact_tier
        mode = lossless.plan_mode(self.options.lossless, sum(sizes), exact_tier=tier)
        if mode is None:
            return None, None
        c = self.checkpoints[i]
        measured = lossless.measure_grouped(c.files, lossless.group_size(c), mode, sizes[i] / max(sum(sizes), 1))
        zipnn = (
            lossless.zipnn_size(c.files, lossless.main_dtype(c))
            if tier and lossless.zipnn_version() is not None
            else None
        )
        return measured, zipnn

    def _values(self, i: int, name: str) -> np.ndarray:
        if self.progress:
            self.progress.member_read()
        return self.checkpoints[i].values(name)

    def _store_raw(self, plan: TensorPlan, reason: str, cause: str) -> TensorRecord:
        for i, c in enumerate(self.checkpoints):
            self.raw[i][plan.name] = self.writer.add(f"raw/{i}/{plan.name}", c.read(plan.name), plan.dtypes[i])
            self.errors[i].append(0.0)
        if cause == "budget":
            for i, f in enumerate(self._mean_only_errors(plan)):
                self.fidelity[i].append(f)
        else:
            for fidelity in self.fidelity:
                fidelity.append(EXACT)
        return TensorRecord(plan.name, RAW.storage, plan.dtypes[0], plan.shape, reason, RawParams(raw_cause=cause))

    def _mean_only_errors(self, plan: TensorPlan) -> list[MemberFidelity]:
        """A tensor the merge kept raw (cheaper than its subspace) still has a mean-only baseline:
        the report must not credit the mean with tensors it would have had to replace."""
        mean_dtype = dtypes.widest_float(frozenset(plan.dtypes))
        total = None
        for i in range(len(self.checkpoints)):
            x = self._values(i, plan.name)
            total = x.copy() if total is None else total + x
        assert total is not None
        mean = dtypes.round_trip(total / len(self.checkpoints), mean_dtype)
        out = []
        for i, dtype in enumerate(plan.dtypes):
            x = self._values(i, plan.name)
            norm = float(np.linalg.norm(x.ravel()))
            out.append(
                MemberFidelity(
                    norm=norm,
                    delta_error=0.0,
                    mean_error=rel_error(x, dtypes.round_trip(mean, dtype), norm),
                    svd_error=0.0,
                    svd_rank=0,
                )
            )
        return out

    def _survey(self, plan: TensorPlan) -> tuple[bool, str | None]:
        """One cheap pass: are all members bit-identical, and does any hold NaN/inf?

        Identical tensors (frozen layers, buffers) are stored once, exactly, so even signed zeros
        and NaN payloads survive; non-finite values would poison the decomposition.
        """
        digest = None
        identical = len(set(plan.dtypes)) == 1
        non_finite = None
        for c, dtype in zip(self.checkpoints, plan.dtypes):
            array = c.read(plan.name)
            if identical:
                d = hashlib.sha256(array.tobytes()).digest()
                identical = digest is None or d == digest
                digest = digest or d
            if (
                non_finite is None
                and dtype in dtypes.FLOAT_DTYPES
                and not np.isfinite(dtypes.to_float(array, dtype)).all()
            ):
                non_finite = c.name
        return identical, non_finite

    def _store_exact(self, plan: TensorPlan) -> TensorRecord:
        """A tensor every member holds bit for bit: one blob, shared by all."""
        blob = self.writer.add(f"exact/{plan.name}", self.checkpoints[0].read(plan.name), plan.dtypes[0])
        for errors, fidelity in zip(self.errors, self.fidelity):
            errors.append(0.0)
            fidelity.append(EXACT)
        reason = plan.reason or "identical in every member"
        return TensorRecord(plan.name, EXACT_SCHEME.storage, plan.dtypes[0], plan.shape, reason, ExactParams(blob=blob))

    def _store_shared(self, plan: TensorPlan, enc: Encoded, measure_baselines: bool = False) -> TensorRecord:
        """Write a subspace tensor; ``measure_baselines``: its encoding skipped the per-member SVD
        baselines, which are measured here at the bytes its record gives each member."""
        mean = self.writer.add(f"mean/{plan.name}", enc.mean, enc.mean_dtype)
        basis = None
        if enc.basis is not None:
            basis = self.writer.add(f"basis/{plan.name}", enc.basis, self.coef_dtype)
            for i, coef in enumerate(enc.coefs):
                self.coefs[i].append(coef.reshape(-1))
        head, variance = spectrum(enc.eigenvalues, enc.variance)
        scheme = decomposition(enc.scheme)
        params = scheme.encoded_params(enc, mean, basis, tuple(head), variance)
        record = TensorRecord(plan.name, scheme.storage, plan.dtypes[0], plan.shape, enc.reason, params)
        fidelity = enc.fidelity
        if measure_baselines:
            n = len(self.checkpoints)
            values = [scheme.svd_budget(record, n)] * n
            fidelity = self._svd_baselines(plan, fidelity, dtypes.to_float(enc.mean, enc.mean_dtype), values)
        for i, err in enumerate(enc.errors):
            self.errors[i].append(round_up(float(err)))
            self.fidelity[i].append(fidelity[i])
        return record

    def _manifest(self, records: list[TensorRecord]) -> Manifest:
        members = []
        for i, c in enumerate(self.checkpoints):
            coef = None
            if self.coefs[i]:
                coef = self.writer.add(f"coef/{i}", np.concatenate(self.coefs[i]), self.coef_dtype)
                self.coefs[i] = []  # release as we go
            codes = None
            if self.codes[i]:
                runs = code_runs(records, self.raw[i])
                codes = self.writer.add(f"codes/{i}", np.concatenate(self.codes[i]), "U8", parts=runs)
                self.codes[i] = []
            overrides = self._member_dtypes(c, records)
            measured = self.lossless[i]
            members.append(
                MemberRecord(
                    name=c.name,
                    source=c.source_name,
                    source_bytes=c.file_size,
                    metadata=c.metadata,
                    coefficients=coef,
                    raw=self.raw[i],
                    dtypes=overrides,
                    numbers=MemberNumbers(
                        tuple(self.errors[i]), fidelity_record(self.fidelity[i], self.options.baselines)
                    ),
                    lossless_bytes=measured.compressed_bytes if measured else None,
                    configs=c.configs,
                    lora=self._member_lora(i),
                    codes=codes,
                )
            )
        stats: dict[str, Any] = {"input_bytes": sum(c.file_size for c in self.checkpoints)}
        if self.alternatives is not None and self.alternatives.compared:
            stats["alternatives"] = self.alternatives.to_stats()
        if all(self.lossless):
            stats["lossless"] = lossless.grouped_stats(any(m.sampled for m in self.lossless if m))
        if all(z is not None for z in self.zipnn):
            stats["zipnn"] = {"bytes": sum(z or 0 for z in self.zipnn), "version": lossless.zipnn_version()}
        return Manifest(
            created_by=f"unipack {__version__}",
            options=self.options.to_dict(),
            tensors=tuple(records),
            members=tuple(members),
            blobs=self.writer.blobs,
            stats=stats,
            format_version=max(
                [self.format_version, *(scheme_of(t).min_format_version for t in records)],
            ),
        )

    format_version = FORMAT_VERSION

    def _member_dtypes(self, c: Checkpoint, records: list[TensorRecord]) -> dict[str, str]:
        """The member's dtype where it differs from the record's (MemberRecord.dtypes)."""
        return {r.name: c.tensors[r.name].dtype for r in records if c.tensors[r.name].dtype != r.dtype}

    def _member_lora(self, i: int) -> dict[str, tuple[int, float]]:
        return {}


def chunk_bytes_for(options: MergeOptions) -> int | None:
    """Bytes per chunk of large blobs: a bundle with a lossless tier stores them in chunks
    (format version 7) that ``extract --exact`` decodes and verifies in parallel; a lossy bundle
    keeps the one-frame layout every older reader reads (None)."""
    return codec.CHUNK_BYTES if options.exact_tier else None


# -- jobs: a tensor's work as a function of plain data, for an executor's worker process ----------


def worker_merger(cls: type[Merger], inputs: Inputs, options: MergeOptions) -> Merger:
    """A merger over ``inputs`` in a worker process, writing nowhere (``_apart`` records)."""
    reuse_freed_memory()  # a Dask worker is not forked from the merge, which set it
    writer = RecordingWriter(options.codec, options.zstd_level, chunk_bytes_for(options))
    return cls(opened(inputs), options, writer, None)  # type: ignore[arg-type]


def tensor_job(inputs: Inputs, options: MergeOptions, plan: TensorPlan) -> StoredTensor:
    """Everything the merge writes for ``plan``'s tensor, computed where this runs."""
    return worker_merger(Merger, inputs, options)._store_apart(plan)


def item_job(
    inputs: Inputs, options: MergeOptions, item: TensorPlan | AlternativesItem
) -> StoredTensor | MeasuredApart:
    """A dense merge's job where this runs: a tensor's (``tensor_job``) or its alternatives'."""
    if isinstance(item, AlternativesItem):
        return worker_merger(Merger, inputs, options)._measure_alternatives(item.plan)
    return tensor_job(inputs, options, item)


def lossless_job(inputs: Inputs, options: MergeOptions, i: int) -> tuple[lossless.LosslessSize | None, int | None]:
    """Member ``i``'s lossless baseline (``Merger._measure_lossless``), measured where this runs."""
    return worker_merger(Merger, inputs, options)._measure_lossless(i)
