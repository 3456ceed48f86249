"""What every input source offers: tensor names, dtypes and shapes up front, one tensor on demand.

A source is where a member's tensors come from: one ``.safetensors`` file, a PyTorch ``.bin``/
``.pt`` state dict, or a Hugging Face model folder (one or several weight files of either kind).
A dense merge needs only this much of it, so it never knows which kind it is reading; a PEFT
adapter folder (``PeftAdapterSource``) adds its LoRA modules, which the LoRA merge reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from unipack.errors import FormatError, InputError
from unipack.format.manifest import MAX_TENSOR_NAME_CHARS, check_tensor_name
from unipack.sources.url import InputPath

#: The largest magnitude of a value unipack decomposes (2**40, about 1.1e12). Beyond it, sums of
#: squares and products overflow: a member's deltas are multiplied in float32 (whose largest
#: value is 3.4e38, about (2**64)**2), and sums of squares of float64 values past ~1e154
#: overflow float64. Weights are never near it (float16 stops at 65504); a tensor past it is
#: refused where it would be decomposed, naming the way to store it raw instead.
MAX_MAGNITUDE = 2.0**40


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype (a safetensors dtype name: ``F32``, ``BF16``, ``I64`` ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource(Protocol):
    """One member's tensors, readable one at a time (never all of a large file at once)."""

    @property
    def path(self) -> InputPath:
        """The file or folder the user named (a ``Url`` for one read from remote storage)."""

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor, in the order the source stores them."""

    @property
    def file_size(self) -> int:
        """Bytes on disk of the weights (for a folder, the sum of its weight files)."""

    @property
    def metadata(self) -> dict[str, str] | None:
        """The safetensors ``__metadata__`` (a folder's first shard's), or None."""

    @property
    def configs(self) -> dict[str, str] | None:
        """A Hugging Face folder's small config files, file name -> exact text; None for files."""

    @property
    def files(self) -> tuple[tuple[InputPath, int], ...]:
        """Each weight file with its size in bytes (one for a file, each shard for a folder)."""

    def read(self, name: str) -> np.ndarray:
        """The tensor's array, held as ``format.dtypes.holder(dtype)``."""

    def close(self) -> None:
        """Release open files and loaded tensors."""


def check_tensor_key(name: str, path: InputPath) -> str:
    """``name`` if a bundle may hold it as a tensor name; else an InputError naming the input.

    The verdict is the bundle reader's own (``format.manifest.check_tensor_name``): a name the
    reader would refuse is refused here, before a merge writes a bundle nothing can open.
    """
    try:
        check_tensor_name(name, "tensor name")
    except FormatError:
        if not name:
            problem = "an empty tensor name"
        elif len(name) > MAX_TENSOR_NAME_CHARS:
            problem = f"a tensor name of {len(name):,} characters (at most {MAX_TENSOR_NAME_CHARS:,}): {name[:60]!r}..."
        else:
            problem = f"the tensor name {name[:80]!r}, which holds a control character"
        raise InputError(
            f"{path}: has {problem}; rename the tensor (a bundle keeps names of 1 to "
            f"{MAX_TENSOR_NAME_CHARS:,} characters, without control characters)"
        ) from None
    if name == "__metadata__":  # reserved by the safetensors header that `extract` writes
        raise InputError(f"{path}: a tensor may not be named '__metadata__' (reserved by safetensors); rename it")
    return name
