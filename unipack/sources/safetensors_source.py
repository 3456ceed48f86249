"""A ``.safetensors`` file as a source: the header is validated up front, tensors are read with
``pread`` on demand (see ``format.safetensors_file`` for why not a memory map)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unipack.errors import InputError
from unipack.format import dtypes
from unipack.format.safetensors_file import SafetensorsHeader, read_bytes, read_header
from unipack.sources.base import TensorInfo


class SafetensorsSource:
    """One safetensors file: its validated header and an open file descriptor."""

    def __init__(self, header: SafetensorsHeader, fd: int) -> None:
        self._header, self._fd = header, fd
        self.tensors = {name: TensorInfo(e.dtype, e.shape) for name, e in header.tensors.items()}

    @classmethod
    def open(cls, path: Path) -> SafetensorsSource:
        header = read_header(path, what="safetensors checkpoint")
        if header.metadata and header.metadata.get("format") == "unipack.upk":
            raise InputError(f"{path}: is a unipack bundle, not a checkpoint; extract its members first")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{path}: cannot open ({exc.strerror or exc})") from None
        return cls(header, fd)

    @property
    def path(self) -> Path:
        return self._header.path

    @property
    def file_size(self) -> int:
        return self._header.file_size

    @property
    def metadata(self) -> dict[str, str] | None:
        return self._header.metadata

    @property
    def configs(self) -> dict[str, str] | None:
        return None

    @property
    def files(self) -> tuple[tuple[Path, int], ...]:
        return ((self.path, self.file_size),)

    def read(self, name: str) -> np.ndarray:
        e = self._header.tensors[name]
        return dtypes.from_bytes(read_bytes(self._fd, e, self.path), e.dtype, e.shape)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
