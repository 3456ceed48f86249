"""Inputs read from object storage by URL, through fsspec (``pip install 'unipack[remote]'``):
``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``, ``memory://``, ``file://``, any protocol
fsspec knows (with its package installed: s3fs, gcsfs, ...; credentials as that package finds them).

What is read: a ``.safetensors`` file, or a Hugging Face model folder holding ``model.safetensors``
(or shards listed by ``model.safetensors.index.json``) and its config files. Every file is read by
byte range, as a local one is: its first 8 bytes, its header, then each tensor's bytes when the
merge asks for that tensor; nothing is downloaded whole (only ``--lossless-baseline``, on by
default, streams every input once to measure it; ``--lossless-baseline off`` reads tensors only).

Jobs carry the URL, never a local copy: a forked ``--jobs`` worker reopens its filesystem (fsspec's
asynchronous ones, s3fs or gcsfs, do not survive a fork), a Dask worker opens the URL itself, so a
cluster needs the same credentials on its workers, not a shared file system. A file is checked
against the size and version (``fsspec``'s ``ukey``: the ETag on S3) seen where the merge started
when a worker opens it; tensors are not re-checked on every read (one more request each).

PyTorch ``.bin`` files and PEFT adapter folders are read from local paths only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from unipack.errors import InputError, UnipackError
from unipack.format import dtypes
from unipack.format.safetensors_file import MAX_HEADER_BYTES, SafetensorsHeader, parse_header
from unipack.sources.base import TensorInfo, TensorSource
from unipack.sources.folder import (
    LAYOUTS,
    HFFolderSource,
    check_every_shard_listed,
    open_listed_shards,
    parse_weight_map,
)
from unipack.sources.hf_configs import CONFIG_FILES, config_text
from unipack.sources.safetensors_source import (
    MAX_INPUT_HEADER_BYTES,
    check_checkpoint_header,
    check_header_limits,
)
from unipack.sources.url import URL_MARK, InputPath, Url

#: The optional extra that installs fsspec.
EXTRA = "pip install 'unipack[remote]'"
#: Bytes of a file read first: its header's length and, for most checkpoints, the whole header.
PREFIX_BYTES = 64 * 1024
#: Characters that make an input URL a pattern (``fs.glob``).
GLOB_CHARS = "*?["


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        return None
    return fsspec


def filesystem(url: Url) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it; one clear InputError for a missing
    fsspec, an unknown protocol, or a protocol whose package is not installed."""
    fsspec = _fsspec()
    if fsspec is None:
        raise InputError(f"{url}: reading inputs from URLs needs fsspec, which is not installed: {EXTRA}")
    try:
        return fsspec.core.url_to_fs(url.text)  # type: ignore[no-any-return]
    except ImportError as exc:  # the protocol's package (s3fs, gcsfs, ...)
        raise InputError(f"{url}: protocol {url.protocol!r} needs a package that is not installed ({exc})") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise InputError(
                f"{url}: unknown protocol {url.protocol!r}; give a local path or a URL fsspec knows "
                f"(s3://, gs://, az://, hf://, https://, file://, ...)"
            ) from None
        raise InputError(f"{url}: not a URL fsspec can open ({_why(exc)})") from None
    except Exception as exc:  # a filesystem that fails to start (bad options, no credentials)
        raise InputError(f"{url}: cannot open its filesystem ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _info(fs: Any, path: str, url: Url) -> dict[str, Any]:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{url}: no such file or folder") from None
    except UnipackError:
        raise
    except Exception as exc:  # permissions, network, a bucket that does not exist
        raise InputError(f"{url}: cannot read ({_why(exc)})") from None
    return dict(info)


def _read(fs: Any, path: str, url: Url, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of the file: exactly that many, or an InputError."""
    if end <= start:
        return b""
    try:
        data = fs.cat_file(path, start=start, end=end)
    except FileNotFoundError:
        raise InputError(f"{url}: no longer exists (removed during the merge?)") from None
    except Exception as exc:
        raise InputError(f"{url}: cannot read bytes {start:,} to {end:,} ({_why(exc)})") from None
    if len(data) != end - start:
        raise InputError(
            f"{url}: read {len(data):,} bytes at offset {start:,}, expected {end - start:,}: the object is "
            f"shorter than when it was opened (replaced during the merge?)"
        )
    return bytes(data)


def _stamp(fs: Any, path: str, info: dict[str, Any]) -> int:
    """A number that changes when the object does: fsspec's ``ukey`` (S3's ETag, a hash of the
    file's details elsewhere), folded to 56 bits."""
    try:
        key = str(fs.ukey(path))
    except Exception:  # ukey is informational here; the details already read do as well
        key = repr(sorted((k, str(v)) for k, v in info.items()))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


class RemoteSafetensorsSource:
    """One ``.safetensors`` file behind a URL: its header read up front, each tensor by range."""

    def __init__(self, url: Url, header: SafetensorsHeader) -> None:
        self._url, self._header = url, header
        self.tensors = {name: TensorInfo(e.dtype, e.shape) for name, e in header.tensors.items()}
        self._fs: Any = None
        self._path = ""
        self._pid = -1

    @classmethod
    def open(
        cls, url: Url, fs: Any = None, path: str | None = None, info: dict[str, Any] | None = None
    ) -> RemoteSafetensorsSource:
        if fs is None or path is None:
            fs, path = filesystem(url)
        if info is None:
            info = _info(fs, path, url)
        if info.get("type") == "directory":
            raise InputError(f"{url}: is a folder; give a .safetensors file")
        size = int(info.get("size") or 0)
        # One request for the length and the header's first bytes (most headers whole).
        prefix = _read(fs, path, url, 0, min(PREFIX_BYTES, size))
        if len(prefix) < 8:
            raise InputError(
                f"{url}: truncated: {size} bytes is shorter than the 8-byte header length of a safetensors checkpoint"
            )
        length = int.from_bytes(prefix[:8], "little")
        if length > MAX_HEADER_BYTES or 8 + length > size or not prefix[8:].lstrip().startswith(b"{"):
            raise InputError(
                f"{url}: not a safetensors file (its first bytes are no safetensors header); from a URL, "
                f"unipack reads .safetensors files and model folders of them (copy .bin files locally)"
            )
        raw = prefix[8 : 8 + length] if 8 + length <= len(prefix) else b""

        def header() -> bytes:
            nonlocal raw
            raw = raw or _read(fs, path, url, 8, 8 + length)
            return raw

        check_header_limits(url, length, header)
        # A header that does not parse is a FormatError naming the URL, as a local file's is.
        parsed = parse_header(Path(url.name), size, header(), what="safetensors checkpoint", where=str(url))
        check_checkpoint_header(parsed, url)
        source = cls(url, parsed)
        source._fs, source._path, source._pid = fs, path, os.getpid()
        return source

    @property
    def path(self) -> Url:
        return self._url

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
    def files(self) -> tuple[tuple[InputPath, int], ...]:
        return ((self._url, self.file_size),)

    def filesystem(self) -> tuple[Any, str]:
        """The filesystem to read with: opened again in a forked child (fsspec's asynchronous
        filesystems refuse to run after a fork; fsspec drops its cached instances there)."""
        if self._pid != os.getpid() or self._fs is None:
            self._fs, self._path = filesystem(self._url)
            self._pid = os.getpid()
        return self._fs, self._path

    def read(self, name: str) -> np.ndarray:
        e = self._header.tensors[name]
        fs, path = self.filesystem()
        data = bytearray(_read(fs, path, self._url, e.start, e.end))  # writable, as a local read's
        return dtypes.from_bytes(data, e.dtype, e.shape)

    def close(self) -> None:
        """Nothing to release: each read is one request."""


def open_remote(url: Url) -> TensorSource:
    """The source at ``url``: a safetensors file, or a Hugging Face model folder of them."""
    fs, path = filesystem(url)
    info = _info(fs, path, url)
    if info.get("type") == "directory":
        return _open_folder(url, fs, path)
    return RemoteSafetensorsSource.open(url, fs, path, info)


def _open_folder(url: Url, fs: Any, path: str) -> HFFolderSource:
    try:
        listed = fs.ls(path, detail=True)
    except Exception as exc:
        raise InputError(f"{url}: cannot list the folder ({_why(exc)})") from None
    files = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in listed if e.get("type") != "directory"}
    if "adapter_config.json" in files:
        raise InputError(f"{url}: a PEFT adapter folder; adapters are read from local paths only: copy it locally")
    configs = {name: _config(url / name, fs, path, files[name]) for name in CONFIG_FILES if name in files}
    single, index_name, pattern, _ = LAYOUTS[0]
    shards: list[TensorSource]
    if single in files:
        shards = [RemoteSafetensorsSource.open(url / single, fs, f"{path.rstrip('/')}/{single}", files[single])]
    elif index_name in files:
        shards = _open_shards(url, fs, path, files, index_name, pattern)
    else:
        torch = [n for layout in LAYOUTS[1:] for n in layout[:2] if n in files]
        if torch:
            raise InputError(
                f"{url}: holds {torch[0]}; from a URL, unipack reads safetensors weights only (model.safetensors "
                f"or its shards): copy the folder locally, or save it with safetensors"
            )
        raise InputError(
            f"{url}: a folder without model weights (looked for {single}, {index_name}); give a Hugging Face "
            f"model folder, or the URLs of the checkpoint files in it"
        )
    return HFFolderSource(url, shards, configs or None)


def _config(url: Url, fs: Any, folder: str, info: dict[str, Any]) -> str:
    from unipack.format.manifest import MAX_CONFIG_BYTES

    size = int(info.get("size") or 0)
    where = f"{folder.rstrip('/')}/{url.name}"
    data = _read(fs, where, url, 0, min(size, MAX_CONFIG_BYTES + 1)) if size <= MAX_CONFIG_BYTES else b""
    return config_text(url, data, size)


def _open_shards(
    url: Url, fs: Any, path: str, files: dict[str, dict[str, Any]], index_name: str, pattern: Any
) -> list[TensorSource]:
    index = url / index_name
    base = path.rstrip("/")
    size = int(files[index_name].get("size") or 0)
    data = _read(fs, f"{base}/{index_name}", index, 0, min(size, MAX_INPUT_HEADER_BYTES + 1))
    weight_map = parse_weight_map(index, data)
    names = sorted(set(weight_map.values()))
    for name in names:
        if name not in files:
            raise InputError(
                f"{url / name}: a shard that {index_name} names is missing; re-upload or re-save the folder"
            )
    check_every_shard_listed(url, index, set(names), pattern, sorted(files))
    return open_listed_shards(
        index,
        weight_map,
        names,
        lambda name: RemoteSafetensorsSource.open(url / name, fs, f"{base}/{name}", files[name]),
    )


def open_binary(path: InputPath) -> BinaryIO:
    """A file object reading ``path`` from its start (a URL's: streamed through fsspec)."""
    if not isinstance(path, Url):
        return open(path, "rb")
    fs, where = filesystem(path)
    try:
        return fs.open(where, "rb")  # type: ignore[no-any-return]
    except OSError:
        raise
    except Exception as exc:
        raise OSError(_why(exc)) from None


def file_stamp(path: InputPath) -> int:
    """What tells this version of the file from another: a local file's modification time (ns),
    a URL's ``ukey`` folded to an int (see ``_stamp``)."""
    if not isinstance(path, Url):
        return os.stat(path).st_mtime_ns
    fs, where = filesystem(path)
    return _stamp(fs, where, _info(fs, where, path))


def expand(given: Sequence[str]) -> list[str]:
    """The inputs ``given`` with each URL holding ``*``, ``?`` or ``[`` replaced by the URLs it
    matches (``fs.glob``, sorted), as a shell expands a local pattern; one that matches nothing
    is an InputError. Local paths and plain URLs are kept as they are."""
    out: list[str] = []
    for item in given:
        if URL_MARK not in item or not any(c in item.split(URL_MARK, 1)[1] for c in GLOB_CHARS):
            out.append(item)
            continue
        url = Url(item)
        fs, pattern = filesystem(url)
        try:
            found = sorted(fs.glob(pattern))
        except Exception as exc:
            raise InputError(f"{url}: cannot list what the pattern matches ({_why(exc)})") from None
        if not found:
            raise InputError(f"{url}: the pattern matches nothing")
        # fsspec's paths lack the protocol: ``bucket/key`` (s3), ``/pop/a`` (memory: memory:///pop/a)
        prefix = item.split(URL_MARK, 1)[0] + URL_MARK
        out.extend(prefix + p for p in found)
    return out
