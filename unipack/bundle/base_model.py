"""The base model a bundle references but does not store (spec §11), given back at extraction.

A bundle merged with ``--base`` keeps, for its ``delta`` tensors centred on the base, only the base
tensor's name, dtype, shape and sha256. Reading such a member needs the base again: ``BaseModel``
opens it (any input a merge takes: a .safetensors file, a model folder, a .bin), checks every
referenced tensor's name, dtype and shape on open, and each tensor's sha256 every time it is read
(the safety net: a base of another revision would otherwise rebuild wrong members silently).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unipack.errors import InputError, OptionsError, UnipackError
from unipack.format import codec, dtypes
from unipack.format.manifest import BaseReference, Manifest, MemberRecord
from unipack.schemes import is_lora
from unipack.sources.checkpoint import Checkpoint, open_checkpoint

#: The option that gives the base, as the CLI spells it (messages tell the user what to type).
BASE_OPTION = "--base PATH"


def tensor_sha256(array: np.ndarray, dtype: str) -> str:
    """SHA-256 of a tensor's little-endian bytes in C order at its dtype (spec §9.1, §11.1)."""
    return codec.sha256(dtypes.byte_view(array, dtype))


def base_text(reference: BaseReference) -> str:
    """How messages name a referenced base: its recorded name, digest and size."""
    size = f"{reference.nbytes:,} bytes in {len(reference.tensors)} tensors"
    return f"{reference.source} (sha256 {reference.sha256[:12]}..., {size})"


def needs_base(manifest: Manifest, member: MemberRecord) -> list[str]:
    """The tensors of ``member`` rebuilt from the base model (centred on it, not held raw)."""
    return [t.name for t in manifest.tensors if t.params.base_centred(t) and t.name not in member.raw]


class BaseModel:
    """A base model given for a bundle: its referenced tensors, checked."""

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest, bundle: str) -> None:
        self.path = Path(path)
        if manifest.base is None and is_lora(manifest):
            raise OptionsError(
                f"{bundle}: holds LoRA adapters, which need no base to be read; a base model folds an adapter "
                f"in: extract --format hf --base (Python: extract_hf, to_module, export_onnx with base=)"
            )
        if manifest.base is None:
            # Neither meaning of --base applies: no referenced base, and no adapter to fold into one.
            raise OptionsError(
                f"{bundle}: references no base model (merged without --base) and holds full checkpoints, not "
                f"LoRA adapters to fold into a base; drop --base {self.path}"
            )
        self.reference = manifest.base
        self.bundle = bundle
        if not self.path.exists():
            raise InputError(f"{self.path}: --base: no such file or folder; give {base_text(self.reference)}")
        self._source: Checkpoint = open_checkpoint(self.path, "base")
        try:
            for name in self.reference.tensors:
                self._entry(name)
        except BaseException:
            self.close()
            raise

    def _entry(self, name: str) -> str:
        """The base's name for bundle tensor ``name``, its dtype and shape checked."""
        want = self.reference.tensors[name]
        info = self._source.tensors.get(want.name)
        if info is None:
            raise InputError(
                f"{self.path}: base model lacks tensor {want.name!r}, which {self.bundle} needs for {name!r}; "
                f"give {base_text(self.reference)}"
            )
        if info.dtype != want.dtype or tuple(info.shape) != want.shape:
            raise InputError(
                f"{self.path}: base tensor {want.name!r} is {info.dtype} {list(info.shape)}, {self.bundle} "
                f"needs {want.dtype} {list(want.shape)}; give {base_text(self.reference)}"
            )
        return want.name

    def read(self, name: str) -> np.ndarray:
        """The base's tensor for bundle tensor ``name`` (held as its dtype), its sha256 checked."""
        want = self.reference.tensors[name]
        try:
            array = self._source.read(self._entry(name))
        except InputError:
            raise
        except UnipackError as exc:
            raise InputError(f"{self.path}: cannot read base tensor {want.name!r} ({exc})") from None
        if tensor_sha256(array, want.dtype) != want.sha256:
            raise InputError(
                f"{self.path}: base tensor {want.name!r} does not match the sha256 {self.bundle} recorded "
                f"for it: another model or revision; give {base_text(self.reference)}"
            )
        return array

    def close(self) -> None:
        self._source.close()


def missing_base_message(bundle: str, member: str, reference: BaseReference, tensors: list[str]) -> str:
    """The one line for a member that needs the base when none was given."""
    return (
        f"{bundle}: member {member!r} is stored as deltas from a base model the bundle references but does "
        f"not hold ({len(tensors)} tensors, e.g. {tensors[0]!r}): pass {BASE_OPTION} with "
        f"{base_text(reference)} (Python: unipack.open(bundle, base=PATH))"
    )
