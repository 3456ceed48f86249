#!/usr/bin/env python3
"""Fuzz unipack's INPUT side: ``unipack merge`` and ``unipack add`` on mutated checkpoints.

Usage::

    python tools/fuzz_inputs.py --seed 0 --iterations 300 [--findings DIR] [--subprocess]

Seeds are small valid inputs of every kind ``merge`` reads, built at start in a temporary
folder: two ``.safetensors`` checkpoints, two ``torch.save`` state dicts (zip format) and a
legacy-format one, Hugging Face folders (``config.json`` + ``model.safetensors``, and a sharded
one with ``model.safetensors.index.json``), PEFT adapter folders (``adapter_config.json`` with
``rank_pattern`` / ``alpha_pattern``, LoRA factors and a ``modules_to_save`` copy), and a bundle
merged from the safetensors pair for ``add``.

Each execution copies one seed member, applies 1-3 mutations, and runs ``unipack merge MUTATED
PARTNER -o OUT`` (or ``unipack add BUNDLE MUTATED -o OUT``). Mutations: byte flips, byte-range
overwrites, truncation, appended garbage; safetensors header edits (dtype, shape, offsets,
tensor names, metadata, entry count, header length); tensor values set to extremes (inf, NaN,
3e38, 1e308); JSON edits of ``adapter_config.json``, ``config.json`` and the shard index
(extreme numbers, wrong types, hostile regular expressions, shard names leaving the folder);
``torch.save`` of hostile state dicts (stride-0 expand, overlapping strides, many names on one
storage, nested dicts, odd dtypes, legacy files declaring huge storages); and a file replaced
by a FIFO, a symlink loop, a dangling link, a folder or a link to ``/dev/zero``.

The only allowed outcomes: exit 0 with nothing alarming on stderr (and the bundle written then
passes ``unipack verify``), or exit 1 with exactly one line, ``Error: ...``, on stderr. A
traceback, a Python warning on stderr, exit 3 (an internal error), any other exit status, a
signal, or a run longer than ``--timeout`` seconds (default 20) is a finding. Each run is
limited to ``--memory-mib`` MiB (default 2048) of address space above what the process holds
after importing unipack (``RLIMIT_AS``), so a file that makes unipack allocate what it claims
fails fast instead of swapping, and may write no file over 1 GiB (``RLIMIT_FSIZE``).

Runs fork a child of this process (unipack and torch imported once: ~0.1 s per run instead of
~3 s per interpreter start); ``--subprocess`` runs ``python -c 'from unipack.cli import main;
main()'`` instead, exactly as a user would. Findings are saved under ``--findings`` (default
``fuzz-inputs-findings/``): the mutated case folder, the command and its output. Exit status: 0
if no findings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 20.0
MEMORY_MIB = 2048
#: Largest file a run may write (RLIMIT_FSIZE): inputs are kilobytes, so is every honest output.
FILE_LIMIT = 2**30
KINDS = ("st", "bin", "legacy", "hf", "hfs", "peft")

# ------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------


def _tensors(seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.Generator().manual_seed(1000)
    return {
        "enc.weight": torch.randn(8, 6, generator=base) + 0.01 * torch.randn(8, 6, generator=g),
        "enc.bias": torch.randn(8, generator=base) + 0.01 * torch.randn(8, generator=g),
        "emb": (torch.randn(4, 6, generator=base) + 0.01 * torch.randn(4, 6, generator=g)).half(),
        "norm": (torch.ones(6) + 0.01 * torch.randn(6, generator=g)).bfloat16(),
        "scale": torch.randn(5, 4, generator=base, dtype=torch.float64) + 0.01 * torch.randn(5, 4, generator=g),
        "steps": torch.arange(3, dtype=torch.int64),
    }


CONFIG = {"model_type": "bert", "hidden_size": 6, "architectures": ["BertModel"]}


def _adapter(folder: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q"],
        "rank_pattern": {"layers.1.q": 2},
        "alpha_pattern": {r"layers\.0\..*": 8},
        "modules_to_save": ["head"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for layer in range(2):
        tensors[f"base_model.model.layers.{layer}.q.lora_A.weight"] = torch.randn(2, 6, generator=g)
        tensors[f"base_model.model.layers.{layer}.q.lora_B.weight"] = torch.randn(6, 2, generator=g)
    tensors["base_model.model.head.modules_to_save.default.weight"] = torch.randn(3, 6, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def build_seeds(root: Path) -> dict[str, tuple[Path, Path]]:
    """Every seed kind -> (the member to mutate, an intact partner to merge it with); and the
    ``bundle.upk`` (under ``root``) that ``add`` cases add to."""
    import torch
    from safetensors.torch import save_file

    import unipack

    seeds: dict[str, tuple[Path, Path]] = {}
    members = {name: _tensors(i) for i, name in enumerate("ab")}
    for name, t in members.items():
        (root / "st").mkdir(parents=True, exist_ok=True)
        save_file(t, str(root / "st" / f"{name}.safetensors"), metadata={"format": "pt"})
        (root / "bin").mkdir(exist_ok=True)
        torch.save(t, root / "bin" / f"{name}.bin")
        (root / "legacy").mkdir(exist_ok=True)
        torch.save(t, root / "legacy" / f"{name}.bin", _use_new_zipfile_serialization=False)
        hf = root / "hf" / name
        hf.mkdir(parents=True)
        (hf / "config.json").write_text(json.dumps(CONFIG))
        save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
        hfs = root / "hfs" / name
        hfs.mkdir(parents=True)
        (hfs / "config.json").write_text(json.dumps(CONFIG))
        names = list(t)
        shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        weight_map = {}
        for file_name, keys in shards.items():
            save_file({k: t[k] for k in keys}, str(hfs / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, file_name))
        (hfs / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        _adapter(root / "peft" / name, seed=ord(name))
    for kind in ("st", "bin", "legacy"):
        suffix = ".safetensors" if kind == "st" else ".bin"
        seeds[kind] = (root / kind / f"a{suffix}", root / kind / f"b{suffix}")
    for kind in ("hf", "hfs", "peft"):
        seeds[kind] = (root / kind / "a", root / kind / "b")
    unipack.merge([root / "st" / "a.safetensors", root / "st" / "b.safetensors"], root / "bundle.upk")
    return seeds


# ------------------------------------------------------------------------------------------
# mutations: each takes (rng, case folder) and returns a description
# ------------------------------------------------------------------------------------------


def _files(case: Path) -> list[Path]:
    return sorted(p for p in case.rglob("*") if p.is_file() and not p.is_symlink())


def _pick(rng: random.Random, case: Path, suffixes: tuple[str, ...] = ()) -> Path | None:
    files = [p for p in _files(case) if not suffixes or p.name.endswith(suffixes)]
    return rng.choice(files) if files else None


def mutate_bytes(rng: random.Random, case: Path) -> str:
    target = _pick(rng, case)
    if target is None:
        return "bytes: no file"
    data = bytearray(target.read_bytes())
    how = rng.choice(["flip", "overwrite", "truncate", "append", "insert"])
    if how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "overwrite" and data:
        at = rng.randrange(len(data))
        n = min(rng.randint(1, 16), len(data) - at)
        data[at : at + n] = bytes(rng.choice([0x00, 0xFF, rng.randrange(256)]) for _ in range(n))
    elif how == "truncate":
        del data[rng.randint(0, len(data)) :]
    elif how == "append":
        data += rng.randbytes(rng.randint(1, 64))
    else:
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    target.write_bytes(bytes(data))
    return f"bytes {how} {target.name}"


HOSTILE_NAMES = [
    "",
    "a\x00b",
    "a\nb\x1b[31m",
    "x" * 2000,
    "__metadata__",
    "é/../ü",
    "\ud800",
    "a" * 1024,
    "tab\tname",
    "base_model.model.layers.0.q.lora_A.weight",
]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "C64", "f32", "", None, 7]


def _read_st(path: Path) -> tuple[dict[str, Any], bytes] | None:
    data = path.read_bytes()
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def _write_st(path: Path, header: dict[str, Any], body: bytes, length_delta: int = 0) -> None:
    # surrogatepass: a lone surrogate in a name is written as the (invalid) UTF-8 it would be.
    text = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", max(len(text) + length_delta, 0)) + text + body)


def mutate_header(rng: random.Random, case: Path) -> str:
    target = _pick(rng, case, (".safetensors",))
    parsed = _read_st(target) if target else None
    if target is None or parsed is None:
        return mutate_bytes(rng, case)
    header, body = parsed
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return "header: empty"
    name = rng.choice(names)
    entry = header[name]
    how = rng.choice(["dtype", "shape", "offsets", "rename", "drop", "many", "metadata", "length", "values"])
    length_delta = 0
    if how == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif how == "shape":
        entry["shape"] = rng.choice(
            [[], [0], [2**40], [-1], [1.5], ["3"], [2**31, 2**31], [1] * 20, [*entry["shape"], 1], [2**64]]
        )
    elif how == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 4, b + 4], [0, 2**63], [-8, b], [a, a]])
    elif how == "rename":
        header[rng.choice(HOSTILE_NAMES)] = header.pop(name)
    elif how == "drop":
        del header[name]
    elif how == "many":
        for i in range(rng.choice([10, 1000, 20000])):
            header[f"z{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif how == "metadata":
        header["__metadata__"] = rng.choice([{"format": "unipack.upk"}, [], {"a": 1}, {"x" * 10: "y" * 10000}])
    elif how == "length":
        length_delta = rng.choice([-8, -1, 1, 8, 2**20])
    else:
        return _mutate_values(rng, target, header, body, name)
    _write_st(target, header, body, length_delta)
    return f"header {how} {target.name}:{name[:20]!r}"


EXTREMES = [float("inf"), float("-inf"), float("nan"), 3e38, -3.4e38, 1e13, 1e308, 5e-324, -0.0, 65504.0, 1e5]


def _mutate_values(rng: random.Random, target: Path, header: dict[str, Any], body: bytes, name: str) -> str:
    import numpy as np

    entry = header[name]
    formats = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}
    if entry.get("dtype") not in formats:
        return "values: not a float tensor"
    a, b = entry["data_offsets"]
    values = np.frombuffer(body[a:b], dtype=formats[entry["dtype"]]).copy()
    if values.size == 0:
        return "values: empty"
    value = rng.choice(EXTREMES)
    with np.errstate(over="ignore"):
        if rng.random() < 0.5:
            values[rng.randrange(values.size)] = value
        else:
            values[:] = value
    body = body[:a] + values.tobytes() + body[b:]
    _write_st(target, header, body)
    return f"values {target.name}:{name!r} = {value}"


PATTERNS = [
    "(a+)+b",
    "(a|a)*b",
    "(.*a){30}",
    "a{100000}",
    r"(\w+\s?)+$",
    "(?i)layers",
    r"(q)\1",
    "(?<=layers)",
    "layers.0.q",
    r"layers\.\d+\.q",
    "[",
    "x" * 5000,
    "(?=(a+)+b)a",
    "((((((((((a*)*)*)*)*)*)*)*)*)*)*b",
]
JSON_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    1e308,
    -1e308,
    2**70,
    10**400,
    "x",
    [],
    {},
    [1, 2],
    {"a": {"b": []}},
    1.5,
    "8",
    "ÿ" * 3000,
]


def mutate_json(rng: random.Random, case: Path) -> str:
    target = _pick(rng, case, (".json",))
    if target is None:
        return mutate_bytes(rng, case)
    try:
        doc = json.loads(target.read_text())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return mutate_bytes(rng, case)
    how = rng.choice(["field", "pattern", "raw", "deep", "weight_map", "drop"])
    if how == "raw":
        text = rng.choice(["", "[]", "{", '{"r": NaN}', '{"a": 1, "a": 2}', b"\xff\xfe".decode("latin-1"), "null"])
        target.write_text(text, encoding="utf-8")
        return f"json raw {target.name}"
    if how == "deep":
        target.write_text("[" * 100000 + "]" * 100000)
        return f"json deep {target.name}"
    if not isinstance(doc, dict):
        return "json: not an object"
    if how == "pattern" and target.name == "adapter_config.json":
        field_name = rng.choice(["rank_pattern", "alpha_pattern"])
        doc[field_name] = {rng.choice(PATTERNS): rng.choice([2, 4, 1e308, -1, 0, 2**70])}
    elif how == "weight_map" and isinstance(doc.get("weight_map"), dict) and doc["weight_map"]:
        wm = doc["weight_map"]
        key = rng.choice(list(wm))
        wm[key] = rng.choice(["../a/model.safetensors", "missing.safetensors", "", "model-00003-of-00002.safetensors"])
        if rng.random() < 0.5:
            wm[rng.choice(HOSTILE_NAMES)] = wm.pop(key)
    elif how == "drop" and doc:
        del doc[rng.choice(list(doc))]
    else:
        keys = list(doc) + ["r", "lora_alpha", "use_rslora", "peft_type", "use_dora", "fan_in_fan_out"]
        doc[rng.choice(keys)] = rng.choice(JSON_VALUES)
    target.write_text(json.dumps(doc))
    return f"json {how} {target.name}"


def mutate_torch(rng: random.Random, case: Path) -> str:
    import torch

    target = _pick(rng, case, (".bin",))
    if target is None:
        return mutate_bytes(rng, case)
    state: dict[Any, Any] = dict(_tensors(7))
    how = rng.choice(["expand", "as_strided", "tied", "strided", "nested", "key", "dtype", "sparse", "meta", "huge"])
    if how == "expand":
        state["enc.weight"] = torch.zeros(1).expand(rng.choice([2**27, 2**40]))
    elif how == "as_strided":
        state["enc.weight"] = torch.zeros(2000).as_strided((1000, 1000), (1, 1))
    elif how == "tied":
        big = torch.zeros(4096)
        state.update({f"tied.{i}": big for i in range(rng.choice([2, 300]))})
    elif how == "strided":
        state["enc.weight"] = torch.randn(6, 8).t()
    elif how == "nested":
        state["enc.weight"] = {"w": torch.zeros(2)}
    elif how == "key":
        state[rng.choice([1, ("a",), "a\x00b", ""])] = torch.zeros(2)
    elif how == "dtype":
        state["enc.weight"] = torch.zeros(2, dtype=rng.choice([torch.complex64, torch.uint16, torch.float8_e5m2]))
    elif how == "sparse":
        state["enc.weight"] = torch.zeros(3, 3).to_sparse()
    elif how == "meta":
        state["enc.weight"] = torch.zeros(3, device="meta")
    else:
        state["enc.weight"] = torch.zeros(3)
    legacy = rng.random() < 0.4
    torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    if how == "huge" and legacy:  # the pickle declares far more elements than the file holds
        data = target.read_bytes()
        at = data.find(b"cpu")
        if at >= 0:
            i = data.find(b"K\x03", at)
            if i >= 0:
                target.write_bytes(data[:i] + b"J\xff\xff\xff\x7f" + data[i + 2 :])
    return f"torch {how}{' legacy' if legacy else ''} {target.name}"


def mutate_kind(rng: random.Random, case: Path) -> str:
    target = _pick(rng, case)
    if target is None:
        return "kind: no file"
    target.unlink()
    how = rng.choice(["fifo", "loop", "dangling", "folder", "devzero", "empty"])
    if how == "fifo":
        os.mkfifo(target)
    elif how == "loop":
        os.symlink(target.name, target)
    elif how == "dangling":
        os.symlink("nowhere-" + target.name, target)
    elif how == "folder":
        target.mkdir()
    elif how == "devzero":
        os.symlink("/dev/zero", target)
    else:
        target.write_bytes(b"")
    return f"kind {how} {target.name}"


def mutate_suffix(rng: random.Random, case: Path) -> str:
    """A file saved under the other format's suffix (a safetensors file named .bin, ...)."""
    target = _pick(rng, case, (".safetensors", ".bin"))
    if target is None:
        return mutate_bytes(rng, case)
    other = target.with_suffix(".bin" if target.suffix == ".safetensors" else ".safetensors")
    target.rename(other)
    return f"suffix {target.name} -> {other.name}"


MUTATORS: list[tuple[Callable[[random.Random, Path], str], float]] = [
    (mutate_bytes, 3.0),
    (mutate_header, 4.0),
    (mutate_json, 3.0),
    (mutate_torch, 2.0),
    (mutate_kind, 1.0),
    (mutate_suffix, 0.5),
]


# ------------------------------------------------------------------------------------------
# running one command
# ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | None  # None: timed out; negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float


def _address_space_limit(memory_mib: int) -> int:
    """``memory_mib`` MiB above this process's current address space (torch alone maps ~0.6 GiB)."""
    try:
        with open("/proc/self/status") as f:
            size_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        size_kib = 0
    return size_kib * 1024 + memory_mib * 1024 * 1024


def run_cli(args: list[str], cwd: Path, *, timeout: float, memory_mib: int, fork: bool = True) -> Outcome:
    """``unipack ARGS`` in a child process limited in time and address space."""
    out, err = cwd / ".stdout", cwd / ".stderr"
    limit = _address_space_limit(memory_mib)
    started = time.perf_counter()
    if not fork:
        cmd = [sys.executable, "-c", "from unipack.cli import main; main()", *args]
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: _limit_child(limit + 2**30),
            )
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
    else:
        sys.stdout.flush()  # or the child would write this process's pending output as its own
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))  # no file past 1 GiB
                os.chdir(cwd)
                fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fd_null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(fd_null, 0)
                os.dup2(fd_out, 1)
                os.dup2(fd_err, 2)
                from unipack.cli import cli

                try:
                    cli.main(args, prog_name="unipack", standalone_mode=True)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported through stderr and the exit status
                import traceback

                traceback.print_exc()
                code = 70
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        rc = _wait(pid, timeout)
    seconds = time.perf_counter() - started
    return Outcome(rc, _text(out), _text(err), seconds)


def _limit_child(address_space: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our own child, by its id
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


ALARMS = ("Traceback", "Warning", "warning:", "internal error")


def judge(outcome: Outcome) -> str | None:
    """None if the outcome is allowed, else what is wrong with it (a finding's signature)."""
    if outcome.rc is None:
        return "timeout"
    alarm = next((a for a in ALARMS if a in outcome.stderr), None)
    if alarm is not None:
        first = next((line for line in outcome.stderr.splitlines() if alarm in line), alarm)
        return f"exit {outcome.rc}, stderr has {alarm!r}: {first.strip()[:160]}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.rc == 0:
        return None
    if outcome.rc == 1:
        if len(lines) == 1 and lines[0].startswith("Error: "):
            return None
        return f"exit 1 with {len(lines)} lines on stderr: {(lines or [''])[0][:160]}"
    return f"exit {outcome.rc}: {(lines or [''])[-1][:160]}"


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


@dataclass
class Finding:
    signature: str
    command: list[str]
    mutations: list[str]
    outcome: Outcome
    saved: Path | None = None


@dataclass
class Result:
    executions: int = 0
    findings: list[Finding] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


def fuzz(
    iterations: int,
    seed: int,
    *,
    work: Path,
    findings_dir: Path | None = None,
    timeout: float = TIMEOUT_SECONDS,
    memory_mib: int = MEMORY_MIB,
    fork: bool = True,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> Result:
    rng = random.Random(seed)
    seeds = build_seeds(work / "seeds")
    bundle = work / "seeds" / "bundle.upk"
    result = Result()
    mutators, weights = zip(*MUTATORS)
    for i in range(iterations):
        kind = rng.choice(KINDS)
        member, partner = seeds[kind]
        case = work / f"case-{i}"
        case.mkdir()
        target = case / member.name
        if member.is_dir():
            shutil.copytree(member, target)
        else:
            shutil.copy(member, target)
        mutations = [rng.choices(mutators, weights)[0](rng, target if member.is_dir() else case)]
        while rng.random() < 0.4 and len(mutations) < 3:
            mutations.append(rng.choices(mutators, weights)[0](rng, target if member.is_dir() else case))
        # A mutation may have renamed the member itself (suffix): take whatever is in the case.
        entries = [p for p in case.iterdir() if not p.name.startswith(".")]
        given = entries[0] if len(entries) == 1 else target
        out = case / "out.upk"
        if kind != "peft" and rng.random() < 0.3:
            command = ["add", str(bundle), str(given), "--name", "new", "-o", str(out), "--force"]
        else:
            # A twin (a copy of the mutated member) as the partner too: members that agree on a
            # defect get past the checks that compare members, as far as the bundle writer.
            twin = _twin(given, case) if rng.random() < 0.3 else None
            command = ["merge", str(given), str(twin or partner), "-o", str(out), "--force", "-q"]
        outcome = run_cli(command, case, timeout=timeout, memory_mib=memory_mib, fork=fork)
        result.executions += 1
        verdict = judge(outcome)
        if verdict is None and outcome.rc == 0:
            check = run_cli(["verify", str(out)], case, timeout=timeout, memory_mib=memory_mib, fork=fork)
            result.executions += 1
            if check.rc != 0:
                verdict = f"wrote a bundle that verify refuses: {check.stderr.strip()[:160]}"
                outcome = check
        key = "finding" if verdict is not None else ("ok" if outcome.rc == 0 else "refused")
        result.outcomes[key] = result.outcomes.get(key, 0) + 1
        if verbose and log:
            said = outcome.stderr.strip().splitlines()[-1:] or [""]
            log(f"[{i}] {key:8s} {outcome.seconds:5.1f}s {'; '.join(mutations)} -> {said[0][:200]}")
        if verdict is not None:
            finding = Finding(verdict, command, mutations, outcome)
            if findings_dir is not None:
                finding.saved = _save(findings_dir, len(result.findings), case, finding)
            result.findings.append(finding)
            if log:
                log(f"[{i}] FINDING {verdict} <- {'; '.join(mutations)}")
        shutil.rmtree(case, ignore_errors=True)
    return result


def _twin(given: Path, case: Path) -> Path | None:
    """A copy of the mutated member beside it (None where it cannot be copied: a FIFO, a loop)."""
    twin = case / f"twin-{given.name}"  # another default member name
    try:
        # Links are copied as links: following one to /dev/zero would copy forever.
        if given.is_dir() and not given.is_symlink():
            shutil.copytree(given, twin, symlinks=True)
        else:
            shutil.copy(given, twin, follow_symlinks=False)
    except (OSError, shutil.Error):
        return None
    return twin


def _save(root: Path, n: int, case: Path, finding: Finding) -> Path:
    dest = root / f"finding-{n:03d}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        case,
        dest / "case",
        symlinks=True,
        ignore=shutil.ignore_patterns("out.upk"),
        copy_function=_copy_or_note,
        dirs_exist_ok=True,
    )
    (dest / "report.txt").write_text(
        f"signature: {finding.signature}\ncommand: unipack {' '.join(finding.command)}\n"
        f"mutations: {'; '.join(finding.mutations)}\nexit: {finding.outcome.rc}\n"
        f"seconds: {finding.outcome.seconds:.1f}\n--- stderr\n{finding.outcome.stderr}\n"
        f"--- stdout\n{finding.outcome.stdout[-4000:]}\n"
    )
    return dest


def _copy_or_note(src: str, dst: str) -> None:
    """Copy a file; a FIFO or device (which cannot be copied) is noted in ``DST.special``."""
    try:
        shutil.copy2(src, dst)
    except shutil.SpecialFileError:
        Path(dst + ".special").write_text(f"{src} was a FIFO or device (re-create it with mkfifo)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="seconds per run")
    parser.add_argument("--memory-mib", type=int, default=MEMORY_MIB, help="address space per run (MiB)")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-inputs-findings"))
    parser.add_argument("--subprocess", action="store_true", help="a fresh interpreter per run (slow)")
    parser.add_argument("--verbose", action="store_true", help="print every run's mutations and outcome")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked children must not inherit a thread pool
    import unipack.cli  # noqa: F401 - imported once, before forking

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-inputs-") as tmp:
        result = fuzz(
            args.iterations,
            args.seed,
            work=Path(tmp),
            findings_dir=args.findings,
            timeout=args.timeout,
            memory_mib=args.memory_mib,
            fork=not args.subprocess,
            log=print,
            verbose=args.verbose,
        )
    signatures: dict[str, int] = {}
    for f in result.findings:
        signatures[f.signature] = signatures.get(f.signature, 0) + 1
    print(
        f"executions: {result.executions} ({args.iterations} cases, seed {args.seed}, "
        f"{time.perf_counter() - started:.0f} s); outcomes: {result.outcomes}; findings: {len(result.findings)}"
        f" ({len(signatures)} distinct)"
    )
    for signature, count in sorted(signatures.items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d}  {signature}")
    if result.findings:
        print(f"saved under {args.findings}/")
    return 1 if result.findings else 0


if __name__ == "__main__":
    sys.exit(main())
