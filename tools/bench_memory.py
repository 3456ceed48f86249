#!/usr/bin/env python
"""How much memory a merge holds per element of its largest tensor.

A cluster merge of large models (docs/scale-plan.md) books each worker by this number: a job
holds one tensor's working arrays, so a worker needs about (bytes per element) x (elements of
the largest tensor it is given). This tool measures it on members made of one square tensor
(``--side``, default 4096: 16.8M elements), in float32 and in bfloat16, with default options and
``--jobs 1``:

* ``tracemalloc``: the peak of the arrays numpy allocated during the merge, per element
  (deterministic for given code);
* ``RSS``: the child process's peak resident set (``ru_maxrss``) minus that of a child that
  only imports unipack, per element (what a worker really needs, allocator slack included).

Each merge runs in a fresh child process. The members are made once under ``--workdir`` (from a
fixed seed) and reused. Example (about 6 minutes here)::

    python tools/bench_memory.py --workdir /tmp/bench-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD_MERGE = """
import json, sys, time, tracemalloc
import unipack
from unipack.options import MergeOptions
paths, out = json.loads(sys.argv[1]), sys.argv[2]
tracemalloc.start()
t = time.perf_counter()
result = unipack.merge(paths, out, options=MergeOptions(), force=True, jobs=1)
seconds = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1]
import resource
print(json.dumps({"traced_peak": peak, "seconds": seconds, "bytes": result.file_bytes,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

CHILD_BASELINE = """
import json, resource
import numpy, torch, unipack  # what a merging process has loaded before its first tensor
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_members(directory: Path, dtype: str, side: int, count: int) -> list[Path]:
    """``count`` members of one ``side`` x ``side`` tensor: a shared base plus small noise."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"member-{i}.safetensors" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(side, side, generator=generator) * 0.02
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16}[dtype]
    for path in paths:
        weight = base + torch.randn(side, side, generator=generator) * 5e-4
        save_file({"layer.weight": weight.to(torch_dtype).contiguous()}, str(path))
    return paths


def run_child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-memory"), help="members and bundles go here")
    parser.add_argument("--side", type=int, default=4096, help="the tensor is side x side (default 4096)")
    parser.add_argument("--members", type=int, default=3, help="members per merge (default 3)")
    parser.add_argument("--dtypes", default="F32,BF16", help="member dtypes to measure (default F32,BF16)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    ns = parser.parse_args(argv)
    if ns.side < 2 or ns.members < 2:
        parser.error("--side and --members must be at least 2")
    numel = ns.side * ns.side
    baseline_kb = run_child(CHILD_BASELINE)["maxrss_kb"]
    rows = []
    for dtype in ns.dtypes.split(","):
        if dtype not in ("F32", "BF16"):
            parser.error(f"--dtypes: {dtype!r} is not F32 or BF16")
        paths = make_members(ns.workdir / f"{dtype.lower()}-{ns.side}-{ns.members}", dtype, ns.side, ns.members)
        started = time.perf_counter()
        got = run_child(CHILD_MERGE, json.dumps([str(p) for p in paths]), str(ns.workdir / f"{dtype.lower()}.upk"))
        rows.append(
            {
                "dtype": dtype,
                "elements": numel,
                "members": ns.members,
                "traced_bytes_per_element": got["traced_peak"] / numel,
                "rss_bytes_per_element": (got["maxrss_kb"] - baseline_kb) * 1024 / numel,
                "merge_seconds": got["seconds"],
                "wall_seconds": time.perf_counter() - started,
                "bundle_bytes": got["bytes"],
            }
        )
    print(f"one {ns.side} x {ns.side} tensor, {ns.members} members, default merge, --jobs 1")
    print(f"baseline child RSS: {baseline_kb / 1024:.0f} MB (python, numpy, torch, unipack)")
    print("| members' dtype | tracemalloc peak, bytes/element | RSS above baseline, bytes/element | merge s |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['traced_bytes_per_element']:.1f} | {r['rss_bytes_per_element']:.1f} "
            f"| {r['merge_seconds']:.1f} |"
        )
    if ns.json:
        ns.json.write_text(json.dumps({"baseline_rss_kb": baseline_kb, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
