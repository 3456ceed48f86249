"""The scheme registry: name -> scheme; every reader of records dispatches through ``scheme_of``."""

from __future__ import annotations

from unipack.format.manifest import Manifest, TensorRecord
from unipack.format.manifest.storages import register_format
from unipack.schemes.base import Scheme

#: Registered schemes, in registration order (the manifest lists choices in this order).
SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Make ``scheme`` known to the manifest reader and to everything that reads records."""
    register_format(scheme)
    SCHEMES[scheme.name] = scheme
    return scheme


def scheme_of(t: TensorRecord) -> Scheme:
    return SCHEMES[t.params.scheme_name]


def is_lora(manifest: Manifest) -> bool:
    """Whether the bundle holds PEFT LoRA adapters (its members are adapters, not models)."""
    return any(scheme_of(t).lora for t in manifest.tensors)
