"""Blob codecs: how a blob's logical bytes become the bytes stored in the file, and back.

Codecs sit behind a registry (``CODECS``); two exist: ``none`` (stored as is) and ``zstd`` (one
zstd frame that records its content size; optionally byte-shuffled first). Shuffling puts byte 0
of every element together, then byte 1, ...: float exponents then form long runs, which zstd
compresses far better than interleaved bytes. Decoding never allocates more than the size the
manifest expects.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import zstandard

from unipack.errors import FormatError

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


def unshuffle(data: bytes | bytearray | memoryview, itemsize: int) -> Decoded:
    """The elements back from their byte planes, in a fresh writable buffer (a reader may decode
    a residual in place in it)."""
    if itemsize == 1:
        return bytearray(data)
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    count = planes.shape[1]
    # Each element is built as an integer, plane j shifted to byte j, a block at a time: the
    # block and its scratch stay in cache, and widening a plane is one vectorised pass, where
    # byte-strided copies (or numpy's transposed copy) move a byte at a time.
    elements = np.empty(count, f"<u{itemsize}")
    widened = np.empty(min(UNSHUFFLE_BLOCK, count), elements.dtype)
    for start in range(0, count, UNSHUFFLE_BLOCK):
        out = elements[start : start + UNSHUFFLE_BLOCK]
        part = widened[: len(out)]
        np.copyto(out, planes[0, start : start + UNSHUFFLE_BLOCK], casting="unsafe")
        for j in range(1, itemsize):
            np.copyto(part, planes[j, start : start + UNSHUFFLE_BLOCK], casting="unsafe")
            part <<= 8 * j
            out |= part
    return elements.view(np.uint8).data


#: Elements per block of :func:`unshuffle`.
UNSHUFFLE_BLOCK = 1 << 16


class Codec(Protocol):
    """A lossless coding of blob bytes. ``encode`` returns the stored bytes and whether they were
    byte-shuffled, or None where the coding does not pay; ``decode`` inverts it, to exactly
    ``expected_size`` bytes or a FormatError naming ``where``."""

    name: str

    def encode(self, data: Buffer, itemsize: int, level: int) -> tuple[Buffer, bool] | None: ...

    def decode(
        self, stored: bytes | bytearray, shuffled: bool, itemsize: int, expected_size: int, where: str
    ) -> Decoded: ...


class Plain:
    """``none``: the bytes as they are (an ordinary tensor any safetensors tool reads)."""

    name = "none"

    def encode(self, data: Buffer, itemsize: int, level: int) -> tuple[Buffer, bool] | None:
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

    def encode(self, data: Buffer, itemsize: int, level: int) -> tuple[Buffer, bool] | None:
        shuffled = itemsize > 1
        payload = shuffle(data, itemsize) if shuffled else data
        # Single-threaded, content size written: deterministic output, and readers can check the
        # declared size before decompressing anything.
        compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        packed = compressor.compress(payload)
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


def _frame_length(data: bytes | bytearray) -> int | None:
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


#: Registered codecs, by the name the manifest records (spec §3.4).
CODECS: dict[str, Codec] = {c.name: c for c in (Plain(), Zstd())}


def encode(data: Buffer, itemsize: int, codec: str, level: int) -> tuple[Buffer, str, bool]:
    """Return ``(stored_bytes, codec_used, shuffled)``; falls back to ``none`` when coding does not pay."""
    if codec == "none" or len(data) < 64:
        return data, "none", False
    coded = CODECS[codec].encode(data, itemsize, level)
    if coded is None:
        return data, "none", False
    return coded[0], codec, coded[1]


def decode(
    stored: bytes | bytearray, codec: str, shuffled: bool, itemsize: int, expected_size: int, where: str
) -> Decoded:
    """Inverse of :func:`encode`; the result is exactly ``expected_size`` bytes or a FormatError."""
    coder = CODECS.get(codec)
    if coder is None:
        raise FormatError(f"{where}: unknown codec {codec!r}")
    return coder.decode(stored, shuffled, itemsize, expected_size, where)
