"""Where a member's tensors come from: a ``.safetensors`` file, a PyTorch ``.bin``/``.pt`` state
dict, a Hugging Face model folder, or a PEFT LoRA adapter folder, all behind one small interface
(``TensorSource``)."""

from __future__ import annotations

from pathlib import Path

from ...errors import InputError
from .base import TensorInfo, TensorSource
from .folder import HFFolderSource, open_folder
from .peft_adapter import LoraModule, PeftAdapterSource, is_peft_adapter
from .safetensors_source import SafetensorsSource
from .torch_source import TORCH_SUFFIXES, TorchSource

__all__ = [
    "TORCH_SUFFIXES",
    "HFFolderSource",
    "LoraModule",
    "PeftAdapterSource",
    "SafetensorsSource",
    "TensorInfo",
    "TensorSource",
    "TorchSource",
    "is_peft_adapter",
    "open_source",
]


def open_source(path: Path) -> TensorSource:
    """Open ``path`` as the kind of source it is: an adapter folder (it has ``adapter_config.json``),
    a model folder, a PyTorch pickle (by suffix), else safetensors."""
    if is_peft_adapter(path):
        return PeftAdapterSource.open(path)
    if path.is_dir():
        return open_folder(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix.lower() in TORCH_SUFFIXES:
        return TorchSource.open(path)
    return SafetensorsSource.open(path)
