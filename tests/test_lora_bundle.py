"""LoRA bundles end to end: ``merge`` of PEFT adapter folders, ``load``, ``extract --format peft``.

Adapters are made two ways: by peft itself (``get_peft_model`` + ``save_pretrained`` on a tiny
``Net`` built here), and by hand (``adapter_config.json`` + ``adapter_model.safetensors``) with a
known structure: every adapter's update to a module lies in one shared 3-dim column space and
3-dim row space, so two-sided bases of ranks (3, 3) hold every update exactly. Every number the
bundle reports (recorded errors, scales, ranks, baselines) is recomputed here with dense numpy in
float64 from the original factors, and the extracted folders are loaded back by peft itself.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import assert_one_line_error, read_raw_header, run
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from torch import nn

import unipack
from unipack import InputError, UnipackError
from unipack.errors import OptionsError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: The LoRA-adapted linear layers of ``Net``: name -> (out, in).
SHAPES = {"body.0": (64, 32), "body.2": (64, 64)}
MODULES = [PREFIX + m for m in SHAPES]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def base_model() -> Net:
    torch.manual_seed(1234)
    return Net().eval()


INPUTS = torch.randn(5, 32, generator=torch.Generator().manual_seed(99))


# --------------------------------------------------------------------------------------------
# adapters with known factors
# --------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One adapter folder and the truth about it: per module (A, B, scale) as saved, extras."""

    path: Path
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]]  # full module name -> (A r x in, B out x r, s)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    def update(self, module: str) -> np.ndarray:
        """The dense ΔW = s B A in float64 (out x in)."""
        a, b, s = self.modules[module]
        return s * (b.astype(np.float64) @ a.astype(np.float64))


def write_adapter(
    folder: Path,
    modules: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int,
    alpha: float,
    extras: dict[str, np.ndarray] | None = None,
    rslora: bool = False,
    scales: dict[str, float] | None = None,
    **config: Any,
) -> Adapter:
    """Write a PEFT folder by hand: short module names (``body.0``) -> (A, B) in their dtype."""
    folder.mkdir(parents=True)
    tensors: dict[str, np.ndarray] = {}
    for m, (a, b) in modules.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b)
    tensors.update(extras or {})
    save_numpy(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "modules_to_save": ["head"] if extras else None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": rslora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        **config,
    }
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    truth = {}
    for m, (a, b) in modules.items():
        rank = a.shape[0]
        s = scales[m] if scales and m in scales else alpha / (np.sqrt(rank) if rslora else rank)
        truth[PREFIX + m] = (a, b, float(s))
    return Adapter(folder, truth, dict(extras or {}), bool(cfg["fan_in_fan_out"]))


def orth(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def head_extras(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        f"{PREFIX}head.weight": (0.1 * rng.standard_normal((3, 64))).astype(np.float32),
        f"{PREFIX}head.bias": (0.1 * rng.standard_normal(3)).astype(np.float32),
    }


def structured_population(
    directory: Path,
    n: int = 12,
    *,
    ranks: list[int] | None = None,
    k: int = 3,
    noise: float = 0.0,
    seed: int = 0,
    alpha: float = 16.0,
    heads: bool = True,
    touch: list[list[str]] | None = None,
    dtype: Any = np.float32,
    prefix: str = "ad",
) -> list[Adapter]:
    """``n`` adapters whose B_i = U X_i (+ noise), A_i = Y_i Vᵀ (+ noise): shared k-dim spaces per module."""
    rng = np.random.default_rng(seed)
    spaces = {m: (orth(rng, out, k), orth(rng, inn, k)) for m, (out, inn) in SHAPES.items()}
    adapters = []
    for i in range(n):
        r = ranks[i % len(ranks)] if ranks else 8
        mods = {}
        for m in touch[i % len(touch)] if touch else SHAPES:
            (out, inn), (u, v) = SHAPES[m], spaces[m]
            b = 0.3 * (u @ rng.standard_normal((k, r)) + noise * rng.standard_normal((out, r)))
            a = 0.3 * (rng.standard_normal((r, k)) @ v.T + noise * rng.standard_normal((r, inn)))
            mods[m] = (a.astype(dtype), b.astype(dtype))
        adapters.append(
            write_adapter(
                directory / f"{prefix}{i:02d}", mods, r=r, alpha=alpha, extras=head_extras(rng) if heads else None
            )
        )
    return adapters


def random_population(
    directory: Path, n: int = 3, *, r: int = 4, seed: int = 5, dtype: Any = np.float32
) -> list[Adapter]:
    """Independent full-rank-r adapters: nothing shared, so exact storage needs their own factors."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mods = {
            m: (rng.standard_normal((r, inn)).astype(dtype), rng.standard_normal((o, r)).astype(dtype))
            for m, (o, inn) in SHAPES.items()
        }
        out.append(write_adapter(directory / f"rnd{i}", mods, r=r, alpha=8))
    return out


def peft_population(
    directory: Path, configs: list[dict[str, Any]], *, seed: int = 0
) -> tuple[list[Adapter], list[nn.Module]]:
    """Adapters saved by peft itself from ``Net`` (random, nonzero factors); the truth read from the model."""
    adapters, models = [], []
    for i, extra in enumerate(configs):
        cfg = LoraConfig(
            init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": ["body.0", "body.2"], **extra}
        )
        base = base_model()
        torch.manual_seed(seed + i)  # after the base model's own seed: each adapter its own factors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, cfg).eval()
            folder = directory / f"peft{i}"
            model.save_pretrained(str(folder))
        truth = {}
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                key = name.replace(".base_layer", "")
                truth[key] = (
                    mod.lora_A["default"].weight.detach().numpy().copy(),
                    mod.lora_B["default"].weight.detach().numpy().copy(),
                    float(mod.scaling["default"]),
                )
        saved = load_numpy(str(folder / WEIGHTS))
        extras = {k: v for k, v in saved.items() if ".lora_" not in k}
        adapters.append(Adapter(folder, truth, extras))
        models.append(model)
    return adapters, models


# --------------------------------------------------------------------------------------------
# independent measurements
# --------------------------------------------------------------------------------------------


def rel(w: np.ndarray, approx: np.ndarray) -> float:
    w, approx = np.asarray(w, np.float64), np.asarray(approx, np.float64)
    assert w.shape == approx.shape
    n = np.linalg.norm(w)
    d = np.linalg.norm(w - approx)
    return float(d / n) if n > 0 else float(d)


def as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def factor_update(loaded: dict[str, torch.Tensor], module: str, scale: float) -> np.ndarray:
    """s B' A' from ``load()``'s factors, float64."""
    return scale * (as64(loaded[f"{module}.lora_B.weight"]) @ as64(loaded[f"{module}.lora_A.weight"]))


def update_key(module: str) -> str:
    return module.removeprefix(PREFIX) + ".weight"


def merge(adapters: list[Adapter], out: Path, **options: Any) -> Any:
    """Merge with the subspace and exact-factor forms only (``--no-quantize``, and no factored
    cores): this file checks those; the quantized and cast forms (``test_lora_quant.py``) and the
    factored cores (``test_lora_factored.py``) have their own tests."""
    from unipack.pack import lora as lora_merge

    options.setdefault("quantize", False)
    with mock.patch.object(lora_merge, "FACTORED_HEADROOMS", ()):
        return unipack.merge([a.path for a in adapters], out, **options)


def index_of(manifest: Any) -> dict[str, int]:
    return {t.name: j for j, t in enumerate(manifest.tensors)}


def stacked_bases(updates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left/right singular vectors and eigenvalues of Σ ΔW ΔWᵀ and Σ ΔWᵀ ΔW, by dense SVD of stacks."""
    u, su, _ = np.linalg.svd(np.hstack(updates), full_matrices=False)
    _, sv, vt = np.linalg.svd(np.vstack(updates), full_matrices=False)
    return u, su**2, vt.T, sv**2


def projection_errors(updates: list[np.ndarray], u: np.ndarray, v: np.ndarray) -> list[float]:
    return [rel(w, u @ (u.T @ w @ v) @ v.T) for w in updates]


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def peft_outputs(folder: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(), str(folder)).eval()
    with torch.no_grad():
        return model(INPUTS)


def patched_outputs(updates: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model with ΔŴ added to its weights and the adapter's head tensors put in."""
    model = base_model()
    sd = model.state_dict()
    for key, delta in updates.items():
        sd[key] = sd[key] + delta.to(sd[key].dtype)
    for key, value in extras.items():  # peft saves a LoRA layer's own bias as <module>.base_layer.bias
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        sd[name] = value.to(sd[name].dtype)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(INPUTS)


# --------------------------------------------------------------------------------------------
# populations, once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact3(tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    """12 adapters of rank 8 whose updates share 3-dim column and row spaces exactly."""
    return structured_population(tmp_path_factory.mktemp("exact3"), n=12, seed=0)


@pytest.fixture(scope="module")
def exact3_bundle(exact3: list[Adapter], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("exact3_bundle") / "b.upk"
    return out, merge(exact3, out, max_error=1e-5)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> list[Adapter]:
    """12 adapters of rank 8: shared 3-dim spaces plus per-adapter noise (a real rank trade-off)."""
    return structured_population(tmp_path_factory.mktemp("noisy"), n=12, noise=0.05, seed=1)


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Adapter], list[nn.Module]]:
    configs = [
        {"modules_to_save": ["head"]},
        {"modules_to_save": ["head"], "r": 8, "lora_alpha": 4},
        {"modules_to_save": ["head"], "r": 2, "lora_alpha": 3},
    ]
    return peft_population(tmp_path_factory.mktemp("peft_made"), configs)


# --------------------------------------------------------------------------------------------
# 1. round trip with known low-rank structure
# --------------------------------------------------------------------------------------------


def test_known_structure_is_stored_as_a_rank_3_subspace_and_round_trips(exact3, exact3_bundle) -> None:
    path, result = exact3_bundle
    manifest = result.manifest
    lora_records = [t for t in manifest.tensors if t.storage == "lora"]
    assert [t.name for t in lora_records] == MODULES
    for t in lora_records:
        assert t.form == "subspace", t.reason
        assert t.ranks is not None and t.ranks[0] <= 3 and t.ranks[1] <= 3, t.ranks
        assert tuple(t.shape) == SHAPES[t.name.removeprefix(PREFIX)]
    # The heads are raw per adapter.
    assert {t.name for t in manifest.tensors if t.storage == "raw"} == {f"{PREFIX}head.weight", f"{PREFIX}head.bias"}
    assert manifest.format_version == 2
    header, _ = read_raw_header(path)
    assert header["__metadata__"]["format_version"] == "2"
    # U, V and the cores are a small fraction of the adapters' own factors (the manifest aside)
    factor_bytes = sum(f.nbytes for a in exact3 for m in a.modules.values() for f in m[:2])
    stored = sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k.startswith(("left/", "right/", "coef/"))
    )
    assert 0 < stored < factor_bytes / 20
    with unipack.open(path) as b:
        assert b.is_lora
        assert b.members == [a.name for a in exact3]
        for a in exact3:
            rec = b.member(a.name)
            updates = b.load(a.name, lora="updates")
            factors = b.load(a.name)
            assert set(updates) == {update_key(m) for m in MODULES}
            assert set(factors) == {f"{m}.lora_{x}.weight" for m in MODULES for x in "AB"} | set(a.extras)
            for m in MODULES:
                w = a.update(m)
                s = a.modules[m][2]
                assert rec.lora[m] == (8, pytest.approx(s, rel=1e-15))
                got = updates[update_key(m)]
                assert got.dtype == torch.float32 and tuple(got.shape) == w.shape
                assert rel(w, as64(got)) < 1e-5
                np.testing.assert_allclose(as64(got), w, atol=1e-6 * np.abs(w).max(), rtol=0)
                assert factors[f"{m}.lora_A.weight"].dtype == torch.float32
                assert tuple(factors[f"{m}.lora_A.weight"].shape) == (8, w.shape[1])
                assert tuple(factors[f"{m}.lora_B.weight"].shape) == (w.shape[0], 8)
                fw = factor_update(factors, m, s)
                assert rel(w, fw) < 1e-5
                np.testing.assert_allclose(fw, w, atol=1e-6 * np.abs(w).max(), rtol=0)
            for key, value in a.extras.items():
                assert np.array_equal(factors[key].numpy(), value)


def test_max_error_0_on_float32_structure_never_loses_anything(exact3, tmp_path) -> None:
    """Float32 factors are only numerically rank 3: an exact budget must come back exact."""
    result = merge(exact3[:6], tmp_path / "b.upk", max_error=0.0)
    with unipack.open(tmp_path / "b.upk") as b:
        for i, a in enumerate(exact3[:6]):
            assert all(e == 0.0 for e in result.manifest.members[i].errors)
            factors = b.load(a.name)
            for m in MODULES:
                assert rel(a.update(m), factor_update(factors, m, a.modules[m][2])) == 0.0


# --------------------------------------------------------------------------------------------
# 2. recorded errors against dense numpy
# --------------------------------------------------------------------------------------------


def check_form_choice(adapters: list[Adapter], manifest: Any) -> None:
    """A subspace record costs fewer bytes than the touching adapters' own factors (else: factors form)."""
    coef_size = {"float32": 4, "float16": 2, "bfloat16": 2}[manifest.options.get("dtype") or "float32"]
    for t in manifest.tensors:
        if t.storage != "lora" or t.form != "subspace":
            continue
        out_dim, in_dim = t.shape
        touching = [a.modules[t.name] for a in adapters if t.name in a.modules]
        own = sum(fa.shape[0] * (out_dim + in_dim) * np.dtype(fa.dtype).itemsize for fa, _, _ in touching)
        ko, ki = t.ranks
        assert (out_dim * ko + in_dim * ki + len(touching) * ko * ki) * coef_size < own, (t.name, t.ranks)


def check_recorded_errors(adapters: list[Adapter], path: Path, manifest: Any) -> dict[str, list[float]]:
    """Every member's recorded error per module equals ||ΔW - s B'A'|| / ||ΔW|| of its loaded factors."""
    check_form_choice(adapters, manifest)
    idx = index_of(manifest)
    measured: dict[str, list[float]] = {m: [] for m in MODULES}
    with unipack.open(path) as b:
        for i, a in enumerate(adapters):
            rec = manifest.members[i]
            assert rec.name == a.name
            factors = b.load(a.name)
            updates = b.load(a.name, lora="updates")
            for m in a.modules:
                w, s = a.update(m), a.modules[m][2]
                err = rel(w, factor_update(factors, m, s))
                recorded = rec.errors[idx[m]]
                assert recorded == pytest.approx(err, rel=1e-5, abs=1e-12), (a.name, m)
                assert recorded >= err * (1 - 1e-7)  # rounded up, never down
                # The dense update (before factor rounding) is within the member dtype's rounding of the same.
                upd = updates[update_key(m)]
                slack = 1e-6 if upd.dtype in (torch.float32, torch.float64) else 2 * torch.finfo(upd.dtype).eps
                assert rel(w, as64(upd)) == pytest.approx(err, rel=1e-3, abs=slack)
                measured[m].append(err)
            for name in a.extras:
                assert rec.errors[idx[name]] == 0.0
    return measured


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_recorded_errors_match_dense_numpy_under_max_error(noisy, tmp_path, dtype) -> None:
    budget = 0.3
    result = merge(noisy, tmp_path / "b.upk", max_error=budget, dtype=dtype)
    measured = check_recorded_errors(noisy, tmp_path / "b.upk", result.manifest)
    for errs in measured.values():
        assert max(errs) <= budget
        assert max(errs) > 0.05  # genuinely lossy: the budget was used
    for t in result.manifest.tensors:
        if t.storage == "lora":
            assert t.form == "subspace" and t.ranks is not None
            assert t.ranks[0] < 64 and t.ranks[1] < SHAPES[t.name.removeprefix(PREFIX)][1]


def test_max_error_ranks_are_a_local_minimum_by_dense_numpy(noisy, tmp_path) -> None:
    """At the chosen (k_out, k_in) every two-sided projection error is within budget; dropping
    either rank by one breaks it for some adapter (docs: a local minimum)."""
    budget = 0.3
    result = merge(noisy, tmp_path / "b.upk", max_error=budget)
    idx = index_of(result.manifest)
    for m in MODULES:
        t = result.manifest.tensors[idx[m]]
        updates = [a.update(m) for a in noisy]
        u, _, v, _ = stacked_bases(updates)
        ko, ki = t.ranks
        assert max(projection_errors(updates, u[:, :ko], v[:, :ki])) <= budget + 1e-6
        assert max(projection_errors(updates, u[:, : ko - 1], v[:, :ki])) > budget
        assert max(projection_errors(updates, u[:, :ko], v[:, : ki - 1])) > budget


def test_fixed_rank_1_errors_and_baselines_match_dense_numpy(noisy, tmp_path) -> None:
    result = merge(noisy, tmp_path / "b.upk", rank=1)
    manifest = result.manifest
    idx = index_of(manifest)
    check_recorded_errors(noisy, tmp_path / "b.upk", manifest)
    for m in MODULES:
        t = manifest.tensors[idx[m]]
        assert t.form == "subspace" and tuple(t.ranks) == (1, 1)
        out_dim, in_dim = SHAPES[m.removeprefix(PREFIX)]
        updates = [a.update(m) for a in noisy]
        u, left_eigs, v, _ = stacked_bases(updates)
        expected = projection_errors(updates, u[:, :1], v[:, :1])
        mean = sum(updates) / len(updates)
        share = 1 * 1 + (out_dim * 1 + in_dim * 1) / len(updates)
        for i, (_a, w) in enumerate(zip(noisy, updates)):
            rec = manifest.members[i]
            # the error of the optimal rank-(1,1) projection, up to float32 storage
            assert rec.errors[idx[m]] == pytest.approx(expected[i], rel=1e-4)
            f = rec.fidelity
            assert f.norms[idx[m]] == pytest.approx(np.linalg.norm(w), rel=1e-3)
            assert f.mean_errors[idx[m]] == pytest.approx(rel(w, mean), rel=1e-3)
            q = int(min(share // (out_dim + in_dim), 8))
            sigma = np.linalg.svd(w, compute_uv=False)
            assert f.svd_ranks[idx[m]] == q
            assert f.svd_errors[idx[m]] == pytest.approx(np.sqrt(np.sum(sigma[q:] ** 2)) / np.linalg.norm(w), rel=1e-3)
        # the recorded spectrum is the left spectrum of Σ ΔW ΔWᵀ
        if t.spectrum:
            np.testing.assert_allclose(t.spectrum, left_eigs[: len(t.spectrum)], rtol=1e-3)


def test_energy_rule_ranks_match_dense_numpy(noisy, tmp_path) -> None:
    fraction = 0.9
    result = merge(noisy, tmp_path / "b.upk", energy=fraction)
    idx = index_of(result.manifest)
    check_recorded_errors(noisy, tmp_path / "b.upk", result.manifest)
    for m in MODULES:
        updates = [a.update(m) for a in noisy]
        _, left, _, right = stacked_bases(updates)
        want = tuple(int(np.searchsorted(np.cumsum(e) / e.sum(), fraction - 1e-12) + 1) for e in (left, right))
        t = result.manifest.tensors[idx[m]]
        assert t.form == "subspace" and tuple(t.ranks) == want


@pytest.fixture
def sketching(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Sketched bases for these small collections (as for hundreds of adapters): from Σ r = 0,
    2 columns of oversampling (so the sketch is under half the exact basis); counts the sketches."""
    from unipack.core import lora

    monkeypatch.setattr(lora, "SKETCH_FROM", 0)
    monkeypatch.setattr(lora, "OVERSAMPLE", 2)
    calls = {"n": 0}
    sketch = lora._sketch

    def counted(*args: Any) -> Any:
        calls["n"] += 1
        return sketch(*args)

    monkeypatch.setattr(lora, "_sketch", counted)
    return calls


@pytest.mark.parametrize(
    "options", [{"max_error": 0.3}, {"max_error": 0.15, "lossless": "full"}, {"rank": 6, "dtype": "float16"}]
)
def test_sketched_bases_in_a_merge(noisy, tmp_path, sketching, options) -> None:
    """A merge on sketched bases: every recorded error is the dense error of the extracted
    factors, the budget holds, and the bytes are the same serially, again, and in two workers."""
    result = merge(noisy, tmp_path / "1.upk", jobs=1, **options)
    assert sketching["n"] >= 3  # body.2 both sides, body.0's left (its right side is only 32 wide)
    measured = check_recorded_errors(noisy, tmp_path / "1.upk", result.manifest)
    for m in MODULES:
        t = result.manifest.tensors[index_of(result.manifest)[m]]
        assert t.form == "subspace"
        if "max_error" in options:
            assert max(measured[m]) <= options["max_error"]
        else:
            assert tuple(t.ranks) == (options["rank"], options["rank"])
        # The record's variance is still Σ ||ΔW_i||² (the sketched spectrum holds only its head).
        total = sum(float(np.sum(a.update(m) ** 2)) for a in noisy)
        assert t.params.variance == pytest.approx(total, rel=1e-3)
    merge(noisy, tmp_path / "2.upk", jobs=1, **options)
    merge(noisy, tmp_path / "3.upk", jobs=2, **options)
    assert (tmp_path / "1.upk").read_bytes() == (tmp_path / "2.upk").read_bytes() == (tmp_path / "3.upk").read_bytes()
    with unipack.open(tmp_path / "1.upk") as b:
        assert b.verify() == []


def test_sketched_energy_rule_matches_dense_numpy(noisy, tmp_path, sketching) -> None:
    """The energy rule on sketched bases: the fraction of the dense total, read from the sketch's
    leading spectrum (the same ranks as the exact SVD's, on this population)."""
    fraction = 0.9
    result = merge(noisy, tmp_path / "b.upk", energy=fraction, jobs=1)
    assert sketching["n"] >= 3
    idx = index_of(result.manifest)
    check_recorded_errors(noisy, tmp_path / "b.upk", result.manifest)
    for m in MODULES:
        _, left, _, right = stacked_bases([a.update(m) for a in noisy])
        want = tuple(int(np.searchsorted(np.cumsum(e) / e.sum(), fraction - 1e-12) + 1) for e in (left, right))
        t = result.manifest.tensors[idx[m]]
        assert t.form == "subspace" and tuple(t.ranks) == want


# --------------------------------------------------------------------------------------------
# 3. invariance to the factors' gauge (B M, M⁻¹ A)
# --------------------------------------------------------------------------------------------


def test_updates_and_ranks_are_invariant_to_factor_gauge(tmp_path) -> None:
    original = structured_population(tmp_path / "orig", n=10, noise=0.05, seed=3, dtype=np.float64, heads=False)
    rng = np.random.default_rng(7)
    gauged = []
    for a in original:
        mods = {}
        for m, (fa, fb, _) in a.modules.items():
            r = fa.shape[0]
            mat = orth(rng, r, r) @ np.diag(rng.uniform(0.5, 2.0, r)) @ orth(rng, r, r)
            mods[m.removeprefix(PREFIX)] = (np.linalg.solve(mat, fa), fb @ mat)
        gauged.append(write_adapter(tmp_path / "gauged" / a.name, mods, r=8, alpha=16.0))
    for a, g in zip(original, gauged):
        for m in MODULES:
            assert rel(a.update(m), g.update(m)) < 1e-13
            assert not np.allclose(a.modules[m][0], g.modules[m][0])
    for options in ({"max_error": 0.3}, {"energy": 0.9}, {"rank": 2}):
        r1 = merge(original, tmp_path / "o.upk", force=True, **options)
        r2 = merge(gauged, tmp_path / "g.upk", force=True, **options)
        assert [(t.form, t.ranks) for t in r1.manifest.tensors] == [(t.form, t.ranks) for t in r2.manifest.tensors]
        assert all(t.form == "subspace" for t in r1.manifest.tensors)
        with unipack.open(tmp_path / "o.upk") as b1, unipack.open(tmp_path / "g.upk") as b2:
            for a in original:
                u1, u2 = b1.load(a.name, lora="updates"), b2.load(a.name, lora="updates")
                assert set(u1) == set(u2)
                for key in u1:
                    assert u1[key].dtype == torch.float64  # the members' own dtype
                    np.testing.assert_allclose(
                        as64(u2[key]), as64(u1[key]), rtol=0, atol=1e-6 * float(u1[key].abs().max())
                    )
        for m1, m2 in zip(r1.manifest.members, r2.manifest.members):
            np.testing.assert_allclose(m1.errors, m2.errors, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------------------
# 4. mixed ranks and partial target modules
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Adapter], Path, Any]:
    directory = tmp_path_factory.mktemp("partial")
    touch = [["body.0", "body.2"], ["body.0"], ["body.2", "body.0"], ["body.0", "body.2"], ["body.0"]]
    adapters = structured_population(directory / "in", n=10, ranks=[4, 8, 8, 4, 8], touch=touch, seed=4, heads=False)
    out = directory / "b.upk"
    return adapters, out, merge(adapters, out, max_error=1e-5)


def test_mixed_ranks_and_partial_targets(partial, tmp_path) -> None:
    adapters, path, result = partial
    manifest = result.manifest
    idx = index_of(manifest)
    assert [t.name for t in manifest.tensors] == MODULES and all(t.storage == "lora" for t in manifest.tensors)
    assert any(len(a.modules) == 1 for a in adapters)
    assert {a.modules[MODULES[0]][0].shape[0] for a in adapters} == {4, 8}
    with unipack.open(path) as b:
        for i, a in enumerate(adapters):
            rec = manifest.members[i]
            assert set(rec.lora) == set(a.modules)
            loaded = b.load(a.name)
            updates = b.load(a.name, lora="updates")
            assert set(loaded) == {f"{m}.lora_{x}.weight" for m in a.modules for x in "AB"}
            assert set(updates) == {update_key(m) for m in a.modules}
            b.extract(a.name, tmp_path / f"{a.name}.safetensors")
            b.extract_peft(a.name, tmp_path / a.name)
            for file in (tmp_path / f"{a.name}.safetensors", tmp_path / a.name / WEIGHTS):
                assert set(load_numpy(str(file))) == set(loaded)
            for m in MODULES:
                if m not in a.modules:
                    assert rec.errors[idx[m]] == 0.0
                    continue
                fa, fb, s = a.modules[m]
                r = fa.shape[0]
                assert rec.lora[m][0] == r and rec.lora[m][1] == pytest.approx(16.0 / r)
                assert tuple(loaded[f"{m}.lora_A.weight"].shape) == (r, fa.shape[1])
                assert tuple(loaded[f"{m}.lora_B.weight"].shape) == (fb.shape[0], r)
                assert rel(a.update(m), factor_update(loaded, m, s)) < 1e-5
                assert rel(a.update(m), as64(updates[update_key(m)])) < 1e-5
            # peft loads the partial adapter too, and it is the original's
            np.testing.assert_allclose(peft_outputs(tmp_path / a.name), peft_outputs(a.path), atol=1e-5, rtol=0)


def test_module_touched_only_by_later_adapters(tmp_path) -> None:
    """The first adapter lacks a module the others have: still merged, ordered after its modules."""
    touch = [["body.0"], ["body.2", "body.0"], ["body.2"]]
    adapters = structured_population(tmp_path / "in", n=3, ranks=[4], touch=touch, seed=8, heads=False)
    result = merge(adapters, tmp_path / "b.upk", rank=2)
    assert [t.name for t in result.manifest.tensors] == MODULES
    check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
    assert set(result.manifest.members[2].lora) == {MODULES[1]}


# --------------------------------------------------------------------------------------------
# 5. rsLoRA, rank_pattern, alpha_pattern: PEFT's own scaling
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patterned(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Adapter], list[nn.Module]]:
    configs = [
        {"use_rslora": True, "r": 4, "lora_alpha": 6},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"body.2": 2}, "alpha_pattern": {"body.0": 5}},
        {"use_rslora": True, "r": 8, "lora_alpha": 3, "rank_pattern": {"body.0": 3}, "alpha_pattern": {r"body\.2": 7}},
        {"r": 6, "lora_alpha": 2},
    ]
    return peft_population(tmp_path_factory.mktemp("patterned"), configs, seed=20)


@pytest.mark.parametrize("options", [{"max_error": 0.0}, {"rank": 2}, {"energy": 0.6}])
def test_rslora_and_patterns_scale_like_peft(patterned, tmp_path, options) -> None:
    adapters, models = patterned
    # the population is what it claims: the scales differ from plain alpha / r
    scales = {(a.name, m): a.modules[m][2] for a in adapters for m in a.modules}
    assert scales[("peft0", MODULES[0])] == pytest.approx(6 / 2)  # rsLoRA: 6 / sqrt(4)
    assert scales[("peft1", MODULES[1])] == pytest.approx(8 / 2)  # rank_pattern: r = 2
    assert scales[("peft1", MODULES[0])] == pytest.approx(5 / 4)  # alpha_pattern
    assert scales[("peft2", MODULES[0])] == pytest.approx(3 / np.sqrt(3))
    assert scales[("peft2", MODULES[1])] == pytest.approx(7 / np.sqrt(8))
    result = merge(adapters, tmp_path / "b.upk", **options)
    forms = {t.form for t in result.manifest.tensors if t.storage == "lora"}
    assert forms == ({"factors"} if "max_error" in options else {"subspace"})
    for i, a in enumerate(adapters):
        rec = result.manifest.members[i]
        for m, (fa, _, s) in a.modules.items():
            assert rec.lora[m] == (fa.shape[0], s)  # exactly peft's float
    check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
    if options.get("max_error") == 0.0:
        with unipack.open(tmp_path / "b.upk") as b:
            for a in adapters:
                updates = b.load(a.name, lora="updates")
                for m in a.modules:
                    np.testing.assert_allclose(as64(updates[update_key(m)]), a.update(m), rtol=0, atol=1e-6)
                b.extract_peft(a.name, tmp_path / a.name)
        for a, model in zip(adapters, models):
            with torch.no_grad():
                want = model(INPUTS)
            np.testing.assert_allclose(peft_outputs(tmp_path / a.name), want, atol=1e-5, rtol=0)


def test_rslora_hand_made_scale(tmp_path) -> None:
    rng = np.random.default_rng(11)
    adapters = []
    for i, r in enumerate((4, 9)):
        mods = {
            m: (rng.standard_normal((r, inn)).astype(np.float32), rng.standard_normal((o, r)).astype(np.float32))
            for m, (o, inn) in SHAPES.items()
        }
        adapters.append(write_adapter(tmp_path / f"rs{i}", mods, r=r, alpha=6, rslora=True))
    result = merge(adapters, tmp_path / "b.upk", rank=3)
    for i, r in enumerate((4, 9)):
        for m in MODULES:
            assert result.manifest.members[i].lora[m] == (r, 6 / np.sqrt(r))
    check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)


def test_fan_in_fan_out_updates_are_transposed(tmp_path) -> None:
    rng = np.random.default_rng(12)
    adapters = []
    for i in range(3):
        mods = {
            m: (rng.standard_normal((2, inn)).astype(np.float32), rng.standard_normal((o, 2)).astype(np.float32))
            for m, (o, inn) in SHAPES.items()
        }
        adapters.append(write_adapter(tmp_path / f"c{i}", mods, r=2, alpha=4, fan_in_fan_out=True))
    merge(adapters, tmp_path / "b.upk", max_error=0.0)
    with unipack.open(tmp_path / "b.upk") as b:
        for a in adapters:
            updates = b.load(a.name, lora="updates")
            for m in MODULES:
                got = as64(updates[update_key(m)])
                assert got.shape == a.update(m).T.shape
                np.testing.assert_allclose(got, a.update(m).T, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. peft loads the extracted folders
# --------------------------------------------------------------------------------------------


def check_peft_round_trip(
    adapters: list[Adapter], path: Path, out: Path, *, original_atol: float | None, force: bool = False
) -> None:
    with unipack.open(path) as b:
        exports = b.extract_peft_all(out, force=force)
        assert [e.directory for e in exports] == [out / a.name for a in adapters]
        for a in adapters:
            folder = out / a.name
            assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]
            assert (folder / CONFIG).read_bytes() == (a.path / CONFIG).read_bytes()  # verbatim
            loaded = b.load(a.name)
            saved = load_numpy(str(folder / WEIGHTS))
            assert set(saved) == set(loaded)
            for key, value in saved.items():
                assert np.array_equal(value, loaded[key].numpy())
            extras = {k: v for k, v in loaded.items() if ".lora_" not in k}
            assert set(extras) == set(a.extras)
            got = peft_outputs(folder)
            want = patched_outputs(b.load(a.name, lora="updates"), extras)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            if original_atol is not None:
                np.testing.assert_allclose(got, peft_outputs(a.path), atol=original_atol, rtol=0)


def test_peft_loads_extracted_peft_made_adapters_exactly(peft_made, tmp_path) -> None:
    adapters, models = peft_made
    merge(adapters, tmp_path / "b.upk", max_error=0.0)
    check_peft_round_trip(adapters, tmp_path / "b.upk", tmp_path / "out", original_atol=1e-5)
    for a, model in zip(adapters, models):
        with torch.no_grad():
            np.testing.assert_allclose(peft_outputs(tmp_path / "out" / a.name), model(INPUTS), atol=1e-5, rtol=0)


def test_peft_loads_extracted_lossy_peft_made_adapters(peft_made, tmp_path) -> None:
    adapters, _ = peft_made
    result = merge(adapters, tmp_path / "b.upk", rank=2)
    assert all(t.form == "subspace" for t in result.manifest.tensors if t.storage == "lora")
    check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
    check_peft_round_trip(adapters, tmp_path / "b.upk", tmp_path / "out", original_atol=None)


@pytest.mark.parametrize(
    "max_error, original_atol, form", [(0.0, 1e-5, "factors"), (1e-5, 1e-4, "subspace"), (0.3, None, "subspace")]
)
def test_peft_loads_extracted_structured_adapters(exact3, noisy, tmp_path, max_error, original_atol, form) -> None:
    adapters = (exact3 if max_error < 0.1 else noisy)[:6]
    result = merge(adapters, tmp_path / "b.upk", max_error=max_error)
    assert {t.form for t in result.manifest.tensors if t.storage == "lora"} == {form}
    check_peft_round_trip(adapters, tmp_path / "b.upk", tmp_path / "out", original_atol=original_atol)


def test_cli_merge_info_extract_peft(exact3, tmp_path) -> None:
    adapters = exact3[:4]
    out = tmp_path / "b.upk"
    assert_ok(run("merge", *[a.path for a in adapters], "-o", out, "--max-error", "1e-5", "--no-quantize"))
    api = tmp_path / "api.upk"
    merge(adapters, api, max_error=1e-5)
    assert out.read_bytes() == api.read_bytes()  # the CLI and the API make the same bundle
    info = run("info", out)
    assert_ok(info)
    assert adapters[0].name in info.output
    one = run("extract", out, "-m", adapters[1].name, "--format", "peft", "-o", tmp_path / "one")
    assert_ok(one)
    assert str(tmp_path / "one") in one.stdout
    np.testing.assert_allclose(peft_outputs(tmp_path / "one"), peft_outputs(adapters[1].path), atol=1e-4, rtol=0)
    # again without --force: refused, nothing changed; with --force: replaced
    before = (tmp_path / "one" / WEIGHTS).read_bytes()
    again = run("extract", out, "-m", adapters[1].name, "--format", "peft", "-o", tmp_path / "one")
    line = assert_one_line_error(again)
    assert str(tmp_path / "one") in line
    assert (tmp_path / "one" / WEIGHTS).read_bytes() == before
    assert_ok(run("extract", out, "-m", adapters[2].name, "--format", "peft", "-o", tmp_path / "one", "--force"))
    np.testing.assert_allclose(peft_outputs(tmp_path / "one"), peft_outputs(adapters[2].path), atol=1e-4, rtol=0)
    assert_ok(run("extract", out, "--all", "--format", "peft", "-o", tmp_path / "all"))
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [a.name for a in adapters]
    for a in adapters:
        np.testing.assert_allclose(peft_outputs(tmp_path / "all" / a.name), peft_outputs(a.path), atol=1e-4, rtol=0)
    # --format safetensors gives the adapter file's keys
    assert_ok(run("extract", out, "-m", adapters[0].name, "-o", tmp_path / "x.safetensors"))
    assert set(load_numpy(str(tmp_path / "x.safetensors"))) == set(load_numpy(str(adapters[0].path / WEIGHTS)))


# --------------------------------------------------------------------------------------------
# 7. factors form: bit-exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("options", [{"max_error": 0.0}, {"max_error": 1e-4}])
def test_factors_form_is_bit_exact(tmp_path, dtype, options) -> None:
    adapters = random_population(tmp_path / "in", n=3, r=4, dtype=dtype)
    result = merge(adapters, tmp_path / "b.upk", **options)
    lora_records = [t for t in result.manifest.tensors if t.storage == "lora"]
    assert [t.form for t in lora_records] == ["factors", "factors"], [t.reason for t in lora_records]
    assert all(e == 0.0 for m in result.manifest.members for e in m.errors)
    with unipack.open(tmp_path / "b.upk") as b:
        for a in adapters:
            original = load_numpy(str(a.path / WEIGHTS))
            loaded = b.load(a.name)
            b.extract(a.name, tmp_path / f"{a.name}.safetensors")
            b.extract_peft(a.name, tmp_path / a.name)
            for got in (
                load_numpy(str(tmp_path / f"{a.name}.safetensors")),
                load_numpy(str(tmp_path / a.name / WEIGHTS)),
                {k: v.numpy() for k, v in loaded.items()},
            ):
                assert set(got) == set(original)
                for key, value in original.items():
                    assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
            updates = b.load(a.name, lora="updates")
            for m in MODULES:
                assert updates[update_key(m)].numpy().dtype == dtype
                np.testing.assert_allclose(
                    as64(updates[update_key(m)]),
                    a.update(m),
                    rtol=0,
                    atol=2 * np.finfo(dtype).eps * np.abs(a.update(m)).max(),
                )


# --------------------------------------------------------------------------------------------
# 8. clear errors
# --------------------------------------------------------------------------------------------


def test_adapter_with_full_checkpoint_is_refused(exact3, tmp_path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_numpy({"body.0.weight": np.zeros((64, 32), np.float32)}, str(plain))
    for inputs in ([exact3[0].path, plain], [plain, exact3[0].path], [exact3[0].path, exact3[1].path, plain]):
        out = tmp_path / "b.upk"
        with pytest.raises(InputError) as info:
            unipack.merge(inputs, out, max_error=0.1)
        assert str(plain) in str(info.value)
        assert not out.exists()
        line = assert_one_line_error(run("merge", *inputs, "-o", out))
        assert str(plain) in line
        assert not out.exists()


def test_extract_format_mismatches_are_one_line_errors(exact3_bundle, tmp_path) -> None:
    path, result = exact3_bundle
    member = result.manifest.members[0].name
    line = assert_one_line_error(run("extract", path, "-m", member, "--format", "hf", "-o", tmp_path / "hf"))
    assert "peft" in line
    assert not (tmp_path / "hf").exists()
    line = assert_one_line_error(run("extract", path, "--all", "--format", "hf", "-o", tmp_path / "hfall"))
    assert "peft" in line
    # a dense (full checkpoint) bundle refuses --format peft
    dense = tmp_path / "dense"
    dense.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(dense / f"m{i}.safetensors")
        save_numpy({"w": rng.standard_normal((8, 8)).astype(np.float32)}, str(paths[-1]))
    unipack.merge(paths, tmp_path / "dense.upk", max_error=0.1)
    with unipack.open(tmp_path / "dense.upk") as b:
        assert not b.is_lora
        with pytest.raises(UnipackError, match="not LoRA"):
            b.extract_peft("m0", tmp_path / "p")
        with pytest.raises(UnipackError):
            b.load("m0", lora="updates")
    line = assert_one_line_error(
        run("extract", tmp_path / "dense.upk", "-m", "m0", "--format", "peft", "-o", tmp_path / "p")
    )
    assert str(tmp_path / "dense.upk") in line
    assert not (tmp_path / "p").exists()
    line = assert_one_line_error(
        run("extract", tmp_path / "dense.upk", "--all", "--format", "peft", "-o", tmp_path / "pall")
    )
    assert not (tmp_path / "pall").exists() or not any((tmp_path / "pall").iterdir())


def save_peft_variant(folder: Path, model: nn.Module, cfg: LoraConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, cfg).save_pretrained(str(folder))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))


@pytest.mark.parametrize("variant, words", [("dora", ["DoRA"]), ("embedding", ["embedding"])])
def test_variants_are_refused_by_name(exact3, tmp_path, variant, words) -> None:
    folder = tmp_path / variant
    if variant == "dora":
        save_peft_variant(
            folder, base_model(), LoraConfig(r=4, target_modules=["body.0"], use_dora=True, init_lora_weights=False)
        )
    else:
        torch.manual_seed(0)
        save_peft_variant(folder, EmbNet(), LoraConfig(r=4, target_modules=["emb", "body.0"], init_lora_weights=False))
    out = tmp_path / "b.upk"
    for inputs in ([exact3[0].path, folder], [folder, exact3[0].path]):
        with pytest.raises(InputError) as info:
            unipack.merge(inputs, out, max_error=0.1)
        message = str(info.value)
        assert str(folder) in message
        assert all(w.lower() in message.lower() for w in words), message
        line = assert_one_line_error(run("merge", *inputs, "-o", out))
        assert all(w.lower() in line.lower() for w in words)
        assert not out.exists()


def test_dora_keys_without_the_config_flag_are_refused(tmp_path) -> None:
    """A config that hides DoRA (use_dora false) still cannot slip its magnitudes through as extras."""
    rng = np.random.default_rng(0)
    adapters = random_population(tmp_path / "in", n=2)
    mods = {
        m: (rng.standard_normal((4, inn)).astype(np.float32), rng.standard_normal((o, 4)).astype(np.float32))
        for m, (o, inn) in SHAPES.items()
    }
    extras = {f"{PREFIX}body.0.lora_magnitude_vector": np.ones(64, np.float32)}
    sneaky = write_adapter(tmp_path / "sneaky", mods, r=4, alpha=8, extras=extras)
    with pytest.raises(InputError, match="DoRA"):
        merge([*adapters, sneaky], tmp_path / "b.upk", rank=1)


def test_shape_mismatch_between_adapters_is_refused(tmp_path) -> None:
    adapters = random_population(tmp_path / "in", n=2)
    rng = np.random.default_rng(1)
    mods = {
        "body.0": (rng.standard_normal((4, 16)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32))
    }
    odd = write_adapter(tmp_path / "odd", mods, r=4, alpha=8)
    out = tmp_path / "b.upk"
    with pytest.raises(InputError) as info:
        merge([*adapters, odd], out, max_error=0.1)
    message = str(info.value)
    assert str(odd.path) in message and MODULES[0] in message and "64 x 16" in message and "64 x 32" in message
    assert not out.exists()
    assert_one_line_error(run("merge", *[a.path for a in [*adapters, odd]], "-o", out))
    assert not out.exists()


def test_modules_to_save_mismatch_is_refused(tmp_path) -> None:
    with_head = structured_population(tmp_path / "h", n=2, seed=2, heads=True)
    without = structured_population(tmp_path / "n", n=1, seed=3, heads=False, prefix="nohead")
    out = tmp_path / "b.upk"
    for inputs in ([*with_head, *without], [*without, *with_head]):
        with pytest.raises(InputError) as info:
            merge(inputs, out, max_error=0.1)
        message = str(info.value)
        assert "head.weight" in message and "modules_to_save" in message, message
        assert_one_line_error(run("merge", *[a.path for a in inputs], "-o", out))
        assert not out.exists()


def test_differently_shaped_heads_are_stored_raw_per_adapter(tmp_path) -> None:
    """Task heads of different sizes (same key) are allowed: each adapter's comes back bit-exact."""
    adapters = structured_population(tmp_path / "in", n=3, seed=6, heads=False)
    rng = np.random.default_rng(6)
    for i, a in enumerate(adapters):
        mods = {m.removeprefix(PREFIX): (fa, fb) for m, (fa, fb, _) in a.modules.items()}
        extras = {f"{PREFIX}head.weight": rng.standard_normal((3 + i, 64)).astype(np.float32)}
        shutil.rmtree(a.path)
        adapters[i] = write_adapter(a.path, mods, r=8, alpha=16.0, extras=extras)
    merge(adapters, tmp_path / "b.upk", rank=3)
    with unipack.open(tmp_path / "b.upk") as b:
        assert b.verify() == []
        for a in adapters:
            got = b.load(a.name)[f"{PREFIX}head.weight"].numpy()
            assert got.tobytes() == a.extras[f"{PREFIX}head.weight"].tobytes()


# --------------------------------------------------------------------------------------------
# 9. verify and determinism
# --------------------------------------------------------------------------------------------


def test_verify_and_determinism(exact3_bundle, partial, peft_made, tmp_path) -> None:
    for path in (exact3_bundle[0], partial[1]):
        with unipack.open(path) as b:
            assert b.verify() == []
    adapters, _ = peft_made
    for options in ({"max_error": 0.0}, {"rank": 2}, {"max_error": 0.2, "dtype": "bfloat16"}):
        merge(adapters, tmp_path / "1.upk", force=True, **options)
        merge(adapters, tmp_path / "2.upk", force=True, **options)
        assert (tmp_path / "1.upk").read_bytes() == (tmp_path / "2.upk").read_bytes(), options
        with unipack.open(tmp_path / "1.upk") as b:
            assert b.verify() == []
    # the same adapters from another folder: the same bundle bytes (no paths recorded)
    copies = []
    for a in adapters:
        shutil.copytree(a.path, tmp_path / "copy" / a.name)
        copies.append(Adapter(tmp_path / "copy" / a.name, a.modules, a.extras))
    merge(copies, tmp_path / "3.upk", max_error=0.2, dtype="bfloat16")
    assert (tmp_path / "3.upk").read_bytes() == (tmp_path / "1.upk").read_bytes()


def test_verify_reports_a_corrupt_core(exact3_bundle, tmp_path) -> None:
    path, _ = exact3_bundle
    copy = tmp_path / "c.upk"
    shutil.copy(path, copy)
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0xFF
    copy.write_bytes(bytes(data))
    with unipack.open(copy) as b:
        assert b.verify() != []


# --------------------------------------------------------------------------------------------
# edge cases: member dtypes, zero updates, signs, ranks above a dimension, .bin adapters
# --------------------------------------------------------------------------------------------


def retyped(adapter: Adapter, dtype: str) -> Adapter:
    """Rewrite ``adapter``'s factors in ``dtype`` (bfloat16 through torch); the truth follows."""
    from safetensors.torch import save_file as save_torch

    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    sd, truth = {}, {}
    for m, (fa, fb, s) in adapter.modules.items():
        ta, tb = torch.from_numpy(fa).to(tdtype), torch.from_numpy(fb).to(tdtype)
        sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = ta, tb
        truth[m] = (as64(ta), as64(tb), s)
    for k, v in adapter.extras.items():
        sd[k] = torch.from_numpy(v)
    save_torch(sd, str(adapter.path / WEIGHTS), metadata={"format": "pt"})
    return Adapter(adapter.path, truth, adapter.extras)


def test_members_keep_their_own_factor_dtypes(tmp_path) -> None:
    adapters = structured_population(tmp_path / "in", n=5, noise=0.05, seed=9, heads=False)
    adapters[1] = retyped(adapters[1], "float16")
    adapters[2] = retyped(adapters[2], "bfloat16")
    adapters[3] = retyped(adapters[3], "float64")
    want = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64, 4: torch.float32}
    (tmp_path / "p").mkdir()
    for options in ({"max_error": 0.0}, {"max_error": 0.1}, {"rank": 2}):
        result = merge(adapters, tmp_path / "b.upk", force=True, **options)
        check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
        with unipack.open(tmp_path / "b.upk") as b:
            for i, a in enumerate(adapters):
                assert {v.dtype for v in b.load(a.name).values()} == {want[i]}
                assert {v.dtype for v in b.load(a.name, lora="updates").values()} == {want[i]}
                b.extract_peft(a.name, tmp_path / "p" / a.name, force=True)
                saved = load_numpy(str(tmp_path / "p" / a.name / WEIGHTS)) if want[i] != torch.bfloat16 else None
                if options == {"max_error": 0.0}:
                    original = (a.path / WEIGHTS).read_bytes()
                    # bit-exact factors in their own dtype: the extracted file equals the input byte for byte
                    assert (tmp_path / "p" / a.name / WEIGHTS).read_bytes() == original
                elif saved is not None:
                    assert {v.dtype for v in saved.values()} == {np.dtype(str(want[i]).removeprefix("torch."))}


@pytest.mark.parametrize("options", [{"max_error": 0.0}, {"max_error": 0.1}, {"rank": 2}, {"energy": 0.9}])
def test_untrained_adapters_with_zero_b(tmp_path, options) -> None:
    """peft's default init (B = 0): every update is zero; merge, load and peft loading still work."""
    adapters = []
    for i in range(3):
        torch.manual_seed(i)
        folder = tmp_path / f"z{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base_model(), LoraConfig(r=4 + i, target_modules=["body.0", "body.2"]))
            model.save_pretrained(str(folder))
        saved = load_numpy(str(folder / WEIGHTS))
        adapters.append(
            Adapter(
                folder, {m: (saved[f"{m}.lora_A.weight"], saved[f"{m}.lora_B.weight"], 8 / (4 + i)) for m in MODULES}
            )
        )
    result = merge(adapters, tmp_path / "b.upk", **options)
    assert all(e == 0.0 for m in result.manifest.members for e in m.errors)
    (tmp_path / "p").mkdir()
    with unipack.open(tmp_path / "b.upk") as b:
        assert b.verify() == []
        for a in adapters:
            assert all(float(u.abs().max()) == 0.0 for u in b.load(a.name, lora="updates").values())
            loaded = b.load(a.name)
            for m in MODULES:
                assert tuple(loaded[f"{m}.lora_A.weight"].shape) == a.modules[m][0].shape
                assert not factor_update(loaded, m, 1.0).any()
            b.extract_peft(a.name, tmp_path / "p" / a.name)
            with torch.no_grad():
                want = base_model()(INPUTS)
            np.testing.assert_allclose(peft_outputs(tmp_path / "p" / a.name), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [-8.0, 0.0])
@pytest.mark.parametrize("options", [{"max_error": 0.0}, {"max_error": 0.1}, {"rank": 2}])
def test_negative_and_zero_alpha(tmp_path, alpha, options) -> None:
    adapters = structured_population(tmp_path / "in", n=4, noise=0.05, seed=10, alpha=alpha, heads=False)
    result = merge(adapters, tmp_path / "b.upk", **options)
    for i in range(len(adapters)):
        assert all(rec == (8, alpha / 8) for rec in result.manifest.members[i].lora.values())
    measured = check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
    if "max_error" in options:
        assert max(max(v) for v in measured.values()) <= options["max_error"] + 3e-8
    with unipack.open(tmp_path / "b.upk") as b:
        for a in adapters:
            updates = b.load(a.name, lora="updates")
            for m in MODULES:
                w = a.update(m)
                if alpha == 0.0:
                    assert not as64(updates[update_key(m)]).any()
                elif options == {"max_error": 0.0}:
                    np.testing.assert_allclose(as64(updates[update_key(m)]), w, rtol=0, atol=1e-6)


def test_adapter_rank_above_a_dimension(tmp_path) -> None:
    """r = 40 on a 64 x 32 layer: the update has rank <= 32; factors still come back at r = 40."""
    adapters = structured_population(tmp_path / "in", n=3, ranks=[40], noise=0.05, seed=13, heads=False)
    for options in ({"max_error": 0.0}, {"max_error": 0.1}, {"rank": 2}):
        result = merge(adapters, tmp_path / "b.upk", force=True, **options)
        check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
        with unipack.open(tmp_path / "b.upk") as b:
            loaded = b.load(adapters[0].name)
            assert tuple(loaded[f"{MODULES[0]}.lora_A.weight"].shape) == (40, 32)
            assert tuple(loaded[f"{MODULES[0]}.lora_B.weight"].shape) == (64, 40)


def test_bin_adapters_merge_with_safetensors_ones(tmp_path) -> None:
    configs = [{"modules_to_save": ["head"], "bias": "lora_only"}] * 3
    adapters, models = peft_population(tmp_path / "sf", configs, seed=30)
    # re-save the second one as a pickle (safe_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shutil.rmtree(adapters[1].path)
        models[1].save_pretrained(str(adapters[1].path), safe_serialization=False)
    assert (adapters[1].path / "adapter_model.bin").exists() and not (adapters[1].path / WEIGHTS).exists()
    assert any(k.endswith("body.0.base_layer.bias") for k in adapters[0].extras)
    for options in ({"max_error": 0.0}, {"rank": 3}):
        result = merge(adapters, tmp_path / "b.upk", force=True, **options)
        check_recorded_errors(adapters, tmp_path / "b.upk", result.manifest)
        check_peft_round_trip(
            adapters,
            tmp_path / "b.upk",
            tmp_path / "out",
            force=True,
            original_atol=1e-5 if options == {"max_error": 0.0} else None,
        )


def test_extract_peft_all_checks_every_target_first(exact3_bundle, tmp_path) -> None:
    path, result = exact3_bundle
    names = [m.name for m in result.manifest.members]
    taken = tmp_path / "out" / names[-1]
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("precious")
    with unipack.open(path) as b:
        with pytest.raises(UnipackError) as info:
            b.extract_peft_all(tmp_path / "out")
        assert str(taken) in str(info.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [names[-1]]
    assert (taken / "keep.txt").read_text() == "precious"


# --------------------------------------------------------------------------------------------
# bugs found
# --------------------------------------------------------------------------------------------


def _tiny_errors(adapters: list[Adapter], path: Path, manifest: Any) -> list[tuple[float, float]]:
    """(measured, recorded) per adapter and module."""
    idx = index_of(manifest)
    out = []
    with unipack.open(path) as b:
        for i, a in enumerate(adapters):
            factors = b.load(a.name)
            for m in a.modules:
                out.append(
                    (rel(a.update(m), factor_update(factors, m, a.modules[m][2])), manifest.members[i].errors[idx[m]])
                )
    return out


def test_tiny_recorded_errors_are_not_understated(exact3, exact3_bundle) -> None:
    path, result = exact3_bundle
    pairs = _tiny_errors(exact3, path, result.manifest)
    assert max(m for m, _ in pairs) < 1e-6  # the regime in question: only rounding is lost
    for measured, recorded in pairs:
        assert recorded >= measured * (1 - 1e-6), (measured, recorded)


def test_tiny_max_error_budget_is_kept(exact3, exact3_bundle, tmp_path) -> None:
    path, result = exact3_bundle
    budget = max(recorded for _, recorded in _tiny_errors(exact3, path, result.manifest))
    again = merge(exact3, tmp_path / "b.upk", max_error=budget)
    for measured, _ in _tiny_errors(exact3, tmp_path / "b.upk", again.manifest):
        # Measured in float64 by two methods (QR there, dense here): equal to ~1e-10 relative.
        assert measured <= budget * (1 + 1e-8), (measured, budget)


def test_max_delta_error_is_refused_for_adapters(exact3: list[Adapter], tmp_path: Path) -> None:
    """An adapter is already a delta: the rule relative to the mean of members has no meaning for
    it, and saying so beats silently applying --max-error."""
    with pytest.raises(OptionsError, match="--max-delta-error is for full checkpoints"):
        merge(exact3, tmp_path / "b.upk", max_delta_error=0.2)
    assert not (tmp_path / "b.upk").exists()


def test_size_target_on_lora_adapters(tmp_path: Path) -> None:
    """``merge --size`` on adapters scales the LoRA rule (--max-error of each update, no delta
    bound) and fits the target; every adapter's update stays within the recorded bound."""
    from unipack.pack.size_target import merge_to_size

    adapters = structured_population(tmp_path / "in", n=16, k=3, noise=0.2, seed=9, heads=False)
    paths = [a.path for a in adapters]
    full = unipack.merge(paths, tmp_path / "default.upk")
    target = int(full.file_bytes * 0.9)
    result = merge_to_size(paths, tmp_path / "sized.upk", target)
    assert result.file_bytes == (tmp_path / "sized.upk").stat().st_size <= target
    record = result.manifest.stats["size_target"]
    assert record["max_delta_error"] is None and record["max_error"] > unipack.options.LORA_DEFAULT_MAX_ERROR
    assert record["met"] == (result.file_bytes >= 0.99 * target)
    with unipack.open(tmp_path / "sized.upk") as b:
        for adapter in adapters:
            assert max(b.member(adapter.name).errors) <= record["max_error"]
