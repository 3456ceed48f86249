"""The alternatives a merge measures (``stats.alternatives``, spec §3.6) and the report's verdict,
checked against an independent numpy computation on a small population: every method's bytes
from the shapes, every member's error from a hand-written quantizer, which tensors meet the
rule, the paper's rows PCA from an SVD of the stacked centred rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TensorSpec, as64, read_raw_header, rewrite_header, write_population

import unipack
from unipack.cli import cli
from unipack.format.manifest import parse as manifest_json

SPECS = {
    "embed.weight": TensorSpec((40, 12), kind="noise", scale=0.02),
    "layer.weight": TensorSpec((24, 36), kind="right", rank=3, scale=0.05),
    "layer.bias": TensorSpec((24,), kind="noise", scale=1e-5, noise=0.0),  # next to the floor: 1 bit will do
    "norm.weight": TensorSpec((12,), kind="same"),
    "head.weight": TensorSpec((3, 12), kind="head"),
}
SHARED = ("embed.weight", "layer.weight", "layer.bias")
N = 5


def _meets(e: float, w: np.ndarray, center: np.ndarray) -> bool:
    """The default rule: within 5% of the weight, and within 40% of the delta from the members'
    mean unless the error is below 2^-11 of the weight (the delta bound's floor, spec §4.3)."""
    norm = float(np.linalg.norm(w))
    return e <= 0.05 * norm and (e <= 0.4 * float(np.linalg.norm(w - center)) or e <= 2.0**-11 * norm)


def _int_delta(x: np.ndarray, mean: np.ndarray, bits: int) -> np.ndarray:
    """Per-row absmax at ``bits`` (fp16 scales), written out independently of unipack."""
    rows = x.shape[0] if x.ndim > 1 else 1
    d = (x - mean).reshape(rows, -1)
    top = 2 ** (bits - 1) - 1
    scale = np.array([float(np.float16(np.abs(r).max() / top)) for r in d])
    q = np.zeros_like(d)
    for j, r in enumerate(d):
        if scale[j] > 0:
            q[j] = np.clip(np.round(r / scale[j]), -top, top) * scale[j]
    return mean + q.reshape(x.shape)


def _sign_delta(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    d = x - mean
    return mean + np.where(d >= 0, 1.0, -1.0) * float(np.float16(np.abs(d).mean()))


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(np.float64)


def _approx(method: str, x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    if method == "fp16":
        return x.astype(np.float16).astype(np.float64)
    if method == "1-bit":
        return _f32(_sign_delta(x, mean))
    return _f32(_int_delta(x, mean, {"int8": 8, "int4": 4, "int2": 2}[method]))


def _paper(ws: list[np.ndarray], k: int = 16) -> tuple[int, list[float]]:
    """Rows PCA on the cheaper side: bytes at fp32 and each member's relative error (float64,
    so agreement with unipack's fp32-rounded basis and coefficients is to ~1e-6)."""
    mean = _f32(np.mean(ws, axis=0))
    m, n = ws[0].reshape(ws[0].shape[0], -1).shape if ws[0].ndim > 1 else (1, ws[0].size)
    best = None
    for side in ("right", "left"):
        views = [(w - mean).reshape(m, n) if side == "right" else (w - mean).reshape(m, n).T for w in ws]
        rows, length = views[0].shape
        rank = min(k, min(len(ws) * rows, length))
        size = 4 * (m * n + length * rank + len(ws) * rows * rank)
        if best is None or size < best[0]:
            best = (size, side, views, rank)
    assert best is not None
    size, _, views, rank = best
    _, _, vt = np.linalg.svd(np.concatenate(views), full_matrices=False)
    basis = vt[:rank].T
    errors = [
        float(np.linalg.norm(v - v @ basis @ basis.T) / np.linalg.norm(w)) for v, w in zip(views, ws, strict=True)
    ]
    return size, errors


def _paper_totals(values: list[dict[str, np.ndarray]], names: tuple[str, ...]) -> tuple[int, list[float], list[float]]:
    """The recipe by SVD over ``names``: its bytes, and per member sum ||W - What||^2 and ||W||^2."""
    size, err2, norm2 = 0, [0.0] * len(values), [0.0] * len(values)
    for name in names:
        ws = [v[name] for v in values]
        s, errors = _paper(ws)
        size += s
        for i, (e, w) in enumerate(zip(errors, ws, strict=True)):
            err2[i] += (e * np.linalg.norm(w)) ** 2
            norm2[i] += float(np.sum(w * w))
    return size, err2, norm2


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]], dict]:
    tmp = tmp_path_factory.mktemp("alternatives")
    pop = write_population(tmp / "in", SPECS, n=N, seed=3)
    out = tmp / "b.upk"
    unipack.merge(pop.paths, out, lossless="off")
    header, _ = read_raw_header(out)
    stats = json.loads(header["__metadata__"]["manifest"])["stats"]["alternatives"]
    values = [{k: as64(v) for k, v in member.items()} for member in pop.tensors]
    return out, values, stats


@pytest.mark.parametrize("method", ["fp16", "int8", "int4", "int2", "1-bit"])
def test_bytes_errors_and_met_tensors_match_numpy(merged, method: str) -> None:
    _, values, stats = merged
    recorded = stats["methods"][method]
    err2, norm2 = [0.0] * N, [0.0] * N
    size = met = 0
    for name in SHARED:
        ws = [v[name] for v in values]
        numel, rows = ws[0].size, (ws[0].shape[0] if ws[0].ndim > 1 else 1)
        center = np.mean(ws, axis=0)
        mean = _f32(center)
        if method == "fp16":
            size += N * numel * 2
        else:
            bits = {"int8": 8, "int4": 4, "int2": 2, "1-bit": 1}[method]
            scales = rows if bits > 1 else 1
            size += numel * 4 + N * (math.ceil(numel * bits / 8) + 2 * scales)
        ok = True
        for i, w in enumerate(ws):
            e = float(np.linalg.norm(w - _approx(method, w, mean)))
            err2[i] += e * e
            norm2[i] += float(np.sum(w * w))
            ok &= _meets(e, w, center)
        met += ok
    heads = sum(v["head.weight"].size for v in values)
    size += 12 * (2 if method == "fp16" else 4)  # norm.weight: identical, once
    size += heads * (2 if method == "fp16" else 4)  # heads: per member
    assert recorded["bytes"] == size
    assert recorded["tensors_met"] == met
    expected = [math.sqrt(e / n) for e, n in zip(err2, norm2, strict=True)]
    np.testing.assert_allclose(recorded["errors"], expected, rtol=2e-5)
    assert stats["tensors"] == len(SHARED)


def test_paper_recipe_matches_an_svd_of_the_stacked_rows(merged) -> None:
    _, values, stats = merged
    size, err2, norm2 = _paper_totals(values, SHARED)
    size += 4 * 12 + 4 * sum(v["head.weight"].size for v in values)
    recorded = stats["methods"]["paper-k16"]
    assert recorded["bytes"] == size
    np.testing.assert_allclose(recorded["errors"], [math.sqrt(e / n) for e, n in zip(err2, norm2)], rtol=1e-4)


def test_cheapest_per_tensor_is_the_smallest_that_meets_the_rule(merged) -> None:
    _, values, stats = merged
    chosen = set()
    for name in SHARED:
        method, size = stats["cheapest"][name]
        ws = [v[name] for v in values]
        center = np.mean(ws, axis=0)
        numel, rows = ws[0].size, (ws[0].shape[0] if ws[0].ndim > 1 else 1)
        sizes = {
            "fp16": N * numel * 2,
            "int8": numel * 4 + N * (numel + 2 * rows),
            "int4": numel * 4 + N * (math.ceil(numel / 2) + 2 * rows),
            "int2": numel * 4 + N * (math.ceil(numel / 4) + 2 * rows),
            "1-bit": numel * 4 + N * (math.ceil(numel / 8) + 2),
        }
        meeting = {}
        for m, cost in sizes.items():
            errors = [np.linalg.norm(w - _approx(m, w, _f32(center))) for w in ws]
            if all(_meets(e, w, center) for e, w in zip(errors, ws, strict=True)):
                meeting[m] = cost
        if method == "paper-k16":
            assert size < min(meeting.values(), default=math.inf)
        else:
            assert method == min(meeting, key=meeting.__getitem__) and size == meeting[method]
        chosen.add(method)
    assert len(chosen) >= 2  # the population is built so that different tensors pick different methods


def test_report_and_merge_json_name_the_winner(merged) -> None:
    out, _, stats = merged
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "instead of unipack" in result.output
    doc = json.loads(runner.invoke(cli, ["report", str(out), "--json"]).output)
    a = doc["alternatives"]
    met = {m: s for m, s in stats["methods"].items() if s["tensors_met"] == stats["tensors"]}
    expected = min(met, key=lambda m: met[m]["bytes"]) if met else None
    assert a["smallest_met"] == expected
    assert [r["method"] for r in a["rows"]] == ["fp16", "int8", "int4", "int2", "1-bit", "paper-k16"]
    file = out.stat().st_size
    verdict = "smaller than the smallest alternative" if expected and file <= met[expected]["bytes"] else ""
    if verdict:
        assert verdict in " ".join(result.output.split())
    # the bundle's own error over the same tensors, from its recorded errors and norms
    assert len(a["bundle_errors"]) == N and all(0 < e <= 0.05 for e in a["bundle_errors"])


def test_no_baselines_records_no_alternatives(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", SPECS, n=3, seed=1)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off", baselines=False)
    header, _ = read_raw_header(out)
    assert "alternatives" not in json.loads(header["__metadata__"]["manifest"])["stats"]
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0 and "instead of unipack" not in result.output


def test_rank_rule_compares_with_the_bundles_own_errors(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", SPECS, n=3, seed=2)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off", rank=1)
    with unipack.open(out) as b:
        stats = b.manifest.stats["alternatives"]
        own = {t.name: [m.errors[i] for m in b.manifest.members] for i, t in enumerate(b.manifest.tensors)}
    values = [{k: as64(v) for k, v in member.items()} for member in pop.tensors]
    met = 0
    for name in SHARED:
        ws = [v[name] for v in values]
        approx = [w.astype(np.float16).astype(np.float64) for w in ws]
        met += all(
            np.linalg.norm(w - a) / np.linalg.norm(w) <= e * (1 + 1e-9) + 1e-12
            for w, a, e in zip(ws, approx, own[name], strict=True)
        )
    assert stats["methods"]["fp16"]["tensors_met"] == met
    doc = json.loads(CliRunner().invoke(cli, ["report", str(out), "--json"]).output)
    assert doc["alternatives"]["rule"] == "at least this bundle's accuracy"


def _edit_stats(path: Path, edit) -> None:
    import hashlib

    header, _ = read_raw_header(path)
    doc = json.loads(header["__metadata__"]["manifest"])
    edit(doc["stats"])
    text = manifest_json.to_json(manifest_json.from_json(doc, str(path)))
    header["__metadata__"]["manifest"] = text
    header["__metadata__"]["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    rewrite_header(path, header)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["alternatives"].update(tensors="3"),
        lambda s: s["alternatives"]["methods"].pop("int4"),
        lambda s: s["alternatives"]["methods"]["fp16"].update(errors=[0.1]),
        lambda s: s["alternatives"]["cheapest"].update({"no.such.tensor": ["int8", 4]}),
        lambda s: s["alternatives"]["cheapest"].update({"layer.bias": ["gzip", 4]}),
        lambda s: s.update(alternatives=[1, 2]),
    ],
)
def test_malformed_alternatives_are_ignored_not_trusted(tmp_path: Path, merged, edit) -> None:
    out, _, _ = merged
    copy = tmp_path / "b.upk"
    copy.write_bytes(out.read_bytes())
    _edit_stats(copy, edit)
    result = CliRunner().invoke(cli, ["report", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["alternatives"] is None
    assert all(t["alternative"] is None for t in doc["tensors"])


def test_add_leaves_the_merge_time_comparison_out(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", SPECS | {"head.weight": TensorSpec((3, 12), kind="noise")}, n=4, seed=5)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths[:3], out, lossless="off")
    unipack.add(out, pop.paths[3])
    doc = json.loads(CliRunner().invoke(cli, ["report", str(out), "--json"]).output)
    assert doc["alternatives"] is None  # measured on 3 members; the bundle now holds 4


@pytest.mark.parametrize("exact_side", [0, 10**6], ids=["randomized", "exact-gram"])
def test_paper_recipe_randomized_or_exact_matches_the_svd(tmp_path: Path, monkeypatch, exact_side: int) -> None:
    """Sides longer than ``PAPER_EXACT_SIDE`` take the recipe's basis from subspace iteration on
    the members (no Gram formed), shorter ones from the Gram: both agree with an SVD of the
    stacked centred rows, bytes exactly, errors to the fp32 rounding of basis and coefficients."""
    import unipack.pack.alternatives as alternatives

    monkeypatch.setattr(alternatives, "PAPER_EXACT_SIDE", exact_side)
    specs = {
        "wide.weight": TensorSpec((48, 160), kind="right", rank=6, scale=0.05),
        "tall.weight": TensorSpec((150, 20), kind="left", rank=4, scale=0.05),
        "noisy.weight": TensorSpec((30, 140), kind="noise", scale=0.02),
    }
    pop = write_population(tmp_path / "in", specs, n=4, seed=11)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off", jobs=1)
    header, _ = read_raw_header(out)
    recorded = json.loads(header["__metadata__"]["manifest"])["stats"]["alternatives"]["methods"]["paper-k16"]
    values = [{k: as64(v) for k, v in member.items()} for member in pop.tensors]
    size, err2, norm2 = _paper_totals(values, tuple(specs))
    assert recorded["bytes"] == size
    best = [math.sqrt(e / n) for e, n in zip(err2, norm2)]
    np.testing.assert_allclose(recorded["errors"], best, rtol=1e-2)
    got = sum((e * e) * n for e, n in zip(recorded["errors"], norm2))
    assert sum(err2) * (1 - 1e-5) <= got <= sum(err2) * 1.02
