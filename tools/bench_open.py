#!/usr/bin/env python
"""Benchmark opening a bundle and loading one member, against safetensors loading the original.

For a hub that serves members on demand, ``unipack.open(bundle).load(member)`` is the number
that matters: each request opens the bundle (reads and validates the header and manifest) and
rebuilds one member. This script times it in one process against the reference,
``safetensors.torch.load_file`` of that member's original file, measured in the same run (the
machine is noisy: only ratios to a reference taken alongside are comparable between runs).

The population: 31 members of the demo ViT (136k parameters, 72 tensors). The 12 real demo
members (``unipack.demo.population.build_population``, cached under ``~/.cache/unipack/demo``;
trained there first if missing, a few minutes) plus 19 synthesized deterministically from them:
member ``j`` is member ``a`` moved by 0.5 x (member ``b`` - member ``a``) and a small seeded
Gaussian noise, with ``a``'s head (so head sizes vary as in the demo). They are merged once
with default options (the heads, whose shapes differ, are kept raw) and cached in
``--workdir`` (default ``bench-work/open``) with the bundle.

Timed, each ``--repeat`` times (median, with min in the JSON), in this order per round so that
drift hits every row alike:

The table shows the median and the minimum (the least disturbed run) of each row, each also as
a ratio to the reference's median and minimum.

* ``safetensors load_file``: the reference (first member's original);
* ``open``: ``unipack.open(b)`` and close;
* ``open, same bundle in the v4 layout``: the same bundle with its members' numbers inside the
  compressed manifest (format version 4, before version 9's section), blobs copied verbatim;
* ``open + load(first)`` / ``open + load(last)``: a fresh open, then ``load`` of one member;
* ``open + load_numpy(first)``;
* ``load(second), bundle open``: ``load`` of another member on a bundle opened before the timer.

Usage::

    python tools/bench_open.py                       # table
    python tools/bench_open.py --repeat 50 --json open.json
    python tools/bench_open.py --profile             # cProfile of open + load(first), top 30
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

N_MEMBERS = 31


def population(workdir: Path) -> list[Path]:
    """The 31 member files, built once under ``workdir / "members"``."""
    from safetensors.numpy import load_file, save_file

    from unipack.demo.population import build_population, default_cache_dir

    out = workdir / "members"
    paths = [out / f"m{j:02d}.safetensors" for j in range(N_MEMBERS)]
    if all(p.is_file() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    real = build_population(default_cache_dir(), log=lambda m: print(m, file=sys.stderr))
    states = [load_file(str(m.path)) for m in real]
    for j, path in enumerate(paths):
        a = j % len(real)
        state = dict(states[a])
        if j >= len(real):  # synthesized: between two real members, plus seeded noise
            b = (7 * j + 3) % len(real)
            b = b if b != a else (b + 1) % len(real)
            rng = np.random.default_rng(j)
            for name, w in state.items():
                other = states[b][name]
                moved = w + 0.5 * (other - w) if other.shape == w.shape else w.copy()
                noise = rng.standard_normal(w.shape).astype(np.float32) * (0.002 * float(np.std(w)) + 1e-6)
                state[name] = (moved + noise).astype(w.dtype)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp), metadata={"member": f"m{j:02d}"})
        tmp.replace(path)
    return paths


def bundle(workdir: Path, paths: list[Path], rebuild: bool) -> Path:
    import unipack

    out = workdir / "bundle.upk"
    if rebuild or not out.is_file():
        unipack.merge(paths, out, force=True)  # default options (mismatched heads are kept raw by default)
    return out


def version4_copy(path: Path) -> Path:
    """The same bundle in the layout of format version 4 (the members' numbers inside the one
    compressed manifest), the blobs copied verbatim: what version 9's section saves on open."""
    import dataclasses

    from unipack.format.container import BundleFile, BundleWriter
    from unipack.format.manifest import DELTA_FORMAT_VERSION, NUMBERS_BLOB

    out = path.with_name("bundle-v4.upk")
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    with BundleFile(path) as old, BundleWriter.spooled(out, "zstd", 3) as writer:
        for name in old.header.tensors:
            if name in old.manifest.blobs:
                writer.add_stored(name, old.manifest.blobs[name], old.read_stored(name))
        assert NUMBERS_BLOB in old.header.tensors, "the bundle has no numbers section to move back"
        # Version 3 (deltas), raised to 4 by the writer for the compressed manifest.
        manifest = dataclasses.replace(old.manifest, blobs=writer.blobs, format_version=DELTA_FORMAT_VERSION)
        writer.finish(manifest, out, force=True, numbers_apart=False)
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-work/open"))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--profile", action="store_true", help="cProfile open + load(first) instead of timing")
    ap.add_argument("--rebuild", action="store_true", help="merge the bundle again (after a writer change)")
    args = ap.parse_args(argv)

    import safetensors.torch

    import unipack
    from unipack.format.manifest import to_json

    args.workdir.mkdir(parents=True, exist_ok=True)
    gitignore = args.workdir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")
    paths = population(args.workdir)
    path = bundle(args.workdir, paths, args.rebuild)
    with unipack.open(path) as b:
        members = b.members
        header_bytes = len(b.header_bytes())
        manifest_bytes = len(to_json(b.manifest).encode("utf-8"))  # the JSON a reader parses
    first, second, last = members[0], members[1], members[-1]
    original = paths[0]

    if args.profile:
        prof = cProfile.Profile()
        for _ in range(5):
            prof.enable()
            with unipack.open(path) as b:
                b.load(first)
            prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        return 0

    v4 = version4_copy(path)

    def open_only() -> None:
        unipack.open(path).close()

    def open_v4() -> None:
        unipack.open(v4).close()

    def open_load(name: str) -> Callable[[], None]:
        def run() -> None:
            with unipack.open(path) as b:
                b.load(name)

        return run

    def open_numpy() -> None:
        with unipack.open(path) as b:
            b.load_numpy(first)

    held = unipack.open(path)
    rows: dict[str, Callable[[], object]] = {
        "safetensors load_file (reference)": lambda: safetensors.torch.load_file(str(original)),
        "open": open_only,
        "open, same bundle in the v4 layout": open_v4,
        "open + load(first)": open_load(first),
        "open + load(last)": open_load(last),
        "open + load_numpy(first)": open_numpy,
        "load(second), bundle open": lambda: held.load(second),
    }
    for fn in rows.values():  # warm up: imports, page cache, first-call costs
        fn()
    times: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.repeat):
        for label, fn in rows.items():
            times[label].append(timed(fn))
    held.close()

    ref = statistics.median(times["safetensors load_file (reference)"])
    result: dict[str, Any] = {
        "members": len(members),
        "bundle_bytes": path.stat().st_size,
        "header_bytes": header_bytes,
        "manifest_json_bytes": manifest_bytes,
        "original_bytes": original.stat().st_size,
        "repeat": args.repeat,
        "rows": {},
    }
    print(
        f"bundle: {len(members)} members, {path.stat().st_size / 1e3:.0f} KB (header {header_bytes / 1e3:.0f} KB, "
        f"manifest {manifest_bytes / 1e3:.0f} KB of JSON); original {original.stat().st_size / 1e3:.0f} KB; "
        f"{args.repeat} rounds"
    )
    ref_min = min(times["safetensors load_file (reference)"])
    print(f"{'':36s} {'median ms':>10s} {'x ref':>7s} {'min ms':>9s} {'x ref':>7s}")
    for label, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        result["rows"][label] = {"median_ms": med, "min_ms": low, "ratio": med / ref, "ratio_min": low / ref_min}
        print(f"{label:36s} {med:10.2f} {med / ref:7.1f} {low:9.2f} {low / ref_min:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
