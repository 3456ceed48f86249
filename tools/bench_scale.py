#!/usr/bin/env python
"""Per-tensor merge costs at an 8B model's shapes, and the plan they give for 50 fine-tunes.

A merge's work is per tensor, and each tensor's job is independent (``merge --jobs``), so the
cost of a merge of 50 fine-tunes of an 8B model (800 GB of bf16 inputs) follows from what one
tensor of each shape costs at a few member counts. This script measures that on one decoder
layer shaped like Llama-3-8B's (hidden 4096, 32 query and 8 key/value heads of 128, MLP 14336;
218M parameters, 436 MB per member in bf16), in bf16, with synthetic gentle fine-tunes:
member i is W0 + a shared low-rank drift (rank 8, 2% of ||W0||, mixed per member) + a private
rank-4 part (0.5%) + dense noise (0.3%), W0 Gaussian with std 1/sqrt(fan_in).

For each N of ``--members`` (default 2,4) it merges the first N members with default options
and ``--jobs 1`` in a fresh child process (``tools/bench_merge.py --child merge``), so each
tensor's seconds are one core's, and fits ``seconds = a + b N`` per tensor (least squares over
the N measured). The plan then scales to the whole model: 32 such layers, plus the embedding
and the LM head (128256 x 4096 each), costed per element like the MLP matrices (the same
Gram side, 4096; the work that grows with the element count, quantization and the
alternatives' passes, dominates there), and divided over ``--workers`` cores.

It prints the measured table (per tensor: shape, seconds at each N, the fit), the measured peak
RSS of each merge, and the plan for ``--plan-members`` (default 50) members: core-hours, hours
on ``--workers`` cores, bytes read, and memory per worker (the largest tensor's working set:
N members' float64 copy when the alternatives cache them, else one member at a time).

Usage::

    python tools/bench_scale.py                        # N = 2,4; plan for 50 members
    python tools/bench_scale.py --members 2,4,8 --workers 64 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_merge  # noqa: E402

HIDDEN, KV, MLP, LAYERS, VOCAB = 4096, 1024, 14336, 32, 128256
#: One decoder layer of Llama-3-8B: name -> shape.
LAYER = {
    "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.k_proj.weight": (KV, HIDDEN),
    "model.layers.0.self_attn.v_proj.weight": (KV, HIDDEN),
    "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.gate_proj.weight": (MLP, HIDDEN),
    "model.layers.0.mlp.up_proj.weight": (MLP, HIDDEN),
    "model.layers.0.mlp.down_proj.weight": (HIDDEN, MLP),
    "model.layers.0.input_layernorm.weight": (HIDDEN,),
    "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
}
#: Outside the layers: embedding and LM head, costed per element from the MLP matrices.
OUTSIDE = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN)}


def build_member(index: int, path: Path, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for t, (name, shape) in enumerate(LAYER.items()):
        base_rng = np.random.default_rng([seed, t])
        if len(shape) == 1:
            w0 = 1.0 + 0.02 * base_rng.standard_normal(shape, dtype=np.float32)
            rng = np.random.default_rng([seed, t, index + 1])
            w = w0 + 0.003 * rng.standard_normal(shape, dtype=np.float32)
        else:
            m, n = shape
            w0 = base_rng.standard_normal(shape, dtype=np.float32) / math.sqrt(n)
            norm0 = float(np.linalg.norm(w0))
            u = base_rng.standard_normal((m, 8), dtype=np.float32)
            v = base_rng.standard_normal((8, n), dtype=np.float32)
            rng = np.random.default_rng([seed, t, index + 1])
            mix = np.diag(1.0 + 0.5 * rng.standard_normal(8)).astype(np.float32)
            shared = u @ mix @ v
            private = rng.standard_normal((m, 4), dtype=np.float32) @ rng.standard_normal((4, n), dtype=np.float32)
            noise = rng.standard_normal(shape, dtype=np.float32)
            w = w0
            for part, share in ((shared, 0.02), (private, 0.005), (noise, 0.003)):
                w = w + part * (share * norm0 / float(np.linalg.norm(part)))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def fit_line(ns: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares ``seconds = a + b N``; with one N, a = 0."""
    if len(ns) == 1:
        return 0.0, seconds[0] / ns[0]
    b, a = np.polyfit(np.array(ns, float), np.array(seconds, float), 1)
    return float(a), float(b)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", default="2,4", help="member counts to measure (default 2,4)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/scale"))
    parser.add_argument("--plan-members", type=int, default=50)
    parser.add_argument("--workers", type=int, default=64, help="cores of the plan's cluster (default 64)")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args(argv)
    counts = sorted({int(c) for c in ns.members.split(",")})
    bench_merge.prepare_workdir(ns.workdir)
    paths = [ns.workdir / f"member-{i:03d}.safetensors" for i in range(max(counts))]
    for i, p in enumerate(paths):
        if not p.exists():
            print(f"building member {i} ({p}) ...", flush=True)
            build_member(i, p)
    runs: dict[int, dict[str, Any]] = {}
    for n in counts:
        inputs = ns.workdir / f"inputs-{n}.json"
        inputs.write_text(json.dumps([str(p.resolve()) for p in paths[:n]]))
        print(f"merging N={n} (--jobs 1) ...", flush=True)
        args = ["--child", "merge", "--inputs-file", str(inputs), "--out", str(ns.workdir / f"bundle-{n}.upk")]
        runs[n] = bench_merge.run_child([*args, "--options-json", json.dumps({"jobs": 1})], None, None)
    seconds = {n: dict(r["trace"]["seconds_by_kind"]) for n, r in runs.items()}
    print(f"\n{'tensor':<48} {'shape':>14} " + " ".join(f"{'N=' + str(n):>8}" for n in counts) + "   a + b N")
    fits: dict[str, tuple[float, float]] = {}
    for name, shape in LAYER.items():
        row = [seconds[n].get(name, 0.0) for n in counts]
        fits[name] = fit_line(counts, row)
        a, b = fits[name]
        print(
            f"{name:<48} {'x'.join(map(str, shape)):>14} "
            + " ".join(f"{s:>8.1f}" for s in row)
            + f"   {a:.1f} + {b:.2f} N"
        )
    for n, r in runs.items():
        print(
            f"N={n}: {r['seconds']:.1f} s, input {r['input_bytes'] / 1e9:.2f} GB, "
            f"bundle {r['file_bytes'] / 1e9:.3f} GB ({r['ratio']:.1f}x), "
            f"worst error {r['worst_error']:.4f}, peak RSS {r['ru_maxrss_bytes'] / 1e9:.2f} GB"
        )
    # The plan: one layer's fit x 32, plus the outside tensors per element like the MLP matrices.
    big = "model.layers.0.mlp.gate_proj.weight"
    per_element = tuple(x / math.prod(LAYER[big]) for x in fits[big])
    n_plan = ns.plan_members
    layer_seconds = sum(a + b * n_plan for a, b in fits.values())
    outside_seconds = sum((per_element[0] + per_element[1] * n_plan) * math.prod(s) for s in OUTSIDE.values())
    core_seconds = LAYERS * layer_seconds + outside_seconds
    params = LAYERS * sum(math.prod(s) for s in LAYER.values()) + sum(math.prod(s) for s in OUTSIDE.values())
    largest = max([*LAYER.values(), *OUTSIDE.values()], key=math.prod)
    plan = {
        "members": n_plan,
        "params_per_member": params,
        "input_bytes": 2 * params * n_plan,
        "core_hours": core_seconds / 3600,
        "workers": ns.workers,
        "hours": core_seconds / 3600 / ns.workers,
        "largest_tensor": largest,
        "largest_tensor_member_float64_bytes": 8 * math.prod(largest),
    }
    # Memory: a worker holds one tensor's job; the measured peak scales with the largest
    # tensor's element count (the embedding, 8.9x the MLP matrices).
    peak = max(r["ru_maxrss_bytes"] for r in runs.values())
    plan["worker_bytes"] = peak * math.prod(largest) / math.prod(LAYER[big])
    print(
        f"\nplan, {n_plan} members of an 8B model ({params / 1e9:.2f}B parameters, "
        f"{plan['input_bytes'] / 1e9:.0f} GB of bf16 inputs, each byte read by one worker):\n"
        f"  {plan['core_hours']:.1f} core-hours: {plan['hours']:.2f} h on {ns.workers} workers; no tensor is "
        f"split, so the embedding and the LM head ({outside_seconds / 7200:.2f} h each) bound the wall time "
        f"from below\n"
        f"  memory per worker: about {plan['worker_bytes'] / 1e9:.1f} GB (the measured peak, "
        f"{peak / 1e9:.2f} GB, scaled to the {largest[0]} x {largest[1]} embedding)"
    )
    if ns.json:
        ns.json.write_text(json.dumps({"runs": runs, "fits": fits, "plan": plan}, indent=2))


if __name__ == "__main__":
    main()
