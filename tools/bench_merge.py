#!/usr/bin/env python
"""Benchmark ``unipack.merge``: speed, bundle size and peak memory as the member count N grows.

What it measures
----------------
For each N in ``--members`` (default 8,16,32,64) it merges the first N members of one synthetic
population into a bundle, each merge in a FRESH CHILD PROCESS (``python tools/bench_merge.py
--child merge ...``), so that the child's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is that
merge's alone and not the parent's, which built the population. A child that only imports
numpy, torch and unipack and then exits gives the baseline RSS. The table shows, per N:

* input MB (sum of the members' file sizes), bundle MB, ratio, worst member error,
* seconds (``MergeResult.seconds``) and throughput (input MB / s),
* peak RSS of the child (``ru_maxrss``) and of ``MergeResult.peak_rss_bytes``, and the peak
  minus the baseline, i.e. what the merge itself added,
* coefficient bytes: as stored (``Bundle.summary().parts["coefficients"]``, after zstd) and
  decoded (what the merger holds in memory until the bundle is written),
* the tensor during which the RSS peak rose most: each merge child passes a ``progress=``
  tracer to ``unipack.merge`` that times every tensor and reads ``VmHWM`` after it (the
  per-tensor seconds and peak steps go to the ``--json`` file under ``trace``).

Measurement notes: on Linux a child's ``ru_maxrss`` starts at the RSS its parent had when it
forked (the kernel carries it over exec), so this parent stays small: the population is built
in a child too, and each child also reports its own ``VmHWM`` as a cross-check. The share of
the machine's CPU time that other processes used during each merge is recorded
(``others_cpu_share``), because timings on a shared 2-core machine are noisy; multi-threaded
OpenBLAS on a busy machine can make ``eigh`` 10-100x slower (``--threads 1`` avoids that).

The merger is designed to hold only one member's tensor (plus per-tensor statistics) at a
time and to keep only the per-member coefficients until the end, so "peak RSS minus
baseline" should grow with N by about the decoded coefficient bytes and no more. The summary
line under the table compares the two slopes (MB per extra member).

The synthetic population (all float32, deterministic for a seed)
----------------------------------------------------------------
A transformer-like model, ~20M parameters at the default ``--params 20``: token embedding
``embed.weight`` (4h x h), ``layers`` blocks each with ``attn.{q,k,v,o}`` (h x h) + biases,
``ln1``/``ln2`` weight+bias, ``mlp.fc1`` (4h x h) + bias, ``mlp.fc2`` (h x 4h) + bias,
``final_ln``, and a ``classifier`` (C_i x h) + bias whose class count C_i differs per member
(so those tensors are stored raw: the merge passes ``raw_mismatched=True``). h = 512 and 6 layers
give 19.9M parameters; ``--params P`` scales h by sqrt(P/20) (a multiple of 64).

The base W0: Gaussian weights with std 1/sqrt(fan_in) (embedding std 0.02), layernorm weights
near 1, small biases. Member i is ``W_i = W0 + D_i`` with, per tensor (each part scaled to an
exact fraction of ||W0||_F, so the deltas total ~3% of the weight norm):

* shared part, 3.0%: ``U (c + S_i) V^T`` with U (m x s), V (n x s) fixed orthonormal directions
  of this tensor (s = 8), c a drift common to every member and S_i a member-specific s x s
  mixing, both with a decaying per-direction scale (all members move in the same small
  subspace, by different amounts);
* member-specific low-rank part, 0.6%: ``P_i Q_i^T`` of rank 4 with P_i, Q_i private to the
  member (a LoRA-like task adaptation that no other member shares);
* dense noise, 0.2%: i.i.d. Gaussian (optimizer noise).

1-D tensors (biases, layernorms) get the shared part as ``U (c + s_i)`` (U: m x s) plus the
noise. With the default ``max_error=0.01`` the private parts (0.63% together) fit inside the
error budget, so a good decomposition needs a rank of about s per tensor, independent of N.

Files live in ``--workdir`` (default ``./bench-work``) under ``pop-<fingerprint>/`` (members)
and ``bundles/``; existing members with the same fingerprint are reused. The work dir gets a
``.gitignore`` of ``*`` so that it never shows up in ``git status``.

How to run
----------
    python tools/bench_merge.py                                   # N = 8,16,32,64, default rule
    python tools/bench_merge.py --members 8,16 --rule rank=16 --json bench.json
    python tools/bench_merge.py --params 5 --rule max_error=0.02 --rule dtype=float16
    python tools/bench_merge.py --members 16 --profile           # cProfile each child, print top
    python tools/bench_merge.py --threads 1                      # single-threaded BLAS in children
    python tools/bench_merge.py --members 8 --local-cluster 2    # in-process vs a Dask LocalCluster

``--local-cluster W`` (needs ``pip install 'unipack[dask]'``) starts a Dask ``LocalCluster`` of
W single-threaded worker processes in this process and merges every N twice, in the merge child
(``jobs=1``) and on the cluster (``executor="dask"``), on the same files; it prints the time
ratio and whether the two bundles are byte-identical. The workers import unipack before the
timing starts (a cluster is long-lived: its start-up is not the merge's); their first job still
opens the inputs. ``worker peak MB`` is then the largest Dask worker's peak RSS so far, and a
cluster row's ``others_cpu_share`` counts its workers (children of this process, not of the merge).

The population needs about N_max x 80 MB of disk at ``--params 20`` (5.1 GB for N = 64); building
it takes about 2 minutes the first time. The default run then takes about 5.5 minutes on 2 idle
cores (N = 64 alone about 2.5 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the generative model changes, so stale populations are not reused.
GENERATOR_VERSION = 1
MB = 1e6


# --------------------------------------------------------------------------------------------
# The synthetic population
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopulationSpec:
    """Architecture and delta model of the synthetic fine-tunes."""

    hidden: int = 512
    layers: int = 6
    seed: int = 0
    shared_dims: int = 8  # s: shared directions per tensor
    shared_frac: float = 0.03  # ||shared part|| / ||W0||
    private_rank: int = 4  # rank of the member-specific part
    private_frac: float = 0.006
    noise_frac: float = 0.002

    @property
    def mlp(self) -> int:
        return 4 * self.hidden

    @property
    def vocab(self) -> int:
        return 4 * self.hidden

    def fingerprint(self) -> str:
        text = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def spec_for_params(millions: float, seed: int) -> PopulationSpec:
    """Scale the hidden size so the model has about ``millions`` M parameters (20 -> h = 512)."""
    hidden = max(64, int(round(512 * math.sqrt(millions / 20.0) / 64)) * 64)
    return PopulationSpec(hidden=hidden, seed=seed)


def shared_shapes(spec: PopulationSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every tensor that all members share (the classifier is separate)."""
    h, f = spec.hidden, spec.mlp
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        p = f"layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes += [(f"{p}attn.{proj}.weight", (h, h)), (f"{p}attn.{proj}.bias", (h,))]
        shapes += [(f"{p}ln1.weight", (h,)), (f"{p}ln1.bias", (h,))]
        shapes += [(f"{p}mlp.fc1.weight", (f, h)), (f"{p}mlp.fc1.bias", (f,))]
        shapes += [(f"{p}mlp.fc2.weight", (h, f)), (f"{p}mlp.fc2.bias", (h,))]
        shapes += [(f"{p}ln2.weight", (h,)), (f"{p}ln2.bias", (h,))]
    shapes += [("final_ln.weight", (h,)), ("final_ln.bias", (h,))]
    return shapes


def n_classes(member: int) -> int:
    """Member ``member``'s classifier width: differs between members (2..20)."""
    return 2 + (member * 7) % 19


def n_params(spec: PopulationSpec, member: int = 0) -> int:
    body = sum(math.prod(s) for _, s in shared_shapes(spec))
    return body + n_classes(member) * (spec.hidden + 1)


def _rng(spec: PopulationSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, GENERATOR_VERSION, *key])


def base_tensor(spec: PopulationSpec, index: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """W0 for tensor number ``index``."""
    rng = _rng(spec, 0, index)
    if len(shape) == 2:
        std = 0.02 if name.startswith("embed") else 1.0 / math.sqrt(shape[1])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if name.split(".")[-2].startswith("ln") and name.endswith("weight"):
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)


@dataclass
class SharedDirections:
    """Per-tensor fixed directions and the drift every member shares."""

    u: np.ndarray  # m x s, orthonormal columns
    v: np.ndarray | None  # n x s (None for 1-D tensors)
    common: np.ndarray  # s x s (or s) drift shared by all members
    decay: np.ndarray  # s, per-direction scale
    norm: float  # ||W0||_F


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def shared_directions(spec: PopulationSpec, index: int, w0: np.ndarray) -> SharedDirections:
    rng = _rng(spec, 1, index)
    s = min(spec.shared_dims, *w0.shape)
    u = _orthonormal(rng, w0.shape[0], s)
    v = _orthonormal(rng, w0.shape[1], s) if w0.ndim == 2 else None
    common = rng.standard_normal((s, s) if w0.ndim == 2 else (s,))
    decay = 1.0 / (1.0 + np.arange(s))
    return SharedDirections(u, v, common, decay, float(np.linalg.norm(w0.ravel())))


def _scaled(mat: np.ndarray, norm: float, target: float) -> np.ndarray:
    return mat * (target / norm) if norm > 0 else mat


def member_delta(
    spec: PopulationSpec, member: int, index: int, dirs: SharedDirections, shape: tuple[int, ...]
) -> np.ndarray:
    """D_i for one tensor: shared-subspace part + private low-rank part + dense noise (float64)."""
    rng = _rng(spec, 2, member, index)
    mix = dirs.common + rng.standard_normal(dirs.common.shape)
    mix = mix * dirs.decay[:, None] if mix.ndim == 2 else mix * dirs.decay
    mix = _scaled(mix, float(np.linalg.norm(mix)), spec.shared_frac * dirs.norm)  # U, V orthonormal
    if dirs.v is None:
        delta = dirs.u @ mix
    else:
        delta = (dirs.u @ mix) @ dirs.v.T
        r = min(spec.private_rank, *shape)
        p, q = rng.standard_normal((shape[0], r)), rng.standard_normal((shape[1], r))
        pq_norm = math.sqrt(max(float(np.trace((p.T @ p) @ (q.T @ q))), 0.0))
        delta += _scaled(p, pq_norm, spec.private_frac * dirs.norm) @ q.T
    sigma = spec.noise_frac * dirs.norm / math.sqrt(math.prod(shape))
    delta += sigma * rng.standard_normal(shape)
    return delta


def classifier(spec: PopulationSpec, member: int) -> dict[str, np.ndarray]:
    rng = _rng(spec, 3, member)
    c = n_classes(member)
    w = rng.standard_normal((c, spec.hidden), dtype=np.float32) / np.float32(math.sqrt(spec.hidden))
    return {"classifier.weight": w, "classifier.bias": (0.01 * rng.standard_normal(c)).astype(np.float32)}


def member_path(pop_dir: Path, member: int) -> Path:
    return pop_dir / f"member-{member:03d}.safetensors"


def build_population(spec: PopulationSpec, pop_dir: Path, count: int) -> dict[str, Any]:
    """Write members 0..count-1 that are not there yet; runs in a child (see ``ensure_population``)."""
    from safetensors.numpy import save_file

    pop_dir.mkdir(parents=True, exist_ok=True)
    (pop_dir / "spec.json").write_text(json.dumps({"v": GENERATOR_VERSION, **asdict(spec)}, indent=1))
    missing = [i for i in range(count) if not member_path(pop_dir, i).is_file()]
    started = time.perf_counter()
    shapes = shared_shapes(spec)
    bases = [base_tensor(spec, k, name, shape) for k, (name, shape) in enumerate(shapes)]
    dirs = [shared_directions(spec, k, w0) for k, w0 in enumerate(bases)]
    for i in missing:
        tensors = {
            name: (bases[k] + member_delta(spec, i, k, dirs[k], shape)).astype(np.float32)
            for k, (name, shape) in enumerate(shapes)
        }
        tensors.update(classifier(spec, i))
        path = member_path(pop_dir, i)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"member": str(i), "generator": spec.fingerprint()})
        os.replace(tmp, path)  # a half-written member is never reused
    return {"built": len(missing), "seconds": time.perf_counter() - started}


def ensure_population(spec: PopulationSpec, ns: argparse.Namespace, count: int, console: Any) -> list[Path]:
    """Members 0..count-1 of ``spec``, built in a child process where missing.

    Building in a child keeps this parent small: on Linux a child's ``ru_maxrss`` starts at
    the RSS its parent had when it forked, so a fat parent would inflate the baseline.
    """
    pop_dir = ns.workdir / f"pop-{spec.fingerprint()}"
    paths = [member_path(pop_dir, i) for i in range(count)]
    missing = sum(not p.is_file() for p in paths)
    if not missing:
        console.print(f"[dim]reusing {count} members in {pop_dir}[/dim]")
        return paths
    console.print(f"building {missing} members of {n_params(spec) / 1e6:.1f}M params in {pop_dir} ...")
    done = run_child(
        [
            "--child",
            "build",
            "--params",
            str(ns.params),
            "--seed",
            str(ns.seed),
            "--count",
            str(count),
            "--pop-dir",
            str(pop_dir),
        ],
        None,
        None,
    )
    console.print(f"[dim]built {done['built']} members in {done['seconds']:.1f}s[/dim]")
    return paths


# --------------------------------------------------------------------------------------------
# Child processes: one merge (or nothing, for the baseline) per process
# --------------------------------------------------------------------------------------------


def worker_peak_bytes() -> int:
    """The largest peak RSS of this process's finished children (the merge's worker processes)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def proc_status_bytes(field: str) -> int | None:
    """``VmHWM`` / ``VmRSS`` of this process from /proc (Linux only; None elsewhere).

    Unlike ``ru_maxrss``, ``VmHWM`` belongs to the process's own address space, so it never
    includes a parent's peak carried over through fork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TensorTracer:
    """A ``MergeProgress`` that times each tensor and notes how much it raised the RSS peak."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._name: str | None = None
        self._t0 = 0.0
        self._hwm0 = 0

    def start(self, n_tensors: int, n_members: int) -> None:
        self._hwm0 = proc_status_bytes("VmHWM") or 0
        self._t0 = time.perf_counter()

    def tensor(self, index: int, name: str) -> None:
        # The merge reports a tensor once it is stored: the time since the last report is its own.
        self._name = name
        self.close()
        self._t0 = time.perf_counter()

    def member_read(self) -> None:
        pass

    def lossless(self, done: int, total: int) -> None:
        pass

    def close(self) -> None:
        """Record the tensor just reported (a no-op once it is recorded, as after the merge)."""
        if self._name is None:
            return
        hwm = proc_status_bytes("VmHWM") or 0
        self.rows.append(
            {
                "tensor": self._name,
                "seconds": time.perf_counter() - self._t0,
                "hwm_bytes": hwm,
                "raised_peak_bytes": max(0, hwm - self._hwm0),
            }
        )
        self._hwm0 = max(self._hwm0, hwm)
        self._name = None

    def report(self, top: int = 6) -> dict[str, Any]:
        by_time = sorted(self.rows, key=lambda r: -r["seconds"])
        return {
            "tensor_seconds_total": sum(r["seconds"] for r in self.rows),
            "slowest_tensors": [(r["tensor"], round(r["seconds"], 2)) for r in by_time[:top]],
            "peak_raised_by": [
                (r["tensor"], round(r["raised_peak_bytes"] / MB, 1))
                for r in self.rows
                if r["raised_peak_bytes"] > 1 * MB
            ],
            "seconds_by_kind": seconds_by_kind(self.rows),
        }


def seconds_by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Merge seconds grouped by the tensor's role (``layers.3.mlp.fc1.weight`` -> ``mlp.fc1.weight``)."""
    kinds: dict[str, float] = {}
    for r in rows:
        parts = r["tensor"].split(".")
        kind = ".".join(parts[2:]) if parts[0] == "layers" else r["tensor"]
        kinds[kind] = round(kinds.get(kind, 0.0) + r["seconds"], 2)
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def child_baseline(result_file: Path) -> None:
    """Import what a merge child imports, do nothing, report peak RSS."""
    import torch  # noqa: F401  (the merge child imports it too: same baseline)

    import unipack  # noqa: F401

    result_file.write_text(
        json.dumps({"ru_maxrss_bytes": ru_maxrss_bytes(), "vm_hwm_bytes": proc_status_bytes("VmHWM")})
    )


def child_merge(inputs: list[str], out: Path, options: dict[str, Any], result_file: Path) -> None:
    """Run one merge and write its numbers to ``result_file`` (JSON)."""
    import torch  # noqa: F401

    import unipack

    tracer = TensorTracer()
    started = time.perf_counter()
    result = unipack.merge(inputs, out, force=True, progress=tracer, **options)
    wall = time.perf_counter() - started
    tracer.close()  # the last tensor; what follows in merge (manifest, writing) is not attributed
    peak_after_merge = ru_maxrss_bytes()  # before opening the bundle, which allocates a little
    hwm_after_merge = proc_status_bytes("VmHWM")
    with unipack.open(out) as bundle:
        summary = bundle.summary()
        manifest = bundle.manifest
        coef_decoded = sum(manifest.blobs[m.coefficients].nbytes for m in manifest.members if m.coefficients)
    result_file.write_text(
        json.dumps(
            {
                "n": len(inputs),
                "input_bytes": result.input_bytes,
                "file_bytes": result.file_bytes,
                "ratio": result.ratio,
                "worst_error": result.worst_error,
                "seconds": result.seconds,
                "wall_seconds": wall,
                "ru_maxrss_bytes": peak_after_merge,
                "merge_peak_rss_bytes": result.peak_rss_bytes,
                # merge --jobs: the largest worker process's peak (0: the merge ran in-process)
                "worker_peak_rss_bytes": worker_peak_bytes(),
                "vm_hwm_bytes": hwm_after_merge,
                "parts": summary.parts,
                "coef_decoded_bytes": coef_decoded,
                "storage_counts": summary.storage_counts,
                "rank_min": summary.rank_min,
                "rank_median": summary.rank_median,
                "rank_max": summary.rank_max,
                "options": summary.options,
                "trace": tracer.report(),
            }
        )
    )


def child_env(threads: int | None) -> dict[str, str]:
    """The child's environment; ``threads`` caps BLAS/OpenMP threads (None: inherit as is)."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    return env


def cpu_seconds() -> tuple[float | None, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of our finished children)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    return busy, kids.ru_utime + kids.ru_stime


def run_child(args: list[str], profile_to: Path | None, threads: int | None) -> dict[str, Any]:
    """Run this script with ``--child ...`` in a fresh interpreter; return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        prefix = [sys.executable]
        if profile_to is not None:
            prefix += ["-m", "cProfile", "-o", str(profile_to)]
        cmd = prefix + [str(Path(__file__).resolve()), *args, "--result-file", str(result_file)]
        subprocess.run(cmd, check=True, env=child_env(threads))
        return json.loads(result_file.read_text())


# --------------------------------------------------------------------------------------------
# Options, report
# --------------------------------------------------------------------------------------------


def parse_members(text: str) -> list[int]:
    counts = sorted({int(x) for x in text.split(",") if x.strip()})
    if not counts or counts[0] < 2:
        raise argparse.ArgumentTypeError("--members: comma-separated counts, each >= 2")
    return counts


def parse_value(text: str) -> Any:
    """``16`` -> int, ``0.01`` -> float, ``true``/``false`` -> bool, ``a,b`` -> tuple, else str."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return tuple(p for p in text.split(",") if p) if "," in text else text


def parse_rules(rules: list[str]) -> dict[str, Any]:
    """``["rank=16", "dtype=float16"]`` -> merge keyword options (``raw_mismatched`` on by default)."""
    options: dict[str, Any] = {"raw_mismatched": True}  # the classifier's class count differs
    for rule in rules:
        key, sep, value = rule.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--rule {rule!r}: expected KEY=VALUE, e.g. max_error=0.01 or rank=16")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    if "raw" in options and isinstance(options["raw"], str):
        options["raw"] = (options["raw"],)
    return options


def rule_label(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k != "raw_mismatched"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "library default (max_delta_error=0.4 and max_error=0.05)"


def add_derived(row: dict[str, Any], baseline: int) -> dict[str, Any]:
    row["coef_stored_bytes"] = row["parts"]["coefficients"]
    row["rss_minus_baseline_bytes"] = row["ru_maxrss_bytes"] - baseline
    row["throughput_mb_s"] = row["input_bytes"] / MB / row["seconds"] if row["seconds"] > 0 else 0.0
    return row


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def peak_tensor(row: dict[str, Any]) -> str:
    """The tensor during which the merge's biggest step up of the RSS peak happened."""
    raised = row.get("trace", {}).get("peak_raised_by", [])
    if not raised:
        return "-"
    name, mb = max(raised, key=lambda t: t[1])
    return f"{name} (+{mb:.0f})"


def render(rows: list[dict[str, Any]], baseline: int, label: str, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"unipack.merge — {label}; baseline RSS {baseline / MB:.0f} MB")
    for col in (
        "N",
        "input MB",
        "bundle MB",
        "ratio",
        "worst err",
        "seconds",
        "MB/s",
        "peak RSS MB",
        "merge peak MB",
        "worker peak MB",
        "RSS−base MB",
        "coef MB (stored)",
        "coef MB (decoded)",
        "ranks min/med/max",
        "peak raised most by (MB)",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["n"]),
            f"{r['input_bytes'] / MB:.0f}",
            f"{r['file_bytes'] / MB:.1f}",
            f"{r['ratio']:.1f}",
            f"{r['worst_error']:.4f}",
            f"{r['seconds']:.1f}",
            f"{r['throughput_mb_s']:.1f}",
            f"{r['ru_maxrss_bytes'] / MB:.0f}",
            f"{r['merge_peak_rss_bytes'] / MB:.0f}",
            f"{r.get('worker_peak_rss_bytes', 0) / MB:.0f}",
            f"{r['rss_minus_baseline_bytes'] / MB:.0f}",
            f"{r['coef_stored_bytes'] / MB:.2f}",
            f"{r['coef_decoded_bytes'] / MB:.2f}",
            f"{r['rank_min']}/{r['rank_median']}/{r['rank_max']}",
            peak_tensor(r),
        )
    console.print(table)
    render_notes(rows, console)


def render_notes(rows: list[dict[str, Any]], console: Any) -> None:
    """RSS slope vs coefficient slope, where the largest merge spent its time, measurement caveats."""
    ns = [float(r["n"]) for r in rows]
    if len(set(ns)) >= 2 and len(set(ns)) == len(ns):  # a slope over N (not --local-cluster's pairs)
        rss = slope(ns, [r["rss_minus_baseline_bytes"] / MB for r in rows])
        coef = slope(ns, [r["coef_decoded_bytes"] / MB for r in rows])
        console.print(
            f"peak RSS grows {rss:.2f} MB per extra member; decoded coefficients grow {coef:.2f} MB "
            f"per extra member (excess {rss - coef:+.2f} MB/member)"
        )
    last = rows[-1]
    kinds = last.get("trace", {}).get("seconds_by_kind", {})
    total = sum(kinds.values()) or 1.0
    shown = ", ".join(f"{k} {v / total:.0%}" for k, v in list(kinds.items())[:5])
    console.print(f"N={last['n']}: time by tensor kind: {shown}")
    for r in rows:
        hwm = r.get("vm_hwm_bytes")
        if hwm and abs(r["ru_maxrss_bytes"] - hwm) > 0.02 * hwm:
            console.print(
                f"[yellow]N={r['n']}: ru_maxrss {r['ru_maxrss_bytes'] / MB:.0f} MB differs from the "
                f"process's own VmHWM {hwm / MB:.0f} MB (a parent's peak inherited via exec?)[/yellow]"
            )
    busy = [f"N={r['n']}: {r['others_cpu_share']:.0%}" for r in rows if r.get("others_cpu_share", 0.0) > 0.1]
    if busy:
        console.print(
            f"[yellow]other processes used part of the machine's CPU time during the merges "
            f"({', '.join(busy)}): timings are noisy[/yellow]"
        )


def print_profile(path: Path, console: Any, top: int = 25) -> None:
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("cumulative").print_stats(top)
    console.print(buf.getvalue(), markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--members",
        type=parse_members,
        default=[8, 16, 32, 64],
        help="comma-separated member counts N (default 8,16,32,64)",
    )
    p.add_argument("--workdir", type=Path, default=Path("bench-work"), help="where members and bundles go")
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="merge option passed to unipack.merge, e.g. max_error=0.01, rank=16, energy=0.9, "
        "dtype=float16 (repeatable; default: the library default)",
    )
    p.add_argument("--params", type=float, default=20.0, help="model size in millions of parameters (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OPENBLAS/OMP/MKL_NUM_THREADS in the merge children (default: inherit). On a "
        "busy machine multi-threaded OpenBLAS can spin and make eigh 10-100x slower: try 1",
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument(
        "--local-cluster",
        type=int,
        metavar="W",
        help="also merge every N on a Dask LocalCluster of W single-threaded worker processes, and "
        "compare with the in-process merge (jobs=1) of the same files",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run each merge child under cProfile (slower) and print its top functions",
    )
    # Internal: what a child process runs.
    p.add_argument("--child", choices=("merge", "baseline", "build"), help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pop-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inputs-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--options-json", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return p


def run_child_mode(ns: argparse.Namespace) -> None:
    if ns.child == "baseline":
        child_baseline(ns.result_file)
        return
    if ns.child == "build":
        done = build_population(spec_for_params(ns.params, ns.seed), ns.pop_dir, ns.count)
        ns.result_file.write_text(json.dumps(done))
        return
    inputs = json.loads(ns.inputs_file.read_text())
    options = json.loads(ns.options_json)
    if "raw" in options:
        options["raw"] = tuple(options["raw"])
    child_merge(inputs, ns.out, options, ns.result_file)


def prepare_workdir(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    ignore = workdir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return workdir


def merge_one(
    n: int,
    paths: list[Path],
    bundles: Path,
    options: dict[str, Any],
    ns: argparse.Namespace,
    baseline: int,
    console: Any,
    tag: str = "",
) -> dict[str, Any]:
    """Merge the first ``n`` members in a fresh child; the child's numbers plus derived columns."""
    inputs_file = bundles / f"inputs-{n}.json"
    inputs_file.write_text(json.dumps([str(p.resolve()) for p in paths[:n]]))
    prof = bundles / f"merge-{n}{tag}.prof" if ns.profile else None
    console.print(f"merging N={n}{' ' + tag if tag else ''} ...")
    busy0, kids0 = cpu_seconds()
    wall0 = time.perf_counter()
    args = [
        "--child",
        "merge",
        "--inputs-file",
        str(inputs_file),
        "--out",
        str(bundles / f"bundle-{n}{tag}.upk"),
        "--options-json",
        json.dumps(options),
    ]
    row = add_derived(run_child(args, prof, ns.threads), baseline)
    row["others_cpu_share"] = others_share(busy0, kids0, time.perf_counter() - wall0)
    console.print(
        f"  N={n}: {row['seconds']:.1f}s, peak RSS {row['ru_maxrss_bytes'] / MB:.0f} MB, ratio {row['ratio']:.1f}"
    )
    if prof is not None:
        print_profile(prof, console)
    return row


def compare_executors(
    ns: argparse.Namespace,
    paths: list[Path],
    bundles: Path,
    options: dict[str, Any],
    baseline: int,
    console: Any,
) -> list[dict[str, Any]]:
    """Every N merged in-process (``jobs=1``) and on a Dask LocalCluster of ``ns.local_cluster``
    single-threaded workers, on the same files; prints the time ratio and whether the bundles are
    the same bytes. The rows carry ``executor`` and, for the cluster, its workers' peak RSS."""
    import distributed

    rows: list[dict[str, Any]] = []
    with (
        distributed.LocalCluster(
            n_workers=ns.local_cluster, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(_import_unipack)  # a cluster outlives a merge: its start-up is not timed
        for n in ns.members:
            serial = merge_one(n, paths, bundles, {**options, "jobs": 1}, ns, baseline, console, "-serial")
            remote_options = {**options, "executor": "dask", "scheduler": cluster.scheduler_address}
            remote = merge_one(n, paths, bundles, remote_options, ns, baseline, console, "-dask")
            remote["worker_peak_rss_bytes"] = max(client.run(ru_maxrss_bytes).values())
            serial["executor"], remote["executor"] = "serial", f"dask LocalCluster({ns.local_cluster})"
            same = (bundles / f"bundle-{n}-serial.upk").read_bytes() == (bundles / f"bundle-{n}-dask.upk").read_bytes()
            serial["same_bytes"] = remote["same_bytes"] = same
            console.print(
                f"  N={n}: in-process {serial['seconds']:.1f}s, Dask LocalCluster of {ns.local_cluster} workers "
                f"{remote['seconds']:.1f}s: {serial['seconds'] / remote['seconds']:.2f}x; "
                f"bundles {'byte-identical' if same else 'DIFFER'}"
            )
            rows += [serial, remote]
    return rows


def _import_unipack() -> None:
    import unipack.pack.dense  # noqa: F401


def unipack_revision() -> dict[str, Any]:
    from unipack.version import revision

    return revision()


def others_share(busy0: float | None, kids0: float, wall: float) -> float:
    """Share of the machine's CPU time that processes other than our child used during ``wall``."""
    busy1, kids1 = cpu_seconds()
    if busy0 is None or busy1 is None or wall <= 0:
        return 0.0
    others = max(0.0, (busy1 - busy0) - (kids1 - kids0))
    return others / (wall * (os.cpu_count() or 1))


def write_json(
    path: Path,
    spec: PopulationSpec,
    options: dict[str, Any],
    baseline: int,
    threads: int | None,
    rows: list[dict[str, Any]],
) -> None:
    path.write_text(
        json.dumps(
            {
                "spec": asdict(spec),
                "params": n_params(spec),
                "options": options,
                "baseline_rss_bytes": baseline,
                "cpu_count": os.cpu_count(),
                "threads": threads,
                "python": sys.version.split()[0],
                "unipack": unipack_revision(),
                "rows": rows,
            },
            indent=1,
            default=list,
        )
    )


def bench(ns: argparse.Namespace) -> list[dict[str, Any]]:
    from rich.console import Console

    console = Console() if Console().is_terminal else Console(width=200)
    spec = spec_for_params(ns.params, ns.seed)
    options = parse_rules(ns.rule)
    workdir = prepare_workdir(ns.workdir)
    console.print(
        f"model: hidden {spec.hidden}, {spec.layers} layers, {n_params(spec) / 1e6:.2f}M params "
        f"({n_params(spec) * 4 / MB:.0f} MB/member); N = {ns.members}; options {options}"
    )
    paths = ensure_population(spec, ns, max(ns.members), console)
    bundles = workdir / "bundles"
    bundles.mkdir(exist_ok=True)
    baseline = run_child(["--child", "baseline"], None, ns.threads)["ru_maxrss_bytes"]
    console.print(f"baseline child (import numpy, torch, unipack): peak RSS {baseline / MB:.0f} MB")
    if ns.local_cluster:
        rows = compare_executors(ns, paths, bundles, options, baseline, console)
    else:
        rows = [merge_one(n, paths, bundles, options, ns, baseline, console) for n in ns.members]
    render(rows, baseline, rule_label(options), console)
    if ns.json:
        write_json(ns.json, spec, options, baseline, ns.threads, rows)
        console.print(f"wrote {ns.json}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    if ns.child:
        run_child_mode(ns)
    else:
        bench(ns)


if __name__ == "__main__":
    main()
