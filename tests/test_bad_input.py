"""Bad inputs, bad options and damaged bundles: a clear ``UnipackError`` naming what is wrong.

The scenarios themselves live in ``conftest.bad_case`` so that ``test_cli.py`` runs the very
same ones through the command line.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import (
    ALL_BAD_CASES,
    bad_case,
    bits_equal,
    blob_range,
    flip_byte,
    listing,
    make_bundle,
    small_specs,
    write_population,
)
from safetensors.torch import save_file

import unipack
from unipack import (
    ChecksumError,
    FormatError,
    InputError,
    MemberNotFoundError,
    OptionsError,
    OutputExistsError,
    UnipackError,
)


@pytest.mark.parametrize("kind", ALL_BAD_CASES)
def test_bad_input_raises_clear_error(tmp_path: Path, kind: str) -> None:
    case = bad_case(kind, tmp_path)
    before = listing(case.clean_dir) if case.clean_dir else None
    kept = {p: p.read_bytes() for p in case.unchanged}
    with pytest.raises(case.exc) as info:
        case.call()
    assert isinstance(info.value, UnipackError)
    message = str(info.value)
    for part in case.mentions:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message and message.strip() == message and message
    for p, data in kept.items():
        assert p.read_bytes() == data, f"{p} was modified"
    if before is not None:
        assert listing(case.clean_dir) == before, "a failed command left files behind"


# ------------------------------------------------------------------------------------------
# failed merges leave nothing behind
# ------------------------------------------------------------------------------------------


class _Boom(Exception):
    pass


class _ExplodingProgress:
    """Raises while the merge is half-way through (blobs already spooled)."""

    def __init__(self, at: int, exc: BaseException) -> None:
        self.at, self.exc = at, exc

    def start(self, n_tensors: int, n_members: int) -> None:
        pass

    def tensor(self, index: int, name: str) -> None:
        if index == self.at:
            raise self.exc

    def member_read(self) -> None:
        pass

    def lossless(self, done: int, total: int) -> None:
        pass


@pytest.mark.parametrize("exc", [_Boom("stop"), KeyboardInterrupt()])
def test_interrupted_merge_leaves_no_temp_files(tmp_path: Path, exc: BaseException) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    with pytest.raises(type(exc)):
        unipack.merge(pop.paths, out_dir / "x.upk", progress=_ExplodingProgress(2, exc))
    assert listing(out_dir) == ["keep.txt"]
    # merging into the inputs' own directory: inputs untouched, nothing added
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    with pytest.raises(type(exc)):
        unipack.merge(pop.paths, tmp_path / "in" / "x.upk", progress=_ExplodingProgress(1, exc))
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


def test_interrupted_merge_keeps_existing_output(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    out = tmp_path / "x.upk"
    unipack.merge(pop.paths, out)
    good = out.read_bytes()
    with pytest.raises(_Boom):
        unipack.merge(pop.paths, out, force=True, max_error=0.2, progress=_ExplodingProgress(1, _Boom()))
    assert out.read_bytes() == good
    assert listing(tmp_path) == ["in", "x.upk"]


def test_force_overwrites(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    out = tmp_path / "x.upk"
    out.write_bytes(b"old")
    unipack.merge(pop.paths, out, force=True)
    with unipack.open(out) as b:
        assert b.members == pop.names
        target = tmp_path / "m.safetensors"
        target.write_bytes(b"old")
        with pytest.raises(OutputExistsError):
            b.extract(pop.names[0], target)
        assert target.read_bytes() == b"old"
        b.extract(pop.names[0], target, force=True)
        assert target.read_bytes() != b"old"
    assert listing(tmp_path) == ["in", "m.safetensors", "x.upk"]


# ------------------------------------------------------------------------------------------
# non-finite values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["matrix", "vector", "identical"])
def test_non_finite_values_are_handled(tmp_path: Path, value: float, where: str) -> None:
    """A NaN/inf in a float tensor: either a clear UnipackError naming the tensor, or a bundle that
    gives the tensor back bit-exactly. Never an unexplained crash (e.g. numpy's LinAlgError)."""
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    name = {"matrix": "a.weight", "vector": "a.bias", "identical": "a.bias"}[where]
    for i, path in enumerate(pop.paths):
        t = dict(pop.tensors[i])
        if where == "identical":
            t[name] = pop.tensors[0][name].clone()
            t[name][1] = value
        elif i == 1:
            t[name] = t[name].clone()
            t[name].view(-1)[3] = value
        pop.tensors[i] = t
        save_file(t, str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        unipack.merge(pop.paths, out_dir / "x.upk")
    except UnipackError as exc:
        assert name in str(exc)
        assert listing(out_dir) == []
        return
    with unipack.open(out_dir / "x.upk") as b:
        for i, member in enumerate(b.members):
            got = b.load(member)
            assert bits_equal(got[name], pop.tensors[i][name]), member
            assert all(math.isfinite(e) for e in b.manifest.member(member).errors)


# ------------------------------------------------------------------------------------------
# member names
# ------------------------------------------------------------------------------------------


def test_unknown_member_for_every_accessor(tmp_path: Path) -> None:
    pop, bundle = make_bundle(tmp_path)
    with unipack.open(bundle) as b:
        for call in (
            lambda: b.load("ghost"),
            lambda: b.load_numpy("ghost"),
            lambda: b.extract("ghost", tmp_path / "g.safetensors"),
            lambda: b.member("ghost"),
        ):
            with pytest.raises(MemberNotFoundError) as info:
                call()
            assert "'ghost'" in str(info.value) and str(bundle) in str(info.value)
            assert all(n in str(info.value) for n in pop.names)
    assert not (tmp_path / "g.safetensors").exists()


@pytest.mark.parametrize(
    "names,needle",
    [
        (["a", "a", "b"], "duplicate"),
        (["a", "b/c", "d"], "b/c"),
        (["a", ".hidden", "d"], ".hidden"),
        (["a", "", "d"], "non-empty"),
        (["a", "b"], "3 checkpoints"),
    ],
)
def test_bad_explicit_names(tmp_path: Path, names: list[str], needle: str) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=3)
    with pytest.raises(InputError) as info:
        unipack.merge(pop.paths, tmp_path / "x.upk", names=names)
    assert needle in str(info.value)
    assert not (tmp_path / "x.upk").exists()


def test_stem_with_leading_dot_needs_a_name(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=2)
    hidden = tmp_path / "in" / ".secret.safetensors"
    hidden.write_bytes(pop.paths[1].read_bytes())
    with pytest.raises(InputError) as info:
        unipack.merge([pop.paths[0], hidden], tmp_path / "x.upk")
    assert str(hidden) in str(info.value) and "names=" in str(info.value)
    unipack.merge([pop.paths[0], hidden], tmp_path / "x.upk", names=["a", "secret"])


# ------------------------------------------------------------------------------------------
# damaged bundles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_corrupt_coefficients_affect_only_their_member(tmp_path: Path, codec: str) -> None:
    pop, bundle = make_bundle(tmp_path, codec=codec)
    with unipack.open(bundle) as b:
        coef = b.manifest.member(pop.names[1]).coefficients
    assert coef is not None
    lo, hi = blob_range(bundle, coef)
    flip_byte(bundle, lo + (hi - lo) // 3)
    with unipack.open(bundle) as b:  # opening reads the header only: still fine
        with pytest.raises(ChecksumError) as info:
            b.load(pop.names[1])
        assert repr(coef) in str(info.value)
        for i in (0, 2):
            got = b.load(pop.names[i])
            assert bits_equal(got["ids"], pop.tensors[i]["ids"])
        with pytest.raises(ChecksumError):
            b.extract(pop.names[1], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_every_blob_is_checked(tmp_path: Path, codec: str) -> None:
    """Flip one byte of each blob in turn: loading some member always reports that blob."""
    pop, bundle = make_bundle(tmp_path, codec=codec)
    original = bundle.read_bytes()
    with unipack.open(bundle) as b:
        blobs = list(b.manifest.blobs)
    assert len(blobs) >= 5
    for blob in blobs:
        lo, hi = blob_range(bundle, blob)
        assert hi > lo
        flip_byte(bundle, lo + (hi - lo) // 2)
        with unipack.open(bundle) as b:
            with pytest.raises(ChecksumError) as info:
                for m in b.members:
                    b.load(m)
            assert repr(blob) in str(info.value)
        bundle.write_bytes(original)


@pytest.mark.parametrize("cut", [0, 4, 8, 100, -1])
def test_truncated_bundle_at_various_points(tmp_path: Path, cut: int) -> None:
    _, bundle = make_bundle(tmp_path)
    data = bundle.read_bytes()
    bundle.write_bytes(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(FormatError) as info:
        unipack.open(bundle)
    assert str(bundle) in str(info.value)


def test_trailing_garbage_after_bundle(tmp_path: Path) -> None:
    _, bundle = make_bundle(tmp_path)
    with open(bundle, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(FormatError) as info:
        unipack.open(bundle)
    assert str(bundle) in str(info.value)


def test_manifest_checksum_matches_but_version_differs_between_header_and_manifest(tmp_path: Path) -> None:
    """format_version appears twice and both must agree (spec section 5)."""
    import hashlib
    import json

    from conftest import read_raw_header, rewrite_header

    _, bundle = make_bundle(tmp_path)
    header, _ = read_raw_header(bundle)
    doc = json.loads(header["__metadata__"]["manifest"])
    doc["format_version"] = 2
    text = json.dumps(doc, separators=(",", ":"))
    header["__metadata__"]["manifest"] = text
    header["__metadata__"]["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    rewrite_header(bundle, header)
    with pytest.raises(FormatError) as info:
        unipack.open(bundle)
    assert "2" in str(info.value)


def test_rewritten_header_without_changes_still_opens(tmp_path: Path) -> None:
    """Control for the version tests: the header surgery alone does not break a bundle."""
    from conftest import read_raw_header, rewrite_header

    pop, bundle = make_bundle(tmp_path)
    header, _ = read_raw_header(bundle)
    rewrite_header(bundle, header)
    with unipack.open(bundle) as b:
        got = b.load(pop.names[0])
        assert bits_equal(got["ids"], pop.tensors[0]["ids"])


# ------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"rank": 2, "energy": 0.5}, "--rank and --energy"),
        ({"max_error": 0.1, "energy": 0.5}, "--max-error and --energy"),
        ({"max_error": 2}, "--max-error"),
        ({"max_error": 1.0}, "--max-error"),
        ({"dtype": "int8"}, "int8"),
        ({"codec": "lz4"}, "lz4"),
        ({"scheme": "tucker"}, "tucker"),
        ({"raw": ("",)}, "--raw"),
    ],
)
def test_merge_options_validation(fields: dict, needle: str) -> None:
    with pytest.raises(OptionsError) as info:
        unipack.MergeOptions(**fields)
    assert needle in str(info.value)


def test_options_rejected_before_anything_is_read(tmp_path: Path) -> None:
    missing = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(OptionsError):
        unipack.merge(missing, tmp_path / "x.upk", max_error=2)
    assert listing(tmp_path) == []


def test_default_rule_is_max_error_005_and_max_delta_error_04() -> None:
    opts = unipack.MergeOptions()
    assert (opts.max_error, opts.max_delta_error) == (0.05, 0.4) and opts.rank is None and opts.energy is None
    assert opts.is_default_rule and not unipack.MergeOptions(max_error=0.05).is_default_rule
    assert unipack.MergeOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(OptionsError):
        unipack.MergeOptions.from_dict({**opts.to_dict(), "bogus": 1})
