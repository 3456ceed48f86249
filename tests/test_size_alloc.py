"""``merge --size``'s per-tensor step: where the scale search ends short of the 1% (a jump), the
bounds are allocated per tensor (``MergeOptions.tensor_bounds``). The bundle still fits, comes
closer, and its error (measured here with numpy, from what the reference loader rebuilds) is no
larger than the uniform bundle's; ``add`` holds a new member to each tensor's own bounds and
``verify`` passes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TensorSpec, as64, write_population

import unipack
from unipack.cli import cli
from unipack.errors import OptionsError
from unipack.pack import size_target
from unipack.pack.size_target import Profile, TensorCost, _allocate, _lower_hull, merge_to_size

SPECS = {
    "embed.weight": TensorSpec((256, 64), kind="noise", scale=0.02),
    **{f"layers.{i}.weight": TensorSpec((64, 128), kind="right", rank=3, scale=0.05) for i in range(6)},
    **{f"layers.{i}.bias": TensorSpec((64,), kind="noise", scale=0.01) for i in range(6)},
    "head.weight": TensorSpec((3, 64), kind="head"),
}


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory):
    # the population of test_size_target.py, and a seventh member to add
    return write_population(tmp_path_factory.mktemp("alloc") / "in", SPECS, n=7, seed=11)


def _squared_errors(population, path: Path, members: range | None = None) -> dict[str, float]:
    """Each tensor's sum over members of ||W - What||^2, from the reference loader's rebuild."""
    bundle = unipack.open(path)
    out: dict[str, float] = {}
    for member in bundle.members if members is None else [bundle.members[i] for i in members]:
        rebuilt = bundle.load(member)
        index = population.names.index(member)
        for name in SPECS:
            w = as64(population.tensors[index][name])
            out[name] = out.get(name, 0.0) + float(np.sum((w - as64(rebuilt[name])) ** 2))
    return out


def _relative_errors(population, path: Path, member: str) -> dict[str, float]:
    rebuilt = unipack.open(path).load(member)
    index = population.names.index(member)
    out = {}
    for name in SPECS:
        w = as64(population.tensors[index][name])
        out[name] = float(np.linalg.norm((w - as64(rebuilt[name])).ravel()) / np.linalg.norm(w.ravel()))
    return out


def _own_bounds(manifest) -> dict[str, tuple[float | None, float | None]]:
    return {
        name: (g["max_error"], g["max_delta_error"])
        for g in manifest.options.get("tensor_bounds") or []
        for name in g["tensors"]
    }


def test_a_gap_the_scale_search_leaves_is_filled_per_tensor(population, tmp_path, monkeypatch) -> None:
    """Three scale attempts leave the bundle far short (a large gap: the one over the target is
    the default rule, the kept one much looser). The per-tensor step takes some tensors to the
    tighter attempt's bounds: the bundle fits, is larger, and every member's and every tensor's
    error, recomputed with numpy, is no larger than the uniform bundle's in total."""
    paths = population.paths[:6]
    default = tmp_path / "default.upk"
    unipack.merge(paths, default, lossless="off")
    target = int(default.stat().st_size * 1.4)
    monkeypatch.setattr(size_target, "MAX_ATTEMPTS", 3)
    uniform, allocated = tmp_path / "uniform.upk", tmp_path / "allocated.upk"
    merge_to_size(paths, uniform, target, allocate=False)
    seen = []
    result = merge_to_size(paths, allocated, target, on_attempt=seen.append)
    record = unipack.open(allocated).manifest.stats["size_target"]
    u_record = unipack.open(uniform).manifest.stats["size_target"]
    assert not u_record["met"] and u_record["allocated_tensors"] == 0  # the gap the step must fill
    assert uniform.stat().st_size < allocated.stat().st_size == result.file_bytes <= target
    assert len(seen) <= 3 + size_target.ALLOCATION_ATTEMPTS
    assert record["met"] == (allocated.stat().st_size >= 0.99 * target)
    # the record: the scale attempts, then the allocation's merges, each with its tensors
    manifest = unipack.open(allocated).manifest
    own = _own_bounds(manifest)
    assert own and record["allocated_tensors"] == len(own)
    steps = [a for a in record["attempts"] if "tensor_bounds" in a]
    assert steps and all(isinstance(a["estimated_bytes"], int) for a in steps)
    kept = [a for a in steps if a["tensor_bounds"] == manifest.options["tensor_bounds"]]
    assert kept and kept[-1]["max_error"] == record["max_error"] == manifest.options["max_error"]
    # the tensors given bounds of their own took a tighter attempt's bounds, the others those of
    # the attempt the record names (the loosest taken)
    tried = {(a["max_error"], a["max_delta_error"]) for a in record["attempts"] if "tensor_bounds" not in a}
    assert (record["max_error"], record["max_delta_error"]) in tried
    assert set(own.values()) <= tried
    assert all(e < record["max_error"] for e, _ in own.values())
    # errors, measured independently: no larger in total than the uniform bundle's, smaller on
    # the tensors tightened, and the others' exactly as before (each tensor's storage depends
    # only on its own bounds)
    ours, theirs = _squared_errors(population, allocated), _squared_errors(population, uniform)
    assert sum(ours.values()) < sum(theirs.values())
    for name in SPECS:
        if name in own:
            assert ours[name] <= theirs[name]
        else:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-12, abs=1e-18)
    assert sum(ours[n] for n in own) < sum(theirs[n] for n in own)
    # every member within each tensor's own max-error bound (relative to its weight), by numpy
    for member in manifest.members:
        errors = _relative_errors(population, allocated, member.name)
        for name, err in errors.items():
            bound = own.get(name, (record["max_error"], None))[0]
            assert err <= bound * (1 + 1e-3), (member.name, name, err, bound)
    assert unipack.open(allocated).verify() == []


def test_add_and_verify_use_each_tensors_own_bounds(population, tmp_path) -> None:
    """A bundle whose tensors have bounds of their own (as ``--size`` writes it, here given
    directly): its members, and a member added later, are within each tensor's own bound; the
    same member added to the bundle without them is not (the loose rule lets it go further)."""
    paths = population.paths[:6]
    tight = {"layers.0.weight": (0.01, 0.08), "embed.weight": (0.005, 0.04)}
    options = unipack.MergeOptions(max_error=0.09, max_delta_error=0.72, tensor_bounds=tight)
    assert unipack.MergeOptions.from_dict(options.to_dict()) == options
    bundle, loose = tmp_path / "own.upk", tmp_path / "loose.upk"
    unipack.merge(paths, bundle, options=dataclasses.replace(options, lossless="off"))
    unipack.merge(paths, loose, max_error=0.09, max_delta_error=0.72, lossless="off")
    manifest = unipack.open(bundle).manifest
    assert manifest.options["tensor_bounds"] == [
        {"max_error": 0.01, "max_delta_error": 0.08, "tensors": ["layers.0.weight"]},
        {"max_error": 0.005, "max_delta_error": 0.04, "tensors": ["embed.weight"]},
    ]
    assert manifest.format_version == unipack.open(loose).manifest.format_version  # no new version
    reasons = {t.name: t.reason for t in manifest.tensors}
    assert reasons["layers.0.weight"].startswith("max-error 0.01 and max-delta-error 0.08")
    assert reasons["layers.1.weight"].startswith("max-error 0.09 and max-delta-error 0.72")
    new = population.names[6]
    for path in (bundle, loose):
        result = unipack.add(path, population.paths[6], name=new)
        assert result.budget_met
        assert unipack.open(path).verify() == []
    for member in [*population.names[:6], new]:
        errors = _relative_errors(population, bundle, member)
        for name, err in errors.items():
            assert err <= tight.get(name, (0.09, None))[0] * (1 + 1e-3), (member, name, err)
    loose_errors = _relative_errors(population, loose, new)
    assert loose_errors["layers.0.weight"] > 0.01 and loose_errors["embed.weight"] > 0.005
    # the added member's recorded errors are what numpy measures (rounded up to 3 digits)
    record = unipack.open(bundle).manifest.member(new)
    names = [t.name for t in unipack.open(bundle).manifest.tensors]
    measured = _relative_errors(population, bundle, new)
    for name, recorded in zip(names, record.errors):
        assert measured[name] <= recorded * (1 + 1e-9) + 1e-12
        assert recorded <= max(measured[name] * 1.01, 1e-6)
    # info and report say the rule, and that some tensors have bounds of their own
    r = CliRunner().invoke(cli, ["info", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "2 tensors to bounds of their own" in r.output


def test_bad_per_tensor_bounds_are_one_clear_error(population, tmp_path) -> None:
    for given, text in [
        ({"a": (0.5, 2.0)}, "max_delta_error 2.0 must be a number in"),
        ({"a": (None, None)}, "give max_error and/or max_delta_error"),
        ({"": (0.1, None)}, "expected a tensor name"),
    ]:
        with pytest.raises(OptionsError, match=text):
            unipack.MergeOptions(tensor_bounds=given)
    with pytest.raises(OptionsError, match="need error bounds"):
        unipack.MergeOptions(rank=2, tensor_bounds={"a": (0.1, None)})
    with pytest.raises(OptionsError, match="a list of"):
        unipack.MergeOptions.from_dict({"tensor_bounds": {"a": 0.1}})
    with pytest.raises(OptionsError, match="allocate the bounds per tensor themselves"):
        merge_to_size(
            population.paths[:2],
            tmp_path / "x.upk",
            10**6,
            options=unipack.MergeOptions(tensor_bounds={"a": (0.1, None)}),
        )
    assert not any(tmp_path.iterdir())
    # a recorded entry that is not a list of groups: add refuses the bundle in one line
    # (from_dict is what add reads the options with)
    with pytest.raises(OptionsError):
        unipack.MergeOptions.from_dict({"tensor_bounds": [{"max_error": 0.1}]})


def _profiles(table: dict[float, dict[str, tuple[float, float]]], fixed: int = 0) -> dict[float, Profile]:
    return {s: Profile({n: TensorCost(b, e) for n, (b, e) in row.items()}, fixed) for s, row in table.items()}


def test_allocate_takes_the_steps_worth_most_error_per_byte_within_the_budget() -> None:
    """Two tensors, three attempts (scale 1 loosest and the start, 0.5, 0.25 tighter): the
    greedy takes steps by error saved per byte, as long as the estimate fits (the bytes the
    manifest's per-tensor bounds take, under 100 here, come on top: budgets leave 100)."""
    k = 1000.0
    table = {
        1.0: {"a": (100 * k, 10.0), "b": (100 * k, 10.0)},
        0.5: {"a": (110 * k, 4.0), "b": (150 * k, 9.0)},  # a: 0.6 per kB; b: off b's hull
        0.25: {"a": (200 * k, 3.0), "b": (160 * k, 2.0)},  # a then: 1/90; b from 1.0: 8/60
    }
    no_groups = lambda scale: 0  # noqa: E731
    profiles = _profiles(table)
    # room for a's first step only, then for b's hull step too
    assert _allocate(profiles, 1.0, 210_100, no_groups) == [("a", 0.5)]
    assert _allocate(profiles, 1.0, 270_100, no_groups) == [("a", 0.5), ("b", 0.25)]
    # more room: a's second step too (the least error per byte, taken last)
    assert _allocate(profiles, 1.0, 360_100, no_groups) == [("a", 0.5), ("b", 0.25), ("a", 0.25)]
    # nothing fits: nothing taken
    assert _allocate(profiles, 1.0, 205_000, no_groups) == []
    # a step off the hull still fills what is left (b to 0.5: 50 kB, where 0.25 needs 60)
    assert _allocate(profiles, 1.0, 265_100, no_groups) == [("a", 0.5), ("b", 0.5)]
    # the bounds the manifest records count: 100 bytes more per scale named
    assert _allocate(profiles, 1.0, 210_100, lambda scale: 100) == []
    assert _allocate(profiles, 1.0, 210_200, lambda scale: 100) == [("a", 0.5)]


def test_lower_hull_keeps_the_convex_steps() -> None:
    first = (0.0, 10.0, 1.0)
    points = [(1.0, 9.0, 0.9), (2.0, 5.0, 0.8), (3.0, 4.5, 0.7), (4.0, 1.0, 0.6), (5.0, 2.0, 0.5)]
    hull = _lower_hull(first, points)
    assert [p[2] for p in hull] == [1.0, 0.8, 0.6]
    slopes = [(a[1] - b[1]) / (b[0] - a[0]) for a, b in zip(hull, hull[1:])]
    assert slopes == sorted(slopes, reverse=True)


def test_the_cli_line_says_how_many_tensors_were_allocated(population, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(size_target, "MAX_ATTEMPTS", 3)
    paths = [str(p) for p in population.paths[:6]]
    default = tmp_path / "d.upk"
    unipack.merge(paths, default, lossless="off")
    target = int(default.stat().st_size * 1.4)
    out = tmp_path / "cli.upk"
    r = CliRunner().invoke(cli, ["merge", *paths, "-o", str(out), "--size", str(target), "-q", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    record = doc["size_target"]
    assert doc["file_bytes"] <= target and record["allocated_tensors"] > 0
    r = CliRunner().invoke(cli, ["merge", *paths, "-o", str(tmp_path / "c2.upk"), "--size", str(target)])
    assert r.exit_code == 0, r.output
    line = f"{record['allocated_tensors']} tensors tighter (allocated per tensor)"
    assert line in r.output  # the summary's size target line
    assert f"size search, merge 4: max-error {record['max_error']:.3g}" in r.output  # the allocation's merge
    assert (
        sum(text in r.output for text in ("size search, merge 4", "size search, merge 5"))
        == len(doc["size_target"]["attempts"]) - 3
    )
    assert math.isfinite(record["max_error"])


def test_the_alternatives_are_judged_by_each_tensors_own_bounds(population, tmp_path) -> None:
    """A tensor held to bounds of its own is met by an alternative only if every member is within
    those bounds (recomputed here with numpy), not the rule's looser ones."""
    paths = population.paths[:6]
    name = next(iter(SPECS))
    uniform, tight = tmp_path / "uniform.upk", tmp_path / "tight.upk"
    unipack.merge(paths, uniform, lossless="off")
    options = unipack.MergeOptions(tensor_bounds={name: (1e-4, None)}, lossless="off")
    unipack.merge(paths, tight, options=options)
    loose = unipack.open(uniform).manifest.stats["alternatives"]
    held = unipack.open(tight).manifest.stats["alternatives"]
    ws = [as64(population.tensors[i][name]) for i in range(6)]
    mean = np.mean(ws, axis=0).astype(np.float32).astype(np.float64)
    center = np.mean(ws, axis=0)
    mean = center.astype(np.float32).astype(np.float64)

    def error(w: np.ndarray, approx: np.ndarray) -> float:
        return float(np.linalg.norm((w - approx).ravel()))

    approximations = {
        "fp16": [w.astype(np.float16).astype(np.float64) for w in ws],
        "int8": [unipack.core.alternatives.int_delta(w, mean, 8).astype(np.float32).astype(np.float64) for w in ws],
    }
    for method, approx in approximations.items():
        errors = [error(w, a) for w, a in zip(ws, approx, strict=True)]
        norms = [float(np.linalg.norm(w.ravel())) for w in ws]
        # the default rule (5% of W, and 40% of W - mean or 2^-11 of W) holds; 1e-4 of W does not
        assert all(
            e <= 0.05 * n and (e <= 0.4 * error(w, center) or e <= 2.0**-11 * n)
            for e, n, w in zip(errors, norms, ws, strict=True)
        )
        assert max(e / n for e, n in zip(errors, norms, strict=True)) > 1e-4
        assert held["methods"][method]["tensors_met"] == loose["methods"][method]["tensors_met"] - 1
    assert loose["cheapest"][name][0] is not None
    assert held["cheapest"][name] == [None, 0]
