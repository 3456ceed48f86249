"""The faster paths that open a bundle accept and refuse exactly what the general checks do.

Opening a bundle parses its manifest with ``parse.loads`` (``strict_json``'s rules, with the
walk over every string made only where the text holds an escape) and reads its fields through
``Doc``, whose readers first take the type JSON gives a valid value and otherwise fall back to
the general check; lists of numbers are checked in C-level passes (``nonnegative_numbers``).
Each is compared here with the general rule it replaces, on generated values, so that a faster
path can never let through what the slower one refused (or refuse what it accepted). Speed is
measured by ``tools/bench_open.py``, not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import make_bundle, read_raw_header
from hypothesis import given, settings
from hypothesis import strategies as st

import unipack
from unipack.errors import FormatError
from unipack.format.manifest import parse
from unipack.format.manifest.doc import Doc, nonnegative_numbers
from unipack.format.safetensors_file import MAX_DIM, MAX_NDIM, is_int, strict_json

# -- values JSON may hold, with the awkward ones over-represented ---------------------------------

NUMBERS = st.one_of(
    st.integers(-5, 5),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, 1, 2**53, MAX_DIM, MAX_DIM + 1, 2**62, 2**62 + 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.5, -1.5, math.inf, -math.inf, math.nan, 1e308]),
    st.booleans(),
)
SCALARS = st.one_of(NUMBERS, st.none(), st.text(max_size=4))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=3), inner, max_size=4)),
    max_leaves=12,
)


# -- parse.loads against strict_json --------------------------------------------------------------


def _outcome(fn: Any, text: str) -> Any:
    try:
        return ("ok", fn(text, "where"))
    except FormatError as exc:
        return ("refused", str(exc))


def _same(a: Any, b: Any) -> bool:
    """Equal documents, NaN equal to NaN (json.loads cannot make one here, but stay exact)."""
    return json.dumps(a, sort_keys=True, allow_nan=True) == json.dumps(b, sort_keys=True, allow_nan=True)


JSON_VALUES = st.recursive(
    st.one_of(st.integers(-(10**30), 10**30), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=3), inner, max_size=4)),
    max_leaves=15,
)
#: Edits that make valid JSON break one of strict_json's rules (or look as if they might).
EDITS = [
    ("", ""),  # none
    ("{", '{"k":1,"k":2,'),  # a duplicate key (where the document has an object)
    ("{", '{"k":1,"K":2,'),  # two keys that differ: fine
    ("{", '{"\\ud800":1,'),  # a lone surrogate in a key
    ("[", '["\\udfff",'),  # a lone surrogate in a value
    ("[", '["\\ud83d\\ude00",'),  # a valid pair: fine
    ("[", '["\\\\ud800",'),  # an escaped backslash then "ud800": fine
    ("[", '["\\u00e9\\u0001",'),  # other escapes: fine
    ("[", "[NaN,"),
    ("[", "[-Infinity,"),
    ("[", "[1e999,"),  # parses to inf: strict_json lets the schema refuse it
]


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES, st.sampled_from(EDITS), st.booleans())
def test_loads_accepts_and_refuses_exactly_what_strict_json_does(
    value: Any, edit: tuple[str, str], ascii: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii)
    old, new = edit
    if old and old in text:
        text = text.replace(old, new, 1)
    fast, reference = _outcome(parse.loads, text), _outcome(strict_json, text)
    assert fast[0] == reference[0], (text, fast, reference)
    if fast[0] == "ok":
        assert _same(fast[1], reference[1])
    else:
        assert fast[1] == reference[1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"a":1,"b":{"c":2,"c":3}}', "duplicate key 'c'"),
        ('{"a":"\\ud800"}', "surrogate"),
        ('{"\\udc00":1}', "surrogate"),
        ('{"a":[1,NaN]}', "NaN is not valid JSON"),
        ('{"a":"x\ud800"}', "surrogate"),  # the text itself (not an escape) holds one
        ('{"a":', "invalid JSON"),
    ],
)
def test_loads_refusals(text: str, fragment: str) -> None:
    with pytest.raises(FormatError, match="invalid JSON") as info:
        parse.loads(text, "m")
    assert fragment in str(info.value)


# -- Doc's readers against the general checks they fall back to -----------------------------------


def _reference(kind: str, v: Any, **kw: Any) -> Any:
    """The general rule of each reader, as it was written before the fast paths: the value
    (converted as the reader converts it), or ``"refused"``."""
    if kind == "text":
        return v if isinstance(v, str) else "refused"
    if kind == "integer":
        return v if is_int(v) and kw["lo"] <= v <= kw["hi"] else "refused"
    if kind == "num":
        try:
            ok = (is_int(v) or isinstance(v, float)) and math.isfinite(v)
        except OverflowError:  # an integer beyond float range: now refused, once a crash
            ok = False
        return float(v) if ok else "refused"
    if kind == "shape":
        ok = isinstance(v, list) and len(v) <= MAX_NDIM and all(is_int(d) and 0 <= d <= MAX_DIM for d in v)
        return tuple(v) if ok else "refused"
    if kind == "numbers":
        ints = kw.get("ints", False)
        if not isinstance(v, list):
            return "refused"
        if not all((is_int(x) or (not ints and isinstance(x, float) and math.isfinite(x))) and x >= 0 for x in v):
            return "refused"
        try:
            return tuple(int(x) if ints else float(x) for x in v)
        except OverflowError:  # once a crash, now refused
            return "refused"
    if kind == "obj":
        return v if isinstance(v, dict) else "refused"
    if kind == "array":
        return v if isinstance(v, list) else "refused"
    raise AssertionError(kind)


def _read(kind: str, v: Any, **kw: Any) -> Any:
    d = Doc({"f": v}, "here")
    try:
        return getattr(d, kind)("f", **kw)
    except FormatError as exc:
        assert str(exc).startswith("here: field 'f' must be "), str(exc)
        return "refused"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) and type(x) is type(y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


READERS = [
    ("text", {}),
    ("integer", {"lo": 0, "hi": 2**62}),
    ("integer", {"lo": 1, "hi": 16}),
    ("num", {}),
    ("shape", {}),
    ("numbers", {}),
    ("numbers", {"ints": True}),
    ("obj", {}),
    ("array", {}),
]


@settings(max_examples=200, deadline=None)
@given(VALUES, st.sampled_from(READERS))
def test_doc_readers_match_the_general_checks(v: Any, reader: tuple[str, dict[str, Any]]) -> None:
    kind, kw = reader
    got, want = _read(kind, v, **kw), _reference(kind, v, **kw)
    assert _equal(got, want), (kind, v, got, want)


@settings(max_examples=150, deadline=None)
@given(st.lists(NUMBERS, max_size=8), st.booleans())
def test_number_lists_match_the_per_element_rule(v: list[Any], ints: bool) -> None:
    got = nonnegative_numbers(v, ints)
    want = _reference("numbers", v, ints=ints)
    assert _equal("refused" if got is None else got, want), (v, ints, got, want)


def test_number_list_subclasses_take_the_general_path() -> None:
    class F(float):
        pass

    class I(int):  # noqa: E742 - the name says what it is
        pass

    assert nonnegative_numbers([F(1.5), I(2)]) == (1.5, 2.0)
    assert nonnegative_numbers([I(2), I(0)], ints=True) == (2, 0)
    assert nonnegative_numbers([True]) is None and nonnegative_numbers([1, False], ints=True) is None
    assert nonnegative_numbers([-0.0, 0]) == (-0.0, 0.0)


# -- whole manifests: huge integers are refused, never an OverflowError ---------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, path = make_bundle(tmp_path_factory.mktemp("open-speed"))
    return path


def _manifest_doc(path: Path) -> dict[str, Any]:
    header, _ = read_raw_header(path)
    return json.loads(header["__metadata__"]["manifest"])


@pytest.mark.parametrize("where", ["errors", "fidelity", "number field"])
def test_integer_beyond_float_range_is_refused(small_bundle: Path, where: str) -> None:
    doc = _manifest_doc(small_bundle)
    huge = 10**400
    if where == "errors":
        doc["members"][0]["errors"][0] = huge
    elif where == "fidelity":
        doc["members"][0]["fidelity"]["norms"][0] = huge
    else:  # a scheme's own number field (Doc.num)
        t = next(t for t in doc["tensors"] if t.get("energy") is not None or t.get("mean_step") is not None)
        t["energy" if t.get("energy") is not None else "mean_step"] = huge
    with pytest.raises(FormatError, match="number"):
        parse.from_json(parse.loads(json.dumps(doc), "test"), "test")


def test_manifest_parses_to_the_same_records_either_way(small_bundle: Path) -> None:
    text = json.dumps(_manifest_doc(small_bundle))
    fast = parse.from_json(parse.loads(text, "t"), "t")
    assert fast == parse.from_json(strict_json(text, "t"), "t")
    with unipack.open(small_bundle) as b:
        assert b.manifest == fast


def test_an_open_bundle_decodes_each_mean_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members loaded through one open bundle share its decoded means (read-only, within
    ``SHARED_CACHE_BYTES``): the same arrays as a fresh open gives, each mean decoded once, the
    arrays handed out still writable; past the budget, nothing is kept."""
    import numpy as np

    from unipack.format import container

    pop, path = make_bundle(tmp_path, n=4)
    decoded: list[str] = []
    plain = container.BundleFile._decoded

    def counted(self: Any, name: str, *, verify: bool) -> Any:
        decoded.append(name)
        return plain(self, name, verify=verify)

    monkeypatch.setattr(container.BundleFile, "_decoded", counted)
    with unipack.open(path) as b:
        means = {getattr(t.params, "mean", None) for t in b.manifest.tensors} - {None}
        assert means  # the default merge stores means
        first = b.load_numpy(b.members[0])
        second = b.load_numpy(b.members[1])
        again = b.load_numpy(b.members[0])
    assert all(decoded.count(m) == 1 for m in means)
    for name, (dtype, array) in first.items():
        assert again[name][0] == dtype and np.array_equal(again[name][1].view(np.uint8), array.view(np.uint8))
        assert array.flags.writeable
    for member, loaded in ((0, first), (1, second)):
        with unipack.open(path) as fresh:  # nothing cached yet: the reference
            for name, (_, array) in fresh.load_numpy(fresh.members[member]).items():
                assert np.array_equal(loaded[name][1].view(np.uint8), array.view(np.uint8))
    decoded.clear()
    monkeypatch.setattr(container, "SHARED_CACHE_BYTES", 0)
    with unipack.open(path) as b:
        b.load_numpy(b.members[0])
        b.load_numpy(b.members[1])
    assert all(decoded.count(m) == 2 for m in means)
