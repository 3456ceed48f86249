"""``extract --format peft``: a member of a LoRA bundle as a PEFT adapter folder.

The folder is what ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained(base,
DIR)`` loads: the adapter's own ``adapter_config.json``, verbatim (target modules, base model
name, task type, r, lora_alpha and any rank/alpha patterns), and ``adapter_model.safetensors``
with factors of the adapter's own rank whose product, at the config's scaling, is the bundle's
update (see ``core.lora_encode.peft_factors``), plus its modules_to_save tensors. Built in a
temp directory and renamed into place (``atomic_directory``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from unipack.bundle.reader import BundleReader
from unipack.errors import OptionsError
from unipack.export.safetensors import write_safetensors
from unipack.export.targets import check_folder_target
from unipack.format.atomic import atomic_directory, ensure_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftExport:
    """What ``Bundle.extract_peft`` wrote: ``files`` are names inside ``directory``."""

    member: str
    directory: Path
    files: tuple[str, ...]


def write_peft_folder(
    bundle: BundleReader, member: str, directory: str | os.PathLike[str], *, force: bool = False
) -> PeftExport:
    """Write ``member`` as a PEFT adapter folder at ``directory`` (see the module docstring)."""
    check_lora_bundle(bundle)
    rec = bundle.member(member)
    config = (rec.configs or {}).get(CONFIG_NAME)
    if config is None:  # every merged adapter records it; a hand-edited manifest might not
        raise OptionsError(
            f"{bundle.path}: member {member!r} has no recorded {CONFIG_NAME}; extract it as "
            f"safetensors instead (extract --format safetensors)"
        )
    target = Path(directory)
    check_folder_target(bundle, target, force=force)
    with atomic_directory(target, force=force) as tmp:
        (tmp / CONFIG_NAME).write_bytes(config.encode("utf-8"))
        write_safetensors(bundle, member, tmp / WEIGHTS_NAME)
    return PeftExport(member, target, (CONFIG_NAME, WEIGHTS_NAME))


def write_peft_folders(
    bundle: BundleReader, directory: str | os.PathLike[str], *, force: bool = False
) -> list[PeftExport]:
    """Every member into ``directory/<member>/``; every target is checked before the first is written."""
    check_lora_bundle(bundle)
    out_dir = Path(directory)
    ensure_directory(out_dir)
    for name in bundle.members:
        check_folder_target(bundle, out_dir / name, force=force)
    return [write_peft_folder(bundle, name, out_dir / name, force=force) for name in bundle.members]


def check_lora_bundle(bundle: BundleReader) -> None:
    if not bundle.is_lora:
        raise OptionsError(
            f"{bundle.path}: holds full checkpoints, not LoRA adapters; extract them with "
            f"--format safetensors or --format hf"
        )
