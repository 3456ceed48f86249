"""What a user would store instead of a bundle: the one-line alternatives unipack must beat.

Each alternative maps one member's tensor to what a user would read back, and counts the bytes
it takes as a user would ship it: densely packed integers and scales, no entropy coding (the
honest figure for "I quantized my deltas to int4"). unipack's own bytes are always what its
file holds, so a comparison never flatters unipack by coding it and not its rivals.

- ``cast``: every member cast to fp16 (or bf16): ``.half()``.
- ``int_delta``: the members' mean once (at their own precision), plus each member's delta from
  it quantized to b bits, symmetric round-to-nearest with one fp16 absmax scale per row (per
  output channel; one per tensor for vectors). b = 8, 4, 3, 2 are the anchors: int2 is ternary.
- ``sign_delta``: BitDelta without its distillation step: sign(delta) times one fp16 scale per
  tensor, the mean |delta| (the least-squares scale of a sign pattern).
- With a base model (``merge --base``), ``int_delta`` from the base instead of the mean, the base
  not stored (it is referenced, as the bundle's own deltas from it are): the fair rival of a
  bundle that does not store the base either. Tensors the base lacks take the mean, as the bundle does.

The arithmetic is plain numpy in float64; outputs are rounded to the member's dtype by the
caller, as a loaded checkpoint would be.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

#: bytes of one scale (fp16, as the int-b and sign baselines store them)
SCALE_BYTES = 2

#: The alternatives a merge measures (``pack.alternatives``) and the report lists, in order.
METHODS = ("fp16", "int8", "int4", "int2", "1-bit", "paper-k16")
LABELS = {
    "fp16": "fp16 cast (.half())",
    "int8": "mean + int8 per-row deltas",
    "int4": "mean + int4 per-row deltas",
    "int2": "mean + int2 per-row deltas",
    "1-bit": "mean + 1-bit deltas (BitDelta-style)",
    "paper-k16": "the paper's recipe (rows PCA, k = 16, fp32)",
    "base-int8": "base + int8 per-row deltas (base not stored)",
    "base-int4": "base + int4 per-row deltas (base not stored)",
    "base-int2": "base + int2 per-row deltas (base not stored)",
}
#: The paper's recipe keeps k = 16 directions (``paper-k16``).
PAPER_RANK = 16
#: Measured only by a merge given a base model (``merge --base``), after ``METHODS``.
BASE_METHODS = ("base-int8", "base-int4", "base-int2")


def rows_of(shape: tuple[int, ...]) -> int:
    """How many rows (output channels) a tensor has for per-row scales: 1 for a vector."""
    return shape[0] if len(shape) > 1 else 1


def cast_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(shape) * itemsize


def int_delta(x: np.ndarray, mean: np.ndarray, bits: int) -> np.ndarray:
    """``mean + Q(x - mean)``: b-bit symmetric per-row absmax quantization, levels -m..m with
    m = 2^(b-1) - 1 (int8: +-127; int2: -1, 0, 1), the scale rounded to fp16 as stored."""
    return next(int_deltas(x, mean, (bits,)))


def int_deltas(x: np.ndarray, mean: np.ndarray, widths: Sequence[int]) -> Iterator[np.ndarray]:
    """``int_delta(x, mean, b)`` for each b of ``widths`` in turn, with the delta and its row
    maxima computed once for all (a merge measures int8, int4 and int2 on every member); one
    result is made at a time, so a caller that drops each keeps one in memory."""
    for bits in widths:
        if bits < 2:
            raise ValueError(f"int_delta: {bits} bits (use sign_delta for 1 bit)")
    shape = x.shape
    rows = rows_of(shape)
    d = (np.asarray(x, dtype=np.float64) - mean).reshape(rows, -1)
    row_max = np.maximum(d.max(axis=1), -d.min(axis=1))  # max |d| per row, without an |d| array
    mean_rows = np.asarray(mean, dtype=np.float64).reshape(rows, -1)
    for bits in widths:
        top = 2 ** (bits - 1) - 1
        with np.errstate(over="ignore"):  # a row past fp16's range becomes inf, handled on the next line
            scale = (row_max / top).astype(np.float16).astype(np.float64)
        scale = np.where(np.isfinite(scale), scale, 0.0)  # a row past fp16's range: beyond these baselines
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        # clip(round(d / safe), -top, top) * scale + mean, one array worked in place
        q = d / safe
        np.round(q, out=q)
        np.maximum(q, -top, out=q)
        np.minimum(q, top, out=q)
        q *= scale[:, None]
        q += mean_rows
        yield q.reshape(shape)


def int_delta_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Packed codes (b bits each, rounded up to whole bytes per tensor) plus one scale per row."""
    return -(-math.prod(shape) * bits // 8) + SCALE_BYTES * rows_of(shape)


def sign_delta(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``mean + sign(d) * mean|d|`` per tensor (BitDelta's initial scale, fp16 as stored)."""
    d = np.asarray(x, dtype=np.float64) - mean
    with np.errstate(over="ignore"):  # past fp16's range the scale is inf, as the stored fp16 would be
        scale = float(np.float16(np.abs(d).mean())) if d.size else 0.0
    # mean + sign(d) * scale, with sign(d) * scale picked per element (the product by +-1 is exact)
    out = np.where(d >= 0, scale, -scale)
    del d
    out += mean
    return out


def sign_delta_bytes(shape: tuple[int, ...]) -> int:
    return -(-math.prod(shape) // 8) + SCALE_BYTES
