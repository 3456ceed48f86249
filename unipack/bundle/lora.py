"""Reading LoRA modules back from a bundle: PEFT factors, or dense updates on request.

A ``lora`` record stands for two keys of the adapter file, ``<module>.lora_A.weight`` (r x in)
and ``<module>.lora_B.weight`` (out x r). In the ``factors`` form they are the member's own
blobs; in the ``subspace`` form they are rebuilt from U, the member's core and V by
``core.lora_encode.peft_factors``, the same function the merge measured its errors with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from unipack.core.lora_encode import peft_factors
from unipack.format import dtypes
from unipack.format.manifest import Manifest, MemberRecord, TensorRecord

#: The prefix PEFT puts before a module's path in the base model.
PEFT_PREFIX = "base_model.model."

ReadBlob = Callable[[str], np.ndarray]


def factor_entries(t: TensorRecord, rec: MemberRecord) -> list[tuple[str, tuple[int, int]]]:
    """(key, shape) of the member's two factors of module ``t``; none if it does not touch it."""
    if t.name not in rec.lora:
        return []
    assert t.shape is not None
    rank = rec.lora[t.name][0]
    a_key, b_key = t.lora_keys
    return [(a_key, (rank, t.shape[1])), (b_key, (t.shape[0], rank))]


def factor_arrays(manifest: Manifest, read_blob: ReadBlob, t: TensorRecord, rec: MemberRecord,
                  core: np.ndarray | None) -> Iterator[tuple[TensorRecord, str, np.ndarray]]:
    """``(record named by the key, dtype, array)`` for A then B, held as ``holder(dtype)``.

    ``core`` is the member's core (float64, k_out x k_in) for a ``subspace`` module.
    """
    if t.name not in rec.lora:
        return
    dtype = rec.dtype_of(t)
    a_key, b_key = t.lora_keys
    if t.form == "factors":
        a_held, b_held = read_blob(rec.raw[a_key]), read_blob(rec.raw[b_key])
    else:
        rank, scale = rec.lora[t.name]
        u, v = subspace_bases(manifest, read_blob, t)
        b, a = peft_factors(u, _core_or_zeros(t, core), v, rank, scale, dtype)
        a_held, b_held = dtypes.from_float(a, dtype), dtypes.from_float(b, dtype)
    yield replace(t, name=a_key, shape=tuple(a_held.shape)), dtype, a_held
    yield replace(t, name=b_key, shape=tuple(b_held.shape)), dtype, b_held


def dense_update(manifest: Manifest, read_blob: ReadBlob, t: TensorRecord, rec: MemberRecord,
                 core: np.ndarray | None) -> np.ndarray:
    """The member's update ΔŴ of module ``t`` as float64, out x in: U C Vᵀ (the bundle's own
    reconstruction, before the extracted factors are rounded), or s B A for the factors form."""
    if t.form == "factors":
        rank, scale = rec.lora[t.name]
        dtype = rec.dtype_of(t)
        a_key, b_key = t.lora_keys
        a = dtypes.to_float(read_blob(rec.raw[a_key]), dtype)
        b = dtypes.to_float(read_blob(rec.raw[b_key]), dtype)
        return scale * (b @ a)
    u, v = subspace_bases(manifest, read_blob, t)
    core = _core_or_zeros(t, core)
    return (u @ core) @ v.T


def subspace_bases(manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
    """U (out x k_out) and V (in x k_in) as float64; empty when a rank is 0."""
    assert t.shape is not None and t.ranks is not None
    sides = []
    for name, dim, k in ((t.left, t.shape[0], t.ranks[0]), (t.right, t.shape[1], t.ranks[1])):
        if name is None:
            sides.append(np.zeros((dim, k)))
        else:
            sides.append(dtypes.to_float(read_blob(name), manifest.blobs[name].dtype))
    return sides[0], sides[1]


def update_key(module: str) -> str:
    """The base model's weight an update applies to: the module path without PEFT's prefix."""
    return f"{module.removeprefix(PEFT_PREFIX)}.weight"


def fan_in_fan_out(rec: MemberRecord) -> bool:
    """Whether the adapter's base layers store weights transposed (GPT-2's Conv1D): then the
    update is returned as ΔWᵀ, in the layout of the weight it is added to."""
    text = (rec.configs or {}).get("adapter_config.json")
    if text is None:
        return False
    try:
        return bool(json.loads(text).get("fan_in_fan_out", False))
    except (ValueError, AttributeError):
        return False


def _core_or_zeros(t: TensorRecord, core: np.ndarray | None) -> np.ndarray:
    assert t.ranks is not None
    return np.zeros(t.ranks) if core is None else core
