"""Could ComPEFT-style sparse ternary storage (sign x scale on the top-k% magnitudes) pay in a LoRA
bundle? A probe, not part of unipack: for each adapter module of a folder of PEFT adapters it
finds, at each max-error rule, the cheapest sparse ternary encoding of the adapter's balanced
factors that meets the rule (density searched over 60 values from one entry to all, one scale per
row: least squares given the signs and the mask, which is never worse than ComPEFT's one scale per
tensor) and compares its compressed bytes (codes packed as the ``quant`` form packs 3 levels, zstd
as the writer codes them) with the best uniform quantization the chooser already has
(``fit_quantized`` at every level count). It also reports the best error ternary reaches on the
dense product ΔW itself (one scale, as ComPEFT), for a few densities.

    python tools/probe_compeft.py ~/.cache/unipack/rd-minilm/lora --rules 0.1 0.3 0.5 0.7

A ternary encoding of factors with one step per row is exactly a ``quant`` record at 3 levels
(spec §10: codes -1, 0, +1 times the row's step), so no new record form would be needed to store it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from unipack.core import quantize
from unipack.core.lora import LoraFactors
from unipack.core.lora_encode import product_error
from unipack.core.lora_quant import LEVELS, balanced, fit_quantized
from unipack.format import codec, dtypes


def compressed(array: np.ndarray, dtype: str, level: int) -> int:
    stored, _, _ = codec.encode(dtypes.to_bytes(array, dtype), dtypes.itemsize(dtype), "zstd", level)
    return len(stored)


def ternary(f: LoraFactors, max_error: float) -> tuple[int, float, float] | None:
    """(bytes, density, error) of the cheapest sparse ternary factors within ``max_error``."""
    a, b, _ = balanced(f)
    r = f.rank
    values = np.concatenate([a.reshape(-1), b.T.reshape(-1)])  # A' rows, then B'ᵀ rows (spec §10.1 order)
    rows = np.concatenate([np.repeat(np.arange(r), f.in_dim), r + np.repeat(np.arange(r), f.out_dim)])
    order = np.argsort(-np.abs(values), kind="stable")
    best = None
    for k in np.unique(np.geomspace(1, values.size, 60).astype(int)):
        keep = np.zeros(values.size, bool)
        keep[order[:k]] = True
        sums = np.bincount(rows, np.abs(values) * keep, 2 * r)
        counts = np.bincount(rows, keep.astype(np.float64), 2 * r)
        steps = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
        q = np.sign(values) * keep
        v = q * steps[rows].astype(np.float64)
        approx = LoraFactors(v[: r * f.in_dim].reshape(r, f.in_dim), v[r * f.in_dim :].reshape(r, f.out_dim).T, f.scale)
        error = product_error(f, approx)
        if error <= max_error:
            cost = compressed(quantize.pack((q + 1).astype(np.uint8), 3), "U8", 1) + compressed(steps, "F32", 3)
            if best is None or cost < best[0]:
                best = (cost, k / values.size, error)
    return best


def uniform(f: LoraFactors, max_error: float) -> tuple[int, int] | None:
    """(bytes, L) of the chooser's cheapest uniform quantization within ``max_error``."""
    found = []
    for levels in LEVELS:
        q = fit_quantized(f, max_error, levels=levels, step_dtype="F32", member_dtype="F32")
        if q is not None:
            found.append(
                (compressed(quantize.pack(q.codes, levels), "U8", 1) + compressed(q.steps_held, "F32", 3), levels)
            )
    return min(found) if found else None


def dense_ternary_errors(f: LoraFactors, densities: tuple[float, ...]) -> list[float]:
    """ComPEFT on ΔW itself: top-k magnitudes, their signs, one least-squares scale."""
    w = f.update().reshape(-1)
    order = np.argsort(-np.abs(w), kind="stable")
    out = []
    for d in densities:
        kept = order[: max(1, int(d * w.size))]
        approx = np.zeros_like(w)
        approx[kept] = np.sign(w[kept]) * np.abs(w[kept]).mean()
        out.append(float(np.linalg.norm(w - approx) / np.linalg.norm(w)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a folder of PEFT adapter folders")
    p.add_argument("--rules", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ns = p.parse_args()
    modules = []
    for adapter in sorted(ns.folder.iterdir()):
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
        for name in sorted({k.rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k}):
            a, b = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
            modules.append(LoraFactors(a, b, alpha / a.shape[0]))
    densities = (0.01, 0.05, 0.2, 0.5)
    errors = np.array([dense_ternary_errors(f, densities) for f in modules[:8]])
    print(
        f"{len(modules)} modules; ternary ΔW (one scale) best error at densities {densities}: {errors.min(0).round(3)}"
    )
    for rule in ns.rules:
        wins = feasible = 0
        for f in modules:
            t, u = ternary(f, rule), uniform(f, rule)
            feasible += t is not None
            wins += t is not None and (u is None or t[0] < u[0])
        print(
            f"max-error {rule}: sparse ternary meets the rule on {feasible} modules, "
            f"is cheapest on {wins} of {len(modules)}"
        )


if __name__ == "__main__":
    main()
