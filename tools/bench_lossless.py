#!/usr/bin/env python
"""Benchmark the lossless tier (issue 14): unipack ``merge --lossless`` against zstd and ZipNN.

What it measures, on a population of Hugging Face folders (one ``model.safetensors`` each):

* per input file: zstd -3 and zstd -19 of the whole file (zstd -19 on evenly spaced 1 MiB windows
  when ``--zstd19-windows`` is given, scaled to the file: about 3 MB/s otherwise), ZipNN (byte
  grouping + Huffman, ``pip install zipnn``; skipped if it is not installed) of the file;
* XOR against the mean (ZipLLM-style): every member's float tensors XORed with the members' mean
  rounded to their dtype, written like the input file, then ZipNN and zstd -3 of that; the
  ``+ mean`` rows add the mean itself (stored once, ZipNN), which a reader of XOR files needs;
* unipack: ``merge --lossless --rank 0`` (the lossy tier is the mean alone: the smallest lossless
  bundle) and, with ``--tiers``, ``merge --lossless`` under the default rule (a lossy bundle plus
  residuals); every member is then extracted with ``load_numpy(exact=True)`` and compared by
  sha256 with the input file's tensors (the reference safetensors loader reads them);
* speeds: the tier's own compression (``stats.exact_tier.seconds``: residuals and their trials,
  sha256 of every tensor; not the lossy merge) and exact extraction, in MB of inputs per second,
  wall clock and per CPU second of this process (the machine may be shared).

``--bf16`` first makes (and caches) a bf16 copy of every member (round to nearest even) under
``~/.cache/unipack/<population name>-bf16/``, and measures that.

Reproduce the README table::

    python tools/bench_lossless.py ~/.cache/unipack/rd-minilm/population --zstd19-windows 16
    python tools/bench_lossless.py ~/.cache/unipack/rd-minilm/population --bf16 --zstd19-windows 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file

import unipack

MB = 1e6


def members(population: Path, limit: int | None) -> list[Path]:
    found = sorted(p for p in population.iterdir() if (p / "model.safetensors").is_file())
    return found[:limit] if limit else found


def bf16_copy(population: Path, folders: list[Path]) -> list[Path]:
    """Each member cast to bf16 (round to nearest even), cached beside the fp32 population."""
    root = Path.home() / ".cache" / "unipack" / f"{population.parent.name}-bf16"
    out = []
    for folder in folders:
        target = root / folder.name
        if not (target / "model.safetensors").is_file():
            target.mkdir(parents=True, exist_ok=True)
            tensors = load_file(str(folder / "model.safetensors"))
            cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(cast, str(target / "model.safetensors"), metadata={"format": "pt"})
            for extra in folder.iterdir():
                if extra.suffix == ".json":
                    shutil.copy(extra, target / extra.name)
        out.append(target)
    return out


def zstd_size(data: bytes, level: int, windows: int | None = None) -> int:
    if windows is None or len(data) <= windows << 20:
        return len(zstandard.ZstdCompressor(level=level).compress(data))
    stride = (len(data) - (1 << 20)) / (windows - 1)
    sample = sum(
        len(zstandard.ZstdCompressor(level=level).compress(data[int(k * stride) : int(k * stride) + (1 << 20)]))
        for k in range(windows)
    )
    return round(sample * len(data) / (windows << 20))


def zipnn_size(data: bytes, dtype: str) -> tuple[int, float] | None:
    """ZipNN's compressed size of a safetensors file's bytes, and its seconds; None if absent."""
    try:
        import zipnn
    except ImportError:
        return None
    coder = zipnn.ZipNN(bytearray_dtype={"F32": "float32", "BF16": "bfloat16"}[dtype], input_format="byte")
    started = time.perf_counter()
    size = len(coder.compress(data))
    return size, time.perf_counter() - started


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def xor_files(paths: list[Path], workdir: Path) -> tuple[list[Path], Path]:
    """Each member's float tensors XOR the members' mean (rounded to their dtype); the mean file."""
    loaded = [load_file(str(p)) for p in paths]
    common = [k for k in loaded[0] if all(k in m and m[k].shape == loaded[0][k].shape for m in loaded)]
    mean = {
        k: (sum(m[k].double() for m in loaded) / len(loaded)).to(loaded[0][k].dtype)
        for k in common
        if loaded[0][k].is_floating_point()
    }
    out = []
    for i, m in enumerate(loaded):
        xored = {k: (as_bits(v) ^ as_bits(mean[k])).view(v.dtype) if k in mean else v for k, v in m.items()}
        path = workdir / f"xor{i}.safetensors"
        save_file(xored, str(path))
        out.append(path)
    mean_path = workdir / "mean.safetensors"
    save_file(mean, str(mean_path))
    return out, mean_path


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes, as the reference loader reads the file."""
    tensors = load_file(str(path))
    return {k: hashlib.sha256(v.reshape(-1).view(torch.uint8).numpy()).hexdigest() for k, v in tensors.items()}


def unipack_lossless(paths: list[Path], out: Path, **options: object) -> dict[str, object]:
    cpu = time.process_time()
    folders = [p.parent for p in paths]  # Hugging Face folders: members named after them
    # The tier runs inside each tensor's job (on the workers): its time is part of the merge's.
    result = unipack.merge(folders, out, exact_tier=True, baselines=False, lossless="off", force=True, **options)
    merge_cpu = time.process_time() - cpu
    tier = result.manifest.stats["exact_tier"]
    input_bytes = result.input_bytes
    wanted = [tensor_digests(path) for path in paths]
    extract_s = extract_cpu = 0.0
    exact = True
    with unipack.open(out) as b:
        lossy_bytes = b.summary().file_bytes - b.summary().parts["residuals"]
        for name, digests in zip(b.members, wanted):
            started, cpu = time.perf_counter(), time.process_time()
            # What `extract --exact` does before writing: rebuild, and check each tensor's sha256.
            got = b.load_numpy(name, exact=True)
            extract_s += time.perf_counter() - started
            extract_cpu += time.process_time() - cpu
            exact &= {k: hashlib.sha256(np.ascontiguousarray(a)).hexdigest() for k, (_, a) in got.items()} == digests
    return {
        "bytes": result.file_bytes,
        "lossy_bytes": lossy_bytes,
        "residual_bytes": tier["residual_bytes"],
        "bit_exact": exact,
        "merge_s": round(result.seconds, 1),
        "merge_cpu_s": round(merge_cpu, 1),
        "extract_MBps": round(input_bytes / MB / extract_s, 1),
        "extract_cpu_MBps": round(input_bytes / MB / extract_cpu, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("population", type=Path)
    ap.add_argument("--members", type=int, help="only the first N members (default all)")
    ap.add_argument("--bf16", action="store_true", help="measure a bf16 copy of the population")
    ap.add_argument("--zstd19-windows", type=int, help="zstd -19 on N evenly spaced 1 MiB windows per file")
    ap.add_argument("--tiers", action="store_true", help="also the default-rule lossy bundle + residuals")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    folders = members(args.population.expanduser(), args.members)
    if args.bf16:
        folders = bf16_copy(args.population.expanduser(), folders)
    paths = [f / "model.safetensors" for f in folders]
    dtype = "BF16" if args.bf16 else "F32"
    raw = sum(p.stat().st_size for p in paths)
    rows: dict[str, object] = {"inputs": {"members": len(paths), "dtype": dtype, "bytes": raw}}
    z3 = z19 = zn = zn_s = 0.0
    zipnn_ok = True
    for p in paths:
        data = p.read_bytes()
        z3 += zstd_size(data, 3)
        z19 += zstd_size(data, 19, args.zstd19_windows)
        got = zipnn_size(data, dtype)
        zipnn_ok &= got is not None
        if got is not None:
            zn, zn_s = zn + got[0], zn_s + got[1]
    rows["zstd-3"] = {"bytes": int(z3), "ratio": raw / z3}
    rows["zstd-19" + (" (sampled)" if args.zstd19_windows else "")] = {"bytes": int(z19), "ratio": raw / z19}
    if zipnn_ok:
        rows["zipnn"] = {"bytes": int(zn), "ratio": raw / zn, "MBps": raw / MB / zn_s}
    with tempfile.TemporaryDirectory(prefix="bench-lossless-") as tmp:
        work = Path(tmp)
        xors, mean_path = xor_files(paths, work)
        xz3 = sum(zstd_size(x.read_bytes(), 3) for x in xors)
        rows["xor-mean zstd-3"] = {"bytes": int(xz3), "ratio": raw / xz3}
        if zipnn_ok:
            xzn = sum(zipnn_size(x.read_bytes(), dtype)[0] for x in xors)  # type: ignore[index]
            mean_zn = zipnn_size(mean_path.read_bytes(), dtype)[0]  # type: ignore[index]
            rows["xor-mean zipnn"] = {"bytes": int(xzn), "ratio": raw / xzn}
            rows["xor-mean zipnn + mean"] = {"bytes": int(xzn + mean_zn), "ratio": raw / (xzn + mean_zn)}
        for xor in xors:
            xor.unlink()
        lossless = unipack_lossless(paths, work / "rank0.upk", rank=0)
        rows["unipack --lossless --rank 0"] = {**lossless, "ratio": raw / lossless["bytes"]}  # type: ignore[operator]
        if args.tiers:
            tiers = unipack_lossless(paths, work / "tiers.upk")
            rows["unipack --lossless (default rule)"] = {**tiers, "ratio": raw / tiers["bytes"]}  # type: ignore[operator]
    if zipnn_ok:
        best = rows["unipack --lossless --rank 0"]["bytes"]  # type: ignore[index]
        rows["done-means"] = {
            "vs zipnn per file": rows["zipnn"]["bytes"] / best,  # type: ignore[index]
            "vs zipnn on xor-mean files": rows["xor-mean zipnn"]["bytes"] / best,  # type: ignore[index]
            "vs zipnn on xor-mean files + mean": rows["xor-mean zipnn + mean"]["bytes"] / best,  # type: ignore[index]
        }
    if args.json:
        json.dump(rows, sys.stdout, indent=1, default=float)
        print()
        return
    print(f"{len(paths)} members, {dtype}, {raw / MB:.1f} MB of inputs")
    print(f"{'method':38s} {'MB':>9s} {'ratio':>7s}  notes")
    for name, row in rows.items():
        if name in ("inputs", "done-means"):
            continue
        assert isinstance(row, dict)
        notes = {k: v for k, v in row.items() if k not in ("bytes", "ratio")}
        print(f"{name:38s} {row['bytes'] / MB:9.1f} {row['ratio']:6.3f}x  {notes if notes else ''}")
    if "done-means" in rows:
        print("done means (ratio of sizes, >= 1.5 and >= 1.2 asked):", json.dumps(rows["done-means"], default=float))


if __name__ == "__main__":
    main()
