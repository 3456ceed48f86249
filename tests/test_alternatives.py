"""``unipack.core.alternatives``: the simple alternatives the rate-distortion benchmark compares,
checked against hand computations on small inputs (the bytes a user would ship, and the values
a user would read back)."""

from __future__ import annotations

import numpy as np
import pytest

from unipack.core import alternatives


def test_int4_delta_by_hand() -> None:
    mean = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    x = np.array([[1.7, 0.3, 1.0], [0.05, -0.1, 0.02]])
    # row 0: |d| max 0.7 -> scale 0.7/7 = 0.1 (fp16: 0.0999755859375); d/scale = 7, -7, 0
    # row 1: |d| max 0.1 -> scale 0.1/7; d/scale = 3.5 -> 4 (half to even), -7, 1.4 -> 1
    out = alternatives.int_delta(x, mean, 4)
    s0 = float(np.float16(0.1))
    s1 = float(np.float16(0.1 / 7))
    expected = np.array([[1 + 7 * s0, 1 - 7 * s0, 1.0], [4 * s1, -7 * s1, 1 * s1]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    # 6 codes of 4 bits = 3 bytes, plus one fp16 scale per row
    assert alternatives.int_delta_bytes((2, 3), 4) == 3 + 2 * 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_delta_error_stays_within_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(bits)
    mean = rng.standard_normal((16, 40))
    x = mean + 0.01 * rng.standard_normal((16, 40))
    out = alternatives.int_delta(x, mean, bits)
    top = 2 ** (bits - 1) - 1
    step = np.abs(x - mean).max(axis=1, keepdims=True) / top
    assert np.all(np.abs(out - x) <= step / 2 * (1 + 1e-2))  # the scale is rounded to fp16
    levels = np.round((out - mean) / step)
    assert np.abs(levels).max() <= top


def test_vectors_have_one_scale() -> None:
    assert alternatives.rows_of((7,)) == 1
    assert alternatives.int_delta_bytes((7,), 2) == 2 + 2  # 14 bits -> 2 bytes, one scale
    out = alternatives.int_delta(np.array([0.0, 0.5, -1.0]), np.zeros(3), 2)  # ternary
    np.testing.assert_allclose(out, [0.0, 0.0, -1.0])  # scale 1.0; 0.5 rounds half to even, to 0


def test_sign_delta_is_bitdelta_without_training() -> None:
    mean = np.zeros(4)
    x = np.array([0.2, -0.4, 0.6, -0.8])
    out = alternatives.sign_delta(x, mean)
    scale = float(np.float16(0.5))  # mean |d|
    np.testing.assert_allclose(out, [scale, -scale, scale, -scale])
    assert alternatives.sign_delta_bytes((4,)) == 1 + 2
    assert alternatives.sign_delta_bytes((3, 5)) == 2 + 2  # 15 bits -> 2 bytes


def test_bits_below_two_are_refused() -> None:
    with pytest.raises(ValueError, match="sign_delta"):
        alternatives.int_delta(np.zeros(3), np.zeros(3), 1)
