"""A ``.safetensors`` file as a source: the header is validated up front, tensors are read with
``pread`` on demand (see ``format.safetensors_file`` for why not a memory map).

No file stays open between reads: a merge of hundreds of members would otherwise hold one
descriptor per member (per shard, for sharded folders) and stop at the process's open-file
limit (``ulimit -n``, often 256 or 1024). Each read opens the file, checks it is still the file
whose header was read (device, inode, size, modification time), reads, and closes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unipack.errors import InputError
from unipack.format import dtypes
from unipack.format.safetensors_file import MAX_HEADER_BYTES, SafetensorsHeader, read_array, read_header
from unipack.sources.base import TensorInfo, check_tensor_key
from unipack.sources.files import open_file
from unipack.sources.url import InputPath

#: Largest JSON header of an input accepted. The format allows 100 MiB, but parsing costs about
#: 0.3 s per MiB here and a real checkpoint's header is ~130 bytes per tensor (16 MiB: ~120,000
#: tensors, more than any one file of a real model holds).
MAX_INPUT_HEADER_BYTES = 16 * 1024 * 1024
#: Most tensors one input file may hold (checked before parsing, by counting JSON objects).
MAX_INPUT_TENSORS = 100_000


class SafetensorsSource:
    """One safetensors file: its validated header, and what identifies the file it was read from."""

    def __init__(self, header: SafetensorsHeader, identity: tuple[int, ...]) -> None:
        self._header, self._identity = header, identity
        self.tensors = {name: TensorInfo(e.dtype, e.shape) for name, e in header.tensors.items()}

    @classmethod
    def open(cls, path: Path) -> SafetensorsSource:
        # One descriptor for the checks and the header: the file they see is the file it read.
        fd = open_file(path, "checkpoint")
        try:
            _check_header_size(path, fd)
            header = read_header(path, what="safetensors checkpoint", fd=fd)
            identity = _identity(fd)
        finally:
            os.close(fd)
        check_checkpoint_header(header, path)
        return cls(header, identity)

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
        fd = open_file(self.path, "checkpoint")
        try:
            if _identity(fd) != self._identity:
                # The header says where each tensor's bytes are in the file that was opened;
                # in another file they would be other bytes, silently.
                raise InputError(
                    f"{self.path}: changed during the merge (replaced or rewritten); run again on files "
                    f"that stay as they are"
                )
            data = read_array(fd, e, self.path)
        finally:
            os.close(fd)
        return dtypes.from_bytes(data, e.dtype, e.shape)

    def close(self) -> None:
        """Nothing to release: no file stays open between reads."""


def _identity(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_checkpoint_header(header: SafetensorsHeader, where: InputPath) -> None:
    """What makes a valid safetensors header a checkpoint unipack merges: not a bundle of its
    own, and tensor names a manifest can hold."""
    if header.metadata and header.metadata.get("format") == "unipack.upk":
        raise InputError(f"{where}: is a unipack bundle, not a checkpoint; extract its members first")
    for name in header.tensors:
        check_tensor_key(name, where)


def _check_header_size(path: Path, fd: int) -> None:
    """Refuse, before parsing, a header whose parse alone would take seconds and much memory."""
    prefix = _pread(path, fd, 8, 0)
    if len(prefix) < 8:
        return  # read_header says how the file is truncated
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES or 8 + length > os.fstat(fd).st_size:
        return  # not a header at all, or a truncated file: read_header says which
    check_header_limits(path, length, lambda: _pread(path, fd, length, 8))


def check_header_limits(path: InputPath, length: int, header: Callable[[], bytes]) -> None:
    """Refuse a header of ``length`` bytes (``header()`` reads them) past the input limits."""
    if length > MAX_INPUT_HEADER_BYTES:
        raise InputError(
            f"{path}: its header is {length:,} bytes, over the {MAX_INPUT_HEADER_BYTES:,}-byte limit for "
            f"an input; not a checkpoint, corrupt, or too many tensors for one file: split it into shards"
        )
    # Every tensor is one JSON object, so the header's "{" count bounds the tensor count from
    # above (a "{" in a name only adds to it): cheap, and before json.loads does any work.
    objects = header().count(b"{")
    if objects > MAX_INPUT_TENSORS + 2:  # + the header itself and __metadata__
        raise InputError(
            f"{path}: its header holds {objects - 1:,} entries, over the limit of {MAX_INPUT_TENSORS:,} "
            f"tensors per input file; split it into shards (a Hugging Face folder with an index)"
        )


def _pread(path: Path, fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
