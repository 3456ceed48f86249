"""A member bit for bit, from the bundle's lossless tier (spec §9.2): ``extract --exact``.

Each tensor is the lossy tier's array where that is already exact (raw and exact storage, a
member's overrides), else its residual blob decoded against its prediction (the stored mean
rounded to the member's dtype, or another member's exact tensor). Every tensor's bytes are
checked against the sha256 the merge recorded from the original, so a damaged bundle or a
reader that rebuilt a prediction differently fails loudly instead of returning other bits.

Tensors are independent (a tensor's chain of member bases stays within that tensor), so they
are rebuilt on a few threads and handed out in the manifest's order: the work is reading,
sha256 (of each stored blob and of each tensor), zstd and numpy passes, all of which release
the GIL. Each thread decompresses into one scratch buffer it keeps (``codec.scratch_buffer``),
and each residual is decoded in place in the array its blob was unshuffled into.

One large tensor would still run on one core: a residual stored as ``zstd-chunks`` (format
version 7) is rebuilt chunk by chunk on the codec's chunk pool instead, each chunk decoded,
rebuilt against its range of the prediction and checked against its own digest of the original
(``_chunked_bits``); its means and other large blobs decode chunk-parallel as well.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from unipack.bundle.ordered import in_order
from unipack.core import residual
from unipack.errors import ChecksumError, FormatError, UnipackError
from unipack.format import codec, dtypes
from unipack.format.manifest import ExactEntry, Manifest, MemberRecord, TensorRecord
from unipack.format.manifest.records import MEAN_BASE
from unipack.schemes import MemberView, scheme_of
from unipack.schemes.base import ReadBase, no_base
from unipack.schemes.delta import DeltaParams

ReadBlob = Callable[[str], np.ndarray]


class ChunkSource(Protocol):
    """Where a chunked residual's frames come from (``BundleFile``): its index, then each frame
    on its own, read by the chunk that decodes it."""

    def chunk_index(self, name: str) -> codec.ChunkIndex: ...

    def read_part(self, name: str, offset: int, length: int) -> bytearray: ...


Array = tuple[TensorRecord, str, np.ndarray]


def mean_values(t: TensorRecord, read_blob: ReadBlob, blob_dtype: str) -> np.ndarray:
    """A ``shared`` or ``delta`` tensor's stored mean as float64 (spec §9.2: the mean prediction)."""
    held = read_blob(t.mean)
    if isinstance(t.params, DeltaParams):
        return t.params.mean_values(held, blob_dtype)
    return dtypes.to_float(held, blob_dtype)


def mean_prediction(values: np.ndarray, dtype: str) -> np.ndarray:
    """The mean rounded to the member's dtype (spec §4 step 3; F16 directly from float64), as bits."""
    return residual.as_bits(dtypes.from_float(values, dtype))


def stored_mean_prediction(t: TensorRecord, read_blob: ReadBlob, blob_dtype: str, dtype: str) -> np.ndarray:
    """The mean prediction of spec §9.2 as bits. A float mean blob already at the member's dtype is
    its own rounding (widening is exact, and rounding an exact value gives it back; a mean holds no
    NaN), so its bits are used as they are: two passes over a float64 copy fewer."""
    if blob_dtype == dtype and getattr(t.params, "mean_step", None) is None:
        return residual.as_bits(read_blob(t.mean))
    return mean_prediction(mean_values(t, read_blob, blob_dtype), dtype)


def center_prediction(
    t: TensorRecord, manifest: Manifest, read_blob: ReadBlob, read_base: ReadBase, dtype: str
) -> np.ndarray:
    """The ``mean`` prediction of spec §9.2 as bits: the record's center, the stored mean or (a
    delta centred on the base model, §11) the base's tensor, rounded to the member's dtype."""
    if t.params.base_centred(t):
        assert isinstance(t.params, DeltaParams)
        held, center_dtype, _ = t.params.center_held(t, manifest, read_blob, read_base)
        return held_center_prediction(held, center_dtype, dtype)
    assert t.mean is not None
    return stored_mean_prediction(t, read_blob, manifest.blobs[t.mean].dtype, dtype)


def held_center_prediction(held: np.ndarray, center_dtype: str, dtype: str) -> np.ndarray:
    """The base model's tensor (held as ``center_dtype``) as a member's ``mean`` prediction."""
    if center_dtype == dtype:  # its own rounding: its bits as they are
        return residual.as_bits(np.ascontiguousarray(held))
    return mean_prediction(dtypes.to_float(held, center_dtype), dtype)


#: Threads that rebuild tensors at once, at most (fewer on fewer cores). Past four, reading and
#: hashing a member is bound by memory bandwidth, and every thread holds a tensor in memory.
MAX_THREADS = codec.MAX_THREADS
default_threads = codec.default_threads


class ExactMember:
    """Rebuilds one member's tensors bit for bit (``threads``: tensors rebuilt at once; default
    :func:`default_threads`, 1 rebuilds them one by one in the caller's thread)."""

    def __init__(
        self,
        manifest: Manifest,
        member: MemberRecord,
        read_blob: ReadBlob,
        where: str,
        *,
        threads: int | None = None,
        chunks: ChunkSource | None = None,
        read_unverified: ReadBlob | None = None,
        read_base: ReadBase = no_base,
    ) -> None:
        if member.exact is None:
            raise UnipackError(
                f"{where}: member {member.name!r} has no lossless tier (only members merged with "
                f"--lossless have one); extract it without --exact for the lossy member"
            )
        self.manifest, self.member, self.read_blob, self.where = manifest, member, read_blob, where
        #: Where given, a chunked residual is decoded chunk by chunk (each chunk reading its own
        #: frame), each checked against its chunk_sha256; else as one blob, checked whole.
        self.chunks = chunks
        #: Blobs decoded without their stored checksums (``BundleFile.read_blob(verify=False)``),
        #: where given, for everything exact extraction reads: every byte it returns is checked
        #: against a digest of the original (sha256, or chunk_sha256), which a damaged blob
        #: behind it (a residual, a mean, a base member's residual) cannot pass, so hashing their
        #: stored bytes first would only repeat the check (spec §9.2 step 4). Where a check fails,
        #: the blobs behind the tensor are then read with their checksums, to name the damaged one.
        self.read = read_unverified or read_blob
        self.read_base = read_base  # the base model's tensors (a delta centred on it, spec §11)
        self.threads = default_threads() if threads is None else max(1, threads)
        self._views: dict[str, MemberView] = {}
        self._views_lock = threading.Lock()

    def _view(self, member: MemberRecord) -> MemberView:
        with self._views_lock:  # built once (it reads the member's coefficient blob), shared by threads
            if member.name not in self._views:
                self._views[member.name] = MemberView.of(self.manifest, member, self.read, self.read_base)
            return self._views[member.name]

    def arrays(self) -> Iterator[Array]:
        """Every tensor of the member, in the manifest's order. With threads, at most ``threads``
        tensors are rebuilt ahead of the one the caller holds; the first damaged tensor in that
        order raises, as it does on one thread."""
        return in_order(self._tensor, self.manifest.tensors, self.threads, "unipack-exact")

    def _tensor(self, t: TensorRecord) -> list[Array]:
        """One tensor of the member, checked: the lossy tier's arrays, or the decoded residual."""
        assert self.member.exact is not None
        dtype = self.member.dtype_of(t)
        entry = self.member.exact[t.name]
        if entry.blob is None:
            arrays = list(scheme_of(t).member_arrays(self._view(self.member), t))
            for _, dt, array in arrays:
                self._check(self.member, t, entry, dtypes.byte_view(array, dt))
            return arrays
        bits = self._bits(self.member, t, entry)
        return [(t, dtype, bits.view(dtypes.holder(dtype)).reshape(t.shape or ()))]

    def _bits(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry, check: bool = True) -> np.ndarray:
        """The member's exact bits of ``t``, checked against the recorded sha256 (``check``; a base
        member's bits are not: they only feed a prediction, and the tensor rebuilt from it is
        checked, which a wrong prediction cannot pass)."""
        dtype = member.dtype_of(t)
        if entry.blob is None:  # a base member whose lossy tier is exact (raw, override)
            arrays = list(scheme_of(t).member_arrays(self._view(member), t))
            bits = residual.as_bits(np.ascontiguousarray(arrays[0][2], dtype=dtypes.holder(dtype)))
        else:
            prediction = None
            if entry.base == MEAN_BASE:
                prediction = center_prediction(t, self.manifest, self.read, self.read_base, dtype)
            elif entry.base is not None:
                base = self.manifest.member(entry.base)
                assert base.exact is not None  # checked when the manifest was read
                prediction = self._bits(base, t, base.exact[t.name], check=False)
            if entry.chunks is not None and self.chunks is not None:
                return self._chunked_bits(member, t, entry, prediction, check)
            r = residual.as_bits(self.read(entry.blob))
            if not r.flags.writeable:  # zstd's own bytes (a blob stored unshuffled): decode in a copy
                r = r.copy()
            bits = residual.decode_in_place(r, prediction, str(entry.coding))
        if check:
            self._check(member, t, entry, bits.view(np.uint8).data)  # hashed in place, not copied
        return bits

    def _chunked_bits(
        self, member: MemberRecord, t: TensorRecord, entry: ExactEntry, prediction: np.ndarray | None, check: bool
    ) -> np.ndarray:
        """A ``zstd-chunks`` residual (spec §9.2 with ``chunk_sha256``) rebuilt chunk by chunk on
        the chunk pool: each chunk's frame is decompressed and unshuffled into its range of one
        output array, decoded against the prediction's range in place, and hashed there.

        Neither the blob's sha256 nor the frames' digests are checked: the chunk digests of the
        original bytes verify every output byte (a damaged frame fails to decompress or gives
        other bits), and hashing the stored bytes as well would add a pass over them (about a
        tenth of the work). Nor is the whole-tensor sha256 recomputed: it is one serial pass
        over the tensor, and the chunks' digests already cover every byte of it."""
        assert entry.blob is not None and entry.chunks is not None
        rec = self.manifest.blobs[entry.blob]
        itemsize = dtypes.itemsize(rec.dtype)
        where = f"{self.where}: member {member.name!r} tensor {t.name!r} (residual blob {entry.blob!r})"
        assert self.chunks is not None
        source, blob = self.chunks, entry.blob
        index = source.chunk_index(blob)
        if index.count != len(entry.chunks):
            raise FormatError(f"{where}: {len(entry.chunks)} chunk digests for {index.count} chunks")
        out = np.empty(index.numel, residual.UNSIGNED[itemsize])
        coding = str(entry.coding)
        chunks = entry.chunks

        def chunk(k: int) -> None:
            start, stop = index.span(k)
            r = out[start:stop]
            frame = source.read_part(blob, *index.frames[k][:2])
            codec.decode_chunk(frame, index, k, rec.shuffle, itemsize, r.view(np.uint8).data, where, verify=False)
            residual.decode_in_place(r, None if prediction is None else prediction[start:stop], coding)
            if check and codec.sha256(r.data) != chunks[k]:
                self._damaged(member, t, entry, f"chunk {k} of {index.count} (elements {start} to {stop})")

        try:
            codec.run_chunks(chunk, index.count)
        except FormatError as exc:  # a frame that does not decode: name the damaged blob if it can be
            if isinstance(exc, ChecksumError):
                raise
            self._damaged(member, t, entry, "", str(exc))
        return out

    def _check(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry, data: bytes | memoryview) -> None:
        if codec.sha256(data) != entry.sha256:
            self._damaged(member, t, entry, "")

    def _damaged(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry, part: str, fault: str = "") -> None:
        """Raise the one-line error of a tensor (``part`` of it) that failed its check, naming the
        first blob behind it whose stored checksum fails (read again, with checksums, only now)."""
        found = fault
        for name in self._blobs_behind(member, t, entry):
            try:
                self.read_blob(name)
            except FormatError as exc:
                found = str(exc)
                break
        what = f"tensor {t.name!r}" + (f" {part}" if part else "")
        raise ChecksumError(
            f"{self.where}: member {member.name!r} {what} does not match the sha256 of its original "
            f"(the lossless tier is damaged{': ' + found if found else ''}); re-download or re-merge the bundle"
        )

    def _blobs_behind(self, member: MemberRecord, t: TensorRecord, entry: ExactEntry) -> list[str]:
        """The blobs a member's exact tensor is rebuilt from: residuals along its chain of member
        bases, then the mean or the lossy tier's own blobs."""
        names: list[str] = []
        while entry.blob is not None:
            names.append(entry.blob)
            if entry.base == MEAN_BASE:
                return [*names, str(t.mean)] if t.mean is not None else names
            if entry.base is None:
                return names
            member = self.manifest.member(entry.base)
            assert member.exact is not None
            entry = member.exact[t.name]
        own = member.raw.get(t.name)
        return [*names, own] if own else [*names, *(r.name for r in t.params.blob_refs(t) if r.name)]
