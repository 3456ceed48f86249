"""The lossless baselines: what the inputs would cost compressed losslessly by a general tool.

A bundle's ratio against the raw inputs flatters it when the inputs compress well anyway
(bf16 exponents, zero padding, frozen layers), so the report also gives the ratio against this.

The baseline is zstd at ``GROUPED_LEVEL`` on *byte-grouped* streams (``measure_grouped``): each
input file, in ``GROUP_BYTES`` pieces, with the bytes of every element of its main float dtype
grouped by position (all byte 0s, then all byte 1s, ...: ZipNN's idea, and what the bundle's own
blobs do). Exponent bytes then form long runs. On the 14 MiniLM fine-tunes (1.27 GB) it is both
stronger than plain zstd -19 (1.197x against about 1.10x) and about 90 times faster per byte
(199 MB per CPU second against 2.2): all 1.27 GB take 6.4 CPU seconds, what zstd -19 spent on
its 15 MB sample (whose first-MiB windows said 1.61x: a sample can mislead). So every input is
measured whole and the report's figure is exact, whatever the input size
(``--lossless-baseline sample`` still estimates it from windows). An input read by URL is
streamed once for it, through fsspec (``sources.remote.open_binary``), and measured the same way.
Level 1, not 3: below their top byte, float byte planes are near-random, where level 3's match
finder spends bits on spurious matches that level 1 skips (1.5% smaller there, 4x faster).

Bundles made before recorded plain zstd (level 19, sampled above 64 MiB; level 3 of whole files
next to a lossless tier): ``measure_files`` still measures that way, so that ``add`` extends such
a bundle's baseline with the same measure. Where the optional ``zipnn`` package is installed, a
merge with a lossless tier also records ZipNN (byte grouping + Huffman) of every whole file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from unipack.errors import InputError
from unipack.format import codec, dtypes
from unipack.sources.checkpoint import Checkpoint
from unipack.sources.remote import open_binary
from unipack.sources.url import InputPath, Url

LEVEL = 19
#: Inputs up to this many bytes in all are compressed whole under ``--lossless-baseline auto``
#: (about 20 s at 3 MB/s).
FULL_LIMIT = 64 * 1024 * 1024
#: Bytes compressed in all when sampling (spread over the files in proportion to their sizes):
#: 16 windows of 1 MiB cost about 5 s.
SAMPLE_BYTES = 16 * 1024 * 1024
WINDOW = 1024 * 1024


#: zstd's level for the baseline of a bundle with a lossless tier (whole files, never sampled).
FAST_LEVEL = 3
#: ZipNN's byte grouping for the dtype a member mostly holds (dtypes it does not group: none).
ZIPNN_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def baseline_level(exact_tier: bool) -> int:
    """zstd's level of the plain (ungrouped) baseline of older bundles: ``FAST_LEVEL`` next to a
    lossless tier, else ``LEVEL``."""
    return FAST_LEVEL if exact_tier else LEVEL


#: zstd's level for the byte-grouped baseline (all bundles since format version 7's unipack).
GROUPED_LEVEL = 1
#: ``stats.lossless.grouping`` of the byte-grouped baseline (spec §3.6).
GROUPING = "bytes"
#: Bytes of a file grouped and compressed at once: memory stays bounded on multi-GB shards (a
#: multiple of every element size; safetensors data starts 8-byte aligned, so pieces keep whole
#: elements).
GROUP_BYTES = 64 << 20


def main_dtype(c: Checkpoint) -> str:
    """The dtype holding most of a checkpoint's bytes (what ZipNN groups its bytes for)."""
    held: dict[str, int] = {}
    for info in c.tensors.values():
        held[info.dtype] = held.get(info.dtype, 0) + info.numel * dtypes.itemsize(info.dtype)
    return max(held, key=lambda d: held[d]) if held else "F32"


def group_size(c: Checkpoint) -> int:
    """The element size the baseline groups a checkpoint's bytes for: its main dtype's, if that
    is a float dtype (else 1: no grouping)."""
    main = main_dtype(c)
    return dtypes.itemsize(main) if main in dtypes.FLOAT_DTYPES else 1


def grouped_stats(sampled: bool) -> dict[str, object]:
    """``stats.lossless`` of a byte-grouped baseline."""
    return {"codec": "zstd", "level": GROUPED_LEVEL, "grouping": GROUPING, "sampled": sampled}


def is_grouped(recorded: dict[str, object]) -> bool:
    """Whether a bundle's recorded baseline (``stats.lossless``) is the byte-grouped one."""
    return recorded.get("grouping") == GROUPING


def measure_grouped(
    files: Sequence[tuple[InputPath, int]], itemsize: int, mode: str, share: float = 1.0
) -> LosslessSize:
    """zstd at ``GROUPED_LEVEL`` of a member's files with their bytes grouped for elements of
    ``itemsize`` bytes (1: not grouped), summed; ``mode`` ``full`` (every byte, the default) or
    ``sample`` (``share`` of SAMPLE_BYTES in evenly spaced windows, scaled up: an estimate)."""
    total = sum(size for _, size in files)
    parts = []
    for path, size in files:
        budget = max(WINDOW, int(SAMPLE_BYTES * share * size / max(total, 1)))
        windows = max(1, min(size // WINDOW, budget // WINDOW))
        try:
            with open_binary(path) as f:
                if mode == "full" or windows * WINDOW >= size:
                    parts.append(LosslessSize(_grouped_size(f, size, itemsize), False, size))
                    continue
                stride = (size - WINDOW) / max(windows - 1, 1)
                compressed = 0
                for k in range(windows):
                    f.seek(int(k * stride) // 8 * 8)  # window starts on element boundaries
                    compressed += _grouped_size(f, WINDOW, itemsize)
                parts.append(LosslessSize(round(compressed * size / (windows * WINDOW)), True, windows * WINDOW))
        except OSError as exc:
            raise InputError(f"{path}: cannot read for the lossless baseline ({exc.strerror or exc})") from None
    return LosslessSize(
        sum(p.compressed_bytes for p in parts), any(p.sampled for p in parts), sum(p.read_bytes for p in parts)
    )


def _pieces(f: BinaryIO, length: int, size: int) -> Iterator[bytes]:
    """The next ``length`` bytes of ``f`` (fewer at its end), ``size`` at a time."""
    left = length
    while left > 0:
        piece = f.read(min(size, left))
        if not piece:
            return
        left -= len(piece)
        yield piece


def _grouped_size(f: BinaryIO, length: int, itemsize: int) -> int:
    """Compressed size of the next ``length`` bytes of ``f``, byte-grouped a piece at a time."""
    compressor = zstandard.ZstdCompressor(level=GROUPED_LEVEL)
    total = 0
    for piece in _pieces(f, length, GROUP_BYTES):
        whole = len(piece) // itemsize * itemsize
        grouped = codec.shuffle(memoryview(piece)[:whole], itemsize)
        total += len(compressor.compress(bytes(grouped) + piece[whole:]))
    return total


@dataclass(frozen=True)
class LosslessSize:
    compressed_bytes: int  # measured, or scaled up from the sample
    sampled: bool
    read_bytes: int  # how much of the file was compressed


def plan_mode(mode: str, total_bytes: int, exact_tier: bool = False, grouped: bool = True) -> str | None:
    """``full``, ``sample`` or None (off) for ``--lossless-baseline mode``. ``auto`` is ``full``
    for the byte-grouped baseline (fast enough for any input); for the plain zstd -19 baseline of
    older bundles (``grouped`` False), ``full`` up to ``FULL_LIMIT`` or next to a lossless tier."""
    if mode == "off":
        return None
    if mode == "auto":
        return "full" if grouped or total_bytes <= FULL_LIMIT or exact_tier else "sample"
    return mode


def measure(path: InputPath, size: int, mode: str, share: float = 1.0, level: int = LEVEL) -> LosslessSize:
    """zstd size of the file at ``path`` (``size`` bytes) at ``level``; ``share`` of SAMPLE_BYTES
    when sampling."""
    try:
        with open_binary(path) as f:
            if mode == "full" or size <= WINDOW:
                return LosslessSize(_compressed_size(f, size, level), False, size)
            budget = max(WINDOW, int(SAMPLE_BYTES * share))
            windows = max(1, min(size // WINDOW, budget // WINDOW))
            if windows * WINDOW >= size:
                return LosslessSize(_compressed_size(f, size, level), False, size)
            stride = (size - WINDOW) / max(windows - 1, 1)
            compressed = read = 0
            for k in range(windows):
                f.seek(int(k * stride))
                compressed += _compressed_size(f, WINDOW, level)
                read += WINDOW
            return LosslessSize(round(compressed * size / read), True, read)
    except OSError as exc:
        raise InputError(f"{path}: cannot read for the lossless baseline ({exc.strerror or exc})") from None


def measure_files(
    files: Sequence[tuple[InputPath, int]], mode: str, share: float = 1.0, level: int = LEVEL
) -> LosslessSize:
    """zstd size of a member's weight files (a folder's shards) summed; an estimate if any was sampled.

    Each file gets its part of ``share`` in proportion to its size, so a sharded member is sampled
    as evenly as one file of the same size.
    """
    total = sum(size for _, size in files)
    parts = [measure(path, size, mode, share * size / max(total, 1), level) for path, size in files]
    return LosslessSize(
        sum(p.compressed_bytes for p in parts), any(p.sampled for p in parts), sum(p.read_bytes for p in parts)
    )


def zipnn_version() -> str | None:
    """The installed ZipNN's version, or None where it is not installed (it is optional)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        import zipnn  # noqa: F401  (importable, not only listed)

        return version("zipnn")
    except (ImportError, PackageNotFoundError):
        return None


def zipnn_size(files: Sequence[tuple[InputPath, int]], dtype: str) -> int | None:
    """ZipNN's size of a member's weight files, grouping bytes for ``dtype`` (a safetensors dtype),
    in ZIPNN_CHUNK pieces that keep elements aligned; None without ZipNN or for a dtype it does
    not group."""
    if dtype not in ZIPNN_DTYPES or zipnn_version() is None:
        return None
    import zipnn

    coder = zipnn.ZipNN(bytearray_dtype=ZIPNN_DTYPES[dtype], input_format="byte")
    total = 0
    for path, _ in files:
        try:
            with open_binary(path) as f:
                while chunk := f.read(ZIPNN_CHUNK):
                    # ZipNN groups the bytes it is given in place, even a bytes object's: a URL's
                    # read may hand out the stored object itself (fsspec's memory://), so it gets a copy.
                    total += len(coder.compress(bytearray(chunk) if isinstance(path, Url) else chunk))
        except OSError as exc:
            raise InputError(f"{path}: cannot read for the ZipNN baseline ({exc.strerror or exc})") from None
    return total


#: Bytes ZipNN compresses at once (memory stays bounded on multi-GB shards; a multiple of every
#: element size, and safetensors headers are padded to 8 bytes, so elements stay aligned).
ZIPNN_CHUNK = 64 * 1024 * 1024


def _compressed_size(f: BinaryIO, length: int, level: int) -> int:
    """Compressed size of the next ``length`` bytes of ``f``, streamed (never held whole)."""
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=length)
    total = sum(len(compressor.compress(piece)) for piece in _pieces(f, length, WINDOW))
    return total + len(compressor.flush())
