"""LoRA members read back as what a base model needs: the key of the weight an update applies to,
and its layout. (The factors and updates themselves come from the LoRA schemes.)"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from unipack.format.manifest import MemberRecord, TensorRecord
from unipack.schemes import MemberView, scheme_of

#: The prefix PEFT puts before a module's path in the base model.
PEFT_PREFIX = "base_model.model."


def update_key(module: str) -> str:
    """The base model's weight an update applies to: the module path without PEFT's prefix."""
    return f"{module.removeprefix(PEFT_PREFIX)}.weight"


def replaced_key(key: str) -> str:
    """The base model's tensor that an adapter's own tensor (a ``modules_to_save`` copy, a trained
    bias) replaces: its key without PEFT's prefix and without the ``base_layer`` level PEFT puts
    between a LoRA-wrapped layer and its own parameters."""
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


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


@dataclass(frozen=True)
class AdapterParts:
    """One adapter as changes to its base model's tensors, keyed by the base's own names.

    ``updates``: each weight the adapter adds a LoRA update to, with that module's record;
    ``replacements``: each tensor the adapter brings its own copy of (modules_to_save, biases),
    with its record. Shapes are known from the manifest; values are rebuilt one tensor at a time
    (a dense update is out x in: only the one asked for is held).
    """

    view: MemberView
    updates: dict[str, TensorRecord]
    replacements: dict[str, tuple[TensorRecord, str, tuple[int, ...]]]  # key -> (record, dtype, shape)
    transposed: bool  # fan_in_fan_out: updates in the weight's (in x out) layout

    @classmethod
    def of(cls, view: MemberView) -> AdapterParts:
        updates: dict[str, TensorRecord] = {}
        replacements: dict[str, tuple[TensorRecord, str, tuple[int, ...]]] = {}
        for t in view.manifest.tensors:
            scheme = scheme_of(t)
            if scheme.lora:
                if t.name in view.member.lora:
                    updates[update_key(t.name)] = t
                continue
            for name, dtype, shape in scheme.member_entries(t, view.member, view.manifest.blobs):
                replacements[replaced_key(name)] = (t, dtype, shape)
        return cls(view, updates, replacements, fan_in_fan_out(view.member))

    def update_shape(self, key: str) -> tuple[int, int]:
        """The shape of the update to weight ``key``, in the weight's layout."""
        shape = self.updates[key].shape
        assert shape is not None and len(shape) == 2  # a LoRA record's shape is [out, in] (checked on read)
        out_dim, in_dim = shape
        return (in_dim, out_dim) if self.transposed else (out_dim, in_dim)

    def update(self, key: str) -> np.ndarray:
        """The dense update ΔŴ = s·B·A to weight ``key`` in float64, in the weight's layout."""
        t = self.updates[key]
        update = scheme_of(t).member_update(self.view, t)
        assert update is not None  # the member touches every module in ``updates``
        return update.T if self.transposed else update

    def replacement(self, key: str) -> tuple[str, np.ndarray]:
        """``(dtype, array)`` of the adapter's own copy of tensor ``key``, held as ``holder(dtype)``."""
        t, dtype, _ = self.replacements[key]
        for got, got_dtype, array in scheme_of(t).member_arrays(self.view, t):
            if replaced_key(got.name) == key:
                return got_dtype, array
        raise KeyError(key)  # pragma: no cover - ``of`` listed it from the same record
