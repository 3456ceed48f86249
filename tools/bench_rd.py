#!/usr/bin/env python
"""Rate–distortion benchmark: bytes vs accuracy drop, unipack against what a user would do instead.

For one population of fine-tunes of one base model and its eval function, every method below
stores all members; each member is read back and scored on its own held-out split:

* unipack at several rules (the default, looser ``--max-error``, ``--max-delta-error``, the
  subspace alone with ``--no-quantize``, and the paper's recipe ``--rank 16 --scheme rows
  --dtype float32 --no-quantize``): bytes are the bundle file's, manifest included;
* the one-line alternatives (``unipack.core.alternatives``): every member cast to fp16; the
  members' mean at their own precision plus each member's delta quantized to int8, int4, int3,
  int2 with one fp16 absmax scale per row; BitDelta-style 1-bit deltas (sign x mean |delta|,
  one scale per tensor, no distillation). Their bytes are densely packed, not entropy coded
  (what a user ships). Tensors whose shape differs between members (heads) are kept raw by
  every method, as unipack keeps them.

Columns: bytes, ratio against the input files, accuracy drop in points (original minus
reconstruction; mean / worst over members), relative weight error over the members' shared
tensors (mean / worst), seconds to store. The verdict compares, at the issue's accuracy bar
(mean drop <= 0.5 and worst drop <= 2 points), unipack's default and its best setting with the
smallest alternative that also meets the bar.

Populations (``--population``):
* ``demo``: the demo's 12 full fine-tunes of a tiny ViT on UCI digits (``unipack demo`` builds
  and caches them; so does this script);
* ``minilm``: full fine-tunes of a real pretrained MiniLM-L6 on real text tasks, built and cached
  by ``tools/rd_population.py`` and scored by ``tools/rd_eval.py``.

Usage: ``python tools/bench_rd.py --population demo --json bench-work/rd-demo.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

import unipack
from unipack.core import alternatives

Evaluate = Callable[[dict[str, torch.Tensor], str], dict[str, float]]
#: the accuracy bar of issue 12: mean drop <= 0.5 and worst drop <= 2 points
BAR = (0.5, 2.0)


@dataclass
class Population:
    name: str
    members: dict[str, Path]  # member name -> a .safetensors file or an HF folder
    evaluate: Evaluate
    metric: str = "accuracy"


@dataclass
class Row:
    method: str
    family: str  # unipack | alternative | original
    bytes: int
    seconds: float = 0.0
    drops: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def mean_drop(self) -> float:
        return float(np.mean(list(self.drops.values())))

    def worst_drop(self) -> float:
        return max(self.drops.values())

    def meets_bar(self) -> bool:
        return self.mean_drop() <= BAR[0] and self.worst_drop() <= BAR[1]


# -- populations -------------------------------------------------------------------------------


def demo_population() -> Population:
    from unipack.demo.evaluate import evaluate
    from unipack.demo.population import build_population, default_cache_dir

    members = build_population(default_cache_dir(), log=lambda s: print(s, file=sys.stderr))
    return Population("demo", {m.name: m.path for m in members}, evaluate)


def _load_tool(name: str) -> Any:
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"unipack_tools_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_population() -> Population:
    population = _load_tool("rd_population")
    evaluator = _load_tool("rd_eval")
    cache = Path(population.build())
    folders = sorted(p for p in (cache / "population").iterdir() if (p / "model.safetensors").is_file())
    return Population("minilm", {p.name: p for p in folders}, evaluator.evaluate)


POPULATIONS = {"demo": demo_population, "minilm": minilm_population}


def weights_file(source: Path) -> Path:
    return source / "model.safetensors" if source.is_dir() else source


def input_bytes(source: Path) -> int:
    """What the member costs as the user holds it: its file, or every file of its folder."""
    if source.is_dir():
        return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    return source.stat().st_size


# -- the alternatives --------------------------------------------------------------------------


def shared_names(originals: Iterator[dict[str, torch.Tensor]]) -> tuple[set[str], dict[str, np.ndarray]]:
    """Float tensors present with one shape in every member, and their float64 means."""
    sums: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    n = 0
    for sd in originals:
        n += 1
        for k, v in sd.items():
            shape = tuple(v.shape)
            if k not in shapes:
                shapes[k] = shape if v.is_floating_point() else None
                if shapes[k] is not None:
                    sums[k] = v.double().numpy().copy()
                continue
            if shapes[k] is None:
                continue
            if shapes[k] != shape:
                shapes[k] = None
                sums.pop(k, None)
                continue
            sums[k] += v.double().numpy()
    return set(sums), {k: s / n for k, s in sums.items()}


def alternative_methods() -> dict[str, tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], Callable]]:
    """name -> (reconstruct(x, mean), bytes(shape, itemsize)) for a shared tensor of one member."""
    methods: dict[str, tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], Callable]] = {
        "fp16 cast (.half())": (
            lambda x, m: x.astype(np.float16).astype(np.float64),
            lambda shape, itemsize: alternatives.cast_bytes(shape, 2),
        ),
    }
    for bits in (8, 4, 3, 2):
        methods[f"mean + int{bits} deltas"] = (
            lambda x, m, b=bits: alternatives.int_delta(x, m, b),
            lambda shape, itemsize, b=bits: alternatives.int_delta_bytes(shape, b),
        )
    methods["mean + 1-bit deltas (BitDelta-style)"] = (
        alternatives.sign_delta,
        lambda shape, itemsize: alternatives.sign_delta_bytes(shape),
    )
    return methods


def run_alternative(
    pop: Population, method: str, shared: set[str], means: dict[str, np.ndarray], baseline_scores: dict[str, float]
) -> Row:
    reconstruct, nbytes = alternative_methods()[method]
    uses_mean = "mean" in method
    started = time.perf_counter()
    total = 0
    if uses_mean:  # the mean once, at the members' precision (fp32 here)
        first = load_file(str(weights_file(next(iter(pop.members.values())))))
        total += sum(first[k].numel() * first[k].element_size() for k in shared)
    row = Row(method, "alternative", 0)
    for name, source in pop.members.items():
        sd = load_file(str(weights_file(source)))
        out, err2, norm2 = {}, 0.0, 0.0
        for k, v in sd.items():
            if k not in shared:
                out[k] = v
                total += v.numel() * v.element_size() if uses_mean else _cast_cost(v)
                continue
            x = v.double().numpy()
            y = reconstruct(x, means[k])
            total += nbytes(tuple(v.shape), v.element_size())
            out[k] = torch.from_numpy(y).to(v.dtype)
            err2 += float(((out[k].double().numpy() - x) ** 2).sum())
            norm2 += float((x**2).sum())
        row.errors[name] = math.sqrt(err2 / norm2)
        row.drops[name] = baseline_scores[name] - pop.evaluate(out, name)[pop.metric]
    row.bytes = total
    row.seconds = time.perf_counter() - started
    return row


def _cast_cost(v: torch.Tensor) -> int:
    """A head under the fp16 cast: cast too (the alternative is "cast everything")."""
    return v.numel() * (2 if v.is_floating_point() else v.element_size())


# -- unipack -----------------------------------------------------------------------------------

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "--max-error 0.02": {"max_error": 0.02},
    "--max-error 0.05": {"max_error": 0.05},
    "--max-delta-error 0.1": {"max_delta_error": 0.1},
    "--max-delta-error 0.2": {"max_delta_error": 0.2},
    "--max-delta-error 0.3": {"max_delta_error": 0.3},
    "--max-delta-error 0.4": {"max_delta_error": 0.4},
    "--max-delta-error 0.5": {"max_delta_error": 0.5},
    "--max-error 0.05 --max-delta-error 0.4": {"max_error": 0.05, "max_delta_error": 0.4},
    "--max-error 0.01 --max-delta-error 0.2": {"max_error": 0.01, "max_delta_error": 0.2},
    "--max-error 0.02 --max-delta-error 0.3": {"max_error": 0.02, "max_delta_error": 0.3},
    "--no-quantize (subspace only)": {"quantize": False},
    "paper: --rank 16 --scheme rows --dtype float32 --no-quantize": {
        "rank": 16,
        "scheme": "rows",
        "dtype": "float32",
        "quantize": False,
    },
}


def run_unipack(pop: Population, setting: str, work: Path, baseline_scores: dict[str, float]) -> Row:
    options = {"baselines": False, "lossless": "off", **SETTINGS[setting]}
    slug = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in setting).strip("_")[:80]
    out = work / f"{pop.name}-{slug}.upk"
    started = time.perf_counter()
    result = unipack.merge(
        list(pop.members.values()), out, names=list(pop.members), force=True, raw_mismatched=True, **options
    )
    row = Row(f"unipack {setting}", "unipack", out.stat().st_size, time.perf_counter() - started)
    with unipack.open(out) as bundle:
        storages: dict[str, int] = {}
        for t in bundle.manifest.tensors:
            storages[t.storage] = storages.get(t.storage, 0) + 1
        row.note = ", ".join(f"{k} {v}" for k, v in sorted(storages.items()))
        for name, source in pop.members.items():
            sd = bundle.load(name)
            orig = load_file(str(weights_file(source)))
            err2 = norm2 = 0.0
            for k, v in orig.items():
                if v.is_floating_point() and k in sd and sd[k].shape == v.shape:
                    err2 += float(((sd[k].double() - v.double()) ** 2).sum())
                    norm2 += float((v.double() ** 2).sum())
            row.errors[name] = math.sqrt(err2 / norm2) if norm2 else 0.0
            row.drops[name] = baseline_scores[name] - pop.evaluate(sd, name)[pop.metric]
    del result
    return row


# -- the table ---------------------------------------------------------------------------------


def table(rows: list[Row], inputs: int) -> str:
    lines = [
        "| method | bytes | ratio vs inputs | drop mean / worst (points) | weight error mean / worst | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        drops = f"{_num(r.mean_drop())} / {_num(r.worst_drop())}" if r.drops else "–"
        errors = f"{np.mean(list(r.errors.values())):.3g} / {max(r.errors.values()):.3g}" if r.errors else "–"
        lines.append(
            f"| {r.method} | {r.bytes / 1e6:.3f} MB | {inputs / r.bytes:.2f}x | {drops} | {errors} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _num(x: float) -> str:
    return "0.00" if abs(x) < 0.005 else f"{x:.2f}"


def verdict(rows: list[Row]) -> list[str]:
    passing = [r for r in rows if r.family == "alternative" and r.meets_bar()]
    best_alt = min(passing, key=lambda r: r.bytes, default=None)
    ours = [r for r in rows if r.family == "unipack" and r.meets_bar()]
    best_ours = min(ours, key=lambda r: r.bytes, default=None)
    default = next(r for r in rows if r.method == "unipack default")
    out = [f"bar: mean drop <= {BAR[0]} and worst drop <= {BAR[1]} points"]
    out.append(
        f"unipack default: {'meets' if default.meets_bar() else 'MISSES'} the bar "
        f"({_num(default.mean_drop())} / {_num(default.worst_drop())})"
    )
    if best_alt is None:
        out.append("no alternative meets the bar")
    else:
        out.append(f"smallest alternative meeting the bar: {best_alt.method}, {best_alt.bytes / 1e6:.3f} MB")
        if default.meets_bar():
            out.append(f"unipack default is {best_alt.bytes / default.bytes:.2f}x smaller than it")
        if best_ours is not None:
            out.append(
                f"smallest unipack setting meeting the bar: {best_ours.method}, "
                f"{best_alt.bytes / best_ours.bytes:.2f}x smaller than it"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", choices=sorted(POPULATIONS), default="demo")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/rd"))
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--settings", help="';'-separated subset of the unipack settings (default: all)")
    parser.add_argument("--no-alternatives", action="store_true", help="unipack rows only")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    pop = POPULATIONS[args.population]()
    args.workdir.mkdir(parents=True, exist_ok=True)
    inputs = sum(input_bytes(p) for p in pop.members.values())
    scores = {name: pop.evaluate(load_file(str(weights_file(p))), name)[pop.metric] for name, p in pop.members.items()}
    print(f"{pop.name}: {len(pop.members)} members, {inputs / 1e6:.2f} MB of inputs", file=sys.stderr)
    rows = [Row("originals", "original", inputs, drops=dict.fromkeys(scores, 0.0), errors=dict.fromkeys(scores, 0.0))]
    settings = list(SETTINGS) if not args.settings else [s.strip() for s in args.settings.split(";")]
    if "default" not in settings:
        settings.insert(0, "default")
    for setting in settings:
        rows.append(run_unipack(pop, setting, args.workdir, scores))
        print(f"  {rows[-1].method}: {rows[-1].bytes / 1e6:.3f} MB, {rows[-1].seconds:.1f} s", file=sys.stderr)
    if not args.no_alternatives:
        shared, means = shared_names(load_file(str(weights_file(p))) for p in pop.members.values())
        for method in alternative_methods():
            rows.append(run_alternative(pop, method, shared, means, scores))
            print(f"  {method}: {rows[-1].bytes / 1e6:.3f} MB", file=sys.stderr)
    print(table(rows, inputs))
    print()
    if not args.no_alternatives:
        print("\n".join(verdict(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "population": pop.name,
            "members": len(pop.members),
            "input_bytes": inputs,
            "scores": scores,
            "unipack_version": unipack.__version__,
            "rows": [r.__dict__ for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
