"""One weights file, opened as what its content is: safetensors or a PyTorch pickle.

The suffix is a hint, the first bytes are the proof (``files.sniff``). A safetensors file saved
under a ``.bin`` name is read as safetensors (reading it cannot run code, whatever its name);
a PyTorch pickle named like a safetensors file is refused with its real kind, since a user who
gave a ``.safetensors`` file did not ask for a pickle to be loaded. Content neither format
recognises goes to the parser its suffix names, whose error says what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from unipack.errors import InputError
from unipack.sources.base import TensorSource
from unipack.sources.files import require_file, sniff
from unipack.sources.safetensors_source import SafetensorsSource
from unipack.sources.torch_source import TORCH_SUFFIXES, TorchSource


def open_weights_file(path: Path) -> TensorSource:
    """A ``SafetensorsSource`` or ``TorchSource`` for the regular file ``path``."""
    require_file(path, "checkpoint")
    kind = sniff(path)
    named_torch = path.suffix.lower() in TORCH_SUFFIXES
    if kind == "safetensors":
        return SafetensorsSource.open(path)
    if kind == "torch" and not named_torch:
        raise InputError(
            f"{path}: is a PyTorch checkpoint (torch.save), not safetensors, despite its name; "
            f"rename it with a .bin or .pt suffix to read it as one"
        )
    return TorchSource.open(path) if named_torch else SafetensorsSource.open(path)
