"""Hostile INPUTS to ``merge`` and ``add`` (the input side of the "Reliability" issue).

Every test builds its hostile input here, in ``tmp_path``, and asserts the exact outcome: exit
status 1 and one line on stderr that names the file, says what is wrong and what to do (no
traceback, no Python warning: warnings are errors in this module), in bounded time; or, where
the input is legitimate after all, a merge that succeeds. The sections follow the issue's items:

1. tensor names a bundle cannot hold, from every kind of source;
3. ``.bin`` files whose tensors claim more bytes than the file holds;
4. PEFT configs that would hang: backtracking patterns, FIFOs;
6. values whose arithmetic overflows (F64 1e308, F32 3e38, lora_alpha 1e308);
9. what a path really is (FIFO, device, link loop), content over suffix, open-file limits,
   header parse cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import run
from safetensors.torch import load_file, save_file

import unipack
from unipack.format.manifest import check_tensor_name
from unipack.sources import open_source
from unipack.sources.base import MAX_MAGNITUDE
from unipack.sources.patterns import Budget, PatternError, PatternMatcher
from unipack.sources.safetensors_source import MAX_INPUT_HEADER_BYTES, MAX_INPUT_TENSORS

pytestmark = pytest.mark.filterwarnings("error")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def one_line_error(result: Result, *fragments: str) -> str:
    """The single ``Error: ...`` line of a refused command (exit 1), holding every fragment."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Warning" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "internal error" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    base = torch.Generator().manual_seed(100)
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(8, 6, generator=base, dtype=dtype) + 0.01 * torch.randn(8, 6, generator=g, dtype=dtype),
        "b": torch.randn(8, generator=base, dtype=dtype) + 0.01 * torch.randn(8, generator=g, dtype=dtype),
    }


def pair(tmp_path: Path, extra: dict[str, torch.Tensor] | None = None, suffix: str = ".safetensors") -> list[Path]:
    """Two small checkpoints; ``extra`` tensors are added to the first."""
    paths = []
    for i in range(2):
        t = {**tensors(i), **(extra if i == 0 and extra else {})}
        path = tmp_path / f"m{i}{suffix}"
        if suffix == ".safetensors":
            save_file(t, str(path))
        else:
            torch.save(t, path)
        paths.append(path)
    return paths


def adapter(folder: Path, config: dict[str, Any] | None = None, *, scale: float = 1.0, **extra: torch.Tensor) -> Path:
    """A PEFT LoRA adapter folder (written by hand, as save_pretrained writes it)."""
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(len(folder.name))
    t = {}
    for layer in range(2):
        t[f"base_model.model.layers.{layer}.q.lora_A.weight"] = torch.randn(2, 6, generator=g) * scale
        t[f"base_model.model.layers.{layer}.q.lora_B.weight"] = torch.randn(6, 2, generator=g) * scale
    save_file({**t, **extra}, str(folder / "adapter_model.safetensors"))
    return folder


def write_header(path: Path, header: dict[str, Any], data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# ------------------------------------------------------------------------------------------
# 1. tensor names: what the bundle reader refuses, every source refuses first
# ------------------------------------------------------------------------------------------

BAD_NAMES = {
    "nul": ("a\x00b", "control character"),
    "empty": ("", "empty tensor name"),
    "escape": ("a\nb\x1b[31m", "control character"),
    "long": ("x" * 100_000, "100,000 characters (at most 1,024)"),
    "metadata": ("__metadata__", "reserved by safetensors"),
}


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_p1_safetensors_names_refused_before_merging(tmp_path: Path, kind: str) -> None:
    name, says = BAD_NAMES[kind]
    if kind == "metadata":  # in a safetensors header the key is the metadata's; a .bin can use it
        good = pair(tmp_path)[1]
        bad = tmp_path / "m0.bin"
        torch.save({**tensors(0), name: torch.zeros(2)}, bad)
    else:
        bad, good = pair(tmp_path, {name: torch.zeros(2)})
    out = tmp_path / "out.upk"
    line = one_line_error(run("merge", bad, good, "-o", out), str(bad), says)
    assert "rename" in line
    assert not out.exists()


def test_p1_every_name_the_reader_refuses_is_refused_by_the_source(tmp_path: Path) -> None:
    """The source's verdict is the reader's (``check_tensor_name``), name for name."""
    rng = random.Random(0)
    alphabet = ["a", ".", "\x00", "\x1f", "\x7f", "\x80", "é", " ", "\n", "\u2028"]
    names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(60)]
    names += ["y" * 1024, "y" * 1025]
    for i, name in enumerate(names):
        path = tmp_path / f"n{i}.safetensors"
        save_file({name: torch.zeros(1)}, str(path))
        try:
            check_tensor_name(name)
            reader_ok = True
        except unipack.FormatError:
            reader_ok = False
        try:
            open_source(path).close()
            source_ok = True
        except unipack.InputError:
            source_ok = False
        assert source_ok == reader_ok, repr(name)


def test_p1_bin_names_refused(tmp_path: Path) -> None:
    bad, good = pair(tmp_path, {"a\x00b": torch.zeros(2)}, suffix=".bin")
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "control character")


def test_p1_sharded_folder_names_refused(tmp_path: Path) -> None:
    folders = []
    for i in range(2):
        folder = tmp_path / f"hf{i}"
        folder.mkdir()
        t = tensors(i)
        if i == 0:
            t["bad\x1b[0m"] = torch.zeros(2)
        weight_map = {}
        for n, key in enumerate(t):
            weight_map[key] = f"model-0000{1 + n % 2}-of-00002.safetensors"
        for shard in sorted(set(weight_map.values())):
            save_file({k: t[k] for k, s in weight_map.items() if s == shard}, str(folder / shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        folders.append(folder)
    one_line_error(run("merge", *folders, "-o", tmp_path / "out.upk"), str(folders[0]), "control character")


def test_p1_peft_modules_to_save_names_refused(tmp_path: Path) -> None:
    bad = adapter(tmp_path / "a0", **{"base_model.model.head\x07.modules_to_save.default.weight": torch.zeros(3)})
    good = adapter(tmp_path / "a1")
    one_line_error(
        run("merge", bad, good, "-o", tmp_path / "out.upk"), "adapter_model.safetensors", "control character"
    )


# ------------------------------------------------------------------------------------------
# 3. .bin tensors claiming more bytes than the file holds
# ------------------------------------------------------------------------------------------


def test_p3_stride_zero_tensor_refused_without_allocating(tmp_path: Path) -> None:
    bad, good = pair(tmp_path, suffix=".bin")
    torch.save({**tensors(0), "big": torch.zeros(1).expand(2**40)}, bad)
    assert bad.stat().st_size < 4096
    started = time.perf_counter()
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "'big'", "overlapping strides")
    assert time.perf_counter() - started < 30


def test_p3_no_memory_is_allocated_for_the_claim(tmp_path: Path) -> None:
    """2**28 stride-0 floats (1 GiB claimed by a 2 KB file), in a process that cannot map 1 GiB more."""
    bad, good = pair(tmp_path, suffix=".bin")
    torch.save({**tensors(0), "big": torch.zeros(1).expand(2**28)}, bad)
    code = (
        "import resource, sys\n"
        "from unipack.cli import main\n"
        "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 768 * 2**20, resource.RLIM_INFINITY))\n"
        "sys.argv = ['unipack', *sys.argv[1:]]\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", str(bad), str(good), "-o", str(tmp_path / "out.upk")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "overlapping strides" in lines[0], proc.stderr


def test_p3_overlapping_as_strided_refused(tmp_path: Path) -> None:
    bad, good = pair(tmp_path, suffix=".bin")
    torch.save({**tensors(0), "o": torch.zeros(2000).as_strided((1000, 1000), (1, 1))}, bad)
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "'o'", "overlapping strides")


def test_p3_many_names_on_one_storage_refused(tmp_path: Path) -> None:
    bad, good = pair(tmp_path, suffix=".bin")
    shared = torch.zeros(2**18)  # 1 MiB, under 300 names: 300 MiB to merge from a 1 MiB file
    torch.save({**tensors(0), **{f"tied.{i}": shared for i in range(300)}}, bad)
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "save each tensor once")


def test_p3_legacy_file_declaring_huge_storage_refused(tmp_path: Path) -> None:
    bad, good = pair(tmp_path, suffix=".bin")
    torch.save({"w": torch.zeros(3)}, bad, _use_new_zipfile_serialization=False)
    data = bad.read_bytes()
    at = data.index(b"K\x03", data.index(b"cpu"))  # the pickled element count: 3
    bad.write_bytes(data[:at] + b"J\xff\xff\xff\x7f" + data[at + 2 :])  # now 2**31 - 1
    result = run("merge", bad, good, "-o", tmp_path / "out.upk")
    one_line_error(result, str(bad), "declares 2,147,483,647 storage elements")


def test_p3_tied_and_strided_tensors_still_merge(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        base = tensors(i)["w"]
        path = tmp_path / f"m{i}.bin"
        torch.save({"w": base, "tied": base, "t": base.t(), "row": base[2]}, path)
        paths.append(path)
    unipack.merge(paths, tmp_path / "out.upk", max_error=0.0)
    with unipack.open(tmp_path / "out.upk") as b:
        got = b.load("m1")
    ref = torch.load(paths[1], weights_only=True)
    for name, value in ref.items():
        assert torch.equal(got[name], value.contiguous()), name


# ------------------------------------------------------------------------------------------
# 4. PEFT configs that would hang
# ------------------------------------------------------------------------------------------


def test_p4_backtracking_pattern_matches_in_bounded_time(tmp_path: Path) -> None:
    """``(a+)+b`` against a 900-character module name: exponential for ``re``, linear here."""
    long = "base_model.model." + "a" * 900 + ".q"
    extra = {f"{long}.lora_A.weight": torch.randn(2, 6), f"{long}.lora_B.weight": torch.randn(6, 2)}
    bad = adapter(tmp_path / "a0", {"rank_pattern": {"(a+)+b": 4}, "alpha_pattern": {"(a|a)*b": 2}}, **extra)
    good = adapter(tmp_path / "a1", **extra)
    with deadline(60):
        unipack.merge([bad, good], tmp_path / "out.upk")
    with unipack.open(tmp_path / "out.upk") as b:
        assert len(b.members) == 2


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        (r"(q)\1", "a backreference"),
        ("(?i:LAYERS)", "case-insensitive"),
        ("a{100000}", "states"),
        ("x" * 3000, "3,000 characters long"),
        ("q(", "not a valid regular expression"),
    ],
)
def test_p4_patterns_not_evaluated_are_refused(tmp_path: Path, pattern: str, says: str) -> None:
    bad = adapter(tmp_path / "a0", {"rank_pattern": {pattern: 2}})
    good = adapter(tmp_path / "a1")
    with deadline(30):
        result = run("merge", bad, good, "-o", tmp_path / "out.upk")
    one_line_error(result, "adapter_config.json", "rank_pattern key", says)


def test_p4_pattern_matching_is_peft_matching() -> None:
    """The bounded matcher against ``re.match(rf"(.*\\.)?({p})$", key)`` (PEFT's
    ``get_pattern_key``), on random patterns and keys, flags and lookarounds included."""
    rng = random.Random(7)
    atoms = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\W", r"\s", "[a-c1]", r"\b", r"\B", "^", "$", r"\Z"]

    def gen(depth: int = 0) -> str:
        k = rng.random()
        if depth > 3 or k < 0.3:
            return rng.choice(atoms)
        if k < 0.5:
            return "".join(gen(depth + 1) for _ in range(rng.randint(1, 3)))
        if k < 0.6:
            return f"({gen(depth + 1)}|{gen(depth + 1)})"
        if k < 0.8:
            return f"({gen(depth + 1)}){rng.choice(['*', '+', '?', '{2}', '{0,2}', '{2,}', '*?', '+?'])}"
        if k < 0.87:
            return f"(?{rng.choice('=!')}{gen(depth + 1)})"
        if k < 0.93:
            behind = rng.choice(["a", r"\.", "ab"])
            return f"(?<{rng.choice('=!')}{behind})"
        return f"(?{rng.choice(['', 's', 'm', 'a', 'x'])}:{gen(depth + 1)})"

    checked = 0
    for _ in range(400):
        pattern = gen()
        try:
            compiled = re.compile(rf"(.*\.)?({pattern})$")
        except re.error:
            continue
        matcher = PatternMatcher([pattern], Budget())
        for _ in range(8):
            key = "".join(rng.choice("ab.1_ é٣\n") for _ in range(rng.randint(0, 8)))
            assert (matcher.first_match(key) is not None) == (compiled.match(key) is not None), (pattern, key)
            checked += 1
    assert checked > 2000
    # The first matching pattern wins, as in PEFT.
    m = PatternMatcher([r"layers\.1\.q", "q", "layers.0.q"], Budget())
    assert m.first_match("model.layers.1.q") == r"layers\.1\.q"
    assert m.first_match("model.layers.0.q") == "q"
    assert m.first_match("model.layers.0.k") is None
    with pytest.raises(PatternError):
        PatternMatcher([r"(a)(?(1)b|c)"], Budget())


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_p4_fifo_in_an_adapter_is_refused_not_waited_on(tmp_path: Path, name: str) -> None:
    bad = adapter(tmp_path / "a0")
    (bad / name).unlink()
    os.mkfifo(bad / name)
    good = adapter(tmp_path / "a1")
    with deadline(30):
        result = run("merge", bad, good, "-o", tmp_path / "out.upk")
    one_line_error(result, str(bad / name), "FIFO", "not a regular file")


# ------------------------------------------------------------------------------------------
# 6. extreme values
# ------------------------------------------------------------------------------------------


def extreme_pair(tmp_path: Path, dtype: torch.dtype, value: float) -> list[Path]:
    paths = []
    for i in range(3):
        t = tensors(i, torch.float64)
        w = t["w"] / t["w"].abs().max() * value
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": w.to(dtype), "b": t["b"].to(dtype)}, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize(("dtype", "value"), [(torch.float64, 1e30), (torch.float32, 3e38), (torch.float32, 1e13)])
def test_p6_values_too_large_to_decompose_are_refused_with_the_raw_way_out(
    tmp_path: Path, dtype: torch.dtype, value: float
) -> None:
    paths = extreme_pair(tmp_path, dtype, value)
    out = tmp_path / "out.upk"
    one_line_error(run("merge", *paths, "-o", out), str(paths[0]), "'w'", "--raw 'w'")
    unipack.merge(paths, out, raw=["w"])  # the way out the message names: bit-exact, no warnings
    with unipack.open(out) as b:
        assert torch.equal(b.load("m1")["w"], load_file(str(paths[1]))["w"])
        assert next(t for t in b.manifest.tensors if t.name == "w").storage == "raw"


def test_p6_float64_beyond_float32_range_refused(tmp_path: Path) -> None:
    """F64 values past ±3.4e38 overflow float64 sums of squares in every path, raw included."""
    paths = extreme_pair(tmp_path, torch.float64, 1e308)
    one_line_error(run("merge", *paths, "-o", tmp_path / "out.upk"), str(paths[0]), "beyond float32's range")


def test_p6_values_just_under_the_limit_merge_without_warnings(tmp_path: Path) -> None:
    paths = extreme_pair(tmp_path, torch.float32, MAX_MAGNITUDE / 2)
    unipack.merge(paths, tmp_path / "out.upk")  # warnings are errors here


@pytest.mark.parametrize("alpha", ["1e308", "-1e300", str(10**400)])
def test_p6_huge_lora_alpha_refused(tmp_path: Path, alpha: str) -> None:
    bad = adapter(tmp_path / "a0")
    text = (bad / "adapter_config.json").read_text().replace('"lora_alpha": 4', f'"lora_alpha": {alpha}')
    (bad / "adapter_config.json").write_text(text)
    good = adapter(tmp_path / "a1")
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), "adapter_config.json", "lora_alpha is")


def test_p6_huge_lora_factors_refused(tmp_path: Path) -> None:
    bad = adapter(tmp_path / "a0", scale=1e38)
    good = adapter(tmp_path / "a1")
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "the adapter is broken")


def test_p6_add_of_float64_beyond_float32_range_refused(tmp_path: Path) -> None:
    paths = extreme_pair(tmp_path, torch.float64, 1.0)
    bundle = tmp_path / "b.upk"
    unipack.merge(paths[:2], bundle)
    new = tmp_path / "new.safetensors"
    t = tensors(5, torch.float64)
    save_file({"w": t["w"] / t["w"].abs().max() * 1e308, "b": t["b"]}, str(new))
    one_line_error(run("add", bundle, new, "-o", tmp_path / "out.upk"), str(new), "beyond float32's range")


def test_p6_signalling_nan_inputs_merge_without_warnings(tmp_path: Path) -> None:
    paths = pair(tmp_path)
    w = tensors(0)["w"].numpy().copy()
    w.view(np.uint32)[0, 0] = 0x7F800001  # a signalling NaN: numpy flags its widening as invalid
    save_file({"w": torch.from_numpy(w), "b": tensors(0)["b"]}, str(paths[0]))
    unipack.merge(paths, tmp_path / "out.upk")
    with unipack.open(tmp_path / "out.upk") as b:
        got = b.load("m0")["w"].numpy()
    assert got.view(np.uint32)[0, 0] == 0x7F800001  # stored raw, bit for bit


# ------------------------------------------------------------------------------------------
# 9. what a path is; content over suffix; open-file limits; header cost
# ------------------------------------------------------------------------------------------


def special(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        path.symlink_to(name)
    elif kind == "dangling":
        path.symlink_to("nowhere")
    return path


SPECIAL = {
    "fifo": "is a FIFO (named pipe), not a regular file",
    "devzero": "is a character device, not a regular file",
    "loop": "is a symbolic link loop",
    "dangling": "is a broken symbolic link",
}


@pytest.mark.parametrize("kind", sorted(SPECIAL))
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_p9_special_files_say_what_they_are(tmp_path: Path, kind: str, suffix: str) -> None:
    bad = special(tmp_path, kind, f"bad{suffix}")
    good = pair(tmp_path)[0]
    with deadline(30):
        result = run("merge", bad, good, "-o", tmp_path / "out.upk")
    one_line_error(result, str(bad), SPECIAL[kind])


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json"])
def test_p9_special_files_in_model_folders_say_what_they_are(tmp_path: Path, name: str) -> None:
    folders = []
    for i in range(2):
        folder = tmp_path / f"hf{i}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save_file(tensors(i), str(folder / "model.safetensors"))
        folders.append(folder)
    target = folders[0] / name
    if target.exists():
        target.unlink()
    if name.endswith(".index.json"):
        (folders[0] / "model.safetensors").unlink()
    os.mkfifo(target)
    with deadline(30):
        result = run("merge", *folders, "-o", tmp_path / "out.upk")
    one_line_error(result, str(target), "FIFO")


def test_p9_safetensors_named_bin_is_read_as_safetensors(tmp_path: Path) -> None:
    paths = pair(tmp_path)
    renamed = paths[0].with_suffix(".bin")
    paths[0].rename(renamed)
    unipack.merge([renamed, paths[1]], tmp_path / "out.upk", max_error=0.0)
    with unipack.open(tmp_path / "out.upk") as b:
        assert torch.equal(b.load("m0")["w"], tensors(0)["w"])


def test_p9_pickle_named_safetensors_says_so(tmp_path: Path) -> None:
    bad, good = pair(tmp_path)
    torch.save(tensors(0), bad)
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), "is a PyTorch checkpoint", ".bin")


def test_p9_more_inputs_than_open_files_allowed(tmp_path: Path) -> None:
    """No file stays open between reads: 120 inputs merge under a limit of ~40 more descriptors."""
    paths = []
    for i in range(120):
        path = tmp_path / f"m{i:03d}.safetensors"
        save_file(tensors(i), str(path))
        paths.append(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))
    try:
        unipack.merge(paths, tmp_path / "out.upk")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with unipack.open(tmp_path / "out.upk") as b:
        assert len(b.members) == 120


def test_p9_header_over_the_size_limit_refused_before_parsing(tmp_path: Path) -> None:
    bad, good = pair(tmp_path)
    pad = MAX_INPUT_HEADER_BYTES + 8
    doc = {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "__metadata__": {"pad": "x" * pad}}
    write_header(bad, doc)
    started = time.perf_counter()
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), f"{MAX_INPUT_HEADER_BYTES:,}-byte")
    assert time.perf_counter() - started < 10


def test_p9_header_with_too_many_tensors_refused_before_parsing(tmp_path: Path) -> None:
    bad, good = pair(tmp_path)
    doc = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_INPUT_TENSORS + 3)}
    write_header(bad, doc)
    started = time.perf_counter()
    one_line_error(run("merge", bad, good, "-o", tmp_path / "out.upk"), str(bad), f"{MAX_INPUT_TENSORS:,} tensors")
    assert time.perf_counter() - started < 10
