"""Where a member's tensors come from: a ``.safetensors`` file, a PyTorch ``.bin``/``.pt`` state
dict, a Hugging Face model folder, or a PEFT LoRA adapter folder, all behind one small interface
(``TensorSource``)."""

from __future__ import annotations

from pathlib import Path

from unipack.errors import InputError
from unipack.sources.base import TensorInfo, TensorSource
from unipack.sources.folder import HFFolderSource, open_folder
from unipack.sources.peft_adapter import LoraModule, PeftAdapterSource, is_peft_adapter
from unipack.sources.remote import open_remote
from unipack.sources.safetensors_source import SafetensorsSource
from unipack.sources.torch_source import TORCH_SUFFIXES, TorchSource
from unipack.sources.url import InputPath, Url, as_input, is_url
from unipack.sources.weights import open_weights_file

__all__ = [
    "TORCH_SUFFIXES",
    "HFFolderSource",
    "InputPath",
    "LoraModule",
    "PeftAdapterSource",
    "SafetensorsSource",
    "TensorInfo",
    "TensorSource",
    "TorchSource",
    "Url",
    "as_input",
    "is_url",
    "is_peft_adapter",
    "open_weights_file",
    "open_source",
]


def open_source(path: InputPath) -> TensorSource:
    """Open ``path`` as the kind of source it is: an adapter folder (it has ``adapter_config.json``),
    a model folder, else a weights file, read as what its first bytes say it is; a ``Url`` through
    fsspec (``remote``: safetensors files and model folders of them)."""
    if isinstance(path, Url):
        return open_remote(path)
    if is_peft_adapter(path):
        return PeftAdapterSource.open(path)
    if path.is_dir():
        nested = _nested_adapter(path)
        if nested is not None:
            # PEFT saves an adapter not named "default" in a subfolder named after it.
            raise InputError(
                f"{path}: holds a PEFT adapter in the subfolder {nested.name!r}, not at its top; "
                f"give {nested} (one folder per adapter)"
            )
        return open_folder(path)
    return open_weights_file(path)


def _nested_adapter(path: Path) -> Path | None:
    """A direct subfolder holding ``adapter_config.json``, when ``path`` itself has no model weights."""
    if any(
        (path / name).exists()
        for name in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    ):
        return None
    try:
        return next((child for child in sorted(path.iterdir()) if is_peft_adapter(child)), None)
    except OSError:
        return None
