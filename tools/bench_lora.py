#!/usr/bin/env python
"""Benchmark LoRA adapter collections: unipack vs factor-wise vs vlora-dev, at equal bytes.

What it measures
----------------
A population of real PEFT LoRA adapters of one small base model (built and trained here, see
below) is stored by several schemes; each gives, per adapter and per target module, a rebuilt
update ΔŴ_i and a count of the bytes it stores for the LoRA factors. Against the exact update
ΔW_i = s_i · B_i · A_i (s_i = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) it reports

* the relative error of the update, per adapter over all its modules:
  sqrt(Σ_m ||ΔW_i,m − ΔŴ_i,m||²_F) / sqrt(Σ_m ||ΔW_i,m||²_F), its mean and worst over adapters.
  Always of the PRODUCT ΔW, never of the factors: B·A = (B·M)(M⁻¹·A) for any invertible M, so
  an error in A or B alone says little about what the adapter does;
* task accuracy: the base model with W0 + ΔŴ_i in every target module and the adapter's own
  (original) task head, on the held-out split; the drop vs the original adapter in points
  (mean and largest over adapters);
* LoRA bytes and the ratios against the adapters' own ``adapter_model.safetensors`` files
  (their LoRA tensors alone, and the whole files).

The schemes
-----------
* ``unipack`` (update space): ``unipack.merge(adapter folders, max_error=E or rank=K)``, then
  ``Bundle.load(member, lora="updates")`` gives ΔŴ per module. unipack stores a module in the
  update space (U, V, one k_out x k_in core per adapter) or, where that would cost more bytes,
  as the adapters' own factors, exactly (the ``config`` column counts both forms). Bytes: the
  ``bases`` + ``coefficients`` + ``factors`` (+ ``means``) parts of ``unipack.report(bundle)``,
  as stored (after the bundle's lossless codec, zstd level 3 by
  default); header/manifest overhead and the heads (the ``modules_to_save`` tensors) are
  counted separately (``--json``), and the whole file for the total ratio.
  Once per run ``PeftModel.from_pretrained(base, <Bundle.extract_peft folder>)`` is checked
  against W0 + ΔŴ (max abs logit difference).
* ``factor-wise`` (what tools that compress A and B separately do; implemented here with
  numpy): per module, the rows of every adapter's A_i are stacked and the columns of every B_i
  are stacked; a truncated SVD of each stack gives shared bases V_A (in x k_A) and U_B
  (out x k_B); each adapter stores A_i V_A (r_i x k_A) and U_Bᵀ B_i (k_B x r_i). Rebuilt:
  ΔŴ_i = s_i · U_B U_Bᵀ B_i A_i V_A V_Aᵀ. Bytes: float32 bases + coordinates. At each budget
  two allocations are tried, one k for every module and side, and per module/side the smallest
  k keeping a common fraction of that stack's energy, each the largest that fits the byte
  budget; the one with the lower mean ΔW error is reported (a choice made in this scheme's
  favour). It has no fallback to the exact factors, and its total counts no container overhead.
* ``vlora-dev`` (the published package ``vlora``, run as is): ``vlora.load_adapter`` reads each
  PEFT folder, ``SharedSubspace.from_adapters(num_components=k)`` flattens each adapter's A_i
  and B_i per layer, centres the N vectors and keeps k principal components;
  ``reconstruct(task)`` gives the factors, and ΔŴ_i = s_i · B̂_i Â_i. vlora requires one rank
  for all adapters, so lower-rank adapters are zero-padded to the largest rank (exact: B A is
  unchanged). Bytes: what ``SharedSubspace.save`` writes, float32: components, singular values
  and means per layer, loadings per task (the tensor payload; its files, with safetensors
  headers and JSON metadata, are measured too).
* ``mean-only``: every adapter replaced by the population's mean update per module (a dense
  out x in float32 matrix per module). Not at equal bytes: its bytes are what they are.
* ``zero update``: ΔŴ = 0 with the adapter's own head (0 LoRA bytes): how much the LoRA part
  matters at all for these tasks.
* ``originals``: the adapters' safetensors files, their LoRA tensors, and zstd -19 of the files.

Equal bytes: for each unipack budget (``--budgets``, default max_error 0.05, 0.2, 0.5 and rank
2, 4) factor-wise and vlora-dev get the largest configuration whose LoRA bytes are <= unipack's
LoRA bytes at that budget (float32 for both; unipack stores float32 too unless a budget says
``dtype=float16``: then factor-wise and vlora-dev store float16 too). A budget ``ratio=R`` (LoRA
bytes = originals' LoRA bytes / R) compares the other schemes without running unipack. A scheme
whose smallest configuration does not fit is shown with its smallest configuration and marked
``over``.

The population (deterministic for a seed; no downloads)
-------------------------------------------------------
Data: scikit-learn's UCI digits (8x8 images, 1797 samples, shipped with the package), a fixed
70/30 train/test split. Base model: a tiny ViT (2x2 patches → 16 tokens + a class token,
``--dim`` 64, 2 pre-norm blocks with ``attn.{q,k,v,o}`` and ``mlp.{fc1,fc2}`` Linears, a
10-way ``head``), pre-trained on 10-way digit classification. Adapters: ``peft`` LoRA on every
``q, k, v, o, fc1, fc2`` (12 modules) with ``modules_to_save=["head"]``, trained on a family of
tasks that need the features to change: a label map (digit, parity, mod 3, mod 4, < 5, prime,
closed loops, is-7) on transformed inputs (rotations, flips, transpose, inverted intensity,
shift); only one of the 12 (parity of plain digits) could do with the head alone. Adapter i
does task i mod 12 with its own seed (LoRA init and data order); most have r = 8, every fifth
r = 4, two use rsLoRA; lora_alpha = 16. ``--shared-init`` starts every adapter from the same
LoRA initialisation instead (as adapters trained with one fixed seed would be), the case where
factor-space schemes have the best chance. Note the regime: at ``--dim`` 64 the modules are
64 or 128 wide while 24 adapters bring Σ r_i = 184 directions, so together the updates span
whole modules, and no scheme finds a small shared subspace to exploit (in a large model the
widths are thousands). A wider ``--dim`` is closer to that, and slower to train.

Files live in ``--workdir`` (default ``./bench-work``) under ``lora-pop-<fingerprint>/`` (base
model, PEFT folders, their original accuracies) and ``lora-run-<fingerprint>/`` (bundles, vlora
saves, extracted folders); a population with the same fingerprint is reused.

How to run
----------
    python tools/bench_lora.py                                    # 24 adapters, default budgets
    python tools/bench_lora.py --adapters 16 --json lora.json
    python tools/bench_lora.py --budgets max_error=0.1,rank=8,ratio=10 --shared-init

The default run takes about 3 minutes on 2 cores the first time (2.5 of them training the
population), under a minute when the population is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the population's generator changes, so stale populations are not reused.
GENERATOR_VERSION = 1
TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
DEFAULT_BUDGETS = "max_error=0.05,max_error=0.2,max_error=0.5,rank=2,rank=4"
F32 = 4


# --------------------------------------------------------------------------------------------
# Tasks: a label map on transformed digits
# --------------------------------------------------------------------------------------------

LOOPS = {0: 1, 4: 1, 6: 1, 8: 2, 9: 1}  # closed loops in the usual glyphs
LABEL_MAPS: dict[str, tuple[int, Any]] = {
    "digit": (10, lambda y: y),
    "parity": (2, lambda y: y % 2),
    "mod3": (3, lambda y: y % 3),
    "mod4": (4, lambda y: y % 4),
    "lt5": (2, lambda y: (y < 5).astype(np.int64)),
    "prime": (2, lambda y: np.isin(y, (2, 3, 5, 7)).astype(np.int64)),
    "loops": (3, lambda y: np.array([LOOPS.get(int(v), 0) for v in y], dtype=np.int64)),
    "is7": (2, lambda y: (y == 7).astype(np.int64)),
}
TRANSFORMS: dict[str, Any] = {
    "identity": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip_lr": lambda x: x[:, :, ::-1],
    "flip_ud": lambda x: x[:, ::-1, :],
    "transpose": lambda x: np.transpose(x, (0, 2, 1)),
    "invert": lambda x: 1.0 - x,
    "shift": lambda x: np.roll(x, (1, 1), axis=(1, 2)),
}
#: (label map, input transform); adapter i does TASKS[i % len(TASKS)].
TASKS = (
    ("digit", "rot90"),
    ("digit", "flip_lr"),
    ("digit", "invert"),
    ("parity", "rot180"),
    ("mod3", "transpose"),
    ("lt5", "flip_ud"),
    ("prime", "rot270"),
    ("loops", "invert"),
    ("mod4", "shift"),
    ("is7", "rot90"),
    ("parity", "identity"),
    ("digit", "shift"),
)


def task_name(task: tuple[str, str]) -> str:
    return task[0] if task[1] == "identity" else f"{task[0]}-{task[1]}"


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # n x 8 x 8 in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng([seed, 7]).permutation(len(y))
    cut = int(0.7 * len(y))
    tr, te = order[:cut], order[cut:]
    return Digits(x[tr], y[tr], x[te], y[te])


def task_data(digits: Digits, task: tuple[str, str], split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = (digits.x_train, digits.y_train) if split == "train" else (digits.x_test, digits.y_test)
    return np.ascontiguousarray(TRANSFORMS[task[1]](x), dtype=np.float32), LABEL_MAPS[task[0]][1](y)


# --------------------------------------------------------------------------------------------
# The base model: a tiny ViT whose projections are plain nn.Linear modules (PEFT targets)
# --------------------------------------------------------------------------------------------


def make_model(dim: int, depth: int, heads: int) -> Any:
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            split = [f(x).view(b, t, heads, dim // heads).transpose(1, 2) for f in (self.q, self.k, self.v)]
            out = torch.nn.functional.scaled_dot_product_attention(*split)
            return self.o(out.transpose(1, 2).reshape(b, t, dim))

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(dim), Attention(), nn.LayerNorm(dim), Mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, dim)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            b = images.shape[0]
            patches = images.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)  # 2x2 patches
            x = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[:, 0]))

    return TinyViT()


# --------------------------------------------------------------------------------------------
# The population
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopulationSpec:
    """Base model, training settings and adapter plan of the population."""

    adapters: int = 24
    seed: int = 0
    dim: int = 64
    depth: int = 2
    heads: int = 4
    base_epochs: int = 40
    lora_epochs: int = 12
    lora_lr: float = 5e-3
    lora_alpha: int = 16
    shared_init: bool = False

    def fingerprint(self) -> str:
        import torch

        text = json.dumps({"v": GENERATOR_VERSION, "torch": torch.__version__, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    task: tuple[str, str]
    rank: int
    rslora: bool
    seed: int


def adapter_plan(spec: PopulationSpec) -> list[AdapterSpec]:
    """Adapter i: task i mod 12, r = 4 for every fifth (else 8), rsLoRA for two of them."""
    plan = []
    for i in range(spec.adapters):
        task = TASKS[i % len(TASKS)]
        rank = 4 if i % 5 == 4 else 8
        rslora = i in (6, 13)
        plan.append(AdapterSpec(f"a{i:02d}-{task_name(task)}", task, rank, rslora, 1000 * spec.seed + i + 1))
    return plan


def train(model: Any, params: list[Any], x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    """Adam on mini-batches of 64, data order from ``seed``."""
    import torch

    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ys), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def accuracy_of(model: Any, x: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Held-out accuracy; the prediction is the argmax over the task's first ``classes`` logits."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x))[:, :classes]
    return float((logits.argmax(1).numpy() == y).mean())


def build_population(spec: PopulationSpec, pop_dir: Path, console: Any) -> dict[str, Any]:
    """Pre-train the base, train every adapter with PEFT, save them; ``population.json`` last."""
    import peft
    import torch
    from safetensors.torch import save_file

    if pop_dir.exists():
        shutil.rmtree(pop_dir)  # an incomplete earlier build (population.json is written last)
    (pop_dir / "adapters").mkdir(parents=True)
    digits = load_digits_split(spec.seed)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    base = make_model(spec.dim, spec.depth, spec.heads)
    train(
        base,
        list(base.parameters()),
        *task_data(digits, ("digit", "identity"), "train"),
        spec.base_epochs,
        3e-3,
        spec.seed,
    )
    base_acc = accuracy_of(base, *task_data(digits, ("digit", "identity"), "test"), 10)
    base_state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    save_file(base_state, str(pop_dir / "base.safetensors"))
    console.print(
        f"  base model: {sum(v.numel() for v in base_state.values())} params, digit accuracy "
        f"{base_acc:.3f} ({time.perf_counter() - started:.1f}s)"
    )
    rows = []
    for a in adapter_plan(spec):
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = make_model(spec.dim, spec.depth, spec.heads)
        model.load_state_dict(base_state)
        torch.manual_seed(spec.seed if spec.shared_init else a.seed)  # LoRA A init
        config = peft.LoraConfig(
            r=a.rank,
            lora_alpha=spec.lora_alpha,
            target_modules=list(TARGETS),
            modules_to_save=["head"],
            use_rslora=a.rslora,
            lora_dropout=0.0,
        )
        pm = peft.get_peft_model(model, config)
        x, y = task_data(digits, a.task, "train")
        train(pm, [p for p in pm.parameters() if p.requires_grad], x, y, spec.lora_epochs, spec.lora_lr, a.seed)
        classes = LABEL_MAPS[a.task[0]][0]
        acc = accuracy_of(pm, *task_data(digits, a.task, "test"), classes)
        pm.save_pretrained(str(pop_dir / "adapters" / a.name))
        rows.append({**asdict(a), "classes": classes, "accuracy": acc})
        console.print(
            f"  {a.name}: r={a.rank}{' rslora' if a.rslora else ''}, accuracy {acc:.3f} "
            f"({time.perf_counter() - t0:.1f}s)"
        )
    doc = {"spec": asdict(spec), "base_accuracy": base_acc, "adapters": rows, "seconds": time.perf_counter() - started}
    (pop_dir / "population.json").write_text(json.dumps(doc, indent=1))
    return doc


def ensure_population(spec: PopulationSpec, workdir: Path, console: Any) -> tuple[Path, dict[str, Any]]:
    pop_dir = workdir / f"lora-pop-{spec.fingerprint()}"
    marker = pop_dir / "population.json"
    if marker.is_file():
        console.print(f"[dim]reusing {spec.adapters} adapters in {pop_dir}[/dim]")
        return pop_dir, json.loads(marker.read_text())
    console.print(f"building the population in {pop_dir} ...")
    doc = build_population(spec, pop_dir, console)
    console.print(f"[dim]built in {doc['seconds']:.1f}s[/dim]")
    return pop_dir, doc


# --------------------------------------------------------------------------------------------
# Adapters as factors
# --------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    name: str
    folder: Path
    task: tuple[str, str]
    classes: int
    accuracy: float  # of the PEFT model right after training
    rank: int
    scale: float
    a: dict[str, np.ndarray]  # module -> r x in (float64)
    b: dict[str, np.ndarray]  # module -> out x r
    head: dict[str, np.ndarray]  # "head.weight", "head.bias"
    lora_bytes: int  # bytes of its lora_A/lora_B tensors as stored
    head_bytes: int
    file_bytes: int  # the whole adapter_model.safetensors

    def update(self, module: str) -> np.ndarray:
        return self.scale * (self.b[module] @ self.a[module])


PREFIX = "base_model.model."


def read_adapter(folder: Path, row: dict[str, Any]) -> Adapter:
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    path = folder / "adapter_model.safetensors"
    a: dict[str, np.ndarray] = {}
    b: dict[str, np.ndarray] = {}
    head: dict[str, np.ndarray] = {}
    lora_bytes = head_bytes = 0
    for key, value in load_file(str(path)).items():
        name = key.removeprefix(PREFIX)
        if ".lora_A." in name or ".lora_B." in name:
            module, side = name.split(".lora_")[0], name.split(".lora_")[1][0]
            (a if side == "A" else b)[module] = value.astype(np.float64)
            lora_bytes += value.nbytes
        else:
            head[name] = value
            head_bytes += value.nbytes
    return Adapter(
        row["name"],
        folder,
        tuple(row["task"]),
        row["classes"],
        row["accuracy"],
        r,
        scale,
        a,
        b,
        head,
        lora_bytes,
        head_bytes,
        path.stat().st_size,
    )


# --------------------------------------------------------------------------------------------
# Schemes: each returns ΔŴ per adapter and module, and its LoRA bytes
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    scheme: str
    budget: str
    config: str
    lora_bytes: int
    total_bytes: int  # LoRA bytes + heads + format overhead as measured (or counted)
    updates: list[dict[str, np.ndarray]] = field(repr=False)
    over_budget: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


def modules_of(adapters: list[Adapter]) -> list[str]:
    return sorted(adapters[0].a)


# -- factor-wise -----------------------------------------------------------------------------


@dataclass
class FactorModule:
    """One module's factor stacks, fitted once: row basis of the A's, column basis of the B's."""

    v_a: np.ndarray  # in x K_A
    energy_a: np.ndarray  # σ² of the A-row stack
    u_b: np.ndarray  # out x K_B
    energy_b: np.ndarray
    in_dim: int
    out_dim: int
    sum_r: int


def fit_factor_modules(adapters: list[Adapter]) -> dict[str, FactorModule]:
    fitted = {}
    for m in modules_of(adapters):
        rows = np.concatenate([ad.a[m] for ad in adapters], axis=0)  # Σr x in
        cols = np.concatenate([ad.b[m] for ad in adapters], axis=1)  # out x Σr
        _, sa, vt = np.linalg.svd(rows, full_matrices=False)
        ub, sb, _ = np.linalg.svd(cols, full_matrices=False)
        fitted[m] = FactorModule(vt.T, sa**2, ub, sb**2, rows.shape[1], cols.shape[0], rows.shape[0])
    return fitted


def factor_bytes(fitted: dict[str, FactorModule], ks: dict[str, tuple[int, int]], itemsize: int) -> int:
    """Bases V_A, U_B and every adapter's r_i x k_A and k_B x r_i coordinates, ``itemsize`` bytes each."""
    return itemsize * sum(
        f.in_dim * ks[m][0] + f.out_dim * ks[m][1] + f.sum_r * (ks[m][0] + ks[m][1]) for m, f in fitted.items()
    )


def factor_updates(
    adapters: list[Adapter], fitted: dict[str, FactorModule], ks: dict[str, tuple[int, int]], dtype: Any
) -> list[dict[str, np.ndarray]]:
    def stored(x: np.ndarray) -> np.ndarray:  # what is stored, as counted in factor_bytes
        return x.astype(dtype).astype(np.float64)

    out = []
    for ad in adapters:
        ups = {}
        for m, f in fitted.items():
            v, u = stored(f.v_a[:, : ks[m][0]]), stored(f.u_b[:, : ks[m][1]])
            a_hat = stored(ad.a[m] @ v) @ v.T
            b_hat = u @ stored(u.T @ ad.b[m])
            ups[m] = ad.scale * (b_hat @ a_hat)
        out.append(ups)
    return out


def energy_k(energy: np.ndarray, fraction: float) -> int:
    if fraction <= 0 or energy.size == 0 or energy.sum() == 0:
        return 0
    cum = np.cumsum(energy) / energy.sum()
    return min(int(np.searchsorted(cum, fraction - 1e-12)) + 1, int(energy.size))


def factor_allocations(
    fitted: dict[str, FactorModule], budget: int, itemsize: int
) -> dict[str, dict[str, tuple[int, int]]]:
    """The largest uniform-k and the largest equal-energy-fraction allocation within ``budget`` bytes."""
    kmax = max(max(f.v_a.shape[1], f.u_b.shape[1]) for f in fitted.values())

    def uniform(k: int) -> dict[str, tuple[int, int]]:
        return {m: (min(k, f.v_a.shape[1]), min(k, f.u_b.shape[1])) for m, f in fitted.items()}

    def by_energy(frac: float) -> dict[str, tuple[int, int]]:
        return {m: (energy_k(f.energy_a, frac), energy_k(f.energy_b, frac)) for m, f in fitted.items()}

    k = max((k for k in range(kmax + 1) if factor_bytes(fitted, uniform(k), itemsize) <= budget), default=0)
    lo, hi = 0.0, 1.0  # bisect the largest fraction that fits (bytes grow with the fraction)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if factor_bytes(fitted, by_energy(mid), itemsize) <= budget else (lo, mid)
    return {f"k={k}": uniform(k), f"energy={lo:.4f}": by_energy(lo)}


def run_factorwise(
    adapters: list[Adapter],
    fitted: dict[str, FactorModule],
    budget: int,
    label: str,
    exact: list[dict[str, np.ndarray]],
    heads_bytes: int,
    dtype: str,
) -> Result:
    best: Result | None = None
    tried = {}
    itemsize = np.dtype(dtype).itemsize
    for config, ks in factor_allocations(fitted, budget, itemsize).items():
        ups = factor_updates(adapters, fitted, ks, np.dtype(dtype))
        errs = update_errors(exact, ups)
        nbytes = factor_bytes(fitted, ks, itemsize)
        tried[config] = {
            "lora_bytes": nbytes,
            "error_mean": float(np.mean(errs)),
            "ranks": {m: list(k) for m, k in ks.items()},
        }
        if best is None or np.mean(errs) < np.mean(best.errors):
            best = Result("factor-wise", label, config, nbytes, nbytes + heads_bytes, ups, errors=errs)
    assert best is not None
    best.extra["allocations_tried"] = tried
    return best


# -- vlora-dev -------------------------------------------------------------------------------


def vlora_inputs(adapters: list[Adapter]) -> tuple[list[Any], int]:
    """Each folder through ``vlora.load_adapter``, zero-padded to the largest rank (vlora needs one)."""
    import torch
    import vlora

    r_max = max(ad.rank for ad in adapters)
    loaded = []
    for ad in adapters:
        w = vlora.load_adapter(ad.folder)
        if w.rank < r_max:
            pad = r_max - w.rank
            lora_a = {k: torch.cat([t, t.new_zeros(pad, t.shape[1])], 0) for k, t in w.lora_a.items()}
            lora_b = {k: torch.cat([t, t.new_zeros(t.shape[0], pad)], 1) for k, t in w.lora_b.items()}
            w = vlora.LoRAWeights(w.layer_names, lora_a, lora_b, r_max, dict(w.metadata, r=r_max))
        loaded.append(w)
    return loaded, r_max


def vlora_payload_bytes(weights: list[Any], k: int, itemsize: int) -> int:
    """Bytes that ``SharedSubspace.save`` writes at num_components=k (tensor data only).

    Per layer: k components of each flattened side, k singular values per side, the two means;
    per task: k loadings per side and layer. k is capped at min(N, dims) per side, as vlora does.
    """
    n = len(weights)
    total = 0
    for layer in weights[0].layer_names:
        for side in (weights[0].lora_a[layer], weights[0].lora_b[layer]):
            d = side.numel()
            kk = min(k, n, d)
            total += kk * d + kk + d + n * kk
    return itemsize * total


def run_vlora(
    adapters: list[Adapter], weights: list[Any], budget: int, label: str, save_dir: Path, heads_bytes: int, dtype: str
) -> Result:
    """vlora at the largest num_components whose saved payload fits ``budget`` (float16: ``to(dtype)``
    before saving, vlora's own way to store half precision)."""
    import warnings

    import torch
    import vlora

    n, itemsize = len(weights), np.dtype(dtype).itemsize
    fits = [k for k in range(n + 1) if vlora_payload_bytes(weights, k, itemsize) <= budget]
    k, over = (max(fits), False) if fits else (0, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = vlora.SharedSubspace.from_adapters(weights, task_ids=[ad.name for ad in adapters], num_components=k)
    if dtype != "float32":
        sub.to(dtype=getattr(torch, dtype))
    if save_dir.exists():
        shutil.rmtree(save_dir)
    sub.save(save_dir)
    files = sum(p.stat().st_size for p in save_dir.iterdir())
    from safetensors.numpy import load_file

    payload = sum(t.nbytes for p in save_dir.glob("*.safetensors") for t in load_file(str(p)).values())
    ups = []
    for ad in adapters:
        rec = sub.reconstruct(ad.name)
        ups.append(
            {
                m: ad.scale * (rec.lora_b[m].to(torch.float64).numpy() @ rec.lora_a[m].to(torch.float64).numpy())
                for m in modules_of(adapters)
            }
        )
    return Result(
        "vlora-dev",
        label,
        f"k={k}",
        payload,
        files + heads_bytes,
        ups,
        over_budget=over,
        extra={
            "num_components": k,
            "payload_bytes": payload,
            "files_bytes": files,
            "payload_predicted": vlora_payload_bytes(weights, k, itemsize),
        },
    )


# -- unipack ---------------------------------------------------------------------------------


def unipack_has_lora() -> bool:
    import inspect

    import unipack

    return "lora" in inspect.signature(unipack.Bundle.load).parameters


def run_unipack(
    adapters: list[Adapter], options: dict[str, Any], label: str, run_dir: Path, exact: list[dict[str, np.ndarray]]
) -> Result:
    """Merge the adapter folders at one budget; ΔŴ from ``load(lora="updates")``, bytes from the bundle.

    LoRA bytes are the ``bases`` + ``coefficients`` + ``factors`` (+ ``means``) parts of
    ``unipack.report``: ``factors`` are modules kept as the adapters' own factors, where the
    subspace would cost more; the heads are ``raw``. The worst per-module error is measured here
    from the loaded updates and set against the report's.
    """
    import unipack

    out = run_dir / f"unipack-{label.replace('=', '').replace(',', '-')}.upk"
    t0 = time.perf_counter()
    unipack.merge([ad.folder for ad in adapters], out, names=[ad.name for ad in adapters], force=True, **options)
    seconds = time.perf_counter() - t0
    modules = modules_of(adapters)
    ups, other_keys = [], set()
    with unipack.open(out) as bundle:
        rep = unipack.report(bundle)
        parts = dict(rep.bytes.parts)
        recorded_worst = max(m.errors["unipack"].worst for m in rep.members if m.errors["unipack"])
        factor_blobs = parts["factors"]
        forms = [(t.form, t.ranks) for t in bundle.manifest.tensors if t.storage == "lora"]
        for ad in adapters:
            loaded = bundle.load(ad.name, lora="updates")
            other_keys |= set(loaded) - {f"{m}.weight" for m in modules}
            ups.append({m: loaded[f"{m}.weight"].double().numpy() for m in modules})
    lora = parts["bases"] + parts["coefficients"] + parts["means"] + parts["factors"]
    file_bytes = out.stat().st_size
    measured_worst = max(
        float(np.linalg.norm(e[m] - u[m]) / np.linalg.norm(e[m])) for e, u in zip(exact, ups) for m in modules
    )
    sub = [r for f, r in forms if f == "subspace" and r is not None]
    config = f"{len(sub)} subspace"
    if sub:
        config += f" (k {min(min(r) for r in sub)}-{max(max(r) for r in sub)})"
    if len(sub) < len(forms):
        config += f", {len(forms) - len(sub)} factors"
    return Result(
        "unipack",
        label,
        config,
        lora,
        file_bytes,
        ups,
        extra={
            "parts": parts,
            "factor_form_bytes": factor_blobs,
            "heads_bytes": parts["raw"],
            "overhead_bytes": parts["header"] + parts["manifest"] + parts["padding"],
            "file_bytes": file_bytes,
            "merge_seconds": seconds,
            "bundle": str(out),
            "forms": [[f, list(r) if r else None] for f, r in forms],
            "all_factors": not sub,
            "other_keys_in_load": sorted(other_keys),
            "worst_module_error_measured": measured_worst,
            "worst_module_error_recorded": recorded_worst,
        },
    )


def check_extract_peft(
    adapter: Adapter,
    bundle_path: Path,
    update: dict[str, np.ndarray],
    spec: PopulationSpec,
    base_state: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """``PeftModel.from_pretrained(base, extracted folder)`` vs W0 + ΔŴ (and the original head)."""
    import peft
    import torch

    import unipack

    folder = run_dir / f"extracted-{adapter.name}"
    if folder.exists():
        shutil.rmtree(folder)
    with unipack.open(bundle_path) as bundle:
        bundle.extract_peft(adapter.name, folder)
    x = torch.from_numpy(np.ascontiguousarray(TRANSFORMS[adapter.task[1]](load_digits_split(spec.seed).x_test)))
    torch.manual_seed(spec.seed)
    base = make_model(spec.dim, spec.depth, spec.heads)
    base.load_state_dict(base_state)
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(base, str(folder))
        pm.eval()
        via_peft = pm(x)
        merged = merged_model(spec, base_state, update, adapter.head)
        via_merge = merged(x)
    diff = float((via_peft - via_merge).abs().max())
    ref = float(via_merge.abs().max())
    return {"adapter": adapter.name, "folder": str(folder), "max_abs_logit_diff": diff, "max_abs_logit": ref}


# -- shared ----------------------------------------------------------------------------------


def mean_only(adapters: list[Adapter], exact: list[dict[str, np.ndarray]], heads_bytes: int) -> Result:
    modules = modules_of(adapters)
    mean = {m: np.mean([e[m] for e in exact], axis=0).astype(np.float32).astype(np.float64) for m in modules}
    nbytes = F32 * sum(mean[m].size for m in modules)
    return Result("mean-only", "-", "dense mean per module", nbytes, nbytes + heads_bytes, [mean] * len(adapters))


def zero_update(adapters: list[Adapter], heads_bytes: int) -> Result:
    zero = {m: np.zeros_like(adapters[0].update(m)) for m in modules_of(adapters)}
    return Result("zero update", "-", "heads only", 0, heads_bytes, [zero] * len(adapters))


def update_errors(exact: list[dict[str, np.ndarray]], approx: list[dict[str, np.ndarray]]) -> list[float]:
    """Per adapter: sqrt(Σ_m ||ΔW − ΔŴ||²) / sqrt(Σ_m ||ΔW||²) over all its modules."""
    out = []
    for e, a in zip(exact, approx):
        num = sum(float(np.sum((e[m] - a[m]) ** 2)) for m in e)
        den = sum(float(np.sum(e[m] ** 2)) for m in e)
        out.append(math.sqrt(num / den) if den > 0 else math.sqrt(num))
    return out


def merged_model(
    spec: PopulationSpec, base_state: dict[str, Any], update: dict[str, np.ndarray], head: dict[str, np.ndarray]
) -> Any:
    """The base model with W0 + ΔŴ in every target module and the given head."""
    import torch

    state = dict(base_state)
    for m, delta in update.items():
        key = f"{m}.weight"
        state[key] = (state[key].double() + torch.from_numpy(delta)).float()
    for key, value in head.items():
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    model = make_model(spec.dim, spec.depth, spec.heads)
    model.load_state_dict(state)
    model.eval()
    return model


def score(
    result: Result,
    adapters: list[Adapter],
    exact: list[dict[str, np.ndarray]],
    spec: PopulationSpec,
    base_state: dict[str, Any],
    digits: Digits,
) -> Result:
    if not result.errors:
        result.errors = update_errors(exact, result.updates)
    result.accuracies = [
        accuracy_of(merged_model(spec, base_state, up, ad.head), *task_data(digits, ad.task, "test"), ad.classes)
        for ad, up in zip(adapters, result.updates)
    ]
    return result


# --------------------------------------------------------------------------------------------
# Budgets, report
# --------------------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[dict[str, Any]]:
    """``max_error=0.05,rank=2,ratio=10`` -> one dict per budget (``dtype=float16`` may follow one)."""
    budgets: list[dict[str, Any]] = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ("max_error", "rank", "ratio", "dtype"):
            raise argparse.ArgumentTypeError(
                f"--budgets {item!r}: expected max_error=E, rank=K, ratio=R (or dtype=float16 after one of them)"
            )
        if key == "dtype":
            if not budgets or value.strip() not in ("float32", "float16"):  # numpy has no bfloat16
                raise argparse.ArgumentTypeError("--budgets: dtype=float32 or dtype=float16, after a budget")
            budgets[-1]["dtype"] = value.strip()
            continue
        budgets.append({key: int(value) if key == "rank" else float(value)})
    if not budgets:
        raise argparse.ArgumentTypeError("--budgets: give at least one budget")
    return budgets


def budget_label(budget: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in budget.items())


def summarize(r: Result, adapters: list[Adapter], originals: dict[str, int]) -> dict[str, Any]:
    drops = [100.0 * (ad.accuracy - acc) for ad, acc in zip(adapters, r.accuracies)]
    return {
        "scheme": r.scheme,
        "budget": r.budget,
        "config": r.config,
        "lora_bytes": r.lora_bytes,
        "total_bytes": r.total_bytes,
        "over_budget": r.over_budget,
        "ratio_lora": originals["lora_bytes"] / r.lora_bytes if r.lora_bytes else None,
        "ratio_total": originals["file_bytes"] / r.total_bytes if r.total_bytes else None,
        "error_mean": float(np.mean(r.errors)),
        "error_worst": float(np.max(r.errors)),
        "drop_mean": float(np.mean(drops)),
        "drop_max": float(np.max(drops)),
        "per_adapter": [
            {"name": ad.name, "error": e, "accuracy": acc, "drop_points": d}
            for ad, e, acc, d in zip(adapters, r.errors, r.accuracies, drops)
        ],
        "extra": r.extra,
    }


def fmt_bytes(n: int) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def render(rows: list[dict[str, Any]], originals: dict[str, int], title: str, console: Any) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "scheme",
        "budget",
        "config",
        "LoRA bytes",
        "× LoRA",
        "× total",
        "ΔW err mean",
        "ΔW err worst",
        "acc drop mean",
        "acc drop max",
    ):
        table.add_column(col, justify="left" if col in ("scheme", "budget", "config") else "right")
    table.add_row(
        "originals",
        "-",
        f"{originals['n']} safetensors files",
        fmt_bytes(originals["lora_bytes"]),
        "1.0",
        "1.0",
        "0",
        "0",
        "0",
        "0",
    )
    table.add_row(
        "originals zstd-19",
        "-",
        "whole files",
        "-",
        "-",
        f"{originals['file_bytes'] / originals['zstd19_bytes']:.2f}",
        "0",
        "0",
        "0",
        "0",
    )
    last_budget = None
    for r in rows:
        if r["budget"] != last_budget:
            table.add_section()
            last_budget = r["budget"]
        lora = fmt_bytes(r["lora_bytes"]) + (" over" if r["over_budget"] else "")
        table.add_row(
            r["scheme"],
            r["budget"],
            r["config"],
            lora,
            f"{r['ratio_lora']:.1f}" if r["ratio_lora"] else "-",
            f"{r['ratio_total']:.2f}" if r["ratio_total"] else "-",
            f"{r['error_mean']:.4f}",
            f"{r['error_worst']:.4f}",
            f"{r['drop_mean']:+.2f}",
            f"{r['drop_max']:+.2f}",
        )
    console.print(table)


#: Differences below these count as ties in the verdict (one test image is 0.19 points).
ERROR_TIE = 0.005
DROP_TIE = 0.25


def verdict(rows: list[dict[str, Any]]) -> str:
    """Who has the lowest mean ΔW error and the smallest mean accuracy drop at each equal-bytes budget
    (ties credited to every scheme within ERROR_TIE / DROP_TIE), and how the baselines compare."""
    budgets = [b for b in dict.fromkeys(r["budget"] for r in rows) if b != "-"]
    mean_row = next(r for r in rows if r["scheme"] == "mean-only")
    zero_row = next(r for r in rows if r["scheme"] == "zero update")
    err_wins: dict[str, int] = {}
    acc_wins: dict[str, int] = {}
    mean_as_good = []
    for b in budgets:
        group = [r for r in rows if r["budget"] == b and not r["over_budget"]]
        best_err = min(r["error_mean"] for r in group)
        best_drop = min(r["drop_mean"] for r in group)
        for r in group:
            if r["error_mean"] <= best_err + ERROR_TIE:
                err_wins[r["scheme"]] = err_wins.get(r["scheme"], 0) + 1
            if r["drop_mean"] <= best_drop + DROP_TIE:
                acc_wins[r["scheme"]] = acc_wins.get(r["scheme"], 0) + 1
        if mean_row["error_mean"] <= best_err + ERROR_TIE or mean_row["drop_mean"] <= best_drop + DROP_TIE:
            mean_as_good.append(b)

    def wins(counts: dict[str, int]) -> str:
        return ", ".join(f"{s} {n}/{len(budgets)}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    text = f"at equal bytes, lowest mean ΔW error: {wins(err_wins)}; smallest mean accuracy drop: {wins(acc_wins)}"
    copies = [r["budget"] for r in rows if r["scheme"] == "unipack" and r["extra"].get("all_factors")]
    if copies:
        text += (
            f" (at {', '.join(copies)} unipack kept every adapter's own factors, a lossless copy, so the others "
            f"were compared with the originals there)"
        )
    if mean_as_good:
        text += (
            f"; the mean-only baseline ({fmt_bytes(mean_row['lora_bytes'])}) does as well as the best scheme "
            f"at {', '.join(mean_as_good)}"
        )
    else:
        text += (
            f"; the mean update alone ({fmt_bytes(mean_row['lora_bytes'])}) is worse than the best scheme at "
            f"every budget (error {mean_row['error_mean']:.3f}, drop {mean_row['drop_mean']:+.1f} points)"
        )
    return text + f"; dropping the updates altogether (heads only) costs {zero_row['drop_mean']:+.1f} points"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapters", type=int, default=24, help="number of adapters N (default 24, at least 2)")
    p.add_argument(
        "--budgets",
        type=parse_budgets,
        default=parse_budgets(DEFAULT_BUDGETS),
        help=f"comma-separated unipack budgets max_error=E / rank=K (each may be followed by "
        f"dtype=float16), or ratio=R (default {DEFAULT_BUDGETS})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64, help="width of the tiny ViT (default 64; a multiple of 4)")
    p.add_argument(
        "--shared-init",
        action="store_true",
        help="start every adapter from the same LoRA initialisation (default: each its own seed)",
    )
    p.add_argument("--workdir", type=Path, default=Path("bench-work"), help="where the population and runs go")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; results depend on it)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument(
        "--skip-unipack",
        action="store_true",
        help="run only ratio= budgets and the other schemes (for a unipack without LoRA support)",
    )
    return p


def prepare_workdir(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    ignore = workdir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return workdir


def originals_bytes(adapters: list[Adapter]) -> dict[str, int]:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=19)
    zstd = sum(len(cctx.compress((ad.folder / "adapter_model.safetensors").read_bytes())) for ad in adapters)
    return {
        "n": len(adapters),
        "lora_bytes": sum(ad.lora_bytes for ad in adapters),
        "head_bytes": sum(ad.head_bytes for ad in adapters),
        "file_bytes": sum(ad.file_bytes for ad in adapters),
        "zstd19_bytes": zstd,
    }


def unipack_revision() -> dict[str, Any]:
    from unipack.version import revision

    return revision()


def bench(ns: argparse.Namespace) -> dict[str, Any]:
    import torch
    from rich.console import Console
    from safetensors.torch import load_file

    started = time.perf_counter()
    console = Console() if Console().is_terminal else Console(width=200)
    torch.set_num_threads(ns.threads)
    if ns.adapters < 2:
        raise SystemExit("--adapters: at least 2")
    if ns.dim % 4:
        raise SystemExit("--dim: a multiple of 4 (4 attention heads)")
    use_unipack = not ns.skip_unipack
    if use_unipack and not unipack_has_lora():
        raise SystemExit(
            "this unipack has no LoRA support (Bundle.load(..., lora=...)); use --skip-unipack with ratio= budgets"
        )
    spec = PopulationSpec(adapters=ns.adapters, seed=ns.seed, dim=ns.dim, shared_init=ns.shared_init)
    workdir = prepare_workdir(ns.workdir)
    pop_dir, pop = ensure_population(spec, workdir, console)
    run_dir = workdir / f"lora-run-{spec.fingerprint()}"
    run_dir.mkdir(exist_ok=True)
    digits = load_digits_split(spec.seed)
    base_state = load_file(str(pop_dir / "base.safetensors"))
    adapters = [read_adapter(pop_dir / "adapters" / row["name"], row) for row in pop["adapters"]]
    exact = [{m: ad.update(m) for m in modules_of(adapters)} for ad in adapters]
    heads_bytes = sum(ad.head_bytes for ad in adapters)
    originals = originals_bytes(adapters)
    # Sanity: the merged original update reproduces the PEFT model's accuracy.
    exact_acc = score(Result("exact", "-", "", 0, 0, exact), adapters, exact, spec, base_state, digits).accuracies
    mismatch = max(abs(a - ad.accuracy) for a, ad in zip(exact_acc, adapters))
    console.print(
        f"{len(adapters)} adapters, {len(modules_of(adapters))} LoRA modules each, ranks "
        f"{sorted({ad.rank for ad in adapters})}; originals {fmt_bytes(originals['file_bytes'])} "
        f"({fmt_bytes(originals['lora_bytes'])} LoRA, {fmt_bytes(originals['head_bytes'])} heads); "
        f"W0+ΔW vs PEFT accuracy: max difference {mismatch:.4f}"
    )

    fitted = fit_factor_modules(adapters)
    vl_weights, r_max = vlora_inputs(adapters)
    rows: list[dict[str, Any]] = []
    peft_check = None
    for budget in ns.budgets:
        label = budget_label(budget)
        group: list[Result] = []
        if "ratio" in budget:
            target = int(originals["lora_bytes"] / budget["ratio"])
        elif not use_unipack:
            console.print(f"[dim]skipping {label} (--skip-unipack)[/dim]")
            continue
        else:
            t0 = time.perf_counter()
            up = score(run_unipack(adapters, budget, label, run_dir, exact), adapters, exact, spec, base_state, digits)
            group.append(up)
            target = up.lora_bytes
            if peft_check is None:
                peft_check = check_extract_peft(
                    adapters[0], Path(up.extra["bundle"]), up.updates[0], spec, base_state, run_dir
                )
            console.print(f"[dim]unipack {label}: {fmt_bytes(target)} LoRA ({time.perf_counter() - t0:.1f}s)[/dim]")
        dtype = budget.get("dtype", "float32")  # the competitors store what unipack stores
        group.append(
            score(
                run_factorwise(adapters, fitted, target, label, exact, heads_bytes, dtype),
                adapters,
                exact,
                spec,
                base_state,
                digits,
            )
        )
        group.append(
            score(
                run_vlora(adapters, vl_weights, target, label, run_dir / f"vlora-{label}", heads_bytes, dtype),
                adapters,
                exact,
                spec,
                base_state,
                digits,
            )
        )
        rows += [summarize(r, adapters, originals) for r in group]
    for r in (mean_only(adapters, exact, heads_bytes), zero_update(adapters, heads_bytes)):
        rows.append(summarize(score(r, adapters, exact, spec, base_state, digits), adapters, originals))

    title = (
        f"{len(adapters)} LoRA adapters of a {spec.dim}-wide tiny ViT on digits "
        f"({'shared' if spec.shared_init else 'per-adapter'} LoRA init); LoRA bytes at equal budgets; "
        f"accuracy drop in points vs each original adapter"
    )
    render(rows, originals, title, console)
    if peft_check is not None:
        console.print(
            f"PeftModel.from_pretrained(base, extract_peft({peft_check['adapter']})) vs W0+ΔŴ: max abs logit "
            f"difference {peft_check['max_abs_logit_diff']:.2e} (logits up to "
            f"{peft_check['max_abs_logit']:.1f})"
        )
    ours = [r for r in rows if r["scheme"] == "unipack"]
    if ours:
        overheads = ", ".join(f"{r['budget']} {fmt_bytes(r['extra']['overhead_bytes'])}" for r in ours)
        checks = ", ".join(
            f"{r['budget']} {r['extra']['worst_module_error_measured']:.4f} / "
            f"{r['extra']['worst_module_error_recorded']:.4f}"
            for r in ours
        )
        console.print(f"unipack worst per-module ΔW error, measured here / recorded in the bundle: {checks}")
        console.print(
            f"unipack header + manifest per bundle (in × total, not in LoRA bytes): {overheads}; heads "
            f"(modules_to_save, every scheme keeps them exactly): {fmt_bytes(ours[0]['extra']['heads_bytes'])} "
            f"in the bundle, {fmt_bytes(originals['head_bytes'])} in the originals"
        )
    if r_max != min(ad.rank for ad in adapters):
        console.print(f"[dim]vlora-dev needs one rank: adapters of lower rank were zero-padded to r={r_max}[/dim]")
    line = verdict(rows)
    console.print(f"verdict: {line}")
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f}s in all[/dim]")
    doc = {
        "spec": asdict(spec),
        "population": pop,
        "originals": originals,
        "rows": rows,
        "verdict": line,
        "peft_check": peft_check,
        "exact_vs_peft_accuracy_max_diff": mismatch,
        "vlora_padded_rank": r_max,
        "unipack": unipack_revision(),
        "threads": ns.threads,
        "python": sys.version.split()[0],
        "seconds": seconds,
    }
    if ns.json:
        ns.json.write_text(json.dumps(doc, indent=1, default=str))
        console.print(f"wrote {ns.json}")
    return doc


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--synthetic" in args:  # the scaling bench: adapters of a configurable shape, several N
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_lora_synthetic

        bench_lora_synthetic.main(args)
        return
    bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
