"""Uniform scalar quantization of a member's delta, the arithmetic behind ``delta`` storage.

A member's tensor is rebuilt as ``round(M + q * s)`` (spec §4.5): ``M`` the stored mean, ``q``
one of L levels ``u - (L - 1)/2`` (integers for odd L, zero among them; half-integers for even
L, L = 2 being a sign), ``s`` one step per group of consecutive elements. Codes are packed in
radix L, as many per byte as fit (5 ternary codes, 3 of 5 levels, 2 of up to 16), and the
bytes go through the bundle's entropy coder. Packing several small codes into one byte is
what lets zstd's byte-wise Huffman stage reach the codes' entropy (within ~0.02 bit for L <= 5
on Gaussian and Laplacian deltas; one code per byte costs up to 0.6 bit more).

With entropy coding the MSE-optimal quantizer at a given rate is a uniform one with one step
everywhere (reverse water-filling at high rate), so the step is searched per member to meet
that member's error budget as loosely as possible; fewer levels (which clip the tails) are
tried by the chooser as cheaper candidates, and their cost is measured, not assumed.

Everything here is numpy on float64 and deterministic (round half to even), so a bundle's
bytes do not depend on the machine; each member's error is measured on exactly what
``extract`` returns, after the step's and the output's rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from unipack.core.linalg import rounded_error
from unipack.format import dtypes

#: The number of levels a record may use (L = 1 would store nothing: that is a mean).
MIN_LEVELS, MAX_LEVELS = 2, 256


def per_byte(levels: int) -> int:
    """Codes packed into one byte: the largest k with L^k <= 256."""
    k = 1
    while levels ** (k + 1) <= 256:
        k += 1
    return k


def offset(levels: int) -> float:
    """q = u - offset: levels symmetric about zero."""
    return (levels - 1) / 2


def packed_size(numel: int, levels: int) -> int:
    """Bytes of ``numel`` codes packed ``per_byte(levels)`` to a byte (the last one padded with 0)."""
    return -(-numel // per_byte(levels))


def pack(codes: np.ndarray, levels: int) -> np.ndarray:
    """Codes u < L -> bytes: byte j holds codes j*k .. j*k + k - 1 as sum(u_(j*k+i) * L^i)."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    k = per_byte(levels)
    if k == 1:
        return flat.copy()
    padded = np.zeros(packed_size(flat.size, levels) * k, dtype=np.uint16)
    padded[: flat.size] = flat
    digits = padded.reshape(-1, k)
    out = np.zeros(digits.shape[0], dtype=np.uint16)
    for i in range(k - 1, -1, -1):  # Horner: ((u_(k-1) L + u_(k-2)) L + ...) + u_0
        out = out * np.uint16(levels) + digits[:, i]
    return out.astype(np.uint8)


def unpack(packed: np.ndarray, levels: int, numel: int) -> np.ndarray:
    """The inverse of ``pack``: ``numel`` codes (uint8). Bytes must be < L^k (``valid_bytes``)."""
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if per_byte(levels) == 1:
        return data[:numel].copy()
    # One gather from a table of each byte's k digits, a k-byte item per byte: a single pass
    # instead of k divisions and remainders over the whole array (and 5-7x faster than
    # gathering the table's rows as a 2-D array).
    return _digits(levels)[data].view(np.uint8)[:numel]


@functools.lru_cache(maxsize=MAX_LEVELS)
def _digits(levels: int) -> np.ndarray:
    """Item b: the k radix-L digits of byte b, least significant first, as one k-byte item
    (``unpack``'s table)."""
    k = per_byte(levels)
    rest = np.arange(256, dtype=np.uint16)
    table = np.empty((256, k), dtype=np.uint8)
    for i in range(k):
        table[:, i] = rest % levels
        rest = rest // levels
    items = table.view(np.dtype((np.void, k))).reshape(256)
    items.setflags(write=False)
    return items


def valid_bytes(packed: np.ndarray, levels: int) -> bool:
    """Whether every byte is a packing of k codes < L (readers refuse anything else)."""
    return bool(packed.size == 0 or int(packed.max()) < levels ** per_byte(levels))


def n_groups(numel: int, group: int) -> int:
    return -(-numel // group)


def expand(scales: np.ndarray, group: int, numel: int) -> np.ndarray:
    """One step per element: group j covers elements j*g .. j*g + g - 1 (the last may be short)."""
    return np.repeat(np.asarray(scales, dtype=np.float64).reshape(-1), group)[:numel]


def dequantize(mean: np.ndarray, codes: np.ndarray, scales: np.ndarray, levels: int, group: int) -> np.ndarray:
    """M + q * s in float64 (flat): the spec's reference arithmetic, before the member's rounding.

    q * s is exact in float64 (q has at most 8 significant bits, s at most 24), so the only
    rounding before the member's own is the one of the sum.
    """
    q = codes.astype(np.float64) - offset(levels)
    return np.asarray(mean, dtype=np.float64).reshape(-1) + q * expand(scales, group, q.size)


#: Elements per block of ``dequantize_rounded``: its float64 scratch (2 MiB) stays in cache.
READ_BLOCK = 1 << 18


def dequantize_rounded(
    mean_held: np.ndarray,
    mean_dtype: str,
    mean_step: float | None,
    codes: np.ndarray,
    scales: np.ndarray,
    levels: int,
    group: int,
    out_dtype: str,
) -> np.ndarray:
    """``from_float(dequantize(M, codes, scales, levels, group), out_dtype)``, flat, with the same
    IEEE operations on every element, computed a block of whole groups at a time: a reader's
    path, where the full-size float64 temporaries of ``dequantize`` cost more than the
    arithmetic. ``mean_held``: the mean blob as stored (``mean_dtype``; integers times
    ``mean_step`` where that is set, spec §8.2).
    """
    flat_codes = codes.reshape(-1)
    table = np.arange(levels, dtype=np.float64) - offset(levels)  # q for each code, exactly

    def q_block(start: int, stop: int) -> np.ndarray:
        return table[flat_codes[start:stop]]

    return _dequantize_blocks(q_block, codes.size, group, mean_held, mean_dtype, mean_step, scales, out_dtype)


def dequantize_packed(
    mean_held: np.ndarray,
    mean_dtype: str,
    mean_step: float | None,
    packed: np.ndarray,
    numel: int,
    scales: np.ndarray,
    levels: int,
    group: int,
    out_dtype: str,
) -> np.ndarray:
    """``dequantize_rounded`` of ``unpack(packed, levels, numel)``, bit for bit, without the
    unpacked codes: each packed byte is looked up once, straight to its k codes' float64 q
    values (one gather instead of two passes). ``packed`` must hold ``valid_bytes``."""
    k = per_byte(levels)
    unit = k if group >= numel else math.lcm(group, k)  # blocks start on a byte and on a group
    if unit > 4 * READ_BLOCK:  # groups too long to block on both: unpack first
        return dequantize_rounded(
            mean_held, mean_dtype, mean_step, unpack(packed, levels, numel), scales, levels, group, out_dtype
        )
    items = _q_items(levels)
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)

    def q_block(start: int, stop: int) -> np.ndarray:
        return items[data[start // k : -(-stop // k)]].view(np.float64)[: stop - start]

    return _dequantize_blocks(q_block, numel, unit, mean_held, mean_dtype, mean_step, scales, out_dtype, group)


@functools.lru_cache(maxsize=MAX_LEVELS)
def _q_items(levels: int) -> np.ndarray:
    """Item b: the float64 q values of the k codes packed in byte b, as one 8k-byte item
    (``dequantize_packed``'s table; bytes beyond L^k get their digits too, never read)."""
    k = per_byte(levels)
    digits = _digits(levels).view(np.uint8).reshape(256, k)
    values = np.ascontiguousarray(digits.astype(np.float64) - offset(levels))
    items = values.view(np.dtype((np.void, 8 * k))).reshape(256)
    items.setflags(write=False)
    return items


def _dequantize_blocks(
    q_block: Callable[[int, int], np.ndarray],
    numel: int,
    unit: int,
    mean_held: np.ndarray,
    mean_dtype: str,
    mean_step: float | None,
    scales: np.ndarray,
    out_dtype: str,
    group: int | None = None,
) -> np.ndarray:
    """M + q * s rounded to ``out_dtype``, a block of ``unit``s at a time (a unit: whole groups,
    so steps broadcast per row); ``q_block(start, stop)``: a fresh float64 array of those q."""
    group = unit if group is None else group
    mean_flat = mean_held.reshape(-1)
    steps = np.asarray(scales, dtype=np.float64).reshape(-1)
    out = np.empty(numel, dtype=dtypes.holder(out_dtype))
    block = max(unit, READ_BLOCK // unit * unit)
    widened = np.empty(min(block, numel)) if mean_step is not None else None
    for start in range(0, numel, block):
        stop = min(numel, start + block)
        q = q_block(start, stop)
        whole = (stop - start) // group * group
        first = start // group
        if whole:
            rows = q[:whole].reshape(-1, group)
            rows *= steps[first : first + whole // group, None]
        if whole < stop - start:  # the tensor's last, shorter group
            q[whole:] *= steps[first + whole // group]
        piece = mean_flat[start:stop]
        # q * s + M is M + q * s (IEEE addition commutes); M widened exactly as mean_values does:
        # integers times the step in float64, floats widened in the ufunc's loop (no temporary).
        if widened is not None and mean_step is not None:
            q += np.multiply(piece, mean_step, out=widened[: stop - start], dtype=np.float64)
        elif mean_dtype in ("F32", "F16", "F64"):
            q += piece
        else:
            q += dtypes.to_float(piece, mean_dtype)
        with np.errstate(over="ignore"):
            if out_dtype in ("F32", "F16", "F64"):
                out[start:stop] = q  # the cast from_float makes (round to nearest even), in place
            else:
                out[start:stop] = dtypes.from_float(q, out_dtype)
    return out


@dataclass(frozen=True)
class Quantized:
    """One member's delta at one quantizer: what is stored and how faithful it is."""

    codes: np.ndarray  # uint8, one per element (unpacked), < levels
    scales_held: np.ndarray  # the steps as stored: holder(scale dtype), one per group
    out: np.ndarray | None  # float64, what extract returns (rounded to the member's dtype), flat; None: not kept
    error: float  # ||x - out|| (absolute)
    multiplier: float = math.nan  # the step search's c / c0 (``fit_step``): a hint for similar members


def quantize(
    x: np.ndarray,
    mean: np.ndarray,
    steps: np.ndarray,
    *,
    levels: int,
    group: int,
    scale_dtype: str,
    member_dtype: str,
    delta: np.ndarray | None = None,
    keep_out: bool = True,
) -> Quantized:
    """Quantize ``x - mean`` (flat float64) with one step per group, rounded to ``scale_dtype``
    first so that the codes are optimal for the step a reader will see. ``delta``: ``x - mean``
    when the caller already has it (a step search quantizes one delta many times); ``keep_out``:
    False where only the codes and the error are needed (a search), so that no array of what
    extract returns is made: the work array becomes the difference in place."""
    numel = x.size
    d = x - mean if delta is None else delta
    held, stored = dtypes.store_as(np.asarray(steps, dtype=np.float64), scale_dtype)
    flat_steps = stored.reshape(-1)
    # Every full-size array below is made once and then worked on in place: on tensors of a
    # million elements the allocations cost as much as the arithmetic. Steps broadcast per
    # group (a (groups, group) view) instead of being repeated per element, where the groups
    # tile the tensor; the IEEE operations on each element are those of the plain expressions
    # in the comments, so the results are bit-identical.
    s: np.ndarray | float
    tiled = flat_steps.size > 1 and numel == flat_steps.size * group
    if flat_steps.size == 1:  # one step for the whole tensor: a scalar
        s = float(flat_steps[0])
        ratio = d / s if s > 0 else np.zeros(numel)
    elif tiled:
        s = flat_steps[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (d.reshape(-1, group) / s).reshape(-1)  # d / s
        bad = ~(flat_steps > 0)
        if bad.any():
            ratio.reshape(-1, group)[bad] = 0.0
    else:  # a shorter last group: steps per element
        s = expand(stored, group, numel)
        ratio = steps_ratio(d, s)
    q = nearest_level(ratio, levels, in_place=True)
    # codes = q + offset, without a second float64 array: the offset is added and taken away in
    # place (small half-integers: both exact). A -0.0 level comes back as +0.0, the level a
    # reader rebuilds from the code (code - offset): codes and errors are unchanged, and ``out``
    # is then the reader's to the sign of a zero where the mean itself is -0.0.
    top = offset(levels)
    q += top
    codes = q.astype(np.uint8)
    q -= top
    out: np.ndarray | None
    with np.errstate(over="ignore", invalid="ignore"):
        if tiled:
            rows = q.reshape(-1, group)  # a view: q * s, a step per row of groups
            rows *= s
        else:
            q *= s
        q += mean  # mean + q * s
        if keep_out:
            out = dtypes.round_trip(q, member_dtype)
            np.subtract(x, out, out=q)
        else:
            out = None
            rounded_error(x, q, member_dtype)  # q becomes x - out
        error = float(np.linalg.norm(q))  # ||x - out||
    return Quantized(codes, held, out, error if math.isfinite(error) else math.inf)


def steps_ratio(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``d / s`` per element, 0 where the step is not positive (a group of zeros, or NaN).

    Divided everywhere, then patched: a masked ``np.where`` costs several times the division,
    and a quantizer calls this for every step it tries.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = d / s
    bad = ~(s > 0)
    if bad.any():
        ratio[bad] = 0.0
    return ratio


def nearest_level(ratio: np.ndarray, levels: int, *, in_place: bool = False) -> np.ndarray:
    """The level nearest to each ``ratio`` (x - mean in steps), ties to even, clipped to the range
    (``in_place``: overwriting ``ratio``, a float64 array the caller no longer needs).

    Clipped in place with ``maximum``/``minimum`` (``np.clip`` is several times slower on large
    arrays; both keep NaN as NaN).
    """
    top = offset(levels)
    if in_place:
        q = ratio
        if levels % 2:
            np.rint(q, out=q)
        else:
            np.floor(q, out=q)
            q += 0.5
    else:
        q = np.rint(ratio) if levels % 2 else np.floor(ratio) + 0.5
    np.maximum(q, -top, out=q)
    np.minimum(q, top, out=q)
    return q


def group_rms(d: np.ndarray, group: int) -> np.ndarray:
    """Root mean square of ``d`` per group (the shape each group's step follows)."""
    numel = d.size
    count = n_groups(numel, group)
    padded = np.zeros(count * group)
    padded[:numel] = d * d
    sums = padded.reshape(count, group).sum(axis=1)
    sizes = np.full(count, float(group))
    sizes[-1] = numel - (count - 1) * group
    return np.sqrt(sums / sizes)


def group_mean_abs(d: np.ndarray, group: int) -> np.ndarray:
    numel = d.size
    count = n_groups(numel, group)
    padded = np.zeros(count * group)
    padded[:numel] = np.abs(d)
    sizes = np.full(count, float(group))
    sizes[-1] = numel - (count - 1) * group
    return padded.reshape(count, group).sum(axis=1) / sizes


#: Factor between the steps tried while bracketing the largest step that meets a budget.
_GROW = 1.25
#: Bisection steps after bracketing: the step is then within 1.25^(1/16) (1.4%) of the largest.
_BISECT = 4
#: With a hint (the multiplier a similar member needed), the bracket starts there with finer
#: factors: within 1.06^(1/4) (1.5%) of the largest after ~4 tries instead of ~8.
_GROW_NEAR = 1.06
_BISECT_NEAR = 2
#: Tensors of more than twice this many elements search their step on a strided sample of this
#: many, then check (and if needed shrink) it on the whole tensor: the search then costs about
#: one full quantization plus a few of the sample.
SAMPLE = 1 << 15
#: When the sample's choice misses the budget on the whole tensor, the step shrinks by the miss's
#: own ratio (in the granular regime the error is proportional to the step), with this margin,
#: and by at most half per try (clipping makes the error far from proportional).
_SHRINK_MARGIN = 0.995
_SHRINK_MOST = 0.5
_SHRINK_TRIES = 12


def step_shape(d: np.ndarray, levels: int, group: int) -> np.ndarray:
    """Per group, what the step is proportional to: the group's RMS, or for a sign quantizer
    (L = 2) twice its mean |d|, the least-squares scale of sign(d) (BitDelta's)."""
    if levels == 2:
        return 2.0 * group_mean_abs(d, group)
    return group_rms(d, group)


def zero_error(x: np.ndarray, mean: np.ndarray, member_dtype: str) -> float:
    """||x - out|| when every code is zero (out = the mean in the member's dtype): the same for
    every level count and grouping, so a caller trying many can compute it once."""
    with np.errstate(over="ignore", invalid="ignore"):
        error = rounded_error(x, np.array(mean, dtype=np.float64), member_dtype)
    return error if math.isfinite(error) else math.inf


def fit_step(
    x: np.ndarray,
    mean: np.ndarray,
    budget: float,
    *,
    levels: int,
    group: int,
    scale_dtype: str,
    member_dtype: str,
    hint: float | None = None,
    zero: float | None = None,
    delta: np.ndarray | None = None,
    shape: np.ndarray | None = None,
    keep_out: bool = True,
) -> Quantized | None:
    """The coarsest quantization of ``x - mean`` (flat float64) whose error ||x - out|| is within
    ``budget``, or None if no step meets it.

    Steps are ``c * shape_g`` per group (``step_shape``), with c searched: it starts at the
    uniform-noise prediction c0 (per-element noise c^2 shape^2 / 12, summed to budget^2), or
    at ``hint`` x c0 where a similar member's search found c / c0 = ``hint`` (the result's
    ``multiplier``), is bracketed by constant factors and then bisected. The error is not
    monotone in c once codes clip (narrow containers): shrinking stops when it no longer helps.
    A sign quantizer has its closed-form step (c = 1) and is taken or refused as it is.
    ``zero``: ``zero_error(x, mean, member_dtype)`` where the caller has it; ``delta``: ``x - mean``
    and ``shape``: ``step_shape(x - mean, levels, group)``, likewise (a chooser trying many level
    counts on one member computes them once per mean and grouping); ``keep_out``: as for
    ``quantize`` (False: the result's ``out`` is None).
    """
    d = x - mean if delta is None else delta
    numel = d.size
    shape_g = step_shape(d, levels, group) if shape is None else shape

    def full(c: float) -> Quantized:
        return quantize(
            x,
            mean,
            c * shape_g,
            levels=levels,
            group=group,
            scale_dtype=scale_dtype,
            member_dtype=member_dtype,
            delta=d,
            keep_out=keep_out,
        )

    if levels == 2:
        result = full(1.0)
        return result if result.error <= budget else None
    if zero is None:
        zero = zero_error(x, mean, member_dtype)
    if zero <= budget:  # nothing to store: every code is zero, the mean is close enough
        return full(0.0)
    weight = float(np.sum(shape_g * shape_g) * group)
    if weight <= 0.0 or budget <= 0.0:
        return None
    c0 = budget * math.sqrt(12.0 / weight)
    if numel <= 2 * SAMPLE:
        last_pass: dict[float, Quantized] = {}  # the search ends on its last passing c: not redone

        def error(c: float) -> float:
            result = full(c)
            if result.error <= budget:
                last_pass.clear()
                last_pass[c] = result
            return result.error

        c = _search(error, c0, hint, budget)
        if c is None:
            return None
        return _with_multiplier(last_pass[c] if c in last_pass else full(c), c / c0)
    # Search on a strided sample, then make sure on the whole tensor.
    stride = numel // SAMPLE
    idx = np.arange(0, numel, stride)[:SAMPLE]
    xs, ms, ds = x[idx], mean[idx], d[idx]
    shape_e = shape_g[idx // group]
    scale = math.sqrt(numel / idx.size)
    scalar = group >= numel  # one step for the whole tensor: the same IEEE operations, faster

    def sampled(c: float) -> float:
        s: np.ndarray | float
        if scalar:
            s = c * float(shape_e[0])
            ratio = ds / s if s > 0 else np.zeros_like(ds)
        else:
            steps = c * shape_e
            ratio = steps_ratio(ds, steps)
            s = steps
        q = nearest_level(ratio, levels)
        with np.errstate(over="ignore", invalid="ignore"):
            out = dtypes.round_trip(ms + q * s, member_dtype)
        return float(np.linalg.norm(xs - out)) * scale

    c = _search(sampled, c0, hint, budget)
    if c is None:
        return None
    for _ in range(_SHRINK_TRIES):
        result = full(c)
        if result.error <= budget:
            return _with_multiplier(result, c / c0)
        if not math.isfinite(result.error):
            return None
        c *= max(_SHRINK_MOST, _SHRINK_MARGIN * budget / result.error)
    return None


def _with_multiplier(result: Quantized, multiplier: float) -> Quantized:
    return dataclasses.replace(result, multiplier=multiplier)


def _search(error: Callable[[float], float], c0: float, hint: float | None, budget: float) -> float | None:
    """``_largest_step`` from the hint with fine factors, else (no hint, or nothing found near
    it) from c0 with coarse ones."""
    if hint is not None and math.isfinite(hint) and hint > 0:
        c = _largest_step(error, c0 * hint, budget, _GROW_NEAR, _BISECT_NEAR)
        if c is not None:
            return c
    return _largest_step(error, c0, budget, _GROW, _BISECT)


def _largest_step(
    error: Callable[[float], float], c0: float, budget: float, grow: float, bisections: int
) -> float | None:
    """The largest multiplier c (to within the bisection's precision) with error(c) <= budget.

    Below the budget's c the error is granular (grows with c); above it, with a narrow
    container, clipping can make it fall again as c grows. So a miss at c0 is followed by a
    walk both ways along a geometric grid (factor ``grow``) while the error keeps falling; the
    first pass found is then pushed up to the last passing c.
    """
    first = error(c0)
    lo: float | None = c0 if first <= budget else None
    hi: float | None = None
    if lo is None:
        for direction in (1.0 / grow, grow):
            c, previous = c0, first
            for _ in range(12):
                c *= direction
                e = error(c)
                if e <= budget:
                    lo = c
                    if direction < 1:
                        hi = c * grow
                    break
                if e >= previous:
                    break
                previous = e
            if lo is not None:
                break
        if lo is None:
            # The floor of the error's valley (clipping on one side, rounding on the other) can
            # pass between two grid points that both miss. Searching it (golden section) was
            # tried and dropped: the candidates it rescues win on the first member and then cost
            # more over all of them (demo, --max-delta-error 0.2: +3.1% bytes).
            return None
    if hi is None:
        for _ in range(12):
            if error(lo * grow) > budget:
                hi = lo * grow
                break
            lo *= grow
        if hi is None:
            return lo
    for _ in range(bisections):
        mid = math.sqrt(lo * hi)
        if error(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
