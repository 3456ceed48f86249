"""``extract --format hf --base BASE_DIR``: a LoRA adapter folded into its base model's folder.

PEFT adds s·B·A to a LoRA-wrapped layer's output on every call; folded in, the same model is a
plain one: W' = W + ΔŴ for every weight the adapter touches (ΔŴ the bundle's update, scale
included, as ``load(member, lora="updates")`` gives it), and the adapter's own tensors
(``modules_to_save`` copies such as a classifier head, trained biases) in place of the base's.
The sum is taken in float64 and rounded once to the base weight's dtype. The result is the base's
folder, its config files verbatim and every other tensor bit for bit in the base's order, that
``from_pretrained`` loads without peft and that ``export --onnx --base`` exports like any model.

The base is a Hugging Face model folder as ``merge`` reads one (``sources.folder``: one weights
file or shards with their index, checked against each other). Everything is checked before a
file is written: every weight an update targets exists in the base with the update's shape and a
float dtype; every tensor the adapter replaces exists there with its shape. Memory holds one base
tensor and one update at a time; the folder is written by ``hf_folder.write_weights_folder``
(built beside the target, renamed into place).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from unipack.bundle.reader import BundleReader
from unipack.errors import InputError, OptionsError, OutputExistsError
from unipack.export.hf_folder import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    Entry,
    HFExport,
    parse_size,
    write_weights_folder,
)
from unipack.export.targets import check_folder_target
from unipack.format import dtypes
from unipack.format.atomic import contains, ensure_directory
from unipack.sources.files import exists
from unipack.sources.folder import HFFolderSource, open_folder

CONFIG_NAME = "config.json"
#: How many names a message lists before it only counts the rest.
SHOWN = 3


class Fold:
    """An adapter of ``bundle`` and its opened base folder, checked against each other.

    ``entries`` plans the folded weights (the base's tensors, names, dtypes and shapes unchanged);
    ``arrays()`` yields them one at a time. Close it (or use it as a context manager) to release
    the base's files.
    """

    def __init__(self, bundle: BundleReader, member: str, base: str | os.PathLike[str]) -> None:
        self.member = member
        self.base_path = Path(base)
        bundle.member(member)  # an unknown member is the first thing to say
        if not bundle.is_lora:
            raise OptionsError(
                f"{bundle.path}: holds full checkpoints, not LoRA adapters; --base (base=) folds an "
                f"adapter into its base model: extract or export the member without it"
            )
        self.parts = bundle.adapter_parts(member)
        self.base = _open_base(self.base_path)
        try:
            self.configs = {k: v for k, v in (self.base.configs or {}).items() if k != INDEX_NAME}
            self.entries = self._check()
        except BaseException:
            self.base.close()
            raise

    def _check(self) -> list[Entry]:
        """The plan of the folded weights, once every change fits the base (else one InputError)."""
        tensors, parts, where = self.base.tensors, self.parts, self.base_path
        missing = [k for k in [*parts.updates, *parts.replacements] if k not in tensors]
        if missing:
            more = f", ... ({len(missing) - SHOWN} more)" if len(missing) > SHOWN else ""
            shown = ", ".join(missing[:SHOWN]) + more
            raise InputError(
                f"{where}: has no tensor {shown}, which member {self.member!r} changes ({len(missing)} "
                f"missing); give the base model this adapter was trained on"
            )
        for key in parts.updates:
            info, update_shape = tensors[key], parts.update_shape(key)
            if tuple(info.shape) != update_shape:
                raise InputError(
                    f"{where}: tensor {key} has shape {list(info.shape)} but the LoRA update member "
                    f"{self.member!r} adds to it has shape {list(update_shape)}; give the base model "
                    f"this adapter was trained on"
                )
            if info.dtype not in dtypes.FLOAT_DTYPES:
                raise InputError(
                    f"{where}: tensor {key} is {info.dtype}, not a float weight a LoRA update can be "
                    f"added to (member {self.member!r}); give the base model this adapter was trained on"
                )
        for key, (_, dtype, shape) in parts.replacements.items():
            info = tensors[key]
            if tuple(info.shape) != tuple(shape):
                raise InputError(
                    f"{where}: tensor {key} has shape {list(info.shape)} but the copy of it member "
                    f"{self.member!r} brings (modules_to_save) has shape {list(shape)}; give the base "
                    f"model this adapter was trained on"
                )
            if dtype != info.dtype and not (dtype in dtypes.FLOAT_DTYPES and info.dtype in dtypes.FLOAT_DTYPES):
                raise InputError(
                    f"{where}: tensor {key} is {info.dtype} but the copy of it member {self.member!r} "
                    f"brings is {dtype}; give the base model this adapter was trained on"
                )
        return [
            (name, info.dtype, tuple(info.shape), info.numel * dtypes.itemsize(info.dtype))
            for name, info in tensors.items()
        ]

    def arrays(self) -> Iterator[tuple[str, str, np.ndarray]]:
        """``(name, dtype, array)`` of every folded tensor in ``entries`` order, held as
        ``holder(dtype)``: the base's own, the adapter's copy, or W + ΔŴ rounded once."""
        for name, dtype, _, _ in self.entries:
            array = self.base.read(name)
            if name in self.parts.replacements:
                own_dtype, own = self.parts.replacement(name)
                array = own if own_dtype == dtype else dtypes.from_float(dtypes.to_float(own, own_dtype), dtype)
            if name in self.parts.updates:
                array = dtypes.from_float(dtypes.to_float(array, dtype) + self.parts.update(name), dtype)
            yield name, dtype, array

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> Fold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_folded_folder(
    bundle: BundleReader,
    member: str,
    directory: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> HFExport:
    """Write adapter ``member`` folded into the base folder ``base`` as a Hugging Face folder at
    ``directory`` (see the module docstring)."""
    limit = parse_size(max_shard_size, "max_shard_size")
    target = Path(directory)
    with Fold(bundle, member, base) as fold:
        _check_target(bundle, target, fold.base_path, force=force)
        written, sharded = write_weights_folder(
            target,
            configs=fold.configs,
            entries=fold.entries,
            arrays=fold.arrays(),
            metadata=fold.base.metadata,
            max_shard_size=limit,
            force=force,
        )
    return HFExport(member, target, written, sharded, CONFIG_NAME in fold.configs, fold.base_path)


def write_folded_folders(
    bundle: BundleReader,
    directory: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> list[HFExport]:
    """Every adapter folded into ``base``, into ``directory/<member>/``; every adapter is checked
    against the base, and every target, before the first folder is written."""
    out_dir = Path(directory)
    limit = parse_size(max_shard_size, "max_shard_size")
    for name in bundle.members:
        with Fold(bundle, name, base) as fold:
            _check_target(bundle, out_dir / name, fold.base_path, force=force)
    ensure_directory(out_dir)
    return [
        write_folded_folder(bundle, name, out_dir / name, base=base, max_shard_size=limit, force=force)
        for name in bundle.members
    ]


def _open_base(path: Path) -> HFFolderSource:
    if not exists(path):
        raise InputError(f"{path}: no such base model folder; give --base the folder save_pretrained wrote")
    if not path.is_dir():
        raise InputError(
            f"{path}: not a folder; give --base the base model's Hugging Face folder (config.json + "
            f"model.safetensors, as save_pretrained writes it)"
        )
    if not exists(path / CONFIG_NAME):
        raise InputError(
            f"{path}: has no {CONFIG_NAME}, so the folded folder could not be loaded; give --base the "
            f"base model's Hugging Face folder (as save_pretrained writes it)"
        )
    return open_folder(path)


def _check_target(bundle: BundleReader, target: Path, base: Path, *, force: bool) -> None:
    """The bundle's checks, and one more: the target must not be, or hold, the base being read
    (``--force`` would replace the base with its own folded copy)."""
    if contains(target, base):
        raise OutputExistsError(f"{target}: is or holds the base model {base}; give another directory")
    check_folder_target(bundle, target, force=force)
