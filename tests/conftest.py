"""Shared helpers for the unipack test-suite.

The central helper is :func:`write_population`: it writes N safetensors checkpoints that look
like fine-tunes of one base model (base + structured low-rank deltas + a little noise), with
controllable shapes, dtypes, task-specific heads and integer/bool buffers. Everything else here
reads files back with the *reference* safetensors loader (never with unipack's own reader) and
computes errors independently with numpy in float64.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import save_file

import unipack
from unipack.cli import cli

TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOAT_TORCH = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# synthetic populations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor name varies across members.

    kind:
      ``right``  deltas A_i @ V^T with a shared V (shared row space: a right basis suits it)
      ``left``   deltas U @ B_i with a shared U (shared column space: a left basis suits it)
      ``flat``   deltas sum_k c_ik P_k with shared whole-tensor directions P_k
      ``same``   bit-identical in every member
      ``noise``  independent full-rank deltas (incompressible)
      ``int``    integer/bool buffer that differs per member
      ``int_same`` integer/bool buffer identical in every member
      ``head``   like ``noise`` but shape[0] grows with the member index (task-specific head)
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "right"
    rank: int = 2
    scale: float = 0.1  # size of the structured delta relative to the base's entries
    noise: float = 1e-4  # size of the unstructured noise relative to the base's entries
    decay: float = 1.0  # component k of the delta is weighted decay**k


@dataclass
class Population:
    paths: list[Path]
    names: list[str]
    tensors: list[dict[str, torch.Tensor]]  # exactly what was saved, per member
    metadata: list[dict[str, str] | None]
    specs: dict[str, TensorSpec] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def make_values(specs: dict[str, TensorSpec], n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The tensors of ``n`` members, as torch tensors of each spec's dtype."""
    rng = np.random.default_rng(seed)
    members: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, spec in specs.items():
        dtype = TORCH_DTYPES[spec.dtype]
        if spec.kind in ("int", "int_same"):
            for i in range(n):
                r = rng if spec.kind == "int" else np.random.default_rng(seed + 12345)
                if dtype == torch.bool:
                    arr = r.integers(0, 2, size=spec.shape).astype(bool)
                else:
                    info = torch.iinfo(dtype)
                    lo, hi = max(info.min, -1000), min(info.max, 1000)
                    arr = r.integers(lo, hi, size=spec.shape).astype(np.int64)
                members[i][name] = torch.from_numpy(np.array(arr)).to(dtype)
            continue
        m, cols = _matrix_shape(spec.shape)
        base = rng.standard_normal((m, cols))
        weights = spec.decay ** np.arange(spec.rank)
        v = rng.standard_normal((cols, spec.rank)) / math.sqrt(cols)  # shared row space
        u = rng.standard_normal((m, spec.rank)) / math.sqrt(m)  # shared column space
        p = rng.standard_normal((spec.rank, m, cols))  # shared whole-tensor directions
        for i in range(n):
            shape = spec.shape
            if spec.kind == "same":
                w = base
            elif spec.kind == "right":
                a = rng.standard_normal((m, spec.rank)) * weights
                w = base + spec.scale * math.sqrt(cols) * (a @ v.T) / math.sqrt(spec.rank or 1)
            elif spec.kind == "left":
                b = rng.standard_normal((spec.rank, cols)) * weights[:, None]
                w = base + spec.scale * math.sqrt(m) * (u @ b) / math.sqrt(spec.rank or 1)
            elif spec.kind == "flat":
                c = rng.standard_normal(spec.rank) * weights
                w = base + spec.scale * np.tensordot(c, p, axes=1) / math.sqrt(spec.rank or 1)
            elif spec.kind == "noise":
                w = base + spec.scale * rng.standard_normal((m, cols))
            elif spec.kind == "head":
                shape = (spec.shape[0] + i,) + tuple(spec.shape[1:])
                w = rng.standard_normal((shape[0], cols))
            else:
                raise ValueError(spec.kind)
            if spec.kind not in ("same", "head") and spec.noise:
                w = w + spec.noise * rng.standard_normal(w.shape)
            members[i][name] = torch.from_numpy(np.ascontiguousarray(w.reshape(shape))).to(dtype)
    return members


def write_population(
    directory: Path,
    specs: dict[str, TensorSpec],
    n: int = 4,
    *,
    seed: int = 0,
    prefix: str = "ft",
    metadata: bool | list[dict[str, str] | None] = True,
) -> Population:
    """Write ``n`` checkpoints ``<prefix><i>.safetensors`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    members = make_values(specs, n, seed)
    paths, names, metas = [], [], []
    for i, tensors in enumerate(members):
        name = f"{prefix}{i}"
        if isinstance(metadata, list):
            meta = metadata[i]
        elif metadata:
            meta = {"task": f"task-{i}", "seed": str(seed), "note": "ünïcode ✓"}
        else:
            meta = None
        path = directory / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        paths.append(path)
        names.append(name)
        metas.append(meta)
    return Population(paths, names, members, metas, dict(specs))


def standard_specs() -> dict[str, TensorSpec]:
    """A small model: matrices favouring each side, a conv kernel, biases, buffers."""
    return {
        "embed.weight": TensorSpec((40, 12), kind="right", rank=2),
        "layer0.attn.weight": TensorSpec((12, 48), kind="right", rank=3),
        "layer0.mlp.weight": TensorSpec((48, 12), kind="left", rank=2),
        "layer0.mlp.bias": TensorSpec((48,), kind="flat", rank=2, scale=0.05),
        "conv.weight": TensorSpec((8, 3, 3, 3), kind="flat", rank=2),
        "norm.weight": TensorSpec((12,), kind="same"),
        "position_ids": TensorSpec((1, 16), dtype="int64", kind="int_same"),
        "step": TensorSpec((3,), dtype="int32", kind="int"),
        "mask": TensorSpec((4, 4), dtype="bool", kind="int"),
    }


# --------------------------------------------------------------------------------------------
# reading back and measuring (reference loader + numpy)
# --------------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, list[str]]:
    """Tensors, ``__metadata__`` and tensor names (file order) via the reference loader."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    return tensors, meta, keys


def as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def rel_error(original: torch.Tensor | np.ndarray, approx: torch.Tensor | np.ndarray) -> float:
    """``||W - Ŵ||_F / ||W||_F`` in float64 (spec 4.3: the absolute error when ``||W||_F`` is 0)."""
    w = as64(original) if isinstance(original, torch.Tensor) else np.asarray(original, np.float64)
    a = as64(approx) if isinstance(approx, torch.Tensor) else np.asarray(approx, np.float64)
    assert w.shape == a.shape
    den = float(np.linalg.norm(w.ravel()))
    num = float(np.linalg.norm((w - a).ravel()))
    return num / den if den > 0.0 else num


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (distinguishes -0.0 from 0.0 and compares NaN payloads)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    ua = a.contiguous().reshape(-1).view(torch.uint8)
    ub = b.contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(ua, ub))


def assert_close_errors(measured: float, recorded: float, rel: float = 1e-6, abs_: float = 1e-12) -> None:
    assert abs(measured - recorded) <= rel * max(abs(measured), abs(recorded)) + abs_, (measured, recorded)


def check_against_originals(
    pop: Population, bundle_path: Path, out_dir: Path, *, max_error: float | None
) -> dict[str, dict[str, float]]:
    """Extract every member, compare with the originals; return measured errors.

    Checks: names, shapes, dtypes and ``__metadata__`` preserved; non-float and raw/exact tensors
    bit-exact; every float error equal to the manifest's record (and within ``max_error``).
    """
    measured: dict[str, dict[str, float]] = {}
    with unipack.open(bundle_path) as b:
        manifest = b.manifest
        index = {t.name: j for j, t in enumerate(manifest.tensors)}
        paths = b.extract_all(out_dir)
        assert [p.name for p in paths] == [f"{n}.safetensors" for n in pop.names]
        for i, name in enumerate(pop.names):
            rec = manifest.member(name)
            got, meta, _ = read_safetensors(out_dir / f"{name}.safetensors")
            orig = pop.tensors[i]
            assert meta == pop.metadata[i]
            assert set(got) == set(orig)
            measured[name] = {}
            for tname, w in orig.items():
                g = got[tname]
                assert g.dtype == w.dtype, tname
                assert tuple(g.shape) == tuple(w.shape), tname
                t = manifest.tensors[index[tname]]
                if w.dtype not in FLOAT_TORCH or t.storage in ("raw", "exact"):
                    assert bits_equal(g, w), f"{tname} of {name} is not bit-exact ({t.storage})"
                    assert rec.errors[index[tname]] == 0.0
                    measured[name][tname] = 0.0
                    continue
                err = rel_error(w, g)
                measured[name][tname] = err
                assert_close_errors(err, rec.errors[index[tname]])
                if max_error is not None:
                    assert err <= max_error * (1 + 1e-9), f"{name}/{tname}: error {err} > {max_error}"
    return measured


# --------------------------------------------------------------------------------------------
# raw bundle surgery (for corruption / version tests)
# --------------------------------------------------------------------------------------------


def read_raw_header(path: Path) -> tuple[dict[str, Any], int]:
    """The bundle's JSON header (as a dict, key order kept) and the data section's offset."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def rewrite_header(path: Path, header: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``header`` (padded to 8 bytes as writers do) followed by the original data section."""
    data = path.read_bytes()
    _, start = read_raw_header(path)
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    target = out or path
    target.write_bytes(struct.pack("<Q", len(body)) + body + data[start:])
    return target


def blob_range(path: Path, blob: str) -> tuple[int, int]:
    """Absolute byte range of a blob's stored bytes."""
    header, start = read_raw_header(path)
    b, e = header[blob]["data_offsets"]
    return start + b, start + e


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def listing(directory: Path) -> list[str]:
    """Every entry (hidden ones too) in ``directory``, sorted."""
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def population(tmp_path: Path) -> Population:
    return write_population(tmp_path / "in", standard_specs(), n=4, seed=1)


# --------------------------------------------------------------------------------------------
# independent linear algebra (numpy): what unipack's decompositions should produce
# --------------------------------------------------------------------------------------------


def stored_mean(ws: list[np.ndarray], mean_dtype: torch.dtype) -> np.ndarray:
    """The members' mean (float64, summed in member order) rounded to the stored mean's dtype."""
    total = np.zeros_like(ws[0], dtype=np.float64)
    for w in ws:
        total = total + w
    mean = total / len(ws)
    if mean_dtype == torch.float64:
        return mean
    if mean_dtype == torch.float16:
        return mean.astype(np.float16).astype(np.float64)
    f32 = torch.from_numpy(mean.astype(np.float32))
    return f32.to(mean_dtype).to(torch.float64).numpy()


def oriented(d: np.ndarray, scheme: str, side: str | None) -> np.ndarray:
    """The view whose rows unipack stacks: flat -> 1 x D; rows right -> m x n; rows left -> n x m."""
    if scheme == "flat":
        return d.reshape(1, -1)
    m, n = _matrix_shape(d.shape)
    mat = d.reshape(m, n)
    return mat if side == "right" else mat.T


def centred_stack(ws: list[np.ndarray], mean: np.ndarray, scheme: str, side: str | None) -> np.ndarray:
    return np.vstack([oriented(w - mean, scheme, side) for w in ws])


def spectrum(ws: list[np.ndarray], mean: np.ndarray, scheme: str, side: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (descending) and right singular vectors (columns) of the stack."""
    x = centred_stack(ws, mean, scheme, side)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return s**2, vt.T


def optimal_reconstructions(
    ws: list[np.ndarray], mean: np.ndarray, scheme: str, side: str | None, k: int
) -> list[np.ndarray]:
    """``mean + D_i`` projected on the top-k principal directions (float64, original shapes)."""
    _, vecs = spectrum(ws, mean, scheme, side)
    vk = vecs[:, :k]
    out = []
    for w in ws:
        x = oriented(w - mean, scheme, side)
        proj = x @ vk @ vk.T
        if scheme == "rows" and side == "left":
            proj = proj.T
        out.append(mean + proj.reshape(w.shape))
    return out


def mean_torch_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The stored mean's dtype: the members' own precision (F16+BF16 mixtures widen to F32)."""
    s = set(dtypes)
    if s <= {torch.float16}:
        return torch.float16
    if s <= {torch.bfloat16}:
        return torch.bfloat16
    if torch.float64 in s:
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------
# bad-input scenarios, shared by test_bad_input.py (Python API) and test_cli.py (command line)
# --------------------------------------------------------------------------------------------


@dataclass
class BadCase:
    """A situation a user can create, what unipack must say about it, and what it must not touch."""

    cli_args: list[str] | None  # None: no CLI equivalent
    call: Any  # zero-argument callable doing the same through the Python API
    exc: type  # the UnipackError subclass the API raises
    mentions: list[str]  # substrings the message must contain (file, tensor, hint)
    cli_exit: int = 1
    unchanged: list[Path] = field(default_factory=list)  # files that must keep their bytes
    clean_dir: Path | None = None  # directory whose listing must not change (no temp/spool files)


def small_specs() -> dict[str, TensorSpec]:
    return {
        "a.weight": TensorSpec((8, 12), kind="right", rank=2),
        "a.bias": TensorSpec((8,), kind="flat", rank=1),
        "ids": TensorSpec((4,), dtype="int64", kind="int_same"),
    }


def make_bundle(directory: Path, *, codec: str = "zstd", n: int = 3, seed: int = 0) -> tuple[Population, Path]:
    pop = write_population(directory / "in", small_specs(), n=n, seed=seed)
    out = directory / "bundle.upk"
    unipack.merge(pop.paths, out, codec=codec)
    return pop, out


def _with_bundle(path: Path, fn: Any) -> Any:
    with unipack.open(path) as b:
        return fn(b)


def _merge_case(paths: list[Path], out: Path, exc: type, mentions: list[str], **opts: Any) -> BadCase:
    cli_opts: list[str] = []
    for k, v in opts.items():
        cli_opts += [f"--{k.replace('_', '-')}", str(v)]
    return BadCase(
        cli_args=["merge", *map(str, paths), "-o", str(out), *cli_opts],
        call=lambda: unipack.merge(paths, out, **opts),
        exc=exc,
        mentions=mentions,
        clean_dir=out.parent,
    )


def bad_case(kind: str, tmp: Path) -> BadCase:
    """Build scenario ``kind`` under ``tmp``."""
    from unipack import ChecksumError, FormatError, InputError, MemberNotFoundError, OptionsError, OutputExistsError

    out_dir = tmp / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "x.upk"
    if kind in (
        "corrupt_blob",
        "corrupt_manifest",
        "truncated_bundle",
        "version_99",
        "version_99_both",
        "unknown_member",
        "extract_exists",
        "corrupt_header_json",
        "bundle_as_input",
        "extract_all_into_file",
    ):
        pop, bundle = make_bundle(tmp / "b", codec="none")
    else:
        pop = write_population(tmp / "in", small_specs(), n=3, seed=0)
    paths = list(pop.paths)

    if kind == "random_bytes":
        bad = tmp / "in" / "random.safetensors"
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
        return _merge_case([paths[0], bad], out, FormatError, [str(bad)])
    if kind == "text_file":
        bad = tmp / "in" / "notes.safetensors"
        bad.write_text("These are not the tensors you are looking for.\n" * 20)
        return _merge_case([paths[0], bad, paths[1]], out, FormatError, [str(bad)])
    if kind == "tiny_file":
        bad = tmp / "in" / "tiny.safetensors"
        bad.write_bytes(b"abc")
        return _merge_case([paths[0], bad], out, FormatError, [str(bad)])
    if kind == "truncated_input":
        data = paths[1].read_bytes()
        paths[1].write_bytes(data[: len(data) - 50])
        return _merge_case(paths, out, FormatError, [str(paths[1]), "truncated"])
    if kind == "truncated_input_header":
        data = paths[2].read_bytes()
        paths[2].write_bytes(data[:40])
        return _merge_case(paths, out, FormatError, [str(paths[2]), "truncated"])
    if kind == "missing_input":
        missing = tmp / "in" / "nope.safetensors"
        return _merge_case([paths[0], missing], out, InputError, [str(missing)])
    if kind == "names_differ":
        t = dict(pop.tensors[1])
        t["renamed.bias"] = t.pop("a.bias")
        save_file(t, str(paths[1]))
        return _merge_case(paths, out, InputError, [str(paths[1]), "'a.bias'", "'renamed.bias'"])
    if kind == "shape_differs":
        t = dict(pop.tensors[2])
        t["a.weight"] = torch.zeros(9, 12)
        save_file(t, str(paths[2]))
        # Stored raw per member by default; refused only with --strict-shapes (raw_mismatched=False).
        case = _merge_case(paths, out, InputError, ["'a.weight'", "--strict-shapes", paths[2].name, "[9, 12]"])
        case.call = lambda: unipack.merge(paths, out, raw_mismatched=False)
        case.cli_args = [*case.cli_args, "--strict-shapes"]
        return case
    if kind == "dtype_kind_differs":
        t = dict(pop.tensors[1])
        t["a.bias"] = torch.zeros(8, dtype=torch.int32)
        save_file(t, str(paths[1]))
        return _merge_case(paths, out, InputError, ["'a.bias'", str(paths[1])])
    if kind == "one_member":
        return _merge_case([paths[0]], out, InputError, ["at least 2"])
    if kind == "duplicate_names":
        other = tmp / "other"
        other.mkdir()
        dup = other / paths[0].name
        dup.write_bytes(paths[1].read_bytes())
        return _merge_case([paths[0], dup], out, InputError, ["duplicate", repr(pop.names[0])])
    if kind == "empty_checkpoint":
        empty = tmp / "in" / "empty.safetensors"
        save_file({}, str(empty))
        return _merge_case([paths[0], empty], out, InputError, [str(empty)])
    if kind == "bundle_as_input":
        return _merge_case([paths[0], bundle], out, InputError, [str(bundle), "bundle"])
    if kind == "output_exists":
        out.write_bytes(b"precious")
        case = _merge_case(paths, out, OutputExistsError, [str(out), "--force"])
        case.unchanged = [out]
        return case
    if kind == "output_parent_is_file":  # missing parents are created; a file in their place is refused
        (tmp / "afile").write_bytes(b"not a directory")
        target = tmp / "afile" / "dir" / "x.upk"
        case = _merge_case(paths, target, unipack.UnipackError, ["cannot create directory", str(target.parent)])
        case.clean_dir = None
        return case
    if kind == "rank_and_energy":
        return _merge_case(paths, out, OptionsError, ["--rank", "--energy"], rank=2, energy=0.9)
    if kind == "max_error_and_rank":
        return _merge_case(paths, out, OptionsError, ["--max-error", "--rank"], max_error=0.1, rank=2)
    if kind == "max_error_2":
        return _merge_case(paths, out, OptionsError, ["--max-error", "2"], max_error=2.0)
    if kind == "max_error_negative":
        return _merge_case(paths, out, OptionsError, ["--max-error"], max_error=-0.1)
    if kind == "energy_too_big":
        return _merge_case(paths, out, OptionsError, ["--energy"], energy=1.5)
    if kind == "rank_negative":
        return _merge_case(paths, out, OptionsError, ["--rank"], rank=-1)
    if kind == "zstd_level_0":
        return _merge_case(paths, out, OptionsError, ["--zstd-level"], zstd_level=0)
    if kind == "gram_limit_0":
        return _merge_case(paths, out, OptionsError, ["--gram-limit"], gram_limit=0)
    if kind == "dtype_int8":  # click refuses the choice itself: a usage error
        case = _merge_case(paths, out, OptionsError, ["int8"], dtype="int8")
        case.cli_exit = 2
        return case
    if kind == "scheme_bogus":
        case = _merge_case(paths, out, OptionsError, ["bogus"], scheme="bogus")
        case.cli_exit = 2
        return case

    # --- bundles -------------------------------------------------------------------------------
    member = pop.names[1]
    if kind == "unknown_member":
        target = out_dir / "nobody.safetensors"
        return BadCase(
            ["extract", str(bundle), "--member", "nobody", "-o", str(target)],
            lambda: _with_bundle(bundle, lambda b: b.extract("nobody", target)),
            MemberNotFoundError,
            ["'nobody'", pop.names[0]],
            clean_dir=out_dir,
        )
    if kind == "extract_exists":
        target = out_dir / "taken.safetensors"
        target.write_bytes(b"precious")
        return BadCase(
            ["extract", str(bundle), "--member", member, "-o", str(target)],
            lambda: _with_bundle(bundle, lambda b: b.extract(member, target)),
            OutputExistsError,
            [str(target)],
            unchanged=[target],
            clean_dir=out_dir,
        )
    if kind == "extract_all_into_file":  # -o names an existing regular file, not a directory
        target = out_dir / "not-a-dir"
        target.write_bytes(b"precious")
        return BadCase(
            ["extract", str(bundle), "--all", "-o", str(target)],
            lambda: _with_bundle(bundle, lambda b: b.extract_all(target)),
            unipack.UnipackError,
            [str(target)],
            unchanged=[target],
            clean_dir=out_dir,
        )
    if kind in ("open_checkpoint", "open_random", "open_missing", "open_text"):
        if kind == "open_checkpoint":
            target, mentions, exc = paths[0], [str(paths[0]), "not a unipack bundle"], FormatError
        elif kind == "open_random":
            target = tmp / "random.upk"
            target.write_bytes(np.random.default_rng(1).bytes(1000))
            mentions, exc = [str(target)], FormatError
        elif kind == "open_text":
            target = tmp / "readme.upk"
            target.write_text("# not a bundle\n" * 10)
            mentions, exc = [str(target)], FormatError
        else:
            target = tmp / "missing.upk"
            mentions, exc = [str(target)], unipack.UnipackError
        return BadCase(["info", str(target)], lambda: _with_bundle(target, lambda b: b.summary()), exc, mentions)
    if kind == "corrupt_blob":
        blob = "mean/a.weight"
        lo, hi = blob_range(bundle, blob)
        flip_byte(bundle, (lo + hi) // 2)
        target = out_dir / "m.safetensors"
        return BadCase(
            ["extract", str(bundle), "--member", member, "-o", str(target)],
            lambda: _with_bundle(bundle, lambda b: b.load(member)),
            ChecksumError,
            [str(bundle), repr(blob)],
            clean_dir=out_dir,
        )
    if kind == "corrupt_manifest":
        data = bundle.read_bytes()
        assert data.count(b"unipack 0.1.0") == 1
        bundle.write_bytes(data.replace(b"unipack 0.1.0", b"unipack 0.1.1"))
        return BadCase(
            ["info", str(bundle)],
            lambda: _with_bundle(bundle, lambda b: b.summary()),
            FormatError,
            [str(bundle), "manifest"],
        )
    if kind == "corrupt_header_json":
        data = bytearray(bundle.read_bytes())
        data[8] = ord("[")  # the header's opening brace
        bundle.write_bytes(bytes(data))
        return BadCase(
            ["info", str(bundle)], lambda: _with_bundle(bundle, lambda b: b.summary()), FormatError, [str(bundle)]
        )
    if kind == "truncated_bundle":
        data = bundle.read_bytes()
        bundle.write_bytes(data[:-100])
        return BadCase(
            ["info", str(bundle)],
            lambda: _with_bundle(bundle, lambda b: b.summary()),
            FormatError,
            [str(bundle), "truncated"],
        )
    if kind in ("version_99", "version_99_both"):
        header, _ = read_raw_header(bundle)
        header["__metadata__"]["format_version"] = "99"
        if kind == "version_99_both":  # a consistent v99 file: manifest and its checksum updated too
            import hashlib

            doc = json.loads(header["__metadata__"]["manifest"])
            doc["format_version"] = 99
            text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
            header["__metadata__"]["manifest"] = text
            header["__metadata__"]["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        rewrite_header(bundle, header)
        return BadCase(
            ["info", str(bundle)],
            lambda: _with_bundle(bundle, lambda b: b.summary()),
            FormatError,
            [str(bundle), "99", "supported: 1"],
        )
    raise ValueError(kind)


MERGE_BAD_CASES = [
    "random_bytes",
    "text_file",
    "tiny_file",
    "truncated_input",
    "truncated_input_header",
    "missing_input",
    "names_differ",
    "shape_differs",
    "dtype_kind_differs",
    "one_member",
    "duplicate_names",
    "empty_checkpoint",
    "bundle_as_input",
    "output_exists",
    "output_parent_is_file",
    "rank_and_energy",
    "max_error_and_rank",
    "max_error_2",
    "max_error_negative",
    "energy_too_big",
    "rank_negative",
    "zstd_level_0",
    "gram_limit_0",
    "dtype_int8",
    "scheme_bogus",
]
BUNDLE_BAD_CASES = [
    "unknown_member",
    "extract_exists",
    "extract_all_into_file",
    "open_checkpoint",
    "open_random",
    "open_text",
    "open_missing",
    "corrupt_blob",
    "corrupt_manifest",
    "corrupt_header_json",
    "truncated_bundle",
    "version_99",
    "version_99_both",
]
ALL_BAD_CASES = MERGE_BAD_CASES + BUNDLE_BAD_CASES


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def assert_members_within(bundle: Path, pop: Population, bound: float | None) -> None:
    """Every member of ``bundle`` has its original's tensor names, and every float tensor is
    within ``bound`` of its original (relative Frobenius error; None: names only), checked
    on what ``load`` gives back against the input files."""
    from safetensors.torch import load_file

    with unipack.open(bundle) as b:
        for name, path in zip(pop.names, pop.paths):
            original, rebuilt = load_file(str(path)), b.load(name)
            assert set(rebuilt) == set(original)
            for key, t in original.items():
                if bound is not None and t.is_floating_point():
                    error = torch.linalg.norm((rebuilt[key].double() - t.double()).reshape(-1))
                    assert float(error) <= bound * float(torch.linalg.norm(t.double().reshape(-1))) + 1e-12, key


def run(*args: Any, cwd: Path | None = None, columns: int = 250) -> Result:
    """``unipack ARGS...`` through click's runner, ``columns`` wide (by default so wide that no
    line wraps), in ``cwd`` if given (for relative paths)."""
    runner = CliRunner(env={"COLUMNS": str(columns)})
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)


def assert_one_line_error(result: Result, *mentions: str, exit_code: int = 1) -> str:
    """A refused command: ``exit_code`` (1: bad input), one ``Error: ...`` line holding every
    mention, no traceback and no internal error; returns the line."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "internal error" not in lines[0]
    for text in mentions:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# the lossless baseline, computed independently (spec §3.6)
# --------------------------------------------------------------------------------------------

#: Bytes per element of each dtype that the baseline groups for (float dtypes only).
GROUPED_WIDTHS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def main_width(files: list[Path]) -> int:
    """The byte width the baseline groups a member's files for: that of the dtype holding most of
    its tensor bytes, if a float dtype, else 1. Read from the files themselves (safetensors
    headers; a torch ``.bin`` through torch's own loader)."""
    held: dict[str, int] = {}
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for path in files:
        if path.suffix == ".safetensors":
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            for key, entry in json.loads(raw[8 : 8 + n]).items():
                if key != "__metadata__":
                    b, e = entry["data_offsets"]
                    held[entry["dtype"]] = held.get(entry["dtype"], 0) + e - b
        else:
            for t in torch.load(path, map_location="cpu", weights_only=True).values():
                dt = names.get(t.dtype, str(t.dtype))
                held[dt] = held.get(dt, 0) + t.numel() * t.element_size()
    main = max(held, key=lambda d: held[d]) if held else "F32"
    return GROUPED_WIDTHS.get(main, 1)


def grouped_zstd_size(files: list[Path], width: int | None = None, piece: int = 64 << 20) -> int:
    """zstd -1 of each file's bytes grouped by byte position within ``width``-byte elements (a
    transpose of the ``[n, width]`` byte matrix), in ``piece``-byte pieces, summed."""
    import zstandard

    width = main_width(files) if width is None else width
    total = 0
    for path in files:
        data = path.read_bytes()
        for start in range(0, len(data), piece):
            part = data[start : start + piece]
            whole = len(part) // width * width
            grouped = np.frombuffer(part[:whole], np.uint8).reshape(-1, width).T.tobytes() + part[whole:]
            total += len(zstandard.ZstdCompressor(level=1).compress(grouped))
    return total
