"""LoRA members read back as what a base model needs: the key of the weight an update applies to,
and its layout. (The factors and updates themselves come from the LoRA schemes.)"""

from __future__ import annotations

import json

from unipack.format.manifest import MemberRecord

#: The prefix PEFT puts before a module's path in the base model.
PEFT_PREFIX = "base_model.model."


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
