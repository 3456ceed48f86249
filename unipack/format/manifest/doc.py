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

    def text(self, key: str, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: isinstance(v, str), "a string")

    def integer(self, key: str, lo: int = 0, hi: int = 2**62, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")

    def num(self, key: str, optional: bool = False) -> Any:
        v = self._typed(
            key, optional, lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v), "a finite number"
        )
        return None if v is None else float(v)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        v = self.text(key)
        if v not in allowed:
            raise FormatError(f"{self.where}: field {key!r} is {v!r}, expected one of {allowed}")
        return v

    def shape(self, key: str, optional: bool = False) -> Any:
        v = self._typed(
            key,
            optional,
            lambda v: isinstance(v, list) and len(v) <= MAX_NDIM and all(is_int(d) and 0 <= d <= MAX_DIM for d in v),
            f"a list of at most {MAX_NDIM} non-negative integers",
        )
        return None if v is None else tuple(v)

    def numbers(self, key: str, optional: bool = False, count: int | None = None, ints: bool = False) -> Any:
        """A list of finite non-negative numbers (``count`` long if given) as a tuple."""

        def ok(v: Any) -> bool:
            return (
                isinstance(v, list)
                and (count is None or len(v) == count)
                and all((is_int(x) or (not ints and isinstance(x, float) and math.isfinite(x))) and x >= 0 for x in v)
            )

        what = "integers" if ints else "numbers"
        v = self._typed(key, optional, ok, f"a list of {'' if count is None else count} non-negative {what}")
        return None if v is None else tuple(int(x) if ints else float(x) for x in v)

    def obj(self, key: str, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: isinstance(v, dict), "an object")

    def array(self, key: str) -> list[Any]:
        return self._typed(key, False, lambda v: isinstance(v, list), "a list")


def str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{where}: must map strings to strings")
    return dict(value)
