"""LoRA forms ``quant`` and ``cast`` (spec §10): each adapter's own factors at a few bits, or cast.

Every number is recomputed here with dense numpy in float64 from the adapters' files: the
balanced gauge, the factors a reader rebuilds from codes and steps (at every level count the
chooser tries), their errors on the product, the blobs' lengths, and the chooser's pick, which
is checked against every candidate priced by brute force.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as load_numpy
from test_lora_bundle import (
    INPUTS,
    SHAPES,
    Adapter,
    check_peft_round_trip,
    peft_outputs,
    peft_population,
    random_population,
    structured_population,
)

import unipack
from unipack.cli import cli
from unipack.core import lora_quant, quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_encode import product_error
from unipack.core.lora_quant import LEVELS, balanced, cast_factors, fit_quantized
from unipack.format import codec, dtypes
from unipack.pack import parallel
from unipack.sources.checkpoint import close_all, open_inputs

PREFIX = "base_model.model."


def dense_rel(delta: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(delta - approx) / np.linalg.norm(delta))


def random_factors(seed: int, out_dim: int = 48, in_dim: int = 40, r: int = 6) -> LoraFactors:
    """Factors with a spread spectrum in an arbitrary gauge (B scaled up, A down)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((out_dim, r)) * np.geomspace(3.0, 0.05, r) * 40.0
    a = rng.standard_normal((r, in_dim)) / 40.0
    return LoraFactors(a.astype(np.float32), b.astype(np.float32), 2.0)


def read_files(paths: list[Path]) -> list[dict[str, np.ndarray]]:
    return [load_numpy(str(p / "adapter_model.safetensors")) for p in paths]


# --------------------------------------------------------------------------------------------
# the arithmetic
# --------------------------------------------------------------------------------------------


def test_balanced_factors_keep_the_product_and_split_it_evenly() -> None:
    f = random_factors(0)
    a, b, sigma = balanced(f)
    np.testing.assert_allclose(b @ a, f.b @ f.a, rtol=0, atol=1e-12 * np.abs(f.b @ f.a).max())
    dense_sigma = np.linalg.svd(f.b.astype(np.float64) @ f.a.astype(np.float64), compute_uv=False)[: f.rank]
    np.testing.assert_allclose(sigma, dense_sigma, rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt(sigma), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.sqrt(sigma), rtol=1e-10)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("step_dtype, member_dtype", [("F32", "F32"), ("F16", "F32"), ("BF16", "BF16")])
def test_quantized_factors_rebuild_and_errors_by_dense_numpy(levels, step_dtype, member_dtype) -> None:
    """At every level count: the codes and steps a reader sees rebuild, by §10.2 in numpy, exactly
    the factors the merge measured, and their product's error is the recorded one, within budget."""
    f = random_factors(levels)
    if member_dtype == "BF16":
        a, b = (dtypes.to_float(dtypes.from_float(x, "BF16"), "BF16") for x in (f.a, f.b))
        f = LoraFactors(a, b, f.scale)
    budget = {3: 0.7, 5: 0.5, 7: 0.4, 15: 0.2, 31: 0.1}.get(levels, 0.05)
    q = fit_quantized(f, budget, levels=levels, step_dtype=step_dtype, member_dtype=member_dtype)
    assert q is not None, levels
    r, in_dim, out_dim = f.rank, f.in_dim, f.out_dim
    assert q.codes.shape == (r * (in_dim + out_dim),) and int(q.codes.max()) < levels
    steps = dtypes.to_float(q.steps_held, step_dtype)
    assert steps.shape == (2 * r,)
    # §10.2 step 1, independently: value t of A row j uses a_j, of B column j uses b_j
    qv = q.codes.astype(np.float64) - (levels - 1) / 2
    a = qv[: r * in_dim].reshape(r, in_dim) * steps[:r, None]
    b = (qv[r * in_dim :].reshape(r, out_dim) * steps[r:, None]).T
    a = dtypes.to_float(dtypes.from_float(a, member_dtype), member_dtype)
    b = dtypes.to_float(dtypes.from_float(b, member_dtype), member_dtype)
    assert np.array_equal(a, q.a) and np.array_equal(b, q.b)
    delta = f.scale * (f.b @ f.a)
    err = dense_rel(delta, f.scale * (b @ a))
    assert err == pytest.approx(q.error, rel=1e-9)
    assert err <= budget
    # the search uses the budget rather than the finest steps: at least half of it is spent
    assert err > 0.5 * budget
    # packed as §8.1 says: ceil(n / k) bytes, unpacked back to the same codes
    k = quantize.per_byte(levels)
    packed = quantize.pack(q.codes, levels)
    assert packed.size == math.ceil(q.codes.size / k)
    digits = np.stack([(packed.astype(np.int64) // levels**i) % levels for i in range(k)], axis=1).reshape(-1)
    assert np.array_equal(digits[: q.codes.size], q.codes)


@pytest.mark.parametrize("levels", [3, 5, 15, 16, 31])
def test_codes_kept_packed_are_the_codes_packed_as_written(levels: int) -> None:
    """A large collection keeps each adapter's winning codes packed (``stored_packed``): the same
    bytes ``quantize.pack`` gives the unpacked codes, checked against numpy's base-L digits."""
    f = random_factors(levels + 100)
    q = fit_quantized(f, 0.9, levels=levels, step_dtype="F16", member_dtype="F32")
    assert q is not None
    kept = q.stored_packed(levels)
    assert kept.a is None and kept.b is None and kept.code_count == q.codes.size == q.code_count
    np.testing.assert_array_equal(kept.packed(levels), quantize.pack(q.codes, levels))
    np.testing.assert_array_equal(q.packed(levels), quantize.pack(q.codes, levels))
    assert kept.codes.nbytes == quantize.packed_size(q.codes.size, levels) < q.codes.nbytes or levels > 15
    # numpy: k codes a byte, the first code the lowest digit (spec 8.1), zero-padded at the end
    k = quantize.per_byte(levels)
    digits = np.zeros(-(-q.codes.size // k) * k, dtype=np.int64)
    digits[: q.codes.size] = q.codes
    expected = (digits.reshape(-1, k) * levels ** np.arange(k)).sum(axis=1)
    np.testing.assert_array_equal(kept.codes.astype(np.int64), expected)
    with pytest.raises(AssertionError):
        kept.packed(levels + 2)


@pytest.mark.parametrize(
    "out_dim, in_dim, r, rank_deficient", [(48, 40, 6, False), (30, 70, 8, True), (5, 64, 8, False)]
)
def test_product_svd_error_is_the_dense_error(out_dim, in_dim, r, rank_deficient) -> None:
    """``ProductSvd.error`` (the search's error, from r x r products) of approximations of the
    balanced factors, as the search makes them (zero rows stay zero), is the dense error of the
    product, and ``product_error``'s (two QRs), from near-exact approximations to coarse ones;
    rank-deficient updates and out < r included. (At relative noise ε both lose ~1e-16/ε of
    accuracy to the float64 inputs: the tolerance follows it.)"""
    f = random_factors(11, out_dim=out_dim, in_dim=in_dim, r=r)
    if rank_deficient:  # two columns of B repeat others: rank r - 2
        b = f.b.copy()
        b[:, -2:] = b[:, :2]
        f = LoraFactors(f.a, b, f.scale)
    a0, b0, _, product = lora_quant._balanced_svd(f)
    delta = f.update()
    rng = np.random.default_rng(3)
    for noise in (1e-9, 1e-5, 1e-2, 0.5):
        a = a0 * (1 + noise * rng.standard_normal(a0.shape))
        b = b0 * (1 + noise * rng.standard_normal(b0.shape))
        got = product.error(a, b)
        rel = 1e-13 / noise
        assert got == pytest.approx(dense_rel(delta, f.scale * (b @ a)), rel=max(rel, 1e-9)), noise
        assert got == pytest.approx(product_error(f, LoraFactors(a, b, f.scale)), rel=rel), noise
    assert product.error(a0, b0) < 1e-14


def test_fewer_levels_cannot_meet_a_tight_budget() -> None:
    f = random_factors(3)
    assert fit_quantized(f, 0.02, levels=3, step_dtype="F32", member_dtype="F32") is None
    assert fit_quantized(f, 0.02, levels=255, step_dtype="F32", member_dtype="F32") is not None


def test_cast_factors_are_the_balanced_ones_rounded() -> None:
    f = random_factors(1)
    c = cast_factors(f, "F16", "F32")
    a, b, _ = balanced(f)
    want = np.concatenate([a.reshape(-1), b.T.reshape(-1)]).astype(np.float16)
    assert np.array_equal(c.values_held, want)
    np.testing.assert_array_equal(c.a, want[: a.size].astype(np.float64).reshape(a.shape))
    assert c.error == pytest.approx(dense_rel(f.update(), f.scale * (c.b @ c.a)), rel=1e-9)
    assert 0 < c.error < 2e-3


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------


def merged(adapters: list[Adapter], out: Path, **options: Any) -> Any:
    return unipack.merge([a.path for a in adapters], out, **options)


def compressed(array: np.ndarray, dtype: str, level: int = 3) -> int:
    stored, _, _ = codec.encode(dtypes.to_bytes(array, dtype), dtypes.itemsize(dtype), "zstd", level)
    return len(stored)


def brute_force_costs(
    adapters: list[Adapter], module: str, max_error: float, coef_dtype: str, level_for_u8: int
) -> dict[str, int]:
    """Every own-factor candidate of one module, priced at its compressed bytes: exact, cast, quant@L."""
    files = read_files([a.path for a in adapters])
    key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    fs = [LoraFactors(f[key_a], f[key_b], a.modules[module][2]) for f, a in zip(files, adapters)]
    costs = {"exact": sum(compressed(f[key], "F32") for f in files for key in (key_a, key_b))}
    if dtypes.itemsize(coef_dtype) < 4:
        casts = [cast_factors(f, coef_dtype, "F32") for f in fs]
        if max(c.error for c in casts) <= max_error:
            costs["cast"] = compressed(np.concatenate([c.values_held for c in casts]), coef_dtype)
    for levels in LEVELS:
        qs = [fit_quantized(f, max_error, levels=levels, step_dtype=coef_dtype, member_dtype="F32") for f in fs]
        if any(q is None for q in qs):
            continue
        codes = quantize.pack(np.concatenate([q.codes for q in qs if q is not None]), levels)
        steps = np.concatenate([q.steps_held for q in qs if q is not None])
        costs[f"quant{levels}"] = compressed(codes, "U8", level_for_u8) + compressed(steps, coef_dtype)
    return costs


@pytest.mark.parametrize("max_error, dtype", [(0.05, "float32"), (0.2, "float16"), (0.004, "float16")])
def test_chooser_picks_the_cheapest_own_factor_form(tmp_path, max_error, dtype) -> None:
    """Independent random factors (no shared subspace can pay): the chosen form is the cheapest of
    exact / cast / quant at every L, priced by brute force, and its errors are within the rule."""
    adapters = random_population(tmp_path / "rnd", n=3, r=4)
    result = merged(adapters, tmp_path / "b.upk", max_error=max_error, dtype=dtype)
    coef_dtype = dtypes.STORAGE_DTYPES[dtype]
    for t in result.manifest.tensors:
        if t.storage != "lora":
            continue
        # the writer packs codes (U8) at zstd level 1 when the bundle's level is 3 (the default)
        costs = brute_force_costs(adapters, t.name, max_error, coef_dtype, level_for_u8=1)
        cheapest = min(costs, key=lambda k: costs[k])
        chosen = {"factors": "exact", "cast": "cast"}.get(t.form, f"quant{getattr(t.params, 'levels', 0)}")
        assert costs[chosen] == costs[cheapest], (t.name, chosen, costs)
    for m in result.manifest.members:
        assert max(m.errors) <= max_error


def test_large_collections_price_level_counts_adapter_by_adapter(tmp_path, monkeypatch) -> None:
    """From ``PRICED_APART_FROM`` adapters on, a module's level count is the one whose codes and
    steps, compressed adapter by adapter, sum to the fewest bytes (by brute force here), and its
    record's codes are those of that level count's fits: serially and in two workers alike."""
    from unipack.pack import lora as lora_merge

    monkeypatch.setattr(lora_merge, "PRICED_APART_FROM", 2)
    calls = []
    apart_pricing = lora_merge.Pricing._quant_priced_apart

    def counted(self: Any, *args: Any) -> Any:
        calls.append(1)
        return apart_pricing(self, *args)

    monkeypatch.setattr(lora_merge.Pricing, "_quant_priced_apart", counted)
    adapters = random_population(tmp_path / "rnd", n=4, r=4)
    max_error = 0.05
    result = merged(adapters, tmp_path / "b.upk", max_error=max_error, jobs=1)
    assert calls  # this path priced the modules
    files = read_files([a.path for a in adapters])
    quantized = [t for t in result.manifest.tensors if t.storage == "lora" and t.form == "quant"]
    assert quantized  # independent random factors: no subspace pays, quantized factors do
    for t in quantized:
        key_a, key_b = f"{t.name}.lora_A.weight", f"{t.name}.lora_B.weight"
        fs = [LoraFactors(f[key_a], f[key_b], a.modules[t.name][2]) for f, a in zip(files, adapters)]
        apart = {}
        for levels in LEVELS:
            qs = [fit_quantized(f, max_error, levels=levels, step_dtype="F32", member_dtype="F32") for f in fs]
            if all(q is not None for q in qs):
                apart[levels] = sum(
                    compressed(quantize.pack(q.codes, levels), "U8", 1) + compressed(q.steps_held, "F32")
                    for q in qs
                    if q is not None
                )
        best = min(sorted(apart, reverse=True), key=lambda n: apart[n])
        assert t.params.levels == best, (t.name, apart)
        with unipack.open(tmp_path / "b.upk") as b:
            stored = b.read_blob(t.params.codes)
        qs = [fit_quantized(f, max_error, levels=best, step_dtype="F32", member_dtype="F32") for f in fs]
        expected = np.concatenate([quantize.pack(q.codes, best) for q in qs if q is not None])
        assert np.array_equal(stored, expected)
    for m in result.manifest.members:
        assert max(m.errors) <= max_error
    merged(adapters, tmp_path / "two.upk", max_error=max_error, jobs=2)
    assert (tmp_path / "b.upk").read_bytes() == (tmp_path / "two.upk").read_bytes()


def test_blob_lengths_follow_section_10(tmp_path) -> None:
    """Per member: 2r steps per quant module in its coefficient blob; per module: one U8 codes blob
    of ceil(r (in + out) / k) bytes per touching member, in member order."""
    adapters = structured_population(tmp_path / "p", n=4, noise=0.3, seed=3, ranks=[8, 4])
    result = merged(adapters, tmp_path / "b.upk", max_error=0.1)
    manifest = result.manifest
    forms = {t.name: t.form for t in manifest.tensors if t.storage == "lora"}
    assert set(forms.values()) == {"quant"}, forms
    for m in manifest.members:
        steps = sum(2 * m.lora[t.name][0] for t in manifest.tensors if t.storage == "lora" and t.name in m.lora)
        assert manifest.blobs[m.coefficients].shape == (steps,)
        assert m.codes is None  # a member's own codes blob is for delta tensors only
    files = read_files([a.path for a in adapters])
    with unipack.open(tmp_path / "b.upk") as b:
        for t in manifest.tensors:
            if t.storage != "lora":
                continue
            levels, k = t.params.levels, quantize.per_byte(t.params.levels)
            sizes = [math.ceil(m.lora[t.name][0] * sum(t.shape) / k) for m in manifest.members]
            blob = manifest.blobs[t.params.codes]
            assert blob.dtype == "U8" and blob.shape == (sum(sizes),)
            # every member's slice rebuilds its factors (independently of unipack's reader)
            packed = b.read_blob(t.params.codes).astype(np.int64)
            for i, (m, a, f) in enumerate(zip(manifest.members, adapters, files)):
                lo = sum(sizes[:i])
                digits = np.stack([(packed[lo : lo + sizes[i]] // levels**j) % levels for j in range(k)], axis=1)
                r = m.lora[t.name][0]
                out_dim, in_dim = t.shape
                q = digits.reshape(-1)[: r * (in_dim + out_dim)] - (levels - 1) / 2
                lo_c, _ = manifest.coef_offsets(m)[t.name]
                steps_i = b.read_blob(m.coefficients)[lo_c : lo_c + 2 * r].astype(np.float64)
                a_q = (q[: r * in_dim].reshape(r, in_dim) * steps_i[:r, None]).astype(np.float32)
                b_q = (q[r * in_dim :].reshape(r, out_dim) * steps_i[r:, None]).T.astype(np.float32)
                loaded = b.load(m.name)
                assert np.array_equal(loaded[f"{t.name}.lora_A.weight"].numpy(), a_q)
                assert np.array_equal(loaded[f"{t.name}.lora_B.weight"].numpy(), b_q)
                s = a.modules[t.name.removeprefix(PREFIX)][2] if t.name.removeprefix(PREFIX) in a.modules else None
                s = m.lora[t.name][1] if s is None else s
                ka, kb = f"{t.name}.lora_A.weight", f"{t.name}.lora_B.weight"
                delta = s * (f[kb].astype(np.float64) @ f[ka])
                err = dense_rel(delta, s * (b_q.astype(np.float64) @ a_q))
                assert err == pytest.approx(m.errors[manifest.tensors.index(t)], rel=1e-5, abs=1e-9)
                assert err <= 0.1
    assert manifest.format_version == 6


def test_dtype_float16_applies_to_factors_kept_unquantized(tmp_path) -> None:
    """The issue's defect: with --dtype float16 and no quantization, factors that no subspace pays
    for are stored cast to F16 (half the bytes), not at the adapters' F32."""
    adapters = random_population(tmp_path / "rnd", n=3, r=4)
    exact = merged(adapters, tmp_path / "f32.upk", max_error=0.01, quantize=False)
    half = merged(adapters, tmp_path / "f16.upk", max_error=0.01, quantize=False, dtype="float16")
    assert {t.form for t in exact.manifest.tensors if t.storage == "lora"} == {"factors"}
    assert {t.form for t in half.manifest.tensors if t.storage == "lora"} == {"cast"}
    assert half.manifest.blobs[half.manifest.members[0].coefficients].dtype == "F16"
    lora_bytes = {
        path: sum(b.nbytes for name, b in unipack.open(tmp_path / path).manifest.blobs.items() if "head" not in name)
        for path in ("f32.upk", "f16.upk")
    }
    assert lora_bytes["f16.upk"] * 2 == pytest.approx(lora_bytes["f32.upk"], rel=0.02)
    files = read_files([a.path for a in adapters])
    with unipack.open(tmp_path / "f16.upk") as b:
        for a, f in zip(adapters, files):
            loaded = b.load(a.name)
            for module in (PREFIX + m for m in SHAPES):
                ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
                got_a, got_b = loaded[ka].numpy(), loaded[kb].numpy()
                assert got_a.dtype == np.float32  # the adapter's own dtype, with F16 values
                assert np.array_equal(got_a.astype(np.float16).astype(np.float32), got_a)
                s = a.modules[module][2]
                err = dense_rel(s * (f[kb].astype(np.float64) @ f[ka]), s * (got_b.astype(np.float64) @ got_a))
                assert 0 < err < 2e-3


def test_no_quantize_keeps_version_2(tmp_path) -> None:
    adapters = random_population(tmp_path / "rnd", n=3, r=4)
    plain = merged(adapters, tmp_path / "a.upk", max_error=0.1, quantize=False)
    quant = merged(adapters, tmp_path / "b.upk", max_error=0.1)
    assert plain.manifest.format_version == 2 and quant.manifest.format_version == 6
    assert {t.form for t in quant.manifest.tensors if t.storage == "lora"} == {"quant"}
    assert (tmp_path / "b.upk").stat().st_size < 0.5 * (tmp_path / "a.upk").stat().st_size


def test_extracted_quantized_adapters_load_in_peft(tmp_path) -> None:
    adapters, models = peft_population(
        tmp_path / "peft",
        [{"modules_to_save": ["head"]}, {"modules_to_save": ["head"], "r": 8, "lora_alpha": 4}],
    )
    result = merged(adapters, tmp_path / "b.upk", max_error=0.05)
    assert {t.form for t in result.manifest.tensors if t.storage == "lora"} == {"quant"}
    check_peft_round_trip(adapters, tmp_path / "b.upk", tmp_path / "out", original_atol=None)
    for a, model in zip(adapters, models):
        with torch.no_grad():
            want = model(INPUTS)
        got = peft_outputs(tmp_path / "out" / a.name)
        # two adapted layers, each update within 5%: the outputs move by about as much, not more
        assert float((got - want).norm() / want.norm()) < 0.1


def test_cli_merge_extract_quantized(tmp_path) -> None:
    adapters = random_population(tmp_path / "rnd", n=3, r=4)
    runner = CliRunner()
    out = tmp_path / "b.upk"
    result = runner.invoke(cli, ["merge", *[str(a.path) for a in adapters], "-o", str(out), "--max-error", "0.1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["info", str(out)])
    assert result.exit_code == 0 and "lora/quant" in result.output, result.output
    result = runner.invoke(
        cli, ["extract", str(out), "--member", adapters[0].name, "--format", "peft", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# speed: one search across level counts, modules in worker processes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_error, step_dtype", [(0.05, "F32"), (0.3, "F16"), (0.6, "BF16")])
def test_one_search_across_level_counts_finds_what_each_finds_alone(monkeypatch, max_error, step_dtype) -> None:
    """``QuantSearch`` reuses quantizations between level counts: at every L it returns, bit for
    bit, what a search at that L alone returns, whose factors dense numpy rebuilds from codes and
    steps (§10.2) with the recorded error; and it quantizes fewer times than the searches alone."""
    f = random_factors(7, out_dim=96, in_dim=80, r=8)
    calls = {"n": 0}
    real = lora_quant.quantize_at

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_quant, "quantize_at", counted)
    shared = lora_quant.QuantSearch(f, step_dtype=step_dtype, member_dtype="F32")
    together: dict[int, Any] = {}
    for levels in sorted(LEVELS, reverse=True):
        together[levels] = shared.fit(max_error, levels) if shared.floor_meets(max_error, levels) else None
    shared_calls, calls["n"] = calls["n"], 0
    delta = f.update()
    for levels, q in together.items():
        alone = fit_quantized(f, max_error, levels=levels, step_dtype=step_dtype, member_dtype="F32")
        if q is None or alone is None:
            assert q is None and alone is None, levels
            continue
        assert np.array_equal(q.codes, alone.codes) and np.array_equal(q.steps_held, alone.steps_held), levels
        assert np.array_equal(q.a, alone.a) and np.array_equal(q.b, alone.b) and q.error == alone.error
        kept = q.stored_only()  # what the chooser holds per level count: no float64 factors
        assert kept.a is None and kept.b is None and kept.codes is q.codes and kept.error == q.error
        assert int(q.codes.max()) < levels
        steps = dtypes.to_float(q.steps_held, step_dtype)
        qv = q.codes.astype(np.float64) - (levels - 1) / 2
        a = qv[: f.rank * f.in_dim].reshape(f.rank, f.in_dim) * steps[: f.rank, None]
        b = (qv[f.rank * f.in_dim :].reshape(f.rank, f.out_dim) * steps[f.rank :, None]).T
        a, b = (dtypes.to_float(dtypes.from_float(x, "F32"), "F32") for x in (a, b))
        assert dense_rel(delta, f.scale * (b @ a)) == pytest.approx(q.error, rel=1e-9)
        assert q.error <= max_error
    assert any(q is not None for q in together.values())
    assert shared_calls < calls["n"], (shared_calls, calls["n"])


@pytest.mark.parametrize("options", [{"max_error": 0.1, "lossless": "full"}, {"max_error": 0.3, "dtype": "float16"}])
def test_lora_modules_in_two_jobs_write_the_serial_bundle(tmp_path, options) -> None:
    """Modules fitted in forked workers (and the zstd -19 baseline beside them) give the serial
    merge's bundle byte for byte."""
    adapters = structured_population(tmp_path / "p", n=4, noise=0.3, seed=5, ranks=[8, 4])
    serial = merged(adapters, tmp_path / "serial.upk", jobs=1, **options)
    forked = merged(adapters, tmp_path / "forked.upk", jobs=2, **options)
    assert (tmp_path / "serial.upk").read_bytes() == (tmp_path / "forked.upk").read_bytes()
    assert forked.manifest.members[0].lora == serial.manifest.members[0].lora


def test_lora_adapters_are_forked_from_a_few_mib(tmp_path) -> None:
    """PEFT adapters in safetensors are read with pread (fork-safe); the automatic job count
    forks from ``LORA_PARALLEL_FROM_BYTES`` of adapters, not the dense 64 MiB."""
    adapters = structured_population(tmp_path / "p", n=3, noise=0.3, seed=6, ranks=[4])
    checkpoints = open_inputs([a.path for a in adapters], None)
    try:
        assert all(c.fork_safe for c in checkpoints)
        size = sum(c.file_size for c in checkpoints)
        assert parallel.effective_jobs(None, checkpoints, 8, from_bytes=size + 1) == 1
        assert parallel.effective_jobs(None, checkpoints, 8, from_bytes=size) == min(parallel.default_jobs(), 8)
        assert parallel.effective_jobs(2, checkpoints, 8, from_bytes=size + 1) == 2
    finally:
        close_all(checkpoints)
    assert parallel.LORA_PARALLEL_FROM_BYTES < parallel.PARALLEL_FROM_BYTES
