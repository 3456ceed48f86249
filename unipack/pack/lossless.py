"""The lossless baselines: what the inputs would cost compressed losslessly by a general tool.

A bundle's ratio against the raw inputs flatters it when the inputs compress well anyway
(bf16 exponents, zero padding, frozen layers), so the report also gives the ratio against this.
zstd -19 runs at about 3 MB/s on float weights (2 cores), so large input sets are *sampled*:
evenly spaced 1 MiB windows of every file, compressed independently, scaled to the file size,
and reported as an estimate. (On float32 weights level 19 saves under 0.1% more than level 3,
so the sample is what dominates the uncertainty, not the level.)

A bundle with a lossless tier (``merge --lossless``) is itself the lossless figure, measured
exactly; what it is compared with must be exact too. Its baseline is zstd at ``FAST_LEVEL`` on
every whole file (about 100 times faster than level 19, within 2% of its size on float
weights), and, where the optional ``zipnn`` package is installed, ZipNN (byte grouping +
Huffman, the field's lossless coder for weights) on every whole file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from unipack.errors import InputError

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
    """zstd's level for the baseline: ``FAST_LEVEL`` next to a lossless tier, else ``LEVEL``."""
    return FAST_LEVEL if exact_tier else LEVEL


@dataclass(frozen=True)
class LosslessSize:
    compressed_bytes: int  # measured, or scaled up from the sample
    sampled: bool
    read_bytes: int  # how much of the file was compressed


def plan_mode(mode: str, total_bytes: int, exact_tier: bool = False) -> str | None:
    """``full``, ``sample`` or None (off) for ``--lossless-baseline mode`` (``auto`` next to a
    lossless tier: ``full``, at ``FAST_LEVEL``)."""
    if mode == "off":
        return None
    if mode == "auto":
        return "full" if total_bytes <= FULL_LIMIT or exact_tier else "sample"
    return mode


def measure(path: Path, size: int, mode: str, share: float = 1.0, level: int = LEVEL) -> LosslessSize:
    """zstd size of the file at ``path`` (``size`` bytes) at ``level``; ``share`` of SAMPLE_BYTES
    when sampling."""
    try:
        with open(path, "rb") as f:
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


def measure_files(files: Sequence[tuple[Path, int]], mode: str, share: float = 1.0, level: int = LEVEL) -> LosslessSize:
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


def zipnn_size(files: Sequence[tuple[Path, int]], dtype: str) -> int | None:
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
            with open(path, "rb") as f:
                while chunk := f.read(ZIPNN_CHUNK):
                    total += len(coder.compress(chunk))
        except OSError as exc:
            raise InputError(f"{path}: cannot read for the ZipNN baseline ({exc.strerror or exc})") from None
    return total


#: Bytes ZipNN compresses at once (memory stays bounded on multi-GB shards; a multiple of every
#: element size, and safetensors headers are padded to 8 bytes, so elements stay aligned).
ZIPNN_CHUNK = 64 * 1024 * 1024


def _compressed_size(f: BinaryIO, length: int, level: int) -> int:
    """Compressed size of the next ``length`` bytes of ``f``, streamed (never held whole)."""
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=length)
    left, total = length, 0
    while left > 0:
        chunk = f.read(min(WINDOW, left))
        if not chunk:
            break
        left -= len(chunk)
        total += len(compressor.compress(chunk))
    return total + len(compressor.flush())
