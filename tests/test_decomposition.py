"""unipack's decompositions against an independent numpy SVD.

For a fixed rank k the best rank-k approximation of the centred members in the chosen scheme is
unique (given a spectral gap): stack the centred members (rows of D_i for ``rows``/right, rows
of D_i^T for ``rows``/left, vec(D_i) for ``flat``), take the top-k right singular vectors V_k,
and project: Ŵ_i = M + D_i V_k V_k^T. unipack must reproduce that up to the rounding of its
float32 basis and coefficients.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TensorSpec,
    as64,
    mean_torch_dtype,
    optimal_reconstructions,
    rel_error,
    spectrum,
    stored_mean,
    write_population,
)

import unipack

TOL = 1e-5  # relative to ||D_i||: float32 basis/coefficients, output rounding


def _member_values(pop, name: str) -> list[np.ndarray]:
    return [as64(m[name]) for m in pop.tensors]


def _mean(pop, name: str) -> np.ndarray:
    return stored_mean(_member_values(pop, name), mean_torch_dtype([m[name].dtype for m in pop.tensors]))


def _check_optimal(
    pop,
    bundle_path: Path,
    name: str,
    *,
    expect_scheme: str,
    expect_side: str | None,
    expect_rank: int | None = None,
    min_truncation: float = 1e-2,
) -> None:
    """unipack's reconstruction of ``name`` == numpy's optimal projection at the recorded rank."""
    with unipack.open(bundle_path) as b:
        j = b.tensor_names.index(name)
        t = b.manifest.tensors[j]
        assert t.storage == "shared", t.reason
        assert t.scheme == expect_scheme
        assert t.side == expect_side
        if expect_rank is not None:
            assert t.rank == expect_rank
        ws = _member_values(pop, name)
        mean = _mean(pop, name)
        if t.scheme == "rows":
            shape = ws[0].shape
            assert t.matrix == (shape[0], int(np.prod(shape[1:])))
        eig, _ = spectrum(ws, mean, t.scheme, t.side)
        expected = optimal_reconstructions(ws, mean, t.scheme, t.side, t.rank)
        # the recorded energy is the fraction of the centred variance the top-k keep
        assert t.energy == pytest.approx(eig[: t.rank].sum() / eig.sum(), abs=2e-6)
        truncations = []
        for i, member in enumerate(b.members):
            got = as64(b.load(member)[name])
            d_norm = np.linalg.norm((ws[i] - mean).ravel())
            diff = np.linalg.norm((got - expected[i]).ravel())
            assert diff <= TOL * d_norm, (member, diff / d_norm)
            # the recorded error is the optimal projection's error (up to the same rounding)
            recorded = b.manifest.member(member).errors[j]
            assert recorded == pytest.approx(rel_error(ws[i], expected[i]), rel=1e-3, abs=1e-7)
            truncations.append(np.linalg.norm((ws[i] - expected[i]).ravel()) / d_norm)
        # the truncation is substantial, so a wrong subspace could not pass the check above
        assert max(truncations) >= min_truncation, truncations


# ------------------------------------------------------------------------------------------
# fixed rank: rows, both sides; flat
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_right_fixed_rank_is_optimal_projection(tmp_path: Path, dtype: str) -> None:
    specs = {"wide": TensorSpec((10, 30), dtype=dtype, kind="right", rank=6, decay=0.7, noise=1e-3)}
    pop = write_population(tmp_path / "in", specs, n=5, seed=31)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, scheme="rows", rank=3, codec="none", dtype="float32")
    _check_optimal(pop, out, "wide", expect_scheme="rows", expect_side="right", expect_rank=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_left_fixed_rank_is_optimal_projection(tmp_path: Path, dtype: str) -> None:
    specs = {"tall": TensorSpec((30, 10), dtype=dtype, kind="left", rank=6, decay=0.7, noise=1e-3)}
    pop = write_population(tmp_path / "in", specs, n=5, seed=32)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, scheme="rows", rank=3, codec="none", dtype="float32")
    _check_optimal(pop, out, "tall", expect_scheme="rows", expect_side="left", expect_rank=3)


def test_rows_nd_kernel_uses_first_dim_by_rest(tmp_path: Path) -> None:
    specs = {
        "conv": TensorSpec((6, 3, 2, 2), kind="right", rank=5, decay=0.6, noise=1e-3),  # 6 x 12 -> right
        "conv_t": TensorSpec((24, 2, 3), kind="left", rank=5, decay=0.6, noise=1e-3),  # 24 x 6 -> left
    }
    pop = write_population(tmp_path / "in", specs, n=4, seed=33)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, scheme="rows", rank=2, codec="none")
    _check_optimal(pop, out, "conv", expect_scheme="rows", expect_side="right", expect_rank=2)
    _check_optimal(pop, out, "conv_t", expect_scheme="rows", expect_side="left", expect_rank=2)


@pytest.mark.parametrize("shape", [(40,), (8, 9), (3, 4, 5)])
def test_flat_fixed_rank_is_top_principal_components(tmp_path: Path, shape: tuple[int, ...]) -> None:
    specs = {"t": TensorSpec(shape, kind="flat", rank=5, decay=0.6, noise=1e-3)}
    pop = write_population(tmp_path / "in", specs, n=6, seed=34)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, scheme="flat", rank=2, codec="none", dtype="float32")
    _check_optimal(pop, out, "t", expect_scheme="flat", expect_side=None, expect_rank=2)


def test_flat_rank_capped_at_data_rank(tmp_path: Path) -> None:
    """Asking for more components than the centred members span gives the spanned rank, ~exact."""
    specs = {"t": TensorSpec((50,), dtype="float64", kind="flat", rank=2, noise=0.0)}
    pop = write_population(tmp_path / "in", specs, n=6, seed=35)
    out = tmp_path / "b.upk"
    result = unipack.merge(pop.paths, out, scheme="flat", rank=10, codec="none")
    (t,) = result.manifest.tensors
    assert t.storage == "shared" and t.rank == 2, t
    assert t.energy == pytest.approx(1.0, abs=1e-6)
    assert result.worst_error < 1e-6


# ------------------------------------------------------------------------------------------
# side selection under max-error; gram limit
# ------------------------------------------------------------------------------------------


def test_wide_matrix_with_shared_column_space_uses_left_basis(tmp_path: Path) -> None:
    # 16 x 64, deltas U @ B_i: the column space (16-dim side) is shared, the row space is not
    specs = {"w": TensorSpec((16, 64), kind="left", rank=2, noise=1e-6)}
    pop = write_population(tmp_path / "in", specs, n=4, seed=36)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, max_error=0.01, codec="none", quantize=False)
    _check_optimal(pop, out, "w", expect_scheme="rows", expect_side="left", expect_rank=2, min_truncation=0.0)


def test_tall_matrix_with_shared_row_space_uses_right_basis(tmp_path: Path) -> None:
    specs = {"w": TensorSpec((64, 16), kind="right", rank=2, noise=1e-6)}
    pop = write_population(tmp_path / "in", specs, n=4, seed=37)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, max_error=0.01, codec="none", quantize=False)
    _check_optimal(pop, out, "w", expect_scheme="rows", expect_side="right", expect_rank=2, min_truncation=0.0)


def test_gram_limit_restricts_sides(tmp_path: Path) -> None:
    specs = {"w": TensorSpec((10, 30), kind="right", rank=3, decay=0.6, noise=1e-3)}
    pop = write_population(tmp_path / "in", specs, n=4, seed=38)
    # only the 10-long side fits the limit: a left basis even though right would be cheaper
    r1 = unipack.merge(pop.paths, tmp_path / "a.upk", scheme="rows", rank=2, gram_limit=20, codec="none")
    assert r1.manifest.tensors[0].side == "left"
    _check_optimal(pop, tmp_path / "a.upk", "w", expect_scheme="rows", expect_side="left", expect_rank=2)
    # neither side fits: flat
    r2 = unipack.merge(pop.paths, tmp_path / "b.upk", scheme="auto", rank=2, gram_limit=8, codec="none")
    assert r2.manifest.tensors[0].scheme == "flat"
    _check_optimal(pop, tmp_path / "b.upk", "w", expect_scheme="flat", expect_side=None, expect_rank=2)


# ------------------------------------------------------------------------------------------
# max-error: the chosen rank is minimal
# ------------------------------------------------------------------------------------------


def _numpy_errors_by_rank(
    ws: list[np.ndarray], mean: np.ndarray, scheme: str, side: str | None, max_rank: int
) -> np.ndarray:
    """errors[r, i]: member i's relative error with the optimal rank-r projection."""
    out = np.zeros((max_rank + 1, len(ws)))
    for r in range(max_rank + 1):
        rec = optimal_reconstructions(ws, mean, scheme, side, r)
        out[r] = [rel_error(w, a) for w, a in zip(ws, rec)]
    return out


@pytest.mark.parametrize("case", ["rows-right", "rows-left", "flat"])
def test_max_error_rank_is_minimal(tmp_path: Path, case: str) -> None:
    if case == "rows-right":
        spec, scheme, side = TensorSpec((12, 40), kind="right", rank=6, decay=0.35, noise=1e-7), "rows", "right"
    elif case == "rows-left":
        spec, scheme, side = TensorSpec((12, 40), kind="left", rank=6, decay=0.35, noise=1e-7), "rows", "left"
    else:
        spec, scheme, side = TensorSpec((200,), kind="flat", rank=4, decay=0.3, noise=1e-7), "flat", None
    pop = write_population(tmp_path / "in", {"w": spec}, n=5, seed=39)
    ws = _member_values(pop, "w")
    mean = _mean(pop, "w")
    errs = _numpy_errors_by_rank(ws, mean, scheme, side, 4).max(axis=1)
    assert np.all(np.diff(errs) < 0)
    for target in (1, 2, 3):
        # a budget well inside the gap between the optimal rank target-1 and rank target errors
        budget = float(np.sqrt(errs[target - 1] * errs[target]))
        out = tmp_path / f"{target}.upk"
        result = unipack.merge(pop.paths, out, max_error=budget, scheme=scheme, codec="none", quantize=False)
        (t,) = result.manifest.tensors
        assert t.storage == "shared" and t.scheme == scheme and t.side == side, t
        # minimal: numpy's optimal rank-1 projection on the same side misses the budget
        assert errs[t.rank - 1] > budget
        assert t.rank == target
        assert result.worst_error <= budget
        _check_optimal(pop, out, "w", expect_scheme=scheme, expect_side=side, expect_rank=target, min_truncation=0.0)


def test_max_error_rank_minimal_on_mixed_population(tmp_path: Path) -> None:
    """Every shared tensor of an auto-scheme merge: its rank meets the budget, one less would not."""
    specs = {
        "a": TensorSpec((12, 40), kind="right", rank=5, decay=0.3, noise=1e-7),
        "b": TensorSpec((40, 12), kind="left", rank=5, decay=0.3, noise=1e-7),
        "c": TensorSpec((64,), kind="flat", rank=4, decay=0.3, noise=1e-7),
    }
    pop = write_population(tmp_path / "in", specs, n=5, seed=40)
    budget = 0.004
    result = unipack.merge(pop.paths, tmp_path / "b.upk", max_error=budget, codec="none", quantize=False)
    checked = 0
    for t in result.manifest.tensors:
        assert t.storage == "shared"
        ws, mean = _member_values(pop, t.name), _mean(pop, t.name)
        errs = _numpy_errors_by_rank(ws, mean, t.scheme, t.side, t.rank).max(axis=1)
        assert errs[t.rank] <= budget * 1.001
        if t.rank > 0:
            assert errs[t.rank - 1] > budget, (t.name, t.rank, errs)
            checked += 1
    assert checked == 3


def test_energy_recorded_for_every_shared_tensor(tmp_path: Path) -> None:
    specs = {
        "a": TensorSpec((12, 30), kind="right", rank=4, decay=0.5, noise=1e-3),
        "b": TensorSpec((30, 12), kind="left", rank=4, decay=0.5, noise=1e-3),
        "c": TensorSpec((50,), kind="flat", rank=3, decay=0.5, noise=1e-3),
        "d": TensorSpec((5, 6), kind="same"),
    }
    pop = write_population(tmp_path / "in", specs, n=5, seed=41)
    for rule in ({"rank": 1}, {"rank": 2}, {"max_error": 0.02}, {"energy": 0.95}):
        result = unipack.merge(pop.paths, tmp_path / f"{len(list(tmp_path.iterdir()))}.upk", quantize=False, **rule)
        for t in result.manifest.tensors:
            if t.name == "d":  # bit-identical in every member: stored once, exactly
                assert t.storage == "exact", t
                continue
            assert t.storage == "shared", t
            ws, mean = _member_values(pop, t.name), _mean(pop, t.name)
            eig, _ = spectrum(ws, mean, t.scheme, t.side)
            assert t.energy == pytest.approx(eig[: t.rank].sum() / eig.sum(), abs=2e-6), (rule, t.name)


def test_centring_uses_stored_mean_for_low_precision_members(tmp_path: Path) -> None:
    """bf16 members: the mean is stored in bf16, and the reconstruction is mean_bf16 + projection."""
    specs = {"w": TensorSpec((10, 24), dtype="bfloat16", kind="right", rank=4, decay=0.6, noise=0.0)}
    pop = write_population(tmp_path / "in", specs, n=4, seed=42)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, scheme="rows", rank=2, codec="none")
    ws, mean = _member_values(pop, "w"), _mean(pop, "w")
    expected = optimal_reconstructions(ws, mean, "rows", "right", 2)
    with unipack.open(out) as b:
        mean_blob = b.manifest.blobs[b.manifest.tensors[0].mean]
        assert mean_blob.dtype == "BF16"
        for i, member in enumerate(b.members):
            got = b.load(member)["w"]
            assert got.dtype == torch.bfloat16
            exp_bf16 = torch.from_numpy(expected[i].astype(np.float32)).to(torch.bfloat16)
            # after rounding to bf16 the two agree except for rare ties (one bf16 ulp)
            diff = (got.to(torch.float64) - exp_bf16.to(torch.float64)).abs()
            ulp = exp_bf16.to(torch.float64).abs() * 2.0**-7 + 1e-30
            assert bool((diff <= ulp).all())
            assert (diff > 0).float().mean().item() < 0.05
