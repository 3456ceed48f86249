"""unipack.core.lora against independent dense numpy computations.

Every check forms the dense updates ΔW_i = s_i B_i A_i here in the test and compares with what
lora.py computes from the factors alone: spectra of Σ ΔW ΔWᵀ, cores Uᵀ ΔW V, errors of the
two-sided projection, rank choices, and the Eckart-Young truncation of the extracted factors.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from unipack.core import lora
from unipack.core.lora import LoraFactors

OUT, IN = 40, 30


def _adapters(
    seed: int = 0, ranks=(4, 8, None, 8, 4, None, 8), noise: float = 0.05, alpha: float = 16.0, rslora: bool = False
) -> list[LoraFactors | None]:
    """Adapters sharing a 6-dim column space and row space, plus noise; None = untouched."""
    rng = np.random.default_rng(seed)
    u0 = np.linalg.qr(rng.standard_normal((OUT, 6)))[0]
    v0 = np.linalg.qr(rng.standard_normal((IN, 6)))[0]
    out: list[LoraFactors | None] = []
    for r in ranks:
        if r is None:
            out.append(None)
            continue
        b = u0 @ rng.standard_normal((6, r)) + noise * rng.standard_normal((OUT, r))
        a = rng.standard_normal((r, 6)) @ v0.T + noise * rng.standard_normal((r, IN))
        out.append(LoraFactors(a=a, b=b, scale=lora.lora_scale(alpha, r, rslora)))
    return out


def _dense(adapters) -> list[np.ndarray]:
    return [np.zeros((OUT, IN)) if f is None else f.scale * (f.b @ f.a) for f in adapters]


def _dense_errors(ws, u, v) -> np.ndarray:
    errs = []
    for w in ws:
        norm = np.linalg.norm(w)
        diff = np.linalg.norm(w - u @ (u.T @ w @ v) @ v.T)
        errs.append(diff / norm if norm > 0 else diff)
    return np.array(errs)


@pytest.fixture
def adapters():
    return _adapters()


@pytest.fixture
def model(adapters):
    return lora.fit(adapters, OUT, IN)


def test_factors_properties_and_validation():
    f = _adapters(ranks=(8,))[0]
    assert (f.rank, f.out_dim, f.in_dim) == (8, OUT, IN)
    assert f.update().shape == (OUT, IN)
    assert f.norm == pytest.approx(np.linalg.norm(f.update()), rel=1e-12)
    with pytest.raises(ValueError):
        LoraFactors(a=np.ones((4, IN)), b=np.ones((OUT, 3)), scale=1.0)
    with pytest.raises(ValueError):
        LoraFactors(a=np.ones((4, IN)), b=np.ones((OUT, 4)), scale=float("nan"))
    with pytest.raises(ValueError):
        lora.fit([f], OUT + 1, IN)
    assert lora.lora_scale(16, 4) == 4.0 and lora.lora_scale(16, 4, rslora=True) == 8.0


def test_bases_orthonormal_and_spectra_match_dense(adapters, model):
    ws = _dense(adapters)
    k_out, k_in = model.max_ranks
    assert model.u.shape == (OUT, k_out) and model.v.shape == (IN, k_in)
    np.testing.assert_allclose(model.u.T @ model.u, np.eye(k_out), atol=1e-12)
    np.testing.assert_allclose(model.v.T @ model.v, np.eye(k_in), atol=1e-12)
    left = np.linalg.eigvalsh(sum(w @ w.T for w in ws))[::-1]
    right = np.linalg.eigvalsh(sum(w.T @ w for w in ws))[::-1]
    np.testing.assert_allclose(model.left_spectrum, left[:k_out], rtol=1e-9, atol=1e-10 * left[0])
    np.testing.assert_allclose(model.right_spectrum, right[:k_in], rtol=1e-9, atol=1e-10 * right[0])
    # What is dropped is only rounding: the kept spectrum holds the whole energy.
    assert model.left_spectrum.sum() == pytest.approx(sum(np.sum(w * w) for w in ws), rel=1e-12)
    # The top-k subspace is the dense top-k eigenspace (projectors agree, signs aside).
    vecs = np.linalg.eigh(sum(w @ w.T for w in ws))[1][:, ::-1]
    for k in (3, 6, 10):
        np.testing.assert_allclose(model.u[:, :k] @ model.u[:, :k].T, vecs[:, :k] @ vecs[:, :k].T, atol=1e-8)
    # Signs are fixed: each column's largest-magnitude entry is positive.
    for basis in (model.u, model.v):
        assert np.all(basis[np.argmax(np.abs(basis), axis=0), np.arange(basis.shape[1])] > 0)


@pytest.mark.parametrize("ks", [(0, 0), (1, 1), (3, 5), (6, 6), (8, 2), (12, 9), "full"])
def test_cores_and_errors_match_dense(adapters, model, ks):
    k_out, k_in = model.max_ranks if ks == "full" else ks
    u, v = model.u[:, :k_out], model.v[:, :k_in]
    ws = _dense(adapters)
    cores = model.cores(k_out, k_in)
    assert len(cores) == len(adapters)
    for w, c in zip(ws, cores):
        assert c.shape == (k_out, k_in)
        np.testing.assert_allclose(c, u.T @ w @ v, atol=1e-12 * max(1.0, np.linalg.norm(w)))
    expected = _dense_errors(ws, u, v)
    np.testing.assert_allclose(model.errors(k_out, k_in), expected, rtol=1e-8, atol=1e-12)
    assert np.all(model.errors(k_out, k_in)[[2, 5]] == 0.0)  # untouched modules


def test_errors_are_monotone_and_zero_at_full_rank(model):
    k_out, k_in = model.max_ranks
    grid = np.array([[model.errors(i, j).max() for j in range(k_in + 1)] for i in range(k_out + 1)])
    assert np.all(np.diff(grid, axis=0) <= 1e-15) and np.all(np.diff(grid, axis=1) <= 1e-15)
    assert grid[-1, -1] == 0.0
    with pytest.raises(ValueError):
        model.cores(k_out + 1, 1)


def test_invariant_under_change_of_factors(adapters, model):
    """B M and M⁻¹ A give the same update, so the same reconstructions and errors."""
    rng = np.random.default_rng(7)
    changed = []
    for f in adapters:
        if f is None:
            changed.append(None)
            continue
        m = rng.standard_normal((f.rank, f.rank)) + 3 * np.eye(f.rank)
        changed.append(LoraFactors(a=np.linalg.solve(m, f.a), b=f.b @ m, scale=f.scale))
    other = lora.fit(changed, OUT, IN)
    assert other.max_ranks == model.max_ranks
    ws = _dense(adapters)
    for k_out, k_in in [(2, 3), (6, 6), (9, 4), model.max_ranks]:
        np.testing.assert_allclose(other.errors(k_out, k_in), model.errors(k_out, k_in), rtol=1e-8, atol=1e-12)
        for w, c1, c2 in zip(ws, model.cores(k_out, k_in), other.cores(k_out, k_in)):
            r1 = model.u[:, :k_out] @ c1 @ model.v[:, :k_in].T
            r2 = other.u[:, :k_out] @ c2 @ other.v[:, :k_in].T
            np.testing.assert_allclose(r2, r1, atol=1e-9 * max(1.0, np.linalg.norm(w)))


def test_scale_is_the_update_scale_rslora():
    """An rsLoRA adapter (s = alpha/√r) equals the same update with s folded into B."""
    adapters = _adapters(seed=3, ranks=(4, 8, 8), rslora=True)
    assert adapters[0].scale == pytest.approx(16 / 2) and adapters[1].scale == pytest.approx(16 / np.sqrt(8))
    folded = [LoraFactors(a=f.a, b=f.b * f.scale, scale=1.0) for f in adapters]
    m1, m2 = lora.fit(adapters, OUT, IN), lora.fit(folded, OUT, IN)
    np.testing.assert_allclose(m1.left_spectrum, m2.left_spectrum, rtol=1e-10)
    for c1, c2 in zip(m1.cores(5, 7), m2.cores(5, 7)):
        np.testing.assert_allclose(c1, c2, atol=1e-10)
    expected = _dense_errors(_dense(adapters), m1.u[:, :5], m1.v[:, :7])
    np.testing.assert_allclose(m1.errors(5, 7), expected, rtol=1e-8)


def test_untouched_modules():
    model = lora.fit([None, None], OUT, IN)
    assert model.max_ranks == (0, 0) and model.n_touched == 0
    assert model.left_spectrum.size == 0
    np.testing.assert_array_equal(model.errors(0, 0), [0.0, 0.0])
    assert [c.shape for c in model.cores(0, 0)] == [(0, 0), (0, 0)]
    assert model.rank_for_max_error(0.0) == (0, 0)
    assert model.energy_rank(0.9) == (0, 0)
    zero = LoraFactors(a=np.zeros((4, IN)), b=np.ones((OUT, 4)), scale=2.0)
    model = lora.fit([zero, None], OUT, IN)
    assert model.max_ranks == (0, 0) and model.n_touched == 1
    np.testing.assert_array_equal(model.errors(0, 0), [0.0, 0.0])


@pytest.mark.parametrize("budget", [0.3, 0.1, 0.03, 0.0])
def test_rank_for_max_error(adapters, model, budget):
    k_out, k_in = model.rank_for_max_error(budget)
    ws = _dense(adapters)

    def dense_ok(ko, ki):
        return bool(np.all(_dense_errors(ws, model.u[:, :ko], model.v[:, :ki]) <= budget * (1 + 1e-9) + 1e-12))

    assert dense_ok(k_out, k_in)
    # The best point on the k_out = k_in line, found densely: the result costs no more, and the
    # diagonal point just below it misses the budget.
    kmax_out, kmax_in = model.max_ranks
    diag = [(min(k, kmax_out), min(k, kmax_in)) for k in range(max(kmax_out, kmax_in) + 1)]
    best = next(ks for ks in diag if dense_ok(*ks))
    assert model.stored_values(k_out, k_in) <= model.stored_values(*best)
    if best != (0, 0):
        below = diag[diag.index(best) - 1]
        assert not dense_ok(*below)
        assert model.stored_values(*below) < model.stored_values(*best)
    # A local minimum: neither side can drop by one.
    if k_out:
        assert not dense_ok(k_out - 1, k_in)
    if k_in:
        assert not dense_ok(k_out, k_in - 1)
    if budget == 0.0:
        assert (k_out, k_in) == model.max_ranks
    with pytest.raises(ValueError):
        model.rank_for_max_error(-0.1)


def test_energy_rank(adapters, model):
    ws = _dense(adapters)
    left = np.linalg.eigvalsh(sum(w @ w.T for w in ws))[::-1]
    right = np.linalg.eigvalsh(sum(w.T @ w for w in ws))[::-1]
    for fraction in (0.5, 0.9, 0.99, 1.0):
        k_out, k_in = model.energy_rank(fraction)
        assert left[:k_out].sum() >= (fraction - 1e-9) * left.sum() > left[: k_out - 1].sum()
        assert right[:k_in].sum() >= (fraction - 1e-9) * right.sum() > right[: k_in - 1].sum()
    assert model.energy_rank(0.0) == (0, 0)


def test_reconstruct_factors(model):
    k_out, k_in = 7, 5
    u, v = model.u[:, :k_out], model.v[:, :k_in]
    core = model.cores(k_out, k_in)[1]
    dense = u @ core @ v.T
    b, a, scale = lora.reconstruct_factors(u, core, v, max_rank=8)
    assert scale == 1.0 and b.shape == (OUT, 5) and a.shape == (5, IN)  # rank of C is at most 5
    np.testing.assert_allclose(b @ a, dense, atol=1e-12 * np.linalg.norm(dense))
    x, sigma, yt = np.linalg.svd(dense)
    for r in (1, 2, 4):
        b, a, scale = lora.reconstruct_factors(u, core, v, max_rank=r)
        assert b.shape == (OUT, r) and a.shape == (r, IN)
        np.testing.assert_allclose(b @ a, (x[:, :r] * sigma[:r]) @ yt[:r], atol=1e-10 * np.linalg.norm(dense))
        # √Σ split evenly: B'ᵀB' = A'A'ᵀ = diag(σ).
        np.testing.assert_allclose(b.T @ b, np.diag(sigma[:r]), atol=1e-10 * sigma[0])
        np.testing.assert_allclose(a @ a.T, np.diag(sigma[:r]), atol=1e-10 * sigma[0])
    b, a, _ = lora.reconstruct_factors(u, np.zeros((k_out, k_in)), v, max_rank=4)
    assert b.shape == (OUT, 0) and a.shape == (0, IN)
    # A reconstructed adapter is a valid input again, with the same update.
    again = LoraFactors(a=a, b=b, scale=1.0)
    assert again.norm == 0.0


def test_large_module_stays_factored():
    """4096 x 2048, r = 8, N = 6: a dense update is 64 MiB and a Gram 128 MiB; stay far below."""
    out_dim, in_dim, n, r = 4096, 2048, 6, 8
    rng = np.random.default_rng(11)
    u0 = np.linalg.qr(rng.standard_normal((out_dim, 12)))[0]
    v0 = np.linalg.qr(rng.standard_normal((in_dim, 12)))[0]
    adapters = [
        LoraFactors(
            a=rng.standard_normal((r, 12)) @ v0.T + 0.01 * rng.standard_normal((r, in_dim)),
            b=u0 @ rng.standard_normal((12, r)) + 0.01 * rng.standard_normal((out_dim, r)),
            scale=2.0,
        )
        for _ in range(n)
    ]
    adapters[2] = None
    tracemalloc.start()
    try:
        model = lora.fit(adapters, out_dim, in_dim)
        k_out, k_in = model.rank_for_max_error(0.05)
        cores = model.cores(k_out, k_in)
        errors = model.errors(k_out, k_in)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    assert model.max_ranks == (40, 40)  # 5 adapters x r = 8
    assert np.all(errors <= 0.05) and errors[2] == 0.0
    assert all(c.shape == (k_out, k_in) for c in cores)
    np.testing.assert_allclose(model.u.T @ model.u, np.eye(40), atol=1e-12)
    # Spot-check one adapter's error against the dense projection (one 64 MiB matrix, here only).
    w = adapters[0].update()
    u, v = model.u[:, :k_out], model.v[:, :k_in]
    dense = np.linalg.norm(w - u @ (u.T @ w @ v) @ v.T) / np.linalg.norm(w)
    assert errors[0] == pytest.approx(dense, rel=1e-8)


# --------------------------------------------------------------------------------------------
# sketched bases (large collections): checked against numpy's SVD of the dense stacked updates

SK_OUT, SK_IN = 120, 90


def _sketch_population(n: int = 30, r: int = 8, seed: int = 3, gap: float = 1e-3) -> list[LoraFactors | None]:
    """Updates in a shared 6-dim column and row space plus small private noise: a clear spectral
    gap after 6 on both sides, and Σ r = 240 > both widths (the exact bases would be full width)."""
    rng = np.random.default_rng(seed)
    u0 = np.linalg.qr(rng.standard_normal((SK_OUT, 6)))[0]
    v0 = np.linalg.qr(rng.standard_normal((SK_IN, 6)))[0]
    out: list[LoraFactors | None] = []
    for i in range(n):
        if i == 4:
            out.append(None)
            continue
        b = u0 @ rng.standard_normal((6, r)) + gap * rng.standard_normal((SK_OUT, r))
        a = rng.standard_normal((r, 6)) @ v0.T + gap * rng.standard_normal((r, SK_IN))
        out.append(LoraFactors(a=a, b=b, scale=lora.lora_scale(16.0, r)))
    return out


def _dense_sketch(adapters) -> list[np.ndarray]:
    return [np.zeros((SK_OUT, SK_IN)) if f is None else f.scale * (f.b @ f.a) for f in adapters]


@pytest.fixture(scope="module")
def sketch_adapters():
    return _sketch_population()


@pytest.fixture(scope="module")
def sketched(sketch_adapters):
    return lora.fit(sketch_adapters, SK_OUT, SK_IN, max_rank=12, sketch_from=0)


def test_sketched_bases_span_the_exact_ones(sketch_adapters, sketched):
    ws = _dense_sketch(sketch_adapters)
    exact = lora.fit(sketch_adapters, SK_OUT, SK_IN)
    assert sketched.sketched and not exact.sketched
    assert sketched.max_ranks == (12 + lora.OVERSAMPLE, 12 + lora.OVERSAMPLE)
    assert exact.max_ranks == (SK_OUT, SK_IN)
    u_np, su, _ = np.linalg.svd(np.hstack(ws), full_matrices=False)
    _, sv, vt = np.linalg.svd(np.vstack(ws), full_matrices=False)
    k_out, k_in = sketched.max_ranks
    np.testing.assert_allclose(sketched.u.T @ sketched.u, np.eye(k_out), atol=1e-12)
    np.testing.assert_allclose(sketched.v.T @ sketched.v, np.eye(k_in), atol=1e-12)
    # The leading eigenvalues of Σ ΔW ΔWᵀ and Σ ΔWᵀ ΔW (the shared 6, behind a gap) and the
    # projectors on their directions are numpy's. Past the gap (flat noise: a randomized method's
    # worst case) the Ritz values stay below numpy's (Cauchy interlacing), within a few percent.
    np.testing.assert_allclose(sketched.left_spectrum[:6], su[:6] ** 2, rtol=1e-10)
    np.testing.assert_allclose(sketched.right_spectrum[:6], sv[:6] ** 2, rtol=1e-10)
    for got, want in ((sketched.left_spectrum, su**2), (sketched.right_spectrum, sv**2)):
        assert np.all(got[6:12] <= want[6:12] * (1 + 1e-9)) and np.all(got[6:12] >= 0.9 * want[6:12])
    pu = sketched.u[:, :6] @ sketched.u[:, :6].T
    pv = sketched.v[:, :6] @ sketched.v[:, :6].T
    assert np.linalg.norm(pu - u_np[:, :6] @ u_np[:, :6].T, 2) < 1e-9
    assert np.linalg.norm(pv - vt.T[:, :6] @ vt[:6], 2) < 1e-9
    # At the largest rank asked for (12), each side's captured energy Σ ||U_kᵀ ΔW_i||² is the
    # optimum Σ_{j<=12} σ_j² to 1e-7 (the directions past the gap are noise and hold ~nothing).
    for k in (6, 12):
        left = sum(float(np.sum((sketched.u[:, :k].T @ w) ** 2)) for w in ws)
        right = sum(float(np.sum((w @ sketched.v[:, :k]) ** 2)) for w in ws)
        assert left == pytest.approx(float(np.sum(su[:k] ** 2)), rel=1e-7) and left <= np.sum(su[:k] ** 2) * (1 + 1e-12)
        assert right == pytest.approx(float(np.sum(sv[:k] ** 2)), rel=1e-7)
    # ... and the top 6 directions themselves (signs fixed) are the exact fit's.
    np.testing.assert_allclose(sketched.u[:, :6], exact.u[:, :6], atol=1e-8)
    np.testing.assert_allclose(sketched.v[:, :6], exact.v[:, :6], atol=1e-8)
    # The total the spectra no longer sum to: Σ ||ΔW_i||².
    assert sketched.total == pytest.approx(sum(float(np.sum(w * w)) for w in ws), rel=1e-12)
    assert exact.total is None


@pytest.mark.parametrize("ks", [(0, 0), (3, 5), (6, 6), (12, 9), (28, 28), (28, 0)])
def test_sketched_errors_and_cores_match_dense(sketch_adapters, sketched, ks):
    """Errors are exact for the sketched bases, including the part of each update outside them."""
    ws = _dense_sketch(sketch_adapters)
    k_out, k_in = ks
    u, v = sketched.u[:, :k_out], sketched.v[:, :k_in]
    np.testing.assert_allclose(sketched.errors(k_out, k_in), _dense_errors(ws, u, v), rtol=1e-9, atol=1e-13)
    for w, core in zip(ws, sketched.cores(k_out, k_in)):
        np.testing.assert_allclose(core, u.T @ w @ v, atol=1e-12)
    if ks == (28, 28):
        # The full sketched bases still miss the private noise (unlike exact bases: error 0 there).
        assert 1e-5 < max(sketched.errors(k_out, k_in)) < 1e-2


def test_sketched_rank_choice_matches_exact(sketch_adapters, sketched):
    exact = lora.fit(sketch_adapters, SK_OUT, SK_IN)
    for budget in (0.5, 0.01):  # met by the shared directions: the same ranks
        assert sketched.rank_for_max_error(budget) == exact.rank_for_max_error(budget) == (6, 6)
    # Into the flat noise (exact: (22, 23)) the sketch's ranks stay within one of the exact ones,
    # and each meets the budget on the dense errors.
    ks = sketched.rank_for_max_error(0.005)
    assert all(abs(a - b) <= 1 for a, b in zip(ks, exact.rank_for_max_error(0.005)))
    ws = _dense_sketch(sketch_adapters)
    assert max(_dense_errors(ws, sketched.u[:, : ks[0]], sketched.v[:, : ks[1]])) <= 0.005
    # A budget not met inside the sketch (exact: (65, 66)) gives its full ranks: the merge refuses those.
    assert sketched.rank_for_max_error(0.002) == sketched.max_ranks
    assert not np.all(sketched.errors(*sketched.max_ranks) <= 0.002)


def test_sketched_energy_rank_uses_the_total(sketch_adapters, sketched):
    ws = _dense_sketch(sketch_adapters)
    eig = np.linalg.svd(np.hstack(ws), compute_uv=False) ** 2
    expect = int(np.searchsorted(np.cumsum(eig) / eig.sum(), 0.9 - 1e-12)) + 1
    assert sketched.energy_rank(0.9)[0] == expect
    assert sketched.energy_rank(0.9) == lora.fit(sketch_adapters, SK_OUT, SK_IN).energy_rank(0.9)
    # A fraction the sketch cannot hold comes back out of range (the merge then keeps the factors).
    k_out, k_in = sketched.energy_rank(1.0)
    assert k_out > sketched.max_ranks[0] and k_in > sketched.max_ranks[1]


def test_sketched_baselines_match_dense(sketch_adapters, sketched):
    ws = _dense_sketch(sketch_adapters)
    u, v = sketched.u, sketched.v
    live = [w for f, w in zip(sketch_adapters, ws) if f is not None]
    mean = u @ (u.T @ (sum(live) / len(live)) @ v) @ v.T  # the mean update, on the fitted bases
    expect = [0.0 if f is None else np.linalg.norm(w - mean) / np.linalg.norm(w) for f, w in zip(sketch_adapters, ws)]
    np.testing.assert_allclose(sketched.mean_errors(), expect, rtol=1e-8)
    for (err, rank), f, w in zip(sketched.svd_baseline(6, 6), sketch_adapters, ws):
        if f is None:
            assert (err, rank) == (0.0, 0)
            continue
        sigma = np.linalg.svd(w, compute_uv=False)
        assert err == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)) / np.linalg.norm(w), rel=1e-6, abs=1e-12)


def test_sketch_is_deterministic(sketch_adapters, sketched):
    copies = [None if f is None else LoraFactors(f.a.copy(), f.b.copy(), f.scale) for f in sketch_adapters]
    again = lora.fit(copies, SK_OUT, SK_IN, max_rank=12, sketch_from=0)
    for x, y in ((again.u, sketched.u), (again.v, sketched.v), (again.left_spectrum, sketched.left_spectrum)):
        assert x.tobytes() == y.tobytes()
    assert again.errors(7, 5).tobytes() == sketched.errors(7, 5).tobytes()


def test_small_collections_keep_the_exact_bases(sketch_adapters):
    """At or below ``SKETCH_FROM`` (Σ r = 232 here), or where the sketch would hold more than half
    the exact basis, ``max_rank`` changes nothing: the same bytes as without it."""
    plain = lora.fit(sketch_adapters, SK_OUT, SK_IN)
    for max_rank, sketch_from in ((12, None), (12, 232), (50, 0), (None, 0)):
        model = lora.fit(sketch_adapters, SK_OUT, SK_IN, max_rank=max_rank, sketch_from=sketch_from)
        assert not model.sketched, (max_rank, sketch_from)
        assert model.u.tobytes() == plain.u.tobytes() and model.v.tobytes() == plain.v.tobytes()
        assert model.errors(5, 4).tobytes() == plain.errors(5, 4).tobytes()
    assert lora.fit(sketch_adapters, SK_OUT, SK_IN, max_rank=12, sketch_from=231).sketched
