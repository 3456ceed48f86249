#!/usr/bin/env python
"""Speed of unipack against this machine's roofline and the paper's recipe, in one run.

Every row runs on the same input files in the same run, and is shown as a ratio to the roofline
measured alongside (this machine is shared and noisy: only such ratios compare across runs).

Rows
----
* ``roofline``: read every input tensor once (safetensors, float32), and per matrix one Gram on
  its smaller side, summed over members in float32 (``torch``, the process's threads), then a
  full ``eigh``: the least work any subspace merge of these files does.
* ``paper's recipe``: per matrix, all members' rows stacked (N*m x n) and scikit-learn's
  randomized PCA with k = 16 (what users of the paper's code run today); vectors stacked as rows.
* ``unipack merge --rank 16 --no-baselines --lossless-baseline off``: unipack at the paper's k.
* ``unipack merge`` (default options, default ``--jobs``) and ``--jobs 1``.
* ``unipack merge --executor dask`` on a ``LocalCluster`` of ``--jobs`` single-threaded
  workers, where ``dask.distributed`` is installed and unipack has the executor (the cluster's
  start-up is not timed); its bundle must be byte-identical to the default one.
* ``safetensors load_file`` of the first member's original file, with every tensor's data read
  (``load_file`` maps; the sum forces the read), against ``unipack.open`` + ``load`` of that
  member from the default bundle, also read through, and ``open`` alone.

Each row runs in a fresh child process (``--child``), so its peak RSS (``ru_maxrss``, and a
merge's workers' through ``RUSAGE_CHILDREN``) is its own.

Populations
-----------
``--population synthetic`` (default): the 20M-parameter synthetic model of
``tools/bench_merge.py`` (80 MB per member), its first ``--members`` (default 16) members,
built once under ``--workdir``. ``--population PATH...``: safetensors files or Hugging Face
folders (``model.safetensors``), e.g. the MiniLM fine-tunes of ``tools/rd_population.py`` under
``~/.cache/unipack/rd-minilm/population/*``.

Usage::

    python tools/bench_speed.py                                  # synthetic, N = 16
    python tools/bench_speed.py --population ~/.cache/unipack/rd-minilm/population/*
    python tools/bench_speed.py --skip paper --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAPER_K = 16
ROWS = ("roofline", "paper", "rank16", "default", "jobs1", "dask", "load")


def tensor_file(path: Path) -> Path:
    """The safetensors file of an input: the file itself, or a folder's ``model.safetensors``."""
    return path / "model.safetensors" if path.is_dir() else path


def matrix_names(files: list[Path]) -> list[str]:
    """Tensor names present in every input with one shape (the ones a merge decomposes)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] | None = None
    for f in files:
        with safe_open(str(f), "np") as h:
            here = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
        shapes = here if shapes is None else {k: s for k, s in shapes.items() if here.get(k) == s}
    return sorted(shapes or {})


# -- the two references ---------------------------------------------------------------------------


def warm_up(files: list[Path]) -> None:
    """Untimed: every input byte into the page cache, and LAPACK's first call (which loads and
    initialises the library) done, so that no row pays for either."""
    import torch

    for f in files:
        with open(f, "rb") as h:
            while h.read(1 << 24):
                pass
    torch.linalg.eigh(torch.eye(8))


def roofline(files: list[Path]) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    started = time.perf_counter()
    handles = [safe_open(str(f), "pt") for f in files]
    bytes_read = 0
    for name in matrix_names(files):
        gram = None
        for h in handles:
            w = h.get_tensor(name).float()
            bytes_read += w.numel() * 4
            if w.ndim < 2:
                continue
            w = w.reshape(w.shape[0], -1)
            g = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T  # the smaller side
            gram = g if gram is None else gram.add_(g)
        if gram is not None:
            torch.linalg.eigh(gram)
    return {"seconds": time.perf_counter() - started, "bytes": bytes_read}


def paper_recipe(files: list[Path]) -> dict[str, Any]:
    import numpy as np
    from safetensors import safe_open
    from sklearn.decomposition import PCA

    started = time.perf_counter()
    handles = [safe_open(str(f), "np") for f in files]
    for name in matrix_names(files):
        rows = [np.asarray(h.get_tensor(name), dtype=np.float32) for h in handles]
        stacked = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim > 1 else r[None, :] for r in rows])
        k = min(PAPER_K, *stacked.shape)
        if k < 1 or min(stacked.shape) < 2:
            continue
        PCA(n_components=k, svd_solver="randomized", random_state=0).fit(stacked)
    return {"seconds": time.perf_counter() - started}


# -- merges, each in a child process ---------------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One row in this (fresh) process: a reference job or a merge, with this process's peak RSS."""
    if spec.get("job") in ("roofline", "paper"):
        files = [Path(f) for f in spec["files"]]
        warm_up(files)
        row = roofline(files) if spec["job"] == "roofline" else paper_recipe(files)
        return row | {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return child_merge(spec)


def child_merge(spec: dict[str, Any]) -> dict[str, Any]:
    import unipack

    options = dict(spec["options"])
    jobs = options.pop("jobs", None)
    cluster = client = None
    if spec.get("dask"):
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=spec["dask"], threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        options.update(executor="dask", scheduler=cluster.scheduler_address)
    try:
        started = time.perf_counter()
        result = unipack.merge([Path(p) for p in spec["inputs"]], Path(spec["out"]), jobs=jobs, force=True, **options)
        seconds = time.perf_counter() - started
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    with unipack.open(spec["out"]) as b:
        worst = max((max(m.errors, default=0.0) for m in b.manifest.members), default=0.0)
    return {
        "seconds": seconds,
        "bundle_bytes": result.file_bytes,
        "input_bytes": result.input_bytes,
        "worst_error": worst,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", f.name], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def dask_available() -> str | None:
    """None where the dask row can run, else why not."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return "dask.distributed is not installed (pip install 'unipack[dask]')"
    import inspect

    import unipack

    if "executor" not in inspect.signature(unipack.merge).parameters:
        return "this unipack has no --executor"
    return None


# -- open and load -----------------------------------------------------------------------------------


def load_rows(original: Path, bundle: Path, repeat: int) -> dict[str, Any]:
    """Median seconds of: load_file of the original, open, open + load of its member (first)."""
    from safetensors.torch import load_file

    import unipack

    def read_through(tensors: dict[str, Any]) -> None:
        for t in tensors.values():  # touch every page: load_file only maps the file
            if t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()

    def reference() -> None:
        read_through(load_file(str(original)))

    def opened() -> None:
        unipack.open(bundle).close()

    def open_load() -> None:
        with unipack.open(bundle) as b:
            read_through(b.load(b.members[0]))

    times: dict[str, list[float]] = {"load_file": [], "open": [], "open_load": []}
    for _ in range(repeat + 1):  # the first round warms the page cache and is dropped
        for key, fn in (("load_file", reference), ("open", opened), ("open_load", open_load)):
            started = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - started)
    return {k: statistics.median(v[1:]) for k, v in times.items()} | {"member_bytes": original.stat().st_size}


# -- the run ---------------------------------------------------------------------------------------


def population(ns: argparse.Namespace) -> list[Path]:
    if ns.population != ["synthetic"]:
        return [Path(p).expanduser() for p in ns.population]
    sys.path.insert(0, str(HERE))
    import bench_merge
    from rich.console import Console

    spec = bench_merge.spec_for_params(20, seed=0)
    args = argparse.Namespace(workdir=Path(ns.workdir), params=20, seed=0)
    return bench_merge.ensure_population(spec, args, ns.members, Console(stderr=True))[: ns.members]


def bench(ns: argparse.Namespace) -> dict[str, Any]:
    inputs = population(ns)
    files = [tensor_file(p) for p in inputs]
    work = Path(ns.workdir) / "speed"
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"inputs": [str(p) for p in inputs], "rows": {}}
    rows = out["rows"]
    log = print if ns.verbose else (lambda *a, **k: None)
    warm_up(files)
    # Every row in a fresh child: a child's ru_maxrss starts at its parent's RSS on Linux, so the
    # parent stays small (it only reads the files once, into the page cache).
    for key in ("roofline", "paper"):
        if key not in ns.skip:
            rows[key] = run_child({"job": key, "files": [str(f) for f in files]})
            log(key, rows[key])
    merges = {
        "rank16": {"rank": PAPER_K, "baselines": False, "lossless": "off"},
        "default": {},
        "jobs1": {"jobs": 1},
    }
    for key, options in merges.items():
        if key in ns.skip:
            continue
        spec = {"inputs": [str(p) for p in inputs], "out": str(work / f"{key}.upk"), "options": options}
        rows[key] = run_child(spec)
        log(key, rows[key])
    if "dask" not in ns.skip:
        why = dask_available()
        if why is None:
            spec = {"inputs": [str(p) for p in inputs], "out": str(work / "dask.upk"), "options": {}, "dask": ns.jobs}
            rows["dask"] = run_child(spec)
            if "default" in rows and "error" not in rows["dask"]:
                same = (work / "dask.upk").read_bytes() == (work / "default.upk").read_bytes()
                rows["dask"]["identical_to_default"] = same
        else:
            rows["dask"] = {"error": why}
        log("dask", rows["dask"])
    if "load" not in ns.skip and (work / "default.upk").exists():
        rows["load"] = load_rows(files[0], work / "default.upk", ns.repeat)
        log("load", rows["load"])
    return out


def render(out: dict[str, Any]) -> None:
    rows = out["rows"]
    ref = rows.get("roofline", {}).get("seconds")
    labels = {
        "roofline": "roofline: read once + Gram + eigh per matrix",
        "paper": f"paper's recipe: stacked rows, randomized PCA, k = {PAPER_K}",
        "rank16": f"unipack merge --rank {PAPER_K} --no-baselines --lossless-baseline off",
        "default": "unipack merge (defaults)",
        "jobs1": "unipack merge --jobs 1",
        "dask": "unipack merge --executor dask (LocalCluster)",
    }
    print(f"{'job':<68} {'seconds':>8} {'x roofline':>10} {'peak RSS MB':>12} {'bundle MB':>10}")
    for key, label in labels.items():
        row = rows.get(key)
        if row is None:
            continue
        if "error" in row:
            print(f"{label:<68} skipped: {row['error']}")
            continue
        ratio = f"{row['seconds'] / ref:.1f}x" if ref else "-"
        rss = row.get("peak_rss_bytes")
        workers = row.get("worker_peak_rss_bytes") or 0
        rss_text = f"{rss / 1e6:.0f}" + (f" (+{workers / 1e6:.0f})" if workers else "") if rss else "-"
        size = f"{row['bundle_bytes'] / 1e6:.1f}" if "bundle_bytes" in row else "-"
        extra = ""
        if key == "dask" and "identical_to_default" in row:
            extra = "  bytes identical to the default" if row["identical_to_default"] else "  BYTES DIFFER"
        print(f"{label:<68} {row['seconds']:>8.2f} {ratio:>10} {rss_text:>12} {size:>10}{extra}")
    for a, b in (("paper", "rank16"), ("paper", "default"), ("jobs1", "default"), ("dask", "default")):
        if a in rows and b in rows and "seconds" in rows[a] and "seconds" in rows[b]:
            print(f"  {b} is {rows[a]['seconds'] / rows[b]['seconds']:.2f}x as fast as {a}")
    load = rows.get("load")
    if load:
        mb = load["member_bytes"] / 1e6
        print(
            f"load one member ({mb:.1f} MB, median): load_file {load['load_file'] * 1e3:.1f} ms; "
            f"open {load['open'] * 1e3:.1f} ms; open + load {load['open_load'] * 1e3:.1f} ms "
            f"= {load['open_load'] / load['load_file']:.2f}x load_file"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", nargs="+", default=["synthetic"], help="'synthetic' or input paths")
    parser.add_argument("--members", type=int, default=16, help="synthetic population: members (default 16)")
    parser.add_argument("--workdir", default="bench-work", help="where populations and bundles go")
    parser.add_argument("--skip", nargs="*", default=[], choices=ROWS, help="rows to leave out")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="workers of the dask row")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the load rows (median)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--verbose", action="store_true", help="print each row as it finishes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.child:
        print(json.dumps(child(json.loads(Path(ns.child).read_text()))))
        return
    out = bench(ns)
    render(out)
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
