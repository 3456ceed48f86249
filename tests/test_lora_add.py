"""``unipack add`` on bundles of LoRA adapters (spec §7.4): a new PEFT adapter joins as a member.

Every number is recomputed here from the adapter files with dense numpy in float64: the added
member's update s·B·A against what extraction returns (within the bundle's rule), the chosen
level count against every candidate priced by brute force, the old members bit for bit before
and after, and the grown bundle through the independent spec reader (``test_spec_reader``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_one_line_error, run
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from test_lora_bundle import (
    MODULES,
    PREFIX,
    SHAPES,
    Adapter,
    head_extras,
    random_population,
    structured_population,
    write_adapter,
)
from test_spec_reader import SpecBundle, SpecFormatError, _rewrite

import unipack
from unipack import InputError
from unipack.core import quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_quant import LEVELS, fit_quantized
from unipack.format import codec, dtypes


def members_numpy(path: Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """Every member's tensors as unipack loads them (dtype name, array as stored)."""
    with unipack.open(path) as b:
        return {m: {k: (str(dt), np.asarray(a).copy()) for k, (dt, a) in b.load_numpy(m).items()} for m in b.members}


def update_of(tensors: dict[str, tuple[str, np.ndarray]], module: str, scale: float) -> np.ndarray:
    """s B A in float64 from a member's loaded factors."""
    (da, a), (db, b) = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    return scale * (dtypes.to_float(b, db) @ dtypes.to_float(a, da))


def rel(w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def assert_old_members_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for member, tensors in before.items():
        assert set(after[member]) == set(tensors), member
        for key, (dt, arr) in tensors.items():
            assert after[member][key][0] == dt and np.array_equal(after[member][key][1], arr), (member, key)


def assert_spec_reader_agrees(path: Path) -> SpecBundle:
    """The independent reader decodes every member of the grown bundle as unipack does, bit for bit."""
    sb = SpecBundle(path)
    for member, tensors in members_numpy(path).items():
        mine = sb.read_member(member)
        assert set(mine) == set(tensors), member
        for key, (dt, arr) in mine.items():
            assert tensors[key][0] == dt and np.array_equal(tensors[key][1], arr), (member, key)
    return sb


def check_added(path: Path, adapter: Adapter, max_error: float, *, exact: set[str] = frozenset()) -> dict[str, Any]:
    """The added member's every module within the rule of s·B·A from its files (bit-exact where
    stored as its factors), its heads bit-exact, its recorded errors those measured here."""
    loaded = members_numpy(path)[adapter.name]
    with unipack.open(path) as b:
        manifest = b.manifest
    member = manifest.member(adapter.name)
    index = {t.name: j for j, t in enumerate(manifest.tensors)}
    for module, (a, bb, s) in adapter.modules.items():
        assert member.lora[module] == (a.shape[0], pytest.approx(s, rel=1e-15))
        err = rel(adapter.update(module), update_of(loaded, module, s))
        assert err <= max_error + 1e-12, (module, err)
        assert member.errors[index[module]] == pytest.approx(err, rel=1e-6, abs=1e-12), module
        if module in exact:
            assert np.array_equal(loaded[f"{module}.lora_A.weight"][1], a)
            assert np.array_equal(loaded[f"{module}.lora_B.weight"][1], bb)
    for key, value in adapter.extras.items():
        assert np.array_equal(loaded[key][1], value)
    return {m: member.errors[index[m]] for m in adapter.modules}


def factors(rng: np.random.Generator, r: int, in_dim: int, out_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (A, B) of rank r, float32."""
    return rng.standard_normal((r, in_dim)).astype(np.float32), rng.standard_normal((out_dim, r)).astype(np.float32)


def outcome_kinds(result: Any) -> dict[str, str]:
    return {o.tensor: o.kind for o in result.outcomes}


# --------------------------------------------------------------------------------------------
# the record's own form, or the member's exact factors
# --------------------------------------------------------------------------------------------


def test_subspace_projection_and_override(tmp_path) -> None:
    """A member of the family projects onto the stored bases within the rule; an unrelated one
    cannot, and is kept as its exact factors (an override, version 8). Old members never change."""
    family = structured_population(tmp_path / "fam", n=6, k=3, noise=0.0, seed=2)
    bundle = tmp_path / "b.upk"
    merged = unipack.merge([a.path for a in family[:5]], bundle, max_error=0.05, quantize=False)
    assert {t.form for t in merged.manifest.tensors if t.storage == "lora"} == {"subspace"}
    assert merged.manifest.format_version == 2
    before = members_numpy(bundle)

    result = unipack.add(bundle, family[5].path)
    assert set(outcome_kinds(result).values()) == {"projected", "raw"}
    assert result.format_version == 2 and result.budget_met
    errors = check_added(bundle, family[5], 0.05)
    assert max(errors.values()) < 1e-5  # the family's updates lie in the stored spaces
    assert_old_members_unchanged(before, members_numpy(bundle))

    stranger = random_population(tmp_path / "rnd", n=1, r=4, seed=9)[0]
    stranger = write_adapter(
        tmp_path / "stranger",
        {m.removeprefix(PREFIX): stranger.modules[m][:2] for m in MODULES},
        r=4,
        alpha=8,
        extras=head_extras(np.random.default_rng(3)),
    )
    before = members_numpy(bundle)
    printed = run("add", bundle, stranger.path, "--json")
    assert printed.exit_code == 0, printed.output
    grown = json.loads(printed.output)
    kinds = {o["tensor"]: o["kind"] for o in grown["outcomes"]}
    assert [kinds[m] for m in MODULES] == ["override"] * len(MODULES)
    assert not grown["budget_met"] and grown["format_version"] == 8
    assert grown["over_budget"] == MODULES
    factor_bytes = sum(a.nbytes + b.nbytes for a, b, _ in stranger.modules.values())
    assert 0 < grown["over_budget_bytes"] <= factor_bytes  # both factor blobs, as stored
    check_added(bundle, stranger, 0.05, exact=set(MODULES))
    assert_old_members_unchanged(before, members_numpy(bundle))
    sb = assert_spec_reader_agrees(bundle)
    assert sb.version == 8 and sb.lora_overrides[stranger.name] == set(MODULES)
    # the override is the member's own factors in its raw map; it has no core for those modules
    with unipack.open(bundle) as b:
        rec = b.member(stranger.name)
        assert set(rec.raw) >= {f"{m}.lora_{x}.weight" for m in MODULES for x in "AB"}
        assert rec.coefficients is None


def set_version(version: int):  # noqa: ANN201 - a header edit for ``_rewrite``
    def edit(header: dict[str, Any]) -> None:
        header["__metadata__"]["format_version"] = str(version)

    return edit


@pytest.mark.parametrize("case", ["version-6", "b-key-missing"])
def test_overrides_are_checked_by_both_readers(tmp_path, case) -> None:
    """§7.4/§7.3: an override needs version 8 and both factor blobs; both readers refuse otherwise."""
    family = structured_population(tmp_path / "fam", n=3, k=3, seed=2)
    bundle = tmp_path / "b.upk"
    unipack.merge([a.path for a in family], bundle, max_error=0.05, quantize=False)
    rng = np.random.default_rng(1)
    stranger = write_adapter(
        tmp_path / "stranger",
        {m: factors(rng, 4, inn, out) for m, (out, inn) in SHAPES.items()},
        r=4,
        alpha=8,
        extras=head_extras(rng),
    )
    assert unipack.add(bundle, stranger.path).format_version == 8
    bad = tmp_path / "bad.upk"
    if case == "version-6":

        def edit(m: dict[str, Any]) -> None:
            m["format_version"] = 6

        _rewrite(bundle, bad, edit_header=set_version(6), edit_manifest=edit)
    else:

        def edit(m: dict[str, Any]) -> None:
            m["members"][-1]["raw"].pop(f"{MODULES[0]}.lora_B.weight")

        _rewrite(bundle, bad, edit_manifest=edit)
    with pytest.raises(SpecFormatError):
        SpecBundle(bad).read_member("stranger")
    with pytest.raises(unipack.FormatError), unipack.open(bad) as b:
        b.load_numpy("stranger")


def compressed(array: np.ndarray, dtype: str, level: int) -> int:
    stored, _, _ = codec.encode(dtypes.to_bytes(array, dtype), dtypes.itemsize(dtype), "zstd", level)
    return len(stored)


def test_quant_member_at_the_cheapest_level_count_and_codes_appended(tmp_path) -> None:
    """In a ``quant`` record the new member's factors are quantized at the cheapest level count (of
    the chooser's, no more than the record's L) meeting the rule, priced here by brute force; its
    codes, in the record's alphabet, are appended to the record's codes blob after the old bytes."""
    adapters = structured_population(tmp_path / "p", n=5, noise=0.3, seed=3, ranks=[8, 4])
    bundle = tmp_path / "b.upk"
    merged = unipack.merge([a.path for a in adapters[:4]], bundle, max_error=0.1)
    records = {t.name: t for t in merged.manifest.tensors if t.storage == "lora"}
    assert {t.form for t in records.values()} == {"quant"}
    before = members_numpy(bundle)
    with unipack.open(bundle) as b:
        old_codes = {m: b.read_blob(t.params.codes) for m, t in records.items()}

    result = unipack.add(bundle, adapters[4].path)
    new = adapters[4]
    check_added(bundle, new, 0.1)
    assert_old_members_unchanged(before, members_numpy(bundle))
    sb = assert_spec_reader_agrees(bundle)
    assert sb.version == 6
    files = load_numpy(str(new.path / "adapter_model.safetensors"))
    with unipack.open(bundle) as b:
        manifest = b.manifest
        for module, t in records.items():
            now = {x.name: x for x in manifest.tensors}[module]
            assert now.params.levels == t.params.levels and now.params.codes == t.params.codes
            codes = b.read_blob(now.params.codes)
            assert np.array_equal(codes[: old_codes[module].size], old_codes[module])
            levels = t.params.levels
            key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            f = LoraFactors(files[key_a], files[key_b], new.modules[module][2])
            # brute force: every level count the record's alphabet holds, and the exact factors
            costs = {"exact": compressed(files[key_a], "F32", 3) + compressed(files[key_b], "F32", 3)}
            for n in LEVELS:
                if n > levels or (levels - n) % 2:
                    continue
                q = fit_quantized(f, 0.1, levels=n, step_dtype="F32", member_dtype="F32")
                if q is None:
                    continue
                shifted = q.codes.astype(np.int64) + (levels - n) // 2
                packed = quantize.pack(shifted.astype(np.uint8), levels)
                costs[f"quant{n}"] = compressed(packed, "U8", 1) + compressed(q.steps_held, "F32", 3)
            best = min(costs, key=lambda k: costs[k])
            kind = outcome_kinds(result)[module]
            if best == "exact":
                assert kind == "override", (module, costs)
                assert codes.size == old_codes[module].size
            else:
                assert kind == "quantized", (module, costs)
                assert (
                    f"at {best.removeprefix('quant')} levels" in {o.tensor: o.reason for o in result.outcomes}[module]
                )
                r = f.rank
                assert codes.size == old_codes[module].size + quantize.packed_size(r * sum(t.shape), levels)


def test_cast_and_factors_records(tmp_path) -> None:
    """``cast`` records take the new member's balanced factors at the coefficient dtype (F16);
    ``factors`` records its own factors, bit-exact, under their keys."""
    adapters = random_population(tmp_path / "rnd", n=4, r=4, seed=5)
    cast = tmp_path / "cast.upk"
    merged = unipack.merge([a.path for a in adapters[:3]], cast, max_error=0.01, dtype="float16", quantize=False)
    assert {t.form for t in merged.manifest.tensors if t.storage == "lora"} == {"cast"}
    before = members_numpy(cast)
    result = unipack.add(cast, adapters[3].path)
    assert set(outcome_kinds(result).values()) == {"cast"}
    errors = check_added(cast, adapters[3], 0.01)
    assert 0 < max(errors.values()) < 2e-3  # F16 rounding only
    assert_old_members_unchanged(before, members_numpy(cast))
    assert_spec_reader_agrees(cast)

    exact = tmp_path / "exact.upk"
    merged = unipack.merge([a.path for a in adapters[:3]], exact, max_error=0.01, quantize=False)
    assert {t.form for t in merged.manifest.tensors if t.storage == "lora"} == {"factors"}
    result = unipack.add(exact, adapters[3].path, name="fourth")
    assert set(outcome_kinds(result).values()) == {"factors"} and result.format_version == 2
    new = Adapter(adapters[3].path.parent / "fourth", adapters[3].modules)
    loaded = members_numpy(exact)["fourth"]
    for m in MODULES:
        assert np.array_equal(loaded[f"{m}.lora_A.weight"][1], new.modules[m][0])
        assert np.array_equal(loaded[f"{m}.lora_B.weight"][1], new.modules[m][1])
    assert_spec_reader_agrees(exact)


def test_other_rank_and_partial_targets(tmp_path) -> None:
    """A new adapter of another rank and dtype (F16), touching one of the bundle's modules: the other
    is untouched (no block, no codes); its dtype is recorded for the module and extraction returns it."""
    adapters = structured_population(tmp_path / "p", n=4, noise=0.3, seed=4)
    bundle = tmp_path / "b.upk"
    unipack.merge([a.path for a in adapters], bundle, max_error=0.1)
    rng = np.random.default_rng(11)
    (out, inn) = SHAPES["body.0"]
    one = write_adapter(
        tmp_path / "one",
        {
            "body.0": (
                rng.standard_normal((2, inn)).astype(np.float16),
                rng.standard_normal((out, 2)).astype(np.float16),
            )
        },
        r=2,
        alpha=4,
        extras=head_extras(rng),
    )
    before = members_numpy(bundle)
    result = unipack.add(bundle, one.path)
    kinds = outcome_kinds(result)
    assert kinds[MODULES[1]] == "untouched" and kinds[MODULES[0]] in ("quantized", "override")
    check_added(bundle, one, 0.1)
    with unipack.open(bundle) as b:
        assert set(b.member(one.name).lora) == {MODULES[0]}
        assert b.member(one.name).lora[MODULES[0]][0] == 2
        assert b.member(one.name).dtypes == {MODULES[0]: "F16"}
    assert members_numpy(bundle)[one.name][f"{MODULES[0]}.lora_A.weight"][0] == "F16"
    assert_old_members_unchanged(before, members_numpy(bundle))
    assert_spec_reader_agrees(bundle)


# --------------------------------------------------------------------------------------------
# the command: summary, -o, refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Adapter], Path]:
    tmp = tmp_path_factory.mktemp("small")
    adapters = structured_population(tmp / "p", n=4, noise=0.3, seed=6)
    bundle = tmp / "b.upk"
    unipack.merge([a.path for a in adapters[:3]], bundle, max_error=0.1)
    return adapters, bundle


def test_cli_add_prints_each_module_and_leaves_the_input_with_o(small, tmp_path) -> None:
    adapters, bundle = small
    original = bundle.read_bytes()
    out = tmp_path / "grown.upk"
    result = run("add", bundle, adapters[3].path, "-o", out)
    assert result.exit_code == 0, result.output
    assert bundle.read_bytes() == original
    for m in MODULES:
        assert m in result.output
    assert "bytes" in result.output and "quantized" in result.output
    doc = json.loads(run("add", bundle, adapters[3].path, "-o", tmp_path / "again.upk", "--json").output)
    assert doc["lora"] is True and doc["format_version"] == 6
    assert {o["tensor"] for o in doc["outcomes"]} == set(MODULES) | {f"{PREFIX}head.weight", f"{PREFIX}head.bias"}
    assert doc["bytes_added"] == out.stat().st_size - len(original)
    assert (tmp_path / "again.upk").read_bytes() == out.read_bytes()  # deterministic


def refused(bundle: Path, source: Path) -> str:
    before = bundle.read_bytes()
    line = assert_one_line_error(run("add", bundle, source))
    assert bundle.read_bytes() == before  # nothing written
    with pytest.raises(InputError):
        unipack.add(bundle, source)
    return line


def test_refusals_are_one_line_errors(small, tmp_path) -> None:
    adapters, bundle = small
    rng = np.random.default_rng(0)
    # a module of another shape (another base model)
    wrong = write_adapter(
        tmp_path / "wrong",
        {
            "body.0": (
                rng.standard_normal((4, 16)).astype(np.float32),
                rng.standard_normal((64, 4)).astype(np.float32),
            ),
            "body.2": (
                rng.standard_normal((4, 64)).astype(np.float32),
                rng.standard_normal((64, 4)).astype(np.float32),
            ),
        },
        r=4,
        alpha=8,
        extras=head_extras(rng),
    )
    assert "is 64 x 16, but 64 x 32" in refused(bundle, wrong.path)
    # a target the bundle has no record for
    extra = write_adapter(
        tmp_path / "extra",
        {
            "body.0": (
                rng.standard_normal((4, 32)).astype(np.float32),
                rng.standard_normal((64, 4)).astype(np.float32),
            ),
            "body.4": factors(rng, 4, 64, 3),
        },
        r=4,
        alpha=8,
        extras=head_extras(rng),
    )
    assert "no LoRA record" in refused(bundle, extra.path)
    # no modules_to_save head, where the bundle's adapters have one
    headless = write_adapter(
        tmp_path / "headless",
        {"body.0": factors(rng, 4, 32, 64)},
        r=4,
        alpha=8,
    )
    assert "non-LoRA tensors" in refused(bundle, headless.path)
    # a full checkpoint into a LoRA bundle
    dense = tmp_path / "dense.safetensors"
    save_numpy({"w": rng.standard_normal((4, 4)).astype(np.float32)}, str(dense))
    assert "is a full checkpoint" in refused(bundle, dense)
    # an adapter into a bundle of checkpoints
    dense_bundle = tmp_path / "dense.upk"
    others = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        save_numpy({"w": rng.standard_normal((4, 4)).astype(np.float32)}, str(p))
        others.append(p)
    unipack.merge(others, dense_bundle)
    assert "is a PEFT adapter" in refused(dense_bundle, adapters[3].path)
    # a member name the bundle has
    assert "already has a member" in refused(bundle, adapters[0].path)
