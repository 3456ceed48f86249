"""Tensor dtypes as safetensors names them, and their conversion to and from numpy.

numpy has no bfloat16 or float8, so such tensors travel as unsigned integers of the same
width (their bit patterns) and are widened to float32 with bit arithmetic when maths is needed.
"""

from __future__ import annotations

import numpy as np

from unipack.errors import FormatError

#: dtype name -> (itemsize, numpy dtype used to hold the bits, little-endian).
_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "|b1"),
    "U8": (1, "|u1"),
    "I8": (1, "|i1"),
    "F8_E4M3": (1, "|u1"),
    "F8_E5M2": (1, "|u1"),
    "U16": (2, "<u2"),
    "I16": (2, "<i2"),
    "F16": (2, "<f2"),
    "BF16": (2, "<u2"),
    "U32": (4, "<u4"),
    "I32": (4, "<i4"),
    "F32": (4, "<f4"),
    "U64": (8, "<u8"),
    "I64": (8, "<i8"),
    "F64": (8, "<f8"),
}

#: Float dtypes unipack decomposes; every other dtype is stored exactly.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

#: Dtypes allowed for bases and coefficients (``--dtype``).
STORAGE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

ALL_DTYPES = frozenset(_DTYPES)


def check_dtype(name: object, where: str) -> str:
    """Return ``name`` if it is a known dtype, else raise a FormatError naming ``where``."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise FormatError(f"{where}: unknown dtype {name!r} (allowed: {', '.join(sorted(_DTYPES))})")
    return name


def itemsize(dtype: str) -> int:
    return _DTYPES[dtype][0]


def holder(dtype: str) -> np.dtype:
    """The numpy dtype that holds this dtype's bits (uint16 for BF16, uint8 for F8)."""
    return np.dtype(_DTYPES[dtype][1])


def from_bytes(buf: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """View little-endian tensor bytes as a numpy array (bit patterns for BF16/F8)."""
    return np.frombuffer(buf, dtype=holder(dtype)).reshape(shape)


def to_bytes(array: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of an array already held in ``holder(dtype)``."""
    return np.ascontiguousarray(array, dtype=holder(dtype)).tobytes()


def byte_view(array: np.ndarray, dtype: str) -> memoryview:
    """:func:`to_bytes` without the copy where the array is already contiguous at ``holder(dtype)``:
    what a hash or a file write reads in place."""
    return np.ascontiguousarray(array, dtype=holder(dtype)).reshape(-1).view(np.uint8).data


def to_float(array: np.ndarray, dtype: str, out_dtype: type = np.float64) -> np.ndarray:
    """Widen a float tensor (held as ``holder(dtype)``) to float32/float64 values.

    A signalling NaN in the input (any bit pattern may come from a file) widens to a quiet NaN;
    numpy flags that as an invalid operation, which here is no error: NaN stays NaN, and exact
    bits are kept by the paths that store raw bytes.
    """
    with np.errstate(invalid="ignore"):
        if dtype == "BF16":
            widened = array.astype(np.uint32)
            widened <<= 16  # in place: one 4-byte temporary, not two
            return widened.view(np.float32).astype(out_dtype, copy=False)
        if dtype in ("F16", "F32", "F64"):
            return array.astype(out_dtype, copy=False)
    raise ValueError(f"to_float: {dtype} is not a float dtype")


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float values to ``dtype`` (round-to-nearest-even), returned in ``holder(dtype)``."""
    if dtype == "BF16":
        f32 = np.ascontiguousarray(values, dtype=np.float32)
        bits = f32.view(np.uint32)
        # Round to nearest, ties to even, on the 16 bits that are dropped: (bits + 0x7FFF +
        # ((bits >> 16) & 1)) >> 16, in one uint32 array worked in place (a bundle's largest
        # tensors go through here: 4 bytes an element instead of several uint64 temporaries).
        # The sum carries past 32 bits only for NaN patterns (bits >= 0xFFFF8001: -inf is
        # 0xFF800000), which are replaced below.
        rounded = bits >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        out = rounded.astype(np.uint16)
        del rounded
        nan = np.isnan(f32)
        if nan.any():  # keep NaN a (quiet) NaN instead of letting the carry turn it into inf
            out[nan] = ((f32.view(np.uint32)[nan] >> 16) | 0x0040).astype(np.uint16)
        return out
    if dtype == "F16":
        with np.errstate(over="ignore"):  # out-of-range values become inf; callers check for it
            return np.asarray(values).astype(np.float16)
    if dtype == "F32":
        return np.asarray(values).astype(np.float32)
    if dtype == "F64":
        return np.asarray(values).astype(np.float64)
    raise ValueError(f"from_float: {dtype} is not a float dtype")


def round_trip(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values as they come back after being stored as ``dtype`` (float64)."""
    return to_float(from_float(values, dtype), dtype)


def round_trip_in_place(values: np.ndarray, dtype: str) -> np.ndarray:
    """``round_trip`` written back into ``values`` (a float64 array the caller no longer needs as
    it was): the same numbers, bit for bit, without a second float64 array. Returns ``values``."""
    held = from_float(values, dtype)
    with np.errstate(invalid="ignore"):  # a signalling NaN widens to a quiet one, as in to_float
        if dtype == "BF16":
            widened = held.astype(np.uint32)
            widened <<= 16
            np.copyto(values, widened.view(np.float32))
        else:
            np.copyto(values, held)  # the widening cast astype(float64) makes
    return values


def widest_float(dtypes: set[str] | frozenset[str]) -> str:
    """The float dtype that holds every value of all ``dtypes`` exactly (F16+BF16 -> F32)."""
    if dtypes <= {"F16"}:
        return "F16"
    if dtypes <= {"BF16"}:
        return "BF16"
    if "F64" in dtypes:
        return "F64"
    return "F32"


def store_as(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(held, as_float64)``: values rounded to ``dtype`` for storage, and what they read back as
    (the numbers every later step must use, so that what is measured is what is stored)."""
    held = from_float(np.ascontiguousarray(values), dtype)
    return held, to_float(held, dtype)
