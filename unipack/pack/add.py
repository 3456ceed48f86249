"""``unipack.add``: join a checkpoint that was not in the merge to a bundle, as a new member.

A PEFT adapter joins a bundle of LoRA adapters module by module in each record's own form, or as
its exact factors where that form misses the rule or costs more (``pack.lora_add``).

The checkpoint is projected onto the bundle's existing means and bases: only its coefficients
(and its raw tensors) are stored. Means and bases never change, so every existing member
rebuilds bit for bit as before. Under the ``max-error`` rule a tensor the bases cannot bring
within budget is stored raw for this member alone (an *override*): the budget still holds, and
the result says what it cost. The bundle is rewritten atomically (``rewrite_bundle``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unipack.allocator import reuse_freed_memory
from unipack.bundle.base_model import BASE_OPTION, BaseModel, base_text
from unipack.core.fidelity import EXACT, MemberFidelity, fidelity_record
from unipack.errors import FormatError, InputError, OptionsError, UnipackError
from unipack.format import dtypes
from unipack.format.atomic import bundle_lock, check_member_file_name, check_writable, same_file
from unipack.format.container import BundleFile, BundleWriter, rewrite_bundle
from unipack.format.manifest import Manifest, MemberNumbers, MemberRecord, TensorRecord, check_member_name, code_runs
from unipack.options import MergeOptions
from unipack.pack import lossless
from unipack.pack.lora_add import LoraJoin, check_adapter, rewritten_blobs
from unipack.schemes import is_lora, scheme_of
from unipack.sources import PeftAdapterSource
from unipack.sources.checkpoint import Checkpoint, default_name, name_difference, open_checkpoint
from unipack.sources.url import InputPath, as_input, local_inputs


@dataclass(frozen=True)
class TensorOutcome:
    tensor: str
    # projected | raw | exact (identical to the bundle's copy) | override (raw for this member);
    # for a LoRA module also quantized | cast | factors (the record's own forms) | untouched
    kind: str
    error: float  # the relative error recorded for it (0 for raw, exact and overrides: bit-exact)
    reason: str
    stored_bytes: int = 0  # bytes of its own blobs (raw and overrides); coefficients share one blob
    over_budget: bool = False  # an override because the projection missed the max-error budget


@dataclass(frozen=True)
class AddResult:
    path: Path  # the bundle written: the input bundle itself unless ``output`` was given
    member: str
    file_bytes_before: int  # the input bundle's size
    file_bytes_after: int  # the written bundle's size
    record: MemberRecord  # the new member, as the manifest now lists it
    outcomes: list[TensorOutcome]  # one per tensor, in the bundle's order
    budget_met: bool  # False when the bases missed the max-error budget somewhere (see overrides)
    overrides: int  # tensors stored raw for this member although the bundle shares them
    override_bytes: int
    options: MergeOptions  # the bundle's options (its rank rule applied here)
    input_bytes: int  # the bundle's input bytes, the new member included
    bundle_worst_error: float  # worst recorded error of any member of the written bundle
    lora: bool = False  # the bundle holds LoRA adapters (outcomes are modules and heads)
    format_version: int = 0  # of the written bundle (a LoRA override needs 8)
    base_bytes: int | None = None  # the referenced base model's bytes (spec §11), which ``ratio`` leaves out

    @property
    def bytes_added(self) -> int:
        return self.file_bytes_after - self.file_bytes_before

    @property
    def worst_error(self) -> float:
        return max(self.record.errors, default=0.0)

    @property
    def worst_tensor(self) -> str | None:
        worst = max(self.outcomes, key=lambda o: o.error, default=None)
        return worst.tensor if worst is not None and worst.error > 0 else None

    @property
    def ratio(self) -> float:
        """The written bundle's inputs over its size (print it with ``bundle_worst_error``)."""
        return self.input_bytes / self.file_bytes_after if self.file_bytes_after else 0.0

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)


def add(
    bundle: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    base: str | os.PathLike[str] | None = None,
) -> AddResult:
    """Add checkpoint ``source`` to ``bundle`` as member ``name`` (default: its file or folder name).

    ``source`` is anything ``merge`` takes: a ``.safetensors`` file, a ``.bin``/``.pt`` state dict
    or a Hugging Face model folder (whose config files are kept with the member), each also by URL
    (``s3://...``: safetensors files and folders of them, see ``sources.remote``); for a bundle of
    LoRA adapters, a PEFT adapter folder of the same base (``pack.lora_add``).

    The bundle is rewritten in place, or written to ``output`` (which needs ``force`` to
    replace an existing file). Everything the new member needs is checked from headers before
    any tensor is read; on any error no file changes.

    Adding in place holds the bundle's writers' lock (``<bundle>.lock`` beside it, see
    ``format.atomic.bundle_lock``) from reading the bundle until the grown one is renamed over
    it: concurrent adds to one bundle run one after the other and every member is kept.

    ``base``: the base model a bundle merged with ``--base`` references (required for one, and
    checked as extraction checks it): the new member's deltas are taken from it, too.
    """
    reuse_freed_memory()
    bundle_path, source_path = Path(bundle), as_input(source)  # a URL too: see sources.remote
    out = Path(output) if output is not None else None
    if out is not None:
        check_writable(out, force=force, inputs=local_inputs([source]))
        if same_file(out, bundle_path):
            out = None  # -o naming the bundle itself (with --force) is an add in place, under its lock
    in_place = contextlib.nullcontext() if out is not None else bundle_lock(bundle_path)
    with in_place, BundleFile(bundle_path) as reader:
        manifest = reader.manifest
        lora = is_lora(manifest)
        member = _member_name(name, source_path, manifest, bundle_path)
        base_model = _base_model(manifest, base, bundle_path)
        try:
            checkpoint = open_checkpoint(source_path, member)
        except BaseException:
            if base_model is not None:
                base_model.close()
            raise
        try:
            adapter = check_adapter(manifest, checkpoint, bundle_path) if lora else None
            if not lora:
                if checkpoint.is_adapter:
                    raise InputError(
                        f"{source_path}: is a PEFT adapter, but bundle {bundle_path} holds full checkpoints; "
                        f"add it to a bundle of adapters of its base model"
                    )
                _check_tensors(manifest, checkpoint, bundle_path)
            options = _options(manifest, bundle_path)
            adder = _Adder(reader, checkpoint, options, adapter, base_model)
            size = rewrite_bundle(
                bundle_path,
                adder,
                out=out,
                force=force if out is not None else True,
                source=reader,
                rewritten=rewritten_blobs(manifest) if lora else (),
            )
        finally:
            checkpoint.close()
            if base_model is not None:
                base_model.close()
    target = out or bundle_path
    stored = adder.writer.stored_sizes  # not read back from ``target``: another add may have replaced it
    outcomes = [
        TensorOutcome(tensor, kind, error, reason, sum(stored[b] for b in blobs), over)
        for tensor, kind, error, reason, blobs, over in adder.outcomes
    ]
    overridden = [o for o in outcomes if o.kind == "override"]
    new = adder.manifest
    assert new is not None
    return AddResult(
        path=target,
        member=member,
        file_bytes_before=reader.header.file_size,
        file_bytes_after=size,
        record=new.members[-1],
        outcomes=outcomes,
        budget_met=not any(o.over_budget for o in outcomes),
        overrides=len(overridden),
        override_bytes=sum(o.stored_bytes for o in overridden),
        options=options,
        input_bytes=int(new.stats["input_bytes"]),
        bundle_worst_error=max((max(m.errors, default=0.0) for m in new.members), default=0.0),
        lora=lora,
        format_version=new.format_version,
        base_bytes=new.base.nbytes if new.base is not None else None,
    )


def free_member_index(blob_names: Iterable[str]) -> int:
    """The smallest ``i`` that no ``coef/<i>``, ``codes/<i>`` or ``raw/<i>/...`` blob uses yet.

    Not ``len(members)``: blob names are not normative (spec 3.5) and need not be dense.
    """
    used = set()
    for blob in blob_names:
        match = re.match(r"(?:coef|codes)/([0-9]+)$|raw/([0-9]+)/", blob)
        if match:
            used.add(int(match.group(1) or match.group(2)))
    index = 0
    while index in used:
        index += 1
    return index


def _member_name(name: str | None, source: InputPath, manifest: Manifest, bundle: Path) -> str:
    chosen = default_name(source) if name is None else name
    try:
        check_member_file_name(check_member_name(chosen))
    except FormatError as exc:
        raise InputError(f"{source}: {exc}; pass another --name") from None
    if any(m.name == chosen for m in manifest.members):
        raise InputError(f"{bundle}: bundle already has a member {chosen!r}; choose another --name")
    return chosen


def _check_tensors(manifest: Manifest, checkpoint: Checkpoint, bundle: Path) -> None:
    """Names, dtype kinds and shapes must fit the bundle's records (headers only)."""
    difference = name_difference({t.name for t in manifest.tensors}, set(checkpoint.tensors))
    if difference:
        raise InputError(
            f"{checkpoint.path}: tensor names differ from bundle {bundle}: it {difference}; "
            f"a new member must have the same architecture as the bundle's members"
        )
    for t in manifest.tensors:
        e = checkpoint.tensors[t.name]
        if (e.dtype in dtypes.FLOAT_DTYPES) != (t.dtype in dtypes.FLOAT_DTYPES):
            raise InputError(
                f"{checkpoint.path}: tensor {t.name!r} is {e.dtype} but {t.dtype} in bundle "
                f"{bundle}: float and non-float versions of one tensor cannot be mixed"
            )
        if not scheme_of(t).shape_optional and e.shape != t.shape:
            assert t.shape is not None
            raise InputError(
                f"{checkpoint.path}: tensor {t.name!r} has shape {list(e.shape)} but "
                f"{list(t.shape)} in bundle {bundle}: shapes differ, and only raw tensors may "
                f"vary; merge all the members again, this one included (tensors whose shapes differ "
                f"are then stored raw per member), or with --raw '{t.name}'"
            )


def _base_model(manifest: Manifest, base: str | os.PathLike[str] | None, bundle: Path) -> BaseModel | None:
    """The base model a bundle references, given and checked; required where it references one."""
    if base is None:
        if manifest.base is not None:
            raise InputError(
                f"{bundle}: its delta tensors are centred on a base model it references but does not hold; "
                f"pass {BASE_OPTION} with {base_text(manifest.base)} to add a member"
            )
        return None
    return BaseModel(base, manifest, str(bundle))


def _options(manifest: Manifest, bundle: Path) -> MergeOptions:
    """The bundle's recorded options; keys a newer unipack may have added are ignored."""
    known = {f.name for f in dataclasses.fields(MergeOptions)}
    try:
        return MergeOptions.from_dict({k: v for k, v in manifest.options.items() if k in known})
    except (OptionsError, TypeError, ValueError) as exc:
        raise FormatError(
            f"{bundle}: the bundle's recorded options are invalid ({exc}); re-merge it to add members"
        ) from None


class _Adder:
    """The ``update`` step of ``rewrite_bundle``: store the new member, return the new manifest."""

    def __init__(
        self,
        reader: BundleFile,
        checkpoint: Checkpoint,
        options: MergeOptions,
        adapter: PeftAdapterSource | None,
        base_model: BaseModel | None = None,
    ) -> None:
        self.reader, self.checkpoint, self.options, self.adapter = reader, checkpoint, options, adapter
        self.bundle_options = options
        self.base_model = base_model
        self.manifest: Manifest | None = None
        # (tensor, kind, recorded error, reason, its own blobs, over budget): bytes are known after writing
        self.outcomes: list[tuple[str, str, float, str, tuple[str, ...], bool]] = []
        self.raw: dict[str, str] = {}
        self.errors: list[float] = []
        self.fidelity: list[MemberFidelity] = []
        self.coefs: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []  # packed codes of the delta tensors, in tensor order

    def __call__(self, old: Manifest, writer: BundleWriter) -> Manifest:
        if old != self.reader.manifest:
            raise UnipackError(f"{self.reader.path}: the bundle changed while adding to it; try again")
        c = self.checkpoint
        self.old, self.writer = old, writer
        self.index = free_member_index(old.blobs)
        self.coef_dtype = old.coefficient_dtype()
        join = LoraJoin(self, self.adapter) if self.adapter is not None else None
        if join is not None:
            records = join.records()
            member_dtypes, lora, version = join.dtypes, join.lora, join.format_version
        else:
            records = []
            for t in old.tensors:
                # The schemes read the rule from ``self.options``: each tensor's own bounds where the
                # bundle records some (merge --size, spec 3.4 tensor_bounds), for its call alone.
                self.options = self.bundle_options.for_tensor(t.name)
                records.append(scheme_of(t).add(self, t, c.tensors[t.name].dtype, c.read(t.name)))
            self.options = self.bundle_options
            member_dtypes = {t.name: c.tensors[t.name].dtype for t in old.tensors if c.tensors[t.name].dtype != t.dtype}
            lora, version = {}, old.format_version
        coef_blob = None
        if self.coefs:
            coef_blob = writer.add(f"coef/{self.index}", np.concatenate(self.coefs), self.coef_dtype)
        codes_blob = None
        if self.codes:
            runs = code_runs(records, self.raw)
            codes_blob = writer.add(f"codes/{self.index}", np.concatenate(self.codes), "U8", parts=runs)
        measured = self._lossless()
        member = MemberRecord(
            name=c.name,
            source=c.source_name,
            source_bytes=c.file_size,
            metadata=c.metadata,
            coefficients=coef_blob,
            raw=self.raw,
            dtypes=member_dtypes,
            numbers=MemberNumbers(tuple(self.errors), fidelity_record(self.fidelity, self.options.baselines)),
            added=True,
            lossless_bytes=measured.compressed_bytes if measured else None,
            configs=c.configs,
            lora=lora,
            codes=codes_blob,
        )
        self.manifest = dataclasses.replace(
            old,
            tensors=tuple(records),
            members=old.members + (member,),
            blobs=writer.blobs,
            stats=self._stats(measured),
            format_version=version,
        )
        return self.manifest

    # -- AddContext: what a scheme calls to store the new member's tensor ------------------------

    def read_base(self, name: str) -> np.ndarray:
        # add() refuses a bundle that references a base model unless it was given one.
        assert self.base_model is not None
        return self.base_model.read(name)

    def read_blob(self, name: str) -> np.ndarray:
        return self.reader.read_blob(name)

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
        if coefficients is not None:
            self.coefs.append(coefficients)
        if codes is not None:
            self.codes.append(codes)
        self._record(t, kind, error, reason, fidelity)

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
        """The member's own tensor, bit-exact: for raw tensors, and overrides of shared or exact ones."""
        blob = self.raw[t.name] = self.writer.add(f"raw/{self.index}/{t.name}", array, dtype)
        self._record(t, kind, 0.0, reason, fidelity, (blob,), over_budget)

    def record_blobs(
        self,
        t: TensorRecord,
        kind: str,
        reason: str,
        fidelity: MemberFidelity,
        blobs: tuple[str, ...],
        over_budget: bool = False,
    ) -> None:
        """A tensor kept bit-exact in blobs the caller wrote (a LoRA module's two factors)."""
        self._record(t, kind, 0.0, reason, fidelity, blobs, over_budget)

    def _record(
        self,
        t: TensorRecord,
        kind: str,
        error: float,
        reason: str,
        fidelity: MemberFidelity,
        blobs: tuple[str, ...] = (),
        over_budget: bool = False,
    ) -> None:
        self.errors.append(error)
        self.fidelity.append(fidelity)
        self.outcomes.append((t.name, kind, error, reason, blobs, over_budget))

    def _lossless(self) -> lossless.LosslessSize | None:
        """The new input's lossless size by the measure the bundle records (byte-grouped zstd, or
        an older bundle's plain zstd at its level), measured only if the bundle records one."""
        recorded = self.old.stats.get("lossless")
        if not isinstance(recorded, dict):
            return None
        if lossless.is_grouped(recorded):
            mode = lossless.plan_mode(self.options.lossless, self.checkpoint.file_size)
            size = lossless.group_size(self.checkpoint)
            return lossless.measure_grouped(self.checkpoint.files, size, mode) if mode is not None else None
        level = int(recorded.get("level", lossless.LEVEL))
        mode = lossless.plan_mode(
            self.options.lossless, self.checkpoint.file_size, level == lossless.FAST_LEVEL, grouped=False
        )
        return lossless.measure_files(self.checkpoint.files, mode, level=level) if mode is not None else None

    def _stats(self, measured: lossless.LosslessSize | None) -> dict[str, Any]:
        """The old stats, every key kept, with the new input counted."""
        old = self.old
        stats = dict(old.stats)
        before = old.stats.get("input_bytes", sum(m.source_bytes for m in old.members))
        stats["input_bytes"] = int(before) + self.checkpoint.file_size
        recorded = stats.get("lossless")
        if measured is None:
            stats.pop("lossless", None)  # it promises a lossless size for every member (spec 3.6)
        elif measured.sampled and isinstance(recorded, dict) and not recorded.get("sampled"):
            stats["lossless"] = {**recorded, "sampled": True}  # the baseline is now partly an estimate
        # ZipNN's total covers every member, or it goes (the new member has no lossless tier either)
        stats.pop("zipnn", None)
        return stats
