"""Input checkpoints: open, validate up front, and read one tensor at a time.

Every input is checked before any heavy work (header, tensor names, shapes, dtypes), so a bad
file fails in the first second of a merge with its name in the error, not after an hour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError, InputError
from ..format import dtypes
from ..format.manifest import check_member_name
from ..format.safetensors_file import SafetensorsHeader, read_bytes, read_header


@dataclass
class Checkpoint:
    """One input member: a validated safetensors header and an open file descriptor."""

    name: str
    header: SafetensorsHeader
    fd: int

    @property
    def path(self) -> Path:
        return self.header.path

    def read(self, tensor: str) -> np.ndarray:
        """The tensor's array, held as ``dtypes.holder(dtype)``."""
        e = self.header.tensors[tensor]
        return dtypes.from_bytes(read_bytes(self.fd, e, self.path), e.dtype, e.shape)

    def values(self, tensor: str) -> np.ndarray:
        """A float tensor's values as float64."""
        e = self.header.tensors[tensor]
        return dtypes.to_float(self.read(tensor), e.dtype)

    def close(self) -> None:
        os.close(self.fd)


def open_inputs(paths: list[Path], names: list[str] | None) -> list[Checkpoint]:
    """Open and validate every input; raise a clear error naming the first bad one."""
    if len(paths) < 2:
        raise InputError(f"merge needs at least 2 checkpoints, got {len(paths)}")
    if names is None:
        names = [default_name(p) for p in paths]
    if len(names) != len(paths):
        raise InputError(f"{len(names)} names given for {len(paths)} checkpoints")
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths):
        try:
            check_member_name(name)
        except FormatError as exc:
            raise InputError(f"{path}: {exc}; rename the file or pass names=") from None
        if name in seen:
            raise InputError(f"duplicate member name {name!r} ({seen[name]} and {path}); rename one file "
                             f"or pass distinct names")
        seen[name] = path
    checkpoints: list[Checkpoint] = []
    try:
        for name, path in zip(names, paths):
            checkpoints.append(open_checkpoint(path, name))
        _check_same_names(checkpoints)
    except BaseException:
        for c in checkpoints:
            c.close()
        raise
    return checkpoints


def open_checkpoint(path: Path, name: str) -> Checkpoint:
    """Open and validate one checkpoint (a member's original, or a member to add)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    header = read_header(path, what="safetensors checkpoint")
    if header.metadata and header.metadata.get("format") == "unipack.upk":
        raise InputError(f"{path}: is a unipack bundle, not a checkpoint; extract its members first")
    if not header.tensors:
        raise InputError(f"{path}: holds no tensors")
    return Checkpoint(name, header, os.open(path, os.O_RDONLY))


def default_name(path: Path) -> str:
    """A member's default name: its file name without the .safetensors suffix."""
    name = path.name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else path.stem


def _check_same_names(checkpoints: list[Checkpoint]) -> None:
    first = checkpoints[0]
    ref = set(first.header.tensors)
    for c in checkpoints[1:]:
        difference = name_difference(ref, set(c.header.tensors))
        if difference:
            raise InputError(f"{c.path}: tensor names differ from {first.path}: it {difference}; "
                             f"members must be the same architecture")


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

