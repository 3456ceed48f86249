"""``unipack add``: a held-out checkpoint projected onto a bundle's existing means and bases.

Numbers are checked against independent numpy computations on blobs read with the reference
safetensors loader (bundles here are merged with ``codec="none"`` so every blob is an ordinary
tensor); errors are checked by message, and every failure must leave the bundle's bytes and
its directory exactly as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import (
    Population,
    TensorSpec,
    as64,
    assert_close_errors,
    bits_equal,
    blob_range,
    check_against_originals,
    flip_byte,
    listing,
    read_safetensors,
    rel_error,
    run,
    small_specs,
    standard_specs,
    write_population,
)
from conftest import assert_one_line_error as one_line_error
from safetensors import safe_open
from safetensors.torch import save_file

import unipack
from unipack.format.container import rewrite_bundle
from unipack.pack.add import free_member_index

MAX_ERROR = 0.01


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def held_out(
    directory: Path, specs: dict[str, TensorSpec], *, merged: int = 4, extra: int = 1, seed: int = 7, **options
) -> tuple[Population, Path]:
    """``merged + extra`` members generated together; the first ``merged`` are merged."""
    pop = write_population(directory / "in", specs, n=merged + extra, seed=seed)
    bundle = directory / "bundle.upk"
    options.setdefault("codec", "none")
    options.setdefault("quantize", False)  # projection onto shared bases; delta records: test_delta.py
    unipack.merge(pop.paths[:merged], bundle, **options)
    return pop, bundle


def snapshot(bundle: Path) -> dict[str, dict[str, bytes]]:
    """Every member's tensors as (dtype, bytes), to compare before and after an add."""
    with unipack.open(bundle) as b:
        return {
            m: {name: dtype.encode() + array.tobytes() for name, (dtype, array) in b.load_numpy(m).items()}
            for m in b.members
        }


def manifest_doc(bundle: Path) -> dict:
    with safe_open(str(bundle), framework="pt") as f:
        return json.loads(f.metadata()["manifest"])


def blob64(bundle: Path, name: str) -> np.ndarray:
    with safe_open(str(bundle), framework="pt") as f:
        return as64(f.get_tensor(name))


def independent_coefficients(bundle: Path, member: str, original: dict[str, torch.Tensor]) -> list[tuple]:
    """(tensor, stored C, numpy least-squares C) for each tensor the member projects.

    Offsets into the coefficient blob are worked out here from the manifest JSON (spec 3.3, with
    the member's raw overrides left out); the projection is ``np.linalg.lstsq`` on the stored basis.
    """
    doc = manifest_doc(bundle)
    rec = next(m for m in doc["members"] if m["name"] == member)
    coefs = blob64(bundle, rec["coefficients"]) if rec["coefficients"] else np.zeros(0)
    out, offset = [], 0
    for t in doc["tensors"]:
        if t["storage"] != "shared" or t["rank"] == 0 or t["name"] in rec["raw"]:
            continue
        shape, k = tuple(t["shape"]), t["rank"]
        mean, basis = blob64(bundle, t["mean"]), blob64(bundle, t["basis"])
        d = as64(original[t["name"]]) - mean
        if t["scheme"] == "flat":
            expected = np.linalg.lstsq(basis.T, d.reshape(-1), rcond=None)[0]
        else:
            m, n = t["matrix"]
            if t["side"] == "right":  # W = M + C B^T, C (m, k)
                expected = np.linalg.lstsq(basis, d.reshape(m, n).T, rcond=None)[0].T
            else:  # W = M + B C, C (k, n)
                expected = np.linalg.lstsq(basis, d.reshape(m, n), rcond=None)[0]
        size = expected.size
        out.append((t["name"], coefs[offset : offset + size].reshape(expected.shape), expected, shape, k))
        offset += size
    assert offset == coefs.size
    return out


def assert_one_line_error(result: Result) -> str:
    """conftest's one-line bad-input check, and the line is not unipack's internal-error one."""
    line = one_line_error(result)
    assert "internal error" not in line
    return line


def random_member(pop: Population, path: Path, seed: int = 99) -> Path:
    """Same names, shapes and dtypes as member 0, unrelated random float values."""
    rng = np.random.default_rng(seed)
    tensors = {
        name: torch.from_numpy(rng.standard_normal(t.shape)).to(t.dtype) if t.is_floating_point() else t
        for name, t in pop.tensors[0].items()
    }
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------
# (1) a held-out member of the same population
# ------------------------------------------------------------------------------------------


def test_held_out_member_is_projected_within_budget(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, standard_specs(), max_error=MAX_ERROR)
    before = snapshot(bundle)
    size_before = bundle.stat().st_size

    result = unipack.add(bundle, pop.paths[4])

    assert isinstance(result, unipack.AddResult)
    assert result.member == "ft4" and result.path == bundle
    assert result.budget_met and result.overrides == 0 and result.override_bytes == 0
    assert result.file_bytes_before == size_before and result.file_bytes_after == bundle.stat().st_size
    assert result.bytes_added == result.file_bytes_after - size_before > 0
    kinds = {o.tensor: o.kind for o in result.outcomes}
    assert kinds == {
        "embed.weight": "projected",
        "layer0.attn.weight": "projected",
        "layer0.mlp.weight": "projected",
        "layer0.mlp.bias": "projected",
        "conv.weight": "projected",
        "norm.weight": "exact",
        "position_ids": "exact",
        "step": "raw",
        "mask": "raw",
    }
    with unipack.open(bundle) as b:
        assert b.verify() == []
        assert b.members == pop.names
        rec = b.manifest.member("ft4")
        assert rec.added and not any(m.added for m in b.manifest.members[:4])
        assert rec.source == "ft4.safetensors" and rec.source_bytes == pop.paths[4].stat().st_size
        assert rec.metadata == pop.metadata[4]
        assert set(rec.raw) == {"step", "mask"} and rec.dtypes == {}
        assert b.manifest.stats["input_bytes"] == sum(p.stat().st_size for p in pop.paths)
        assert rec.fidelity is not None and rec.lossless_bytes is not None
        assert result.record == rec
        for o, err in zip(result.outcomes, rec.errors):
            assert o.error == err
    # Existing members rebuild bit for bit; the new one within budget, with its recorded errors.
    after = snapshot(bundle)
    assert {m: after[m] for m in before} == before
    measured = check_against_originals(pop, bundle, tmp_path / "out", max_error=MAX_ERROR)
    assert result.worst_error == pytest.approx(max(measured["ft4"].values()), rel=1e-6)
    # Coefficients: least squares on the stored basis, rounded to F32.
    checked = independent_coefficients(bundle, "ft4", pop.tensors[4])
    assert len(checked) == 5
    for name, stored, expected, _, _ in checked:
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(stored, expected.astype(np.float32), rtol=1e-5, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_coefficients_are_rounded_to_the_bundles_dtype(tmp_path: Path, dtype: str) -> None:
    pop, bundle = held_out(tmp_path, standard_specs(), dtype=dtype, max_error=0.05)
    result = unipack.add(bundle, pop.paths[4])
    coef_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with safe_open(str(bundle), framework="pt") as f:
        assert f.get_tensor(result.record.coefficients).dtype == coef_dtype
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    for name, stored, expected, _, _ in independent_coefficients(bundle, "ft4", pop.tensors[4]):
        rounded = as64(torch.from_numpy(expected).to(coef_dtype))
        scale = float(np.abs(expected).max())
        # Normal equations vs lstsq may round a near-tie the other way: one unit in the last place.
        np.testing.assert_allclose(stored, rounded, rtol=ulp, atol=ulp * 1e-3 * scale, err_msg=name)
    check_against_originals(pop, bundle, tmp_path / "out", max_error=None)


# ------------------------------------------------------------------------------------------
# (2) an unrelated member: the bases cannot hold it
# ------------------------------------------------------------------------------------------


def test_unrelated_member_is_stored_raw_where_the_budget_needs_it(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, standard_specs(), extra=0, max_error=MAX_ERROR)
    before, size_before = snapshot(bundle), bundle.stat().st_size
    stranger = random_member(pop, tmp_path / "stranger.safetensors")

    result = unipack.add(bundle, stranger)

    assert not result.budget_met
    over = {o.tensor for o in result.outcomes if o.over_budget}
    assert over == {"embed.weight", "layer0.attn.weight", "layer0.mlp.weight", "layer0.mlp.bias", "conv.weight"}
    # norm.weight is an exact tensor whose values differ: an override too, but not a budget miss.
    overridden = {o.tensor for o in result.outcomes if o.kind == "override"}
    assert overridden == over | {"norm.weight"}
    assert result.overrides == 6 and result.override_bytes > 0
    assert result.file_bytes_after > size_before
    for o in result.outcomes:
        if o.over_budget:
            assert "exceeds max-error 0.01" in o.reason and o.error == 0.0 and o.stored_bytes > 0
    with unipack.open(bundle) as b:
        assert b.verify() == []
        rec = b.manifest.member("stranger")
        assert all(e <= MAX_ERROR for e in rec.errors)
        assert set(rec.raw) == overridden | {"step", "mask"}
        assert rec.coefficients is None  # every shared tensor overridden: no coefficients at all
        assert b.manifest.coef_offsets(rec) == {}
        got = {name: array for name, (_, array) in b.load_numpy("stranger").items()}
    original, _, _ = read_safetensors(stranger)
    for name, w in original.items():
        assert got[name].tobytes() == w.contiguous().numpy().tobytes(), name
    assert {m: v for m, v in snapshot(bundle).items() if m != "stranger"} == before


def test_cli_says_when_the_budget_is_not_met(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, small_specs(), merged=3, extra=1)
    stranger = random_member(pop, tmp_path / "stranger.safetensors")
    result = run("add", bundle, stranger)
    assert result.exit_code == 0, result.output
    assert (
        "max-error 0.05 and max-delta-error 0.4 not met within the bundle's mean and bases for 2 tensors: "
        "stored them raw (+" in result.output
    )
    assert "worst relative error 0 " in result.output
    # A member from the population meets it.
    result = run("add", bundle, pop.paths[3], "--name", "sibling")
    assert result.exit_code == 0, result.output
    assert "max-error 0.05 and max-delta-error 0.4 met within the bundle's mean and bases" in result.output
    assert "2 projected onto the bundle's bases, 0 raw, 1 identical" in result.output
    assert "ratio" in result.output and "at worst relative error" in result.output
    with unipack.open(bundle) as b:
        assert b.members == ["ft0", "ft1", "ft2", "stranger", "sibling"]
        worst = max(b.manifest.member("sibling").errors)
    assert f"worst relative error {worst:.3g} (" in result.output


def test_rank_rule_projects_without_overrides(tmp_path: Path) -> None:
    """Under --rank/--energy there is no budget: the projection is stored and its error recorded."""
    pop, bundle = held_out(tmp_path, small_specs(), merged=3, extra=0, rank=1)
    stranger = random_member(pop, tmp_path / "stranger.safetensors")
    result = unipack.add(bundle, stranger)
    assert result.budget_met and result.overrides == 0
    assert {o.kind for o in result.outcomes} == {"projected", "exact"}
    assert result.worst_error > 0.5
    with unipack.open(bundle) as b:
        assert b.verify() == []
        rec = b.manifest.member("stranger")
        got = b.load("stranger")
        index = {t.name: j for j, t in enumerate(b.manifest.tensors)}
    original, _, _ = read_safetensors(stranger)
    for name, w in original.items():
        assert_close_errors(rel_error(w, got[name]), rec.errors[index[name]])
    assert "fixed rank 1" in run("add", bundle, stranger, "--name", "again").output


def test_reference_check_sizes_blobs_of_members_with_overrides_as_brute_force_does(tmp_path: Path) -> None:
    """Opening a bundle sizes each member's coefficient and codes blobs from per-tensor numbers
    computed once, minus the tensors the member holds raw (``per_member_blocks``). Here, on a
    member with overrides, those sizes equal the member-by-member sum over every record, and a
    blob one element off is refused."""
    from dataclasses import replace

    from unipack.errors import FormatError
    from unipack.format.manifest.references import check_references

    pop, bundle = held_out(tmp_path, standard_specs(), extra=0, max_error=MAX_ERROR)
    unipack.add(bundle, random_member(pop, tmp_path / "stranger.safetensors"))
    with unipack.open(bundle) as b:
        m = b.manifest
    assert any(set(mem.raw) & {t.name for t in m.tensors if t.params.coefficient_shape(t, None)} for mem in m.members)
    for mem in m.members:
        coef_end = max((end for _, end in m.coef_offsets(mem).values()), default=0)
        codes_end = max((end for _, end in m.code_offsets(mem).values()), default=0)
        assert (m.blobs[mem.coefficients].shape if mem.coefficients else (0,)) == (coef_end,)
        assert (m.blobs[mem.codes].shape if mem.codes else (0,)) == (codes_end,)
    # The stranger holds every tensor with coefficients raw: it may name no coefficient blob.
    stranger = m.member("stranger")
    assert stranger.coefficients is None and stranger.raw
    members = tuple(replace(mem, coefficients="coef/0") if mem is stranger else mem for mem in m.members)
    with pytest.raises(FormatError, match="names a coefficient blob but no tensor has rank > 0"):
        check_references(replace(m, members=members), "w")
    first = m.members[0]
    assert first.coefficients is not None
    size = m.blobs[first.coefficients].shape[0]
    for delta in (-1, 1):
        blobs = dict(m.blobs)
        blobs[first.coefficients] = replace(blobs[first.coefficients], shape=(size + delta,))
        with pytest.raises(FormatError, match="coefficients: blob .* has shape"):
            check_references(replace(m, blobs=blobs), "w")


# ------------------------------------------------------------------------------------------
# (3) errors: one line, nothing changed
# ------------------------------------------------------------------------------------------

ERROR_CASES = [
    "name_clash",
    "missing_tensor",
    "extra_tensor",
    "shape_differs",
    "dtype_kind_differs",
    "missing_source",
    "missing_bundle",
    "corrupt_source",
    "corrupt_bundle",
    "source_is_bundle",
    "bad_name",
    "output_exists",
    "not_a_bundle",
]


def error_case(kind: str, tmp: Path) -> tuple[list[object], dict, type, list[str]]:
    """(CLI args, API keywords, exception, message fragments) for one failure."""
    pop, bundle = held_out(tmp, small_specs(), merged=3, extra=1)
    src = pop.paths[3]
    new = dict(pop.tensors[3])
    edited = tmp / "in" / "edited.safetensors"
    args: dict = {"bundle": bundle, "source": src}
    if kind == "name_clash":
        return (
            ["add", bundle, pop.paths[0]],
            {"bundle": bundle, "source": pop.paths[0]},
            unipack.InputError,
            [str(bundle), "already has a member 'ft0'", "--name"],
        )
    if kind == "missing_tensor":
        del new["a.bias"]
        save_file(new, str(edited))
        args["source"] = edited
        return (["add", bundle, edited], args, unipack.InputError, [str(edited), "lacks 'a.bias'"])
    if kind == "extra_tensor":
        new["extra.weight"] = torch.zeros(3)
        save_file(new, str(edited))
        args["source"] = edited
        return (["add", bundle, edited], args, unipack.InputError, [str(edited), "has extra 'extra.weight'"])
    if kind == "shape_differs":
        new["a.weight"] = torch.zeros(9, 12)
        save_file(new, str(edited))
        args["source"] = edited
        return (
            ["add", bundle, edited],
            args,
            unipack.InputError,
            [str(edited), "'a.weight'", "[9, 12]", "[8, 12]", "only raw tensors may vary", "--raw"],
        )
    if kind == "dtype_kind_differs":
        new["a.bias"] = torch.zeros(8, dtype=torch.int32)
        save_file(new, str(edited))
        args["source"] = edited
        return (["add", bundle, edited], args, unipack.InputError, [str(edited), "'a.bias'", "I32", "F32"])
    if kind == "missing_source":
        missing = tmp / "in" / "nope.safetensors"
        args["source"] = missing
        return (["add", bundle, missing], args, unipack.InputError, [str(missing), "no such file"])
    if kind == "missing_bundle":
        missing = tmp / "nope.upk"
        args["bundle"] = missing
        return (["add", missing, src], args, unipack.UnipackError, [str(missing)])
    if kind == "corrupt_source":
        edited.write_bytes(np.random.default_rng(0).bytes(4096))
        args["source"] = edited
        return (["add", bundle, edited], args, unipack.FormatError, [str(edited)])
    if kind == "corrupt_bundle":
        lo, hi = blob_range(bundle, "basis/a.weight")
        flip_byte(bundle, (lo + hi) // 2)
        return (["add", bundle, src], args, unipack.ChecksumError, [str(bundle), "'basis/a.weight'", "corrupt"])
    if kind == "source_is_bundle":
        other = tmp / "other.upk"
        other.write_bytes(bundle.read_bytes())
        args["source"] = other
        return (["add", bundle, other], args, unipack.InputError, [str(other), "bundle"])
    if kind == "bad_name":
        args["name"] = ".hidden"
        return (["add", bundle, src, "--name", ".hidden"], args, unipack.InputError, ["'.hidden'", "--name"])
    if kind == "output_exists":
        taken = tmp / "taken.upk"
        taken.write_bytes(b"precious")
        args["output"] = taken
        return (["add", bundle, src, "-o", taken], args, unipack.OutputExistsError, [str(taken), "--force"])
    if kind == "not_a_bundle":
        args["bundle"] = pop.paths[0]
        return (["add", pop.paths[0], src], args, unipack.FormatError, [str(pop.paths[0]), "not a unipack bundle"])
    raise ValueError(kind)


def _state(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kind", ERROR_CASES)
def test_add_errors_through_the_api(tmp_path: Path, kind: str) -> None:
    _, kwargs, exc, mentions = error_case(kind, tmp_path)
    files_before, names_before = _state(tmp_path), listing(tmp_path)
    with pytest.raises(exc) as info:
        unipack.add(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in mentions:
        assert fragment in message, (fragment, message)
    assert listing(tmp_path) == names_before and _state(tmp_path) == files_before  # bundle bytes too


@pytest.mark.parametrize("kind", ERROR_CASES)
def test_add_errors_through_the_cli(tmp_path: Path, kind: str) -> None:
    args, _, _, mentions = error_case(kind, tmp_path)
    files_before, names_before = _state(tmp_path), listing(tmp_path)
    line = assert_one_line_error(run(*args))
    for fragment in mentions:
        assert fragment in line, (fragment, line)
    assert listing(tmp_path) == names_before and _state(tmp_path) == files_before


# ------------------------------------------------------------------------------------------
# (4) exact tensors, dtypes, NaN
# ------------------------------------------------------------------------------------------


def test_exact_tensor_identical_stores_nothing_and_differing_is_an_override(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, small_specs(), merged=3, extra=1)
    same = unipack.add(bundle, pop.paths[3])
    ids = next(o for o in same.outcomes if o.tensor == "ids")
    assert (ids.kind, ids.stored_bytes) == ("exact", 0)
    assert "ids" not in same.record.raw and same.overrides == 0

    changed = dict(pop.tensors[3])
    changed["ids"] = changed["ids"] + 1
    path = tmp_path / "in" / "changed.safetensors"
    save_file(changed, str(path))
    result = unipack.add(bundle, path)
    ids = next(o for o in result.outcomes if o.tensor == "ids")
    assert ids.kind == "override" and not ids.over_budget and "differ from the bundle's exact copy" in ids.reason
    assert result.budget_met and result.overrides == 1 and result.override_bytes == ids.stored_bytes > 0
    assert set(result.record.raw) == {"ids"}
    with unipack.open(bundle) as b:
        assert b.verify() == []
        got = b.load("changed")
        assert bits_equal(got["ids"], changed["ids"])
        assert bits_equal(b.load("ft0")["ids"], pop.tensors[0]["ids"])  # the shared copy is untouched


def test_other_dtypes_are_recorded_per_member(tmp_path: Path) -> None:
    """A float16 member of a float32 bundle: shared tensors projected and rounded to float16,
    the exact float tensor overridden (its dtype differs), both recorded in ``dtypes``."""
    specs = {**small_specs(), "norm.weight": TensorSpec((12,), kind="same")}
    pop, bundle = held_out(tmp_path, specs, merged=3, extra=1)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in pop.tensors[3].items()}
    path = tmp_path / "in" / "half.safetensors"
    save_file(half, str(path))
    result = unipack.add(bundle, path)
    assert result.record.dtypes == {"a.weight": "F16", "a.bias": "F16", "norm.weight": "F16"}
    kinds = {o.tensor: o.kind for o in result.outcomes}
    assert kinds == {"a.weight": "projected", "a.bias": "projected", "ids": "exact", "norm.weight": "override"}
    with unipack.open(bundle) as b:
        assert b.verify() == []
        got = b.load("half")
        index = {t.name: j for j, t in enumerate(b.manifest.tensors)}
    assert all(got[k].dtype == v.dtype for k, v in half.items())
    assert bits_equal(got["norm.weight"], half["norm.weight"])
    for name in ("a.weight", "a.bias"):
        err = rel_error(half[name], got[name])
        assert_close_errors(err, result.record.errors[index[name]])
        assert err <= MAX_ERROR


def test_non_finite_values_are_stored_raw(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, small_specs(), merged=3, extra=1)
    bad = dict(pop.tensors[3])
    weight = bad["a.weight"].clone()
    weight[1, 2] = float("nan")
    weight[0, 0] = float("inf")
    bad["a.weight"] = weight
    path = tmp_path / "in" / "nan.safetensors"
    save_file(bad, str(path))
    result = unipack.add(bundle, path)
    outcome = next(o for o in result.outcomes if o.tensor == "a.weight")
    assert outcome.kind == "override" and "NaN or inf" in outcome.reason and not outcome.over_budget
    with unipack.open(bundle) as b:
        assert b.verify() == []
        assert bits_equal(b.load("nan")["a.weight"], weight)


# ------------------------------------------------------------------------------------------
# (5) raw tensors whose shape varies
# ------------------------------------------------------------------------------------------


def test_raw_tensors_of_another_shape_are_stored_raw(tmp_path: Path) -> None:
    specs = {
        **small_specs(),
        "head.weight": TensorSpec((3, 12), kind="head"),
        "cls.weight": TensorSpec((2, 12), kind="noise"),
    }
    pop, bundle = held_out(tmp_path, specs, merged=3, extra=1, raw_mismatched=True, raw=("cls.*",))
    # cls.weight: raw by pattern, one shape for all merged members; the new member's differs.
    changed = dict(pop.tensors[3])
    changed["cls.weight"] = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "in" / "new.safetensors"
    save_file(changed, str(path))
    with unipack.open(bundle) as b:
        assert b.manifest.tensors[[t.name for t in b.manifest.tensors].index("cls.weight")].shape == (2, 12)
    result = unipack.add(bundle, path)
    kinds = {o.tensor: o.kind for o in result.outcomes}
    assert kinds["head.weight"] == "raw" and kinds["cls.weight"] == "raw" and result.budget_met
    with unipack.open(bundle) as b:
        assert b.verify() == []
        records = {t.name: t for t in b.manifest.tensors}
        assert records["head.weight"].shape is None
        assert records["cls.weight"].shape is None  # now varies by member (spec 3.2)
        got = b.load("new")
        assert bits_equal(got["head.weight"], changed["head.weight"])
        assert tuple(got["head.weight"].shape) == (6, 12)
        assert bits_equal(got["cls.weight"], changed["cls.weight"])
        assert bits_equal(b.load("ft0")["cls.weight"], pop.tensors[0]["cls.weight"])


# ------------------------------------------------------------------------------------------
# (6) -o: a new bundle, the original untouched
# ------------------------------------------------------------------------------------------


def test_output_leaves_the_original_untouched(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, small_specs(), merged=3, extra=1)
    original = bundle.read_bytes()
    out = tmp_path / "grown.upk"
    result = unipack.add(bundle, pop.paths[3], output=out)
    assert result.path == out and bundle.read_bytes() == original
    assert result.file_bytes_before == len(original) and result.file_bytes_after == out.stat().st_size
    with unipack.open(out) as b:
        assert b.members == pop.names and b.verify() == []
    with pytest.raises(unipack.OutputExistsError):
        unipack.add(bundle, pop.paths[3], output=out, name="again")
    assert assert_one_line_error(run("add", bundle, pop.paths[3], "-o", out, "--name", "again"))
    cli = run("add", bundle, pop.paths[3], "-o", out, "--name", "again", "--force")
    assert cli.exit_code == 0, cli.output
    assert bundle.read_bytes() == original
    with unipack.open(out) as b:
        assert b.members == ["ft0", "ft1", "ft2", "again"]  # from the original, not the earlier output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.upk", "grown.upk", "in"]


# ------------------------------------------------------------------------------------------
# (7) adding twice; blob indices
# ------------------------------------------------------------------------------------------


def test_add_twice(tmp_path: Path) -> None:
    pop, bundle = held_out(tmp_path, standard_specs(), merged=4, extra=2, max_error=MAX_ERROR)
    before = snapshot(bundle)
    first = unipack.add(bundle, pop.paths[4])
    second = unipack.add(bundle, pop.paths[5])
    assert first.budget_met and second.budget_met
    assert (first.record.coefficients, second.record.coefficients) == ("coef/4", "coef/5")
    assert set(first.record.raw.values()) == {"raw/4/step", "raw/4/mask"}
    assert set(second.record.raw.values()) == {"raw/5/step", "raw/5/mask"}
    with unipack.open(bundle) as b:
        assert b.verify() == []
        assert [m.added for m in b.manifest.members] == [False] * 4 + [True, True]
        assert b.manifest.stats["input_bytes"] == sum(p.stat().st_size for p in pop.paths)
    after = snapshot(bundle)
    assert {m: after[m] for m in before} == before
    check_against_originals(pop, bundle, tmp_path / "out", max_error=MAX_ERROR)


def test_free_member_index() -> None:
    assert free_member_index([]) == 0
    assert free_member_index(["coef/0", "raw/1/x", "mean/coef/2", "raw/3"]) == 2
    assert free_member_index(["coef/0", "coef/1", "raw/2/a/b", "exact/raw/3/x"]) == 3
    assert free_member_index(["raw/0/x", "raw/00/y", "coef/1"]) == 2


# ------------------------------------------------------------------------------------------
# rewrite_bundle: the contract others build on
# ------------------------------------------------------------------------------------------


def test_rewrite_with_the_same_manifest_reproduces_the_file(tmp_path: Path) -> None:
    for codec in ("none", "zstd"):
        _, bundle = held_out(tmp_path / codec, small_specs(), merged=3, extra=0, codec=codec)
        out = tmp_path / codec / "copy.upk"
        size = rewrite_bundle(bundle, lambda old, writer: old, out=out)
        assert size == out.stat().st_size
        assert out.read_bytes() == bundle.read_bytes()


def test_rewrite_in_place_needs_force_and_can_change_the_manifest(tmp_path: Path) -> None:
    import dataclasses

    _, bundle = held_out(tmp_path, small_specs(), merged=3, extra=0)
    original = bundle.read_bytes()
    with pytest.raises(unipack.OutputExistsError):
        rewrite_bundle(bundle, lambda old, writer: old)
    assert bundle.read_bytes() == original

    def update(old, writer):
        writer.add("extra/blob", np.arange(4, dtype=np.float32), "F32")  # must be referenced: invalid
        return dataclasses.replace(old, blobs=writer.blobs)

    with pytest.raises(ValueError, match="not referenced"):
        rewrite_bundle(bundle, update, force=True)
    with pytest.raises(ValueError, match="writer's blobs"):
        rewrite_bundle(bundle, lambda old, writer: dataclasses.replace(old, blobs={}), force=True)

    def boom(old, writer):
        raise unipack.UnipackError("stop")

    with pytest.raises(unipack.UnipackError, match="stop"):
        rewrite_bundle(bundle, boom, force=True)
    assert bundle.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.upk", "in"]

    def stats(old, writer):
        return dataclasses.replace(old, stats={**old.stats, "note": "rewritten"}, blobs=writer.blobs)

    rewrite_bundle(bundle, stats, force=True)
    with unipack.open(bundle) as b:
        assert b.manifest.stats["note"] == "rewritten" and b.verify() == []


def test_add_is_exported_and_has_cli_help() -> None:
    assert "add" in unipack.__all__ and unipack.add is not None
    result = run("add", "--help")
    assert result.exit_code == 0 and "--name" in result.output and "-o" in result.output


def test_projecting_a_merged_member_reproduces_what_merge_recorded(tmp_path: Path) -> None:
    """The projection is merge's own encoding step on a fixed basis: re-projecting a member that
    was merged gives back its stored coefficients, recorded error and fidelity numbers."""
    from unipack.core.fidelity import round_up
    from unipack.format import dtypes
    from unipack.format.container import BundleFile
    from unipack.schemes.shared import project

    pop, bundle = held_out(tmp_path, standard_specs(), extra=0, dtype="bfloat16", max_error=0.05)
    with BundleFile(bundle) as f:
        manifest = f.manifest
        n = len(manifest.members)
        for i, member in enumerate(manifest.members):
            offsets = manifest.coef_offsets(member)
            coefs = f.read_blob(member.coefficients)
            assert member.fidelity is not None and member.fidelity.svd_errors is not None
            for j, t in enumerate(manifest.tensors):
                if t.storage != "shared" or t.name in member.raw:
                    continue
                mean = dtypes.to_float(f.read_blob(t.mean), manifest.blobs[t.mean].dtype).reshape(t.shape)
                basis = dtypes.to_float(f.read_blob(t.basis), "BF16") if t.basis else None
                p = project(
                    t,
                    as64(pop.tensors[i][t.name]),
                    mean,
                    basis,
                    member_dtype=member.dtype_of(t),
                    coef_dtype="BF16",
                    n_members=n,
                    baselines=True,
                )
                if t.rank:
                    lo, hi = offsets[t.name]
                    stored = dtypes.to_float(coefs[lo:hi], "BF16")
                    got = dtypes.to_float(p.coef.reshape(-1), "BF16")
                    np.testing.assert_allclose(got, stored, rtol=2.0**-7, err_msg=t.name)
                assert_close_errors(round_up(p.error), member.errors[j])
                assert p.fidelity.svd_rank == member.fidelity.svd_ranks[j], t.name
                for ours, recorded in (
                    (p.fidelity.norm, member.fidelity.norms[j]),
                    (p.fidelity.mean_error, member.fidelity.mean_errors[j]),
                    (p.fidelity.delta_error, member.fidelity.delta_errors[j]),
                    (p.fidelity.svd_error, member.fidelity.svd_errors[j]),
                ):
                    assert ours == pytest.approx(recorded, rel=1e-3), t.name  # recorded at 4 digits


def test_tensors_kept_raw_for_bytes_get_a_mean_only_baseline(tmp_path: Path) -> None:
    """Spec 4.4: a ``raw_cause: budget`` tensor records ||W|| and the mean-only error, the mean
    being that of every member's copy (the new one's included), as a mean-only bundle would hold."""
    specs = {**small_specs(), "noise.weight": TensorSpec((8, 12), kind="noise", scale=0.5)}
    pop, bundle = held_out(tmp_path, specs, merged=3, extra=1)
    with unipack.open(bundle) as b:
        record = next(t for t in b.manifest.tensors if t.name == "noise.weight")
    assert (record.storage, record.raw_cause) == ("raw", "budget")
    result = unipack.add(bundle, pop.paths[3])
    j = [o.tensor for o in result.outcomes].index("noise.weight")
    assert result.outcomes[j].kind == "raw"
    ws = [as64(t["noise.weight"]) for t in pop.tensors]
    mean = (sum(ws) / 4).astype(np.float32).astype(np.float64)
    fidelity = result.record.fidelity
    assert fidelity is not None
    assert fidelity.norms[j] == pytest.approx(np.linalg.norm(ws[3]), rel=1e-3)
    assert fidelity.mean_errors[j] == pytest.approx(rel_error(ws[3], mean), rel=1e-3)
    assert fidelity.delta_errors[j] == 0.0 and result.record.errors[j] == 0.0

    # A member whose copy has another shape: the record's shape now varies, and the spec files
    # such tensors under "requested" (no mean can stand in for them any more).
    other = dict(pop.tensors[3])
    other["noise.weight"] = torch.zeros(5, 12)
    path = tmp_path / "in" / "other.safetensors"
    save_file(other, str(path))
    result = unipack.add(bundle, path)
    assert result.record.fidelity is not None and result.record.fidelity.mean_errors[j] == 0.0
    with unipack.open(bundle) as b:
        record = next(t for t in b.manifest.tensors if t.name == "noise.weight")
        assert (record.shape, record.raw_cause) == (None, "requested")
        assert b.verify() == []


def test_add_stored_refuses_bytes_that_do_not_match_their_record(tmp_path: Path) -> None:
    from unipack.format.container import BundleFile, BundleWriter

    _, bundle = held_out(tmp_path, small_specs(), merged=3, extra=0)
    with BundleFile(bundle) as f, BundleWriter.spooled(tmp_path / "x.upk", "none", 3) as writer:
        stored = f.read_stored("mean/a.weight")
        record = f.manifest.blobs["mean/a.weight"]
        with pytest.raises(ValueError, match="do not match"):
            writer.add_stored("mean/a.weight", record, stored[:-4] + b"\0\0\0\0")
        writer.add_stored("mean/a.weight", record, stored)
        with pytest.raises(ValueError, match="twice"):
            writer.add_stored("mean/a.weight", record, stored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.upk", "in"]
