"""Blob codecs: how a blob's logical bytes become the bytes stored in the file, and back.

Codecs sit behind a registry (``CODECS``); three exist: ``none`` (stored as is), ``zstd`` (one
zstd frame that records its content size; optionally byte-shuffled first) and ``zstd-chunks``
(format version 7: a chunk index, then one independent zstd frame per chunk of whole elements,
each shuffled on its own). Shuffling puts byte 0 of every element together, then byte 1, ...:
float exponents then form long runs, which zstd compresses far better than interleaved bytes.
Decoding never allocates more than the size the manifest expects.

Why chunks: a blob that is one frame with one checksum is decoded and hashed on one core, and
one large tensor (a word embedding is half of a MiniLM) then bounds a whole member's extraction.
Independent frames, each with its own digest, are verified, decompressed and unshuffled on a
thread pool (zstd, hashlib and numpy release the GIL on large buffers) into one output.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import zstandard

from unipack.errors import ChecksumError, FormatError

#: Keep a compressed blob only if it saves at least this fraction (else store it plainly, which
#: keeps it readable as an ordinary tensor by any safetensors tool).
MIN_SAVING = 0.02

#: A zstd blob may decode to at most MAX_RATIO x its stored size + RATIO_SLACK bytes. Readers
#: refuse more before allocating anything, so a tiny "bomb" cannot claim gigabytes; writers
#: store blobs that compress better than that plainly (rare: huge all-zero tensors).
MAX_RATIO = 1024
RATIO_SLACK = 65536


def max_decoded_size(stored_size: int) -> int:
    return stored_size * MAX_RATIO + RATIO_SLACK


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


#: What encoders accept: bytes, or a byte view of an array (no copy of a large tensor).
Buffer = bytes | memoryview
#: What decoders return: a blob's logical bytes (a fresh writable buffer, except a ``zstd`` blob
#: stored without shuffling, which is zstd's own ``bytes``).
Decoded = bytes | bytearray | memoryview


def shuffle(data: Buffer, itemsize: int) -> Buffer:
    if itemsize == 1:
        return data
    elements = np.frombuffer(data, np.uint8).reshape(-1, itemsize)
    planes = np.empty((itemsize, len(elements)), np.uint8)
    for j in range(itemsize):  # one strided pass per plane: 4x faster than numpy's transposed copy
        planes[j] = elements[:, j]
    return planes.data


def unshuffle(data: bytes | bytearray | memoryview, itemsize: int, out: memoryview | None = None) -> Decoded:
    """The elements back from their byte planes, in a fresh writable buffer (a reader may decode
    a residual in place in it), or in ``out`` (as many bytes as ``data``; a chunk's share of a
    blob's output)."""
    if itemsize == 1:
        if out is None:
            return bytearray(data)
        out[:] = data
        return out
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    count = planes.shape[1]
    # Each element is built as an integer, plane j shifted to byte j, a block at a time: the
    # block and its scratch stay in cache, and widening a plane is one vectorised pass, where
    # byte-strided copies (or numpy's transposed copy) move a byte at a time.
    if out is None:
        elements = np.empty(count, f"<u{itemsize}")
    else:
        elements = np.frombuffer(out, f"<u{itemsize}")
    widened = np.empty(min(UNSHUFFLE_BLOCK, count), elements.dtype)
    for start in range(0, count, UNSHUFFLE_BLOCK):
        block = elements[start : start + UNSHUFFLE_BLOCK]
        part = widened[: len(block)]
        np.copyto(block, planes[0, start : start + UNSHUFFLE_BLOCK], casting="unsafe")
        for j in range(1, itemsize):
            np.copyto(part, planes[j, start : start + UNSHUFFLE_BLOCK], casting="unsafe")
            part <<= 8 * j
            block |= part
    return elements.view(np.uint8).data


#: Elements per block of :func:`unshuffle`.
UNSHUFFLE_BLOCK = 1 << 16


class Codec(Protocol):
    """A lossless coding of blob bytes. ``encode`` returns the stored bytes and whether they were
    byte-shuffled, or None where the coding does not pay; ``decode`` inverts it, to exactly
    ``expected_size`` bytes or a FormatError naming ``where``."""

    name: str
    #: Whether ``--codec`` offers it (``zstd-chunks`` is the layout the writer picks for large
    #: blobs of a bundle with a lossless tier, not a choice of its own).
    selectable: bool

    def encode(
        self, data: Buffer, itemsize: int, level: int, *, parts: Sequence[int] | None = None
    ) -> tuple[Buffer, bool] | None: ...

    def decode(
        self, stored: bytes | bytearray, shuffled: bool, itemsize: int, expected_size: int, where: str
    ) -> Decoded: ...


class Plain:
    """``none``: the bytes as they are (an ordinary tensor any safetensors tool reads)."""

    name = "none"
    selectable = True

    def encode(
        self, data: Buffer, itemsize: int, level: int, *, parts: Sequence[int] | None = None
    ) -> tuple[Buffer, bool] | None:
        return data, False

    def decode(
        self, stored: bytes | bytearray, shuffled: bool, itemsize: int, expected_size: int, where: str
    ) -> Decoded:
        if len(stored) != expected_size:
            raise FormatError(f"{where}: {len(stored)} bytes stored, {expected_size} expected")
        return stored


class Zstd:
    """``zstd``: one zstd frame that records its content size, of the byte-shuffled data."""

    name = "zstd"
    selectable = True

    def encode(
        self, data: Buffer, itemsize: int, level: int, *, parts: Sequence[int] | None = None
    ) -> tuple[Buffer, bool] | None:
        shuffled = itemsize > 1
        payload = shuffle(data, itemsize) if shuffled else data
        # Single-threaded, content size written: deterministic output, and readers can check the
        # declared size before decompressing anything.
        compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        packed = compressor.compress(payload)
        if parts is not None and len(parts) > 1 and not shuffled:
            # Blocks per part, where that is smaller: a block's own table costs its description.
            packed = min(packed, _in_blocks(compressor, payload, parts), key=len)
        if len(packed) > len(data) * (1 - MIN_SAVING) or len(data) > max_decoded_size(len(packed)):
            return None
        return packed, shuffled

    def decode(
        self, stored: bytes | bytearray, shuffled: bool, itemsize: int, expected_size: int, where: str
    ) -> Decoded:
        if expected_size > max_decoded_size(len(stored)):
            raise FormatError(
                f"{where}: claims {expected_size} decoded bytes from {len(stored)} stored, beyond "
                f"the {MAX_RATIO}:1 compression ratio a .upk allows (a decompression bomb?)"
            )
        try:
            params = zstandard.get_frame_parameters(bytes(stored[:18]))
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: not a zstd frame ({exc})") from None
        if params.content_size != expected_size:
            raise FormatError(
                f"{where}: zstd frame declares {params.content_size} bytes, the manifest expects {expected_size}"
            )
        buffer = _scratch(expected_size) if shuffled else None
        if buffer is not None and _frame_length(stored) == len(stored):
            # Into this thread's scratch buffer: the planes are read once, by the unshuffle.
            reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False)
            try:
                whole = reader.readinto(buffer) == expected_size and not reader.read(1)
            except zstandard.ZstdError:
                whole = False
            if whole:
                return unshuffle(buffer, itemsize)
        out: bytes | None = None
        if expected_size:  # zstd's one-shot call returns an empty frame without looking past it
            try:
                # One call into a buffer of the declared size (bounded above); any fault, extra
                # data included, takes the stepwise path below, which names it.
                out = zstandard.ZstdDecompressor().decompress(stored, allow_extra_data=False)
            except zstandard.ZstdError:
                pass
        if out is None:
            out = self._diagnose(stored, expected_size, where)
        if len(out) != expected_size:
            raise FormatError(f"{where}: zstd frame is truncated ({len(out)} of {expected_size} bytes)")
        return unshuffle(out, itemsize) if shuffled else out

    @staticmethod
    def _diagnose(stored: bytes | bytearray, expected_size: int, where: str) -> bytes:
        """Decompress step by step, raising a FormatError that says what is wrong with the frame."""
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            # The frame declares its size and zstd refuses to write past it, so output is bounded.
            out = dobj.decompress(bytes(stored))
        except zstandard.ZstdError as exc:
            raise FormatError(f"{where}: corrupt zstd data ({exc})") from None
        if len(out) != expected_size or not dobj.eof:
            raise FormatError(f"{where}: zstd frame is truncated ({len(out)} of {expected_size} bytes)")
        if dobj.unused_data:
            raise FormatError(f"{where}: {len(dobj.unused_data)} bytes of trailing data after the zstd frame")
        return out


def _frame_length(data: bytes | bytearray | memoryview) -> int | None:
    """Bytes of the zstd frame that ``data`` starts with, from its block headers (RFC 8878 §3.1.1:
    3-byte headers, RLE blocks hold one byte, a 4-byte checksum may end the frame); None where
    they run past the end. A frame read into a buffer of its declared size says nothing of what
    follows it, and a blob must be exactly one frame."""
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError:
        return None
    while pos + 3 <= len(data):
        header = int.from_bytes(data[pos : pos + 3], "little")
        kind = header >> 1 & 3
        if kind == 3:  # reserved
            return None
        pos += 3 + (1 if kind == 1 else header >> 3)
        if header & 1:  # the last block
            return pos + 4 * (data[4] >> 2 & 1)
    return None


#: Each thread's scratch buffer for the zstd output of shuffled blobs, where enabled.
_SCRATCH = threading.local()


@contextmanager
def scratch_buffer() -> Iterator[None]:
    """Within: this thread decodes byte-shuffled zstd blobs through one buffer it keeps (grown to
    the largest blob) instead of a fresh one per blob: on a member of many blobs, the page faults
    of fresh buffers cost as much as decompressing into them. Each decoded blob is still a fresh
    array (the unshuffle's)."""
    outer = getattr(_SCRATCH, "buffer", None)
    _SCRATCH.buffer = np.empty(0, np.uint8) if outer is None else outer
    try:
        yield
    finally:
        _SCRATCH.buffer = outer


def keep_scratch_buffer() -> None:
    """:func:`scratch_buffer` for the rest of this thread's life (a worker thread's initializer)."""
    _SCRATCH.buffer = np.empty(0, np.uint8)


def _scratch(size: int) -> memoryview | None:
    buffer: np.ndarray | None = getattr(_SCRATCH, "buffer", None)
    if buffer is None or not size:
        return None
    if buffer.size < size:
        buffer = _SCRATCH.buffer = np.empty(size, np.uint8)
    return buffer[:size].data


#: Logical bytes per chunk of a ``zstd-chunks`` blob (rounded down to whole elements): a chunk
#: and its scratch stay within a core's share of the cache hierarchy, a 47 MB embedding makes a
#: dozen chunks for 2 to 4 threads to share, and each frame's own header, index entry and lost
#: match history cost well under 0.1% of it. Blobs up to this size stay one ``zstd`` frame.
#: Read where a writer is made (``pack/merge.py``); tests set it small (None: never chunk).
CHUNK_BYTES: int | None = 4 << 20
#: Bytes of a ``zstd-chunks`` index before its entries (u64 elements per chunk, u32 chunk
#: count), and of each entry (u64 frame length, the frame's 32-byte SHA-256).
INDEX_HEAD, INDEX_ENTRY = 12, 40


def chunk_elements(itemsize: int, chunk_bytes: int) -> int:
    """Elements per chunk: ``chunk_bytes`` rounded down to whole elements (at least one)."""
    return max(1, chunk_bytes // itemsize)


def _in_blocks(compressor: zstandard.ZstdCompressor, payload: Buffer, parts: Sequence[int]) -> bytes:
    """One zstd frame of ``payload`` in which each of the consecutive ``parts`` (their sizes in
    bytes) starts a new block. zstd codes a block's literals with one Huffman table of its own: a
    member's quantization codes are one blob of every delta tensor's codes, whose alphabets differ
    with their level counts (3 levels pack to bytes up to 242, 9 to 80, 31 to 30), and one table
    over the mixture spends more bits than a table per run of one alphabet (measured: 17% of the
    codes where a collection's tensors mix 9 and 15 levels, 1.3% on the demo's, 0.45% on MiniLM's
    larger blocks). Any zstd reader decodes the frame as one; only the bytes stored differ."""
    view = memoryview(payload).cast("B")
    if sum(parts) != len(view):
        raise ValueError(f"parts sum to {sum(parts)} bytes, the data holds {len(view)}")
    stream = compressor.compressobj(size=len(view))
    out, start = [], 0
    for size in parts:
        out.append(stream.compress(view[start : start + size]))
        start += size
        if 0 < start < len(view):
            out.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    out.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return b"".join(out)


@dataclass(frozen=True)
class ChunkIndex:
    """A ``zstd-chunks`` blob's index (spec §3.1), checked against the blob's logical size."""

    elements: int  # per chunk; the last chunk holds the rest
    numel: int
    frames: tuple[tuple[int, int, bytes], ...]  # (offset in the stored bytes, length, sha256 digest)

    @property
    def count(self) -> int:
        return len(self.frames)

    def span(self, k: int) -> tuple[int, int]:
        """Chunk ``k``'s element range [start, stop)."""
        return k * self.elements, min((k + 1) * self.elements, self.numel)


def index_length(head: bytes | bytearray | memoryview) -> int:
    """Bytes of a ``zstd-chunks`` index, from its first ``INDEX_HEAD`` bytes (what a reader that
    reads frames one by one reads first; ``chunk_index`` checks it)."""
    if len(head) < INDEX_HEAD:
        return INDEX_HEAD
    return INDEX_HEAD + INDEX_ENTRY * int.from_bytes(head[8:12], "little")


def chunk_index(
    stored: bytes | bytearray | memoryview,
    itemsize: int,
    expected_size: int,
    where: str,
    stored_length: int | None = None,
) -> ChunkIndex:
    """Parse and check a ``zstd-chunks`` blob's index: ``ceil(numel / elements)`` entries whose
    frames tile the bytes after the index exactly. ``stored`` holds the blob, or at least its
    index where ``stored_length`` gives the blob's length (frames are then read one by one)."""
    view = memoryview(stored)
    total = len(view) if stored_length is None else stored_length
    if len(view) < INDEX_HEAD or expected_size <= 0 or expected_size % itemsize:
        raise FormatError(f"{where}: a zstd-chunks blob needs an index and at least one element")
    # The bound of a one-frame blob, on the blob as a whole: it is what a reader allocates. Each
    # frame decodes into its chunk's range of that, never more; a bound per frame would refuse
    # the long all-zero runs of a residual (rows a fine-tune never touched) that chunks isolate.
    if expected_size > max_decoded_size(total):
        raise FormatError(
            f"{where}: claims {expected_size} decoded bytes from {total} stored, beyond "
            f"the {MAX_RATIO}:1 compression ratio a .upk allows (a decompression bomb?)"
        )
    elements = int.from_bytes(view[:8], "little")
    count = int.from_bytes(view[8:12], "little")
    numel = expected_size // itemsize
    if elements < 1 or count != -(-numel // elements):
        raise FormatError(
            f"{where}: chunk index says {count} chunks of {elements} elements, which does not cover "
            f"the blob's {numel} elements exactly"
        )
    offset = INDEX_HEAD + INDEX_ENTRY * count
    if offset > total or offset > len(view):
        raise FormatError(f"{where}: chunk index of {count} entries runs past the blob's {total} bytes")
    frames = []
    for k in range(count):
        entry = view[INDEX_HEAD + INDEX_ENTRY * k : INDEX_HEAD + INDEX_ENTRY * (k + 1)]
        length = int.from_bytes(entry[:8], "little")
        if length < 1 or offset + length > total:
            raise FormatError(f"{where}: chunk {k} of {count} runs past the end of the blob")
        frames.append((offset, length, bytes(entry[8:])))
        offset += length
    if offset != total:
        raise FormatError(f"{where}: {total - offset} bytes after the last chunk's frame")
    return ChunkIndex(elements, numel, tuple(frames))


def decode_chunk(
    frame: bytes | bytearray | memoryview,
    index: ChunkIndex,
    k: int,
    shuffled: bool,
    itemsize: int,
    out: memoryview,
    where: str,
    *,
    verify: bool = True,
) -> None:
    """Chunk ``k`` of a ``zstd-chunks`` blob, from its ``frame`` (its stored bytes), into ``out``
    (its bytes of the blob's output). ``verify``: check the frame's digest first (spec §3.1); a
    caller that checks what it builds from the chunk against a digest of its own may skip it
    (the lossless tier, spec §9.2)."""
    _, length, digest = index.frames[k]
    frame = memoryview(frame)
    what = f"{where}: chunk {k} of {index.count}"
    if len(frame) != length:
        raise FormatError(f"{what}: {len(frame)} bytes read, the index says {length}")
    if verify and hashlib.sha256(frame).digest() != digest:
        raise ChecksumError(
            f"{what} is corrupt (checksum mismatch); the file was damaged after it was written: "
            f"re-download or re-merge it"
        )
    size = len(out)
    target = _scratch(size) if shuffled else out
    if target is None:  # no scratch buffer in this thread: a fresh one
        target = memoryview(bytearray(size))
    params = _frame_params(frame, what)
    if params.content_size != size:
        raise FormatError(f"{what}: zstd frame declares {params.content_size} bytes, the index implies {size}")
    reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)
    try:
        got = reader.readinto(target)
        whole = got == size and not reader.read(1) and _frame_length(frame) == length
    except zstandard.ZstdError:
        whole = False
    if not whole:
        Zstd._diagnose(bytes(frame), size, what)  # raises, naming the fault
        raise FormatError(f"{what}: zstd frame does not decode to exactly {size} bytes")
    if shuffled:
        unshuffle(target, itemsize, out)


def _frame_params(frame: bytes | bytearray | memoryview, where: str) -> zstandard.FrameParameters:
    try:
        return zstandard.get_frame_parameters(bytes(frame[:18]))
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: not a zstd frame ({exc})") from None


class ZstdChunks:
    """``zstd-chunks``: a chunk index, then one zstd frame per chunk of whole elements (spec §3.1),
    each chunk byte-shuffled on its own, so chunks decode and verify independently, in parallel."""

    name = "zstd-chunks"
    selectable = False

    def encode(
        self,
        data: Buffer,
        itemsize: int,
        level: int,
        chunk_bytes: int | None = None,
        *,
        parts: Sequence[int] | None = None,  # chunks are coded whole: no blocks within them
    ) -> tuple[Buffer, bool] | None:
        elements = chunk_elements(itemsize, chunk_bytes or CHUNK_BYTES or len(data))
        numel = len(data) // itemsize
        count = -(-numel // elements)
        view = memoryview(data).cast("B")
        shuffled = itemsize > 1

        def frame(k: int) -> tuple[bytes, bytes]:
            part = view[k * elements * itemsize : min((k + 1) * elements, numel) * itemsize]
            payload = shuffle(part, itemsize) if shuffled else part
            # Single-threaded, content size written, as for ``zstd``: deterministic frames.
            compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
            packed = compressor.compress(payload)
            return packed, hashlib.sha256(packed).digest()

        frames = run_chunks(frame, count)
        head = [elements.to_bytes(8, "little"), count.to_bytes(4, "little")]
        for packed, digest in frames:
            head += [len(packed).to_bytes(8, "little"), digest]
        stored = b"".join(head + [packed for packed, _ in frames])
        if len(stored) > len(data) * (1 - MIN_SAVING) or len(data) > max_decoded_size(len(stored)):
            return None
        return stored, shuffled

    def decode(
        self,
        stored: bytes | bytearray,
        shuffled: bool,
        itemsize: int,
        expected_size: int,
        where: str,
        verify: bool = True,
    ) -> Decoded:
        index = chunk_index(stored, itemsize, expected_size, where)
        out = np.empty(expected_size, np.uint8)
        byte_out = out.data

        def one(k: int) -> None:
            start, stop = index.span(k)
            offset, length, _ = index.frames[k]
            frame = memoryview(stored)[offset : offset + length]
            part = byte_out[start * itemsize : stop * itemsize]
            decode_chunk(frame, index, k, shuffled, itemsize, part, where, verify=verify)

        run_chunks(one, index.count)
        return byte_out


# -- the chunk thread pool ------------------------------------------------------------------------

#: Threads that work on chunks at once, at most (fewer on fewer cores). Past four, decoding is
#: bound by memory bandwidth.
MAX_THREADS = 4


def default_threads() -> int:
    """One thread per core this process may run on, up to ``MAX_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


T = TypeVar("T")
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()


def _pool() -> ThreadPoolExecutor:
    """This process's chunk pool, made on first use. A forked child (``merge --jobs``) inherits
    the parent's executor without its threads: it makes its own."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            executor = ThreadPoolExecutor(default_threads(), "unipack-chunk", initializer=_pool_thread)
            _POOL = (os.getpid(), executor)
        return _POOL[1]


def _pool_thread() -> None:
    _IN_POOL.active = True
    keep_scratch_buffer()


@contextmanager
def one_thread() -> Iterator[None]:
    """Within: this thread runs its chunks itself, one after the other (``threads=1``)."""
    outer = getattr(_IN_POOL, "active", False)
    _IN_POOL.active = True
    try:
        yield
    finally:
        _IN_POOL.active = outer


def in_background(work: Callable[[], T]) -> Callable[[], T]:
    """Start ``work`` on the chunk pool and return what waits for its result (in a pool thread,
    or with one thread, ``work`` runs at once): a serial pass, such as a whole tensor's sha256,
    overlapping the chunk-parallel work beside it."""
    if getattr(_IN_POOL, "active", False) or default_threads() == 1:
        done = work()
        return lambda: done
    return _pool().submit(work).result


def run_chunks(work: Callable[[int], T], count: int) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, on the chunk pool where that helps. All chunks are
    waited for; the first failure in chunk order is raised (the same error one thread would
    raise). In a pool thread, and for one chunk, the work runs in the caller's thread: pool
    threads never wait on the pool, so nothing can deadlock."""
    if count <= 1 or getattr(_IN_POOL, "active", False) or default_threads() == 1:
        return [work(k) for k in range(count)]
    futures: list[Future[T]] = [_pool().submit(work, k) for k in range(count)]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


#: Registered codecs, by the name the manifest records (spec §3.1).
CODECS: dict[str, Codec] = {c.name: c for c in (Plain(), Zstd(), ZstdChunks())}
#: The codecs a merge may be asked for (``--codec``).
SELECTABLE = tuple(name for name, c in CODECS.items() if c.selectable)


def encode(
    data: Buffer,
    itemsize: int,
    codec: str,
    level: int,
    chunk_bytes: int | None = None,
    parts: Sequence[int] | None = None,
) -> tuple[Buffer, str, bool]:
    """Return ``(stored_bytes, codec_used, shuffled)``; falls back to ``none`` when coding does not
    pay. ``chunk_bytes``: a ``zstd`` blob larger than that is stored as ``zstd-chunks`` of about
    that many logical bytes each (None: one frame, the layout of format versions 1 to 6).
    ``parts``: the sizes in bytes of the consecutive sections of unshuffled (1-byte) data that
    differ in statistics, each of which a one-frame ``zstd`` blob starts a block with
    (``_in_blocks``); ignored by the other codecs."""
    if codec == "none" or len(data) < 64:
        return data, "none", False
    if codec == "zstd" and chunk_bytes is not None and len(data) > chunk_elements(itemsize, chunk_bytes) * itemsize:
        chunked = ZstdChunks().encode(data, itemsize, level, chunk_bytes)
        if chunked is None:
            return data, "none", False
        return chunked[0], ZstdChunks.name, chunked[1]
    coded = CODECS[codec].encode(data, itemsize, level, parts=parts)
    if coded is None:
        return data, "none", False
    return coded[0], codec, coded[1]


def decode(
    stored: bytes | bytearray,
    codec: str,
    shuffled: bool,
    itemsize: int,
    expected_size: int,
    where: str,
    *,
    verify: bool = True,
) -> Decoded:
    """Inverse of :func:`encode`; the result is exactly ``expected_size`` bytes or a FormatError.
    ``verify``: check a ``zstd-chunks`` blob's frame digests (other codecs have none: their
    checksum is the blob's, checked by whoever reads the stored bytes)."""
    coder = CODECS.get(codec)
    if coder is None:
        raise FormatError(f"{where}: unknown codec {codec!r}")
    if isinstance(coder, ZstdChunks):
        return coder.decode(stored, shuffled, itemsize, expected_size, where, verify)
    return coder.decode(stored, shuffled, itemsize, expected_size, where)
