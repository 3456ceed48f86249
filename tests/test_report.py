"""``unipack report``: byte accounting, lossless ratio, baselines, winners, eval scores, JSON.

Every number is checked against an independent computation: the bundle's safetensors header
parsed here by hand, zstd run here on the input files, the mean and the per-member truncated
SVD computed here with numpy in float64, and the user's eval function called here on the
original files (reference safetensors loader) and on the members the bundle returns.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from click.testing import Result
from conftest import (
    Population,
    TensorSpec,
    as64,
    assert_one_line_error,
    grouped_zstd_size,
    rel_error,
    run,
    spectrum,
    stored_mean,
    write_population,
)
from safetensors.torch import load_file, save_file

import unipack
from unipack.analysis.report import report
from unipack.errors import InputError
from unipack.usercode import load_eval

N = 4
#: Fidelity numbers (norms, mean/delta/SVD errors, spectra) are recorded at 4 significant digits.
RECORDED = 6e-4
#: The per-member SVD baseline: recorded rounding plus unipack's float32 rounding of its factors.
SVD_RTOL = 1.5e-3


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def report_specs() -> dict[str, TensorSpec]:
    """Every storage a report must account for: rows (both sides), flat (vector and 4-D),
    exact (float and int), raw (an int buffer that differs; an incompressible head)."""
    return {
        "enc.weight": TensorSpec((16, 24), kind="right", rank=3, noise=1e-2),
        "dec.weight": TensorSpec((24, 16), kind="left", rank=2, noise=1e-2),
        "enc.bias": TensorSpec((16,), kind="flat", rank=2, noise=1e-2),
        "conv.kernel": TensorSpec((4, 3, 2, 2), kind="flat", rank=2, noise=1e-2),
        "norm.scale": TensorSpec((6,), kind="same"),
        "x.head": TensorSpec((5, 4), kind="noise"),
        "position_ids": TensorSpec((1, 8), dtype="int64", kind="int_same"),
        "step": TensorSpec((3,), dtype="int32", kind="int"),
    }


def parse_header(path: Path) -> tuple[dict[str, Any], bytes, int]:
    """The safetensors header as a dict, its JSON bytes (with padding), and the data offset."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    body = data[8 : 8 + n]
    return json.loads(body), body, 8 + n


def expected_parts(path: Path) -> dict[str, int]:
    """Every byte of the file in one part, from the raw header and manifest JSON."""
    header, body, start = parse_header(path)
    text = header["__metadata__"]["manifest"]
    manifest = json.loads(text)
    lengths = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    # the data section is contiguous and ends at the end of the file
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert start + spans[-1][1] == os.path.getsize(path)
    manifest_bytes = len(json.dumps(text, ensure_ascii=False).encode("utf-8"))
    padding = len(body) - len(body.rstrip(b" "))
    tensors, members = manifest["tensors"], manifest["members"]
    # LoRA modules kept as the adapters' own factors: their raw blobs are the "factors" part.
    factor_keys = {f"{t['name']}.lora_{x}.weight" for t in tensors if t.get("form") == "factors" for x in "AB"}
    factors = [b for m in members for k, b in m["raw"].items() if k in factor_keys]
    parts = {
        "header": start - manifest_bytes - padding,
        "manifest": manifest_bytes,
        "padding": padding,
        "means": sum(lengths[t["mean"]] for t in tensors if t.get("mean")),
        "bases": sum(lengths[t[k]] for t in tensors for k in ("basis", "left", "right") if t.get(k)),
        "coefficients": sum(lengths[m["coefficients"]] for m in members if m["coefficients"]),
        "deltas": sum(lengths[m["codes"]] for m in members if m.get("codes")),
        "factors": sum(lengths[b] for b in factors),
        "raw": sum(lengths[b] for m in members for b in m["raw"].values()) - sum(lengths[b] for b in factors),
        "exact": sum(lengths[t["blob"]] for t in tensors if t.get("blob")),
        # the lossless tier (spec §9): every residual blob a member's exact map names
        "residuals": sum(lengths[e["blob"]] for m in members for e in (m.get("exact") or {}).values() if e.get("blob")),
    }
    assert sum(parts.values()) == os.path.getsize(path)
    return parts


def budget_raw(path: Path) -> list[str]:
    """Tensors the merge kept raw only because raw was cheaper than their subspace."""
    return [
        t["name"] for t in manifest_doc(path)["tensors"] if t["storage"] == "raw" and t.get("raw_cause") == "budget"
    ]


def expected_mean_only_bytes(path: Path) -> int:
    """A rank-0 bundle: no bases or coefficients, and one copy in place of the per-member copies
    of every tensor kept raw only for its bytes (and no lossless tier: the baseline is lossy)."""
    header, _, _ = parse_header(path)
    lengths = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    parts = expected_parts(path)
    size = os.path.getsize(path) - parts["bases"] - parts["coefficients"] - parts["deltas"] - parts["residuals"]
    members = manifest_doc(path)["members"]
    for name in budget_raw(path):
        copies = [lengths[m["raw"][name]] for m in members]
        size -= sum(copies) - max(copies)
    return size


def view(shape: tuple[int, ...]) -> tuple[int, int]:
    numel = math.prod(shape)
    return (shape[0], numel // shape[0]) if len(shape) > 1 else (1, numel)


def svd_rank(t: dict[str, Any], n_members: int) -> int:
    """What a member's own SVD can afford: its coefficients plus 1/N of the basis, in numbers."""
    k = t["rank"]
    shape = tuple(t["shape"])
    if t["scheme"] == "flat":
        coef, basis = k, k * math.prod(shape)
    else:
        m, n = t["matrix"]
        coef, basis = (m * k, n * k) if t["side"] == "right" else (k * n, m * k)
    vm, vn = view(shape)
    return int(min((coef + basis / n_members) // (vm + vn), vm, vn))


def own_svd_error(w: np.ndarray, mean: np.ndarray, rank: int) -> float:
    """||D - D_r|| / ||W|| with D = W - mean, D_r its truncated SVD (numpy, float64)."""
    d = (w - mean).reshape(view(w.shape))
    if rank:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        d = d - (u[:, :rank] * s[:rank]) @ vt[:rank]
    return float(np.linalg.norm(d) / np.linalg.norm(w))


def manifest_doc(path: Path) -> dict[str, Any]:
    header, _, _ = parse_header(path)
    return json.loads(header["__metadata__"]["manifest"])


def weighted(values: dict[str, float], weights: dict[str, int]) -> float:
    return sum(values[k] * weights[k] for k in weights) / sum(weights.values())


def member_weights(pop: Population, i: int) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in pop.tensors[i].items()}


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory) -> Population:
    return write_population(tmp_path_factory.mktemp("report") / "in", report_specs(), n=N, seed=5)


BUNDLE_OPTIONS: dict[str, dict[str, Any]] = {
    # The subspace's own numbers (bases, coefficients, their baselines): quantized deltas off.
    "default": {"quantize": False},
    "float16": {"dtype": "float16", "quantize": False},
    "raw": {"raw": ("x.*",), "max_error": 0.05, "quantize": False},
    "delta": {},
    "delta-rel": {"max_delta_error": 0.2, "dtype": "float16"},
    "codec-none": {"codec": "none", "rank": 2},
    "rank3": {"rank": 3},
    "no-baselines": {"rank": 3, "baselines": False},
    "rank0": {"rank": 0},
    "lossless": {"exact_tier": True},
}


@pytest.fixture(scope="module")
def bundles(pop: Population) -> dict[str, Path]:
    out = {}
    for key, options in BUNDLE_OPTIONS.items():
        path = pop.paths[0].parent.parent / f"{key}.upk"
        unipack.merge(pop.paths, path, **options)
        out[key] = path
    return out


# ------------------------------------------------------------------------------------------
# 1. bytes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["delta", "raw"])
def test_each_tensor_counts_the_parameters_of_every_member(bundles: dict[str, Path], pop: Population, key: str) -> None:
    """``parameters`` (its bit allocation's denominator) is the members' own element counts."""
    doc = json.loads(run("report", str(bundles[key]), "--json").output)
    for t in doc["tensors"]:
        assert t["parameters"] == sum(member[t["name"]].numel() for member in pop.tensors), t["name"]


@pytest.mark.parametrize("key", ["default", "float16", "raw", "codec-none", "rank0", "delta", "delta-rel", "lossless"])
def test_byte_parts_add_up_to_the_file(bundles: dict[str, Path], pop: Population, key: str) -> None:
    path = bundles[key]
    expected = expected_parts(path)
    with unipack.open(path) as b:
        r = report(b)
    assert r.bytes.parts == expected
    assert sum(r.bytes.parts.values()) == r.bytes.file == os.path.getsize(path)
    assert r.bytes.inputs == sum(os.path.getsize(p) for p in pop.paths)
    assert r.bytes.ratio == pytest.approx(r.bytes.inputs / os.path.getsize(path))
    assert r.bytes.mean_only == expected_mean_only_bytes(path)
    # what each bundle must hold: exact tensors (norm.scale, position_ids), raw ones (step)
    if key == "codec-none":  # norm.scale (6 x float32) and position_ids (8 x int64), stored once
        assert expected["exact"] == 6 * 4 + 8 * 8
    assert expected["exact"] > 0
    assert expected["raw"] > 0 and expected["means"] > 0 and expected["manifest"] > 1000
    if key == "raw":  # x.head stored raw per member: 5 x 4 float32 each (zstd may save a little)
        doc = manifest_doc(path)
        assert all("x.head" in m["raw"] for m in doc["members"])
    if key == "codec-none":  # uncompressed: raw = step (3 x int32) + x.head unless it went shared
        doc = manifest_doc(path)
        raw_names = {name for name in doc["members"][0]["raw"]}
        sizes = {"step": 12, "x.head": 80}
        assert expected["raw"] == N * sum(sizes[n] for n in raw_names)
    assert (expected["residuals"] > 0) == (key == "lossless")
    if key == "rank0":
        assert expected["bases"] == expected["coefficients"] == 0
        assert r.bytes.mean_only == r.bytes.file
    elif key.startswith("delta") or key == "lossless":  # quantized deltas: codes, steps in the coefficients
        assert expected["deltas"] > 0 and expected["coefficients"] > 0
    else:
        assert expected["bases"] > 0 and expected["coefficients"] > 0
        assert expected["deltas"] == 0
    per_member = expected["bases"] + expected["coefficients"] + expected["deltas"] + expected["residuals"]
    if not budget_raw(path):
        assert r.bytes.mean_only == r.bytes.file - per_member
    else:  # tensors kept raw for their bytes: the mean alone would have stored them once
        assert r.bytes.mean_only < r.bytes.file - per_member


def test_byte_parts_in_the_terminal_and_json(bundles: dict[str, Path]) -> None:
    path = bundles["float16"]
    expected = expected_parts(path)
    doc = json.loads(run("report", path, "--json").stdout)
    assert doc["bytes"]["parts"] == expected
    assert doc["bytes"]["file"] == os.path.getsize(path)
    text = run("report", path)
    assert_ok(text)
    from unipack.render.console import format_bytes

    rows = {cells(line)[0]: cells(line) for line in text.output.splitlines() if line.startswith("│")}
    for part, n in expected.items():
        assert rows[part][1:3] == [format_bytes(n), f"{100 * n / os.path.getsize(path):.1f}%"], part
    assert rows["total"][1] == format_bytes(os.path.getsize(path))


# ------------------------------------------------------------------------------------------
# 2. ratio against lossless compression
# ------------------------------------------------------------------------------------------


GROUPED = {"codec": "zstd", "level": 1, "grouping": "bytes", "sampled": False}


def test_lossless_baseline_is_byte_grouped_zstd_of_each_whole_input(
    tmp_path: Path, pop: Population, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spec §3.6: zstd -1 of each input's bytes grouped by position within its float elements,
    every byte of every file (``auto`` no longer samples, even past the old 64 MiB limit)."""
    from unipack.pack import lossless

    monkeypatch.setattr(lossless, "FULL_LIMIT", 1)
    out = tmp_path / "full.upk"
    unipack.merge(pop.paths, out)
    own = [grouped_zstd_size([p], 4) for p in pop.paths]  # the population is F32
    with unipack.open(out) as b:
        assert [m.lossless_bytes for m in b.manifest.members] == own
        assert b.manifest.stats["lossless"] == GROUPED
        r = report(b)
    assert r.bytes.lossless == sum(own)
    assert r.bytes.lossless_sampled is False and r.bytes.lossless_grouped and r.bytes.lossless_level == 1
    assert r.bytes.ratio_vs_lossless == pytest.approx(sum(own) / os.path.getsize(out))
    result = run("report", out)
    assert_ok(result)
    headline = next(line for line in result.output.splitlines() if line.startswith("ratio "))
    assert f"{r.bytes.ratio:.2f}x vs the inputs" in headline
    assert (
        f"{sum(own) / os.path.getsize(out):.2f}x vs the inputs compressed losslessly (zstd -1 of byte-grouped"
        in headline
    )
    assert "estimated" not in headline
    doc = json.loads(run("report", out, "--json").stdout)
    assert doc["bytes"]["lossless"] == sum(own) and doc["bytes"]["lossless_grouped"] is True
    assert doc["bytes"]["ratio_vs_lossless"] == pytest.approx(sum(own) / os.path.getsize(out))


def test_lossless_baseline_sample_mode_is_an_estimate(tmp_path: Path) -> None:
    """``--lossless-baseline sample``: evenly spaced 1 MiB windows, grouped, scaled to the file."""
    from unipack.pack import lossless

    big = tmp_path / "big.bin"
    values = np.random.default_rng(0).normal(0, 0.02, 3 * lossless.WINDOW // 4).astype(np.float32)
    big.write_bytes(values.tobytes())
    size = big.stat().st_size
    measured = lossless.measure_grouped([(big, size)], 4, "sample", share=2 / 16)  # two windows
    windows = [big.read_bytes()[s : s + lossless.WINDOW] for s in (0, size - lossless.WINDOW)]
    expected = 0
    for w in windows:
        part = tmp_path / "w"
        part.write_bytes(w)
        expected += grouped_zstd_size([part], 4)
    assert measured.sampled and measured.read_bytes == 2 * lossless.WINDOW
    assert measured.compressed_bytes == round(expected * size / (2 * lossless.WINDOW))
    full = lossless.measure_grouped([(big, size)], 4, "full")
    assert not full.sampled and full.compressed_bytes == grouped_zstd_size([big], 4)


def test_a_lossless_tier_is_compared_with_the_same_exact_baseline(
    tmp_path: Path, pop: Population, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Next to a lossless tier the baseline is the same byte-grouped measure of every whole file."""
    from unipack.pack import lossless

    monkeypatch.setattr(lossless, "zipnn_version", lambda: None)  # as without ZipNN installed
    out = tmp_path / "tier.upk"
    unipack.merge(pop.paths, out, exact_tier=True, baselines=False)
    own = [grouped_zstd_size([p], 4) for p in pop.paths]
    with unipack.open(out) as b:
        assert [m.lossless_bytes for m in b.manifest.members] == own
        assert b.manifest.stats["lossless"] == GROUPED
        assert "zipnn" not in b.manifest.stats
        r = report(b)
    assert r.bytes.exact_tier and r.bytes.lossless_level == 1 and r.bytes.zipnn is None
    headline = next(line for line in run("report", out).output.splitlines() if line.startswith("ratio "))
    assert f"{sum(own) / os.path.getsize(out):.2f}x vs the inputs compressed losslessly (zstd -1 of " in headline
    assert "estimated" not in headline and "ZipNN" not in headline


def test_an_older_bundles_plain_zstd_baseline_still_reads_and_grows_alike(tmp_path: Path, pop: Population) -> None:
    """A bundle that recorded the earlier baseline (plain zstd -19, spec §3.6) reports it as such,
    and ``add`` measures a new member the same way, so the sum stays one measure."""
    from unipack.format.container import rewrite_bundle

    out, grown = tmp_path / "old.upk", tmp_path / "grown.upk"
    unipack.merge(pop.paths[:-1], out, baselines=False)
    old = [len(zstandard.ZstdCompressor(level=19).compress(p.read_bytes())) for p in pop.paths[:-1]]

    def as_before(manifest, writer):  # type: ignore[no-untyped-def]
        members = tuple(dataclasses.replace(m, lossless_bytes=n) for m, n in zip(manifest.members, old))
        stats = {**manifest.stats, "lossless": {"codec": "zstd", "level": 19, "sampled": False}}
        return dataclasses.replace(manifest, members=members, stats=stats, blobs=writer.blobs)

    rewrite_bundle(out, as_before, force=True)
    with unipack.open(out) as b:
        r = report(b)
    assert r.bytes.lossless == sum(old) and r.bytes.lossless_level == 19 and not r.bytes.lossless_grouped
    headline = next(line for line in run("report", out).output.splitlines() if line.startswith("ratio "))
    assert "losslessly (zstd -19: " in headline
    unipack.add(out, pop.paths[-1], output=grown)
    with unipack.open(grown) as b:
        assert b.manifest.members[-1].lossless_bytes == len(
            zstandard.ZstdCompressor(level=19).compress(pop.paths[-1].read_bytes())
        )
        assert b.manifest.stats["lossless"] == {"codec": "zstd", "level": 19, "sampled": False}


def test_a_lossless_tier_is_compared_with_zipnn_where_installed(tmp_path: Path, pop: Population) -> None:
    zipnn = pytest.importorskip("zipnn")
    out = tmp_path / "tier.upk"
    unipack.merge(pop.paths, out, exact_tier=True, baselines=False)
    coder = zipnn.ZipNN(bytearray_dtype="float32", input_format="byte")  # the inputs are mostly F32
    own = sum(len(coder.compress(p.read_bytes())) for p in pop.paths)
    with unipack.open(out) as b:
        assert b.manifest.stats["zipnn"]["bytes"] == own
        r = report(b)
    assert r.bytes.zipnn == own and r.bytes.ratio_vs_zipnn == pytest.approx(own / os.path.getsize(out))
    text = run("report", out).output
    headline = next(line for line in text.splitlines() if line.startswith("ratio "))
    assert f"{own / os.path.getsize(out):.2f}x vs ZipNN" in headline
    assert "extract --exact gives every member bit for bit" in " ".join(text.split())
    doc = json.loads(run("report", out, "--json").stdout)
    assert doc["bytes"]["zipnn"] == own and doc["bytes"]["ratio_vs_zipnn"] == pytest.approx(own / os.path.getsize(out))
    assert doc["bytes"]["exact_tier"] is True and doc["bytes"]["lossless_level"] == 1


def test_add_to_a_lossless_tier_measures_the_grouped_baseline_and_drops_zipnn(tmp_path: Path, pop: Population) -> None:
    out, grown = tmp_path / "tier.upk", tmp_path / "grown.upk"
    unipack.merge(pop.paths[:-1], out, exact_tier=True, baselines=False)
    unipack.add(out, pop.paths[-1], output=grown)
    with unipack.open(grown) as b:
        assert b.manifest.members[-1].lossless_bytes == grouped_zstd_size([pop.paths[-1]], 4)
        assert b.manifest.stats["lossless"] == GROUPED
        assert "zipnn" not in b.manifest.stats  # it no longer covers every member
        assert report(b).bytes.zipnn is None


def test_lossless_baseline_off(tmp_path: Path, pop: Population) -> None:
    out = tmp_path / "off.upk"
    result = run("merge", *pop.paths, "-o", out, "--lossless-baseline", "off", "-q")
    assert_ok(result)
    with unipack.open(out) as b:
        assert all(m.lossless_bytes is None for m in b.manifest.members)
        assert "lossless" not in b.manifest.stats
        r = report(b)
    assert r.bytes.lossless is None and r.bytes.ratio_vs_lossless is None
    result = run("report", out)
    assert_ok(result)
    headline = next(line for line in result.output.splitlines() if line.startswith("ratio "))
    assert f"{r.bytes.ratio:.2f}x vs the inputs" in headline
    assert "zstd" not in headline and "losslessly" not in result.output
    doc = json.loads(run("report", out, "--json").stdout)
    assert doc["bytes"]["lossless"] is None and doc["bytes"]["ratio_vs_lossless"] is None


# ------------------------------------------------------------------------------------------
# 3. baselines against numpy
# ------------------------------------------------------------------------------------------


def independent_numbers(pop: Population, path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per member, per tensor: unipack's error, delta error, mean-only and per-member SVD errors
    and the SVD's rank, all from the originals, the extracted members and numpy."""
    doc = manifest_doc(path)
    tensors = {t["name"]: t for t in doc["tensors"]}
    out: dict[str, dict[str, dict[str, float]]] = {}
    originals = [{k: as64(v) for k, v in t.items() if v.is_floating_point()} for t in pop.tensors]
    with unipack.open(path) as b:
        for i, name in enumerate(pop.names):
            got = b.load_numpy(name)
            raw = doc["members"][i]["raw"]
            numbers: dict[str, dict[str, float]] = {"unipack": {}, "delta": {}, "mean": {}, "svd": {}, "rank": {}}
            for tname in pop.tensors[i]:
                rec = tensors[tname]
                if rec["storage"] != "shared" or tname in raw:
                    for column in numbers.values():
                        column[tname] = 0.0
                    if rec["storage"] == "raw" and rec.get("raw_cause") == "budget":
                        # kept raw for its bytes: the mean alone would still have replaced it
                        w = originals[i][tname]
                        mean = stored_mean([o[tname] for o in originals], torch.float32)
                        numbers["mean"][tname] = float(np.linalg.norm(w - mean) / np.linalg.norm(w))
                    continue
                w = originals[i][tname]
                mean = stored_mean([o[tname] for o in originals], torch.float32)
                dtype, array = got[tname]
                assert dtype == "F32"
                w_hat = np.asarray(array, dtype=np.float64)
                r = svd_rank(rec, len(pop))
                numbers["unipack"][tname] = rel_error(w, w_hat)
                numbers["delta"][tname] = float(np.linalg.norm(w - w_hat) / np.linalg.norm(w - mean))
                numbers["mean"][tname] = float(np.linalg.norm(w - mean) / np.linalg.norm(w))
                numbers["svd"][tname] = own_svd_error(w, mean, r)
                numbers["rank"][tname] = r
            out[name] = numbers
    return out


@pytest.mark.parametrize("key", ["rank3", "raw", "default", "float16"])
def test_recorded_baselines_match_numpy(bundles: dict[str, Path], pop: Population, key: str) -> None:
    path = bundles[key]
    ours = independent_numbers(pop, path)
    shared_with_svd = 0
    with unipack.open(path) as b:
        index = {t.name: j for j, t in enumerate(b.manifest.tensors)}
        projected = [t.name for t in b.manifest.tensors if t.storage == "shared"]
        assert projected, "the population must give shared tensors"
        for name in pop.names:
            rec = b.manifest.member(name)
            f = rec.fidelity
            assert f is not None and f.svd_errors is not None and f.svd_ranks is not None
            for tname, j in index.items():
                assert f.svd_ranks[j] == ours[name]["rank"][tname], (name, tname)
                assert rec.errors[j] == pytest.approx(ours[name]["unipack"][tname], rel=1e-6, abs=1e-12)
                assert f.mean_errors[j] == pytest.approx(ours[name]["mean"][tname], rel=RECORDED, abs=1e-12)
                assert f.svd_errors[j] == pytest.approx(ours[name]["svd"][tname], rel=SVD_RTOL, abs=1e-12)
                assert f.delta_errors[j] == pytest.approx(ours[name]["delta"][tname], rel=RECORDED, abs=1e-12)
                if tname in projected and f.svd_ranks[j] > 0:
                    shared_with_svd += 1
                    # the SVD baseline did something: it beats the mean alone
                    assert ours[name]["svd"][tname] < ours[name]["mean"][tname] * 0.99
    if key == "rank3":
        assert shared_with_svd >= 3 * len(pop)  # the SVD baseline gets a nonzero rank
    if key == "raw":  # a flat vector whose share of the bytes buys the SVD nothing: rank 0
        j = index["enc.bias"]
        assert all(
            b_ == 0 for b_ in [manifest_doc(path)["members"][i]["fidelity"]["svd_ranks"][j] for i in range(len(pop))]
        )
        assert ours[pop.names[0]]["svd"]["enc.bias"] == ours[pop.names[0]]["mean"]["enc.bias"] > 0


@pytest.mark.parametrize("key", ["rank3", "raw"])
def test_member_aggregates(bundles: dict[str, Path], pop: Population, key: str) -> None:
    path = bundles[key]
    ours = independent_numbers(pop, path)
    doc = manifest_doc(path)
    with unipack.open(path) as b:
        r = report(b)
    for i, m in enumerate(r.members):
        name = pop.names[i]
        assert m.name == name and m.source == pop.paths[i].name
        weights = member_weights(pop, i)
        for method, key_ in (("unipack", "unipack"), ("mean-only", "mean"), ("svd", "svd")):
            stats = m.errors[method]
            assert stats is not None
            values = ours[name][key_]
            assert stats.worst == pytest.approx(max(values.values()), rel=SVD_RTOL)
            assert stats.mean == pytest.approx(weighted(values, weights), rel=SVD_RTOL)
            assert stats.worst_tensor == max(values, key=values.__getitem__)
        # delta lost over the member's projected tensors
        lost = kept = 0.0
        for tname in weights:
            if ours[name]["delta"][tname]:  # projected tensors only (not those kept raw)
                norm = float(np.linalg.norm(as64(pop.tensors[i][tname])))
                lost += (ours[name]["unipack"][tname] * norm) ** 2
                kept += (ours[name]["mean"][tname] * norm) ** 2
        assert m.delta_error == pytest.approx(math.sqrt(lost / kept), rel=SVD_RTOL)
        # own bytes: its coefficient blob and raw blobs as stored
        header, _, _ = parse_header(path)
        length = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        rec = doc["members"][i]
        own = sum(length[b_] for b_ in rec["raw"].values())
        own += length[rec["coefficients"]] if rec["coefficients"] else 0
        assert m.own_bytes == own
        parts = expected_parts(path)
        shared = sum(parts[p] for p in ("header", "manifest", "padding", "means", "bases", "exact"))
        assert m.amortized_bytes == own + shared // len(pop)
    # overall: mean over members of each method's byte-weighted mean error
    for method in ("unipack", "mean-only", "svd"):
        per_member = [m.errors[method] for m in r.members]
        expected = sum(x.mean for x in per_member if x is not None) / len(r.members)
        assert all(x is not None for x in per_member)
        assert r.overall["mean_error"][method] == pytest.approx(expected)


@pytest.mark.parametrize("key", ["rank3", "raw", "codec-none"])
def test_tensor_rows(bundles: dict[str, Path], pop: Population, key: str) -> None:
    """Per tensor: mean errors over members, who wins, the spectrum, and its stored bytes."""
    path = bundles[key]
    ours = independent_numbers(pop, path)
    doc = manifest_doc(path)
    records = {t["name"]: t for t in doc["tensors"]}
    originals = [{k: as64(v) for k, v in t.items() if v.is_floating_point()} for t in pop.tensors]
    with unipack.open(path) as b:
        r = report(b)
    assert [t.name for t in r.tensors] == [t["name"] for t in doc["tensors"]]
    for t in r.tensors:
        rec = records[t.name]
        assert t.storage == rec["storage"]
        if rec["storage"] == "shared" or rec.get("raw_cause") == "budget":
            for method, k in (("unipack", "unipack"), ("mean-only", "mean"), ("svd", "svd")):
                mine = sum(ours[n][k][t.name] for n in pop.names) / len(pop)
                assert t.errors[method] == pytest.approx(mine, rel=SVD_RTOL, abs=1e-12), (t.name, method)
            by_method = {m: float(t.errors[m] or 0.0) for m in ("mean-only", "unipack", "svd")}
            assert all(t.errors[m] is not None for m in by_method)
            best = min(by_method.values())
            cheapest_tie = next(m for m, v in by_method.items() if v <= best * 1.001 + 1e-12)
            assert t.winner == cheapest_tie
        else:
            assert t.errors == {"unipack": None, "mean-only": None, "svd": None} and t.winner is None
        if rec["storage"] != "shared":
            assert t.rank is None and t.spectrum == []
            continue
        assert t.rank == rec["rank"]
        ws = [o[t.name] for o in originals]
        mean = stored_mean(ws, torch.float32)
        eig, _ = spectrum(ws, mean, rec["scheme"], rec.get("side"))
        assert t.variance == pytest.approx(float(eig.sum()), rel=RECORDED)
        # (the smallest eigenvalues move by ~1e-8 with the float32 rounding of the mean)
        assert t.spectrum == pytest.approx(list(eig[: len(t.spectrum)]), rel=RECORDED, abs=1e-6 * eig[0])
        # the head the writer computed: the full spectrum (at most 128 values) or a randomized
        # head of at least the kept rank (format_spec/upk-v1.md, the shared record's ``spectrum``)
        assert t.rank <= len(t.spectrum) <= min(len(eig), 128)
        assert t.energy == pytest.approx(float(eig[: t.rank].sum() / eig.sum()), abs=1e-5)
        if key == "codec-none":  # mean + basis + every member's coefficients, all float32 and uncoded
            if rec["scheme"] == "flat":
                coef, basis = rec["rank"], rec["rank"] * math.prod(rec["shape"])
            else:
                m, n = rec["matrix"]
                coef = m * rec["rank"] if rec["side"] == "right" else rec["rank"] * n
                basis = (n if rec["side"] == "right" else m) * rec["rank"]
            assert t.stored_bytes == 4 * (math.prod(rec["shape"]) + basis + len(pop) * coef), t.name
    parts = expected_parts(path)
    blobs = sum(parts[p] for p in ("means", "bases", "coefficients", "raw", "exact"))
    assert abs(sum(t.stored_bytes for t in r.tensors) - blobs) <= len(r.tensors)  # coefficient shares rounded


def test_tensors_table(bundles: dict[str, Path]) -> None:
    path = bundles["rank3"]
    result = run("report", path, "--tensors")
    assert_ok(result)
    with unipack.open(path) as b:
        r = report(b)
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tensors: explained variance"))
    rows = {cells(line)[0]: cells(line) for line in lines[start:] if line.startswith("│")}
    labels = {"unipack": "unipack", "mean-only": "mean only", "svd": "per-member SVD", None: "-"}
    assert set(rows) == {t.name for t in r.tensors}
    for t in r.tensors:
        row = rows[t.name]
        assert row[1] == (f"shared/{t.scheme}" if t.scheme else t.storage)
        assert row[2] == ("-" if t.rank is None else str(t.rank))
        assert row[3] == ("-" if t.energy is None else f"{t.energy:.4f}")
        for cell, method in zip(row[6:9], ("unipack", "mean-only", "svd")):
            assert cell == ("-" if t.errors[method] is None else f"{t.errors[method]:.3g}")
        assert row[9] == labels[t.winner]
        if t.storage == "shared":
            assert len(row[4]) == min(len(t.spectrum), 24)
            if len(t.spectrum) <= 24 and sum(t.spectrum) >= 0.999 * t.variance:
                assert row[4][-1] == "█"  # a whole recorded spectrum: the scree reaches 100%


def check_recomputed(pop: Population, path: Path) -> None:
    ours = independent_numbers(pop, path)
    with unipack.open(path) as b:
        recorded = report(b)
        again = report(b, originals=pop.paths[0].parent, recompute=True)
    for i, (a, c) in enumerate(zip(recorded.members, again.members)):
        weights = member_weights(pop, i)
        for method, key in (("unipack", "unipack"), ("mean-only", "mean"), ("svd", "svd")):
            mine = ours[pop.names[i]][key]
            got, was = c.errors[method], a.errors[method]
            assert got is not None and was is not None
            assert (got.worst, got.mean) == pytest.approx((was.worst, was.mean), rel=1e-5), (method, got, was)
            assert got.worst == pytest.approx(max(mine.values()), rel=SVD_RTOL)
            assert got.mean == pytest.approx(weighted(mine, weights), rel=SVD_RTOL)
        assert c.delta_error == pytest.approx(a.delta_error, rel=1e-5)
    for before, after in zip(recorded.tensors, again.tensors):
        for method in ("unipack", "mean-only", "svd"):
            assert (before.errors[method] is None) == (after.errors[method] is None)
            if before.errors[method] is not None:
                assert after.errors[method] == pytest.approx(before.errors[method], rel=1e-5), (before.name, method)
        assert after.winner == before.winner


def test_recompute_matches_recorded(bundles: dict[str, Path], pop: Population) -> None:
    assert not budget_raw(bundles["raw"])
    check_recomputed(pop, bundles["raw"])


def test_recompute_matches_recorded_with_budget_raw_tensors(bundles: dict[str, Path], pop: Population) -> None:
    assert budget_raw(bundles["rank3"])  # enc.bias, x.head
    check_recomputed(pop, bundles["rank3"])


def test_no_baselines_until_recomputed(bundles: dict[str, Path], pop: Population, tmp_path: Path) -> None:
    path = bundles["no-baselines"]
    ours = independent_numbers(pop, path)
    with unipack.open(path) as b:
        assert all(m.fidelity is not None and m.fidelity.svd_errors is None for m in b.manifest.members)
        r = report(b)
        assert all(m.errors["svd"] is None for m in r.members)
        assert all(m.errors["mean-only"] is not None for m in r.members)
        assert r.overall["mean_error"]["svd"] is None
        assert all(t.errors["svd"] is None for t in r.tensors)
        with pytest.raises(InputError, match="needs the members' originals: add --originals DIR"):
            report(b, recompute=True)
        again = report(b, originals=pop.paths[0].parent, recompute=True)
    for i, m in enumerate(again.members):
        stats = m.errors["svd"]
        assert stats is not None
        values = ours[pop.names[i]]["svd"]
        assert stats.worst == pytest.approx(max(values.values()), rel=SVD_RTOL)
        assert stats.mean == pytest.approx(weighted(values, member_weights(pop, i)), rel=SVD_RTOL)
    doc = json.loads(run("report", path, "--json").stdout)
    assert all(m["baselines"]["svd"] is None and m["errors"]["svd"] is None for m in doc["members"])
    assert all(m["baselines"]["mean"] is not None for m in doc["members"])
    result = run("report", path, "--baselines")
    assert_one_line_error(result, "--originals DIR")
    result = run("report", path, "--baselines", "--originals", pop.paths[0].parent, "--json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    for i, m in enumerate(doc["members"]):
        values = ours[pop.names[i]]["svd"]
        assert m["baselines"]["svd"]["worst_error"] == pytest.approx(max(values.values()), rel=SVD_RTOL)


def test_delta_error_without_projected_tensors(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", report_specs(), n=3, seed=1)
    out = tmp_path / "lossless.upk"
    unipack.merge(pop.paths, out, max_error=0.0)  # everything raw or exact
    with unipack.open(out) as b:
        assert not any(t.storage == "shared" for t in b.manifest.tensors)
        r = report(b)
    assert all(m.errors["unipack"].worst == 0.0 for m in r.members)  # type: ignore[union-attr]
    assert all(m.delta_error is None for m in r.members), [m.delta_error for m in r.members]


# ------------------------------------------------------------------------------------------
# 4. who wins
# ------------------------------------------------------------------------------------------


def test_shared_structure_wins(tmp_path: Path) -> None:
    specs = {
        "a.weight": TensorSpec((16, 24), kind="right", rank=2, scale=0.3, noise=1e-4),
        "b.weight": TensorSpec((24, 16), kind="left", rank=2, scale=0.3, noise=1e-4),
    }
    pop = write_population(tmp_path / "in", specs, n=6, seed=8)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, rank=2)
    ours = independent_numbers(pop, out)
    with unipack.open(out) as b:
        r = report(b)
    assert r.overall["winner"] == "unipack"
    assert r.overall["tensors_won"] == {"unipack": 2, "mean-only": 0, "svd": 0}
    assert all(t.winner == "unipack" for t in r.tensors)
    # the winner by independent numbers too, by a wide margin
    for method in ("mean", "svd"):
        mine = [weighted(ours[n][method], member_weights(pop, i)) for i, n in enumerate(pop.names)]
        unip = [weighted(ours[n]["unipack"], member_weights(pop, i)) for i, n in enumerate(pop.names)]
        assert sum(mine) > 10 * sum(unip)
    result = run("report", out)
    assert_ok(result)
    ours_mean = r.overall["mean_error"]["unipack"]
    verdict = next(line for line in result.output.splitlines() if "shared subspace wins" in line)
    assert f"mean error {ours_mean:.3g}" in verdict
    assert "lower than the mean alone" in verdict and "lower than per-member SVD at equal bytes" in verdict


def test_rank_zero_means_the_mean_alone_wins(bundles: dict[str, Path], pop: Population) -> None:
    path = bundles["rank0"]
    with unipack.open(path) as b:
        r = report(b)
        shared = [t for t in b.manifest.tensors if t.storage == "shared"]
        assert shared and all(t.rank == 0 for t in shared)
    assert r.overall["winner"] == "mean-only"  # a tie goes to the cheaper method
    assert r.overall["tensors_won"]["mean-only"] == len(shared)
    assert r.overall["tensors_won"]["unipack"] == r.overall["tensors_won"]["svd"] == 0
    mean_err = r.overall["mean_error"]
    assert mean_err["unipack"] == pytest.approx(mean_err["mean-only"], rel=RECORDED)
    assert mean_err["svd"] == pytest.approx(mean_err["mean-only"], rel=RECORDED)
    result = run("report", path)
    assert_ok(result)
    assert "the mean alone does as well" in result.output
    assert "shared subspace wins" not in result.output
    result = run("report", path, "--json")
    assert json.loads(result.stdout)["overall"]["winner"] == "mean-only"


# ------------------------------------------------------------------------------------------
# 5. the eval hook
# ------------------------------------------------------------------------------------------

EVAL_SOURCE = """
    import os

    import numpy as np
    import torch

    LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")

    def evaluate(state_dict, member_name):
        with open(LOG, "a") as f:
            f.write(member_name + "\\n")
        score = 0.0
        size = 0.0
        for i, name in enumerate(sorted(state_dict)):
            t = state_dict[name]
            if not t.is_floating_point():
                continue
            v = t.detach().to(torch.float64).numpy().ravel()
            probe = np.cos(np.arange(v.size) * (i + 1.0))
            score += float(v @ probe)
            size += float(np.abs(v).sum())
        return {"score": score, "size": size}
"""


def write_eval(directory: Path, source: str = EVAL_SOURCE, name: str = "score_eval.py") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def calls(eval_path: Path) -> list[str]:
    log = eval_path.parent / "calls.log"
    return log.read_text().split() if log.exists() else []


def load_function(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("independent_eval_copy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


def independent_scores(pop: Population, path: Path, fn: Any) -> dict[str, dict[str, dict[str, float]]]:
    """Each column of the eval table, computed here."""
    doc = manifest_doc(path)
    tensors = {t["name"]: t for t in doc["tensors"]}
    originals = [{k: as64(v) for k, v in t.items() if v.is_floating_point()} for t in pop.tensors]
    out = {}
    with unipack.open(path) as b:
        for i, name in enumerate(pop.names):
            raw = doc["members"][i]["raw"]
            original = load_file(str(pop.paths[i]))
            mean_only = dict(original)
            svd = dict(original)
            for tname, rec in tensors.items():
                replaced = rec["storage"] == "shared" and tname not in raw
                if not replaced and not (rec["storage"] == "raw" and rec.get("raw_cause") == "budget"):
                    continue  # exact, or raw for a reason the mean alone would keep too
                w = originals[i][tname]
                mean = stored_mean([o[tname] for o in originals], torch.float32)
                mean_only[tname] = torch.from_numpy(mean.astype(np.float32))
                if not replaced:  # kept raw for its bytes: the SVD at those bytes is the tensor
                    continue
                r = svd_rank(rec, len(pop))
                d = (w - mean).reshape(view(w.shape))
                approx = mean
                if r:
                    u, s, vt = np.linalg.svd(d, full_matrices=False)
                    approx = mean + ((u[:, :r] * s[:r]) @ vt[:r]).reshape(w.shape)
                svd[tname] = torch.from_numpy(approx.astype(np.float32))
            out[name] = {
                "original": fn(original, name),
                "unipack": fn(b.load(name), name),
                "mean-only": fn(mean_only, name),
                "svd": fn(svd, name),
            }
    return out


def scale_of(pop: Population, i: int) -> float:
    """Size of the score: sum of ||t||_1, a bound on |score| and on its rounding noise."""
    return sum(float(t.to(torch.float64).abs().sum()) for t in pop.tensors[i].values() if t.is_floating_point())


def test_eval_hook_calls_and_scores(tmp_path: Path, bundles: dict[str, Path], pop: Population) -> None:
    path = bundles["rank3"]
    eval_path = write_eval(tmp_path / "ev")
    hook = load_eval(str(eval_path))
    with unipack.open(path) as b:
        with_originals = report(b, originals=pop.paths[0].parent, hook=hook)
        assert sorted(calls(eval_path)) == sorted(pop.names * 4)
        (eval_path.parent / "calls.log").unlink()
        without = report(b, hook=hook)
        assert sorted(calls(eval_path)) == sorted(pop.names * 2)
    mine = independent_scores(pop, path, load_function(eval_path))
    ev = with_originals.evaluation
    assert ev is not None and ev["metric"] == "score" and ev["eval"] == str(eval_path)
    for i, name in enumerate(pop.names):
        row = ev["members"][name]
        tol = 1e-7 * scale_of(pop, i)  # float32 rounding of the SVD's factors, far below the gaps
        assert row["original"] == mine[name]["original"]
        assert row["unipack"] == mine[name]["unipack"]
        assert row["mean-only"]["score"] == pytest.approx(mine[name]["mean-only"]["score"], abs=tol / 100)
        assert row["svd"]["score"] == pytest.approx(mine[name]["svd"]["score"], abs=tol)
        # the columns really differ (the comparisons above could otherwise not fail)
        scores = sorted(mine[name][c]["score"] for c in ("original", "unipack", "mean-only", "svd"))
        assert min(b - a for a, b in itertools.pairwise(scores)) > 100 * tol, scores
        assert with_originals.members[i].metrics == {k: v for k, v in row.items() if v is not None}
        # without originals: only what the bundle alone gives
        row2 = without.evaluation["members"][name]  # type: ignore[index]
        assert row2["original"] is None and row2["svd"] is None
        assert row2["unipack"] == mine[name]["unipack"]
    for column in ("unipack", "mean-only", "svd"):
        drops = [mine[n]["original"]["score"] - mine[n][column]["score"] for n in pop.names]
        assert ev["drops"][column]["worst"] == pytest.approx(max(drops), abs=1e-4 * scale_of(pop, 0))
        assert ev["drops"][column]["mean"] == pytest.approx(sum(drops) / len(drops), abs=1e-4 * scale_of(pop, 0))
        assert ev["drops"][column]["members"] == len(pop)
    assert without.evaluation["drops"] == {"unipack": None, "mean-only": None, "svd": None}  # type: ignore[index]


def test_eval_through_the_cli(tmp_path: Path, bundles: dict[str, Path], pop: Population) -> None:
    path = bundles["rank3"]
    eval_path = write_eval(tmp_path / "ev")
    result = run("report", path, "--eval", eval_path, "--originals", pop.paths[0].parent, "--metric", "size")
    assert_ok(result)
    assert len(calls(eval_path)) == 4 * len(pop)
    mine = independent_scores(pop, path, load_function(eval_path))
    text = result.output
    assert "size by member" in text
    for name in pop.names:
        row = next(
            cells(x) for x in text.splitlines() if x.startswith("│") and cells(x)[0] == name and len(cells(x)) == 5
        )
        orig = mine[name]["original"]["size"]
        assert row[1] == f"{orig:.4g}"
        for cell, column in zip(row[2:], ("unipack", "mean-only", "svd")):
            value = mine[name][column]["size"]
            assert cell == f"{value:.4g} ({value - orig:+.3g})", (column, row)
    drops = [mine[n]["original"]["size"] - mine[n]["mean-only"]["size"] for n in pop.names]
    summary = next(cells(x) for x in text.splitlines() if "largest / mean drop" in x)
    assert summary[3] == f"{max(drops):.3g} / {sum(drops) / len(drops):.3g}"
    result = run("report", path, "--eval", eval_path, "--originals", pop.paths[0].parent, "--json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    ev = doc["evaluation"]
    assert ev["metric"] == "score"
    for i, name in enumerate(pop.names):
        assert ev["members"][name]["original"] == mine[name]["original"]
        assert ev["members"][name]["unipack"] == mine[name]["unipack"]
        assert doc["members"][i]["metrics"]["unipack"] == mine[name]["unipack"]
    drops = [mine[n]["original"]["score"] - mine[n]["unipack"]["score"] for n in pop.names]
    assert ev["drops"]["unipack"]["worst"] == pytest.approx(max(drops))


BAD_EVALS = {
    "raises": (
        "def evaluate(state_dict, member_name):\n    raise ValueError('the eval broke')\n",
        ["ValueError: the eval broke", "member 'ft0'"],
    ),
    "list": (
        "def evaluate(state_dict, member_name):\n    return [1.0]\n",
        ["returned list, expected dict[str, float]"],
    ),
    "nan": (
        "def evaluate(state_dict, member_name):\n    return {'acc': float('nan')}\n",
        ["metric 'acc' is nan", "finite"],
    ),
    "syntax": ("def evaluate(state_dict, member_name)\n    return {}\n", ["syntax error in", "line 1"]),
}


@pytest.mark.parametrize("kind", sorted(BAD_EVALS))
def test_bad_eval_is_one_line(tmp_path: Path, bundles: dict[str, Path], kind: str) -> None:
    source, mentions = BAD_EVALS[kind]
    eval_path = write_eval(tmp_path, source, f"bad_{kind}.py")
    result = run("report", bundles["rank3"], "--eval", eval_path)
    assert_one_line_error(result, str(eval_path), *mentions)


def test_eval_file_missing_and_unknown_metric(tmp_path: Path, bundles: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere" / "eval.py"
    assert_one_line_error(run("report", bundles["rank3"], "--eval", missing), str(missing), "not found")
    eval_path = write_eval(tmp_path / "ev")
    result = run("report", bundles["rank3"], "--eval", eval_path, "--metric", "bogus")
    assert_one_line_error(result, "no metric 'bogus'", "'score', 'size'")


def test_originals_not_usable(tmp_path: Path, bundles: dict[str, Path], pop: Population) -> None:
    eval_path = write_eval(tmp_path / "ev")
    not_dir = pop.paths[0]
    result = run("report", bundles["rank3"], "--eval", eval_path, "--originals", not_dir)
    assert_one_line_error(result, str(not_dir), "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("report", bundles["rank3"], "--eval", eval_path, "--originals", empty)
    assert_one_line_error(result, str(empty), "none of the members' source files", pop.paths[0].name)
    result = run("report", bundles["rank3"], "--baselines", "--originals", tmp_path / "missing")
    assert_one_line_error(result, "not a directory")
    assert calls(eval_path) == []  # nothing was scored before the error
    # a file with a member's name that is not its original
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    save_file({"something.else": torch.zeros(3)}, str(impostor / pop.paths[0].name))
    result = run("report", bundles["rank3"], "--eval", eval_path, "--originals", impostor)
    assert_one_line_error(result, str(impostor / pop.paths[0].name), "tensor names differ", "'ft0'")


# ------------------------------------------------------------------------------------------
# 6. --json carries what the terminal shows
# ------------------------------------------------------------------------------------------


def test_json_carries_every_number(bundles: dict[str, Path], pop: Population) -> None:
    path = bundles["raw"]
    result = run("report", path, "--json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    text = run("report", path)
    assert_ok(text)
    out = text.output
    with unipack.open(path) as b:
        r = report(b)
    assert doc["bytes"]["parts"] == expected_parts(path)
    assert doc["bytes"]["ratio"] == pytest.approx(r.bytes.ratio)
    assert f"{doc['bytes']['ratio']:.2f}x" in out
    assert doc["worst_error"] == max(m.errors["unipack"].worst for m in r.members)  # type: ignore[union-attr]
    assert f"{doc['worst_error']:.3g}" in out
    ours = independent_numbers(pop, path)
    for i, m in enumerate(doc["members"]):
        name = pop.names[i]
        assert m["name"] == name
        weights = member_weights(pop, i)
        assert m["worst_error"] == pytest.approx(max(ours[name]["unipack"].values()), rel=1e-6)
        assert m["mean_error"] == pytest.approx(weighted(ours[name]["unipack"], weights), rel=1e-6)
        assert m["baselines"]["mean"]["worst_error"] == pytest.approx(max(ours[name]["mean"].values()), rel=RECORDED)
        assert m["baselines"]["svd"]["mean_error"] == pytest.approx(weighted(ours[name]["svd"], weights), rel=SVD_RTOL)
        assert m["delta_error"] is not None
        row = next(line for line in out.splitlines() if line.startswith(f"│ {name} "))
        for value in (m["worst_error"], m["mean_error"], m["delta_error"]):
            assert f"{value:.3g}" in row, (value, row)
    for method, label in (("unipack", "unipack"), ("mean-only", "mean only"), ("svd", "per-member SVD")):
        row = next(line for line in out.splitlines() if line.startswith(f"│ {label} "))
        assert f"{doc['overall']['mean_error'][method]:.3g}" in row
        worst = max(m["errors"][method]["worst"] for m in doc["members"])
        assert f"{worst:.3g}" in row
        assert f" {doc['overall']['tensors_won'][method]} " in row


# ------------------------------------------------------------------------------------------
# 7. one member's tensors
# ------------------------------------------------------------------------------------------


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_member_tensors_table(bundles: dict[str, Path], pop: Population) -> None:
    path = bundles["rank3"]
    member = pop.names[2]
    result = run("report", path, "--member", member, "--tensors")
    assert_ok(result)
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if f"member {member}: per tensor" in line)
    header = next(cells(line.replace("┃", "│")) for line in lines[start:] if line.startswith("┃"))
    rows = [cells(line) for line in lines[start:] if line.startswith("│")]
    assert header == ["tensor", "storage", "rank", "unipack", "delta lost", "mean only", "SVD", "SVD rank"]
    ours = independent_numbers(pop, path)[member]
    doc = manifest_doc(path)
    assert [row[0] for row in rows] == [t["name"] for t in doc["tensors"]]  # one line per tensor
    rec = next(m for m in doc["members"] if m["name"] == member)
    f = rec["fidelity"]
    for j, (row, t) in enumerate(zip(rows, doc["tensors"])):
        name = t["name"]
        # each cell shows the recorded number (3 digits), and the recorded number is right
        assert row[3] == (f"{rec['errors'][j]:.3g}" if rec["errors"][j] else "0")
        assert rec["errors"][j] == pytest.approx(ours["unipack"][name], rel=1e-6, abs=1e-12)
        if t["storage"] == "shared":
            assert row[1] == "shared" and row[2] == str(t["rank"])
            for cell, key, k, tol in (
                (row[4], "delta_errors", "delta", RECORDED),
                (row[5], "mean_errors", "mean", RECORDED),
                (row[6], "svd_errors", "svd", SVD_RTOL),
            ):
                assert cell == f"{f[key][j]:.3g}", (name, key)
                assert f[key][j] == pytest.approx(ours[k][name], rel=tol), (name, key)
            assert row[7] == str(int(ours["rank"][name])) == str(f["svd_ranks"][j])
        elif t.get("raw_cause") == "budget":
            # kept raw for its bytes: the mean alone would have replaced it, so its mean-only error shows
            assert row[1] == "raw (budget)" and row[2] == row[4] == row[6] == row[7] == "-"
            assert row[5] == f"{f['mean_errors'][j]:.3g}" and f["mean_errors"][j] > 0
        else:
            cause = f" ({t['raw_cause']})" if t.get("raw_cause") else ""
            assert row[1] == t["storage"] + cause and row[2] == row[4] == row[5] == row[6] == row[7] == "-"


def test_unknown_member(bundles: dict[str, Path], pop: Population) -> None:
    result = run("report", bundles["rank3"], "--member", "nobody", "--tensors")
    assert_one_line_error(result, "no member 'nobody'", "members: " + ", ".join(pop.names))


# ------------------------------------------------------------------------------------------
# 8. --png
# ------------------------------------------------------------------------------------------


def test_png(tmp_path: Path, bundles: dict[str, Path]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "report.png"
    png.parent.mkdir()
    result = run("report", bundles["rank3"], "--png", png)
    assert_ok(result)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"plots written to {png}" in result.output
    assert sorted(p.name for p in png.parent.iterdir()) == ["report.png"]


def _adapter_folders(root: Path, n: int = 8, r: int = 4) -> list[Path]:
    """Hand-made PEFT adapters: module "shared" in a common 2-dim update space (a subspace
    record), module "private" random per adapter (kept as its factors)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    u, v = np.linalg.qr(rng.standard_normal((48, 2)))[0], np.linalg.qr(rng.standard_normal((40, 2)))[0]
    paths = []
    for i in range(n):
        folder = root / f"ad{i}"
        folder.mkdir(parents=True)
        tensors = {
            "base_model.model.shared.lora_A.weight": (rng.standard_normal((r, 2)) @ v.T).astype(np.float32),
            "base_model.model.shared.lora_B.weight": (u @ rng.standard_normal((2, r))).astype(np.float32),
            "base_model.model.private.lora_A.weight": rng.standard_normal((r, 40)).astype(np.float32),
            "base_model.model.private.lora_B.weight": rng.standard_normal((48, r)).astype(np.float32),
            "base_model.model.head.weight": rng.standard_normal((3, 48)).astype(np.float32),
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": r,
                    "lora_alpha": 8,
                    "target_modules": ["shared", "private"],
                    "modules_to_save": ["head"],
                }
            )
        )
        paths.append(folder)
    return paths


def test_byte_parts_of_a_lora_bundle(tmp_path: Path) -> None:
    """U and V are bases, cores coefficients, kept factors their own part, heads raw."""
    paths = _adapter_folders(tmp_path / "adapters")
    path = tmp_path / "lora.upk"
    unipack.merge(paths, path, max_error=1e-4)
    with unipack.open(path) as b:
        forms = {t.name: t.form for t in b.manifest.tensors if t.storage == "lora"}
        r = report(b)
    assert forms == {"base_model.model.shared": "subspace", "base_model.model.private": "factors"}
    expected = expected_parts(path)
    assert r.bytes.parts == expected
    assert expected["bases"] > 0 and expected["coefficients"] > 0 and expected["factors"] > 0 and expected["raw"] > 0
    assert sum(r.bytes.parts.values()) == os.path.getsize(path)
