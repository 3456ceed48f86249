"""Read and write the safetensors layout: ``u64 header length | JSON header | data``.

unipack reads its inputs and its own .upk bundles with this module rather than with
``safetensors.safe_open`` for three reasons: every field is validated with a clear error
naming the file (inputs are checked up front, before hours of merging); tensors are read with
``pread`` into fresh buffers, so resident memory does not grow with the number of files that
are open (a memory map's touched pages would); and the same checks guard untrusted bundles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unipack.errors import FormatError
from unipack.format import dtypes

#: Largest JSON header accepted (the safetensors reference implementation uses the same cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest number of dimensions and size of one dimension accepted in a header.
MAX_NDIM = 16
MAX_DIM = 2**53


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file."""

    path: Path
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]  # in data order
    metadata: dict[str, str] | None


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error, not a silent overwrite."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def strict_json(text: bytes | str, where: str) -> Any:
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN/Infinity, no lone surrogates."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        else:
            text.encode("utf-8")  # a lone surrogate in the text itself (at C speed)
        doc = json.loads(text, object_pairs_hook=reject_duplicate_keys, parse_constant=_no_constants)
        # Past that check, a lone surrogate can only come from a ``\uXXXX`` escape: the walk
        # over every string runs only where the text has one.
        if "\\u" in text:
            _check_strings(doc)
        return doc
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: invalid JSON header ({exc})") from None


def _check_strings(value: Any) -> None:
    """JSON may escape lone surrogates (``\\ud800``) that are not text: refuse them here, once,
    so no name or metadata string can fail to encode later (as a file name, in a header)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON true/false parse as bools, which subclass int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(
    path: str | os.PathLike[str], *, what: str = "safetensors file", fd: int | None = None
) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data.

    ``fd``: a descriptor of ``path`` opened by the caller (at offset 0), read instead of opening
    ``path`` again: a caller that reads the data through it too sees one file even if ``path`` is
    replaced meanwhile (a header of the old file with the data of the new one looks corrupt).
    """
    p = Path(path)
    try:
        with open(p, "rb") if fd is None else os.fdopen(os.dup(fd), "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(
                    f"{p}: truncated: {file_size} bytes is shorter than the 8-byte header length of a {what}"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{p}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte "
                    f"limit; not a {what} or corrupt"
                )
            if 8 + header_len > file_size:
                raise FormatError(
                    f"{p}: truncated: header claims {header_len} bytes but the file has "
                    f"{file_size - 8} after the length prefix"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise FormatError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return parse_header(p, file_size, raw, what=what)


def parse_header(p: Path, file_size: int, raw: bytes, *, what: str, where: str | None = None) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` of a ``file_size``-byte safetensors file (read by the
    caller, from a file or by byte range from remote storage); errors name ``where`` (default
    ``p``)."""
    label = str(p) if where is None else where
    if not raw.lstrip().startswith(b"{"):
        raise FormatError(f"{label}: not a {what} (its header is not a JSON object)")
    doc = strict_json(raw, label)
    if not isinstance(doc, dict):
        raise FormatError(f"{label}: not a {what} (its header is not a JSON object)")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FormatError(f"{label}: __metadata__ must map strings to strings")
    entries = [_parse_entry(label, name, spec, data_start, data_len) for name, spec in doc.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    cursor = data_start
    for e in entries:
        if e.start < cursor:
            raise FormatError(f"{label}: tensor {e.name!r} overlaps the previous tensor's bytes")
        cursor = e.end
    return SafetensorsHeader(p, file_size, data_start, {e.name: e for e in entries}, metadata)


def _parse_entry(label: str, name: str, spec: Any, data_start: int, data_len: int) -> TensorEntry:
    where = f"{label}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise FormatError(f"{where}: entry is not an object")
    dtype = dtypes.check_dtype(spec.get("dtype"), where)
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise FormatError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    offsets = spec.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise FormatError(
            f"{where}: data_offsets {offsets} lie outside the {data_len}-byte data section (file truncated or corrupt)"
        )
    numel = 1
    for d in shape:  # Python ints: no overflow, and a huge product fails the size check below
        numel *= d
    if numel * dtypes.itemsize(dtype) != end - begin:
        raise FormatError(f"{where}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_bytes(fd: int, entry: TensorEntry, path: Path) -> bytearray:
    """Read one tensor's bytes with ``pread`` (no memory map, no shared file position)."""
    buf = bytearray(entry.nbytes)
    _read_into(fd, entry, path, memoryview(buf))
    return buf


def read_array(fd: int, entry: TensorEntry, path: Path) -> np.ndarray:
    """``read_bytes`` into a fresh uint8 array: the bytes are written once, by the read (a
    ``bytearray`` is zero-filled first: one more pass over a tensor-sized block)."""
    buf = np.empty(entry.nbytes, dtype=np.uint8)
    _read_into(fd, entry, path, buf.data)
    return buf


def _read_into(fd: int, entry: TensorEntry, path: Path, view: memoryview) -> None:
    got = 0
    while got < entry.nbytes:
        try:
            chunk = os.preadv(fd, [view[got:]], entry.start + got)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read tensor {entry.name!r} ({exc.strerror or exc})") from None
        if chunk <= 0:
            raise FormatError(f"{path}: truncated while reading tensor {entry.name!r}")
        got += chunk


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """Serialise a header (``name, dtype, shape, nbytes`` in data order) with its length prefix.

    The JSON is padded with spaces to a multiple of 8 bytes, as the reference writer does, so
    the data section starts aligned.
    """
    doc: dict[str, Any] = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    return len(body).to_bytes(8, "little") + body
