"""SHA-256 of the bundles unipack writes for fixed populations and options: a refactor's witness.

A change that must not alter the format (a reorganisation, a faster code path) is checked by
running this script before and after it and comparing the two outputs::

    python tools/bundle_digests.py --json before.json          # on the old commit
    python tools/bundle_digests.py --check before.json         # on the new one: exit 1 on any difference

Populations: the demo's real fine-tunes (``unipack.demo``, cached under ``$UNIPACK_CACHE`` or
``~/.cache/unipack/demo``), the real PEFT LoRA adapters of ``tools/bench_lora.py`` (cached under
``--workdir``), and small synthetic ones that reach the storages the real ones may miss (F16,
BF16 and mixed dtypes, integer buffers, NaN, identical tensors, heads of different shapes; one
merged against its base with ``--base``, format version 10). Each
is merged under several option sets, and ``unipack add`` joins a held-out member to some bundles.
Only the public API is used, so the script runs unchanged across internal reorganisations.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

#: Option sets for dense populations (each merged once per set).
DENSE_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "max-error-0.05-f16": {"max_error": 0.05, "dtype": "float16"},
    "rank-4-bf16": {"rank": 4, "dtype": "bfloat16"},
    "energy-0.9-rows": {"energy": 0.9, "scheme": "rows"},
    "rank-2-flat-nocodec": {"rank": 2, "scheme": "flat", "codec": "none"},
    "rank-0": {"rank": 0},
}
LORA_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "max-error-0.5": {"max_error": 0.5},
    "rank-4-f16": {"rank": 4, "dtype": "float16"},
    "energy-0.8": {"energy": 0.8},
}
#: Option sets for the synthetic population merged against its base (``--base``, format 10); the
#: base file is added to each by ``digests``.
BASE_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "max-delta-error-0.3": {"max_error": 0.05, "max_delta_error": 0.3},
    "exact-tier": {"exact_tier": True},
}
#: Every merge records its baselines; the lossless baseline is measured whole (deterministic).
COMMON = {"lossless": "full", "raw_mismatched": True}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic_population(
    directory: Path, dtype: str, n: int = 5, seed: int = 0, base_file: Path | None = None
) -> list[Path]:
    """Fine-tune-like members: a shared base, a shared 2-D drift, private noise; every storage kind.
    ``base_file``: also write the base they drift from there (float32), for ``merge --base``."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    base = {
        "enc.0.weight": rng.normal(size=(24, 16)),
        "enc.0.bias": rng.normal(size=16),
        "enc.1.weight": rng.normal(size=(16, 40)),
        "conv.weight": rng.normal(size=(6, 3, 3, 3)),
        "frozen.weight": rng.normal(size=(8, 8)),
    }
    drift = {k: rng.normal(size=(2, *v.shape)) for k, v in base.items()}
    if base_file is not None:
        save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in base.items()}, str(base_file))
    paths = []
    for i in range(n):
        member_dtype = dtype if dtype != "mixed" else ("F32", "F16", "BF16")[i % 3]
        state = {}
        for k, v in base.items():
            if k == "frozen.weight":
                values = v
            else:
                a, b = rng.normal(size=2)
                values = v + 0.05 * (a * drift[k][0] + b * drift[k][1]) + 0.002 * rng.normal(size=v.shape)
            state[k] = torch.from_numpy(values.astype(np.float32)).to(torch_dtype[member_dtype])
        state["head.weight"] = torch.from_numpy(rng.normal(size=(2 + i % 3, 16)).astype(np.float32))
        state["steps"] = torch.tensor([1000 + i], dtype=torch.int64)
        state["ids"] = torch.arange(4, dtype=torch.int32)
        if i == 1:
            state["enc.0.bias"][3] = float("nan")
        path = directory / f"m{i}-{dtype}.safetensors"
        save_file(state, str(path), metadata={"member": str(i)})
        paths.append(path)
    return paths


def load_bench_lora() -> object:
    spec = importlib.util.spec_from_file_location("bench_lora", ROOT / "tools" / "bench_lora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lora"] = module
    spec.loader.exec_module(module)
    return module


def digests(workdir: Path, only: set[str] | None, say: Callable[[str], None]) -> dict[str, str]:
    import unipack

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="digests-") as tmp_text:
        tmp = Path(tmp_text)
        populations: dict[str, tuple[list[Path], dict[str, dict[str, object]]]] = {}
        for dtype in ("F32", "F16", "BF16", "mixed"):
            folder = tmp / f"synthetic-{dtype}"
            folder.mkdir()
            populations[f"synthetic-{dtype}"] = (synthetic_population(folder, dtype), DENSE_OPTIONS)
        folder = tmp / "synthetic-base"
        folder.mkdir()
        base_file = folder / "base.safetensors"
        members = synthetic_population(folder, "F32", seed=1, base_file=base_file)
        populations["synthetic-base"] = (
            members,
            {label: {**options, "base": base_file} for label, options in BASE_OPTIONS.items()},
        )
        if only is None or "demo" in only:
            from unipack.demo import build_population, default_cache_dir

            members = build_population(default_cache_dir(), log=say)
            populations["demo"] = ([m.path for m in members], DENSE_OPTIONS)
        if only is None or "lora" in only:
            from rich.console import Console

            bench = load_bench_lora()
            pop_dir, doc = bench.ensure_population(bench.PopulationSpec(), workdir, Console(stderr=True))  # type: ignore[attr-defined]
            folders = sorted(p.parent for p in pop_dir.rglob("adapter_config.json"))
            populations["lora"] = (folders, LORA_OPTIONS)
        for label, (paths, option_sets) in populations.items():
            if only is not None and not any(label.startswith(o) for o in only):
                continue
            held_out, merged = paths[-1], paths[:-1]
            for opt_label, options in option_sets.items():
                bundle = tmp / f"{label}-{opt_label}.upk"
                unipack.merge(merged, bundle, **{**COMMON, **options})
                out[f"{label}/{opt_label}"] = sha256(bundle)
                say(f"{label}/{opt_label}: {out[f'{label}/{opt_label}'][:16]}")
                if label != "lora" and opt_label in ("default", "rank-4-bf16", "max-error-0.05-f16"):
                    added = tmp / f"{label}-{opt_label}-added.upk"
                    unipack.add(bundle, held_out, name="held-out", output=added, base=options.get("base"))
                    out[f"{label}/{opt_label}/add"] = sha256(added)
                bundle.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the digests to this file")
    p.add_argument("--check", type=Path, help="compare with digests written earlier; exit 1 on a difference")
    p.add_argument("--only", action="append", help="population prefix to run (repeatable): demo, lora, synthetic")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-work", help="cache of the LoRA population")
    ns = p.parse_args(argv)
    ns.workdir.mkdir(parents=True, exist_ok=True)
    result = digests(ns.workdir, set(ns.only) if ns.only else None, lambda s: print(s, file=sys.stderr))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
    if ns.check:
        before = json.loads(ns.check.read_text())
        differ = sorted(k for k in result if k in before and before[k] != result[k])
        missing = sorted(set(before) - set(result))
        for k in differ:
            print(f"DIFFERS {k}: {before[k][:16]} -> {result[k][:16]}", file=sys.stderr)
        print(
            f"{len(result) - len(differ)} of {len(result)} bundles byte-identical"
            + (f"; not run: {', '.join(missing)}" if missing else ""),
            file=sys.stderr,
        )
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
