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
    parser.add_argument("--from-json", type=Path, help="print the table and plan of a saved --json run")
    ns = parser.parse_args(argv)
    counts = sorted({int(c) for c in ns.members.split(",")})
    bench_merge.prepare_workdir(ns.workdir)
    paths = [ns.workdir / f"member-{i:03d}.safetensors" for i in range(max(counts))]
    for i, p in enumerate(paths):
        if not p.exists():
            print(f"building member {i} ({p}) ...", flush=True)
            build_member(i, p)
    runs: dict[int, dict[str, Any]] = {}
    if ns.from_json:  # re-render a saved run
        runs = {int(n): r for n, r in json.loads(ns.from_json.read_text())["runs"].items()}
    for n in [] if ns.from_json else counts:
        inputs = ns.workdir / f"inputs-{n}.json"
        inputs.write_text(json.dumps([str(p.resolve()) for p in paths[:n]]))
        print(f"merging N={n} (--jobs 1) ...", flush=True)
        args = ["--child", "merge", "--inputs-file", str(inputs), "--out", str(ns.workdir / f"bundle-{n}.upk")]
        runs[n] = bench_merge.run_child([*args, "--options-json", json.dumps({"jobs": 1})], None, None)
    layer_params = sum(math.prod(s) for s in LAYER.values())
    for n, r in sorted(runs.items()):
        print(
            f"N={n}: {r['seconds']:.1f} s on one core, {r['seconds'] / (n * layer_params) * 1e6:.2f} us per "
            f"member-parameter; input {r['input_bytes'] / 1e9:.2f} GB, bundle {r['file_bytes'] / 1e9:.3f} GB "
            f"({r['ratio']:.1f}x), worst error {r['worst_error']:.4f}, peak RSS {r['ru_maxrss_bytes'] / 1e9:.2f} GB"
        )
    # The plan: a merge's work is per tensor and, per tensor, grows with members x elements (every
    # pass is over each member's copy; the Grams' N-independent part is small next to it), so it
    # is costed per member-parameter, from the largest N measured (the least start-up per member).
    # Per-tensor seconds are not used: on this shared machine they moved with other jobs' load.
    n_top = max(runs)
    per_member_param = runs[n_top]["seconds"] / (n_top * layer_params)
    n_plan = ns.plan_members
    params = LAYERS * layer_params + sum(math.prod(s) for s in OUTSIDE.values())
    core_seconds = per_member_param * params * n_plan
    largest = max([*LAYER.values(), *OUTSIDE.values()], key=math.prod)
    mlp = LAYER["model.layers.0.mlp.gate_proj.weight"]
    peak = max(r["ru_maxrss_bytes"] for r in runs.values())
    peaks = ", ".join(f"{runs[n]['ru_maxrss_bytes'] / 1e9:.2f}" for n in sorted(runs))
    embed_seconds = per_member_param * math.prod(OUTSIDE["model.embed_tokens.weight"]) * n_plan
    plan = {
        "members": n_plan,
        "params_per_member": params,
        "input_bytes": 2 * params * n_plan,
        "seconds_per_member_param": per_member_param,
        "core_hours": core_seconds / 3600,
        "workers": ns.workers,
        "hours": max(core_seconds / 3600 / ns.workers, embed_seconds / 3600),
        "embedding_hours": embed_seconds / 3600,
        "largest_tensor": largest,
        "worker_bytes": peak * math.prod(largest) / math.prod(mlp),
        "measured_peak_bytes": peak,
    }
    print(
        f"\nplan, {n_plan} members of an 8B model ({params / 1e9:.2f}B parameters, "
        f"{plan['input_bytes'] / 1e9:.0f} GB of bf16 inputs, each byte read by one worker):\n"
        f"  {plan['core_hours']:.0f} core-hours; on {ns.workers} workers {plan['hours']:.1f} h, of which the "
        f"embedding alone (one job, not split) takes {plan['embedding_hours']:.1f} h\n"
        f"  memory per worker: about {plan['worker_bytes'] / 1e9:.0f} GB for the embedding's job (the measured "
        f"peak, {peak / 1e9:.2f} GB with the {mlp[0]} x {mlp[1]} MLP matrices, scaled by element count; "
        f"flat in N: {peaks} GB "
        f"at N = {', '.join(map(str, sorted(runs)))})"
    )
    if ns.json:
        ns.json.write_text(json.dumps({"runs": runs, "plan": plan}, indent=2))


if __name__ == "__main__":
    main()
