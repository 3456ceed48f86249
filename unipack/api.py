"""The public ``Bundle``: the reader plus one method per exporter, so that
``unipack.open(path).extract_hf(...)`` reads as users expect.

It is the only place that joins the two: ``BundleReader`` (``unipack.bundle``) never imports an
exporter, and every exporter (``unipack.export``) takes a reader. Each method below is a thin
delegate; the work and its documentation live in the exporter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from unipack.bundle.reader import BundleReader
from unipack.export.folded import write_folded_folder, write_folded_folders
from unipack.export.hf_folder import DEFAULT_MAX_SHARD_SIZE, HFExport, write_hf_folder, write_hf_folders
from unipack.export.peft_folder import PeftExport, write_peft_folder, write_peft_folders
from unipack.export.safetensors import write_safetensors, write_safetensors_all

if TYPE_CHECKING:
    import torch

    from unipack.export.onnx import OnnxCheck
    from unipack.export.torch_module import Factory


class Bundle(BundleReader):
    """A validated .upk bundle. Use as a context manager or call :meth:`close`.

    ``base`` means the base model everywhere: for a bundle merged with ``--base`` (its deltas
    taken from a base model it references, spec §11), the model every member needs, given once to
    :func:`open` (or to a method below, which gives it to the bundle); for a LoRA bundle, the
    model an adapter is folded into by ``extract_hf``, ``to_module`` and ``export_onnx``."""

    def _folding(self, base: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
        """``base`` where it is a LoRA adapter's model to fold into; for a dense bundle it is the
        referenced base model, given to the bundle here (None returned: nothing to fold)."""
        if base is None or self.is_lora:
            return base
        self.attach_base(base)
        return None

    def extract(self, member: str, path: str | os.PathLike[str], *, force: bool = False, exact: bool = False) -> Path:
        """Write ``member`` as a .safetensors file (its original ``__metadata__`` kept), atomically.
        ``exact``: bit for bit, from the lossless tier (``merge --lossless``)."""
        return write_safetensors(self, member, path, force=force, exact=exact)

    def extract_all(self, directory: str | os.PathLike[str], *, force: bool = False, exact: bool = False) -> list[Path]:
        """Every member into ``directory/<member>.safetensors`` (member names are validated inert)."""
        return write_safetensors_all(self, directory, force=force, exact=exact)

    def extract_hf(
        self,
        member: str,
        directory: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        force: bool = False,
    ) -> HFExport:
        """Write ``member`` as a Hugging Face folder (its recorded configs + safetensors weights,
        sharded above ``max_shard_size`` bytes or a size like ``"500MB"``) that
        ``transformers.AutoModel*.from_pretrained`` loads; atomically, via a temp folder.
        ``base`` (LoRA bundles): the base model's folder, written with the adapter folded in
        (unipack.export.folded)."""
        base = self._folding(base)
        if base is not None:
            return write_folded_folder(self, member, directory, base=base, max_shard_size=max_shard_size, force=force)
        return write_hf_folder(self, member, directory, max_shard_size=max_shard_size, force=force)

    def extract_hf_all(
        self,
        directory: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        force: bool = False,
    ) -> list[HFExport]:
        """Every member as a Hugging Face folder ``directory/<member>/`` (``base``: every adapter
        folded into that base model)."""
        base = self._folding(base)
        if base is not None:
            return write_folded_folders(self, directory, base=base, max_shard_size=max_shard_size, force=force)
        return write_hf_folders(self, directory, max_shard_size=max_shard_size, force=force)

    def extract_peft(self, member: str, directory: str | os.PathLike[str], *, force: bool = False) -> PeftExport:
        """Write ``member`` of a LoRA bundle as a PEFT adapter folder (its own adapter_config.json +
        adapter_model.safetensors) that ``peft.PeftModel.from_pretrained(base, directory)`` loads."""
        return write_peft_folder(self, member, directory, force=force)

    def extract_peft_all(self, directory: str | os.PathLike[str], *, force: bool = False) -> list[PeftExport]:
        """Every member of a LoRA bundle as a PEFT adapter folder ``directory/<member>/``."""
        return write_peft_folders(self, directory, force=force)

    def to_module(
        self, member: str, model: str | Factory | None = None, *, base: str | os.PathLike[str] | None = None
    ) -> torch.nn.Module:
        """``member`` as a torch module in eval mode, its weights loaded strictly: built by transformers
        from its recorded config.json, or by ``model``, a factory SPEC or callable (unipack.export.torch_module).
        ``base`` (LoRA bundles): the base model's folder, with the adapter folded in."""
        from unipack.export.torch_module import build_module  # torch and transformers only when asked

        return build_module(self, member, model, base=self._folding(base)).module

    def export_onnx(
        self,
        member: str,
        out: str | os.PathLike[str],
        *,
        model: str | Factory | None = None,
        base: str | os.PathLike[str] | None = None,
        atol: float = 1e-4,
        force: bool = False,
    ) -> OnnxCheck:
        """Write ``member`` as an ONNX model and check it against torch with ONNX Runtime (raises
        OnnxCheckError, keeping the file, past ``atol``); see unipack.export.onnx. ``base`` (LoRA
        bundles): the base model's folder, exported with the adapter folded in."""
        from unipack.export.onnx import export_onnx

        return export_onnx(self, member, out, model=model, base=self._folding(base), atol=atol, force=force)

    def __enter__(self) -> Bundle:
        return self


def open(  # noqa: A001 - `unipack.open` mirrors builtins.open
    path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None
) -> Bundle:
    """Open and validate a .upk bundle (reads only its header). ``base``: the base model a bundle
    merged with ``--base`` references (its tensors' names, dtypes and shapes are checked now,
    their sha256s as they are read); members that use it cannot be loaded without it."""
    return Bundle(path, base=base)
