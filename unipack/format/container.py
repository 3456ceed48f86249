"""The .upk container: a valid safetensors file whose tensors are unipack's blobs.

``BundleWriter`` streams blobs to a spool file as the merge produces them (sizes are unknown
until the end), then writes header + manifest + data atomically. ``BundleFile`` validates a
bundle's header and manifest on open and reads any one blob with ``pread``, checking its
checksum, without touching the rest of the file. ``rewrite_bundle`` joins the two to change a
bundle after the fact: its blobs are copied verbatim and only the manifest and new blobs differ.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from unipack.errors import ChecksumError, FormatError
from unipack.format import codec, dtypes
from unipack.format.atomic import atomic_write, bundle_lock, check_writable, real_target, same_file, spool_file
from unipack.format.manifest import (
    BASE_REF_FORMAT_VERSION,
    CHUNKED_CODEC,
    CHUNKED_FORMAT_VERSION,
    COMPRESSED_MANIFEST_VERSION,
    FORMAT_NAME,
    MANIFEST_BLOB,
    MEMBER_NUMBERS_FORMAT_VERSION,
    NUMBERS_BLOB,
    SUPPORTED_VERSIONS,
    BlobRecord,
    Manifest,
    MemberNumbers,
    NumbersSection,
)
from unipack.format.manifest import parse as manifest_json
from unipack.format.safetensors_file import (
    SafetensorsHeader,
    TensorEntry,
    encode_header,
    read_bytes,
    read_header,
    strict_json,
)

WHAT = "unipack bundle (.upk)"
#: A manifest of more JSON than this is stored zstd-compressed (format version 4); a smaller one
#: stays in the header's metadata, where any safetensors reader shows it.
COMPRESS_MANIFEST_ABOVE = 64 << 10
MANIFEST_LEVEL = 19
#: The largest manifest a reader decompresses (the header's own JSON limit is of the same order).
MAX_MANIFEST_BYTES = 1 << 30
#: Decoded blobs no member owns that an open bundle keeps (``BundleFile.read_blob``), in bytes.
SHARED_CACHE_BYTES = 256 << 20


def blob_level(dtype: str, level: int) -> int:
    """The zstd level a blob of ``dtype`` is written at, for a bundle at ``level``. Packed
    quantization codes (U8) are near-random bytes: at the fast levels, zstd's match finder spends
    bits on spurious short matches that its level 1 skips (about 0.1-0.5 bit per code less,
    measured on Gaussian and Laplacian deltas), while the slow levels' optimal parsing avoids
    them anyway."""
    return 1 if dtype == "U8" and level <= 3 else level


class BundleWriter:
    """Collects blobs in a spool file; :meth:`finish` writes the bundle atomically."""

    def __init__(self, spool: BinaryIO, codec_name: str, level: int, chunk_bytes: int | None = None) -> None:
        self._spool = spool
        self._codec, self._level = codec_name, level
        #: zstd blobs larger than this are stored as ``zstd-chunks`` (None: one frame each).
        self.chunk_bytes = chunk_bytes
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []  # header entries in data order
        self.blobs: dict[str, BlobRecord] = {}

    @classmethod
    @contextlib.contextmanager
    def spooled(cls, out: Path, codec_name: str, level: int, chunk_bytes: int | None = None) -> Iterator[BundleWriter]:
        real = real_target(out)  # beside the file a link names: where the final write goes
        with spool_file(real.parent, real.name) as f:
            yield cls(f, codec_name, level, chunk_bytes)

    @property
    def codec_name(self) -> str:
        return self._codec

    @property
    def level(self) -> int:
        return self._level

    def level_for(self, dtype: str) -> int:
        """The zstd level a blob of ``dtype`` is written at (``blob_level``)."""
        return blob_level(dtype, self._level)

    def add(self, name: str, array: np.ndarray, dtype: str, parts: Sequence[int] | None = None) -> str:
        """Store ``array`` (held as ``dtypes.holder(dtype)``) as blob ``name``; returns the name.
        ``parts``: sizes in bytes of its consecutive sections of unlike statistics (a member's
        codes, tensor by tensor), each coded as a zstd block of its own (``codec.encode``)."""
        if name in self.blobs:
            raise ValueError(f"blob {name!r} written twice")
        data = dtypes.to_bytes(array, dtype)
        level = self.level_for(dtype)
        stored, used, shuffled = codec.encode(data, dtypes.itemsize(dtype), self._codec, level, self.chunk_bytes, parts)
        shape = tuple(int(d) for d in array.shape)
        self.blobs[name] = BlobRecord(dtype, shape, used, shuffled, codec.sha256(stored))
        if used == "none":  # an ordinary tensor that any safetensors tool can read
            self._entries.append((name, dtype, shape, len(stored)))
        else:
            self._entries.append((name, "U8", (len(stored),), len(stored)))
        self._spool.write(stored)
        return name

    def add_encoded(
        self, name: str, dtype: str, shape: tuple[int, ...], stored: codec.Buffer, codec_name: str, shuffled: bool
    ) -> str:
        """Append a blob its caller has already encoded with ``codec.encode`` (the lossless tier
        compresses several candidates and keeps one: encoding it again would double the cost)."""
        if name in self.blobs:
            raise ValueError(f"blob {name!r} written twice")
        self.blobs[name] = BlobRecord(dtype, shape, codec_name, shuffled, codec.sha256(stored))
        if codec_name == "none":
            self._entries.append((name, dtype, shape, len(stored)))
        else:
            self._entries.append((name, "U8", (len(stored),), len(stored)))
        self._spool.write(stored)
        return name

    def add_stored(self, name: str, record: BlobRecord, stored: bytes | bytearray) -> str:
        """Append a blob that is already encoded (``stored`` as read by ``BundleFile.read_stored``).

        The bytes are written verbatim, so a copied blob keeps its codec and checksum; they are
        checked against ``record`` because a mismatch would only surface in a later reader.
        """
        if name in self.blobs:
            raise ValueError(f"blob {name!r} written twice")
        if codec.sha256(stored) != record.sha256 or (record.codec == "none" and len(stored) != record.nbytes):
            raise ValueError(f"blob {name!r}: stored bytes do not match its record")
        self.blobs[name] = record
        if record.codec == "none":
            self._entries.append((name, record.dtype, record.shape, len(stored)))
        else:
            self._entries.append((name, "U8", (len(stored),), len(stored)))
        self._spool.write(stored)
        return name

    def read_blob(self, name: str) -> np.ndarray:
        """A blob already written, read back from the spool and decoded (the lossless tier
        predicts members from the means the merge has just stored)."""
        offset = 0
        for entry_name, _, _, nbytes in self._entries:
            if entry_name == name:
                break
            offset += nbytes
        else:
            raise KeyError(name)
        self._spool.flush()
        stored = os.pread(self._spool.fileno(), nbytes, offset)
        rec = self.blobs[name]
        data = codec.decode(stored, rec.codec, rec.shuffle, dtypes.itemsize(rec.dtype), rec.nbytes, f"spool: {name!r}")
        return dtypes.from_bytes(data, rec.dtype, rec.shape)

    def dtype_of(self, name: str) -> str:
        """The dtype a blob was added as."""
        return self.blobs[name].dtype

    @property
    def stored_sizes(self) -> dict[str, int]:
        """Each blob's size as written (its stored, encoded bytes)."""
        return {name: nbytes for name, _, _, nbytes in self._entries}

    def finish(self, manifest: Manifest, out: Path, *, force: bool, numbers_apart: bool = True) -> int:
        """Write ``out`` = header (with the manifest) + spooled data; returns the file size.

        ``numbers_apart``: a large manifest's member numbers go to their own section (version 9);
        False keeps them in it (version 4), as ``add`` does for a bundle written that way.

        Under the bundle's writers' lock (``bundle_lock``): a bundle replaced by ``merge --force``
        is never renamed into place in the middle of an ``add`` to it.
        """
        if any(b.codec == CHUNKED_CODEC for b in manifest.blobs.values()):
            # Readers of versions 1 to 6 know no chunked blob: only a bundle with one says 7.
            manifest = dataclasses.replace(
                manifest, format_version=max(manifest.format_version, CHUNKED_FORMAT_VERSION)
            )
        if manifest.base is not None:
            # Readers before version 10 cannot rebuild a delta centred on a base model they never
            # see: only a bundle that references one says 10.
            manifest = dataclasses.replace(
                manifest, format_version=max(manifest.format_version, BASE_REF_FORMAT_VERSION)
            )
        text = manifest_json.to_json(manifest)
        packed = numbers = None
        if len(text.encode("utf-8")) > COMPRESS_MANIFEST_ABOVE and not numbers_apart:
            manifest = dataclasses.replace(
                manifest, format_version=max(manifest.format_version, COMPRESSED_MANIFEST_VERSION)
            )
            text = manifest_json.to_json(manifest)
            packed = _compress(text)
        elif len(text.encode("utf-8")) > COMPRESS_MANIFEST_ABOVE:
            # A large manifest (per-member error lists, the blob table) is mostly repetition:
            # zstd stores it in a fifth of the bytes (the demo's: 94 KB -> 19 KB), which is real
            # compression ratio for small models (version 4). Most of it is the members'
            # informative numbers, which loading a member never needs: they go to a section of
            # their own, read only when asked for, so that opening parses a third of the JSON
            # (version 9; the 31-member open benchmark's 193 KB -> 81 KB).
            manifest = dataclasses.replace(
                manifest, format_version=max(manifest.format_version, MEMBER_NUMBERS_FORMAT_VERSION)
            )
            text = manifest_json.to_json(manifest, numbers_apart=True)
            packed = _compress(text)
            numbers_text = manifest_json.numbers_to_json(manifest)
            numbers = _compress(numbers_text)
        raw = text.encode("utf-8")
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(manifest.format_version),
            "manifest_sha256": codec.sha256(raw),
        }
        entries = list(self._entries)
        if packed is None:
            metadata["manifest"] = text
        else:
            metadata["manifest_codec"] = "zstd"
            metadata["manifest_bytes"] = str(len(raw))
        if numbers is not None:
            numbers_raw = numbers_text.encode("utf-8")
            metadata["numbers_bytes"] = str(len(numbers_raw))
            metadata["numbers_sha256"] = codec.sha256(numbers_raw)
            entries.append((NUMBERS_BLOB, "U8", (len(numbers),), len(numbers)))
        if packed is not None:
            entries.append((MANIFEST_BLOB, "U8", (len(packed),), len(packed)))
        header = encode_header(entries, metadata)
        spool = self._spool
        spool.flush()
        spool.seek(0)
        with bundle_lock(out), atomic_write(out, force=force) as f:
            f.write(header)
            shutil.copyfileobj(spool, f, 1 << 22)
            for section in (numbers, packed):  # in the order of their entries
                if section is not None:
                    f.write(section)
            size = f.tell()
        return size


class BundleFile:
    """An open, validated bundle. Reading a blob reads only that blob's bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._shared: frozenset[str] | None = None
        # The path is opened once and everything (header, manifest, blobs) is read through this
        # one descriptor: a writer may rename a new bundle over the path at any moment, and a
        # header read by name and data read by a second open could come from two files.
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            self.header = read_header(self.path, what=WHAT, fd=self._fd)
            self.manifest = _read_manifest(self.header, self._fd)
            _check_layout(self.header, self.manifest)
        except BaseException:
            self.close()
            raise

    def read_stored(self, name: str) -> bytes | bytearray:
        """The blob's bytes as stored in the file (still encoded), checksum verified.

        A fresh bytearray: converting it to ``bytes`` would copy a possibly large blob.
        """
        if self._fd is None:
            raise FormatError(f"{self.path}: bundle is closed")
        stored = read_bytes(self._fd, self.header.tensors[name], self.path)
        if codec.sha256(stored) != self.manifest.blobs[name].sha256:
            raise ChecksumError(
                f"{self.path}: blob {name!r} is corrupt (checksum mismatch); "
                f"the file was damaged after it was written: re-download or re-merge it"
            )
        return stored

    def read_blob(self, name: str) -> np.ndarray:
        """The blob's logical array (held as ``dtypes.holder(dtype)``), checksum verified (a
        chunked blob's frames, each against its digest, as they decode).

        A tensor's mean (every member's rebuild reads it) is kept decoded, read-only, up to
        ``SHARED_CACHE_BYTES`` in all, so that loading several members through one open bundle
        (``extract --all``, a server) decodes it once."""
        if name not in self._shared_names():
            return self._decoded(name, verify=True)
        with self._cache_lock:
            cached = self._cache.get(name)
            if cached is not None:
                self._cache.move_to_end(name)
                return cached
        array = self._decoded(name, verify=True)
        if array.nbytes <= SHARED_CACHE_BYTES:
            array.setflags(write=False)
            with self._cache_lock:
                self._cache[name] = array
                self._cache_bytes += array.nbytes
                while self._cache_bytes > SHARED_CACHE_BYTES:
                    _, dropped = self._cache.popitem(last=False)
                    self._cache_bytes -= dropped.nbytes
        return array

    def _shared_names(self) -> frozenset[str]:
        """The tensors' means: blobs every member's rebuild computes from and none returns as
        it is (an identical tensor's blob is returned to the caller, who may write to it)."""
        if self._shared is None:
            means = (getattr(t.params, "mean", None) for t in self.manifest.tensors)
            self._shared = frozenset(m for m in means if isinstance(m, str))
        return self._shared

    def read_unverified(self, name: str) -> np.ndarray:
        """:meth:`read_blob` without checking the stored checksums, for a caller that checks what
        it builds from the blob against digests of its own (exact extraction, spec §9.2 step 4).
        Decoding stays bounded and strict: a damaged blob gives an error or other bits, never
        more memory than its record allows."""
        return self._decoded(name, verify=False)

    def read_part(self, name: str, offset: int, length: int) -> bytearray:
        """Bytes ``[offset, offset + length)`` of a blob's stored bytes, unverified (a chunked
        blob's index or one frame: each chunk reads its own frame, so reading is parallel too)."""
        if self._fd is None:
            raise FormatError(f"{self.path}: bundle is closed")
        entry = self.header.tensors[name]
        if not 0 <= offset <= offset + length <= entry.nbytes:
            raise FormatError(f"{self.path}: blob {name!r}: bytes {offset} to {offset + length} are outside it")
        return read_bytes(
            self._fd,
            dataclasses.replace(entry, start=entry.start + offset, end=entry.start + offset + length),
            self.path,
        )

    def chunk_index(self, name: str) -> codec.ChunkIndex:
        """A ``zstd-chunks`` blob's index, read and checked (its frames are not read)."""
        rec, entry = self.manifest.blobs[name], self.header.tensors[name]
        where = f"{self.path}: blob {name!r}"
        head = self.read_part(name, 0, min(codec.INDEX_HEAD, entry.nbytes))
        head = self.read_part(name, 0, min(codec.index_length(head), entry.nbytes))
        return codec.chunk_index(head, dtypes.itemsize(rec.dtype), rec.nbytes, where, entry.nbytes)

    def _decoded(self, name: str, *, verify: bool) -> np.ndarray:
        rec = self.manifest.blobs[name]
        if rec.codec == CHUNKED_CODEC:
            return self._chunked(name, verify)
        if verify:
            stored = self.read_stored(name)
        else:
            if self._fd is None:
                raise FormatError(f"{self.path}: bundle is closed")
            stored = read_bytes(self._fd, self.header.tensors[name], self.path)
        itemsize, where = dtypes.itemsize(rec.dtype), f"{self.path}: blob {name!r}"
        data = codec.decode(stored, rec.codec, rec.shuffle, itemsize, rec.nbytes, where, verify=verify)
        return dtypes.from_bytes(data, rec.dtype, rec.shape)

    def _chunked(self, name: str, verify: bool) -> np.ndarray:
        """A ``zstd-chunks`` blob, each chunk read, verified and decoded on the chunk pool."""
        rec, where = self.manifest.blobs[name], f"{self.path}: blob {name!r}"
        index, itemsize = self.chunk_index(name), dtypes.itemsize(rec.dtype)
        out = np.empty(rec.nbytes, np.uint8)

        def one(k: int) -> None:
            start, stop = index.span(k)
            offset, length, _ = index.frames[k]
            frame = self.read_part(name, offset, length)
            part = out[start * itemsize : stop * itemsize].data
            codec.decode_chunk(frame, index, k, rec.shuffle, itemsize, part, where, verify=verify)

        codec.run_chunks(one, index.count)
        return dtypes.from_bytes(out.data, rec.dtype, rec.shape)

    def read_header_bytes(self) -> bytes:
        """The header exactly as stored: 8-byte length, JSON, padding."""
        if self._fd is None:
            raise FormatError(f"{self.path}: bundle is closed")
        return os.pread(self._fd, self.header.data_start, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()
        self._cache_bytes = 0

    def __enter__(self) -> BundleFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _compress(text: str) -> bytes:
    return zstandard.ZstdCompressor(level=MANIFEST_LEVEL).compress(text.encode("utf-8"))


def _read_manifest(header: SafetensorsHeader, fd: int) -> Manifest:
    p = header.path
    meta = header.metadata or {}
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{p}: not a {WHAT}: its safetensors metadata has no format={FORMAT_NAME!r} (is it a plain checkpoint?)"
        )
    version = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version) or int(version) not in SUPPORTED_VERSIONS:
        raise FormatError(
            f"{p}: .upk format version {version!r} is not supported by this unipack "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade unipack"
        )
    text = _manifest_text(header, fd, int(version))
    if codec.sha256(text.encode("utf-8")) != meta.get("manifest_sha256"):
        raise ChecksumError(f"{p}: the manifest is corrupt (checksum mismatch); re-download or re-merge it")
    numbers = _numbers_section(header, fd, int(version))
    # ``loads``: strict_json's rules, faster on a manifest of many numbers.
    manifest = manifest_json.from_json(manifest_json.loads(text, f"{p}: manifest"), str(p), numbers)
    if manifest.format_version != int(version):
        raise FormatError(f"{p}: header says format version {version}, manifest says {manifest.format_version}")
    return manifest


def _manifest_text(header: SafetensorsHeader, fd: int, version: int) -> str:
    """The manifest's JSON: from the header's metadata, or (version 4, ``manifest_codec``) from
    the zstd-compressed ``MANIFEST_BLOB`` tensor, bounded by its recorded size."""
    p, meta = header.path, header.metadata or {}
    if "manifest_codec" not in meta:
        text = meta.get("manifest")
        if text is None:
            raise FormatError(f"{p}: corrupt {WHAT}: the manifest is missing")
        return text
    if version < COMPRESSED_MANIFEST_VERSION or "manifest" in meta:
        raise FormatError(
            f"{p}: corrupt {WHAT}: a compressed manifest needs format version "
            f"{COMPRESSED_MANIFEST_VERSION} and no manifest in the header"
        )
    if meta.get("manifest_codec") != "zstd":
        raise FormatError(f"{p}: manifest codec {meta.get('manifest_codec')!r} is not supported (only 'zstd')")
    size = _declared_size(header, "manifest_bytes")
    entry = _trailing_section(header, 1, MANIFEST_BLOB, "the compressed manifest is not the last tensor")
    stored = read_bytes(fd, entry, p)
    try:
        data = _decompress_section(bytes(stored), size)
    except zstandard.ZstdError as exc:
        raise ChecksumError(f"{p}: the manifest is corrupt ({exc}); re-download or re-merge it") from None
    if len(data) != size:
        raise ChecksumError(f"{p}: the manifest is corrupt (it holds {len(data)} bytes, not {size})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ChecksumError(f"{p}: the manifest is corrupt (not UTF-8)") from None


def _numbers_section(header: SafetensorsHeader, fd: int, version: int) -> NumbersSection | None:
    """The members' numbers section (version 9, spec §2.4), or None where the bundle has none.

    Its place and size are checked here, and its stored bytes read (one small ``pread``, so that
    the section does not depend on the descriptor staying open); decompressing, checking and
    parsing them wait until some member's numbers are first asked for.
    """
    p, meta = header.path, header.metadata or {}
    if "numbers_bytes" not in meta and "numbers_sha256" not in meta:
        if NUMBERS_BLOB in header.tensors:
            raise FormatError(f"{p}: corrupt {WHAT}: a {NUMBERS_BLOB!r} tensor without numbers_bytes")
        return None
    if version < MEMBER_NUMBERS_FORMAT_VERSION or "manifest_codec" not in meta:
        raise FormatError(
            f"{p}: corrupt {WHAT}: a members' numbers section needs format version "
            f"{MEMBER_NUMBERS_FORMAT_VERSION} and a compressed manifest"
        )
    size = _declared_size(header, "numbers_bytes")
    digest = meta.get("numbers_sha256", "")
    entry = _trailing_section(header, 2, NUMBERS_BLOB, "the members' numbers are not the tensor before the manifest")
    stored = bytes(read_bytes(fd, entry, p))
    if size > codec.MAX_RATIO * len(stored):  # what any compressed blob may claim (a bomb otherwise)
        raise FormatError(
            f"{p}: corrupt {WHAT}: the members' numbers claim {size} bytes from {len(stored)} stored "
            f"(more than {codec.MAX_RATIO}x)"
        )

    def load(members: int, tensors: int) -> tuple[MemberNumbers, ...]:
        where = f"{p}: the members' numbers section"
        try:
            data = _decompress_section(stored, size)
        except zstandard.ZstdError as exc:
            raise ChecksumError(f"{where} is corrupt ({exc}); re-download or re-merge the bundle") from None
        if len(data) != size or codec.sha256(data) != digest:
            raise ChecksumError(f"{where} is corrupt (checksum mismatch); re-download or re-merge the bundle")
        return manifest_json.parse_numbers(data.decode("utf-8"), where, members, tensors)

    return NumbersSection(load)


def _decompress_section(stored: bytes, size: int) -> bytes:
    """A compressed section's one zstd frame, decoded to at most ``size`` bytes (spec 2.3, 2.4).

    zstd's one-shot ``decompress`` sizes its output by the content size the frame's header
    declares and honours ``max_output_size`` only for a frame that declares none: a damaged header
    declaring exabytes would be allocated (a MemoryError, not an error about the file). So a
    declared size other than ``size`` is refused before anything is decoded; unipack's frames
    declare theirs. Raises ``zstandard.ZstdError``, as decompressing does."""
    declared = zstandard.get_frame_parameters(stored[:18]).content_size
    if declared not in (size, zstandard.CONTENTSIZE_UNKNOWN):
        raise zstandard.ZstdError(f"its zstd frame declares {declared} bytes, not {size}")
    return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size)


def _declared_size(header: SafetensorsHeader, key: str) -> int:
    """A compressed section's decoded size as the header's metadata ``key`` declares it: a
    decimal of 1 to ``MAX_MANIFEST_BYTES`` bytes."""
    size = (header.metadata or {}).get(key, "")
    if not re.fullmatch(r"[0-9]{1,10}", size) or not 0 < int(size) <= MAX_MANIFEST_BYTES:
        raise FormatError(
            f"{header.path}: corrupt {WHAT}: {key} {size!r} is not a size up to {MAX_MANIFEST_BYTES} bytes"
        )
    return int(size)


def _trailing_section(header: SafetensorsHeader, from_end: int, name: str, misplaced: str) -> TensorEntry:
    """The header entry of a section stored after the blobs (``from_end``: 1 for the last tensor),
    which must be ``name``, a 1-D U8 tensor; ``misplaced`` says what is wrong otherwise."""
    entries = list(header.tensors.values())
    entry = entries[-from_end] if len(entries) >= from_end else None
    if entry is None or entry.name != name or entry.dtype != "U8" or len(entry.shape) != 1:
        raise FormatError(f"{header.path}: corrupt {WHAT}: {misplaced}, {name!r} (U8)")
    return entry


def _check_layout(header: SafetensorsHeader, manifest: Manifest) -> None:
    """Header tensors and manifest blobs correspond one to one (plus a compressed manifest, the
    last tensor), and the data has no gaps."""
    p = header.path
    names, blobs = set(header.tensors) - {MANIFEST_BLOB, NUMBERS_BLOB}, set(manifest.blobs)
    if names != blobs:
        extra, missing = sorted(names - blobs)[:3], sorted(blobs - names)[:3]
        raise FormatError(
            f"{p}: header and manifest disagree (stored but unlisted: {extra}; listed but not stored: {missing})"
        )
    cursor = header.data_start
    for e in header.tensors.values():  # in data order
        if e.start != cursor:
            raise FormatError(f"{p}: gap or overlap before blob {e.name!r} in the data section")
        cursor = e.end
        if e.name in (MANIFEST_BLOB, NUMBERS_BLOB):  # checked where they were read: U8, the last two
            continue
        rec = manifest.blobs[e.name]
        if rec.codec == "none":
            if (e.dtype, e.shape) != (rec.dtype, rec.shape):
                raise FormatError(
                    f"{p}: blob {e.name!r} is stored as {e.dtype}{list(e.shape)} but the "
                    f"manifest says {rec.dtype}{list(rec.shape)}"
                )
        elif e.dtype != "U8" or len(e.shape) != 1:
            raise FormatError(f"{p}: compressed blob {e.name!r} must be stored as a 1-D U8 tensor")
    if cursor != header.file_size:
        raise FormatError(f"{p}: {header.file_size - cursor} unaccounted bytes after the last blob")


def rewrite_bundle(
    path: Path,
    update: Callable[[Manifest, BundleWriter], Manifest],
    *,
    out: Path | None = None,
    force: bool = False,
    source: BundleFile | None = None,
    rewritten: Collection[str] = (),
) -> int:
    """Rewrite the bundle at ``path`` with a new manifest and, optionally, new blobs.

    Every existing blob is copied verbatim (checksum verified, never decoded), one at a time
    and in its data order, so unchanged blobs keep their bytes. Then ``update(old_manifest,
    writer)`` may append blobs with ``writer.add`` and returns the new manifest, whose ``blobs``
    must be ``writer.blobs``. The result goes atomically to ``out`` (default: ``path`` itself,
    which, like any existing output, needs ``force=True``). On any error no file changes and no
    temp or spool file remains. New blobs are coded as the bundle's recorded options say.
    Returns the new file's size.

    Rewriting in place holds the bundle's writers' lock (``bundle_lock``) from reading the old
    bundle to renaming the new one, so concurrent rewrites of one bundle (``add``) run one after
    the other and none is lost. ``source``: the bundle at ``path`` already open (the caller then
    holds the lock from before it opened it, if it rewrites in place); it is read, not closed.
    ``rewritten``: blobs not copied, which ``update`` writes again under the same names (a blob
    holding every member's data, that a new member's data is appended to).
    """
    target = Path(out) if out is not None else Path(path)
    check_writable(target, force=force)  # refuse before copying anything
    in_place = out is None or same_file(target, path)
    with bundle_lock(target) if in_place else contextlib.nullcontext(), _opened(path, source) as old:
        codec_name, level = _recorded_codec(old.manifest.options)
        with BundleWriter.spooled(target, codec_name, level) as writer:
            for name in old.header.tensors:  # data order
                if name not in (MANIFEST_BLOB, NUMBERS_BLOB, *rewritten):  # finish() writes the new manifest
                    writer.add_stored(name, old.manifest.blobs[name], old.read_stored(name))
            manifest = update(old.manifest, writer)
            if manifest.blobs != writer.blobs:
                raise ValueError("rewrite_bundle: the new manifest must list exactly the writer's blobs")
            # A reader would refuse an inconsistent manifest: refuse to write one (a bug in
            # ``update``, not the user's fault, hence not a FormatError).
            text = manifest_json.to_json(manifest)
            try:
                manifest_json.from_json(strict_json(text, f"{target}: new manifest"), f"{target} (rewritten)")
            except FormatError as exc:
                raise ValueError(f"rewrite_bundle: the new manifest is invalid: {exc}") from None
            # A bundle keeps its layout: one that readers of version 4 read stays readable by them.
            numbers_apart = old.manifest.format_version >= MEMBER_NUMBERS_FORMAT_VERSION
            return writer.finish(manifest, target, force=force, numbers_apart=numbers_apart)


@contextlib.contextmanager
def _opened(path: Path, source: BundleFile | None) -> Iterator[BundleFile]:
    """``source`` as it is (its owner closes it), or ``path`` opened here and closed after."""
    if source is not None:
        yield source
    else:
        with BundleFile(path) as f:
            yield f


def _recorded_codec(options: dict[str, object]) -> tuple[str, int]:
    """The codec and zstd level the bundle was merged with (zstd level 3 if it does not say)."""
    name, level = options.get("codec"), options.get("zstd_level")
    if name not in codec.CODECS:
        name = "zstd"
    if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22:
        level = 3
    return str(name), level
