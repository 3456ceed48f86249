#!/usr/bin/env python
"""How a LoRA merge scales with the number of adapters: seconds and peak memory for several N.

``python tools/bench_lora.py --synthetic`` (or this file directly). Adapters shaped like a 7B
model's by default (``--width`` 4096, ``--layers`` 32 with ``q, k, v, o`` each, ``--rank`` 16),
generated lazily, one at a time, into ``--workdir`` (an adapter already there is kept: a second
run reuses them), then merged in a child process per N (``--counts``, default 100,500; or
``--adapters N``: N/4, N/2 and N), which reports its wall seconds, its CPU seconds (its own and
its workers') and its peak RSS (``ru_maxrss``, its own and its largest worker's).

Each adapter's update is a mix of directions shared by the population (a few per module) and its
own, with factors in fp16 as a 7B adapter is usually saved: a population where the subspace, the
quantized factors and the cast all compete. One adapter of the default shape is 67 MB in fp16:
100 are 6.7 GB of files. A smaller shape (``--width 1024 --layers 4 --counts 8,16,32``) runs in
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED = 4  # directions per module and side shared by the population

CHILD = """
import json, resource, sys, time
import unipack
paths, out, max_error, jobs, quantize = json.loads(sys.argv[1])
wall, cpu = time.perf_counter(), time.process_time()
result = unipack.merge(paths, out, force=True, max_error=max_error, jobs=jobs, quantize=quantize)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
children = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "seconds": wall, "cpu_seconds": cpu + children.ru_utime + children.ru_stime,
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "worker_peak_rss": children.ru_maxrss * 1024, "file_bytes": result.file_bytes,
    "input_bytes": result.input_bytes,
}))
"""


def adapter_folder(workdir: Path, ns: argparse.Namespace) -> Path:
    return workdir / f"synthetic-w{ns.width}-l{ns.layers}-r{ns.rank}-s{ns.seed}"


def write_adapter(folder: Path, index: int, ns: argparse.Namespace) -> None:
    """Adapter ``index``: per module, B = [shared directions | own] · gains, A likewise (fp16)."""
    from safetensors.numpy import save_file

    shared_rng = np.random.default_rng(ns.seed)
    rng = np.random.default_rng((ns.seed, index))
    tensors: dict[str, np.ndarray] = {}
    width, r = ns.width, ns.rank
    for layer in range(ns.layers):
        for module in MODULES:
            # the population's shared directions of this module (the same for every adapter)
            shared_b = shared_rng.standard_normal((width, SHARED)) / np.sqrt(width)
            shared_a = shared_rng.standard_normal((SHARED, width)) / np.sqrt(width)
            b = rng.standard_normal((width, r)) / np.sqrt(width)
            a = rng.standard_normal((r, width)) / np.sqrt(width)
            b[:, :SHARED] += 2.0 * shared_b @ rng.standard_normal((SHARED, SHARED))
            a[:SHARED] += 2.0 * rng.standard_normal((SHARED, SHARED)) @ shared_a
            b *= np.geomspace(1.0, 0.1, r) * 0.02
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = a.astype(np.float16)
            tensors[f"{name}.lora_B.weight"] = b.astype(np.float16)
    target = folder / f"adapter-{index:04d}"
    partial = folder / f".adapter-{index:04d}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(MODULES),
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (partial / "adapter_config.json").write_text(json.dumps(config, indent=1))
    partial.rename(target)  # a run cut short leaves no half-written adapter behind


def ensure_adapters(folder: Path, count: int, ns: argparse.Namespace) -> list[Path]:
    """The first ``count`` adapters, writing those not there yet (one at a time)."""
    paths = []
    for index in range(count):
        path = folder / f"adapter-{index:04d}"
        if not (path / "adapter_config.json").exists():
            print(f"writing {path.name}", file=sys.stderr)
            write_adapter(folder, index, ns)
        paths.append(path)
    return paths


def merge_in_child(paths: list[Path], out: Path, ns: argparse.Namespace) -> dict[str, float]:
    args = json.dumps([[str(p) for p in paths], str(out), ns.max_error, ns.jobs, not ns.no_quantize])
    done = subprocess.run([sys.executable, "-c", CHILD, args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", action="store_true", help="(accepted: what bench_lora.py passes on)")
    p.add_argument("--width", type=int, default=4096, help="modules are width x width (default 4096)")
    p.add_argument("--layers", type=int, default=32, help="layers of q, k, v, o modules (default 32)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--counts", default="100,500", help="comma-separated adapter counts N (default 100,500)")
    p.add_argument("--adapters", type=int, help="N: merge N/4, N/2 and N adapters (instead of --counts)")
    p.add_argument("--max-error", type=float, default=0.1, help="the merge's --max-error (default 0.1)")
    p.add_argument("--jobs", type=int, help="the merge's --jobs (default: automatic)")
    p.add_argument("--no-quantize", action="store_true", help="the merge's --no-quantize (no quantized forms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("bench-work"), help="where adapters and bundles go")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return p


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    if ns.rank < SHARED or ns.width < 2 * ns.rank:
        raise SystemExit(f"--rank must be at least {SHARED} and --width at least twice it")
    n_max = ns.adapters
    counts = [n_max // 4, n_max // 2, n_max] if n_max else [int(n) for n in ns.counts.split(",")]
    counts = sorted({n for n in counts if n >= 2})
    folder = adapter_folder(ns.workdir, ns)
    rows = []
    print(f"{'N':>5} {'seconds':>9} {'s/adapter':>10} {'CPU s':>8} {'peak RSS MB':>12} {'worker MB':>10} {'ratio':>7}")
    for n in counts:
        paths = ensure_adapters(folder, n, ns)
        row = {"adapters": n, **merge_in_child(paths, folder / f"merged-{n}.upk", ns)}
        (folder / f"merged-{n}.upk").unlink()
        rows.append(row)
        print(
            f"{n:>5} {row['seconds']:>9.1f} {row['seconds'] / n:>10.3f} {row['cpu_seconds']:>8.1f} "
            f"{row['peak_rss'] / 2**20:>12.0f} {row['worker_peak_rss'] / 2**20:>10.0f} "
            f"{row['input_bytes'] / row['file_bytes']:>6.2f}x",
            flush=True,
        )
    doc = {
        "shape": {"width": ns.width, "layers": ns.layers, "rank": ns.rank},
        "max_error": ns.max_error,
        "quantize": not ns.no_quantize,
        "rows": rows,
    }
    if ns.json:
        ns.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
