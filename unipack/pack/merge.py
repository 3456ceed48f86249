"""``unipack.merge``: pack N checkpoints into one .upk bundle.

One tensor name at a time: plan it (headers only), decompose it (the core reads members one by
one through ``Checkpoint.values``), and stream its blobs to a spool file. Only the manifest and
the per-member coefficients stay in memory until the bundle is written atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from unipack.allocator import reuse_freed_memory
from unipack.bundle.reader import BundleReader
from unipack.errors import FormatError, InputError, OptionsError
from unipack.format.atomic import check_member_file_name, check_writable
from unipack.format.container import BundleWriter
from unipack.format.manifest import Manifest
from unipack.options import MergeOptions
from unipack.pack.base_match import BaseMatch, close_bases, match_base, open_base
from unipack.pack.dense import MergeProgress, Merger, chunk_bytes_for
from unipack.pack.executors import Execution
from unipack.pack.lora import LoraMerger, adapter_sources, plan_lora
from unipack.pack.plan import plan_tensors
from unipack.sources.checkpoint import close_all, open_inputs
from unipack.sources.url import as_input, local_inputs


@dataclass(frozen=True)
class MergeResult:
    path: Path
    file_bytes: int
    input_bytes: int
    manifest: Manifest
    seconds: float
    peak_rss_bytes: int
    base: BaseMatch | None = None  # ``--base``: how its tensors matched the members'

    # ``ratio`` counts the file only: a bundle that references a base model (``manifest.base``)
    # does not hold it, and every place that prints the ratio says so.

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.file_bytes

    @property
    def shape_mismatched(self) -> list[str]:
        """Tensors whose shape differs between members, stored raw per member (task-specific heads)."""
        return [t.name for t in self.manifest.tensors if t.shape is None]

    @property
    def worst_error(self) -> float:
        return max((max(m.errors, default=0.0) for m in self.manifest.members), default=0.0)


def merge(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    options: MergeOptions | None = None,
    names: Sequence[str] | None = None,
    force: bool = False,
    progress: MergeProgress | None = None,
    jobs: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    base: str | os.PathLike[str] | None = None,
    **option_fields: Any,
) -> MergeResult:
    """Merge checkpoints into ``out``; options as a ``MergeOptions`` or as its field names.

    Where the per-tensor jobs run: ``executor="local"`` with ``jobs`` processes that fit tensors
    side by side (None: this machine's cores, for inputs of 64 MiB and more read from
    safetensors; 1: in this process), or ``executor="dask"`` on the Dask cluster whose scheduler
    ``scheduler`` names (``tcp://host:port``, or a scheduler file; its workers read the inputs at
    the same paths). The bundle is byte-identical whatever they are; only its speed and peak
    memory (one tensor per job) change.

    ``paths``: local paths, or URLs (strings holding ``://``: ``s3://bucket/ft1.safetensors``, a
    model folder's ``gs://bucket/ft2/``; any protocol fsspec knows, with ``unipack[remote]``), read
    by byte range (``sources.remote``); every executor's workers open the URLs themselves.

    ``base``: the base model the members were fine-tuned from (a .safetensors file or a model
    folder): quantized deltas may then be taken from its tensors, which the bundle references by
    sha256 instead of storing a mean (spec §11); extracting such a member needs the base again."""
    if options is not None and option_fields:
        raise TypeError("give either options= or option keywords, not both")
    opts = options or MergeOptions(**option_fields)
    reuse_freed_memory()  # before any tensor is read: forked workers inherit it
    execution = Execution(executor, jobs, scheduler)
    started = time.perf_counter()
    out_path = Path(out)
    check_writable(out_path, force=force, inputs=local_inputs(paths))  # -o onto an input would destroy it
    checkpoints = open_inputs([as_input(p) for p in paths], list(names) if names is not None else None)
    try:
        for c in checkpoints:  # every member must come back out as <name>.safetensors
            try:
                check_member_file_name(c.name)
            except FormatError as exc:
                raise InputError(
                    f"{c.path}: {exc}; give a shorter name (merge --name SOURCE=NAME; names= in Python)"
                ) from None
        adapters = adapter_sources(checkpoints)
        if adapters is not None and base is not None:
            raise OptionsError(
                "--base is for full checkpoints; a LoRA adapter is already a delta from its base "
                "(extract --format hf --base folds one into it)"
            )
        if base is not None and (not opts.quantize or opts.budget is None):
            # Deltas from the base are quantized deltas, tried only under an error rule.
            raise OptionsError(
                "--base centres quantized deltas, which need an error rule (--max-error, --max-delta-error) "
                "and --quantize; drop --no-quantize, --rank or --energy"
            )
        base_model = open_base(base) if base is not None else None
        if adapters is not None:
            if opts.exact_tier:
                raise OptionsError("--lossless is for full checkpoints, not LoRA adapters")
            if opts.tensor_bounds:
                raise OptionsError("per-tensor bounds (tensor_bounds) are for full checkpoints, not LoRA adapters")
            if not opts.is_default_rule and opts.max_delta_error is not None:
                raise OptionsError(
                    "--max-delta-error is for full checkpoints; a LoRA adapter is already a delta: "
                    "give --max-error (relative to each adapter's update)"
                )
            opts = opts.for_adapters()
        # One BLAS thread: LAPACK's eigenvectors of the trailing (noise) part of a spectrum depend
        # on how many threads split its sums, and a bundle's bytes (a subspace at a rank inside
        # the noise, the paper-recipe errors the merge records) must not depend on the machine's
        # core count. It also avoids oversubscribing a busy machine, where a threaded eigh can be
        # many times slower; parallelism belongs to whole tensors.
        with threadpool_limits(limits=1, user_api="blas"):
            if adapters is not None:
                modules, extras = plan_lora(checkpoints, adapters)
                with BundleWriter.spooled(out_path, opts.codec, opts.zstd_level) as writer:
                    merger = LoraMerger(checkpoints, opts, writer, progress)
                    manifest = merger.run_lora(modules, extras, execution)
                    size = writer.finish(manifest, out_path, force=force)
            else:
                plans = plan_tensors(checkpoints, opts)
                if base_model is not None:
                    plans, matched = match_base(base_model, checkpoints, plans)
                with BundleWriter.spooled(out_path, opts.codec, opts.zstd_level, chunk_bytes_for(opts)) as writer:
                    dense = Merger(checkpoints, opts, writer, progress, with_base=base_model is not None)
                    manifest = dense.run(plans, execution)  # the lossless tier too, in each tensor's job
                    size = writer.finish(manifest, out_path, force=force)
    finally:
        close_all(checkpoints)
        close_bases()
    return MergeResult(
        out_path,
        size,
        manifest.stats["input_bytes"],
        manifest,
        time.perf_counter() - started,
        peak_rss_bytes(),
        matched if base is not None else None,
    )


def read_back(path: Path, file_bytes: int, started: float) -> MergeResult:
    """The result of a search that wrote its chosen bundle to ``path`` (``--max-drop``,
    ``--size``): the manifest as written, read back; ``started``: ``time.perf_counter()`` at
    the search's start."""
    with BundleReader(path) as b:
        manifest = b.manifest
    return MergeResult(
        path,
        file_bytes,
        int(manifest.stats["input_bytes"]),
        manifest,
        time.perf_counter() - started,
        peak_rss_bytes(),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
