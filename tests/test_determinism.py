"""Same inputs and options -> byte-identical bundles (README: "Determinism")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TensorSpec, standard_specs, write_population

import unipack


def _specs() -> dict[str, TensorSpec]:
    specs = standard_specs()
    specs["head"] = TensorSpec((3, 12), kind="head")
    specs["bf16"] = TensorSpec((10, 16), dtype="bfloat16", kind="left", rank=2)
    specs["f16"] = TensorSpec((16,), dtype="float16", kind="flat", rank=2)
    specs["big"] = TensorSpec((24, 40), kind="right", rank=4, decay=0.5, noise=1e-3)
    return specs


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory):
    return write_population(tmp_path_factory.mktemp("det_in"), _specs(), n=5, seed=23)


@pytest.mark.parametrize(
    "opts",
    [
        {"codec": "zstd"},
        {"codec": "none"},
        {"dtype": "float16"},
        {"dtype": "bfloat16", "codec": "zstd", "zstd_level": 19},
        {"dtype": "float16", "codec": "none", "max_error": 0.001},
        {"rank": 3, "scheme": "rows"},
        {"energy": 0.9, "scheme": "flat"},
        {"max_delta_error": 0.3, "dtype": "float16"},
        {"codec": "zstd", "quantize": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_same_inputs_same_bytes(tmp_path: Path, pop, opts: dict) -> None:
    a = unipack.merge(pop.paths, tmp_path / "a.upk", raw_mismatched=True, **opts)
    (tmp_path / "sub").mkdir()
    b = unipack.merge(pop.paths, tmp_path / "sub" / "other-name.upk", raw_mismatched=True, **opts)
    da, db = (tmp_path / "a.upk").read_bytes(), (tmp_path / "sub" / "other-name.upk").read_bytes()
    assert da == db
    assert a.file_bytes == b.file_bytes == len(da)
    assert a.manifest == b.manifest
    # and the bundle is a real one (not trivially empty)
    with unipack.open(tmp_path / "a.upk") as bundle:
        assert bundle.members == pop.names
        lossy = {t.storage for t in bundle.manifest.tensors if t.storage == "delta" or t.rank > 0}
        assert lossy, [t.reason for t in bundle.manifest.tensors]


def test_inputs_in_another_directory_same_bytes(tmp_path: Path, pop) -> None:
    """Only file names (not directories) are recorded: moved inputs give the same bundle."""
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    paths = [Path(shutil.copy(p, moved / p.name)) for p in pop.paths]
    unipack.merge(pop.paths, tmp_path / "a.upk", raw_mismatched=True)
    unipack.merge(paths, tmp_path / "b.upk", raw_mismatched=True)
    assert (tmp_path / "a.upk").read_bytes() == (tmp_path / "b.upk").read_bytes()


def test_extract_is_deterministic(tmp_path: Path, pop) -> None:
    unipack.merge(pop.paths, tmp_path / "a.upk", raw_mismatched=True, dtype="bfloat16")
    with unipack.open(tmp_path / "a.upk") as b:
        for name in b.members:
            p1 = b.extract(name, tmp_path / f"{name}.1.safetensors")
            p2 = b.extract(name, tmp_path / f"{name}.2.safetensors")
            assert p1.read_bytes() == p2.read_bytes()


def test_member_order_matters_but_is_reproducible(tmp_path: Path, pop) -> None:
    rev = list(reversed(pop.paths))
    unipack.merge(rev, tmp_path / "r1.upk", raw_mismatched=True)
    unipack.merge(rev, tmp_path / "r2.upk", raw_mismatched=True)
    assert (tmp_path / "r1.upk").read_bytes() == (tmp_path / "r2.upk").read_bytes()
    with unipack.open(tmp_path / "r1.upk") as b:
        assert b.members == list(reversed(pop.names))


_SCRIPT = """
import sys, unipack
unipack.merge(sys.argv[2:], sys.argv[1], raw_mismatched=True, dtype="float16")
"""


def test_fresh_process_with_other_hash_seed_same_bytes(tmp_path: Path, pop) -> None:
    """No dependence on set/dict iteration order (PYTHONHASHSEED) or on in-process state."""
    unipack.merge(pop.paths, tmp_path / "here.upk", raw_mismatched=True, dtype="float16")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "there.upk"), *map(str, pop.paths)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert (tmp_path / "here.upk").read_bytes() == (tmp_path / "there.upk").read_bytes()


def test_blas_thread_count_does_not_change_bytes(tmp_path: Path) -> None:
    """A bundle made on a 1-core machine equals one made on a multi-core machine.

    Tensors are large enough (~1e5 elements) for OpenBLAS to split dot products and matrix
    products between threads, which changes float64 summation order in the last bits.
    """
    specs = {
        "w": TensorSpec((256, 384), kind="right", rank=6, decay=0.6, noise=1e-3),
        "b": TensorSpec((384,), kind="flat", rank=2),
    }
    big = write_population(tmp_path / "in", specs, n=6, seed=29, metadata=False)
    outs = []
    for threads in ("1", "2"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "OPENBLAS_NUM_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }
        out = tmp_path / f"t{threads}.upk"
        subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(out), *map(str, big.paths)],
            check=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        outs.append(out)
    a, b = unipack.open(outs[0]), unipack.open(outs[1])
    try:
        diffs = [name for name, rec in a.manifest.blobs.items() if b.manifest.blobs[name].sha256 != rec.sha256]
        errs = [
            (m.name, x, y)
            for m, n in zip(a.manifest.members, b.manifest.members)
            for x, y in zip(m.errors, n.errors)
            if x != y
        ]
    finally:
        a.close()
        b.close()
    assert outs[0].read_bytes() == outs[1].read_bytes(), (
        f"blobs that differ: {diffs}; recorded errors that differ: {errs[:4]}"
    )
