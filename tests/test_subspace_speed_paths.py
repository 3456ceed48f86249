"""The merge's shortcuts around the subspace fit give the answers the long way gives.

The quantized deltas are fitted first and their bytes become a ceiling: a rows model is only
fitted on sides whose rank 1 fits under it, ruled out by a PCA bound where no affordable rank
can meet the rule, and otherwise searched on the leading eigenvectors from a randomized
subspace iteration (``top_eigh``) instead of a full ``eigh``. Each shortcut is checked here
against the full computation (numpy's ``eigh``, brute force over ranks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import unipack
from unipack.core.decomposition import KeepRaw, TensorJob, decompose
from unipack.core.linalg import eigh_desc, top_eigh
from unipack.options import ErrorBudget
from unipack.schemes.rows import cheapest_side, fit_rows, sides_worth_fitting


def _decaying_gram(n: int, strong: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    values = np.concatenate([np.geomspace(100.0, 1.0, strong), 0.02 * rng.uniform(0.5, 1.5, n - strong)])
    return (u * values) @ u.T


def test_top_eigh_matches_the_full_decomposition_on_a_decaying_spectrum() -> None:
    gram = _decaying_gram(200, 12, seed=1)
    full_values, full_vectors = eigh_desc(gram)
    for k in (4, 12):
        values, vectors = top_eigh(gram, k)
        assert values.shape == (k,) and vectors.shape == (200, k)
        np.testing.assert_allclose(values, full_values[:k], rtol=1e-6)
        # Ritz values never exceed the true ones (what ``rules_out`` relies on, with slack)
        assert np.all(values <= full_values[:k] * (1 + 1e-12))
        # same subspace: the projectors agree
        p_top, p_full = vectors @ vectors.T, full_vectors[:, :k] @ full_vectors[:, :k].T
        assert float(np.linalg.norm(p_top - p_full)) < 1e-5
        # orthonormal, signs fixed like eigh_desc's, and reproducible (a bundle's bytes depend on it)
        np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-10)
        assert np.all(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(k)] > 0)
        again = top_eigh(gram, k)
        assert np.array_equal(again[0], values) and np.array_equal(again[1], vectors)


def _job(members: list[np.ndarray], budget: ErrorBudget, ceiling: int | None = None) -> TensorJob:
    return TensorJob(
        name="w",
        shape=members[0].shape,
        member_dtypes=("F64",) * len(members),
        load=lambda i: members[i],
        rule="max-error",
        budget=budget,
        rank=None,
        energy=None,
        coef_dtype="F64",
        gram_limit=4096,
        baselines=False,
        ceiling=ceiling,
    )


def _members(seed: int, n: int = 6, shape: tuple[int, int] = (48, 160), rank: int = 3, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    u, v = rng.standard_normal((shape[0], rank)), rng.standard_normal((rank, shape[1]))
    return [base + u @ np.diag(rng.standard_normal(rank)) @ v + noise * rng.standard_normal(shape) for _ in range(n)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("delta_error", [0.05, 0.2, 0.5, 0.9])
def test_rules_out_only_what_no_affordable_rank_meets(seed: int, delta_error: float) -> None:
    """Whenever ``rules_out`` skips a model, brute force over every rank up to the cap (encoded
    from the full spectrum, errors measured) finds none that meets the rule."""
    members = _members(seed, noise=[0.01, 0.05, 0.3][seed % 3])
    budget = ErrorBudget(max_delta_error=delta_error)
    job = _job(members, budget)
    for model in fit_rows(job):
        for cap in (0, 2, 5, 12):
            if not model.rules_out(budget, cap):
                continue
            for rank in range(cap + 1):
                enc = model.encode(rank)
                assert not budget.met(enc.errors, [f.delta_error for f in enc.fidelity]), (cap, rank)


def test_rules_out_keeps_a_model_that_meets_the_rule() -> None:
    members = _members(0, noise=0.001)
    budget = ErrorBudget(max_delta_error=0.2)
    (right, left) = fit_rows(_job(members, budget))
    for model in (right, left):
        assert not model.rules_out(budget, 8)
        rank = model.rank_for_max_error(budget, 8)
        assert rank is not None and rank <= 4


def test_a_ceiling_below_rank_one_fits_nothing_and_says_what_won() -> None:
    members = _members(1)
    job = _job(members, ErrorBudget(max_delta_error=0.3), ceiling=100)
    assert fit_rows(job) == []
    result = decompose(job, [fit_rows])
    assert isinstance(result, KeepRaw) and "quantized deltas" in result.reason


def test_the_rank_searched_on_leading_vectors_is_encoded_with_them() -> None:
    """With a ceiling, the rank search runs on the randomized top-``cap`` vectors; the basis the
    encoding stores is those vectors' first columns, and the errors are met after rounding."""
    members = _members(2, n=5, shape=(40, 400), rank=2, noise=0.002)
    budget = ErrorBudget(max_delta_error=0.3)
    numel = members[0].size
    # room for ~20 ranks on the right side: far below its side (400), so leading() is randomized
    per_rank = (400 + 5 * 40) * 8
    job = _job(members, budget, ceiling=int((numel * 8 + 20 * per_rank) / 1.25))
    result = decompose(job, [fit_rows])
    assert not isinstance(result, KeepRaw)
    assert result.rank <= 4
    model = [m for m in fit_rows(job) if m.side == result.side][0]
    assert model._full is None  # no full eigh was needed
    _, vectors = model.leading(20)
    assert result.basis is not None
    np.testing.assert_allclose(result.basis, vectors[:, : result.rank], atol=0)
    assert budget.met(result.errors, [f.delta_error for f in result.fidelity])
    # the stored spectrum's total is the whole variance, not the leading values' sum
    centred = sum(float(np.sum((w - result.mean) ** 2)) for w in members)
    assert result.variance == pytest.approx(centred, rel=1e-9)


def test_a_low_rank_collection_still_gets_its_subspace(tmp_path) -> None:
    """Members differing by a rank-2 update on a wide matrix: with 16 members the subspace
    (mean + a rank-2 basis) costs far less than 16 quantized deltas, and the ceiling the deltas
    set does not keep the merge from it."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    base = rng.standard_normal((32, 4096)).astype(np.float32)
    u, v = rng.standard_normal((32, 2)), rng.standard_normal((2, 4096))
    paths = []
    for i in range(16):
        w = (base + 0.3 * u @ np.diag(rng.standard_normal(2)) @ v).astype(np.float32)
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": w}, str(path))
        paths.append(path)
    out = tmp_path / "b.upk"
    unipack.merge(paths, out, lossless="off")
    bundle = unipack.open(out)
    (record,) = bundle.manifest.tensors
    assert record.storage == "shared" and "rank 2" in record.reason
    for member in bundle.manifest.members:
        assert max(member.errors) <= 0.05


def _rank_job(members: list[np.ndarray], rank: int, coef_dtype: str = "F16") -> TensorJob:
    """``_job`` under a rank rule, for float32 members."""
    return dataclasses.replace(
        _job(members, ErrorBudget()),
        member_dtypes=("F32",) * len(members),
        rule="rank",
        budget=None,
        rank=rank,
        coef_dtype=coef_dtype,
    )


@pytest.mark.parametrize(
    ("shape", "n", "rank"),
    [((48, 160), 6, 3), ((160, 48), 6, 3), ((40, 40), 5, 4), ((30, 200), 2, 40), ((200, 12), 3, 16), ((8, 8), 9, 20)],
)
def test_a_rank_rule_fits_only_the_side_decompose_keeps(shape: tuple[int, int], n: int, rank: int) -> None:
    """At a fixed rank a side's bytes follow from the shapes, so only that side is fitted: the
    encoding is the one a fit of both sides gives (brute force: decompose over both), bit for bit,
    and the paper recipe's side (k = 16, fp32) is fitted too where it differs."""
    members = [m.astype(np.float32).astype(np.float64) for m in _members(seed=sum(shape) + n, n=n, shape=shape)]
    job = _rank_job(members, rank)
    sides = sides_worth_fitting(job)
    assert sides is not None and 1 <= len(sides) <= 2
    assert cheapest_side(job, rank) in sides
    both = decompose(job, [lambda j: fit_rows(j)])
    only = decompose(job, [lambda j: fit_rows(j, sides=sides)])
    if isinstance(both, KeepRaw):
        assert isinstance(only, KeepRaw) and only.reason == both.reason
        return
    assert not isinstance(only, KeepRaw)
    assert (only.side, only.rank) == (both.side, both.rank)
    np.testing.assert_array_equal(only.basis, both.basis)
    np.testing.assert_array_equal(only.mean, both.mean)
    for a, b in zip(only.coefs, both.coefs):
        np.testing.assert_array_equal(a, b)
    assert list(only.errors) == list(both.errors)
    # Under the other rules the choice depends on the spectra: every usable side is fitted.
    assert sides_worth_fitting(_job(members, ErrorBudget(max_error=0.1))) is None


def test_a_rank_rule_merge_is_the_bundle_both_sides_give(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, alternatives (the paper's recipe reuses the fitted side) included."""
    from safetensors.numpy import save_file

    from unipack.schemes import rows

    rng = np.random.default_rng(11)
    base = rng.standard_normal((64, 96)).astype(np.float32)
    paths = []
    for i in range(5):
        path = tmp_path / f"m{i}.safetensors"
        w = base + 0.05 * rng.standard_normal((64, 96)).astype(np.float32)
        save_file({"a": w, "b": w.T.copy()}, str(path))
        paths.append(path)
    unipack.merge(paths, tmp_path / "one.upk", rank=8, lossless="off")
    monkeypatch.setattr(rows, "sides_worth_fitting", lambda job: None)
    unipack.merge(paths, tmp_path / "both.upk", rank=8, lossless="off")
    assert (tmp_path / "one.upk").read_bytes() == (tmp_path / "both.upk").read_bytes()
