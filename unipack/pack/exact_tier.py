"""The lossless tier (``merge --lossless``, spec §9): what makes every member come back bit for bit.

Runs in each tensor's job, right after the lossy tier has stored the tensor (so on the merge's
workers too: ``--jobs``, Dask). For every member of the tensor it records the sha256 of the
original bytes; where the lossy tier does not already rebuild the tensor exactly (a ``shared`` or
``delta`` tensor the member does not hold raw), it stores a residual blob against the best of
these predictions:

- the tensor's stored mean, rounded to the member's dtype (every member can use it), or the base
  model's tensor where the record is a delta centred on it (spec §11);
- an earlier member's original tensor, if the chain of member bases behind it is shorter than
  ``MAX_BASE_DEPTH`` (extracting a member then decodes at most that many residuals per tensor).
  Fine-tunes from one recipe share most of what separates them from the mean: on the MiniLM
  population a sibling predicts the word embeddings 8.5x, the mean 3.0x; chains let each recipe
  have its own line of siblings instead of all leaning on the first member.

Predictions are ranked on a sample (``residual.estimated_bits``); for the best one, every coding
of ``residual.CODINGS`` is compressed and the smallest stored blob is kept (for tensors over
``TRIAL_BYTES``, the coding is chosen on evenly spaced blocks and only it is compressed in full),
so a tensor that the prediction does not help (far-apart members) costs no more than its
byte-grouped bits.

The lossy reconstruction itself is not used as a prediction: a subspace tensor's rebuild is a
float64 matrix product whose last bit depends on the summation order (spec §4), and a
prediction must be the same bits in every reader. The stored mean is (one rounding of a value
read from the file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import numpy as np

from unipack.core import residual
from unipack.format import codec, dtypes
from unipack.format.container import BundleWriter
from unipack.format.manifest import (
    CHUNKED_CODEC,
    CHUNKED_FORMAT_VERSION,
    EXACT_TIER_FORMAT_VERSION,
    ExactEntry,
    Manifest,
    TensorRecord,
)
from unipack.format.manifest.records import MAX_BASE_DEPTH, MEAN_BASE, RESIDUAL_DTYPES
from unipack.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class Coded:
    """One candidate residual blob: its coding, its base (None for ``bits``) and its stored form."""

    coding: str
    base: str | None
    stored: codec.Buffer
    codec: str
    shuffled: bool


class TierWriter(Protocol):
    """What the tier writes residual blobs to: the bundle writer, or a worker's recording one."""

    chunk_bytes: int | None

    def level_for(self, dtype: str) -> int: ...

    def add_encoded(
        self, name: str, dtype: str, shape: tuple[int, ...], stored: codec.Buffer, codec_name: str, shuffled: bool
    ) -> str: ...


def with_exact_tier(
    manifest: Manifest, entries: Sequence[dict[str, ExactEntry]], writer: BundleWriter, codec_name: str
) -> Manifest:
    """``manifest`` with every member's ``exact`` map (``entries``, from ``tensor_entries`` of each
    tensor, in the manifest's member order) and the tier's record; its residual blobs are
    already in ``writer``."""
    members = tuple(dataclasses.replace(m, exact=dict(entries[i])) for i, m in enumerate(manifest.members))
    sizes = writer.stored_sizes
    residual_bytes = sum(sizes[e.blob] for es in entries for e in es.values() if e.blob is not None)
    stats = dict(manifest.stats)
    stats["exact_tier"] = {
        "residual_bytes": residual_bytes,
        "codec": codec_name,
    }
    return dataclasses.replace(
        manifest,
        members=members,
        blobs=writer.blobs,
        format_version=_version(manifest.format_version, writer),
        stats=stats,
    )


def _version(version: int, writer: BundleWriter) -> int:
    """A lossless tier's format version: 5, or 7 where the writer chunked a blob (the writer
    would say so when writing; the merge's result says it already)."""
    chunked = any(b.codec == CHUNKED_CODEC for b in writer.blobs.values())
    return max(version, CHUNKED_FORMAT_VERSION if chunked else EXACT_TIER_FORMAT_VERSION)


def tensor_entries(
    checkpoints: Sequence[Checkpoint],
    t: TensorRecord,
    member_dtypes: Sequence[str],
    raw: Sequence[bool],
    predict: Callable[[str], np.ndarray],
    writer: TierWriter,
    codec_name: str,
) -> list[ExactEntry]:
    """Each member's ``exact`` entry for tensor ``t`` (just stored by the lossy tier), its residual
    blobs written to ``writer``: a function of this tensor's inputs alone, so it runs in the
    tensor's job, wherever that runs. ``raw[i]``: member i holds the tensor raw (bit-exact
    already); ``predict(dtype)``: the record's center (the stored mean, or the base model's
    tensor for a delta centred on it) rounded to ``dtype``, as bits (spec §9.2's ``mean``)."""
    entries: list[ExactEntry] = []
    mean_bits: dict[str, np.ndarray] = {}  # member dtype -> the center rounded to it (once per tensor)
    centred = t.mean is not None or t.params.base_centred(t)
    # member name -> (original bits, length of its chain of member bases), for possible bases
    predictable: dict[str, tuple[np.ndarray, int]] = {}
    for i, c in enumerate(checkpoints):
        dtype = member_dtypes[i]
        array = c.read(t.name)
        view = dtypes.byte_view(array, dtype)
        # The whole tensor's sha256 is one serial pass: it runs beside the ranking and the
        # (chunk-parallel) compression of the residual instead of before them.
        sha_of = codec.in_background(partial(codec.sha256, view))
        if not centred or raw[i]:  # raw or exact: the lossy tier is bit-exact
            entries.append(ExactEntry(sha_of()))
            if t.shape is not None and dtype in dtypes.FLOAT_DTYPES:
                predictable[c.name] = (residual.as_bits(array), 0)
            continue
        x = residual.as_bits(array)
        if dtype not in mean_bits:
            mean_bits[dtype] = predict(dtype)
        bases = {MEAN_BASE: mean_bits[dtype]}
        depths = {MEAN_BASE: 0}
        for name, (bits, depth) in predictable.items():
            if bits.dtype == x.dtype and depth < MAX_BASE_DEPTH:
                bases[name], depths[name] = bits, depth + 1
        base = min(bases, key=lambda name: residual.estimated_bits(x, bases[name]))
        best = _smallest(x, bases[base], base, dtype, writer, codec_name)
        shape = tuple(int(d) for d in array.shape)
        rdtype = RESIDUAL_DTYPES[dtypes.itemsize(dtype)]
        blob = writer.add_encoded(f"residual/{i}/{t.name}", rdtype, shape, best.stored, best.codec, best.shuffled)
        chunks = None
        if best.codec == CHUNKED_CODEC:  # each chunk's original bytes: what the reader verifies
            assert writer.chunk_bytes is not None
            chunks = chunk_digests(x, codec.chunk_elements(x.dtype.itemsize, writer.chunk_bytes))
        entries.append(ExactEntry(sha_of(), blob, best.coding, best.base, chunks))
        predictable[c.name] = (x, depths[best.base] if best.base is not None else 0)
    return entries


def chunk_digests(x: np.ndarray, elements: int) -> tuple[str, ...]:
    """The sha256 of ``x``'s bytes over each chunk of ``elements`` elements (spec §9.1
    ``chunk_sha256``), hashed on the chunk pool."""
    count = -(-x.size // elements)
    return tuple(codec.run_chunks(lambda k: codec.sha256(x[k * elements : (k + 1) * elements].data), count))


def candidates(
    x: np.ndarray, p: np.ndarray, base: str, itemsize: int, codec_name: str, level: int, chunk_bytes: int | None = None
) -> list[Coded]:
    """Every coding of ``x`` against prediction ``p``, compressed as the writer would store it."""
    return [encoded(x, p, base, coding, itemsize, codec_name, level, chunk_bytes) for coding in residual.CODINGS]


def encoded(
    x: np.ndarray,
    p: np.ndarray,
    base: str,
    coding: str,
    itemsize: int,
    codec_name: str,
    level: int,
    chunk_bytes: int | None = None,
) -> Coded:
    data = residual.encode(x, None if coding == "bits" else p, coding).view(np.uint8).data
    stored, used, shuffled = codec.encode(data, itemsize, codec_name, level, chunk_bytes)
    return Coded(coding, None if coding == "bits" else base, stored, used, shuffled)


#: Tensors up to this many bytes try every coding in full and keep the smallest. Larger ones try
#: each coding on TRIAL_BLOCKS evenly spaced blocks of TRIAL_BYTES in all, then compress only the
#: winner: the trials would otherwise triple the cost of the tier (shuffling and compressing are
#: most of it), while on real fine-tunes the sample picks the same coding.
TRIAL_BYTES = 4 << 20
TRIAL_BLOCKS = 16


def trial_sample(x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The evenly spaced blocks of ``x`` and ``p`` a large tensor's coding is chosen on."""
    block = TRIAL_BYTES // TRIAL_BLOCKS // x.dtype.itemsize
    starts = [round(j * (x.size - block) / (TRIAL_BLOCKS - 1)) for j in range(TRIAL_BLOCKS)]
    return np.concatenate([x[s : s + block] for s in starts]), np.concatenate([p[s : s + block] for s in starts])


def residual_level(writer_level: int) -> int:
    """The zstd level of residual blobs: 1 where the bundle uses a fast level. Residual byte planes
    are near-random below their top bits, where level 3's match finder spends bits on spurious
    matches that level 1 skips: on MiniLM fine-tunes level 1 stores them 1% smaller, at 1.1 GB/s
    instead of 170 MB/s (the same reason ``BundleWriter.level_for`` codes U8 at level 1)."""
    return 1 if writer_level <= 3 else writer_level


def _smallest(x: np.ndarray, p: np.ndarray, base: str, dtype: str, writer: TierWriter, codec_name: str) -> Coded:
    level, itemsize = residual_level(writer.level_for(dtype)), dtypes.itemsize(dtype)
    chunk_bytes = writer.chunk_bytes
    if x.nbytes <= TRIAL_BYTES:
        options = candidates(x, p, base, itemsize, codec_name, level, chunk_bytes)
        return min(options, key=lambda c: len(c.stored))  # min keeps the first of equals: CODINGS order
    xs, ps = trial_sample(x, p)
    # The trials compare codings, one frame each (as the chunks would compare, a chunk at a time).
    trials = candidates(xs, ps, base, itemsize, codec_name, level)
    winner = min(trials, key=lambda c: len(c.stored)).coding
    return encoded(x, p, base, winner, itemsize, codec_name, level, chunk_bytes)
