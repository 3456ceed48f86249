#!/usr/bin/env python
"""A/B of ``unipack.allocator``: the same merge with glibc's default allocator and with freed
blocks kept for reuse, alternating in one run (the machine is noisy: only runs made side by side
compare).

Each merge runs in a fresh child process, ``UNIPACK_MALLOC=default`` for the first arm and unset
for the second, ``--rounds`` times each, alternating; a round also times ``open`` + ``load_numpy``
of the first member. The bundles must be byte-identical (the setting changes where arrays live,
never a number): the script says so, or exits 1.

Usage::

    python tools/bench_allocator.py ~/.cache/unipack/rd-minilm/population/* \
        --only bert.embeddings.word_embeddings.weight
    python tools/bench_allocator.py /tmp/bm20/pop-*/member-00[0-7].safetensors --jobs 2

``--only NAME``: merge that one tensor of every input (copied once into ``--workdir`` as
safetensors files): the stop-28 figure for MiniLM's embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
import unipack
spec = json.loads(sys.argv[1])
started = time.perf_counter()
unipack.merge(spec["inputs"], spec["out"], force=True, jobs=spec["jobs"])
merged = time.perf_counter() - started
started = time.perf_counter()
with unipack.open(spec["out"]) as bundle:
    bundle.load_numpy(bundle.members[0])
print(json.dumps({"merge": merged, "load": time.perf_counter() - started}))
"""


def one_tensor_inputs(paths: list[str], name: str, workdir: Path) -> list[str]:
    """``name`` of each input, as its own safetensors file under ``workdir`` (made once)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    out = []
    for i, path in enumerate(paths):
        source = Path(path)
        source = source / "model.safetensors" if source.is_dir() else source
        target = workdir / f"only-{i:03d}.safetensors"
        if not target.exists():
            with safe_open(str(source), "np") as f:
                save_file({name: f.get_tensor(name)}, str(target))
        out.append(str(target))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--only", help="merge only this tensor of every input")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work/allocator"))
    ns = parser.parse_args(argv)
    ns.workdir.mkdir(parents=True, exist_ok=True)
    inputs = one_tensor_inputs(ns.inputs, ns.only, ns.workdir) if ns.only else ns.inputs
    arms = {"default allocator": "default", "blocks reused": None}
    times: dict[str, dict[str, list[float]]] = {arm: {"merge": [], "load": []} for arm in arms}
    digests: set[str] = set()
    for _ in range(ns.rounds):
        for arm, value in arms.items():
            env = {k: v for k, v in os.environ.items() if k != "UNIPACK_MALLOC"}
            if value is not None:
                env["UNIPACK_MALLOC"] = value
            out = ns.workdir / f"{value or 'reuse'}.upk"
            spec = {"inputs": inputs, "out": str(out), "jobs": ns.jobs}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for key in ("merge", "load"):
                times[arm][key].append(result[key])
            digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
            print(f"{arm:18s} merge {result['merge']:7.2f} s   open + load {result['load'] * 1e3:6.0f} ms", flush=True)
    for arm, t in times.items():
        print(
            f"{arm:18s} median merge {statistics.median(t['merge']):7.2f} s, "
            f"open + load {statistics.median(t['load']) * 1e3:6.0f} ms"
        )
    if len(digests) != 1:
        print("the bundles differ between the arms", file=sys.stderr)
        return 1
    print("bundles byte-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
