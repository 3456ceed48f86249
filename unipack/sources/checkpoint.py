"""Input checkpoints: open, validate up front, and read one tensor at a time.

An input is a ``.safetensors`` file, a PyTorch ``.bin``/``.pt`` state dict, or a Hugging Face
model folder (see ``sources``); a ``Checkpoint`` gives the rest of unipack the same view of each.
Every input is checked before any heavy work (header, tensor names, shapes, dtypes), so a bad
file fails in the first second of a merge with its name in the error, not after an hour.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unipack.errors import FormatError, InputError
from unipack.format import dtypes
from unipack.format.manifest import check_member_name
from unipack.sources import TORCH_SUFFIXES, PeftAdapterSource, TensorInfo, TensorSource, open_source
from unipack.sources.base import MAX_MAGNITUDE
from unipack.sources.remote import RemoteSafetensorsSource
from unipack.sources.safetensors_source import SafetensorsSource
from unipack.sources.url import InputPath, Url, is_url

#: float32's largest finite value.
F32_MAX = float(np.finfo(np.float32).max)

if TYPE_CHECKING:
    import torch

#: Weight files that make a folder a model folder (one member).
MODEL_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
)

#: Suffixes a default member name drops (a folder's name is used as it is).
NAME_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


@dataclass
class Checkpoint:
    """One input member: its name and the source its tensors are read from."""

    name: str
    source: TensorSource
    #: Tensors whose values ``values`` has checked against MAX_MAGNITUDE (a file's tensors do
    #: not change while it is read: a safetensors source checks that on every read).
    _in_range: set[str] = field(default_factory=set, repr=False, compare=False)
    #: F64 tensors ``read`` has checked against float32's range (see ``read``).
    _f64_checked: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def path(self) -> InputPath:
        return self.source.path

    @property
    def source_name(self) -> str:
        """The file or folder name, as the manifest records it (``MemberRecord.source``)."""
        return source_name(self.path)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.source.tensors

    @property
    def file_size(self) -> int:
        return self.source.file_size

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.source.metadata

    @property
    def configs(self) -> dict[str, str] | None:
        return self.source.configs

    @property
    def files(self) -> tuple[tuple[InputPath, int], ...]:
        return self.source.files

    @property
    def fork_safe(self) -> bool:
        """Whether a forked child process may read this member: safetensors files (folders of
        them, PEFT adapters saved as one) are read with ``pread``; a torch checkpoint reads
        through torch, whose thread pools do not survive a fork. (A file read by URL reopens its
        filesystem in the child: see ``remote``.)"""
        source = getattr(self.source, "weights", self.source)  # a PEFT adapter: its weights file
        shards = getattr(source, "shards", (source,))
        return all(isinstance(s, (SafetensorsSource, RemoteSafetensorsSource)) for s in shards)

    @property
    def is_adapter(self) -> bool:
        """A PEFT LoRA adapter (merged module by module), not a full checkpoint."""
        return isinstance(self.source, PeftAdapterSource)

    def read(self, tensor: str) -> np.ndarray:
        """The tensor's array, held as ``dtypes.holder(dtype)``.

        Every float value unipack handles fits float32's range (±3.4e38), so that no sum of
        squares of them overflows float64; only F64 can hold more, and such a tensor is refused.
        """
        array = self.source.read(tensor)
        if self.tensors[tensor].dtype == "F64" and tensor not in self._f64_checked and array.size:
            high, low = float(array.max()), float(array.min())
            if math.isfinite(high) and math.isfinite(low) and max(high, -low) > F32_MAX:
                raise InputError(
                    f"{self.path}: tensor {tensor[:80]!r} holds float64 values up to {max(high, -low):.3g} in "
                    f"magnitude, beyond float32's range (±3.4e38), which unipack's arithmetic needs; scale or "
                    f"drop the tensor (no weights are that large)"
                )
            self._f64_checked.add(tensor)
        return array

    def values(self, tensor: str) -> np.ndarray:
        """A float tensor's values as float64, for the arithmetic that decomposes it.

        Values past ``MAX_MAGNITUDE`` would overflow that arithmetic (warnings, NaN spectra):
        such a tensor is refused here, once, with the way to keep it raw. NaN and inf are left to
        the callers, which store such tensors raw or refuse them before this is reached.
        """
        values = dtypes.to_float(self.read(tensor), self.tensors[tensor].dtype)
        if tensor not in self._in_range and values.size:
            high, low = float(values.max()), float(values.min())
            if math.isfinite(high) and math.isfinite(low) and max(high, -low) > MAX_MAGNITUDE:
                raise InputError(self._too_large(tensor, max(high, -low)))
            self._in_range.add(tensor)
        return values

    def _too_large(self, tensor: str, magnitude: float) -> str:
        where = f"{self.path}: tensor {tensor[:80]!r} holds values up to {magnitude:.3g} in magnitude"
        if self.is_adapter:
            return (
                f"{where}, beyond ±{MAX_MAGNITUDE:.3g}, where the LoRA update's arithmetic overflows; "
                f"the adapter is broken: retrain or drop it"
            )
        return (
            f"{where}, beyond ±{MAX_MAGNITUDE:.3g}, where the decompositions' arithmetic overflows; keep it "
            f"raw: merge --raw {glob.escape(tensor)!r} (raw=[...] in Python)"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole checkpoint as a torch state dict (bf16 and float8 kept)."""
        from unipack.format.torch_bridge import to_torch

        return {name: to_torch(self.read(name), e.dtype) for name, e in self.tensors.items()}

    def close(self) -> None:
        self.source.close()


def open_inputs(paths: Sequence[InputPath], names: list[str] | None) -> list[Checkpoint]:
    """Open and validate every input (local paths, or ``Url``s: see ``as_input``); raise a clear
    error naming the first bad one."""
    if len(paths) == 1 and isinstance(paths[0], Path) and paths[0].is_dir():
        raise InputError(_one_folder_message(paths[0]))
    if len(paths) < 2:
        raise InputError(f"merge needs at least 2 checkpoints, got {len(paths)}")
    if names is None:
        names = [default_name(p) for p in paths]
    if len(names) != len(paths):
        raise InputError(f"{len(names)} names given for {len(paths)} checkpoints")
    seen: dict[str, InputPath] = {}
    for name, path in zip(names, paths):
        try:
            check_member_name(name)
        except FormatError as exc:
            raise InputError(
                f"{path}: {exc}; rename it or give another name (merge --name SOURCE=NAME; names= in Python)"
            ) from None
        if name in seen:
            raise InputError(
                f"duplicate member name {name!r} ({seen[name]} and {path}); rename one or give "
                f"distinct names (merge --name SOURCE=NAME; names= in Python)"
            )
        seen[name] = path
    checkpoints: list[Checkpoint] = []
    try:
        for name, path in zip(names, paths):
            checkpoints.append(open_checkpoint(path, name))
        if not any(c.is_adapter for c in checkpoints):
            # Adapters may target different modules; merge_lora checks what they must share.
            _check_same_names(checkpoints)
    except BaseException:
        close_all(checkpoints)
        raise
    return checkpoints


def _one_folder_message(folder: Path) -> str:
    """What one folder given alone holds, and what to type: a folder is one member, never many."""
    entries = sorted(folder.iterdir()) if os.access(folder, os.R_OK) else []
    files = [p for p in entries if p.is_file() and p.name.endswith(NAME_SUFFIXES)]
    folders = [p for p in entries if p.is_dir() and any((p / w).is_file() for w in MODEL_WEIGHT_NAMES)]
    if any((folder / w).is_file() for w in MODEL_WEIGHT_NAMES):
        return (
            f"{folder}: is one model folder, so one member; merge needs at least 2: give several "
            f"checkpoints or model folders"
        )
    if len(files) >= len(folders) and files:
        suffix = max(NAME_SUFFIXES, key=lambda x: sum(p.name.endswith(x) for p in files))
        return (
            f"{folder}: a folder holding {len(files)} checkpoint file{'s' if len(files) != 1 else ''} "
            f"({', '.join(p.name for p in files[:3])}{', ...' if len(files) > 3 else ''}); a folder is one "
            f"input: give the files as the members, e.g. unipack merge {folder}/*{suffix} -o bundle.upk"
        )
    if folders:
        return (
            f"{folder}: a folder holding {len(folders)} model folder{'s' if len(folders) != 1 else ''} "
            f"({', '.join(p.name for p in folders[:3])}{', ...' if len(folders) > 3 else ''}); give them as "
            f"the members, e.g. unipack merge {folder}/*/ -o bundle.upk"
        )
    return f"{folder}: holds no checkpoints (.safetensors, .bin, .pt or model folders); merge needs at least 2"


def open_checkpoint(path: InputPath, name: str) -> Checkpoint:
    """Open and validate one checkpoint (a member's original, or a member to add)."""
    source = open_source(path)
    if not source.tensors:
        source.close()
        raise InputError(f"{path}: holds no tensors")
    return Checkpoint(name, source)


def source_name(path: InputPath) -> str:
    """The file or folder name (``Path("dir/.")`` and ``Path(".")`` name the folder, not ``.``; a
    URL's last segment)."""
    if isinstance(path, Url):
        return path.name
    return Path(os.path.abspath(path)).name


def default_name(path: InputPath) -> str:
    """A member's default name: its file name without its suffix, or its folder name (a URL's last
    segment, without .safetensors, .bin or .pt: whether it is a folder is not asked of the store)."""
    name = source_name(path)
    if isinstance(path, Url):
        return next((name[: -len(s)] for s in NAME_SUFFIXES if name.endswith(s) and len(name) > len(s)), name)
    if path.is_dir():
        return name
    for suffix in NAME_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def resolve_names(paths: Sequence[InputPath], pairs: Sequence[str]) -> list[str]:
    """Member names for ``paths``: the defaults, with ``SOURCE=NAME`` pairs (``merge --name``) applied.

    SOURCE is an input path exactly as given (compared as a path, so ``./a`` is ``a``) or its
    default name. The split is at the last ``=``: paths such as ``runs/lr=1e-4/`` are common, names
    with ``=`` are not.
    """
    defaults = [default_name(p) for p in paths]
    chosen: dict[int, str] = {}
    for pair in pairs:
        source, sep, name = pair.rpartition("=")
        if not sep or not source or not name:
            raise InputError(
                f"--name {pair!r}: expected SOURCE=NAME, with SOURCE an input path or its default "
                f"name (e.g. --name {defaults[0]}=my-name)"
            )
        matches = [i for i, p in enumerate(paths) if _same_input(source, p)] or [
            i for i, d in enumerate(defaults) if d == source
        ]
        if not matches:
            shown = ", ".join(repr(d) for d in defaults[:4]) + (", ..." if len(defaults) > 4 else "")
            raise InputError(
                f"--name {pair!r}: {source!r} matches no input; give an input path as listed or "
                f"its default name ({shown})"
            )
        if len(matches) > 1:
            raise InputError(
                f"--name {pair!r}: {source!r} is the default name of {len(matches)} inputs "
                f"({paths[matches[0]]}, {paths[matches[1]]}); give the input's path instead"
            )
        index = matches[0]
        if index in chosen:
            raise InputError(
                f"--name {pair!r}: input {paths[index]} is already named {chosen[index]!r}; give one --name per input"
            )
        chosen[index] = name
    return [chosen.get(i, d) for i, d in enumerate(defaults)]


def _same_input(given: str, path: InputPath) -> bool:
    """Whether ``--name SOURCE=...``'s SOURCE is the input ``path`` (a URL: as typed)."""
    if isinstance(path, Url):
        return given == path.text
    return not is_url(given) and Path(given) == path


def _check_same_names(checkpoints: list[Checkpoint]) -> None:
    first = checkpoints[0]
    ref = set(first.tensors)
    for c in checkpoints[1:]:
        difference = name_difference(ref, set(c.tensors))
        if difference:
            raise InputError(
                f"{c.path}: tensor names differ from {first.path}: it {difference}; "
                f"members must be the same architecture"
            )


def name_difference(reference: set[str], names: set[str]) -> str | None:
    """``"lacks 'a' and has extra 'b'"`` (a few of each), or None if the two sets agree."""
    missing, extra = sorted(reference - names), sorted(names - reference)
    parts = []
    if missing:
        parts.append(f"lacks {_few(missing)}")
    if extra:
        parts.append(f"has extra {_few(extra)}")
    return " and ".join(parts) or None


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def close_all(checkpoints: list[Checkpoint]) -> None:
    for c in checkpoints:
        try:
            c.close()
        except OSError:
            pass
