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
from pathlib import Path
from typing import Protocol

import numpy as np


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
    def path(self) -> Path:
        """The file or folder the user named."""

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
    def files(self) -> tuple[tuple[Path, int], ...]:
        """Each weight file with its size in bytes (one for a file, each shard for a folder)."""

    def read(self, name: str) -> np.ndarray:
        """The tensor's array, held as ``format.dtypes.holder(dtype)``."""

    def close(self) -> None:
        """Release open files and loaded tensors."""
