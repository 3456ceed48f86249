"""Merge -> extract round trips, checked against the original files with numpy.

Errors are recomputed from the original checkpoints and the extracted ``.safetensors`` files as
read by the reference safetensors loader, never taken from unipack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FLOAT_TORCH,
    TensorSpec,
    as64,
    bits_equal,
    check_against_originals,
    listing,
    mean_torch_dtype,
    read_safetensors,
    rel_error,
    spectrum,
    standard_specs,
    stored_mean,
    write_population,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import unipack
from unipack.options import DEFAULT_MAX_ERROR

# ------------------------------------------------------------------------------------------
# error budget
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_error", [0.05, 0.01, 0.001])
def test_budget_met_and_errors_recorded_exactly(tmp_path: Path, max_error: float) -> None:
    specs = standard_specs()
    # more noise than the default, so that 0.001 and 0.01 need different ranks
    specs["layer0.attn.weight"] = TensorSpec((12, 48), kind="right", rank=4, decay=0.5, noise=3e-3)
    specs["embed.weight"] = TensorSpec((40, 12), kind="right", rank=3, decay=0.3, noise=5e-4)
    pop = write_population(tmp_path / "in", specs, n=5, seed=3)
    out = tmp_path / "b.upk"
    result = unipack.merge(pop.paths, out, max_error=max_error)
    measured = check_against_originals(pop, out, tmp_path / "x", max_error=max_error)
    worst = max(max(d.values()) for d in measured.values())
    assert result.worst_error == pytest.approx(worst, rel=1e-6, abs=1e-12)
    assert result.worst_error <= max_error
    assert result.file_bytes == out.stat().st_size
    assert result.input_bytes == sum(p.stat().st_size for p in pop.paths)
    assert result.ratio == pytest.approx(result.input_bytes / result.file_bytes)
    # lossy compression really happened for the structured tensors
    with unipack.open(out) as b:
        storages = {t.name: t.storage for t in b.manifest.tensors}
        assert storages["layer0.mlp.weight"] in ("shared", "delta")
        assert storages["embed.weight"] in ("shared", "delta")
        assert storages["position_ids"] == "exact"
        assert b.members == pop.names


def test_tighter_budget_never_lowers_rank(tmp_path: Path) -> None:
    specs = {"w": TensorSpec((16, 40), kind="right", rank=6, decay=0.4, noise=1e-5)}
    pop = write_population(tmp_path / "in", specs, n=6, seed=11)
    ranks = []
    for e in (0.05, 0.01, 0.001):
        r = unipack.merge(pop.paths, tmp_path / f"{e}.upk", max_error=e, scheme="rows", quantize=False)
        (t,) = r.manifest.tensors
        assert t.storage == "shared"
        ranks.append(t.rank)
        check_against_originals(pop, tmp_path / f"{e}.upk", tmp_path / f"x{e}", max_error=e)
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1], ranks


def test_load_matches_extract(tmp_path: Path, population) -> None:
    out = tmp_path / "b.upk"
    unipack.merge(population.paths, out)
    with unipack.open(out) as b:
        for name in b.members:
            path = b.extract(name, tmp_path / f"{name}.st")
            ext, _, _ = read_safetensors(path)
            loaded = b.load(name)
            numpy_view = b.load_numpy(name)
            assert list(loaded) == b.tensor_names
            for k, t in loaded.items():
                assert bits_equal(t, ext[k]), k
                dtype, arr = numpy_view[k]
                assert tuple(arr.shape) == tuple(t.shape)


# ------------------------------------------------------------------------------------------
# raw and non-float tensors: bit-exact
# ------------------------------------------------------------------------------------------


def test_raw_patterns_and_mismatched_heads_are_bit_exact(tmp_path: Path) -> None:
    specs = standard_specs()
    specs["classifier.weight"] = TensorSpec((3, 12), kind="head")
    specs["classifier.bias"] = TensorSpec((3,), kind="head")
    specs["lm_head.weight"] = TensorSpec((20, 12), kind="right", rank=2)
    pop = write_population(tmp_path / "in", specs, n=4, seed=5)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, raw=("lm_head.*",), raw_mismatched=True)
    with unipack.open(out) as b:
        by_name = {t.name: t for t in b.manifest.tensors}
        for name in ("classifier.weight", "classifier.bias", "lm_head.weight"):
            assert by_name[name].storage == "raw", name
        assert by_name["classifier.weight"].shape is None  # differs per member
        assert by_name["lm_head.weight"].shape == (20, 12)
        assert by_name["step"].storage == "raw"  # int tensor that differs per member
        assert by_name["mask"].storage == "raw"
        assert by_name["position_ids"].storage == "exact"
    measured = check_against_originals(pop, out, tmp_path / "x", max_error=DEFAULT_MAX_ERROR)
    for i, name in enumerate(pop.names):
        got, _, _ = read_safetensors(tmp_path / "x" / f"{name}.safetensors")
        for tname in ("classifier.weight", "classifier.bias", "lm_head.weight", "step", "mask", "position_ids"):
            assert bits_equal(got[tname], pop.tensors[i][tname]), (name, tname)
            assert measured[name][tname] == 0.0
        assert got["classifier.weight"].shape[0] == 3 + i


@pytest.mark.parametrize("dtype", ["int64", "int32", "int16", "int8", "uint8", "bool"])
def test_integer_and_bool_tensors_bit_exact(tmp_path: Path, dtype: str) -> None:
    specs = {
        "w": TensorSpec((8, 10), kind="right", rank=2),
        "varies": TensorSpec((5, 3), dtype=dtype, kind="int"),
        "same": TensorSpec((7,), dtype=dtype, kind="int_same"),
    }
    pop = write_population(tmp_path / "in", specs, n=3, seed=2)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out)
    with unipack.open(out) as b:
        by_name = {t.name: t for t in b.manifest.tensors}
        assert by_name["varies"].storage == "raw"
        assert by_name["same"].storage == "exact"
        for i, name in enumerate(pop.names):
            loaded = b.load(name)
            assert bits_equal(loaded["varies"], pop.tensors[i]["varies"])
            assert bits_equal(loaded["same"], pop.tensors[i]["same"])
    check_against_originals(pop, out, tmp_path / "x", max_error=DEFAULT_MAX_ERROR)


def test_incompressible_tensor_falls_back_to_raw(tmp_path: Path) -> None:
    specs = {"noise": TensorSpec((10, 10), kind="noise", scale=1.0), "w": TensorSpec((10, 30), kind="right", rank=1)}
    pop = write_population(tmp_path / "in", specs, n=3, seed=4)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, max_error=0.001, quantize=False)
    with unipack.open(out) as b:
        by_name = {t.name: t for t in b.manifest.tensors}
        assert by_name["noise"].storage == "raw"
        assert by_name["w"].storage == "shared"
    check_against_originals(pop, out, tmp_path / "x", max_error=0.001)


# ------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,tight", [("float16", 0.001), ("bfloat16", 0.004), ("float64", 1e-5)])
def test_low_and_high_precision_inputs_keep_their_dtype(tmp_path: Path, in_dtype: str, tight: float) -> None:
    specs = {
        "a": TensorSpec((16, 24), dtype=in_dtype, kind="right", rank=2, noise=0.0),
        "b": TensorSpec((24, 8), dtype=in_dtype, kind="left", rank=2, noise=0.0),
        "c": TensorSpec((24,), dtype=in_dtype, kind="flat", rank=1, noise=0.0),
        "d": TensorSpec((6,), dtype=in_dtype, kind="same"),
        "f32": TensorSpec((6, 6), dtype="float32", kind="right", rank=1),
    }
    pop = write_population(tmp_path / "in", specs, n=4, seed=8)
    for max_error in (0.02, tight):
        out = tmp_path / f"b{max_error}.upk"
        unipack.merge(pop.paths, out, max_error=max_error, quantize=False)
        check_against_originals(pop, out, tmp_path / f"x{max_error}", max_error=max_error)
        with unipack.open(out) as b:
            by_name = {t.name: t for t in b.manifest.tensors}
            for name in "abc":
                assert by_name[name].storage == "shared", (name, by_name[name].reason)
            assert by_name["d"].storage == "exact", by_name["d"].reason
            loaded = b.load(pop.names[0])
            assert loaded["a"].dtype == getattr(torch, in_dtype)
            assert loaded["f32"].dtype == torch.float32
            # the mean is kept at the members' own precision
            mean_blob = b.manifest.blobs[by_name["a"].mean]
            assert mean_blob.dtype == {"float16": "F16", "bfloat16": "BF16", "float64": "F64"}[in_dtype]


def test_mixed_float_dtypes_across_members(tmp_path: Path) -> None:
    """One member saved in bf16, the others in f32: each comes back in its own dtype."""
    specs = {"w": TensorSpec((12, 20), kind="right", rank=2)}
    pop = write_population(tmp_path / "in", specs, n=3, seed=9)
    pop.tensors[1]["w"] = pop.tensors[1]["w"].to(torch.bfloat16)
    save_file(pop.tensors[1], str(pop.paths[1]), metadata=pop.metadata[1])
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, max_error=0.01)
    check_against_originals(pop, out, tmp_path / "x", max_error=0.01)
    with unipack.open(out) as b:
        assert b.load(pop.names[1])["w"].dtype == torch.bfloat16
        assert b.load(pop.names[0])["w"].dtype == torch.float32


@pytest.mark.parametrize("coef_dtype,blob_dtype", [("float16", "F16"), ("bfloat16", "BF16")])
@pytest.mark.parametrize("max_error", [0.001, 0.0002])
def test_low_precision_coefficients_meet_budget(
    tmp_path: Path, coef_dtype: str, blob_dtype: str, max_error: float
) -> None:
    specs = standard_specs()
    pop = write_population(tmp_path / "in", specs, n=4, seed=12)
    out = tmp_path / "b.upk"
    result = unipack.merge(pop.paths, out, max_error=max_error, dtype=coef_dtype)
    assert result.manifest.options["dtype"] == coef_dtype
    bases = [t.basis for t in result.manifest.tensors if t.storage == "shared" and t.rank > 0]
    assert bases, "expected some shared tensors with rank > 0"
    for blob in bases:
        assert result.manifest.blobs[blob].dtype == blob_dtype
    for m in result.manifest.members:
        if m.coefficients:
            assert result.manifest.blobs[m.coefficients].dtype == blob_dtype
    check_against_originals(pop, out, tmp_path / "x", max_error=max_error)


# ------------------------------------------------------------------------------------------
# metadata, names, shapes
# ------------------------------------------------------------------------------------------


def test_metadata_names_shapes_dtypes_preserved(tmp_path: Path) -> None:
    specs = standard_specs()
    specs["weird/name.with:chars[0]"] = TensorSpec((4, 6), kind="right", rank=1)
    specs["scalar"] = TensorSpec((), kind="flat", rank=1)
    metas = [{"a": "1", "json": '{"x": [1, 2]}'}, None, {}, {"only": 'ünïcode ✓ "quoted"'}]
    pop = write_population(tmp_path / "in", specs, n=4, seed=6, metadata=metas)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out)
    with unipack.open(out) as b:
        assert sorted(b.tensor_names) == sorted(specs)
        for i, name in enumerate(pop.names):
            path = b.extract(name, tmp_path / f"{name}.safetensors")
            got, meta, keys = read_safetensors(path)
            if pop.metadata[i] == {}:
                assert meta in ({}, None)  # an empty metadata object may be dropped by either writer
            else:
                assert meta == pop.metadata[i]
            assert sorted(keys) == sorted(specs)
            for k, t in pop.tensors[i].items():
                assert got[k].dtype == t.dtype and tuple(got[k].shape) == tuple(t.shape), k
            assert b.manifest.member(name).source == pop.paths[i].name
            assert b.manifest.member(name).source_bytes == pop.paths[i].stat().st_size


def test_explicit_member_names(tmp_path: Path, population) -> None:
    out = tmp_path / "b.upk"
    names = ["alpha", "beta", "gamma", "delta"]
    unipack.merge(population.paths, out, names=names)
    with unipack.open(out) as b:
        assert b.members == names
        got = b.load("gamma")
        assert rel_error(population.tensors[2]["embed.weight"], got["embed.weight"]) <= DEFAULT_MAX_ERROR
        paths = b.extract_all(tmp_path / "all")
        assert sorted(p.name for p in paths) == sorted(f"{n}.safetensors" for n in names)


# ------------------------------------------------------------------------------------------
# rank rules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_fixed_rank(tmp_path: Path, population, k: int) -> None:
    out = tmp_path / "b.upk"
    result = unipack.merge(population.paths, out, rank=k)
    float_names = {n for n, s in population.specs.items() if s.dtype.startswith(("float", "bfloat"))}
    for t in result.manifest.tensors:
        if t.name not in float_names:
            continue
        if population.specs[t.name].kind == "same":  # bit-identical: stored once, exactly
            assert t.storage == "exact", t.name
            continue
        assert t.storage == "shared", t.name
        assert t.rank == k, (t.name, t.rank)
    check_against_originals(population, out, tmp_path / "x", max_error=None)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_energy_rank_is_minimal_rank_keeping_fraction(tmp_path: Path, fraction: float) -> None:
    specs = {
        "right": TensorSpec((10, 24), kind="right", rank=5, decay=0.6, noise=1e-3),
        "left": TensorSpec((24, 10), kind="left", rank=5, decay=0.6, noise=1e-3),
        "vec": TensorSpec((30,), kind="flat", rank=4, decay=0.5, noise=1e-3),
        "flatmat": TensorSpec((6, 5), kind="flat", rank=4, decay=0.5, noise=1e-3),
    }
    pop = write_population(tmp_path / "in", specs, n=6, seed=21)
    out = tmp_path / "b.upk"
    result = unipack.merge(pop.paths, out, energy=fraction)
    shared = [t for t in result.manifest.tensors if t.storage == "shared"]
    assert len(shared) >= 3
    for t in shared:
        ws = [as64(m[t.name]) for m in pop.tensors]
        mean = stored_mean(ws, mean_torch_dtype([m[t.name].dtype for m in pop.tensors]))
        eig, _ = spectrum(ws, mean, t.scheme, t.side)
        kept = np.concatenate([[0.0], np.cumsum(eig)]) / eig.sum()
        assert kept[t.rank] >= fraction - 1e-9, (t.name, t.rank, kept)
        if t.rank > 0:
            assert kept[t.rank - 1] < fraction, (t.name, t.rank, kept)
        assert t.energy == pytest.approx(kept[t.rank], abs=2e-6)
    check_against_originals(pop, out, tmp_path / "x", max_error=None)


def test_max_error_zero_is_lossless(tmp_path: Path, population) -> None:
    out = tmp_path / "b.upk"
    result = unipack.merge(population.paths, out, max_error=0.0)
    assert result.worst_error == 0.0
    check_against_originals(population, out, tmp_path / "x", max_error=0.0)
    for i, name in enumerate(population.names):
        got, _, _ = read_safetensors(tmp_path / "x" / f"{name}.safetensors")
        for k, t in population.tensors[i].items():
            assert bits_equal(got[k], t), (name, k)


def test_max_error_zero_keeps_signed_zeros(tmp_path: Path) -> None:
    """Bit-exact means bit-exact: -0.0 must not come back as +0.0."""
    specs = {"w": TensorSpec((6, 8), kind="right", rank=2)}
    pop = write_population(tmp_path / "in", specs, n=3, seed=3)
    for i, path in enumerate(pop.paths):
        w = pop.tensors[i]["w"].clone()
        w[0, :3] = -0.0  # the same signed zeros in every member
        w[1, 0] = 0.0 if i else -0.0  # and a zero whose sign differs between members
        pop.tensors[i]["w"] = w
        pop.tensors[i]["z"] = torch.tensor([1.5, -0.0, 2.0, 0.0, -3.0])  # identical in every member
        pop.tensors[i]["zz"] = torch.tensor([0.0, -0.0, 0.0])  # identical, all zero, one negative
        save_file(pop.tensors[i], str(path), metadata=pop.metadata[i])
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, max_error=0.0)
    with unipack.open(out) as b:
        for i, name in enumerate(pop.names):
            got = b.load(name)
            for k in ("w", "z", "zz"):
                assert bits_equal(got[k], pop.tensors[i][k]), (name, k)


@pytest.mark.parametrize("rule", [{"max_error": 0.01}, {"rank": 1}, {"energy": 0.9}])
def test_all_zero_member_tensor(tmp_path: Path, rule: dict) -> None:
    """A member whose tensor is all zeros: its error is the absolute error (spec 4.3), finite,
    recorded exactly, and within the budget under the max-error rule."""
    specs = {"w": TensorSpec((6, 10), kind="right", rank=2), "b": TensorSpec((10,), kind="flat", rank=1)}
    pop = write_population(tmp_path / "in", specs, n=4, seed=13)
    pop.tensors[2] = {k: torch.zeros_like(v) for k, v in pop.tensors[2].items()}
    save_file(pop.tensors[2], str(pop.paths[2]), metadata=pop.metadata[2])
    out = tmp_path / "b.upk"
    result = unipack.merge(pop.paths, out, **rule)
    for m in result.manifest.members:
        assert all(np.isfinite(e) for e in m.errors)
    check_against_originals(pop, out, tmp_path / "x", max_error=rule.get("max_error"))


def test_identical_members_give_rank_zero(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", standard_specs(), n=1, seed=4)
    paths = [pop.paths[0]]
    for i in range(1, 4):
        p = tmp_path / "in" / f"copy{i}.safetensors"
        save_file(pop.tensors[0], str(p), metadata={"copy": str(i)})
        paths.append(p)
    out = tmp_path / "b.upk"
    result = unipack.merge(paths, out, max_error=0.001)
    for t in result.manifest.tensors:
        if t.storage == "shared":
            assert t.rank == 0 and t.basis is None, t.name
        else:
            assert t.storage == "exact", t.name
    assert all(m.coefficients is None for m in result.manifest.members)
    assert result.worst_error == 0.0
    with unipack.open(out) as b:
        for name in b.members:
            got = b.load(name)
            for k, t in pop.tensors[0].items():
                assert bits_equal(got[k], t), (name, k)
    # the bundle holds one copy plus small overhead, far less than 4 copies
    assert result.file_bytes < 2 * pop.paths[0].stat().st_size


# ------------------------------------------------------------------------------------------
# property test: the budget always holds
# ------------------------------------------------------------------------------------------


@st.composite
def populations(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    kind = draw(st.sampled_from(["right", "left", "flat", "noise", "same"]))
    rank = draw(st.integers(0, 3))
    n = draw(st.integers(2, 5))
    noise = draw(st.sampled_from([0.0, 1e-4, 1e-2]))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    scheme = draw(st.sampled_from(["auto", "rows", "flat"]))
    coef = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    max_error = draw(st.sampled_from([0.05, 0.01, 0.002]))
    seed = draw(st.integers(0, 2**16))
    return shape, kind, rank, n, noise, dtype, scheme, coef, max_error, seed


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(populations())
def test_property_budget_always_met(tmp_path_factory, params) -> None:
    shape, kind, rank, n, noise, dtype, scheme, coef, max_error, seed = params
    d = tmp_path_factory.mktemp("prop")
    specs = {
        "t": TensorSpec(shape, dtype=dtype, kind=kind, rank=rank, noise=noise),
        "u": TensorSpec((3, 4), kind="right", rank=1),
    }
    pop = write_population(d, specs, n=n, seed=seed, metadata=False)
    out = d / "b.upk"
    result = unipack.merge(pop.paths, out, max_error=max_error, scheme=scheme, dtype=coef)
    assert result.worst_error <= max_error
    with unipack.open(out) as b:
        index = {name: j for j, name in enumerate(b.tensor_names)}
        for i, name in enumerate(pop.names):
            got = b.load(name)
            errors = b.manifest.member(name).errors
            for k, w in pop.tensors[i].items():
                assert got[k].dtype == w.dtype and tuple(got[k].shape) == tuple(w.shape)
                err = rel_error(w, got[k])
                assert err <= max_error * (1 + 1e-9), (k, err, params)
                assert abs(err - errors[index[k]]) <= 1e-6 * max(err, errors[index[k]]) + 1e-12
                if w.dtype in FLOAT_TORCH and b.manifest.tensors[index[k]].storage not in ("shared", "delta"):
                    assert bits_equal(got[k], w)


# ------------------------------------------------------------------------------------------
# low-precision coefficients out of their range
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{"rank": 1}, {"energy": 0.5}, {"max_error": 0.5}])
def test_float16_coefficients_out_of_range(tmp_path: Path, rule: dict) -> None:
    """Flat coefficients are ~||D_i|| (here ~1e5): beyond float16's 65504. unipack must not store
    inf coefficients (or crash): either it gives a finite, honest result or a clear UnipackError."""
    specs = {"v": TensorSpec((1024,), kind="noise", scale=30.0, noise=0.0)}
    pop = write_population(tmp_path / "in", specs, n=3, seed=14, metadata=False)
    for i, path in enumerate(pop.paths):  # values ~1e2, deltas ~3e3
        pop.tensors[i] = {"v": pop.tensors[i]["v"] * 100}
        save_file(pop.tensors[i], str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        result = unipack.merge(pop.paths, out_dir / "b.upk", dtype="float16", scheme="flat", **rule)
    except unipack.UnipackError as exc:
        assert "float16" in str(exc) or "--dtype" in str(exc)
        assert listing(out_dir) == []
        return
    for m in result.manifest.members:
        assert all(np.isfinite(e) for e in m.errors)
    check_against_originals(pop, out_dir / "b.upk", tmp_path / "x", max_error=rule.get("max_error"))
    with unipack.open(out_dir / "b.upk") as b:
        for name in b.members:
            assert bool(torch.isfinite(b.load(name)["v"]).all())


def test_outputs_get_ordinary_file_permissions(tmp_path: Path, population) -> None:
    """Temp files are created 0600; the renamed output must follow the umask like open() would."""
    import os
    import stat

    out = tmp_path / "b.upk"
    unipack.merge(population.paths, out)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    with unipack.open(out) as b:
        extracted = b.extract(b.members[0], tmp_path / "m.safetensors")
    assert stat.S_IMODE(extracted.stat().st_mode) == 0o666 & ~mask
