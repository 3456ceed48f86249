#!/usr/bin/env python
"""Benchmark exact extraction (``extract --exact``, issue 14) against what it cannot avoid.

One member of a ``merge --lossless`` bundle is rebuilt with ``load_numpy(member, exact=True)``
(every tensor's sha256 checked) and timed, in the same run and interleaved, against:

* ``safetensors.numpy.load_file`` of the member's original file (the file is in the page cache
  after the first repetition, as the bundle is); it has no bfloat16, so a bf16 file is loaded
  with ``safetensors.torch.load_file``, which maps the file rather than reading it (that ratio
  is not like for like);
* plain ``load_numpy(member)``: the lossy member from the same bundle;
* the floor: every blob exact extraction reads, read with its checksum (the sha256 of its stored
  bytes) and zstd-decoded, plus the sha256 of every output tensor, on one thread; the rest of
  exact extraction is byte unshuffling and the residual arithmetic.

Speeds are MB of the member's tensors per second, best of ``--repeat``; the machine may be
shared, so read the ratios, which come from one run. Exact extraction is timed on one thread and
on the default thread count (one per core, up to 4).

The population is synthetic unless a folder is given: ``--members`` members of about ``--mb``
MB each (a base of normal weights plus small per-member noise, fp32, fp16 or bf16), written once
and cached under ``/tmp/unipack-bench-exact/``, with the merged bundle beside it. A folder holds
``.safetensors`` files or Hugging Face model folders (as ``merge`` takes them), e.g. the MiniLM
population of ``tools/rd_population.py``::

    python tools/bench_exact.py                                    # synthetic, 4 x 50 MB fp32
    python tools/bench_exact.py --dtype bf16
    python tools/bench_exact.py ~/.cache/unipack/rd-minilm/population

Bundles are written in the current layout (large blobs as ``zstd-chunks``, format version 7);
``--one-frame`` writes and reads the layout of versions 5 and 6 (one zstd frame per blob), and
``--compare`` times exact extraction of that layout's bundle too, in the same rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

import unipack
from unipack.bundle.exact import ExactMember
from unipack.format import codec, dtypes

MB = 1e6
CACHE = Path("/tmp/unipack-bench-exact")
NUMPY = {"fp32": np.float32, "fp16": np.float16}


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest, ties to even), as uint16 bit patterns."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def synthetic(members: int, mb: float, dtype: str, seed: int) -> list[Path]:
    """``members`` files of about ``mb`` MB each: one embedding, square matrices, biases."""
    root = CACHE / f"pop-{members}x{mb:g}MB-{dtype}-seed{seed}"
    paths = [root / f"ft{i}.safetensors" for i in range(members)]
    if all(p.is_file() for p in paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    width = 1024
    side = max(1, round(mb * MB / 4 / 3 / width))  # a third of the bytes in the embedding
    layers = max(1, round(mb * MB / 4 * 2 / 3 / width**2))
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (side, width), "norm.weight": (width,)}
    for i in range(layers):
        shapes[f"layer{i}.weight"] = (width, width)
        shapes[f"layer{i}.bias"] = (width,)
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
    for path in paths:
        tensors = {k: v + rng.normal(0, 0.0005, v.shape).astype(np.float32) for k, v in base.items()}
        if dtype == "bf16":  # safetensors.numpy has no bfloat16: through the torch writer
            from safetensors.torch import save_file as save_torch

            cast = {k: torch.from_numpy(bf16_bits(v).view(np.int16)).view(torch.bfloat16) for k, v in tensors.items()}
            save_torch(cast, str(path))
        else:
            save_file({k: v.astype(NUMPY[dtype]) for k, v in tensors.items()}, str(path))
    return paths


def tensor_sha(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as the reference loader reads them (any dtype, bf16 included)."""
    flat = t.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def inputs(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(p for p in folder.iterdir() if (p / "model.safetensors").is_file())


def original_file(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def floor_blobs(bundle: unipack.Bundle, member: str) -> list[str]:
    """The blobs exact extraction of ``member`` reads, in the order it reads them."""
    names: list[str] = []
    file = bundle._file

    def recording(name: str) -> np.ndarray:
        names.append(name)
        return file.read_blob(name)

    args = (bundle.manifest, bundle.member(member), recording, str(bundle.path))
    threaded = "threads" in inspect.signature(ExactMember).parameters  # an older unipack has one thread only
    rebuilt = ExactMember(*args, threads=1) if threaded else ExactMember(*args)
    for _ in rebuilt.arrays():
        pass
    return names


def best_of(repeat: int, runs: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall-clock seconds of each run over ``repeat`` interleaved rounds (load drifts between
    rounds), and the CPU seconds (all threads of this process) of that round: on a shared
    machine, MB per CPU second shows the work done, whatever share of the cores the run got."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            started, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - started, time.process_time() - cpu))
    best = {name: min(t) for name, t in times.items()}
    return {name: b[0] for name, b in best.items()}, {name: b[1] for name, b in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("population", nargs="?", type=Path, help="a folder of inputs (default: synthetic)")
    ap.add_argument("--members", type=int, default=4, help="synthetic: members (default 4)")
    ap.add_argument("--mb", type=float, default=50, help="synthetic: MB per member (default 50)")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="synthetic: dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--member", type=int, default=1, help="index of the member extracted (default 1)")
    ap.add_argument("--rule", choices=("rank0", "default"), default="rank0", help="rank0: --lossless --rank 0")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-frame", action="store_true", help="the one-frame layout of versions 5-6")
    ap.add_argument("--compare", action="store_true", help="also time exact extraction of the one-frame layout")
    args = ap.parse_args()

    if args.population is None:
        paths = synthetic(args.members, args.mb, args.dtype, args.seed)
        bundle_path = paths[0].parent / f"bundle-{args.rule}.upk"
    else:
        paths = inputs(args.population.expanduser())
        CACHE.mkdir(parents=True, exist_ok=True)
        folder = args.population.expanduser().resolve()
        tag = hashlib.sha256(str(folder).encode()).hexdigest()[:8]  # two folders of one name
        bundle_path = CACHE / f"{folder.name}-{tag}-{args.rule}.upk"
    if not paths:
        print(f"{args.population}: no inputs", file=sys.stderr)
        return 1
    one_frame_path = bundle_path  # the name the one-frame layout always had
    if not args.one_frame:
        bundle_path = bundle_path.with_name(f"{bundle_path.stem}-chunked.upk")
    options = {"rank": 0} if args.rule == "rank0" else {}
    for path, chunked in ((bundle_path, not args.one_frame), (one_frame_path, False)):
        if path.is_file() or (path == one_frame_path and not (args.compare or args.one_frame)):
            continue
        print(f"merging {len(paths)} members into {path} ...", file=sys.stderr)
        saved = codec.CHUNK_BYTES
        codec.CHUNK_BYTES = saved if chunked else None
        try:
            unipack.merge(paths, path, exact_tier=True, baselines=False, lossless="off", force=True, **options)
        finally:
            codec.CHUNK_BYTES = saved

    source = original_file(paths[args.member])
    with unipack.open(bundle_path) as b:
        member = b.members[args.member]
        reference = {k: tensor_sha(v) for k, v in load_torch(str(source)).items()}
        got = b.load_numpy(member, exact=True)
        exact = {k: hashlib.sha256(np.ascontiguousarray(a)).hexdigest() for k, (_, a) in got.items()} == reference
        nbytes = sum(a.nbytes for _, a in got.values())
        version = b.manifest.format_version
        blobs = floor_blobs(b, member)
        outputs = [a for _, a in got.values()]
        del got

        def floor() -> None:
            for name in blobs:
                stored = b._file.read_stored(name)  # with its checksum
                rec = b.manifest.blobs[name]
                if rec.codec == "zstd":
                    zstandard.ZstdDecompressor().decompress(stored)
                elif rec.codec == "zstd-chunks":  # every frame, one after the other
                    index = codec.chunk_index(stored, dtypes.itemsize(rec.dtype), rec.nbytes, name)
                    for offset, length, _ in index.frames:
                        zstandard.ZstdDecompressor().decompress(stored[offset : offset + length])
            for a in outputs:
                hashlib.sha256(np.ascontiguousarray(a)).hexdigest()

        # safetensors' numpy loader has no bfloat16: such files are timed with its torch loader
        bf16 = "BF16" in {dtype for dtype, _ in b.load_numpy(member).values()}
        runs: dict[str, Callable[[], object]] = {
            "safetensors (torch)" if bf16 else "safetensors": lambda: (load_torch if bf16 else load_file)(str(source))
        }
        if "threads" in inspect.signature(b.load_numpy).parameters:
            runs["exact, 1 thread"] = lambda: b.load_numpy(member, exact=True, threads=1)
            runs["exact"] = lambda: b.load_numpy(member, exact=True)
        else:  # an older unipack: one thread only
            runs["exact"] = lambda: b.load_numpy(member, exact=True)
        runs["lossy"] = lambda: b.load_numpy(member)
        runs["floor (zstd + sha256), 1 thread"] = floor
        other = unipack.open(one_frame_path) if args.compare and bundle_path != one_frame_path else None
        if other is not None:
            runs["exact, one-frame bundle"] = lambda: other.load_numpy(member, exact=True)
        seconds, cpu_seconds = best_of(args.repeat, runs)
        if other is not None:
            other.close()

    speeds = {name: nbytes / s / MB for name, s in seconds.items()}
    per_cpu = {name: nbytes / max(s, 1e-9) / MB for name, s in cpu_seconds.items()}
    result = {
        "bundle": str(bundle_path),
        "member": member,
        "member_mb": round(nbytes / MB, 1),
        "bit_exact": exact,
        "blobs_read": len(blobs),
        "format_version": version,
        "file_bytes": bundle_path.stat().st_size,
        "mb_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "mb_per_cpu_s": {k: round(v, 1) for k, v in per_cpu.items()},
        "exact_vs": {k: round(speeds["exact"] / v, 3) for k, v in speeds.items() if k != "exact"},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if exact else 1
    print(f"{bundle_path} member {member!r}: {nbytes / MB:.1f} MB, bit exact: {exact}, {len(blobs)} blobs read")
    print(f"format version {version}, {bundle_path.stat().st_size} bytes", end="")
    if one_frame_path.is_file() and one_frame_path != bundle_path:
        print(f" (one-frame layout: {one_frame_path.stat().st_size} bytes)", end="")
    print()
    print(f"{'run':<34}{'MB/s':>9}{'exact / run':>13}{'MB/CPU-s':>10}")
    for name, speed in speeds.items():
        print(f"{name:<34}{speed:>9.1f}{speeds['exact'] / speed:>12.2f}x{per_cpu[name]:>10.1f}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
