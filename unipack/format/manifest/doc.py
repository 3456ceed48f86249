"""Typed, located access to one JSON object of a manifest: every read says where a bad value is."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from unipack.errors import FormatError
from unipack.format.safetensors_file import MAX_DIM, MAX_NDIM, is_int


class Doc:
    """Typed access to one JSON object with errors that say where the problem is."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: expected a JSON object")
        self.doc, self.where = doc, where

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.doc:
            if optional:
                return None
            raise FormatError(f"{self.where}: missing field {key!r}")
        return self.doc[key]

    def _typed(self, key: str, optional: bool, ok: Callable[[Any], bool], what: str) -> Any:
        """The field's value if ``ok(value)``; None if it is optional and absent or null."""
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not ok(v):
            raise FormatError(f"{self.where}: field {key!r} must be {what}")
        return v

    # Each reader below first takes the type JSON gives a valid value (``type(v) is str``: one
    # test, no closure), which is every field of a sound manifest; any other value goes through
    # the general check, which accepts the same values and words the error.

    def text(self, key: str, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if type(v) is str:
            return v
        return self._typed(key, optional, lambda v: isinstance(v, str), "a string")

    def integer(self, key: str, lo: int = 0, hi: int = 2**62, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if type(v) is int and lo <= v <= hi:
            return v
        return self._typed(key, optional, lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")

    def num(self, key: str, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if type(v) is float and math.isfinite(v):
            return v
        v = self._typed(key, optional, lambda v: (is_int(v) or isinstance(v, float)) and _finite(v), "a finite number")
        return None if v is None else float(v)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        v = self.text(key)
        if v not in allowed:
            raise FormatError(f"{self.where}: field {key!r} is {v!r}, expected one of {allowed}")
        return v

    def shape(self, key: str, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if type(v) is list and len(v) <= MAX_NDIM and all(type(d) is int and 0 <= d <= MAX_DIM for d in v):
            return tuple(v)
        v = self._typed(
            key,
            optional,
            lambda v: isinstance(v, list) and len(v) <= MAX_NDIM and all(is_int(d) and 0 <= d <= MAX_DIM for d in v),
            f"a list of at most {MAX_NDIM} non-negative integers",
        )
        return None if v is None else tuple(v)

    def numbers(self, key: str, optional: bool = False, count: int | None = None, ints: bool = False) -> Any:
        """A list of finite non-negative numbers (``count`` long if given) as a tuple."""
        v = self._get(key, optional)
        if v is None and optional:
            return None
        values = nonnegative_numbers(v, ints)
        if values is None or (count is not None and len(values) != count):
            what = "integers" if ints else "numbers"
            raise FormatError(
                f"{self.where}: field {key!r} must be a list of {'' if count is None else count} non-negative {what}"
            )
        return values

    def obj(self, key: str, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if type(v) is dict:
            return v
        return self._typed(key, optional, lambda v: isinstance(v, dict), "an object")

    def array(self, key: str) -> list[Any]:
        v = self.doc.get(key)
        if type(v) is list:
            return v
        return self._typed(key, False, lambda v: isinstance(v, list), "a list")


def _finite(v: float) -> bool:
    """``math.isfinite`` that is False, not an OverflowError, for an integer beyond float range."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{where}: must map strings to strings")
    return dict(value)


#: The element types JSON gives a list of numbers (``type`` does not follow subclasses: ``bool``,
#: an ``int`` subclass, is not among them).
_NUMBER_TYPES = frozenset((int, float))
_INT_TYPES = frozenset((int,))


def nonnegative_numbers(v: Any, ints: bool = False) -> tuple[Any, ...] | None:
    """``v`` as a tuple of floats (of ints if ``ints``) if it is a list of finite non-negative
    numbers, else None.

    A manifest holds thousands of these (every member's errors and fidelity numbers, one per
    tensor), so each test is one C-level pass over the list (``map``, ``min``) rather than a
    Python test per element, which made these lists most of the time spent opening a bundle.
    """
    if not isinstance(v, list):
        return None
    exact = set(map(type, v)) <= (_INT_TYPES if ints else _NUMBER_TYPES)
    if not exact and not all(is_int(x) or (not ints and isinstance(x, float)) for x in v):
        return None  # the per-element test only runs for lists that are not plain JSON numbers
    if ints:
        return tuple(map(int, v)) if not v or min(v) >= 0 else None
    try:
        values = tuple(map(float, v))
    except OverflowError:  # an integer beyond the float range: not a finite number either
        return None
    # Finite first: then min() compares no NaN (and -0.0 counts as non-negative, as before).
    if not all(map(math.isfinite, values)) or (values and min(values) < 0):
        return None
    return values
