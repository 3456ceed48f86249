#!/usr/bin/env python3
"""Fuzz unipack's .upk bundle reader with mutated copies of valid seed bundles.

Usage::

    python tools/fuzz_upk.py --seconds 60 --seed 0 [--findings DIR]

Seeds are small valid bundles of different shapes (``SEED_SPECS``), built with ``unipack.merge``
from synthetic safetensors checkpoints (zstd/rows+flat, codec none, float16 + raw heads + int64
exact, rank 0, quantized deltas, the compressed manifest with its numbers section, deltas from a
referenced base model, the lossless tier with and without zstd-chunks blobs) and from synthetic
PEFT LoRA adapters (the forms subspace, factors, quant, cast and subspace-factored, cast and
quantized; an adapter added later, as overrides or in the record's form).
Each input is a seed after 1-3 mutations: byte-level (bit flips, byte overwrites, truncation,
extension, splicing, insert/delete) or structure-aware (edit the safetensors JSON header or the
manifest JSON: numbers to huge/negative/float, strings changed, keys deleted/duplicated, values
swapped, blob names swapped, shapes/dtypes/offsets changed). Structure-aware mutations
optionally re-fix the checksums a reader verifies first (blob ``sha256`` in the manifest,
``manifest_sha256``, the 8-byte header length) so that inputs reach deep code.

The target opens the input (with its base model where the bundle names a seed's), loads every
member with ``load_numpy`` (and bit for bit, ``exact=True``, where the member has a lossless tier;
a LoRA member's dense updates and its adapter parts too, as ``load(member, lora="updates")`` and
base-model folding read them), calls ``summary`` and closes it. The only allowed outcomes are
success or a ``unipack.UnipackError``; anything else (or an input taking more than ``--slow``
seconds) is a finding, saved under ``--findings`` (default ``fuzz-findings/``) as
``<key>-<n>.upk`` plus ``<key>-<n>.txt`` (traceback and the mutations applied). Findings are
deduplicated by exception type + innermost unipack frame.

The CLI runs the loop in a child process under ``RLIMIT_AS`` (``--memory-mib``, default 2048):
a MemoryError is a finding, and a child killed by a signal is reported as a crash.
Exit status: 0 if no findings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SLOW_SECONDS = 2.0  # an input slower than this is a finding
HANG_SECONDS = 20.0  # the target is interrupted after this long
MAX_SAVED_PER_KEY = 3


# ------------------------------------------------------------------------------------------
# seed bundles
# ------------------------------------------------------------------------------------------


def _population(
    rng: Any, n: int, *, dtype: str = "float32", heads: bool = False, ints: bool = False, twins: bool = False
) -> list[dict[str, Any]]:
    """``n`` checkpoints of one architecture. ``twins``: the last one is the first with one element
    of each float tensor changed, so that a lossless tier predicts it from that member rather than
    from the mean (a member base, spec 9.2), after the same draws."""
    import numpy as np

    base_w = rng.standard_normal((16, 12)).astype(np.float64)
    v = rng.standard_normal((12, 2))
    base_f = rng.standard_normal((4, 3, 5))
    dirs = rng.standard_normal((2, 4, 3, 5))
    members = []
    for i in range(n):
        a = rng.standard_normal((16, 2))
        c = rng.standard_normal(2)
        d = {
            "layer.0.weight": base_w + 0.1 * a @ v.T,
            "layer.0.bias": rng.standard_normal(12) * 0.01 + 1.0,
            "conv.kernel": base_f + 0.05 * np.tensordot(c, dirs, axes=1),
            # constant-ish: compresses well so zstd is actually used
            "norm.scale": np.ones((64,)) + (np.arange(64) % 4 == i % 4) * 0.25,
            "emb.weight": np.repeat(rng.standard_normal((1, 8)), 24, axis=0) + 0.001 * i,
        }
        out = {k: val.astype(dtype) for k, val in d.items()}
        if heads:
            out["head.weight"] = rng.standard_normal((3 + i, 12)).astype(dtype)
        if ints:
            out["position_ids"] = np.arange(40, dtype=np.int64).reshape(1, 40)  # identical: exact
            out["step"] = np.array([i * 7 + 1], dtype=np.int32)  # differs: raw
            out["mask"] = np.array([True, False, i % 2 == 0])
        members.append(out)
    if twins:
        twin = {k: val.copy() for k, val in members[0].items()}
        for val in twin.values():
            if val.dtype.kind == "f":
                val.reshape(-1)[0] += 1
        members[-1] = twin
    return members


#: LoRA seeds' modules: PEFT's key prefix, then each adapted module's path and [out, in].
LORA_PREFIX = "base_model.model."
LORA_SHAPES = {"layers.0.q": (24, 32), "layers.0.v": (24, 32), "layers.1.fc": (16, 24)}


def _adapters(
    rng: Any,
    directory: Path,
    n: int,
    *,
    ranks: tuple[int, ...] = (4,),
    k: int = 3,
    unshared: tuple[str, ...] = (),
    noise: float = 0.0,
    heads: bool = False,
    partial: bool = False,
    prefix: str = "ad",
) -> list[str]:
    """``n`` PEFT LoRA adapter folders (float32, written by hand as ``save_pretrained`` lays them
    out). Each module's updates share one k-dim column space and one row space across adapters
    (B = U X + noise, A = Y Vᵀ), so a subspace pays, except the modules in ``unshared``, whose
    factors are independent draws (nothing to share: the adapters' own factors pay). ``heads``: a
    ``modules_to_save`` head per adapter (raw records); ``partial``: the second adapter leaves the
    last module out and the third uses rsLoRA, so members differ in what they touch and how they
    scale it."""
    import numpy as np
    from safetensors.numpy import save_file

    spaces = {
        m: (rng.standard_normal((out, k)), rng.standard_normal((inn, k))) for m, (out, inn) in LORA_SHAPES.items()
    }
    paths = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        modules = list(LORA_SHAPES)[:-1] if partial and i == 1 else list(LORA_SHAPES)
        tensors = {}
        for m in modules:
            (out, inn), (u, v) = LORA_SHAPES[m], spaces[m]
            if m in unshared:
                a, b = rng.standard_normal((r, inn)), rng.standard_normal((out, r))
            else:
                b = u @ rng.standard_normal((k, r)) + noise * rng.standard_normal((out, r))
                a = rng.standard_normal((r, k)) @ v.T / np.sqrt(inn)
            tensors[f"{LORA_PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
            tensors[f"{LORA_PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        if heads:
            tensors[f"{LORA_PREFIX}head.weight"] = (0.1 * rng.standard_normal((3, 16))).astype(np.float32)
        folder = directory / f"{prefix}{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
            "modules_to_save": ["head"] if heads else None,
            "use_rslora": partial and i == 2,
            "rank_pattern": {},
            "alpha_pattern": {},
            "fan_in_fan_out": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "base_model_name_or_path": None,
            "task_type": None,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
        paths.append(str(folder))
    return paths


#: A population option (not a merge option): the members are LoRA adapters, ``_adapters``'s keywords.
ADAPTERS = "adapters"
#: A seed option (not a merge option): write the manifest compressed, with its numbers section.
PACKED = "packed"
#: A seed option: merge against a base model (``--base``: deltas from a referenced base, format
#: version 10), a perturbed copy of the first member's float tensors, written beside the seed.
BASED = "based"
#: A seed option: store blobs larger than this many bytes as ``zstd-chunks`` (format version 7;
#: the writer chunks only for a lossless tier, and only blobs over 4 MiB unless told smaller).
CHUNKED = "chunked"
#: A seed option: then ``unipack.add`` one adapter unrelated to the bundle's (random factors of
#: every module, ``_adapters(..., unshared=all)``): modules whose record cannot hold it within the
#: rule become its own factors (overrides, format version 8), the others join the record's form.
ADD_STRANGER = "add_stranger"
#: The seeds' base models, by the digest a bundle records for its base (``target`` opens a bundle
#: with the base it names, where one is known: a mutated digest finds none).
BASES: dict[str, Path] = {}
# Append new seeds at the end: a seed's index picks its random draws, and findings name seeds.
SEED_SPECS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # name, population kwargs, merge options
    ("zstd-rows-flat", {"n": 3}, {"codec": "zstd", "max_error": 0.05}),
    ("codec-none", {"n": 3}, {"codec": "none", "max_error": 0.05, "scheme": "flat"}),
    (
        "f16-raw-heads-int",
        {"n": 3, "dtype": "float16", "heads": True, "ints": True},
        {"dtype": "float16", "raw_mismatched": True, "max_error": 0.05},
    ),
    ("rank0", {"n": 2, "ints": True}, {"rank": 0}),
    ("rows-rank2-raw-glob", {"n": 4}, {"rank": 2, "scheme": "rows", "raw": ("conv.*",)}),
    # the compressed manifest and the members' numbers section (format version 9), whatever its size
    ("packed-numbers", {"n": 3}, {"max_error": 0.05, PACKED: True}),
    ("base-referenced", {"n": 4}, {"max_error": 0.05, BASED: True}),
    # the lossless tier (members' `exact` maps and residual blobs, format version 5; no lossless
    # baseline: measuring ZipNN's would import torch, seconds of seed building) ...
    (
        "lossless",
        {"n": 3, "dtype": "float16", "ints": True, "twins": True},
        {"max_error": 0.05, "exact_tier": True, "lossless": "off"},
    ),
    # ... with its blobs over 256 bytes as zstd-chunks (format version 7)
    ("lossless-chunks", {"n": 3}, {"max_error": 0.05, "exact_tier": True, "lossless": "off", CHUNKED: 256}),
    # LoRA (format version 2): subspace modules, a factors module, heads as raw records; then an
    # added unrelated adapter, kept as overrides (format version 8)
    (
        "lora-subspace-factors-override",
        {ADAPTERS: {"n": 5, "unshared": ("layers.1.fc",), "heads": True, "partial": True}},
        {"max_error": 0.05, "quantize": False, ADD_STRANGER: True},
    ),
    # the adapters' own factors quantized (format version 6), and an adapter added in that form
    ("lora-quant", {ADAPTERS: {"n": 4, "unshared": tuple(LORA_SHAPES)}}, {"max_error": 0.1, ADD_STRANGER: True}),
    # ... or cast to the coefficient dtype
    (
        "lora-cast",
        {ADAPTERS: {"n": 3, "unshared": tuple(LORA_SHAPES)}},
        {"max_error": 0.002, "dtype": "float16", "codec": "none"},
    ),
    # cores stored as their factors, cast (format version 11): many low-rank adapters in wide spaces
    (
        "lora-factored-cast",
        {ADAPTERS: {"n": 12, "ranks": (2, 3), "k": 12, "noise": 1e-4}},
        {"max_error": 0.01, "quantize": False},
    ),
    # ... and quantized
    (
        "lora-factored-quant",
        {ADAPTERS: {"n": 12, "ranks": (2,), "k": 6, "noise": 1e-4}},
        {"max_error": 0.05, "dtype": "float16"},
    ),
]


def _merge_seed(paths: list[str], out: Path, opts: dict[str, Any]) -> None:
    """``unipack.merge`` with the seed options that are not merge options applied."""
    import unipack
    from unipack.format import codec, container

    opts = dict(opts)
    packed, chunk_bytes = opts.pop(PACKED, False), opts.pop(CHUNKED, None)
    saved = container.COMPRESS_MANIFEST_ABOVE, codec.CHUNK_BYTES
    if packed:
        container.COMPRESS_MANIFEST_ABOVE = 0  # every manifest counts as large
    if chunk_bytes is not None:
        codec.CHUNK_BYTES = chunk_bytes
    try:
        unipack.merge(paths, out, force=True, **opts)
    finally:
        container.COMPRESS_MANIFEST_ABOVE, codec.CHUNK_BYTES = saved


def build_seeds(workdir: Path) -> list[tuple[str, bytes]]:
    """Write the synthetic checkpoints (or adapters) and merge them into one bundle per seed spec."""
    import numpy as np
    from safetensors.numpy import save_file

    import unipack

    seeds = []
    for idx, (name, pop, opts) in enumerate(SEED_SPECS):
        rng = np.random.default_rng(1000 + idx)
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        out = d / "bundle.upk"
        opts = dict(opts)
        stranger = opts.pop(ADD_STRANGER, False)
        if ADAPTERS in pop:
            paths = _adapters(rng, d, **pop[ADAPTERS])
        else:
            paths = []
            for i, tensors in enumerate(_population(rng, **pop)):
                p = d / f"member{i}.safetensors"
                save_file(tensors, str(p), metadata={"task": f"t{i}", "seed": name})
                paths.append(str(p))
        if opts.pop(BASED, False):
            first = _population(np.random.default_rng(1000 + idx), **pop)[0]
            noise = np.random.default_rng(7)
            base = {
                k: (v + 0.01 * noise.standard_normal(v.shape)).astype(v.dtype)
                for k, v in first.items()
                if v.dtype.kind == "f"
            }
            save_file(base, str(d / "base.safetensors"))
            opts["base"] = d / "base.safetensors"
            paths = paths[1:]
        _merge_seed(paths, out, opts)
        if stranger:
            heads = pop[ADAPTERS].get("heads", False)  # the bundle's adapters' non-LoRA tensors, as add requires
            (folder,) = _adapters(rng, d, 1, unshared=tuple(LORA_SHAPES), heads=heads, prefix="stranger")
            unipack.add(out, folder)
        data = out.read_bytes()
        if "base" in opts:
            with unipack.open(out) as b:
                assert b.manifest.base is not None, f"seed {name}: no tensor took its deltas from the base"
                BASES[b.manifest.base.sha256] = Path(opts["base"])
        # seeds must be valid: the target accepts them
        target(str(out))
        seeds.append((name, data))
    return seeds


# ------------------------------------------------------------------------------------------
# bundle structure helpers
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Parsed:
    header: dict[str, Any]  # the safetensors header, key order kept
    manifest: dict[str, Any] | None  # the manifest doc, or None if absent/unparseable
    data: bytes  # data section


def parse(buf: bytes) -> Parsed | None:
    try:
        (hlen,) = struct.unpack("<Q", buf[:8])
        header = json.loads(buf[8 : 8 + hlen])
        if not isinstance(header, dict):
            return None
        data = buf[8 + hlen :]
        manifest = None
        meta = header.get("__metadata__")
        if isinstance(meta, dict) and isinstance(meta.get("manifest"), str):
            try:
                manifest = json.loads(meta["manifest"])
            except ValueError:
                manifest = None
        return Parsed(header, manifest, data)
    except Exception:  # noqa: BLE001 - not parseable: byte-level mutations only
        return None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def serialize(
    p: Parsed,
    *,
    fix_manifest_sha: bool = True,
    manifest_text: str | None = None,
    header_text: str | None = None,
    pad: bool = True,
) -> bytes:
    """Assemble a bundle from parts; ``fix_manifest_sha`` recomputes ``manifest_sha256``."""
    header = p.header
    if manifest_text is None and p.manifest is not None:
        manifest_text = _dumps(p.manifest)
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and manifest_text is not None:
        meta["manifest"] = manifest_text
        if fix_manifest_sha:
            meta["manifest_sha256"] = hashlib.sha256(manifest_text.encode("utf-8")).hexdigest()
    body = (header_text if header_text is not None else _dumps(header)).encode("utf-8", "surrogatepass")
    if pad:
        body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body + p.data


def blob_names(p: Parsed) -> list[str]:
    return [k for k in p.header if k != "__metadata__"]


def refix_blob_sha(p: Parsed) -> None:
    """Recompute every manifest blob sha256 from the data section (as the header slices it)."""
    if p.manifest is None or not isinstance(p.manifest.get("blobs"), dict):
        return
    for name, spec in p.header.items():
        if name == "__metadata__" or not isinstance(spec, dict):
            continue
        off = spec.get("data_offsets")
        rec = p.manifest["blobs"].get(name)
        if isinstance(rec, dict) and isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off):
            rec["sha256"] = hashlib.sha256(p.data[off[0] : off[1]]).hexdigest()


# ------------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------------

INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    255,
    256,
    65535,
    2**31 - 1,
    2**31,
    2**32,
    2**53,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 1,
    10**30,
    -(2**63),
    -2,
]
INTERESTING_FLOATS = [0.5, -0.0, 1.5, 1e308, -1e308, 1e-320, 3.0, 2.0**64]
DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "I64",
    "I32",
    "I16",
    "I8",
    "U64",
    "U32",
    "U16",
    "U8",
    "BOOL",
    "f32",
    "F4",
    "",
    "complex64",
]
STRINGS = [
    "",
    "none",
    "zstd",
    "lz4",
    "shared",
    "raw",
    "exact",
    "rows",
    "flat",
    "left",
    "right",
    "up",
    "unipack.upk",
    "1",
    "2",
    "0",
    "x" * 300,
    "a/b",
    ".hidden",
    "\u0000",
    "\u00e9\u4e2d",
    "\ud800",
    "member0",
    "0" * 64,
    "g" * 64,
    "A" * 64,
]
TYPES = [None, True, False, [], {}, "", 0, -1, 1.5, [1, 2], {"a": 1}, [[]], "[]"]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """All paths (tuples of keys/indices) to nodes under ``doc`` (root excluded)."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append(prefix + (i,))
            out.extend(_paths(v, prefix + (i,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


def _new_value(rng: random.Random, old: Any, names: list[str]) -> Any:
    """A replacement for ``old``: usually same-kind but adversarial, sometimes another type."""
    r = rng.random()
    if r < 0.15:
        return rng.choice(TYPES)
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return rng.choice(
            [
                rng.choice(INTERESTING_INTS),
                old + rng.choice([-1, 1]),
                -old,
                old * 2,
                old + rng.randint(-100, 100),
                float(old),
                old + 0.5,
                old * 2**40,
            ]
        )
    if isinstance(old, float):
        return rng.choice(
            [rng.choice(INTERESTING_FLOATS), -old, int(old) if math.isfinite(old) else 0, old * 1e300, float("nan")]
        )
    if isinstance(old, str):
        if old in DTYPES:
            return rng.choice(DTYPES)
        if names and (old in names or rng.random() < 0.3):
            return rng.choice(names + ["missing/blob"])
        return rng.choice(STRINGS + [old + "x", old[:-1], old.upper()])
    if isinstance(old, list):
        choice = rng.randrange(6)
        if choice == 0 and old:
            return old[:-1]
        if choice == 1 and old:
            return old + [old[-1]]
        if choice == 2:
            return list(reversed(old))
        if choice == 3 and old and all(isinstance(x, int) and not isinstance(x, bool) for x in old):
            i = rng.randrange(len(old))
            new = list(old)
            new[i] = rng.choice(INTERESTING_INTS + [new[i] + 1, new[i] - 1, 0])
            return new
        if choice == 4:
            return [rng.choice(INTERESTING_INTS) for _ in range(rng.randint(0, 17))]
        return []
    if isinstance(old, dict):
        return rng.choice([{}, dict(list(old.items())[: max(0, len(old) - 1)]), None])
    return rng.choice(TYPES)


def mutate_json(rng: random.Random, doc: Any, names: list[str]) -> str:
    """Mutate a JSON doc in place; returns a description."""
    paths = _paths(doc)
    if not paths:
        return "json: empty"
    path = rng.choice(paths)
    parent = _get(doc, path[:-1])
    key = path[-1]
    old = parent[key]
    op = rng.randrange(10)
    if op <= 4:
        new = _new_value(rng, old, names)
        parent[key] = new
        return f"set {list(path)} {_short(old)} -> {_short(new)}"
    if op == 5:
        if isinstance(parent, dict):
            del parent[key]
        else:
            del parent[key]
        return f"delete {list(path)}"
    if op == 6 and isinstance(parent, dict):
        # rename a key (e.g. a blob name, a tensor name in a map)
        new_key = rng.choice(names + [key + "_", "", str(key).upper(), "x"]) if names else key + "_"
        if new_key not in parent:
            items = [(new_key if k == key else k, v) for k, v in parent.items()]
            parent.clear()
            parent.update(items)
            return f"rename key {list(path)} -> {new_key!r}"
    if op == 7:
        # swap two values of the same kind somewhere in the document
        other = rng.choice(paths)
        try:
            a, b = _get(doc, path), _get(doc, other)
            if not _is_ancestor(path, other) and not _is_ancestor(other, path):
                _set(doc, path, b)
                _set(doc, other, a)
                return f"swap {list(path)} <-> {list(other)}"
        except (KeyError, IndexError, TypeError):
            pass
    if op == 8 and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(old)))
        return f"duplicate list item {list(path)}"
    if op == 9 and isinstance(parent, dict):
        # move the key to the end (changes data order of header entries, member/blob order)
        parent[key] = parent.pop(key)
        return f"reorder key {list(path)} to end"
    new = _new_value(rng, old, names)
    parent[key] = new
    return f"set {list(path)} {_short(old)} -> {_short(new)}"


def _is_ancestor(a: tuple, b: tuple) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=True) if not isinstance(v, float) or not math.isnan(v) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _dup_key_text(rng: random.Random, text: str) -> tuple[str, str]:
    """Duplicate one `"key":` occurrence textually (JSON with a duplicate key)."""
    import re

    keys = [m for m in re.finditer(r'"([^"\\]{1,80})":("[^"\\]{0,80}"|-?\d+|true|false|null)', text)]
    if not keys:
        return text, "dupkey: none"
    m = rng.choice(keys)
    return text[: m.end()] + "," + m.group(0) + text[m.end() :], f"duplicate key {m.group(1)!r}"


class Mutator:
    def __init__(self, seeds: list[tuple[str, bytes]], rng: random.Random) -> None:
        self.seeds = seeds
        self.rng = rng
        self.parsed = {name: parse(b) for name, b in seeds}

    # --- byte-level -------------------------------------------------------------------------

    def _byte_mutation(self, buf: bytearray) -> str:
        rng = self.rng
        n = len(buf)
        op = rng.randrange(8)
        if op == 0 and n:
            i = rng.randrange(n)
            bit = rng.randrange(8)
            buf[i] ^= 1 << bit
            return f"flip bit {bit} at {i}"
        if op == 1 and n:
            i = rng.randrange(n)
            k = rng.randint(1, min(8, n - i))
            val = bytes(rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)]) for _ in range(k))
            buf[i : i + k] = val
            return f"overwrite {k} bytes at {i} with {val.hex()}"
        if op == 2:
            k = rng.choice([0, 1, 7, 8, 9, rng.randrange(n + 1), max(0, n - rng.randint(1, 64))])
            del buf[k:]
            return f"truncate to {k} bytes"
        if op == 3:
            k = rng.choice([1, 8, 64, rng.randint(1, 4096)])
            buf.extend(bytes(rng.randrange(256) for _ in range(min(k, 64))) * (k // 64 + 1))
            return f"extend by ~{k} bytes"
        if op == 4 and n:
            other = rng.choice(self.seeds)[1]
            i, j = rng.randrange(n), rng.randrange(len(other))
            k = rng.randint(1, 512)
            buf[i : i + k] = other[j : j + k]
            return f"splice {k} bytes from another seed at {j} into {i}"
        if op == 5 and n:
            i = rng.randrange(n)
            k = rng.randint(1, 32)
            del buf[i : i + k]
            return f"delete {k} bytes at {i}"
        if op == 6 and n:
            i = rng.randrange(n)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            return f"insert bytes at {i}"
        # header length prefix
        v = rng.choice(INTERESTING_INTS + [int.from_bytes(buf[:8].ljust(8, b"\0"), "little") + rng.randint(-9, 9)])
        buf[:8] = (v % 2**64).to_bytes(8, "little")
        return f"set header length to {v % 2**64}"

    # --- structure-aware --------------------------------------------------------------------

    def _structured(self, seed_name: str) -> tuple[bytes, list[str]]:
        rng = self.rng
        base = self.parsed[seed_name]
        assert base is not None
        p = Parsed(json.loads(json.dumps(base.header)), json.loads(json.dumps(base.manifest)), base.data)
        names = blob_names(p)
        if p.manifest is not None:
            names = (
                names
                + [
                    t.get("name")
                    for t in p.manifest.get("tensors", [])
                    if isinstance(t, dict) and isinstance(t.get("name"), str)
                ]
                + [
                    m.get("name")
                    for m in p.manifest.get("members", [])
                    if isinstance(m, dict) and isinstance(m.get("name"), str)
                ]
            )
        desc = []
        target = rng.random()
        n_ops = rng.choice([1, 1, 1, 2, 3])
        for _ in range(n_ops):
            if target < 0.6 and p.manifest is not None:
                desc.append("manifest: " + mutate_json(rng, p.manifest, names))
            elif target < 0.75:
                desc.append("data: " + self._data_mutation(p))
            elif target < 0.8:
                desc.append("header+manifest: " + self._coherent_blob_edit(p))
            elif target < 0.85:
                desc.append("rename: " + self._coherent_rename(p, names))
            elif target < 0.88:
                desc.append("zstd: " + self._zstd_size(p))
            else:
                desc.append("header: " + mutate_json(rng, p.header, names))
        if rng.random() < 0.7:
            refix_blob_sha(p)
            desc.append("refix blob sha256")
        fix_sha = rng.random() < 0.9
        if not fix_sha:
            desc.append("manifest_sha256 NOT refixed")
        manifest_text = None
        if p.manifest is not None and rng.random() < 0.08:
            manifest_text, d = _dup_key_text(rng, _dumps(p.manifest))
            desc.append("manifest text: " + d)
        header_text = None
        if rng.random() < 0.04:
            if manifest_text is None and p.manifest is not None:
                manifest_text = _dumps(p.manifest)
            meta = p.header.get("__metadata__")
            if isinstance(meta, dict) and manifest_text is not None:
                meta["manifest"] = manifest_text
                if fix_sha:
                    meta["manifest_sha256"] = hashlib.sha256(manifest_text.encode("utf-8", "surrogatepass")).hexdigest()
            header_text, d = _dup_key_text(rng, _dumps(p.header))
            desc.append("header text: " + d)
        try:
            out = serialize(
                p,
                fix_manifest_sha=fix_sha,
                manifest_text=manifest_text,
                header_text=header_text,
                pad=rng.random() < 0.9,
            )
        except (UnicodeEncodeError, ValueError) as exc:
            return self.seeds_by_name(seed_name), desc + [f"serialize failed ({exc}); seed used"]
        return out, desc

    def seeds_by_name(self, name: str) -> bytes:
        return dict(self.seeds)[name]

    def _data_mutation(self, p: Parsed) -> str:
        """Mutate bytes inside one blob (kept in place, so offsets stay valid)."""
        rng = self.rng
        names = [k for k, v in p.header.items() if k != "__metadata__" and isinstance(v, dict)]
        if not names:
            return "no blobs"
        name = rng.choice(names)
        b, e = p.header[name]["data_offsets"]
        data = bytearray(p.data)
        if e <= b:
            return f"blob {name!r} empty"
        op = rng.randrange(4)
        if op == 0:
            i = rng.randrange(b, e)
            data[i] ^= 1 << rng.randrange(8)
            d = f"flip a bit of blob {name!r} at +{i - b}"
        elif op == 1:
            k = rng.randint(1, min(18, e - b))
            i = rng.randrange(b, e - k + 1)
            data[i : i + k] = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(k))
            d = f"overwrite {k} bytes of blob {name!r} at +{i - b}"
        elif op == 2:
            # NaN/Inf patterns into float data
            pat = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x7c", b"\xff\xff\xff\xff"])
            i = rng.randrange(b, max(b + 1, e - len(pat) + 1))
            data[i : i + len(pat)] = pat
            data = data[: len(p.data)]
            d = f"write {pat.hex()} into blob {name!r} at +{i - b}"
        else:
            # zstd frame header: frame header descriptor / content size bytes
            i = rng.randrange(b, min(e, b + 18))
            data[i] = rng.randrange(256)
            d = f"overwrite blob {name!r} byte +{i - b} (frame header)"
        p.data = bytes(data)
        return d

    def _coherent_blob_edit(self, p: Parsed) -> str:
        """Change a blob's shape/dtype in BOTH header and manifest (and resize its bytes), so the
        layout checks pass and the inconsistency must be caught by reference checks."""
        rng = self.rng
        if p.manifest is None or not isinstance(p.manifest.get("blobs"), dict):
            return "no manifest"
        blobs = p.manifest["blobs"]
        names = [k for k in blob_names(p) if isinstance(blobs.get(k), dict) and isinstance(p.header[k], dict)]
        if not names:
            return "no blobs"
        name = rng.choice(names)
        rec = blobs[name]
        entry = p.header[name]
        op = rng.randrange(3)
        itemsizes = {
            "F64": 8,
            "F32": 4,
            "F16": 2,
            "BF16": 2,
            "I64": 8,
            "I32": 4,
            "I16": 2,
            "I8": 1,
            "U64": 8,
            "U32": 4,
            "U16": 2,
            "U8": 1,
            "BOOL": 1,
            "F8_E4M3": 1,
            "F8_E5M2": 1,
        }
        if rec.get("codec") != "none":
            # compressed: change logical shape/dtype only (stored bytes unchanged)
            if op == 0:
                rec["dtype"] = rng.choice(list(itemsizes))
                return f"compressed blob {name!r}: logical dtype -> {rec['dtype']}"
            shape = list(rec.get("shape", []))
            if op == 1 and shape:
                shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 2**31, 2**40])
            else:
                shape = rng.choice([[], [1], [0], list(reversed(shape)), shape + [1], [2**20, 2**20]])
            rec["shape"] = shape
            return f"compressed blob {name!r}: logical shape -> {shape}"
        dtype = entry.get("dtype")
        shape = list(entry.get("shape", []))
        if op == 0:
            new_dtype = rng.choice([d for d, s in itemsizes.items() if s == itemsizes.get(dtype)] or ["F32"])
            new_shape = shape
        elif op == 1:
            new_dtype = dtype
            new_shape = rng.choice(
                [
                    [],
                    [0],
                    [1],
                    shape[::-1],
                    shape + [1],
                    [1] + shape,
                    shape[:-1],
                    [max(1, _prod(shape) // 2), 2] if _prod(shape) % 2 == 0 else [0],
                ]
            )
        else:
            new_dtype = rng.choice(list(itemsizes))
            numel = _prod(shape) * itemsizes.get(dtype, 1)
            isz = itemsizes[new_dtype]
            new_shape = [numel // isz] if numel % isz == 0 else [0]
        # rebuild this blob's bytes to the new size and shift the rest of the data section
        isz = itemsizes.get(new_dtype, 1)
        new_len = _prod(new_shape) * isz
        if new_len > 1 << 20:
            return "too large, skipped"
        b, e = entry["data_offsets"]
        old_bytes = p.data[b:e]
        new_bytes = (old_bytes * (new_len // max(1, len(old_bytes)) + 1))[:new_len] if old_bytes else bytes(new_len)
        delta = new_len - (e - b)
        p.data = p.data[:b] + new_bytes + p.data[e:]
        for k, v in p.header.items():
            if k == "__metadata__" or not isinstance(v, dict):
                continue
            ob, oe = v["data_offsets"]
            if k == name:
                v["data_offsets"] = [b, b + new_len]
            elif ob >= e:
                v["data_offsets"] = [ob + delta, oe + delta]
        entry["dtype"], entry["shape"] = new_dtype, new_shape
        rec["dtype"], rec["shape"] = new_dtype, new_shape
        return f"blob {name!r}: {dtype}{shape} -> {new_dtype}{new_shape} in header and manifest"

    def _replace_blob_bytes(self, p: Parsed, name: str, new_bytes: bytes) -> None:
        """Put ``new_bytes`` as blob ``name``'s stored bytes, shifting later blobs' offsets."""
        entry = p.header[name]
        b, e = entry["data_offsets"]
        delta = len(new_bytes) - (e - b)
        p.data = p.data[:b] + new_bytes + p.data[e:]
        for k, v in p.header.items():
            if k == "__metadata__" or not isinstance(v, dict):
                continue
            ob, oe = v["data_offsets"]
            if k == name:
                v["data_offsets"] = [b, b + len(new_bytes)]
            elif ob >= e:
                v["data_offsets"] = [ob + delta, oe + delta]

    def _zstd_size(self, p: Parsed) -> str:
        """Rewrite a zstd blob's frame-header content size AND the manifest's logical shape to
        agree (a tiny file declaring a huge blob), or append a second/skippable frame."""
        rng = self.rng
        if p.manifest is None:
            return "no manifest"
        blobs = p.manifest.get("blobs", {})
        names = [k for k in blob_names(p) if isinstance(blobs.get(k), dict) and blobs[k].get("codec") == "zstd"]
        if not names:
            return "no zstd blobs"
        name = rng.choice(names)
        rec = blobs[name]
        b, e = p.header[name]["data_offsets"]
        frame = p.data[b:e]
        if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
            return "not a frame"
        op = rng.randrange(3)
        if op == 1:
            extra = rng.choice([frame, b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd", b"\x00"])
            self._replace_blob_bytes(p, name, frame + extra)
            p.header[name]["shape"] = [len(frame) + len(extra)]
            return f"append {len(extra)} bytes (frame/skippable) after blob {name!r}'s zstd frame"
        fhd = frame[4]
        single = (fhd >> 5) & 1
        fcs_flag = fhd >> 6
        pos = 5 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3]
        fcs_len = [1 if single else 0, 2, 4, 8][fcs_flag]
        itemsize = {
            "F64": 8,
            "F32": 4,
            "F16": 2,
            "BF16": 2,
            "I64": 8,
            "I32": 4,
            "I16": 2,
            "U16": 2,
            "U32": 4,
            "U64": 8,
        }.get(rec.get("dtype"), 1)
        numel = rng.choice([0, 1, 2**20, 2**26, 2**28, 2**31, 2**36, 2**50])
        if op == 2 and isinstance(rec.get("shape"), list):
            numel = _prod(rec["shape"]) + rng.choice([-1, 1, 2])  # off by a little
        numel = max(0, numel)
        rec["shape"] = [numel]
        # keep the referencing records coherent so the declared size reaches the decoder
        for t in p.manifest.get("tensors", []):
            if not isinstance(t, dict):
                continue
            if name in (t.get("blob"), t.get("mean")):
                t["shape"] = [numel]
                if t.get("scheme") == "rows":
                    t["matrix"] = [numel, 1]
            elif t.get("storage") == "raw" and any(
                isinstance(m, dict) and isinstance(m.get("raw"), dict) and name in m["raw"].values()
                for m in p.manifest.get("members", [])
            ):
                t["shape"] = None
        size = numel * itemsize
        new = (
            frame[:4]
            + bytes([(3 << 6) | (fhd & 0x3F)])
            + frame[5:pos]
            + (size % 2**64).to_bytes(8, "little")
            + frame[pos + fcs_len :]
        )
        self._replace_blob_bytes(p, name, new)
        p.header[name]["shape"] = [len(new)]
        return f"blob {name!r}: zstd content size and manifest shape -> [{numel}] ({size} bytes)"

    def _coherent_rename(self, p: Parsed, names: list[str]) -> str:
        """Rename a blob (or swap two blob names) everywhere: header key, manifest blobs key and
        every manifest reference, so the bundle stays consistent (readers must not depend on names)."""
        rng = self.rng
        blobs = blob_names(p)
        if not blobs or p.manifest is None:
            return "nothing to rename"
        a = rng.choice(blobs)
        if rng.random() < 0.5 and len(blobs) > 1:
            b = rng.choice([x for x in blobs if x != a])
            mapping = {a: b, b: a}
            d = f"swap blob names {a!r} <-> {b!r} everywhere"
        else:
            new = rng.choice(
                [
                    "x",
                    "",
                    "mean",
                    "basis/",
                    "/",
                    "exact",
                    "raw/9/zz",
                    "foo/bar",
                    a + "/",
                    "\u00e9",
                    "coef/0x",
                    "mean" + a,
                ]
            )
            if new in blobs:
                return "rename collision"
            mapping = {a: new}
            d = f"rename blob {a!r} -> {new!r} everywhere"

        def walk(x: Any) -> Any:
            if isinstance(x, dict):
                return {mapping.get(k, k) if k in mapping and x is blobs_doc else k: walk(v) for k, v in x.items()}
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, str):
                return mapping.get(x, x)
            return x

        blobs_doc = p.manifest.get("blobs")
        other = {k: walk(v) for k, v in p.manifest.items() if k != "blobs"}
        if isinstance(blobs_doc, dict):
            other["blobs"] = {mapping.get(k, k): v for k, v in blobs_doc.items()}
        p.manifest = other
        hdr = {mapping.get(k, k) if k != "__metadata__" else k: v for k, v in p.header.items()}
        p.header.clear()
        p.header.update(hdr)
        return d

    # --- entry point ------------------------------------------------------------------------

    def mutate(self) -> tuple[bytes, str, list[str]]:
        rng = self.rng
        seed_name, seed = rng.choice(self.seeds)
        if rng.random() < 0.55 and self.parsed[seed_name] is not None:
            out, desc = self._structured(seed_name)
            if rng.random() < 0.1:
                buf = bytearray(out)
                desc.append(self._byte_mutation(buf))
                out = bytes(buf)
            return out, seed_name, desc
        buf = bytearray(seed)
        desc = [self._byte_mutation(buf) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        return bytes(buf), seed_name, desc


def _prod(xs: list[Any]) -> int:
    n = 1
    for x in xs:
        n *= x if isinstance(x, int) else 1
    return n


# ------------------------------------------------------------------------------------------
# the target and the loop
# ------------------------------------------------------------------------------------------


class _Hang(BaseException):
    """Raised by the alarm when one input runs past HANG_SECONDS (BaseException: not swallowed)."""


def target(path: str) -> None:
    import unipack

    b = unipack.open(path)
    base = BASES.get(b.manifest.base.sha256) if b.manifest.base is not None else None
    if base is not None:  # a seed's base: opened with it, as its user would
        b.close()
        b = unipack.open(path, base=base)
    try:
        for member in b.members:
            b.load_numpy(member)
            if b.member(member).exact is not None:  # the lossless tier: what `extract --exact` reads
                b.load_numpy(member, exact=True)
            if b.is_lora:  # what `load(member, lora="updates")` and base-model folding read
                for _ in b.iter_updates(member):
                    pass
                parts = b.adapter_parts(member)
                for key in parts.replacements:
                    parts.replacement(key)
        b.summary()
    finally:
        b.close()


@dataclasses.dataclass
class Finding:
    key: str
    exc_type: str
    where: str
    message: str
    count: int = 0
    example_desc: list[str] = dataclasses.field(default_factory=list)
    example_seed: str = ""
    files: list[str] = dataclasses.field(default_factory=list)


def _innermost_unipack_frame(tb: Any) -> str:
    frames = traceback.extract_tb(tb)
    where = "<no unipack frame>"
    for fr in frames:
        norm = fr.filename.replace("\\", "/")
        if "/unipack/" in norm and "/tools/" not in norm:
            rel = norm[norm.rindex("/unipack/") + 1 :]
            where = f"{rel}:{fr.lineno} in {fr.name}"
    return where


@dataclasses.dataclass
class FuzzResult:
    executions: int
    seconds: float
    findings: dict[str, Finding]
    ok: int = 0
    rejected: int = 0
    mutator_failures: int = 0

    @property
    def exec_per_s(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"executions: {self.executions}",
            f"seconds: {self.seconds:.1f}",
            f"exec/s: {self.exec_per_s:.1f}",
            (
                f"outcomes: {self.ok} accepted, {self.rejected} rejected with UnipackError "
                f"({self.mutator_failures} mutator failures fell back to a seed)"
            ),
            f"findings: {len(self.findings)} unique",
        ]
        for f in sorted(self.findings.values(), key=lambda f: -f.count):
            lines.append(f"  [{f.count}x] {f.exc_type} at {f.where}: {f.message[:200]}")
            lines.append(f"        seed={f.example_seed}; mutations: {' | '.join(f.example_desc)[:400]}")
            if f.files:
                lines.append(f"        saved: {f.files[0]}")
        return "\n".join(lines)


def run_one(data: bytes, path: str) -> tuple[str, BaseException | None, float]:
    """Run the target on ``data``; returns (outcome, exception, seconds). outcome: ok|rejected|bug|hang."""
    import unipack

    with open(path, "wb") as f:
        f.write(data)
    use_alarm = hasattr(signal, "setitimer") and _in_main_thread()
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    t0 = time.perf_counter()
    try:
        target(path)
        return "ok", None, time.perf_counter() - t0
    except unipack.UnipackError as exc:
        return "rejected", exc, time.perf_counter() - t0
    except _Hang as exc:
        return "hang", exc, time.perf_counter() - t0
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - everything else is a finding
        return "bug", exc, time.perf_counter() - t0
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"input ran longer than {HANG_SECONDS} s")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def fuzz(
    seconds: float,
    seed: int,
    findings_dir: str | os.PathLike[str] | None = "fuzz-findings",
    *,
    max_execs: int | None = None,
    log: Callable[[str], None] | None = None,
    slow_seconds: float = SLOW_SECONDS,
) -> FuzzResult:
    """Fuzz for ``seconds`` (or ``max_execs`` inputs) with a fixed ``seed``; in-process."""
    import warnings

    warnings.simplefilter("ignore")  # numpy overflow warnings on garbage data are not findings
    rng = random.Random(seed)
    fdir = Path(findings_dir) if findings_dir is not None else None
    findings: dict[str, Finding] = {}
    with tempfile.TemporaryDirectory(prefix="fuzz-upk-") as tmp:
        seeds = build_seeds(Path(tmp) / "seeds")
        mutator = Mutator(seeds, rng)
        # the parent CLI sets FUZZ_UPK_CURRENT so it can keep the input of a crashed child
        path = os.environ.get("FUZZ_UPK_CURRENT") or os.path.join(tmp, "input.upk")
        start = time.perf_counter()
        last_log = start
        execs = ok = rejected = mutator_failures = 0
        while True:
            now = time.perf_counter()
            if now - start >= seconds or (max_execs is not None and execs >= max_execs):
                break
            try:
                data, seed_name, desc = mutator.mutate()
            except Exception as exc:  # noqa: BLE001 - a bug in the mutator, not in unipack: use an unmutated seed
                seed_name, data = rng.choice(mutator.seeds)
                desc = [f"mutator failed ({type(exc).__name__}: {exc}); unmutated seed"]
                mutator_failures += 1
            outcome, exc, took = run_one(data, path)
            execs += 1
            ok += outcome == "ok"
            rejected += outcome == "rejected"
            if outcome in ("ok", "rejected") and took <= slow_seconds:
                pass
            else:
                if outcome in ("bug", "hang"):
                    assert exc is not None
                    exc_type = type(exc).__name__ if outcome == "bug" else "Hang"
                    where = _innermost_unipack_frame(exc.__traceback__)
                    message = str(exc)
                    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                else:
                    exc_type = "Slow"
                    where = _innermost_unipack_frame(exc.__traceback__) if exc is not None else "<completed>"
                    message = f"took {took:.2f} s (> {slow_seconds} s), outcome {outcome}"
                    tb_text = message + "\n"
                key = f"{exc_type}@{where.split(' in ')[0]}"
                f = findings.setdefault(key, Finding(key, exc_type, where, message))
                f.count += 1
                if f.count == 1:
                    f.example_desc, f.example_seed = desc, seed_name
                if fdir is not None and len(f.files) < MAX_SAVED_PER_KEY:
                    fdir.mkdir(parents=True, exist_ok=True)
                    stem = _slug(key) + f"-{len(f.files)}"
                    (fdir / f"{stem}.upk").write_bytes(data)
                    (fdir / f"{stem}.txt").write_text(
                        f"key: {key}\nseed bundle: {seed_name}\nmutations:\n  "
                        + "\n  ".join(desc)
                        + f"\ntook: {took:.3f} s\n\n{tb_text}",
                        encoding="utf-8",
                    )
                    f.files.append(str(fdir / f"{stem}.upk"))
                if f.count == 1 and log is not None:
                    log(f"NEW FINDING {key}: {exc_type}: {message[:160]}")
            if log is not None and now - last_log > 30:
                last_log = now
                log(f"... {execs} execs, {execs / (now - start):.0f}/s, {len(findings)} findings")
        elapsed = time.perf_counter() - start
    return FuzzResult(execs, elapsed, findings, ok, rejected, mutator_failures)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:120]


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def _limit_memory(mib: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        limit = mib * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings", default="fuzz-findings")
    ap.add_argument("--memory-mib", type=int, default=2048, help="RLIMIT_AS of the fuzzing child (0: none)")
    ap.add_argument("--slow", type=float, default=SLOW_SECONDS, help="seconds after which an input is a finding")
    ap.add_argument("--max-execs", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child or args.memory_mib <= 0:

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        res = fuzz(args.seconds, args.seed, args.findings, max_execs=args.max_execs, log=log, slow_seconds=args.slow)
        print(res.summary(), flush=True)
        return 1 if res.findings else 0

    # parent: re-run this script as a memory-limited child
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--seconds",
        str(args.seconds),
        "--seed",
        str(args.seed),
        "--findings",
        args.findings,
        "--slow",
        str(args.slow),
    ]
    if args.max_execs is not None:
        cmd += ["--max-execs", str(args.max_execs)]
    with tempfile.TemporaryDirectory(prefix="fuzz-upk-parent-") as tmp:
        current = os.path.join(tmp, "current.upk")
        env = dict(
            os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", FUZZ_UPK_CURRENT=current
        )
        proc = subprocess.run(cmd, check=False, preexec_fn=_limit_memory(args.memory_mib), env=env)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            saved = "(no input file)"
            if os.path.exists(current):
                Path(args.findings).mkdir(parents=True, exist_ok=True)
                saved = os.path.join(args.findings, f"crash-{sig}.upk")
                Path(saved).write_bytes(Path(current).read_bytes())
            print(f"findings: CRASH: fuzzing child killed by signal {sig}; input saved to {saved}", file=sys.stderr)
            return 1
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
