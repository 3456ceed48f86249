"""The lossless baseline: what the inputs would cost compressed with zstd at level 19.

A bundle's ratio against the raw inputs flatters it when the inputs compress well anyway
(bf16 exponents, zero padding, frozen layers), so the report also gives the ratio against this.
zstd -19 runs at about 3 MB/s on float weights (2 cores), so large input sets are *sampled*:
evenly spaced 1 MiB windows of every file, compressed independently, scaled to the file size,
and reported as an estimate. (On float32 weights level 19 saves under 0.1% more than level 3,
so the sample is what dominates the uncertainty, not the level.)
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


@dataclass(frozen=True)
class LosslessSize:
    compressed_bytes: int  # measured, or scaled up from the sample
    sampled: bool
    read_bytes: int  # how much of the file was compressed


def plan_mode(mode: str, total_bytes: int) -> str | None:
    """``full``, ``sample`` or None (off) for ``--lossless-baseline mode``."""
    if mode == "off":
        return None
    if mode == "auto":
        return "full" if total_bytes <= FULL_LIMIT else "sample"
    return mode


def measure(path: Path, size: int, mode: str, share: float = 1.0) -> LosslessSize:
    """zstd -19 size of the file at ``path`` (``size`` bytes); ``share`` of SAMPLE_BYTES when sampling."""
    try:
        with open(path, "rb") as f:
            if mode == "full" or size <= WINDOW:
                return LosslessSize(_compressed_size(f, size), False, size)
            budget = max(WINDOW, int(SAMPLE_BYTES * share))
            windows = max(1, min(size // WINDOW, budget // WINDOW))
            if windows * WINDOW >= size:
                return LosslessSize(_compressed_size(f, size), False, size)
            stride = (size - WINDOW) / max(windows - 1, 1)
            compressed = read = 0
            for k in range(windows):
                f.seek(int(k * stride))
                compressed += _compressed_size(f, WINDOW)
                read += WINDOW
            return LosslessSize(round(compressed * size / read), True, read)
    except OSError as exc:
        raise InputError(f"{path}: cannot read for the lossless baseline ({exc.strerror or exc})") from None


def measure_files(files: Sequence[tuple[Path, int]], mode: str, share: float = 1.0) -> LosslessSize:
    """zstd -19 size of a member's weight files (a folder's shards) summed; an estimate if any was sampled.

    Each file gets its part of ``share`` in proportion to its size, so a sharded member is sampled
    as evenly as one file of the same size.
    """
    total = sum(size for _, size in files)
    parts = [measure(path, size, mode, share * size / max(total, 1)) for path, size in files]
    return LosslessSize(
        sum(p.compressed_bytes for p in parts), any(p.sampled for p in parts), sum(p.read_bytes for p in parts)
    )


def _compressed_size(f: BinaryIO, length: int) -> int:
    """Compressed size of the next ``length`` bytes of ``f``, streamed (never held whole)."""
    compressor = zstandard.ZstdCompressor(level=LEVEL).compressobj(size=length)
    left, total = length, 0
    while left > 0:
        chunk = f.read(min(WINDOW, left))
        if not chunk:
            break
        left -= len(chunk)
        total += len(compressor.compress(chunk))
    return total + len(compressor.flush())
