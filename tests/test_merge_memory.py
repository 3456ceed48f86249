"""A merge's working memory per element of its largest tensor, and the in-place arithmetic that
keeps it down, checked bit for bit against the plain expressions it replaces.

The 8B plan (docs/scale-plan.md) books workers by bytes per element of the largest tensor, so a
merge that quietly goes back to one float64 copy per step would make every worker too small.
The peak is measured with tracemalloc (numpy reports its arrays to it): deterministic for given
code, unlike a process's RSS.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import unipack
from unipack.core import alternatives as alt
from unipack.core import quantize
from unipack.core.fidelity import measure
from unipack.format import dtypes
from unipack.options import MergeOptions
from unipack.pack import alternatives as pack_alternatives

#: Bytes per element of the tensor a default merge may hold at its peak (measured 63 here, 98
#: before the in-place arithmetic of stop 27; 65 on a 4096 x 4096 tensor; the bound leaves room for
#: the fixed costs of a small tensor).
PEAK_BYTES_PER_ELEMENT = 80


def _members(tmp_path: Path, n: int, shape: tuple[int, int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32) * 0.02
    paths = []
    for i in range(n):
        w = base + rng.standard_normal(shape).astype(np.float32) * 5e-4
        path = tmp_path / f"m{i}.safetensors"
        save_file({"layer.weight": w.astype(np.float32)}, str(path))
        paths.append(path)
    return paths


def test_default_merge_peak_per_element_of_its_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (1024, 1024)
    paths = _members(tmp_path, 4, shape)
    # The alternatives keep all members of a tensor of up to CACHE_BYTES in memory (bounded, a
    # speed trade); the large tensors the bound is about never fit it: measured as they run.
    monkeypatch.setattr(pack_alternatives, "CACHE_BYTES", 0)
    tracemalloc.start()
    try:
        result = unipack.merge(paths, tmp_path / "b.upk", options=MergeOptions(), jobs=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.file_bytes > 0
    numel = shape[0] * shape[1]
    assert peak / numel < PEAK_BYTES_PER_ELEMENT, f"{peak / numel:.1f} bytes per element"
    # The bundle still holds what the rule promises (the in-place arithmetic changed no number).
    with unipack.open(tmp_path / "b.upk") as bundle:
        for name, path in zip(bundle.members, paths):
            x = load_file(str(path))["layer.weight"].astype(np.float64)
            out = bundle.load_numpy(name)["layer.weight"][1].astype(np.float64)
            assert np.linalg.norm(x - out) / np.linalg.norm(x) <= 0.05


VALUES = np.array(
    [0.0, -0.0, 1.0, -1.5, 65504.0, 65520.0, 1e5, -1e5, 1e-8, -1e-8, 6e-8, 3.0e-39, np.inf, -np.inf, np.nan]
    + list(np.random.default_rng(1).standard_normal(200) * 3)
)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_round_trip_in_place_is_round_trip_bit_for_bit(dtype: str) -> None:
    expected = dtypes.round_trip(VALUES.copy(), dtype)
    work = VALUES.copy()
    got = dtypes.round_trip_in_place(work, dtype)
    assert got is work
    assert got.dtype == np.float64
    numbers = ~np.isnan(expected)
    np.testing.assert_array_equal(got.view(np.uint64)[numbers], expected.view(np.uint64)[numbers])
    assert np.array_equal(np.isnan(got), np.isnan(expected))


@pytest.mark.parametrize("levels", [2, 3, 5, 15, 16, 255])
@pytest.mark.parametrize("group", [7, 64, 640])
@pytest.mark.parametrize("member_dtype", ["F32", "F16", "BF16"])
def test_quantize_without_out_matches_with_out(levels: int, group: int, member_dtype: str) -> None:
    rng = np.random.default_rng(levels * 1000 + group)
    x = dtypes.round_trip(rng.standard_normal(640) * 0.1, member_dtype)
    mean = dtypes.round_trip(x + rng.standard_normal(640) * 0.01, "F16")
    mean[:5] = -0.0  # zeros with a sign: the in-place offset must not change a code or the error
    d = x - mean
    steps = quantize.step_shape(d, levels, group) * 0.7
    kw = dict(levels=levels, group=group, scale_dtype="F16", member_dtype=member_dtype)
    with_out = quantize.quantize(x, mean, steps, **kw)
    without = quantize.quantize(x, mean, steps, keep_out=False, **kw)
    assert without.out is None and with_out.out is not None
    np.testing.assert_array_equal(with_out.codes, without.codes)
    assert with_out.error == without.error
    # The kept output is the reader's: mean + (code - offset) * step, rounded to the member's dtype
    # (numpy, from the codes; zeros compared by value).
    q = with_out.codes.astype(np.float64) - quantize.offset(levels)
    s = np.repeat(dtypes.to_float(with_out.scales_held, "F16"), group)[: x.size]
    reader = dtypes.round_trip(mean + q * s, member_dtype)
    np.testing.assert_array_equal(with_out.out, reader)
    assert with_out.error == float(np.linalg.norm(x - reader))


def test_measure_from_the_error_equals_measure_from_the_output() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 20))
    mean = x + rng.standard_normal((30, 20)) * 0.1
    out = x + rng.standard_normal((30, 20)) * 0.01
    error = float(np.linalg.norm((x - out).ravel()))
    for svd in (None, 120.0):
        a = measure(x, out, mean, float(np.linalg.norm(x)), "F32", "F16", svd)
        b = measure(x, None, mean, float(np.linalg.norm(x)), "F32", "F16", svd, error=error)
        assert a == b
    # numpy, independently: the mean-only error is ||x - fp32(mean)|| / ||x||.
    expected = np.linalg.norm(x - mean.astype(np.float32).astype(np.float64)) / np.linalg.norm(x)
    assert a.mean_error == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        measure(x, None, mean, 1.0, "F32", "F16", None)


def test_alternatives_in_place_match_the_plain_expressions() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 33))
    mean = x + rng.standard_normal((16, 33)) * 0.05
    d = x - mean
    # sign_delta: mean + sign(d) * fp16(mean |d|), as BitDelta's initial scale
    scale = float(np.float16(np.abs(d).mean()))
    np.testing.assert_array_equal(alt.sign_delta(x, mean), mean + np.where(d >= 0, 1.0, -1.0) * scale)
    # int_deltas: per-row absmax from |d|, as before
    for bits, got in zip((8, 4, 2), alt.int_deltas(x, mean, (8, 4, 2))):
        top = 2 ** (bits - 1) - 1
        row_scale = (np.abs(d).max(axis=1) / top).astype(np.float16).astype(np.float64)
        q = np.clip(np.round(d / row_scale[:, None]), -top, top)
        np.testing.assert_array_equal(got, q * row_scale[:, None] + mean)
