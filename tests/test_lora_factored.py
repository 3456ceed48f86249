"""LoRA form ``subspace-factored`` (spec §12, format version 11): the shared bases with each
member's core stored as its factors P Q, cast or quantized.

Every number is recomputed here with dense numpy in float64 from the adapters' files and the
bundle's blobs: the rebuild (codes and steps to P, Q, then U P Q Vᵀ and the §7.2 factors), the
recorded errors against the original updates, the chooser's pick against the same merge without
the form and against every level count at the chosen ranks, ``add`` into such a record, and a
writer that refuses a record a reader would refuse.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_torch
from test_spec_reader import SpecBundle, _factored_population, _member_names, _unipack_numpy

import unipack
from unipack.core import quantize
from unipack.core.lora import LoraFactors, fit
from unipack.core.lora_factored import AdapterCore, FactoredSearch, cast_core, read_bases, stored_bases
from unipack.core.lora_quant import LEVELS
from unipack.format import codec, dtypes
from unipack.pack import lora as lora_merge
from unipack.schemes.lora_factored import LoraFactoredParams

PREFIX = "base_model.model."
MODULES = [PREFIX + m for m in ("layers.0.q", "layers.0.v", "layers.1.fc")]
SHAPES = {PREFIX + "layers.0.q": (48, 64), PREFIX + "layers.0.v": (48, 64), PREFIX + "layers.1.fc": (32, 48)}


def adapter_factors(d: Path, module: str) -> LoraFactors:
    """(A, B, s) of one module of an adapter folder written by ``_factored_population`` (alpha = 2r)."""
    f = load_torch(str(d / "adapter_model.safetensors"))
    a = f[f"{module}.lora_A.weight"].to(torch.float64).numpy()
    b = f[f"{module}.lora_B.weight"].to(torch.float64).numpy()
    return LoraFactors(a, b, 2.0)


def dense_update(f: LoraFactors) -> np.ndarray:
    return f.scale * (f.b @ f.a)


def rel(w: np.ndarray, approx: np.ndarray) -> float:
    n = float(np.linalg.norm(w))
    d = float(np.linalg.norm(w - approx))
    return d / n if n > 0 else d


def reference_factors(
    core: np.ndarray, u: np.ndarray, v: np.ndarray, r: int, s: float
) -> tuple[np.ndarray, np.ndarray]:
    """§7.2 steps 1-3 in dense numpy: (B', A') of rank r with s B' A' = U C Vᵀ (float64)."""
    x, sigma, yt = np.linalg.svd(core, full_matrices=False)
    keep = min(r, int(np.count_nonzero(sigma > sigma[0] * max(core.shape) * 2.0**-52))) if sigma.size else 0
    x, sigma, yt = x[:, :keep], sigma[:keep], yt[:keep]
    for j in range(keep):  # the largest-magnitude entry of each kept column of X positive
        if x[np.argmax(np.abs(x[:, j])), j] < 0:
            x[:, j], yt[j] = -x[:, j], -yt[j]
    c = math.sqrt(1.0 / abs(s))
    b = np.zeros((u.shape[0], r))
    a = np.zeros((r, v.shape[0]))
    b[:, :keep] = (u @ (x * np.sqrt(sigma))) * (math.copysign(1.0, s) * c)
    a[:keep] = ((np.sqrt(sigma)[:, None] * yt) @ v.T) * c
    return b, a


def numpy_core(
    block: np.ndarray, codes: np.ndarray | None, levels: int | None, c: int, k_out: int, k_in: int
) -> np.ndarray:
    """§12.2 steps 1-2 in numpy: C = P Q from a member's block (float64) and its unpacked codes."""
    if levels is None:
        values = block
    else:
        assert codes is not None
        q = codes.astype(np.float64) - (levels - 1) / 2
        values = q * np.concatenate([np.repeat(block[:c], k_in), np.repeat(block[c:], k_out)])
    q_factor = values[: c * k_in].reshape(c, k_in)
    p_factor = values[c * k_in :].reshape(c, k_out).T
    return p_factor @ q_factor


def random_bases(rng: np.random.Generator, dim: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((dim, k)))[0]


# --------------------------------------------------------------------------------------------
# the arithmetic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, *LEVELS])
@pytest.mark.parametrize("coef_dtype, member_dtype", [("F32", "F32"), ("F16", "F32"), ("BF16", "BF16")])
def test_rebuild_and_error_against_dense_numpy(levels, coef_dtype, member_dtype) -> None:
    """A core factored and cast (None) or quantized at L: a §12.2 rebuild in numpy from the block
    and codes alone gives factors whose dense error (outside the bases included) is the one the
    search measured, within the budget."""
    rng = np.random.default_rng(7 if levels is None else levels)
    out_dim, in_dim, r, k = 40, 56, 4, 10
    u_full, v_full = random_bases(rng, out_dim, k), random_bases(rng, in_dim, k)
    # B, A mostly inside the spans, with a little outside: the error the bases cannot remove
    b = u_full @ rng.standard_normal((k, r)) + 0.01 * rng.standard_normal((out_dim, r))
    a = rng.standard_normal((r, k)) @ v_full.T + 0.01 * rng.standard_normal((r, in_dim))
    f = LoraFactors(a, b, 0.75)
    # the bases as a bundle stores them: orthonormal, then rounded to the coefficient dtype
    u_stored = dtypes.round_trip(u_full, coef_dtype)
    v_stored = dtypes.round_trip(v_full, coef_dtype)
    bases = read_bases(u_stored, v_stored)
    max_error = 0.2
    if levels is None:
        got = cast_core(f, bases, r, coef_dtype, member_dtype)
    else:
        found = FactoredSearch(AdapterCore(f, bases, member_dtype), r, max_error, coef_dtype=coef_dtype).fit(levels)
        if found is None:  # too few levels for this budget (the floors miss it): nothing to check
            assert levels <= 7
            return
        got = found
    block = dtypes.to_float(got.block, coef_dtype)
    assert block.shape == ((2 * r,) if levels is not None else (r * 2 * k,))
    core = numpy_core(block, got.codes, levels, got.rank, k, k)
    u, v = u_stored, v_stored
    b2, a2 = reference_factors(core, u, v, f.rank, f.scale)
    b2, a2 = dtypes.round_trip(b2, member_dtype), dtypes.round_trip(a2, member_dtype)
    dense = rel(dense_update(f), f.scale * (b2 @ a2))
    assert got.error == pytest.approx(dense, rel=1e-6, abs=1e-12)
    if levels is not None:
        assert got.error <= max_error


def test_core_rank_keeps_the_first_directions() -> None:
    """A record's core rank below the adapter's: its block holds c = R directions, and the error
    is that of the truncated core (dense numpy: the best rank-R approximation inside the bases)."""
    rng = np.random.default_rng(3)
    out_dim, in_dim, r = 30, 20, 5
    f = LoraFactors(rng.standard_normal((r, in_dim)), rng.standard_normal((out_dim, r)), 1.0)
    model = fit([f], out_dim, in_dim)
    bases = stored_bases(model, *model.max_ranks, "F32")
    got = cast_core(f, bases, 3, "F32", "F32")
    assert got.rank == 3 and got.block.size == 3 * sum(model.max_ranks)
    sigma = np.linalg.svd(dense_update(f), compute_uv=False)
    best = math.sqrt(float(np.sum(sigma[3:] ** 2))) / float(np.linalg.norm(sigma))
    assert got.error == pytest.approx(best, rel=1e-5)


def test_the_writer_refuses_a_record_a_reader_refuses() -> None:
    ok = {"ranks": (4, 6), "left": "l", "right": "r", "core_rank": 4}
    LoraFactoredParams(**ok)
    LoraFactoredParams(**ok, levels=7, codes="c")
    for bad in (
        {"core_rank": 5},  # above min(k_out, k_in)
        {"core_rank": 0},
        {"ranks": (0, 6)},
        {"left": None},
        {"levels": 7},  # levels without codes
        {"codes": "c"},  # codes without levels
        {"levels": 1, "codes": "c"},
        {"levels": 257, "codes": "c"},
    ):
        with pytest.raises(ValueError, match="section 12.1"):
            LoraFactoredParams(**{**ok, **bad})


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def populations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("factored")
    return {
        "cast": _factored_population(root / "cast", 12, (2, 3), 12, seed=31),
        "quant": _factored_population(root / "quant", 24, (4,), 8, seed=32),
        "bf16": _factored_population(root / "bf16", 24, (4,), 8, seed=33, dtype=torch.bfloat16),
    }


CASES = {
    "cast": ("cast", {"max_error": 0.01, "quantize": False}),
    "quant-f16": ("quant", {"max_error": 0.05, "dtype": "float16"}),
    "quant-bf16": ("bf16", {"max_error": 0.05}),
}


def merged(dirs: list[Path], out: Path, **options: Any) -> Any:
    return unipack.merge([str(d) for d in dirs], str(out), **options)


def without_factored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_merge.Pricing, "factored_candidate", lambda self, *args, **kw: None)


@pytest.mark.parametrize("case", list(CASES))
def test_recorded_errors_and_rebuild_against_numpy(populations, tmp_path, case) -> None:
    """Each member's extracted factors (``load``) against its adapter by dense numpy: the recorded
    error, within the rule; its dense update is U P Q Vᵀ of the bundle's blobs; version 11."""
    pop, options = CASES[case]
    dirs = populations[pop]
    path = tmp_path / "b.upk"
    result = merged(dirs, path, **options)
    assert result.manifest.format_version == 11
    records = {t.name: t for t in result.manifest.tensors}
    assert {records[m].form for m in MODULES} == {"subspace-factored"}
    coef_dtype = dtypes.STORAGE_DTYPES[options.get("dtype", "float32")]
    with unipack.open(path) as b:
        manifest = b.manifest
        for i, (member, d) in enumerate(zip(manifest.members, dirs)):
            loaded, updates = b.load(member.name), b.load(member.name, lora="updates")
            coefs = dtypes.to_float(b.read_blob(member.coefficients), coef_dtype)
            offsets = manifest.coef_offsets(member)
            for j, t in enumerate(manifest.tensors):
                if t.name not in member.lora:
                    continue
                f = adapter_factors(d, t.name)
                r, s = member.lora[t.name]
                assert s == f.scale
                b2 = loaded[f"{t.name}.lora_B.weight"].to(torch.float64).numpy()
                a2 = loaded[f"{t.name}.lora_A.weight"].to(torch.float64).numpy()
                err = rel(dense_update(f), s * (b2 @ a2))
                assert member.errors[j] == pytest.approx(err, rel=1e-6, abs=1e-12), (member.name, t.name)
                assert err <= options["max_error"] * (1 + 1e-9)
                # the dense update from the blobs, by §12.2 in numpy
                p = t.params
                k_out, k_in = p.ranks
                c = min(r, p.core_rank)
                lo, hi = offsets[t.name]
                codes = None
                if p.levels is not None:
                    before = sum(
                        quantize.packed_size(min(m.lora[t.name][0], p.core_rank) * (k_out + k_in), p.levels)
                        for m in manifest.members[:i]
                        if t.name in m.lora
                    )
                    size = quantize.packed_size(c * (k_out + k_in), p.levels)
                    codes = quantize.unpack(b.read_blob(p.codes)[before : before + size], p.levels, c * (k_out + k_in))
                core = numpy_core(coefs[lo:hi], codes, p.levels, c, k_out, k_in)
                u = dtypes.to_float(b.read_blob(p.left), coef_dtype)
                v = dtypes.to_float(b.read_blob(p.right), coef_dtype)
                want = (u @ core) @ v.T
                got = updates[t.name.removeprefix(PREFIX) + ".weight"].to(torch.float64).numpy()
                assert rel(want, got) <= (1e-6 if got.dtype == np.float32 else 1e-2), (member.name, t.name)


@pytest.mark.parametrize("case", list(CASES))
def test_spec_reader_decodes_it_bit_for_bit(populations, tmp_path, case) -> None:
    pop, options = CASES[case]
    path = tmp_path / "b.upk"
    merged(populations[pop], path, **options)
    sb = SpecBundle(path)
    assert sb.version == 11
    for member in _member_names(path):
        mine, theirs = sb.read_member(member), _unipack_numpy(path, member)
        assert list(mine) == list(theirs)
        for key, (dt, arr) in mine.items():
            assert dt == theirs[key][0]
            assert arr.tobytes() == np.ascontiguousarray(theirs[key][1]).tobytes(), (member, key)


def compressed(array: np.ndarray, dtype: str, level: int) -> int:
    stored, _, _ = codec.encode(dtypes.to_bytes(array, dtype), dtypes.itemsize(dtype), "zstd", level)
    return len(stored)


def factored_costs(
    fs: list[LoraFactors],
    bases: Any,
    ranks: tuple[int, int],
    coef_dtype: str,
    member_dtype: str,
    max_error: float,
    quantized: bool,
) -> dict[tuple[int, int | None], int]:
    """The chooser's candidates on these bases, priced by brute force, by (core rank, L or None):
    cast at the least core rank meeting the rule (every rank tried); quantized at every level
    count, at the full core rank and at the least whose cast cores meet 0.7 of the budget."""
    full = min(max(f.rank for f in fs), *ranks)

    cores = [AdapterCore(f, bases, member_dtype) for f in fs]

    def cast_at(rank: int) -> list[Any]:
        return [core.cast(rank, coef_dtype) for core in cores]

    def least(target: float) -> int | None:
        meets = [rank for rank in range(1, full + 1) if max(c.error for c in cast_at(rank)) <= target]
        return meets[0] if meets and meets[-1] == full else None

    costs: dict[tuple[int, int | None], int] = {}
    cast_rank = least(max_error)
    if cast_rank is not None:
        costs[(cast_rank, None)] = compressed(np.concatenate([c.block for c in cast_at(cast_rank)]), coef_dtype, 3)
    quant_ranks = {full, least(lora_merge.CORE_TRUNCATION * max_error) or full} if quantized else set()
    for rank in quant_ranks:
        for levels in LEVELS:
            fits = [FactoredSearch(core, rank, max_error, coef_dtype=coef_dtype).fit(levels) for core in cores]
            if any(q is None for q in fits):
                continue
            packed = np.concatenate([quantize.pack(q.codes, levels) for q in fits if q is not None])
            steps = np.concatenate([q.block for q in fits if q is not None])
            # the writer packs codes (U8) at zstd level 1 when the bundle's level is 3
            costs[(rank, levels)] = compressed(packed, "U8", 1) + compressed(steps, coef_dtype, 3)
    return costs


@pytest.mark.parametrize("case", list(CASES))
def test_the_chooser_picks_it_where_it_is_cheaper(populations, tmp_path, monkeypatch, case) -> None:
    """Brute force: at the record's ranks, its variant (cast, or the level count) is the cheapest
    of every variant that meets the rule, priced here from the adapters' files; and the bundle is
    smaller than the same merge without the form."""
    pop, options = CASES[case]
    dirs = populations[pop]
    path = tmp_path / "b.upk"
    result = merged(dirs, path, **options)
    coef_dtype = dtypes.STORAGE_DTYPES[options.get("dtype", "float32")]
    member_dtype = "BF16" if pop == "bf16" else "F32"
    max_error = options["max_error"]
    for t in result.manifest.tensors:
        if t.name not in MODULES:
            continue
        p = t.params
        fs = [adapter_factors(d, t.name) for d in dirs]
        if member_dtype == "BF16":  # the merge holds BF16 factors as they are: widened exactly
            fs = [LoraFactors(f.a.astype(np.float32), f.b.astype(np.float32), f.scale) for f in fs]
        model = fit(fs, *SHAPES[t.name])
        bases = stored_bases(model, *p.ranks, coef_dtype)
        bases_cost = compressed(bases.left_held, coef_dtype, 3) + compressed(bases.right_held, coef_dtype, 3)
        costs = factored_costs(fs, bases, p.ranks, coef_dtype, member_dtype, max_error, options.get("quantize", True))
        chosen = (p.core_rank, p.levels)
        assert chosen in costs, (t.name, chosen, costs)
        assert costs[chosen] == min(costs.values()), (t.name, chosen, costs)
        assert str(f"{bases_cost + costs[chosen]:,} B") in t.reason, (t.name, t.reason)
    for m in result.manifest.members:
        assert max(m.errors) <= max_error
    without_factored(monkeypatch)
    other = merged(dirs, tmp_path / "without.upk", **options)
    assert "subspace-factored" not in {t.form for t in other.manifest.tensors if t.storage == "lora"}
    assert path.stat().st_size < (tmp_path / "without.upk").stat().st_size


@pytest.mark.parametrize(
    "population, options",
    [
        ("subspace", {"max_error": 0.01, "quantize": False}),  # the dense cores are small: subspace wins
        ("random", {"max_error": 0.05}),  # independent adapters: their own factors, quantized
        ("subspace", {"rank": 4, "quantize": False}),  # not a max-error rule: the form is never priced
    ],
)
def test_where_it_is_not_cheaper_bundles_are_byte_identical(tmp_path, monkeypatch, population, options) -> None:
    """Where the form does not win, the bundle is byte for byte the one written without it (and
    keeps its version: 2, or 6 for quantized own factors)."""
    from test_lora_bundle import random_population
    from test_spec_reader import _subspace_population

    if population == "subspace":
        dirs = _subspace_population(tmp_path / "pop")
    else:
        dirs = [a.path for a in random_population(tmp_path / "pop", n=3, r=4)]
    with_form = merged(dirs, tmp_path / "with.upk", **options)
    assert with_form.manifest.format_version in (2, 6)
    assert "subspace-factored" not in {t.form for t in with_form.manifest.tensors if t.storage == "lora"}
    without_factored(monkeypatch)
    merged(dirs, tmp_path / "without.upk", **options)
    assert (tmp_path / "with.upk").read_bytes() == (tmp_path / "without.upk").read_bytes()


# --------------------------------------------------------------------------------------------
# unipack add
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["cast", "quant-f16"])
def test_add_joins_a_member_in_the_records_form(populations, tmp_path, case) -> None:
    """A new member of the family: its core on the record's bases, in the record's form (cast, or
    at the record's L with codes appended to the record's codes blob); old members rebuild bit for
    bit as before; its recorded error is its extracted factors' by dense numpy; the spec reader
    reads the grown bundle. An unrelated adapter cannot meet the rule: an override (version 11 kept)."""
    from test_spec_reader import _low_rank_factors, _write_adapter

    pop, options = CASES[case]
    dirs = populations[pop]
    path = tmp_path / "b.upk"
    merged(dirs[:-1], path, **options)
    old_names = _member_names(path)
    before = {m: _unipack_numpy(path, m) for m in old_names}
    with unipack.open(path) as b:
        old_codes = {
            t.name: b.read_blob(t.params.codes) for t in b.manifest.tensors if getattr(t.params, "codes", None)
        }

    result = unipack.add(path, dirs[-1])
    kinds = {o.tensor: o.kind for o in result.outcomes}
    assert [kinds[m] for m in MODULES] == ["projected"] * len(MODULES), kinds
    assert result.format_version == 11 and result.budget_met
    with unipack.open(path) as b:
        records = {t.name: t.params for t in b.manifest.tensors}
    for o in result.outcomes:
        if o.tensor in MODULES and records[o.tensor].levels is not None:
            # a level count of the merge's, no more than the record's and of its parity
            chosen = int(o.reason.split(" levels (codes in")[0].rsplit(" ", 1)[1])
            assert chosen in {*LEVELS, records[o.tensor].levels} and chosen <= records[o.tensor].levels, o.reason
            assert (records[o.tensor].levels - chosen) % 2 == 0
    with unipack.open(path) as b:
        manifest = b.manifest
        new = manifest.members[-1]
        assert new.added and not new.raw  # no override: every module in the record's form
        loaded = b.load(new.name)
        for j, t in enumerate(manifest.tensors):
            if t.name not in new.lora:
                continue
            f = adapter_factors(dirs[-1], t.name)
            b2 = loaded[f"{t.name}.lora_B.weight"].to(torch.float64).numpy()
            a2 = loaded[f"{t.name}.lora_A.weight"].to(torch.float64).numpy()
            err = rel(dense_update(f), f.scale * (b2 @ a2))
            assert new.errors[j] == pytest.approx(err, rel=1e-6, abs=1e-12)
            assert err <= options["max_error"] * (1 + 1e-9)
            if t.name in old_codes:  # the old members' codes stay first, as they were
                grown = b.read_blob(t.params.codes)
                assert np.array_equal(grown[: old_codes[t.name].size], old_codes[t.name])
                assert grown.size > old_codes[t.name].size
    for m in old_names:
        after = _unipack_numpy(path, m)
        assert all(after[k][1].tobytes() == before[m][k][1].tobytes() for k in before[m])
    sb = SpecBundle(path)
    for m in _member_names(path):
        mine, theirs = sb.read_member(m), _unipack_numpy(path, m)
        assert all(mine[k][1].tobytes() == np.ascontiguousarray(theirs[k][1]).tobytes() for k in mine)

    # An adapter outside the family's spaces: the record's form misses the rule, so an override.
    rng = np.random.default_rng(5)
    stranger = {
        m.removeprefix(PREFIX): _low_rank_factors(
            rng, rng.standard_normal((SHAPES[m][0], 4)), rng.standard_normal((SHAPES[m][1], 4)), 4, 0.0
        )
        for m in MODULES
    }
    other = _write_adapter(tmp_path / "stranger", stranger, 4, 8)
    result = unipack.add(path, other)
    kinds = {o.tensor: o.kind for o in result.outcomes}
    assert [kinds[m] for m in MODULES] == ["override"] * len(MODULES), kinds
    assert result.format_version == 11
    sb = SpecBundle(path)
    last = _member_names(path)[-1]
    mine, theirs = sb.read_member(last), _unipack_numpy(path, last)
    assert all(mine[k][1].tobytes() == np.ascontiguousarray(theirs[k][1]).tobytes() for k in mine)


def test_old_versions_still_read(tmp_path) -> None:
    """A bundle of an earlier version (2: subspace cores; 6: quantized own factors) reads as before
    with the version-11 reader: both readers agree bit for bit."""
    from test_lora_bundle import random_population
    from test_spec_reader import _subspace_population

    v2 = merged(_subspace_population(tmp_path / "sub"), tmp_path / "v2.upk", max_error=0.01, quantize=False)
    v6 = merged([a.path for a in random_population(tmp_path / "rnd", n=3, r=4)], tmp_path / "v6.upk", max_error=0.05)
    assert (v2.manifest.format_version, v6.manifest.format_version) == (2, 6)
    for path in (tmp_path / "v2.upk", tmp_path / "v6.upk"):
        sb = SpecBundle(path)
        for m in _member_names(path):
            mine, theirs = sb.read_member(m), _unipack_numpy(path, m)
            assert all(mine[k][1].tobytes() == np.ascontiguousarray(theirs[k][1]).tobytes() for k in mine)


# --------------------------------------------------------------------------------------------
# fuzz: damaged version-11 bundles
# --------------------------------------------------------------------------------------------


def test_fuzzed_factored_bundles_give_one_clear_error(populations, tmp_path) -> None:
    """``tools/fuzz_upk.py``'s mutator (bytes, header, manifest fields, blob checksums re-fixed so
    that decoding is reached) on a cast and a quantized subspace-factored bundle: every input is
    read, or refused with a UnipackError; no other exception, no hang."""
    import importlib.util
    import random
    import sys

    tool = Path(__file__).resolve().parent.parent / "tools" / "fuzz_upk.py"
    spec = importlib.util.spec_from_file_location("fuzz_upk", tool)
    assert spec is not None and spec.loader is not None
    fuzz_upk = sys.modules.get("fuzz_upk") or importlib.util.module_from_spec(spec)
    if "fuzz_upk" not in sys.modules:
        sys.modules["fuzz_upk"] = fuzz_upk
        spec.loader.exec_module(fuzz_upk)
    seeds = []
    for case, codec_name in (("cast", "none"), ("quant-f16", "zstd")):
        pop, options = CASES[case]
        out = tmp_path / f"{case}.upk"
        merged(populations[pop], out, codec=codec_name, **options)
        with unipack.open(out) as b:
            assert any(t.form == "subspace-factored" for t in b.manifest.tensors if t.storage == "lora")
        seeds.append((case, out.read_bytes()))
    mutator = fuzz_upk.Mutator(seeds, random.Random(1311))
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(200):
        data, seed_name, desc = mutator.mutate()
        outcome, exc, _ = fuzz_upk.run_one(data, str(tmp_path / "input.upk"))
        assert outcome in outcomes, (i, seed_name, desc, repr(exc))
        outcomes[outcome] += 1
    assert outcomes["rejected"] > 0


def test_the_form_is_invariant_to_the_factor_gauge(populations, tmp_path) -> None:
    """B A = (B M)(M⁻¹ A): the same updates in another gauge give the same records (ranks, core
    rank, level count) and the same extracted updates and errors."""
    from test_spec_reader import _write_adapter

    pop, options = CASES["quant-f16"]
    dirs = populations[pop]
    rng = np.random.default_rng(17)
    gauged = []
    for d in dirs:
        factors = {}
        for m in MODULES:
            f = adapter_factors(d, m)
            mat = np.linalg.qr(rng.standard_normal((f.rank, f.rank)))[0] @ np.diag(rng.uniform(0.5, 2.0, f.rank))
            factors[m.removeprefix(PREFIX)] = (np.linalg.solve(mat, f.a), f.b @ mat)
        gauged.append(_write_adapter(tmp_path / "gauged" / d.name, factors, 4, 8))
    first = merged(dirs, tmp_path / "o.upk", **options)
    second = merged(gauged, tmp_path / "g.upk", **options)

    def records(result: Any) -> list[Any]:
        return [(t.form, t.params.ranks, t.params.core_rank, t.params.levels) for t in result.manifest.tensors]

    assert records(first) == records(second)
    assert {t.form for t in first.manifest.tensors} == {"subspace-factored"}
    for m1, m2 in zip(first.manifest.members, second.manifest.members):
        np.testing.assert_allclose(m1.errors, m2.errors, rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("case", ["cast", "quant-f16"])
def test_fidelity_numbers_follow_section_12(populations, tmp_path, case) -> None:
    """§12.2 (informative): norms ‖ΔW‖, delta errors = errors, and the adapter's own truncated SVD
    at q = min(r, floor(m / (out + in))), m its block, its packed codes at the coefficient dtype's
    size and its 1/N of the bases; all by dense numpy."""
    pop, options = CASES[case]
    dirs = populations[pop]
    result = merged(dirs, tmp_path / "b.upk", baselines=True, **options)
    manifest = result.manifest
    itemsize = dtypes.itemsize(dtypes.STORAGE_DTYPES[options.get("dtype", "float32")])
    for j, t in enumerate(manifest.tensors):
        if t.name not in MODULES:
            continue
        p = t.params
        out_dim, in_dim = SHAPES[t.name]
        k_out, k_in = p.ranks
        touching = sum(t.name in m.lora for m in manifest.members)
        for m, d in zip(manifest.members, dirs):
            f = adapter_factors(d, t.name)
            delta = dense_update(f)
            c = min(f.rank, p.core_rank)
            n = c * (k_out + k_in)
            block = n if p.levels is None else 2 * c + quantize.packed_size(n, p.levels) / itemsize
            numbers = block + (out_dim * k_out + in_dim * k_in) / touching
            q = min(f.rank, math.floor(numbers / (out_dim + in_dim)))
            sigma = np.linalg.svd(delta, compute_uv=False)
            fid = m.fidelity
            assert fid is not None and fid.svd_ranks is not None and fid.svd_errors is not None
            assert fid.norms[j] == pytest.approx(float(np.linalg.norm(delta)), rel=1e-3)
            assert fid.delta_errors[j] == pytest.approx(m.errors[j], rel=1e-3, abs=1e-12)
            assert fid.svd_ranks[j] == q, (m.name, t.name)
            want = math.sqrt(float(np.sum(sigma[q:] ** 2))) / float(np.linalg.norm(sigma))
            assert fid.svd_errors[j] == pytest.approx(want, rel=1e-3, abs=1e-9)


def test_two_jobs_write_the_serial_bundle(populations, tmp_path) -> None:
    """The factored form's modules priced and written in forked workers: the same bytes."""
    pop, options = CASES["quant-f16"]
    merged(populations[pop], tmp_path / "one.upk", jobs=1, **options)
    merged(populations[pop], tmp_path / "two.upk", jobs=2, **options)
    assert (tmp_path / "one.upk").read_bytes() == (tmp_path / "two.upk").read_bytes()


def test_on_sketched_bases(populations, tmp_path, monkeypatch) -> None:
    """Bases sketched as for hundreds of adapters (they may miss part of each update): the factored
    cores' recorded errors are still their extracted factors' by dense numpy, within the rule."""
    from unipack.core import lora

    monkeypatch.setattr(lora, "SKETCH_FROM", 0)
    monkeypatch.setattr(lora, "OVERSAMPLE", 2)
    sketches = []
    sketch = lora._sketch
    monkeypatch.setattr(lora, "_sketch", lambda *args: sketches.append(1) or sketch(*args))
    pop, options = CASES["cast"]
    dirs = populations[pop]
    result = merged(dirs, tmp_path / "b.upk", jobs=1, **options)
    assert sketches
    assert "subspace-factored" in {t.form for t in result.manifest.tensors}
    with unipack.open(tmp_path / "b.upk") as b:
        for j, t in enumerate(b.manifest.tensors):
            for member, d in zip(b.manifest.members, dirs):
                if t.name not in member.lora:
                    continue
                loaded = b.load(member.name)
                f = adapter_factors(d, t.name)
                b2 = loaded[f"{t.name}.lora_B.weight"].to(torch.float64).numpy()
                a2 = loaded[f"{t.name}.lora_A.weight"].to(torch.float64).numpy()
                err = rel(dense_update(f), f.scale * (b2 @ a2))
                assert member.errors[j] == pytest.approx(err, rel=1e-6, abs=1e-12)
                assert err <= options["max_error"] * (1 + 1e-9)
