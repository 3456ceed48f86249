"""An independent .upk reader (format versions 1 to 11), written from ``format_spec/upk-v1.md``
alone, checked against unipack.

The reader part of this file (everything above the "Fixtures" banner) was written from the
specification only, without looking at unipack's implementation, and uses nothing but the
standard library and numpy (plus ``zstandard``, imported lazily, for ``codec: "zstd"`` blobs).
It covers version 1 (checkpoints: ``shared`` / ``raw`` / ``exact`` records) and version 2
(LoRA adapters, section 7: ``lora`` records in ``subspace`` or ``factors`` form, the members'
``lora`` maps, cores in the coefficient blobs, and the reference rebuild of §7.2) and version 3
(section 8: ``delta`` records, steps in the coefficient blobs, radix-packed codes in the members'
``codes`` blobs, and the rebuild of §8.2), version 5 (section 9: the lossless tier, a member's
``exact`` map and its residual blobs, rebuilt bit for bit by §9.2) and version 6 (section 10:
``lora`` records in ``quant`` and ``cast`` form, each adapter's own factors from its steps and
codes or its coefficient block), version 7 (§3.1: ``zstd-chunks`` blobs, a chunk index and one
frame per chunk; §9.1: a residual's ``chunk_sha256``) and version 8 (§7.4: a member added later
holding a module of any form as its own factors, an override), and version 10 (§11: ``delta``
records centred on a base model the bundle references by sha256; the base is given to the reader
as a dict of its tensors, read from its file by the caller), and version 11 (§12: ``lora`` records
in ``subspace-factored`` form, each member's core as its factors P Q, cast or quantized).
If the two disagree, the tests follow the specification: see the section numbers quoted in the
comments ("§2.1" etc. refer to format_spec/upk-v1.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

# ======================================================================================
# The reader (spec only: stdlib + numpy; zstandard lazily for zstd blobs)
# ======================================================================================

SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
_MANIFEST_BLOB = "__manifest__"  # §2.3
_NUMBERS_BLOB = "__numbers__"  # §2.4
_MAX_HEADER = 100 * 1024 * 1024  # §2.1: H larger than 100 MiB is rejected

# §2.2: name -> (numpy dtype used to hold the array, size in bytes)
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # held as its 16-bit pattern
    "F8_E4M3": ("u1", 1),
    "F8_E5M2": ("u1", 1),  # held as 8-bit patterns
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U64": ("<u8", 8),
    "U32": ("<u4", 4),
    "U16": ("<u2", 2),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),  # converted to numpy bool after checking 0/1
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_COEF_DTYPES = ("F32", "F16", "BF16")  # §3.2: the coefficient dtype
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SpecFormatError(Exception):
    """The file breaks a rule of the specification (version 1 or 2)."""


class SpecChecksumError(SpecFormatError):
    """A SHA-256 recorded in the file does not match the bytes."""


class SpecVersionError(SpecFormatError):
    """A format version this reader does not support."""


def _strict_json(text: str, what: str) -> Any:
    """JSON with duplicate keys and NaN/Infinity literals rejected (§2.1, §3)."""

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SpecFormatError(f"{what}: duplicate JSON key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise SpecFormatError(f"{what}: {name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs_hook, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise SpecFormatError(f"{what}: not valid JSON ({exc})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecFormatError(msg)


def _section_frame(stored: bytes, size: int, what: str) -> bytes:
    """§2.3, §2.4: one zstd frame that decompresses to exactly ``size`` bytes, decompressing no more
    than that. zstd's one-shot call allocates what the frame's header declares (its bound applies
    only to a frame that declares nothing), so a declared size is checked first."""
    try:
        declared = zstandard.get_frame_parameters(stored[:18]).content_size
    except zstandard.ZstdError as exc:
        raise SpecChecksumError(f"{what} is not a zstd frame: {exc}") from None
    if declared not in (size, zstandard.CONTENTSIZE_UNKNOWN):
        raise SpecChecksumError(f"{what}: its frame declares {declared} bytes, not {size}")
    try:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise SpecChecksumError(f"{what} does not decompress: {exc}") from None


def _shape_ok(shape: Any) -> bool:
    return isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)


def _per_byte(levels: int) -> int:
    """§8.1: k, the codes of L levels one byte holds (the largest k with L^k <= 256)."""
    k = 1
    while levels ** (k + 1) <= 256:
        k += 1
    return k


def _prod(shape: list[int]) -> int:
    return math.prod(shape)  # math.prod([]) == 1: a scalar has one element


def _bf16_to_f64(bits: np.ndarray) -> np.ndarray:
    """§4 step 2: shift the 16 bits left by 16 and read as binary32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _f64_to_bf16(w: np.ndarray) -> np.ndarray:
    """§4 step 3: round to binary32, then to its upper 16 bits, ties to even; NaN stays NaN."""
    f32 = np.ascontiguousarray(w, dtype=np.float64).astype(np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = np.isnan(f32)
    quiet = (bits >> np.uint64(16)) | np.uint64(0x0040)  # keep sign, force a quiet NaN
    return np.where(nan, quiet, rounded).astype(np.uint16)


def _widen(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return _bf16_to_f64(arr)
    _need(dtype in _FLOAT_DTYPES, f"expected a float dtype, got {dtype}")
    return arr.astype(np.float64)


def _round_to(w: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F64":
        return w.astype(np.float64)
    if dtype == "F32":
        return w.astype(np.float32)
    if dtype == "F16":
        return w.astype(np.float16)
    if dtype == "BF16":
        return _f64_to_bf16(w)
    raise SpecFormatError(f"a shared tensor cannot have dtype {dtype}")


def _factor_keys(module: str) -> tuple[str, str]:
    """§7.1: the adapter file keys of a LoRA module's factors A (r x in) and B (out x r)."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def _lora_factors(
    u: np.ndarray | None, core: np.ndarray | None, v: np.ndarray | None, r: int, s: float, out_dim: int, in_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """§7.2 steps 1-3: float64 factors A' (r x in), B' (out x r) of a subspace update U C V^T,
    such that s * B' A' = U C V^T (before rounding). ``core`` is None when k_out * k_in = 0."""
    a = np.zeros((r, in_dim))
    b = np.zeros((out_dim, r))
    if core is None or s == 0:  # a zero update (k_out k_in = 0), or all zero when s = 0
        return a, b
    k_out, k_in = core.shape
    # Step 1: the thin SVD C = X Sigma Y^T; keep q = min(r, #{sigma_j > sigma_1 max(k_out, k_in) 2^-52}).
    x, sigma, yt = np.linalg.svd(core, full_matrices=False)
    tol = sigma[0] * max(k_out, k_in) * 2.0**-52
    q = min(r, int(np.count_nonzero(sigma > tol)))
    x, sigma, yt = x[:, :q], sigma[:q], yt[:q, :]
    # Step 2: each kept column of X has its largest-magnitude entry (the first on a tie) positive.
    if q:
        where = np.argmax(np.abs(x), axis=0)
        flip = np.where(x[where, np.arange(q)] < 0, -1.0, 1.0)
        x = x * flip
        yt = yt * flip[:, None]
    # Step 3: B0 = U X sqrt(Sigma), A0 = sqrt(Sigma) Y^T V^T; c = 1/|s|; B' = sign(s) sqrt(c) B0, A' = sqrt(c) A0.
    root = np.sqrt(sigma)
    b0 = (u @ x) * root
    a0 = (root[:, None] * yt) @ v.T
    rc = math.sqrt(1.0 / abs(s))
    b[:, :q] = (math.copysign(1.0, s) * rc) * b0
    a[:q, :] = rc * a0
    return a, b


class SpecBundle:
    """A validated v1 or v2 bundle (§4.2, §7.3: every check is made before any number is used)."""

    def __init__(self, path: str | Path, base: dict[str, tuple[str, np.ndarray]] | None = None) -> None:
        """``base``: the base model's tensors by their names in it, ``(dtype, array)`` (§11)."""
        self.path = Path(path)
        self.base = base
        self._read_header()
        self._check_manifest()

    # ---------------------------------------------------------------- §2 layout
    def _read_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            _need(len(head) == 8, "file shorter than 8 bytes")
            (h,) = struct.unpack("<Q", head)
            _need(h <= _MAX_HEADER, f"header length {h} exceeds 100 MiB")
            _need(8 + h <= size, f"header length {h} exceeds the file ({size} bytes)")
            raw_header = f.read(h)
        try:
            text = raw_header.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecFormatError(f"header is not UTF-8 ({exc})") from None
        header = _strict_json(text, "header")
        _need(isinstance(header, dict), "header is not a JSON object")
        self.data_start = 8 + h
        self.data_len = size - self.data_start

        meta = header.pop("__metadata__", None)
        _need(isinstance(meta, dict), "header has no __metadata__ object")
        plain = {"format", "format_version", "manifest", "manifest_sha256"}
        packed = {"format", "format_version", "manifest_codec", "manifest_bytes", "manifest_sha256"}
        numbered = packed | {"numbers_bytes", "numbers_sha256"}  # §2.4
        _need(
            set(meta) in (plain, packed, numbered),
            f"__metadata__ must have exactly format, format_version, manifest_sha256 and either manifest or "
            f"manifest_codec + manifest_bytes (+ numbers_bytes + numbers_sha256); got {sorted(meta)}",
        )
        _need(all(isinstance(v, str) for v in meta.values()), "__metadata__ values must be strings")
        _need(meta["format"] == "unipack.upk", f"format is {meta['format']!r}, not 'unipack.upk'")
        _need(
            re.fullmatch(r"[0-9]+", meta["format_version"]) is not None,
            f"format_version {meta['format_version']!r} is not a decimal string",
        )
        version = int(meta["format_version"])
        if version not in SUPPORTED_VERSIONS:
            raise SpecVersionError(
                f"file has format version {version}; this reader supports version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        self.version = version
        self.meta = meta
        _need(set(meta) == plain or version >= 4, f"a compressed manifest needs version 4, not {version}")
        _need(set(meta) != numbered or version >= 9, f"a numbers section needs version 9, not {version}")

        # Blob entries and the tiling rule.
        self.entries: dict[str, dict[str, Any]] = {}
        ranges = []
        for name, entry in header.items():
            _need(isinstance(entry, dict), f"header entry {name!r} is not an object")
            dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            _need(dtype in _DTYPES, f"blob {name!r}: unknown dtype {dtype!r}")
            _need(_shape_ok(shape), f"blob {name!r}: bad shape {shape!r}")
            _need(
                isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs),
                f"blob {name!r}: bad data_offsets {offs!r}",
            )
            b, e = offs
            _need(
                0 <= b <= e <= self.data_len,
                f"blob {name!r}: offsets {offs} outside the data section ({self.data_len} bytes)",
            )
            _need(
                e - b == _prod(shape) * _DTYPES[dtype][1], f"blob {name!r}: {e - b} bytes for shape {shape} of {dtype}"
            )
            self.entries[name] = {"dtype": dtype, "shape": shape, "begin": b, "end": e}
            ranges.append((b, e, name))
        cursor = 0
        for b, e, name in sorted(ranges):
            _need(b >= cursor, f"blob {name!r} overlaps the previous blob")
            _need(b == cursor, f"gap of {b - cursor} bytes before blob {name!r}")
            cursor = e
        _need(cursor == self.data_len, f"{self.data_len - cursor} bytes after the last blob")
        # §2.3: the compressed manifest is the last range, a U8 vector, and not a blob.
        self.packed_manifest = self._section(
            sorted(ranges), "manifest_codec" in meta, _MANIFEST_BLOB, 1, "the compressed manifest", "manifest_codec"
        )
        # §2.4: the numbers section is the range before the compressed manifest, a U8 vector.
        self.packed_numbers = self._section(
            sorted(ranges), "numbers_bytes" in meta, _NUMBERS_BLOB, 2, "the numbers section", "numbers_bytes"
        )

    def _section(
        self, ranges: list[tuple[int, int, str]], declared: bool, name: str, from_end: int, what: str, key: str
    ) -> bytes | None:
        """The stored bytes of the section ``name``, ``from_end`` ranges from the end of the data,
        where the metadata ``declared`` it (``key``); taken out of the blob entries."""
        if not declared:
            _need(name not in self.entries, f"{name!r} without {key}")
            return None
        there = ranges[-from_end][2] if len(ranges) >= from_end else None
        _need(there == name, f"range {from_end} from the end is {there!r}, not {what}")
        entry = self.entries.pop(name)
        _need(entry["dtype"] == "U8" and len(entry["shape"]) == 1, f"{what} is not a U8 vector")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry["begin"])
            return f.read(entry["end"] - entry["begin"])

    # ---------------------------------------------------------------- §3 manifest
    def _manifest_text(self) -> str:
        if self.packed_manifest is None:
            return self.meta["manifest"]
        _need(self.meta["manifest_codec"] == "zstd", f"manifest codec {self.meta['manifest_codec']!r}")
        size = self.meta["manifest_bytes"]
        _need(re.fullmatch(r"[0-9]+", size) is not None and 0 < int(size) <= 2**30, f"manifest_bytes {size!r}")
        data = _section_frame(self.packed_manifest, int(size), "compressed manifest")
        if len(data) != int(size):
            raise SpecChecksumError(f"compressed manifest holds {len(data)} bytes, not {size}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecChecksumError("compressed manifest is not UTF-8") from None

    def _join_numbers(self, members: list[Any]) -> None:
        """§2.4: each member's errors and fidelity, from the numbers section (and only there), put
        into its record, where the checks of §3.3 then see them."""
        size = self.meta["numbers_bytes"]
        _need(re.fullmatch(r"[0-9]+", size) is not None and 0 < int(size) <= 2**30, f"numbers_bytes {size!r}")
        _need(int(size) <= 1024 * len(self.packed_numbers), f"numbers_bytes {size} is over 1024x the stored section")
        data = _section_frame(self.packed_numbers, int(size), "numbers section")
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != self.meta["numbers_sha256"]:
            raise SpecChecksumError("numbers section: size or sha256 mismatch")
        try:
            doc = _strict_json(data.decode("utf-8"), "numbers section")
        except UnicodeDecodeError:
            raise SpecChecksumError("numbers section is not UTF-8") from None
        entries = doc.get("members") if isinstance(doc, dict) else None
        _need(isinstance(entries, list) and len(entries) == len(members), "numbers section: one entry per member")
        for mem, entry in zip(members, entries):
            _need(isinstance(mem, dict) and isinstance(entry, dict), "numbers section: entries are objects")
            _need("errors" not in mem and "fidelity" not in mem, "errors or fidelity in the manifest and the section")
            mem["errors"] = entry.get("errors")
            if "fidelity" in entry:
                mem["fidelity"] = entry["fidelity"]

    def _check_manifest(self) -> None:
        text = self._manifest_text()
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest != self.meta["manifest_sha256"]:
            raise SpecChecksumError(
                f"manifest sha256 mismatch: recorded {self.meta['manifest_sha256']}, computed {digest}"
            )
        m = _strict_json(text, "manifest")
        _need(isinstance(m, dict), "manifest is not a JSON object")
        _need(m.get("format") == "unipack.upk", "manifest format is not 'unipack.upk'")
        mv = m.get("format_version")
        _need(_is_int(mv), f"manifest format_version {mv!r} is not an integer")
        if mv not in SUPPORTED_VERSIONS:
            raise SpecVersionError(
                f"file has format version {mv}; this reader supports version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        _need(mv == self.version, f"format_version differs: header {self.version}, manifest {mv}")
        self.manifest = m
        self._check_base_table(m.get("base"))

        # Blob records (§3.1) against the header entries (§3.5: the same set).
        blobs = m.get("blobs")
        _need(isinstance(blobs, dict), "manifest blobs is not an object")
        _need(
            set(blobs) == set(self.entries),
            f"blobs in header and manifest differ: {sorted(set(blobs) ^ set(self.entries))}",
        )
        for name, rec in blobs.items():
            _need(isinstance(rec, dict), f"blob record {name!r} is not an object")
            dtype, shape, codec = rec.get("dtype"), rec.get("shape"), rec.get("codec")
            _need(dtype in _DTYPES, f"blob record {name!r}: unknown dtype {dtype!r}")
            _need(_shape_ok(shape), f"blob record {name!r}: bad shape")
            _need(codec in ("none", "zstd", "zstd-chunks"), f"blob record {name!r}: unknown codec {codec!r}")
            _need(codec != "zstd-chunks" or self.version >= 7, f"blob {name!r}: zstd-chunks needs version 7")
            _need(isinstance(rec.get("shuffle"), bool), f"blob record {name!r}: shuffle is not a bool")
            _need(
                isinstance(rec.get("sha256"), str) and _HEX64.fullmatch(rec["sha256"]) is not None,
                f"blob record {name!r}: sha256 is not 64 lowercase hex digits",
            )
            entry = self.entries[name]
            if codec == "none":
                _need(
                    entry["dtype"] == dtype and entry["shape"] == shape,
                    f"blob {name!r}: codec none but header says {entry['dtype']} {entry['shape']}",
                )
                _need(rec["shuffle"] is False, f"blob {name!r}: shuffle with codec none")
            else:
                _need(
                    entry["dtype"] == "U8" and entry["shape"] == [entry["end"] - entry["begin"]],
                    f"blob {name!r}: a zstd blob must be U8 of its stored length",
                )
                if _DTYPES[dtype][1] == 1:
                    _need(rec["shuffle"] is False, f"blob {name!r}: shuffle with a 1-byte dtype")
        self.blobs = blobs

        # Tensor records (§3.2).
        tensors = m.get("tensors")
        members = m.get("members")
        _need(isinstance(tensors, list), "manifest tensors is not a list")
        _need(isinstance(members, list) and members, "manifest members is not a non-empty list")
        if self.packed_numbers is not None:
            self._join_numbers(members)
        used: dict[str, str] = {}

        def use(
            blob: Any, why: str, dtype: str | None = None, shape: list[int] | None = None, float_ok: bool = False
        ) -> None:
            _need(isinstance(blob, str), f"{why}: blob name is not a string")
            _need(blob in blobs, f"{why}: blob {blob!r} does not exist")
            _need(blob not in used, f"blob {blob!r} used twice ({used.get(blob)}; {why})")
            used[blob] = why
            rec = blobs[blob]
            if float_ok:
                _need(rec["dtype"] in _FLOAT_DTYPES, f"{why}: blob {blob!r} is not float")
            if dtype is not None:
                _need(rec["dtype"] == dtype, f"{why}: blob {blob!r} is {rec['dtype']}, expected {dtype}")
            if shape is not None:
                _need(rec["shape"] == shape, f"{why}: blob {blob!r} has shape {rec['shape']}, expected {shape}")

        names: set[str] = set()
        # §3.2 / §7.1: basis blobs, and the U / V blobs of subspace modules, share the coefficient dtype.
        coef_dtypes = {
            blobs[t[key]]["dtype"]
            for t in tensors
            if isinstance(t, dict)
            for key in (
                ("basis",)
                if t.get("storage") == "shared"
                else ("left", "right")
                if t.get("storage") == "lora" and t.get("form") in ("subspace", "subspace-factored")
                else ()
            )
            if isinstance(t.get(key), str) and t[key] in blobs
        }
        _need(len(coef_dtypes) <= 1, f"basis / U / V blobs have different dtypes: {sorted(coef_dtypes)}")
        self.coef_dtype = coef_dtypes.pop() if coef_dtypes else None
        _need(
            self.coef_dtype is None or self.coef_dtype in _COEF_DTYPES,
            f"coefficient dtype {self.coef_dtype} is not F32, F16 or BF16",
        )
        self.coef_layout: dict[str, tuple[int, list[int]]] = {}  # shared name -> (offset, C shape)
        self.core_shapes: dict[str, list[int]] = {}  # subspace module with k_out k_in > 0 -> [k_out, k_in]
        self.lora_modules: dict[str, dict[str, Any]] = {}  # §7.1: name -> lora record
        self.delta_layout: dict[str, dict[str, int]] = {}  # §8.1: name -> levels, group, k, G, P
        self.centred: set[str] = set()  # §11: delta tensors centred on the base model
        self.own_layout: dict[str, dict[str, Any]] = {}  # §10.1: quant / cast module -> form, L, k
        self.factored_layout: dict[str, dict[str, Any]] = {}  # §12.1: module -> ranks, R, L (or None), k
        coef_total = 0
        raw_names = []
        for t in tensors:
            _need(isinstance(t, dict), "tensor record is not an object")
            name = t.get("name")
            _need(isinstance(name, str) and name not in names, f"bad or duplicate tensor name {name!r}")
            names.add(name)
            storage, dtype, shape = t.get("storage"), t.get("dtype"), t.get("shape")
            _need(storage in ("shared", "raw", "exact", "lora", "delta"), f"{name}: unknown storage {storage!r}")
            _need(dtype in _DTYPES, f"{name}: unknown dtype {dtype!r}")
            _need(isinstance(t.get("reason"), str), f"{name}: reason is not a string")
            _need(_shape_ok(shape) or (shape is None and storage == "raw"), f"{name}: bad shape {shape!r}")
            if storage == "lora":
                # §7, §7.3: lora records only in version 2.
                _need(
                    self.version >= 2,
                    f"{name}: a lora record in a format version {self.version} bundle (lora storage needs version 2)",
                )
                _need(dtype in _FLOAT_DTYPES, f"{name}: lora module with non-float dtype {dtype}")
                _need(
                    len(shape) == 2 and all(d > 0 for d in shape),
                    f"{name}: a lora module's shape must be [out, in] with no zero, got {shape}",
                )
                out_dim, in_dim = shape
                form = t.get("form")
                _need(
                    form in ("subspace", "factors", "quant", "cast", "subspace-factored"),
                    f"{name}: unknown lora form {form!r}",
                )
                if form in ("quant", "cast"):
                    # §10, §10.3: the adapters' own factors, quantized or cast, from version 6.
                    _need(self.version >= 6, f"{name}: lora form {form} in a format version {self.version} bundle")
                    levels = t.get("levels") if form == "quant" else 0
                    if form == "quant":
                        _need(_is_int(levels) and 2 <= levels <= 256, f"{name}: levels {levels!r} not in 2..256")
                    k = _per_byte(levels) if form == "quant" else 1
                    self.own_layout[name] = {"form": form, "levels": levels, "per_byte": k, "codes": t.get("codes")}
                if form in ("subspace", "subspace-factored"):
                    ranks = t.get("ranks")
                    _need(
                        isinstance(ranks, list) and len(ranks) == 2 and all(_is_int(k) for k in ranks),
                        f"{name}: ranks {ranks!r} is not [k_out, k_in]",
                    )
                    k_out, k_in = ranks
                    least = 1 if form == "subspace-factored" else 0  # §12.1: a factored core needs both bases
                    _need(
                        least <= k_out <= out_dim and least <= k_in <= in_dim,
                        f"{name}: ranks {ranks} outside {least}..{shape}",
                    )
                if form == "subspace-factored":
                    # §12.1, §12.3: version 11; U, V never null; 1 <= R <= min(k_out, k_in); levels
                    # absent (cast) or 2..256 with a codes blob (quantized).
                    _need(self.version >= 11, f"{name}: lora form {form} in a format version {self.version} bundle")
                    use(t.get("left"), f"left of {name}", dtype=self.coef_dtype, shape=[out_dim, k_out])
                    use(t.get("right"), f"right of {name}", dtype=self.coef_dtype, shape=[in_dim, k_in])
                    core_rank = t.get("core_rank")
                    _need(
                        _is_int(core_rank) and 1 <= core_rank <= min(k_out, k_in),
                        f"{name}: core_rank {core_rank!r} not in 1..{min(k_out, k_in)}",
                    )
                    levels = t.get("levels")
                    _need(
                        levels is None or (_is_int(levels) and 2 <= levels <= 256),
                        f"{name}: levels {levels!r} not in 2..256",
                    )
                    _need((t.get("codes") is None) == (levels is None), f"{name}: codes present iff levels")
                    self.factored_layout[name] = {
                        "ranks": ranks,
                        "core_rank": core_rank,
                        "levels": levels,
                        "per_byte": 1 if levels is None else _per_byte(levels),
                        "codes": t.get("codes"),
                    }
                if form == "subspace":
                    for key, k, blob_shape in (("left", k_out, [out_dim, k_out]), ("right", k_in, [in_dim, k_in])):
                        if k == 0:
                            _need(t.get(key) is None, f"{name}: {key} blob with a zero rank")
                        else:
                            use(t.get(key), f"{key} of {name}", dtype=self.coef_dtype, shape=blob_shape)
                    if k_out * k_in > 0:
                        self.core_shapes[name] = [k_out, k_in]
                self.lora_modules[name] = t
            elif storage == "delta":
                # §8.1, §8.3: version 3; levels 2..256, group 1..D; a float mean of the tensor's shape.
                _need(self.version >= 3, f"{name}: a delta record in a format version {self.version} bundle")
                _need(dtype in _FLOAT_DTYPES, f"{name}: delta tensor with non-float dtype {dtype}")
                d = _prod(shape)
                _need(d >= 1, f"{name}: delta tensor with no element")
                levels, group = t.get("levels"), t.get("group")
                _need(_is_int(levels) and 2 <= levels <= 256, f"{name}: levels {levels!r} not in 2..256")
                _need(_is_int(group) and 1 <= group <= d, f"{name}: group {group!r} not in 1..{d}")
                step = t.get("mean_step")
                center = t.get("center", "mean")
                _need(center in ("mean", "base", None), f"{name}: center {center!r} is not mean or base")
                if center == "base":  # §11.2: no mean; the base table lists it at this dtype and shape
                    _need(self.version >= 10, f"{name}: a delta centred on a base in a version {self.version} bundle")
                    _need(t.get("mean") is None and step is None, f"{name}: a base-centred delta with a mean")
                    ref = self.base_table.get(name)
                    _need(ref is not None, f"{name}: centred on the base, which the base table does not list")
                    assert ref is not None
                    _need(ref["dtype"] == dtype and ref["shape"] == shape, f"{name}: base tensor of another kind")
                    self.centred.add(name)
                elif step is None:
                    use(t.get("mean"), f"mean of {name}", shape=shape, float_ok=True)
                else:  # §8.1: a quantized mean, I16 integers times a positive finite step
                    _need(
                        isinstance(step, (int, float))
                        and not isinstance(step, bool)
                        and math.isfinite(step)
                        and step > 0,
                        f"{name}: mean_step {step!r} is not a positive finite number",
                    )
                    use(t.get("mean"), f"mean of {name}", dtype="I16", shape=shape)
                k = _per_byte(levels)
                self.delta_layout[name] = {
                    "levels": levels,
                    "group": group,
                    "per_byte": k,
                    "steps": -(-d // group),
                    "bytes": -(-d // k),
                }
            elif storage == "raw":
                raw_names.append(name)
            elif storage == "exact":
                use(t.get("blob"), f"exact {name}", dtype=dtype, shape=shape)
            else:
                _need(dtype in _FLOAT_DTYPES, f"{name}: shared tensor with non-float dtype {dtype}")
                scheme, k = t.get("scheme"), t.get("rank")
                _need(scheme in ("rows", "flat"), f"{name}: unknown scheme {scheme!r}")
                _need(_is_int(k) and k >= 0, f"{name}: bad rank {k!r}")
                _need(t.get("energy") is None or _is_number(t.get("energy")), f"{name}: bad energy")
                use(t.get("mean"), f"mean of {name}", shape=shape, float_ok=True)
                if scheme == "flat":
                    d = _prod(shape)
                    _need(k <= d, f"{name}: rank {k} > D {d}")
                    basis_shape, c_shape = [k, d], [k]
                else:
                    side = t.get("side")
                    _need(side in ("right", "left"), f"{name}: unknown side {side!r}")
                    _need(len(shape) >= 1, f"{name}: rows scheme needs at least one dimension")
                    mm, nn = shape[0], _prod(shape[1:])
                    _need(t.get("matrix") == [mm, nn], f"{name}: matrix {t.get('matrix')} != {[mm, nn]}")
                    if side == "right":
                        _need(k <= nn, f"{name}: rank {k} > n {nn}")
                        basis_shape, c_shape = [nn, k], [mm, k]
                    else:
                        _need(k <= mm, f"{name}: rank {k} > m {mm}")
                        basis_shape, c_shape = [mm, k], [k, nn]
                if k == 0:
                    _need(t.get("basis") is None, f"{name}: rank 0 with a basis")
                else:
                    use(t.get("basis"), f"basis of {name}", dtype=self.coef_dtype, shape=basis_shape)
                    self.coef_layout[name] = (coef_total, c_shape)
                    coef_total += _prod(c_shape)
        self.tensors = tensors
        self.coef_total = coef_total
        _need(set(self.base_table) == self.centred, "the manifest base lists tensors no delta is centred on")

        # Member records (§3.3).
        member_names: set[str] = set()
        by_name = {t["name"]: t for t in tensors}
        self.member_layout: dict[str, dict[str, tuple[int, list[int]]]] = {}
        self.code_layout: dict[str, dict[str, int]] = {}  # member -> delta tensor -> byte offset
        self.quant_codes: dict[str, dict[str, tuple[int, int]]] = {}  # quant module -> member -> (offset, P)
        self.lora_overrides: dict[str, set[str]] = {}  # member -> modules it holds as its own factors (§7.4)
        quant_total: dict[str, int] = {}  # quant module -> bytes its codes blob must hold
        for i, mem in enumerate(members):
            _need(isinstance(mem, dict), f"member {i} is not an object")
            mname = mem.get("name")
            _need(
                isinstance(mname, str)
                and 1 <= len(mname) <= 255
                and not mname.startswith(".")
                and not any(c in mname for c in "/\\")
                and not any(unicodedata.category(c) == "Cc" for c in mname),
                f"member {i}: invalid name {mname!r}",
            )
            _need(mname not in member_names, f"duplicate member name {mname!r}")
            member_names.add(mname)
            _need(isinstance(mem.get("source"), str), f"member {mname}: source is not a string")
            _need(_is_int(mem.get("source_bytes")) and mem["source_bytes"] >= 0, f"member {mname}: bad source_bytes")
            md = mem.get("metadata")
            _need(
                md is None or (isinstance(md, dict) and all(isinstance(v, str) for v in md.values())),
                f"member {mname}: metadata is not null or a string->string object",
            )
            dts = mem.get("dtypes")
            _need(
                isinstance(dts, dict) and all(k in by_name and v in _DTYPES for k, v in dts.items()),
                f"member {mname}: bad dtypes map",
            )
            errs = mem.get("errors")
            _need(
                isinstance(errs, list) and len(errs) == len(tensors) and all(_is_number(e) and e >= 0 for e in errs),
                f"member {mname}: errors must be one non-negative number per tensor",
            )
            # §3.3 / §7.3: the lora map names lora modules, each with [r >= 1 (int), finite s].
            lora = mem.get("lora")
            lora = {} if lora is None else lora
            _need(isinstance(lora, dict), f"member {mname}: lora map is not an object")
            for mod, rs in lora.items():
                _need(mod in self.lora_modules, f"member {mname}: lora map names {mod!r}, not a lora module")
                _need(isinstance(rs, list) and len(rs) == 2, f"member {mname}: lora[{mod!r}] is not [r, s]")
                _need(_is_int(rs[0]) and rs[0] >= 1, f"member {mname}: lora[{mod!r}] rank {rs[0]!r} is not an int >= 1")
                _need(_is_number(rs[1]), f"member {mname}: lora[{mod!r}] scale {rs[1]!r} is not a finite number")
                # §7.3: the adapter file held the module's factors: r (out + in) numbers at the member's dtype.
                mod_dtype = (mem.get("dtypes") or {}).get(mod, self.lora_modules[mod]["dtype"])
                _need(
                    mod_dtype not in _DTYPES
                    or rs[0] * sum(self.lora_modules[mod]["shape"]) * _DTYPES[mod_dtype][1]
                    <= mem.get("source_bytes", 0),
                    f"member {mname}: lora[{mod!r}] rank {rs[0]} takes more bytes than its adapter file",
                )
            raw = mem.get("raw")
            # §3.3: every raw tensor, plus overrides of shared or exact tensors; §7.1: plus the factor
            # keys of every factors module the member touches, and never a lora module itself.
            factor_keys: dict[str, str] = {}  # key -> module
            # §7.4: a module of another form that the member holds as its own factors (an override,
            # version 8): its raw map has the module's A key.
            overrides = {
                mod for mod in lora if self.lora_modules[mod]["form"] != "factors" and _factor_keys(mod)[0] in raw
            }
            _need(
                not overrides or self.version >= 8,
                f"member {mname}: a lora override in a version {self.version} bundle",
            )
            self.lora_overrides[mname] = overrides
            for mod in lora:
                if self.lora_modules[mod]["form"] == "factors" or mod in overrides:
                    for key in _factor_keys(mod):
                        # A key that is also a tensor name would make two tensors of the member's
                        # file share a name (the spec is silent: this reader refuses it).
                        _need(key not in by_name, f"{mname}: factor key {key!r} is also a tensor name")
                        factor_keys[key] = mod
            _need(isinstance(raw, dict), f"member {mname}: raw map is not an object")
            _need(
                not (set(raw) & set(self.lora_modules)),
                f"member {mname}: raw map names lora module(s) {sorted(set(raw) & set(self.lora_modules))}",
            )
            _need(
                set(raw_names) <= set(raw) <= set(by_name) | set(factor_keys),
                f"member {mname}: raw map must name every raw tensor and only known tensors "
                f"(or the factor keys of factors modules it touches)",
            )
            _need(
                set(factor_keys) <= set(raw),
                f"member {mname}: factor blobs missing for {sorted(set(factor_keys) - set(raw))}",
            )
            for tname, t in by_name.items():
                mdt = dts.get(tname, t["dtype"])
                if t["storage"] == "lora":
                    _need(mdt in _FLOAT_DTYPES, f"{mname}: lora module {tname} with dtype {mdt}")
                    if tname in lora and (t["form"] == "factors" or tname in overrides):
                        r = lora[tname][0]
                        out_dim, in_dim = t["shape"]
                        key_a, key_b = _factor_keys(tname)
                        use(raw[key_a], f"{key_a} of {mname}", dtype=mdt, shape=[r, in_dim])
                        use(raw[key_b], f"{key_b} of {mname}", dtype=mdt, shape=[out_dim, r])
                elif tname in raw:
                    use(raw[tname], f"raw {tname} of {mname}", dtype=mdt, shape=t["shape"])
                elif t["storage"] == "exact":
                    _need(mdt == t["dtype"], f"{mname}: exact tensor {tname} with member dtype {mdt}")
                else:
                    _need(
                        t["storage"] == "raw" or mdt in _FLOAT_DTYPES,
                        f"{mname}: shared tensor {tname} with dtype {mdt}",
                    )
            # The member's own coefficient layout (§3.3, §7.1), in tensors order: the C of each shared
            # rank>0 tensor it does not override, and the core of each subspace module with
            # k_out k_in > 0 that it touches.
            # §8.1: and the G steps of each delta tensor it does not override; its codes blob holds
            # the P bytes of each of those, in the same order.
            layout, total = {}, 0
            code_layout, code_total = {}, 0
            for tname in by_name:
                if tname in self.coef_layout and tname not in raw:
                    c_shape = self.coef_layout[tname][1]
                elif tname in overrides:
                    continue  # §7.4: an override has no block and no codes
                elif tname in self.core_shapes and tname in lora:
                    c_shape = self.core_shapes[tname]
                elif tname in self.delta_layout and tname not in raw:
                    c_shape = [self.delta_layout[tname]["steps"]]
                    code_layout[tname] = code_total
                    code_total += self.delta_layout[tname]["bytes"]
                elif tname in self.own_layout and tname in lora:
                    # §10.1: quant: 2r steps and ceil(r (in + out) / k) code bytes; cast: r (in + out) values.
                    # the quant codes live in the record's codes blob, in member order
                    r = lora[tname][0]
                    n = r * sum(by_name[tname]["shape"])
                    if self.own_layout[tname]["form"] == "quant":
                        c_shape = [2 * r]
                        size = -(-n // self.own_layout[tname]["per_byte"])
                        self.quant_codes.setdefault(tname, {})[mname] = (quant_total.get(tname, 0), size)
                        quant_total[tname] = quant_total.get(tname, 0) + size
                    else:
                        c_shape = [n]
                elif tname in self.factored_layout and tname in lora:
                    # §12.1: a core of rank c = min(r, R): 2c steps and ceil(c (k_in + k_out) / k)
                    # code bytes in the record's codes blob (quantized), or its c (k_in + k_out) values.
                    info = self.factored_layout[tname]
                    c = min(lora[tname][0], info["core_rank"])
                    n = c * sum(info["ranks"])
                    if info["levels"] is not None:
                        c_shape = [2 * c]
                        size = -(-n // info["per_byte"])
                        self.quant_codes.setdefault(tname, {})[mname] = (quant_total.get(tname, 0), size)
                        quant_total[tname] = quant_total.get(tname, 0) + size
                    else:
                        c_shape = [n]
                else:
                    continue
                layout[tname] = (total, c_shape)
                total += _prod(c_shape)
            self.member_layout[mname] = layout
            self.code_layout[mname] = code_layout
            coef = mem.get("coefficients")
            if total > 0:
                if self.coef_dtype is None and isinstance(coef, str) and coef in blobs:
                    # No basis fixes the coefficient dtype (delta tensors only): the first member's does.
                    self.coef_dtype = blobs[coef]["dtype"]
                    _need(
                        self.coef_dtype in _COEF_DTYPES, f"coefficient dtype {self.coef_dtype} is not F32, F16 or BF16"
                    )
                use(coef, f"coefficients of {mname}", dtype=self.coef_dtype, shape=[total])
            else:
                _need(coef is None, f"member {mname}: coefficients without any shared rank>0 tensor or core")
            codes = mem.get("codes")
            if code_total > 0:
                use(codes, f"codes of {mname}", dtype="U8", shape=[code_total])
            else:
                _need(codes is None, f"member {mname}: a codes blob without any delta tensor")
        # §10.1: a quant record's codes blob holds every touching member's P bytes, in member order.
        for tname, info in self.own_layout.items():
            if info["form"] == "quant":
                use(info["codes"], f"codes of {tname}", dtype="U8", shape=[quant_total.get(tname, 0)])
        # §12.1: so does a quantized subspace-factored record's.
        for tname, info in self.factored_layout.items():
            if info["levels"] is not None:
                use(info["codes"], f"codes of {tname}", dtype="U8", shape=[quant_total.get(tname, 0)])
        self.members = {mem["name"]: mem for mem in members}
        # §9.1, §9.3: the lossless tier, one entry per tensor; residual blobs U<w> of the tensor's shape.
        for mem in members:
            exact = mem.get("exact")
            if exact is None:
                continue
            mname = mem["name"]
            _need(self.version >= 5, f"member {mname}: an exact map in a version {self.version} bundle")
            _need(
                isinstance(exact, dict) and set(exact) == set(by_name),
                f"member {mname}: exact map must list every tensor",
            )
            for tname, e in exact.items():
                _need(isinstance(e, dict), f"member {mname}: exact[{tname!r}] is not an object")
                _need(
                    isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) is not None,
                    f"member {mname}: exact[{tname!r}] sha256 is not 64 lowercase hex digits",
                )
                if e.get("blob") is None:
                    _need(e.get("coding") is None and e.get("base") is None, f"{mname}/{tname}: coding without blob")
                    continue
                t = by_name[tname]
                mdt = mem["dtypes"].get(tname, t["dtype"])
                coding, base = e.get("coding"), e.get("base")
                _need(mdt in _FLOAT_DTYPES and t.get("shape") is not None, f"{mname}/{tname}: residual of a non-float")
                _need(coding in ("bits", "xor", "sub"), f"{mname}/{tname}: unknown coding {coding!r}")
                _need((base is None) == (coding == "bits"), f"{mname}/{tname}: base present iff coding is not bits")
                if base == "mean":
                    _need(
                        isinstance(t.get("mean"), str) or tname in self.centred,  # §11.3: the base is its center
                        f"{mname}/{tname}: mean base on a record without a mean",
                    )
                elif base is not None:
                    # §9.2: a chain of at most 3 member bases, each another member with a tier, same dtype.
                    here, hops = mname, 0
                    while base not in (None, "mean"):
                        hops += 1
                        other = self.members.get(base)
                        _need(other is not None and base != here, f"{mname}/{tname}: base {base!r} is not a member")
                        oe = (other.get("exact") or {}).get(tname)
                        _need(isinstance(oe, dict), f"{mname}/{tname}: base {base!r} has no exact entry")
                        _need(other["dtypes"].get(tname, t["dtype"]) == mdt, f"{mname}/{tname}: base dtype differs")
                        _need(hops <= 3, f"{mname}/{tname}: more than 3 member bases in a chain (or a cycle)")
                        here, base = base, oe.get("base")
                width = _DTYPES[mdt][1]
                use(e["blob"], f"residual {mname}/{tname}", dtype=f"U{8 * width}", shape=t["shape"])
                # §9.1: chunk_sha256 exactly for a zstd-chunks residual, a list of digests.
                chunked = blobs[e["blob"]]["codec"] == "zstd-chunks"
                digests = e.get("chunk_sha256")
                _need((digests is not None) == chunked, f"{mname}/{tname}: chunk_sha256 iff zstd-chunks")
                _need(
                    digests is None
                    or (isinstance(digests, list) and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in digests)),
                    f"{mname}/{tname}: chunk_sha256 is not a list of sha256 digests",
                )
        unused = set(blobs) - set(used)
        _need(not unused, f"blobs not referenced by the manifest: {sorted(unused)}")

    # ---------------------------------------------------------------- blobs and members
    def blob_stored_bytes(self, name: str) -> bytes:
        entry = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry["begin"])
            data = f.read(entry["end"] - entry["begin"])
        _need(len(data) == entry["end"] - entry["begin"], f"blob {name!r} is truncated")
        return data

    def decode_blob(self, name: str) -> np.ndarray:
        rec = self.blobs[name]
        stored = self.blob_stored_bytes(name)
        digest = hashlib.sha256(stored).hexdigest()
        if digest != rec["sha256"]:  # §3.1: verify before decoding
            raise SpecChecksumError(f"blob {name!r}: sha256 mismatch (recorded {rec['sha256']}, computed {digest})")
        np_dtype, size = _DTYPES[rec["dtype"]]
        n = _prod(rec["shape"])
        logical = n * size
        if rec["codec"] == "zstd-chunks":
            data = b"".join(self._chunks(name, stored, n, size, rec["shuffle"]))
        elif rec["codec"] == "zstd":
            import zstandard  # lazily: only zstd blobs need it

            try:
                content_size = zstandard.get_frame_parameters(stored).content_size
            except zstandard.ZstdError as exc:
                raise SpecFormatError(f"blob {name!r}: not a zstd frame ({exc})") from None
            _need(
                content_size not in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR),
                f"blob {name!r}: zstd frame does not declare its content size",
            )
            _need(content_size == logical, f"blob {name!r}: frame declares {content_size} bytes, expected {logical}")
            try:
                data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=logical, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise SpecFormatError(f"blob {name!r}: bad zstd frame ({exc})") from None
            _need(len(data) == logical, f"blob {name!r}: decompressed to {len(data)} bytes, expected {logical}")
            if rec["shuffle"]:
                data = np.frombuffer(data, np.uint8).reshape(size, n).T.tobytes()
        else:
            data = stored
        arr = np.frombuffer(data, dtype=np_dtype).reshape(rec["shape"]).copy()
        if rec["dtype"] == "BOOL":
            _need(bool(np.all(arr <= 1)), f"blob {name!r}: BOOL value other than 0 or 1")
            arr = arr.astype(np.bool_)
        return arr

    @staticmethod
    def chunk_table(name: str, stored: bytes, n: int) -> tuple[int, list[tuple[bytes, bytes]]]:
        """§3.1 zstd-chunks: the index (E, then per chunk its frame and digest), checked."""
        _need(len(stored) >= 12 and n >= 1, f"blob {name!r}: no chunk index")
        per, count = struct.unpack_from("<QI", stored, 0)
        _need(per >= 1 and count == (n + per - 1) // per, f"blob {name!r}: {count} chunks of {per} for {n}")
        pos = 12 + 40 * count
        _need(pos <= len(stored), f"blob {name!r}: chunk index runs past the blob")
        frames = []
        for k in range(count):
            (length,) = struct.unpack_from("<Q", stored, 12 + 40 * k)
            digest = stored[12 + 40 * k + 8 : 12 + 40 * k + 40]
            _need(length >= 1 and pos + length <= len(stored), f"blob {name!r}: chunk {k} runs past the blob")
            frames.append((stored[pos : pos + length], digest))
            pos += length
        _need(pos == len(stored), f"blob {name!r}: bytes after the last frame")
        return per, frames

    def _chunks(self, name: str, stored: bytes, n: int, size: int, shuffle: bool) -> list[bytes]:
        """§3.1 zstd-chunks: every chunk's logical bytes, each frame verified against its digest."""
        import zstandard

        per, frames = self.chunk_table(name, stored, n)
        _need(n * size <= 1024 * len(stored) + 65536, f"blob {name!r}: beyond the 1024:1 ratio")  # the whole blob
        out = []
        for k, (frame, digest) in enumerate(frames):
            if hashlib.sha256(frame).digest() != digest:
                raise SpecChecksumError(f"blob {name!r}: chunk {k} sha256 mismatch")
            count = min(per, n - k * per)
            logical = count * size
            try:
                declared = zstandard.get_frame_parameters(frame).content_size
                data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=logical, allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise SpecFormatError(f"blob {name!r}: chunk {k}: bad zstd frame ({exc})") from None
            _need(declared == logical == len(data), f"blob {name!r}: chunk {k} is not {logical} bytes")
            if shuffle:  # §3.1: the chunk's own byte planes
                data = np.frombuffer(data, np.uint8).reshape(size, count).T.tobytes()
            out.append(data)
        return out

    def _check_base_table(self, base: Any) -> None:
        """§11.1: the manifest's ``base``: source, sha256 over its tensors' lines, one entry per
        tensor centred on it (checked against the records once they are read)."""
        self.base_table: dict[str, dict[str, Any]] = {}
        if base is None:
            return
        _need(self.version >= 10, f"a manifest base in a version {self.version} bundle")
        _need(isinstance(base, dict) and isinstance(base.get("source"), str), "manifest base is not an object")
        tensors = base.get("tensors")
        _need(isinstance(tensors, dict) and tensors, "manifest base lists no tensors")
        for name, e in tensors.items():
            _need(
                isinstance(e, dict)
                and isinstance(e.get("name"), str)
                and e.get("dtype") in _DTYPES
                and _shape_ok(e.get("shape"))
                and isinstance(e.get("sha256"), str)
                and _HEX64.fullmatch(e["sha256"]) is not None,
                f"manifest base entry {name!r} is malformed",
            )
        _need(len({e["name"] for e in tensors.values()}) == len(tensors), "manifest base names a base tensor twice")
        lines = "".join(f"{e['name']} {e['sha256']}\n" for e in sorted(tensors.values(), key=lambda e: e["name"]))
        _need(hashlib.sha256(lines.encode()).hexdigest() == base.get("sha256"), "manifest base sha256 mismatch")
        self.base_table = tensors

    def base_values(self, name: str) -> tuple[str, np.ndarray]:
        """§11.2: the base's tensor for bundle tensor ``name``, checked, as (dtype, its array)."""
        ref = self.base_table[name]
        if self.base is None:
            raise SpecFormatError(f"tensor {name}: needs the base model {self.manifest['base']['source']}")
        _need(ref["name"] in self.base, f"the base lacks {ref['name']}")
        dtype, arr = self.base[ref["name"]]
        _need(dtype == ref["dtype"] and list(arr.shape) == ref["shape"], f"base tensor {ref['name']}: another kind")
        if hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != ref["sha256"]:
            raise SpecChecksumError(f"base tensor {ref['name']}: sha256 differs")
        return dtype, arr

    def read_member(self, member: str) -> dict[str, tuple[str, np.ndarray]]:
        """§4: rebuild every tensor of ``member``, in the order of ``tensors``."""
        if member not in self.members:
            raise KeyError(member)
        mem = self.members[member]
        coef = None
        if mem.get("coefficients") is not None:
            coef = _widen(self.decode_blob(mem["coefficients"]), self.coef_dtype)
        codes = None  # decoded when the first delta tensor needs it
        out: dict[str, tuple[str, np.ndarray]] = {}
        lora = mem.get("lora") or {}
        for t in self.tensors:
            name = t["name"]
            mdt = mem["dtypes"].get(name, t["dtype"])
            if t["storage"] == "lora":  # §7.2: M.lora_A.weight then M.lora_B.weight, if touched
                if name not in lora:
                    continue
                key_a, key_b = _factor_keys(name)
                if t["form"] == "factors" or name in self.lora_overrides[member]:
                    out[key_a] = (mdt, self.decode_blob(mem["raw"][key_a]))
                    out[key_b] = (mdt, self.decode_blob(mem["raw"][key_b]))
                    continue
                if name in self.own_layout:  # §10.2
                    a, b = self._own_factors(member, t, lora[name][0], coef)
                    out[key_a] = (mdt, _round_to(a, mdt))
                    out[key_b] = (mdt, _round_to(b, mdt))
                    continue
                r, s = lora[name]
                u, core, v = self._subspace_parts(member, t, coef)
                a, b = _lora_factors(u, core, v, r, s, *t["shape"])
                out[key_a] = (mdt, _round_to(a, mdt))  # §7.2 step 4
                out[key_b] = (mdt, _round_to(b, mdt))
                continue
            if name in mem["raw"]:  # a raw tensor, or this member's override (§4 step 1)
                out[name] = (mdt, self.decode_blob(mem["raw"][name]))
                continue
            if t["storage"] == "exact":
                out[name] = (mdt, self.decode_blob(t["blob"]))
                continue
            shape = t["shape"]
            if name in self.centred:  # §11.2: the base's tensor, widened, is M
                base_dtype, base_array = self.base_values(name)
                mean = _widen(base_array, base_dtype)
            elif t.get("mean_step") is not None:  # §8.2 step 1: integers times the step, in float64
                mean = self.decode_blob(t["mean"]).astype(np.float64) * float(t["mean_step"])
            else:
                mean = _widen(self.decode_blob(t["mean"]), self.blobs[t["mean"]]["dtype"])
            if t["storage"] == "delta":  # §8.2
                if codes is None:
                    codes = self.decode_blob(mem["codes"])
                out[name] = (mdt, _round_to(self._delta(member, t, mean, coef, codes), mdt))
                continue
            if t["rank"] == 0:
                w = mean
            else:
                basis = _widen(self.decode_blob(t["basis"]), self.coef_dtype)
                off, c_shape = self.member_layout[member][name]
                c = coef[off : off + _prod(c_shape)].reshape(c_shape)
                if t["scheme"] == "flat":
                    w = mean + (c @ basis).reshape(shape)
                else:
                    mm, nn = t["matrix"]
                    if t["side"] == "right":
                        w = (mean.reshape(mm, nn) + c @ basis.T).reshape(shape)
                    else:
                        w = (mean.reshape(mm, nn) + basis @ c).reshape(shape)
            out[name] = (mdt, _round_to(w, mdt))
        return out

    def read_member_exact(self, member: str) -> dict[str, tuple[str, np.ndarray]]:
        """§9.2: every tensor of ``member`` bit for bit, each checked against its recorded sha256."""
        mem = self.members[member]
        _need(mem.get("exact") is not None, f"member {member}: no lossless tier")
        lossy = self.read_member(member)
        return {name: (dt, self._exact_tensor(member, name, lossy)) for name, (dt, _) in lossy.items()}

    def _exact_tensor(self, member: str, name: str, lossy: dict[str, tuple[str, np.ndarray]] | None) -> np.ndarray:
        mem = self.members[member]
        e = mem["exact"][name]
        if e.get("blob") is None:  # step 1: the §4 rebuild is the original
            dt, arr = (lossy or self.read_member(member))[name]
        else:
            t = next(t for t in self.tensors if t["name"] == name)
            dt = mem["dtypes"].get(name, t["dtype"])
            r = self.decode_blob(e["blob"]).reshape(-1)
            udt = r.dtype
            if e["base"] == "mean" and name in self.centred:  # §11.3: the base's tensor is the prediction
                bdt, barr = self.base_values(name)
                same = bdt == dt
                p = (np.ascontiguousarray(barr) if same else _round_to(_widen(barr, bdt), dt)).reshape(-1).view(udt)
            elif e["base"] == "mean":  # step 2: the mean, float64, rounded to the member's dtype
                if t["storage"] == "delta" and t.get("mean_step") is not None:
                    mean = self.decode_blob(t["mean"]).astype(np.float64) * float(t["mean_step"])
                else:
                    mean = _widen(self.decode_blob(t["mean"]), self.blobs[t["mean"]]["dtype"])
                p = np.ascontiguousarray(_round_to(mean.reshape(-1), dt)).view(udt)
            elif e["base"] is not None:
                p = np.ascontiguousarray(self._exact_tensor(e["base"], name, None)).reshape(-1).view(udt)
            one = np.array(1, udt)
            if e["coding"] == "bits":
                x = r
            elif e["coding"] == "xor":
                x = r ^ p
            else:  # step 3, sub: zigzag decoding, then add modulo 2^w
                d = (r >> one) ^ (np.zeros((), udt) - (r & one))
                x = p + d
            arr = x.view(_DTYPES[dt][0]).reshape(t["shape"])
        raw = np.ascontiguousarray(arr).tobytes()
        if e.get("chunk_sha256") is not None:  # §9.2 step 4: each chunk's element range
            digests = e["chunk_sha256"]
            per, _ = self.chunk_table(e["blob"], self.blob_stored_bytes(e["blob"]), arr.size)
            _need(len(digests) == (arr.size + per - 1) // per, f"{member}/{name}: chunk_sha256 count")
            step = per * arr.itemsize
            for k, digest in enumerate(digests):
                if hashlib.sha256(raw[k * step : (k + 1) * step]).hexdigest() != digest:
                    raise SpecChecksumError(f"member {member} tensor {name}: chunk {k} of the rebuilt tensor differs")
        got = hashlib.sha256(raw).hexdigest()
        if got != e["sha256"]:  # step 4
            raise SpecChecksumError(f"member {member} tensor {name}: sha256 of the rebuilt tensor differs")
        return arr

    def _delta(self, member: str, t: dict[str, Any], mean: np.ndarray, coef: Any, codes: np.ndarray) -> np.ndarray:
        """§8.2 steps 1-3: W = M + (u - (L - 1)/2) * s[e // g], float64, before the member's rounding."""
        info = self.delta_layout[t["name"]]
        levels, group, k = info["levels"], info["group"], info["per_byte"]
        d = _prod(t["shape"])
        start = self.code_layout[member][t["name"]]
        packed = codes[start : start + info["bytes"]].astype(np.int64)
        # §8.3: every byte must be a packing of k codes below L.
        _need(bool(np.all(packed < levels**k)), f"{t['name']}: a code byte is >= L^k = {levels**k}")
        digits = np.stack([(packed // levels**i) % levels for i in range(k)], axis=1).reshape(-1)[:d]
        off, (count,) = self.member_layout[member][t["name"]]
        steps = coef[off : off + count]
        q = digits.astype(np.float64) - (levels - 1) / 2
        w = mean.reshape(-1) + q * steps[np.arange(d) // group]
        return w.reshape(t["shape"])

    def _own_factors(self, member: str, t: dict[str, Any], r: int, coef: Any) -> tuple[np.ndarray, np.ndarray]:
        """§10.2: A (r x in) and B (out x r) in float64, before the member's rounding."""
        name = t["name"]
        out_dim, in_dim = t["shape"]
        info = self.own_layout[name]
        off, (count,) = self.member_layout[member][name]
        block = coef[off : off + count]
        n = r * (in_dim + out_dim)
        if info["form"] == "cast":
            values = block
        else:
            levels, k = info["levels"], info["per_byte"]
            start, size = self.quant_codes[name][member]
            packed = self.decode_blob(info["codes"])[start : start + size].astype(np.int64)
            _need(bool(np.all(packed < levels**k)), f"{name}: a code byte is >= L^k = {levels**k}")
            digits = np.stack([(packed // levels**i) % levels for i in range(k)], axis=1).reshape(-1)[:n]
            q = digits.astype(np.float64) - (levels - 1) / 2
            # Row j of A has step block[j]; column j of B (row j of B^T) has step block[r + j].
            per_value = np.concatenate([np.repeat(block[:r], in_dim), np.repeat(block[r:], out_dim)])
            values = q * per_value
        a = values[: r * in_dim].reshape(r, in_dim)
        b = values[r * in_dim :].reshape(r, out_dim).T
        return a, b

    def _factored_core(self, member: str, name: str, coef: Any) -> np.ndarray:
        """§12.2 steps 1-2: the member's core C = P Q (float64) of a subspace-factored module."""
        info = self.factored_layout[name]
        k_out, k_in = info["ranks"]
        c = min(self.members[member]["lora"][name][0], info["core_rank"])
        n = c * (k_in + k_out)
        off, (count,) = self.member_layout[member][name]
        block = coef[off : off + count]
        if info["levels"] is None:
            values = block
        else:
            levels, k = info["levels"], info["per_byte"]
            start, size = self.quant_codes[name][member]
            packed = self.decode_blob(info["codes"])[start : start + size].astype(np.int64)
            _need(bool(np.all(packed < levels**k)), f"{name}: a code byte is >= L^k = {levels**k}")
            digits = np.stack([(packed // levels**i) % levels for i in range(k)], axis=1).reshape(-1)[:n]
            q = digits.astype(np.float64) - (levels - 1) / 2
            # Row j of Q has step block[j]; column j of P (row j of P^T) has step block[c + j].
            values = q * np.concatenate([np.repeat(block[:c], k_in), np.repeat(block[c:], k_out)])
        q_factor = values[: c * k_in].reshape(c, k_in)
        p_factor = values[c * k_in :].reshape(c, k_out).T
        return p_factor @ q_factor

    def _subspace_parts(
        self, member: str, t: dict[str, Any], coef: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """U, the member's core C and V of a subspace module (float64), or Nones when k_out k_in = 0;
        for a subspace-factored module, C = P Q (§12.2)."""
        name = t["name"]
        if name in self.factored_layout:
            core = self._factored_core(member, name, coef)
        elif name not in self.core_shapes:
            return None, None, None
        else:
            off, c_shape = self.member_layout[member][name]
            assert coef is not None
            core = coef[off : off + _prod(c_shape)].reshape(c_shape)
        u = _widen(self.decode_blob(t["left"]), self.coef_dtype)
        v = _widen(self.decode_blob(t["right"]), self.coef_dtype)
        return u, core, v

    def read_updates(self, member: str) -> dict[str, tuple[str, np.ndarray]]:
        """§7.1: the dense update (float64, [out, in]) of each lora module ``member`` touches, with the
        member's dtype for it: U C V^T for subspace (zero when k_out k_in = 0), s B A for factors."""
        if member not in self.members:
            raise KeyError(member)
        mem = self.members[member]
        lora = mem.get("lora") or {}
        coef = None
        if mem.get("coefficients") is not None:
            coef = _widen(self.decode_blob(mem["coefficients"]), self.coef_dtype)
        out: dict[str, tuple[str, np.ndarray]] = {}
        for t in self.tensors:
            name = t["name"]
            if t["storage"] != "lora" or name not in lora:
                continue
            mdt = mem["dtypes"].get(name, t["dtype"])
            _, s = lora[name]
            if t["form"] == "factors" or name in self.lora_overrides[member]:
                key_a, key_b = _factor_keys(name)
                a = _widen(self.decode_blob(mem["raw"][key_a]), mdt)
                b = _widen(self.decode_blob(mem["raw"][key_b]), mdt)
                out[name] = (mdt, (s * b) @ a)
                continue
            if name in self.own_layout:  # §10.2: s B A from the factors after the member's rounding
                a, b = self._own_factors(member, t, lora[name][0], coef)
                a, b = _widen(_round_to(a, mdt), mdt), _widen(_round_to(b, mdt), mdt)
                out[name] = (mdt, (s * b) @ a)
                continue
            u, core, v = self._subspace_parts(member, t, coef)
            out[name] = (mdt, np.zeros(t["shape"]) if core is None else (u @ core) @ v.T)
        return out


def _read_member(path: str | Path, member_name: str) -> dict[str, tuple[str, np.ndarray]]:
    """Tensor name -> (dtype name, array) of one member; BF16 as uint16 bits, F8 as uint8 bits."""
    return SpecBundle(path).read_member(member_name)


# ======================================================================================
# Fixtures (these may use unipack's public API, safetensors and torch)
# ======================================================================================

import torch  # noqa: E402
from safetensors.torch import load_file as _st_load  # noqa: E402
from safetensors.torch import save_file as _st_save  # noqa: E402

import unipack  # noqa: E402
import unipack.errors  # noqa: E402
from unipack.format import container  # noqa: E402

_TORCH_TO_SPEC = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SPEC_TO_TORCH = {v: k for k, v in _TORCH_TO_SPEC.items()}
N_MEMBERS = 5


def _population(tmp: Path, dtypes: list[str], seed: int = 0) -> list[Path]:
    """Synthetic fine-tunes: base weights + each member a mix of two "task vectors" + small noise.

    Member i's delta on every float tensor is ``a_i * T1 + b_i * T2`` (plus noise far below the
    default 1% error budget). Matrix task vectors are low-rank (so the ``rows`` scheme wins),
    except for ``blocks.0.mix.weight`` whose task vectors are full-rank (so ``flat`` wins).
    """
    rng = np.random.default_rng(seed)
    shapes = {
        "blocks.0.wide.weight": (16, 96),  # wide: rows, side right
        "blocks.0.tall.weight": (96, 16),  # tall: rows, side left
        "blocks.0.mix.weight": (24, 24),  # full-rank task vectors: flat
        "blocks.0.conv.weight": (8, 4, 3, 3),  # 4-D conv kernel
        "blocks.0.wide.bias": (64,),  # 1-D: flat
        "blocks.0.norm.weight": (96,),  # 1-D norm: flat
        "blocks.0.norm.bias": (96,),  # 1-D, unchanged but for tiny noise: rank 0
    }
    base = {k: rng.standard_normal(s) * 0.5 for k, s in shapes.items()}
    base["blocks.0.norm.weight"] = 1.0 + rng.standard_normal(96) * 0.02
    tasks = {}
    for k, s in shapes.items():
        if len(s) >= 2 and k != "blocks.0.mix.weight":
            m, n = s[0], math.prod(s[1:])
            tasks[k] = [
                (rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) / np.sqrt(n)).reshape(s) for _ in range(2)
            ]
        else:
            tasks[k] = [rng.standard_normal(s) * 0.3 for _ in range(2)]
    tasks["blocks.0.norm.bias"] = [np.zeros(96), np.zeros(96)]
    position_ids = np.arange(32, dtype=np.int64).reshape(1, 32)
    paths = []
    for i, dt in enumerate(dtypes):
        a, b = rng.standard_normal(2) * 0.3
        sd = {k: base[k] + a * t1 + b * t2 + rng.standard_normal(base[k].shape) * 1e-5 for k, (t1, t2) in tasks.items()}
        heads = 2 + i % 3  # task heads whose shape differs by member
        sd["classifier.weight"] = rng.standard_normal((heads, 16)) * 0.2
        sd["classifier.bias"] = rng.standard_normal(heads) * 0.1
        sd["adapter.gate.weight"] = base["blocks.0.wide.weight"][:8, :8] + 1e-3 * rng.standard_normal((8, 8))
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(_SPEC_TO_TORCH[dt]) for k, v in sd.items()}
        tensors["embeddings.position_ids"] = torch.from_numpy(position_ids.copy())  # identical: exact
        tensors["bn.num_batches_tracked"] = torch.tensor(100 * i + 7, dtype=torch.int64)  # differs: raw
        path = tmp / f"m{i}.safetensors"
        _st_save(tensors, str(path), metadata={"member": f"m{i}", "dtype": dt})
        paths.append(path)
    return paths


VARIANTS: dict[str, dict[str, Any]] = {
    "none-f32": {"members": ["F32"] * N_MEMBERS, "options": {"codec": "none"}},
    "zstd-f32": {"members": ["F32"] * N_MEMBERS, "options": {}},
    "coef-f16": {"members": ["F32"] * N_MEMBERS, "options": {"dtype": "float16"}},
    "coef-bf16": {"members": ["F32"] * N_MEMBERS, "options": {"dtype": "bfloat16"}},
    "members-f16": {"members": ["F16"] * N_MEMBERS, "options": {}},
    "members-bf16": {"members": ["BF16"] * N_MEMBERS, "options": {}},
    "mixed-f16-f32": {"members": ["F32", "F32", "F16", "F32", "F32"], "options": {}},
    # §8: quantized deltas, under both error rules and every coefficient dtype.
    "delta-f32": {"members": ["F32"] * N_MEMBERS, "options": {"quantize": True}},
    "delta-none": {"members": ["F32"] * N_MEMBERS, "options": {"quantize": True, "codec": "none"}},
    "delta-rel-f16": {
        "members": ["F32"] * N_MEMBERS,
        "options": {"quantize": True, "max_delta_error": 0.3, "dtype": "float16"},
    },
    "delta-rel-bf16": {
        "members": ["BF16"] * N_MEMBERS,
        "options": {"quantize": True, "max_delta_error": 0.2, "dtype": "bfloat16"},
    },
    "delta-mixed": {
        "members": ["F32", "F16", "F32", "F32", "F32"],
        "options": {"quantize": True, "max_delta_error": 0.5},
    },
    # §2.3: the manifest compressed into the data section (written for large manifests; here forced)
    "packed-f32": {"members": ["F32"] * N_MEMBERS, "options": {}, "packed": True},
    "packed-delta-f32": {"members": ["F32"] * N_MEMBERS, "options": {"quantize": True}, "packed": True},
}
_COMMON = {"raw": ("adapter.*",), "raw_mismatched": True, "quantize": False}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    out = {}
    for key, spec in VARIANTS.items():
        d = tmp_path_factory.mktemp(key)
        paths = _population(d, spec["members"])
        target = d / "bundle.upk"
        threshold = container.COMPRESS_MANIFEST_ABOVE
        container.COMPRESS_MANIFEST_ABOVE = 0 if spec.get("packed") else threshold
        try:
            unipack.merge([str(p) for p in paths], str(target), **{**_COMMON, **spec["options"]})
        finally:
            container.COMPRESS_MANIFEST_ABOVE = threshold
        out[key] = (target, paths)
    return out


def _original(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """The input file as {name: (spec dtype, array)}; BF16 as uint16 bits."""
    out = {}
    for name, t in _st_load(str(path)).items():
        dt = _TORCH_TO_SPEC[t.dtype]
        arr = t.view(torch.int16).numpy().view(np.uint16) if dt == "BF16" else t.numpy()
        out[name] = (dt, arr)
    return out


def _as_f64(arr: np.ndarray, dtype: str) -> np.ndarray:
    return _bf16_to_f64(arr) if dtype == "BF16" else arr.astype(np.float64)


def _ordered(arr: np.ndarray) -> np.ndarray:
    """Float bit patterns mapped to integers whose difference counts units in the last place."""
    nbits = arr.dtype.itemsize * 8
    bits = (
        arr.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[arr.dtype.itemsize]).astype(np.int64)
        if nbits < 64
        else arr.view(np.int64)
    )
    if nbits == 64:
        return np.where(bits < 0, np.int64(-(2**63)) - bits, bits)
    sign = (bits >> (nbits - 1)) & 1
    mag = bits & ((1 << (nbits - 1)) - 1)
    return np.where(sign == 1, -mag, mag)


def _unipack_numpy(path: Path, member: str) -> dict[str, tuple[str, np.ndarray]]:
    with unipack.open(str(path)) as b:
        got = b.load_numpy(member)
    out = {}
    for name, (dt, arr) in got.items():
        arr = np.asarray(arr)
        dt = str(dt)
        out[name] = (dt, arr)
    return out


def _member_names(path: Path) -> list[str]:
    return [m["name"] for m in SpecBundle(path).manifest["members"]]


# ======================================================================================
# Tests
# ======================================================================================


def test_manifest_shows_expected_choices(bundles):
    path, _ = bundles["zstd-f32"]
    tensors = {t["name"]: t for t in SpecBundle(path).manifest["tensors"]}
    wide, tall = tensors["blocks.0.wide.weight"], tensors["blocks.0.tall.weight"]
    assert (wide["storage"], wide["scheme"], wide["side"]) == ("shared", "rows", "right")
    assert (tall["storage"], tall["scheme"], tall["side"]) == ("shared", "rows", "left")
    mix, conv = tensors["blocks.0.mix.weight"], tensors["blocks.0.conv.weight"]
    assert (mix["storage"], mix["scheme"]) == ("shared", "flat")
    assert (conv["storage"], conv["scheme"], conv["shape"], conv["matrix"]) == ("shared", "rows", [8, 4, 3, 3], [8, 36])
    for name in ("blocks.0.wide.bias", "blocks.0.norm.weight", "blocks.0.norm.bias"):
        assert (tensors[name]["storage"], tensors[name]["scheme"]) == ("shared", "flat"), name
    assert tensors["blocks.0.norm.bias"]["rank"] == 0 and tensors["blocks.0.norm.bias"]["basis"] is None
    assert tensors["embeddings.position_ids"]["storage"] == "exact"
    assert tensors["bn.num_batches_tracked"]["storage"] == "raw"
    assert tensors["classifier.weight"]["storage"] == "raw" and tensors["classifier.weight"]["shape"] is None
    assert tensors["classifier.bias"]["storage"] == "raw" and tensors["classifier.bias"]["shape"] is None
    assert tensors["adapter.gate.weight"]["storage"] == "raw"
    assert tensors["adapter.gate.weight"]["shape"] == [8, 8]


@pytest.mark.parametrize("variant", [k for k in VARIANTS if k.startswith("delta")])
def test_delta_bundles_hold_delta_tensors_at_version_3(bundles, variant):
    """The §8 variants exercise what they claim: delta records of several level counts, codes
    blobs, and version 3 (the subspace variants stay version 1, §6)."""
    path, _ = bundles[variant]
    spec = SpecBundle(path)
    assert spec.version == 3
    deltas = {t["name"]: t for t in spec.manifest["tensors"] if t["storage"] == "delta"}
    assert len(deltas) >= 3, [t["reason"] for t in spec.manifest["tensors"]]
    if variant == "delta-f32":  # both kinds of mean occur: quantized (I16 x mean_step) and float
        kinds = {spec.blobs[t["mean"]]["dtype"] for t in deltas.values()}
        assert "I16" in kinds, kinds
    for mem in spec.manifest["members"]:
        assert mem["codes"] is not None
    for key in VARIANTS:
        if not key.startswith(("delta", "packed")):
            assert SpecBundle(bundles[key][0]).version == 1, key


def test_packed_manifests_are_version_9_and_read_alike(bundles):
    """§2.3, §2.4: a compressed manifest, with the members' numbers in their own section, makes
    the bundle version 9 and holds the same manifest as the header would once the numbers are put
    back (the same population, merged both ways)."""
    packed, plain = SpecBundle(bundles["packed-f32"][0]), SpecBundle(bundles["zstd-f32"][0])
    assert packed.version == 9 and packed.packed_manifest is not None and plain.packed_manifest is None
    assert packed.packed_numbers is not None and plain.packed_numbers is None
    assert "manifest" not in packed.meta and packed.meta["manifest_codec"] == "zstd"
    strip = ("format_version", "created_by")
    a = {k: v for k, v in packed.manifest.items() if k not in strip}
    b = {k: v for k, v in plain.manifest.items() if k not in strip}
    for m in (*a["members"], *b["members"]):
        m.pop("lossless_bytes")  # zstd -19 of each variant's own input files (written apart)
    assert a == b
    assert SpecBundle(bundles["packed-delta-f32"][0]).version == 9


def _repack(path: Path, out: Path, *, meta_edit=None, frame=None, last_blob=None, numbers=None, swap=False) -> Path:
    """A copy of a packed bundle with its metadata, manifest or numbers frame, or tensor order
    changed (``swap``: the numbers after the manifest)."""
    header, _ = _raw_header(path)
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    chunks = {k: data[start + entries[k]["data_offsets"][0] : start + entries[k]["data_offsets"][1]] for k in order}
    if frame is not None:
        chunks["__manifest__"] = frame(chunks["__manifest__"])
    if numbers is not None:
        chunks["__numbers__"] = numbers(chunks["__numbers__"])
    if last_blob is not None:  # move the manifest before the last blob
        order.remove("__manifest__")
        order.insert(len(order) - 1, "__manifest__")
    if swap:
        order.remove("__numbers__")
        order.append("__numbers__")
    meta = dict(header["__metadata__"])
    if meta_edit is not None:
        meta_edit(meta)
    doc: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for k in order:
        size = len(chunks[k])
        shape = [size] if k in ("__manifest__", "__numbers__") else entries[k]["shape"]
        doc[k] = {"dtype": entries[k]["dtype"], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks[k] for k in order))
    return out


def _raw_header(path: Path) -> tuple[dict[str, Any], int]:
    data = path.read_bytes()
    (h,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + h]), 8 + h


PACKED_CASES = {
    "version-3": dict(meta_edit=lambda m: m.update(format_version="3")),
    "both-forms": dict(meta_edit=lambda m: m.update(manifest="{}")),
    "codec": dict(meta_edit=lambda m: m.update(manifest_codec="gzip")),
    "size-short": dict(meta_edit=lambda m: m.update(manifest_bytes=str(int(m["manifest_bytes"]) - 1))),
    "size-long": dict(meta_edit=lambda m: m.update(manifest_bytes=str(int(m["manifest_bytes"]) + 1))),
    "size-huge": dict(meta_edit=lambda m: m.update(manifest_bytes=str(2**31))),
    "frame-flipped": dict(frame=lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:]),
    "frame-truncated": dict(frame=lambda b: b[: len(b) // 2]),
    "not-last": dict(last_blob=True),
}


#: Damage to the numbers section (§2.4) that a reader finds on open: its place and its metadata.
NUMBERS_OPEN_CASES = {
    "numbers-last": dict(swap=True),
    "numbers-no-size": dict(meta_edit=lambda m: m.pop("numbers_bytes")),
    "numbers-size-huge": dict(meta_edit=lambda m: m.update(numbers_bytes=str(2**31))),
    "numbers-size-bomb": dict(meta_edit=lambda m: m.update(numbers_bytes=str(2**29))),  # in range, > 1024x
}
#: ... and that unipack finds when the numbers are read (``verify``, ``info``), not on open.
NUMBERS_READ_CASES = {
    "numbers-flipped": dict(numbers=lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:]),
    "numbers-truncated": dict(numbers=lambda b: b[: len(b) // 2]),
    "numbers-size-long": dict(meta_edit=lambda m: m.update(numbers_bytes=str(int(m["numbers_bytes"]) + 1))),
    "numbers-sha": dict(meta_edit=lambda m: m.update(numbers_sha256="0" * 64)),
}


@pytest.mark.parametrize("case", list(NUMBERS_READ_CASES))
def test_damaged_numbers_are_refused_when_read(bundles, tmp_path, case):
    bad = _repack(bundles["packed-f32"][0], tmp_path / "bad.upk", **NUMBERS_READ_CASES[case])
    with pytest.raises((SpecFormatError, SpecChecksumError)):
        SpecBundle(bad)
    with unipack.open(str(bad)) as b:
        with pytest.raises(unipack.errors.ChecksumError, match="numbers section is corrupt"):
            _ = b.manifest.members[-1].fidelity
        assert any("numbers section is corrupt" in p for p in b.verify())


@pytest.mark.parametrize("case", [*PACKED_CASES, *NUMBERS_OPEN_CASES])
def test_damaged_packed_manifests_are_refused_by_both_readers(bundles, tmp_path, case):
    bad = _repack(bundles["packed-f32"][0], tmp_path / "bad.upk", **{**PACKED_CASES, **NUMBERS_OPEN_CASES}[case])
    with pytest.raises((SpecFormatError, SpecChecksumError, SpecVersionError)):
        SpecBundle(bad)
    with pytest.raises(unipack.errors.UnipackError):
        unipack.open(str(bad))


def test_an_untouched_repack_is_accepted_by_both(bundles, tmp_path):
    good = _repack(bundles["packed-f32"][0], tmp_path / "good.upk")
    assert SpecBundle(good).version == 9
    with unipack.open(str(good)) as b:
        assert b.members == _member_names(good) and not b.verify()


def test_codec_none_bundle_has_no_zstd_blob(bundles):
    path, _ = bundles["none-f32"]
    sb = SpecBundle(path)
    assert {rec["codec"] for rec in sb.blobs.values()} == {"none"}
    # ... and the default bundle does use zstd
    assert "zstd" in {rec["codec"] for rec in SpecBundle(bundles["zstd-f32"][0]).blobs.values()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_matches_unipack_and_originals(bundles, variant):
    path, inputs = bundles[variant]
    sb = SpecBundle(path)
    tensors = sb.manifest["tensors"]
    names = _member_names(path)
    assert len(names) == len(inputs)
    checked_shared = 0
    for i, member in enumerate(names):
        mem = sb.members[member]
        mine = sb.read_member(member)
        theirs = _unipack_numpy(path, member)
        orig = _original(inputs[i])
        assert list(mine) == [t["name"] for t in tensors]
        assert set(mine) == set(orig) == set(theirs), member
        assert mem["metadata"] == {"member": f"m{i}", "dtype": VARIANTS[variant]["members"][i]}

        mismatched = total = 0
        for j, t in enumerate(tensors):
            name = t["name"]
            dt, arr = mine[name]
            odt, oarr = orig[name]
            udt, uarr = theirs[name]
            # dtype and shape are those of the member's original file
            assert dt == odt, (member, name, dt, odt)
            assert arr.shape == oarr.shape, (member, name)
            assert uarr.shape == arr.shape and uarr.dtype.itemsize == arr.dtype.itemsize, (member, name)
            if t["storage"] in ("raw", "exact"):
                # bit-exact against the original file and against unipack
                assert arr.tobytes() == oarr.tobytes(), (member, name)
                assert arr.tobytes() == np.ascontiguousarray(uarr).tobytes(), (member, name)
                assert mem["errors"][j] == 0, (member, name)
                continue
            checked_shared += 1
            # Shared tensors: the reference arithmetic is float64 with ordinary dot products
            # (§4); BLAS may sum in a different order than unipack does, so a rounded value
            # may, in rare ties, land one unit in the last place away. Allow only that.
            ua = np.ascontiguousarray(uarr).view(arr.dtype) if uarr.dtype != arr.dtype else uarr
            if not np.array_equal(arr.view(np.uint8), np.ascontiguousarray(ua).view(np.uint8)):
                diff = np.abs(_ordered(np.ascontiguousarray(arr)) - _ordered(np.ascontiguousarray(ua)))
                assert diff.max() <= 1, (member, name, int(diff.max()))
                mismatched += int(np.count_nonzero(diff))
            total += arr.size
            # the reader's result has exactly the error the manifest records (§4.3)
            w = _as_f64(oarr, odt)
            w_hat = _as_f64(arr, dt)
            err = np.linalg.norm((w - w_hat).ravel()) / np.linalg.norm(w.ravel())
            assert err == pytest.approx(mem["errors"][j], rel=1e-6, abs=1e-12), (member, name)
            if sb.manifest["options"].get("max_error") is not None:
                assert err <= sb.manifest["options"]["max_error"] * (1 + 1e-9), (member, name)
        assert mismatched <= max(1, total // 1000), (member, mismatched, total)
    assert checked_shared > 0


def test_mixed_population_records_member_dtypes(bundles):
    path, _ = bundles["mixed-f16-f32"]
    sb = SpecBundle(path)
    f16 = sb.manifest["members"][2]
    shared_float = [t["name"] for t in sb.manifest["tensors"] if t["dtype"] in _FLOAT_DTYPES]
    for name in shared_float:
        t = next(t for t in sb.manifest["tensors"] if t["name"] == name)
        assert f16["dtypes"].get(name, t["dtype"]) == "F16", name
        for k in (0, 1, 3, 4):
            assert sb.manifest["members"][k]["dtypes"].get(name, t["dtype"]) == "F32", name


def test_coefficient_dtypes(bundles):
    for variant, expected in (("zstd-f32", "F32"), ("coef-f16", "F16"), ("coef-bf16", "BF16")):
        sb = SpecBundle(bundles[variant][0])
        assert sb.coef_dtype == expected, variant
        for mem in sb.manifest["members"]:
            assert sb.blobs[mem["coefficients"]]["dtype"] == expected


def _flip_byte(src: Path, dst: Path, blob: str) -> None:
    sb = SpecBundle(src)
    entry = sb.entries[blob]
    assert entry["end"] > entry["begin"]
    data = bytearray(src.read_bytes())
    pos = sb.data_start + (entry["begin"] + entry["end"]) // 2
    data[pos] ^= 0x5A
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("variant", ["none-f32", "zstd-f32"])
def test_corrupted_blob_is_detected(bundles, tmp_path, variant):
    path, _ = bundles[variant]
    sb = SpecBundle(path)
    shared = next(t for t in sb.manifest["tensors"] if t["name"] == "blocks.0.wide.weight")
    member = _member_names(path)[1]
    for blob in (shared["mean"], sb.members[member]["coefficients"]):
        bad = tmp_path / f"bad-{blob.replace('/', '_')}.upk"
        _flip_byte(path, bad, blob)
        with pytest.raises(SpecChecksumError, match=re.escape(blob)):
            _read_member(bad, member)
        with pytest.raises(unipack.ChecksumError, match=re.escape(blob)):
            with unipack.open(str(bad)) as b:
                b.load_numpy(member)


def test_bundle_is_valid_safetensors(bundles):
    from safetensors import safe_open

    for variant in ("none-f32", "zstd-f32", "members-bf16"):
        path, _ = bundles[variant]
        sb = SpecBundle(path)
        with safe_open(str(path), "np") as f:
            assert set(f.keys()) == set(sb.blobs)
            meta = f.metadata()
            assert meta["format"] == "unipack.upk" and meta["format_version"] == "1"
            assert hashlib.sha256(meta["manifest"].encode()).hexdigest() == meta["manifest_sha256"]
            for name, rec in sb.blobs.items():
                if rec["codec"] == "none" and rec["dtype"] in ("F32", "F16", "F64", "I64"):
                    arr = f.get_tensor(name)
                    assert list(arr.shape) == rec["shape"]
                    assert arr.dtype == np.dtype(_DTYPES[rec["dtype"]][0])
                    assert np.array_equal(arr, sb.decode_blob(name)), name
                elif rec["codec"] == "zstd":
                    arr = f.get_tensor(name)
                    assert arr.dtype == np.uint8 and arr.ndim == 1
                    assert arr.tobytes() == sb.blob_stored_bytes(name)
    # Every blob (including BF16 ones) through the torch backend.
    path, _ = bundles["members-bf16"]
    sb = SpecBundle(path)
    with safe_open(str(path), "pt") as f:
        for name, rec in sb.blobs.items():
            t = f.get_tensor(name)
            if rec["codec"] == "none":
                assert _TORCH_TO_SPEC[t.dtype] == rec["dtype"] and list(t.shape) == rec["shape"]


# ---------------------------------------------------------------- structural rules (§2.1, §5)


def _rewrite(
    src: Path,
    dst: Path,
    edit_header=None,
    edit_manifest=None,
    tail: bytes = b"",
    header_text=None,
    resign: bool = True,
    length_prefix=None,
) -> None:
    """Re-serialise ``src`` with a modified header and/or manifest."""
    data = src.read_bytes()
    (h,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + h])
    body = data[8 + h :]
    if edit_manifest is not None:
        manifest = json.loads(header["__metadata__"]["manifest"])
        edit_manifest(manifest)
        text = json.dumps(manifest)
        header["__metadata__"]["manifest"] = text
        if resign:
            header["__metadata__"]["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    if edit_header is not None:
        edit_header(header)
    text = header_text(header) if header_text is not None else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    prefix = len(raw) if length_prefix is None else length_prefix(len(raw))
    dst.write_bytes(struct.pack("<Q", prefix) + raw + body + tail)


def _dup_key(header: dict) -> str:
    text = json.dumps(header)
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[name])
    return text[:-1] + f", {json.dumps(name)}: {entry}}}"


def _shift_last(header: dict) -> None:
    # move the last blob one byte further: a gap before it (and, unless a byte is appended, past the end)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 1, e + 1]


def _overlap(header: dict) -> None:
    # move the last blob one byte back: it overlaps its neighbour, one byte is left over at the end
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b - 1, e - 1]


def _extra_blob(header: dict) -> None:
    # a well-tiled blob (its 8 bytes are appended as ``tail``) that the manifest does not list
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["unlisted"] = {"dtype": "U8", "shape": [8], "data_offsets": [end, end + 8]}


def _manifest_dup_key(header: dict) -> None:
    meta = header["__metadata__"]
    text = meta["manifest"].rstrip()
    assert text.endswith("}")
    meta["manifest"] = text[:-1] + ', "format_version": 1}'
    meta["manifest_sha256"] = hashlib.sha256(meta["manifest"].encode()).hexdigest()


def _set_version(m: dict) -> None:
    m["format_version"] = 99


def _tamper_manifest(m: dict) -> None:
    m["members"][0]["errors"][0] = 0.5


_MALFORMED = {
    "duplicate-key": dict(header_text=_dup_key),
    "trailing-bytes": dict(tail=b"\0" * 8),
    "past-the-end": dict(edit_header=_shift_last),
    "gap": dict(edit_header=_shift_last, tail=b"\0"),
    "manifest-sha256": dict(edit_manifest=_tamper_manifest, resign=False),
    "version-99": dict(
        edit_manifest=_set_version, edit_header=lambda h: h["__metadata__"].__setitem__("format_version", "99")
    ),
    "versions-disagree": dict(edit_manifest=_set_version),
    "manifest-duplicate-key": dict(edit_header=_manifest_dup_key),
    "overlap": dict(edit_header=_overlap),
    "unlisted-blob": dict(edit_header=_extra_blob, tail=b"\1" * 8),
    "header-not-object": dict(header_text=lambda h: json.dumps([h])),
    "header-over-100MiB": dict(length_prefix=lambda n: 100 * 1024 * 1024 + 1),
    "header-longer-than-file": dict(length_prefix=lambda n: 50 * 1024 * 1024),
    "nan-in-manifest": dict(edit_manifest=lambda m: m["members"][0]["errors"].__setitem__(0, float("nan"))),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_structural_rules(bundles, tmp_path, case):
    path, _ = bundles["none-f32"]
    bad = tmp_path / f"{case}.upk"
    _rewrite(path, bad, **_MALFORMED[case])
    member = _member_names(path)[0]
    with pytest.raises(SpecFormatError) as mine:
        _read_member(bad, member)
    with pytest.raises(unipack.FormatError) as theirs:
        with unipack.open(str(bad)) as b:
            b.load_numpy(member)
    if case == "version-99":
        assert isinstance(mine.value, SpecVersionError)
        assert "4" in str(mine.value) and "1" in str(mine.value)
        assert "4" in str(theirs.value) and "1" in str(theirs.value), str(theirs.value)
    if case == "manifest-sha256":
        assert isinstance(mine.value, SpecChecksumError)


def test_rewrite_roundtrip_is_accepted(bundles, tmp_path):
    """The re-serialiser used above produces a valid bundle when nothing is changed."""
    path, _ = bundles["none-f32"]
    same = tmp_path / "same.upk"
    _rewrite(path, same)
    member = _member_names(path)[0]
    a, b = _read_member(same, member), _read_member(path, member)
    assert all(a[k][1].tobytes() == b[k][1].tobytes() for k in a)
    with unipack.open(str(same)) as bundle:
        bundle.load_numpy(member)


# ---------------------------------------------------------------- more checks


def test_writer_layout_conventions(bundles):
    """§2: writers pad to 8 bytes and start with the magic (readers must not rely on it)."""
    for path, _ in bundles.values():
        data = path.read_bytes()
        (h,) = struct.unpack("<Q", data[:8])
        assert (8 + h) % 8 == 0
        assert data[8 : 8 + 38] == b'{"__metadata__":{"format":"unipack.upk"'[:38]


def test_codec_none_needs_no_zstandard(bundles, monkeypatch):
    """A codec-none bundle is read with the standard library and numpy only."""
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # any ``import zstandard`` now fails
    path, _ = bundles["none-f32"]
    for member in _member_names(path):
        assert _read_member(path, member)
    with pytest.raises(ImportError):
        _read_member(bundles["zstd-f32"][0], _member_names(path)[0])


@pytest.mark.parametrize("variant", ["members-f16", "members-bf16", "mixed-f16-f32"])
def test_low_precision_members_have_shared_tensors(bundles, variant):
    """The F16/BF16 rounding of §4 step 3 is really exercised by the variants above."""
    path, _ = bundles[variant]
    sb = SpecBundle(path)
    want = "BF16" if variant == "members-bf16" else "F16"
    hits = [
        (m["name"], t["name"])
        for m in sb.manifest["members"]
        for t in sb.tensors
        if t["storage"] == "shared" and t["rank"] > 0 and m["dtypes"].get(t["name"], t["dtype"]) == want
    ]
    assert hits


def test_non_float_and_float8_tensors(tmp_path):
    """§2.2: F8, BOOL and U8 tensors are stored exactly (exact or raw), bit for bit."""
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        sd = {
            "w": torch.from_numpy(rng.standard_normal((8, 16)).astype(np.float32)),
            "mask_same": torch.tensor([True, False, True]),
            "mask_diff": torch.tensor([True, bool(i % 2), False]),
            "f8_diff": torch.from_numpy(rng.standard_normal(6).astype(np.float32)).to(torch.float8_e4m3fn),
            "f8_same": torch.ones(4).to(torch.float8_e5m2),
            "u8": torch.tensor([1, 2, i], dtype=torch.uint8),
        }
        p = tmp_path / f"q{i}.safetensors"
        _st_save(sd, str(p))
        paths.append(p)
    out = tmp_path / "q.upk"
    unipack.merge([str(p) for p in paths], str(out))
    sb = SpecBundle(out)
    storage = {t["name"]: t["storage"] for t in sb.tensors}
    assert storage["mask_same"] == storage["f8_same"] == "exact"
    assert storage["mask_diff"] == storage["f8_diff"] == storage["u8"] == "raw"
    for i, member in enumerate(_member_names(out)):
        mine = _read_member(out, member)
        theirs = _unipack_numpy(out, member)
        orig = _st_load(str(paths[i]))
        for name in ("mask_same", "mask_diff", "f8_diff", "f8_same", "u8"):
            dt, arr = mine[name]
            assert dt == theirs[name][0]
            assert arr.tobytes() == np.ascontiguousarray(theirs[name][1]).tobytes()
            assert arr.tobytes() == orig[name].view(torch.uint8).numpy().tobytes()
        assert mine["mask_same"][1].dtype == np.bool_


@pytest.mark.parametrize("rule", [{"rank": 1}, {"energy": 0.99}])
def test_member_with_all_zero_tensor(tmp_path, rule):
    """§4.3 divides by ||W||_F, which is 0 for an all-zero tensor; §3 forbids NaN/Infinity.

    The spec does not say what ``errors[j]`` is then, but a bundle must stay a valid v1 file:
    merge has to write a finite number (or refuse with a UnipackError), not crash.
    """
    rng = np.random.default_rng(4)
    t = rng.standard_normal(512).astype(np.float32)
    paths = []
    for i, scale in enumerate((0.0, 1.0, 2.5, -1.0)):
        p = tmp_path / f"z{i}.safetensors"
        _st_save({"z": torch.from_numpy(t * np.float32(scale))}, str(p))
        paths.append(p)
    out = tmp_path / "z.upk"
    try:
        unipack.merge([str(p) for p in paths], str(out), **rule)
    except unipack.UnipackError:
        return  # refusing is acceptable
    sb = SpecBundle(out)  # validates the manifest (no NaN/Infinity, errors are numbers)
    for member in _member_names(out):
        assert _read_member(out, member)["z"][1].shape == (512,)
        assert all(math.isfinite(e) for e in sb.members[member]["errors"])


def test_reader_follows_overrides_of_an_added_member(tmp_path):
    """§3.3 overrides and per-member coefficient layouts: a member added with `unipack add` whose
    tensors partly could not be projected reads back identically in the spec reader and unipack."""
    (tmp_path / "pop").mkdir()
    paths = _population(tmp_path / "pop", ["F32"] * N_MEMBERS)
    bundle = tmp_path / "bundle.upk"
    unipack.merge([str(p) for p in paths[:-1]], str(bundle), **_COMMON)
    family = paths[-1]  # same generator: most tensors project within budget
    stranger = tmp_path / "stranger.safetensors"  # unrelated values: the bases cannot hold it
    rng = np.random.default_rng(7)
    _st_save(
        {
            name: (torch.from_numpy(rng.standard_normal(tuple(t.shape))).to(t.dtype) if t.is_floating_point() else t)
            for name, t in _st_load(str(family)).items()
        },
        str(stranger),
    )
    unipack.add(bundle, family, name="family")
    unipack.add(bundle, stranger, name="stranger")
    sb = SpecBundle(bundle)
    shared = {t["name"] for t in sb.manifest["tensors"] if t["storage"] == "shared"}
    overrides = set(sb.members["stranger"]["raw"]) & shared
    assert overrides, "the stranger should need overrides"
    for member, source in (("family", family), ("stranger", stranger)):
        mine, theirs, orig = sb.read_member(member), _unipack_numpy(bundle, member), _original(source)
        for name, (dt, arr) in mine.items():
            assert theirs[name][0] == dt and np.array_equal(theirs[name][1], arr), (member, name)
            if name in sb.members[member]["raw"]:  # raw or override: bit-exact
                assert np.array_equal(orig[name][1], arr), (member, name)
    # the stranger's coefficient blob holds only the tensors it does not override
    coef = sb.members["stranger"].get("coefficients")
    expected = sum(_prod(c_shape) for name, (_, c_shape) in sb.coef_layout.items() if name not in overrides)
    assert (sb.blobs[coef]["shape"] if coef else [0]) == [expected]


# ======================================================================================
# LoRA adapters (format version 2, §7)
# ======================================================================================

_LORA_TOL = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3}  # relative rounding of a dense update per dtype
_PREFIX = "base_model.model."


def _write_adapter(
    d: Path,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    r: int,
    alpha: float,
    dtype: torch.dtype = torch.float32,
    head: np.ndarray | None = None,
    **config: Any,
) -> Path:
    """A PEFT LoRA folder by hand: ``factors`` maps a module path (``layers.0.q``) to (A, B)."""
    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for mod, (a, b) in factors.items():
        sd[f"{_PREFIX}{mod}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        sd[f"{_PREFIX}{mod}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(b)).to(dtype)
    if head is not None:
        sd[f"{_PREFIX}head.weight"] = torch.from_numpy(head).to(dtype)
    _st_save(sd, str(d / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": ["head"] if head is not None else None,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": None,
        "task_type": None,
        "init_lora_weights": True,
    }
    cfg.update(config)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module path or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return None


def _expected_rs(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """§7: r and s = lora_alpha / r (or / sqrt(r) with rsLoRA), rank_pattern / alpha_pattern applied."""
    path = module.removeprefix(_PREFIX)
    r = _pattern(cfg.get("rank_pattern") or {}, path) or cfg["r"]
    alpha = _pattern(cfg.get("alpha_pattern") or {}, path)
    alpha = cfg["lora_alpha"] if alpha is None else alpha
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _low_rank_factors(
    rng: np.random.Generator, p: np.ndarray, q: np.ndarray, r: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """A (r x in), B (out x r) whose update B A has its columns in span(p) and rows in span(q) (+ noise on B)."""
    b = p @ rng.standard_normal((p.shape[1], r)) + noise * rng.standard_normal((p.shape[0], r))
    a = rng.standard_normal((r, q.shape[1])) @ q.T / np.sqrt(q.shape[0])
    return a, b


_LORA_SHAPES = {"layers.0.q": (48, 64), "layers.0.v": (48, 64), "layers.1.fc": (32, 48), "layers.1.o": (32, 32)}


def _lora_spaces(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m: (rng.standard_normal((o, 4)), rng.standard_normal((i, 4))) for m, (o, i) in _LORA_SHAPES.items()}


def _subspace_population(tmp: Path, dtype: torch.dtype = torch.float32, n: int = 5, seed: int = 10) -> list[Path]:
    """(a) adapters whose updates share 4-dim column and row spaces (plus small noise): subspace wins."""
    rng = np.random.default_rng(seed)
    spaces = _lora_spaces(rng)
    dirs = []
    for i in range(n):
        factors = {m: _low_rank_factors(rng, *spaces[m], 8, 1e-4) for m in ("layers.0.q", "layers.0.v", "layers.1.fc")}
        dirs.append(
            _write_adapter(tmp / f"sub{i}", factors, 8, 16, dtype=dtype, head=rng.standard_normal((3, 32)) * 0.1)
        )
    return dirs


def _factored_population(
    tmp: Path, n: int, ranks: tuple[int, ...], k: int, seed: int, dtype: torch.dtype = torch.float32
) -> list[Path]:
    """(c) many low-rank adapters in shared k-dim spaces, k well above their ranks: each dense k x k
    core costs more than its factors, so the subspace-factored form (§12) wins."""
    rng = np.random.default_rng(seed)
    spaces = {m: (rng.standard_normal((o, k)), rng.standard_normal((i, k))) for m, (o, i) in _LORA_SHAPES.items()}
    dirs = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        factors = {m: _low_rank_factors(rng, *spaces[m], r, 1e-4) for m in ("layers.0.q", "layers.0.v", "layers.1.fc")}
        dirs.append(_write_adapter(tmp / f"fac{i}", factors, r, 2 * r, dtype=dtype))
    return dirs


def _mixed_population(tmp: Path, seed: int = 11) -> list[Path]:
    """(b) different ranks, partial target modules, rank/alpha patterns, rsLoRA, a negative scale, an F16
    adapter, and a module whose updates are all zero (B = 0, PEFT's default initialisation)."""
    rng = np.random.default_rng(seed)
    spaces = _lora_spaces(rng)

    def fac(mod: str, r: int) -> tuple[np.ndarray, np.ndarray]:
        if mod == "layers.1.o":
            a, _ = _low_rank_factors(rng, *spaces[mod], r, 0.0)
            return a, np.zeros((_LORA_SHAPES[mod][0], r))
        return _low_rank_factors(rng, *spaces[mod], r, 1e-4)

    def head() -> np.ndarray:
        return rng.standard_normal((3, 32)) * 0.1

    return [
        _write_adapter(
            tmp / "mix0",
            {m: fac(m, 8) for m in ("layers.0.q", "layers.0.v", "layers.1.fc", "layers.1.o")},
            8,
            16,
            head=head(),
        ),
        _write_adapter(tmp / "mix1", {"layers.0.q": fac("layers.0.q", 4)}, 4, 8, head=head()),
        _write_adapter(
            tmp / "mix2",
            {
                "layers.0.v": fac("layers.0.v", 6),
                "layers.1.fc": fac("layers.1.fc", 2),
                "layers.1.o": fac("layers.1.o", 6),
            },
            6,
            12,
            head=head(),
            rank_pattern={"fc": 2},
            alpha_pattern={"fc": 3},
        ),
        _write_adapter(
            tmp / "mix3",
            {"layers.0.q": fac("layers.0.q", 4), "layers.1.fc": fac("layers.1.fc", 4)},
            4,
            4,
            dtype=torch.float16,
            head=head(),
            use_rslora=True,
        ),
        _write_adapter(
            tmp / "mix4", {"layers.0.q": fac("layers.0.q", 2), "layers.0.v": fac("layers.0.v", 2)}, 2, -4, head=head()
        ),
    ]


def _peft_population(tmp: Path, n: int = 4) -> list[Path]:
    """(c) adapters saved by peft (init_lora_weights=False: random factors). Module ``q`` is then given
    factors sharing exact 4-dim update spaces (subspace), ``fc`` keeps peft's independent random factors:
    under a strict budget a subspace would cost more than the factors, so it is stored as ``factors``."""
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(64, 48)
            self.fc = torch.nn.Linear(48, 32)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
            return self.head(self.fc(self.q(x)))

    rng = np.random.default_rng(12)
    p, q = rng.standard_normal((48, 4)), rng.standard_normal((64, 4))
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q", "fc"],
            modules_to_save=["head"],
            init_lora_weights=False,
            use_rslora=(i == 1),
        )
        model = get_peft_model(Tiny(), config)
        a, b = _low_rank_factors(rng, p, q, 8, 0.0)
        with torch.no_grad():
            model.base_model.model.q.lora_A["default"].weight.copy_(torch.from_numpy(a))
            model.base_model.model.q.lora_B["default"].weight.copy_(torch.from_numpy(b))
            model.base_model.model.head.modules_to_save["default"].weight.add_(0.1 * i)
        d = tmp / f"peft{i}"
        model.save_pretrained(str(d))
        dirs.append(d)
    return dirs


#: The version 2 variants are merged with ``quantize=False`` (subspace and factors forms only); the
#: ``own-`` ones (version 6, §10) let the merge keep each adapter's factors quantized or cast.
LORA_VARIANTS: dict[str, dict[str, Any]] = {
    "sub-f32": {"population": "subspace", "options": {"max_error": 0.01, "quantize": False}},
    "sub-coef-f16": {"population": "subspace", "options": {"max_error": 0.01, "dtype": "float16", "quantize": False}},
    "sub-bf16": {"population": "subspace-bf16", "options": {"max_error": 0.01, "quantize": False}},
    "sub-bf16-coef-bf16": {
        "population": "subspace-bf16",
        "options": {"max_error": 0.02, "dtype": "bfloat16", "quantize": False},
    },
    "mixed": {"population": "mixed", "options": {"max_error": 0.01, "quantize": False}},
    "peft": {"population": "peft", "options": {"max_error": 1e-4, "codec": "none", "quantize": False}},
    "own-quant": {"population": "peft", "options": {"max_error": 0.1}},
    "own-quant-mixed-bf16": {"population": "mixed", "options": {"max_error": 0.2, "dtype": "bfloat16"}},
    "own-cast": {"population": "peft", "options": {"max_error": 0.002, "dtype": "float16", "codec": "none"}},
    # §12 (version 11): cores as their factors, cast (ranks 2 and 3: c = min(r, R) differs by member)
    # and quantized (coefficient dtype F16; BF16 adapters).
    "factored-cast": {"population": "factored", "options": {"max_error": 0.01, "quantize": False}},
    "factored-quant": {"population": "factored-r4", "options": {"max_error": 0.05, "dtype": "float16"}},
    "factored-quant-bf16": {"population": "factored-bf16", "options": {"max_error": 0.05, "codec": "none"}},
}


@pytest.fixture(scope="module")
def lora_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("lora")
    pops = {
        "subspace": _subspace_population(root / "subspace"),
        "subspace-bf16": _subspace_population(root / "subspace-bf16", dtype=torch.bfloat16, seed=13),
        "mixed": _mixed_population(root / "mixed"),
        "peft": _peft_population(root / "peft"),
        "factored": _factored_population(root / "factored", 12, (2, 3), 12, seed=21),
        "factored-r4": _factored_population(root / "factored-r4", 24, (4,), 8, seed=22),
        "factored-bf16": _factored_population(root / "factored-bf16", 24, (4,), 8, seed=23, dtype=torch.bfloat16),
    }
    out = {}
    for key, spec in LORA_VARIANTS.items():
        target = root / f"{key}.upk"
        dirs = pops[spec["population"]]
        unipack.merge([str(d) for d in dirs], str(target), **spec["options"])
        out[key] = (target, dirs)
    return out


def _adapter_file(d: Path) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    return json.loads((d / "adapter_config.json").read_text()), _original(d / "adapter_model.safetensors")


def _original_update(orig: dict[str, tuple[str, np.ndarray]], module: str, s: float) -> np.ndarray:
    key_a, key_b = _factor_keys(module)
    return s * (_as_f64(orig[key_b][1], orig[key_b][0]) @ _as_f64(orig[key_a][1], orig[key_a][0]))


def _rel(diff: np.ndarray, ref: np.ndarray) -> float:
    den = float(np.linalg.norm(ref))
    return float(np.linalg.norm(diff)) / (den if den > 0 else 1.0)


def _update_key(module: str) -> str:
    # unipack's API (not the format) keys an update by the base weight it adds to.
    return module.removeprefix(_PREFIX) + ".weight"


def test_lora_bundles_use_expected_forms(lora_bundles):
    forms = {}
    for key, (path, _) in lora_bundles.items():
        sb = SpecBundle(path)
        # §10: the quant and cast forms need version 6; §12: subspace-factored, version 11
        version = 6 if key.startswith("own-") else 11 if key.startswith("factored-") else 2
        assert sb.version == version and sb.meta["format_version"] == str(version), key
        assert sb.manifest["format_version"] == version, key
        forms[key] = {t["name"].removeprefix(_PREFIX): (t["form"], t.get("ranks")) for t in sb.lora_modules.values()}
        # §7.1: non-factor tensors (modules_to_save heads) are ordinary raw records
        assert all(t["storage"] in ("lora", "raw") for t in sb.tensors), key
    for key in ("sub-f32", "sub-coef-f16", "sub-bf16", "sub-bf16-coef-bf16"):
        assert {f for f, _ in forms[key].values()} == {"subspace"}, (key, forms[key])
        assert all(ranks[0] * ranks[1] > 0 for _, ranks in forms[key].values()), (key, forms[key])
    assert SpecBundle(lora_bundles["sub-coef-f16"][0]).coef_dtype == "F16"
    assert SpecBundle(lora_bundles["sub-bf16-coef-bf16"][0]).coef_dtype == "BF16"
    assert forms["peft"]["q"] == ("subspace", [4, 4])
    assert forms["peft"]["fc"][0] == "factors"
    assert forms["mixed"]["layers.1.o"] == ("subspace", [0, 0])  # every update is zero
    assert forms["mixed"]["layers.0.q"][0] == "subspace"
    mixed = SpecBundle(lora_bundles["mixed"][0])
    assert mixed.members["mix3"]["dtypes"] and set(mixed.members["mix3"]["dtypes"].values()) == {"F16"}
    assert mixed.members["mix4"]["lora"][_PREFIX + "layers.0.q"][1] < 0  # a negative scale: the sign rule
    # §10: peft's random fc factors are quantized (four adapters: no shared basis pays for itself)
    assert forms["own-quant"]["fc"][0] == "quant"
    assert "quant" in {f for f, _ in forms["own-quant-mixed-bf16"].values()}
    assert "cast" in {f for f, _ in forms["own-cast"].values()}
    for key in ("factored-cast", "factored-quant", "factored-quant-bf16"):
        assert {f for f, _ in forms[key].values()} == {"subspace-factored"}, (key, forms[key])
    quantized = {
        key: {sb_t.get("levels") for sb_t in SpecBundle(lora_bundles[key][0]).lora_modules.values()}
        for key in ("factored-cast", "factored-quant", "factored-quant-bf16")
    }
    assert quantized["factored-cast"] == {None} and None not in quantized["factored-quant"], quantized
    assert SpecBundle(lora_bundles["factored-quant"][0]).coef_dtype == "F16"
    cast = SpecBundle(lora_bundles["factored-cast"][0])
    assert {
        min(mem["lora"][m][0], cast.lora_modules[m]["core_rank"]) for mem in cast.members.values() for m in mem["lora"]
    } == {2, 3}  # §12.1: c = min(r, R) differs by member


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_reader_matches_unipack_and_adapters(lora_bundles, variant):
    """§7.2: the rebuilt adapter files (bit for bit), the dense updates, and the recorded errors."""
    path, dirs = lora_bundles[variant]
    sb = SpecBundle(path)
    names = _member_names(path)
    assert len(names) == len(dirs)
    checked_subspace = mismatched = total = 0
    for member, d in zip(names, dirs):
        mem = sb.members[member]
        cfg, orig = _adapter_file(d)
        assert json.loads(mem["configs"]["adapter_config.json"]) == cfg
        mine, theirs = sb.read_member(member), _unipack_numpy(path, member)
        # same keys, in the same order (tensors order, A then B), as unipack; the adapter file's key set
        assert list(mine) == list(theirs), member
        assert set(mine) == set(orig), (member, sorted(set(mine) ^ set(orig)))
        touched = mem.get("lora") or {}
        assert set(touched) == {k[: -len(".lora_A.weight")] for k in orig if k.endswith(".lora_A.weight")}
        for mod, (r, s) in touched.items():
            er, es = _expected_rs(cfg, mod)
            assert r == er and s == pytest.approx(es, rel=1e-12), (member, mod, (r, s), (er, es))
        for key, (dt, arr) in mine.items():
            udt, uarr = theirs[key]
            odt, oarr = orig[key]
            assert dt == udt == odt and arr.shape == uarr.shape == oarr.shape, (member, key, dt, udt, odt)
            module = key.rsplit(".lora_", 1)[0]
            uarr = np.ascontiguousarray(uarr)
            if module not in sb.lora_modules or sb.lora_modules[module]["form"] == "factors":
                # raw / factors: the stored blobs, bit-exact against the adapter and unipack
                assert arr.tobytes() == oarr.tobytes() == uarr.tobytes(), (member, key)
                continue
            if sb.lora_modules[module]["form"] in ("quant", "cast"):
                # §10.2: exact products and one rounding: bit for bit with unipack
                assert arr.tobytes() == uarr.tobytes(), (member, key)
                continue
            # Factors rebuilt from a subspace (§7.2): both follow the same reference steps, so they
            # are expected bit for bit. Step 3's "B0 = U X sqrt(Sigma)" does not fix the association:
            # this reader computes (U X) sqrt(Sigma), unipack U (X sqrt(Sigma)); the float64 values
            # then differ in the last bit, which survives rounding to F32/F16/BF16 only on rare ties.
            # Allow exactly that: at most 1 ulp, on a tiny fraction of the elements.
            total += arr.size
            if arr.tobytes() != uarr.tobytes():
                diff = np.abs(_ordered(arr.view(uarr.dtype) if arr.dtype != uarr.dtype else arr) - _ordered(uarr))
                assert diff.max() <= 1, (member, key, int(diff.max()))
                mismatched += int(np.count_nonzero(diff))

        # dense updates (§7.1) against unipack's load(member, lora="updates")
        ups = sb.read_updates(member)
        with unipack.open(str(path)) as b:
            their_ups = b.load(member, lora="updates")
        assert {_update_key(m) for m in ups} == set(their_ups), member
        for j, t in enumerate(sb.tensors):
            mod = t["name"]
            if mod not in ups:
                assert t["storage"] != "lora" or mem["errors"][j] == 0, (member, mod)
                continue
            dt, upd = ups[mod]
            tu = their_ups[_update_key(mod)]
            assert _TORCH_TO_SPEC[tu.dtype] == dt and list(tu.shape) == t["shape"], (member, mod)
            assert _rel(tu.double().numpy() - upd, upd) <= _LORA_TOL[dt], (member, mod)
            # §7.2: s B' A' = ΔŴ up to the rounding of the factors to the member's dtype
            s = touched[mod][1]
            rebuilt = _original_update({k: v for k, v in mine.items()}, mod, s)
            assert _rel(rebuilt - upd, upd) <= 10 * _LORA_TOL[dt], (member, mod)
            # §7.2: errors[j] = ||ΔW - s B' A'|| / ||ΔW|| against the original adapter
            delta = _original_update(orig, mod, s)
            err = _rel(delta - rebuilt, delta)
            if t["form"] == "factors":
                assert err == 0 and mem["errors"][j] == 0, (member, mod)
            else:
                checked_subspace += 1
                assert err == pytest.approx(mem["errors"][j], rel=1e-6, abs=1e-12), (member, mod, err, mem["errors"][j])
                assert err <= sb.manifest["options"]["max_error"] * (1 + 1e-9), (member, mod)
    assert checked_subspace > 0
    assert mismatched <= max(1, total // 10000), (mismatched, total)


@pytest.mark.parametrize("variant", ["sub-f32", "mixed", "peft"])
def test_lora_fidelity_numbers(lora_bundles, variant):
    """§7.2 (informative, 4 significant digits): norms ||ΔW||, delta_errors = errors, the mean-update
    baseline, and the adapter's own truncated SVD at q = min(r, floor((k_out k_in + (out k_out +
    in k_in) / n) / (out + in)))."""
    path, dirs = lora_bundles[variant]
    sb = SpecBundle(path)
    names = _member_names(path)
    files = {m: _adapter_file(d) for m, d in zip(names, dirs)}
    deltas: dict[str, dict[str, np.ndarray]] = {m: {} for m in names}
    for m in names:
        for mod, (_, s) in (sb.members[m].get("lora") or {}).items():
            deltas[m][mod] = _original_update(files[m][1], mod, s)
    for mod, t in sb.lora_modules.items():  # §7.1: spectrum of sum_i ΔW_i ΔW_i^T, variance sum_i ||ΔW_i||^2
        touching = [deltas[o][mod] for o in names if mod in deltas[o]]
        variance = sum(float(np.sum(x * x)) for x in touching)
        if t.get("variance") is not None:
            assert t["variance"] == pytest.approx(variance, rel=1e-3, abs=1e-12), mod
        if t.get("spectrum") is not None:
            eig = np.sort(np.linalg.eigvalsh(sum(x @ x.T for x in touching)))[::-1][:128]
            got = t["spectrum"]
            assert len(got) <= 128 and got == sorted(got, reverse=True), mod  # empty for all-zero updates
            assert np.allclose(got, eig[: len(got)], rtol=1e-3, atol=1e-9 * variance), mod
    for m in names:
        fid = sb.members[m].get("fidelity")
        assert fid is not None
        for j, t in enumerate(sb.tensors):
            mod = t["name"]
            if mod not in deltas[m]:
                continue
            delta = deltas[m][mod]
            touching = [deltas[o][mod] for o in names if mod in deltas[o]]
            norm = float(np.linalg.norm(delta))
            assert fid["norms"][j] == pytest.approx(norm, rel=1e-3, abs=1e-12), (m, mod)
            assert fid["delta_errors"][j] == pytest.approx(sb.members[m]["errors"][j], rel=1e-3, abs=1e-12)
            mean_err = _rel(delta - sum(touching) / len(touching), delta)
            assert fid["mean_errors"][j] == pytest.approx(mean_err, rel=1e-3, abs=1e-9), (m, mod)
            if "svd_errors" not in fid:
                continue
            r = sb.members[m]["lora"][mod][0]
            out_dim, in_dim = t["shape"]
            if t["form"] == "factors":
                q, svd_err = r, 0.0
            else:
                k_out, k_in = t["ranks"]
                q = min(
                    r,
                    math.floor((k_out * k_in + (out_dim * k_out + in_dim * k_in) / len(touching)) / (out_dim + in_dim)),
                )
                sig = np.linalg.svd(delta, compute_uv=False)
                svd_err = math.sqrt(max(float(np.sum(sig[q:] ** 2)), 0.0)) / (norm if norm > 0 else 1.0)
            assert fid["svd_ranks"][j] == q, (m, mod, fid["svd_ranks"][j], q)
            assert fid["svd_errors"][j] == pytest.approx(svd_err, rel=1e-3, abs=1e-9), (m, mod)


def test_lora_untouched_modules_and_zero_updates(lora_bundles):
    """Partial targets: a member's file holds factors only for the modules it touches; a module whose
    updates are all zero has ranks [0, 0], no U/V, no core, and rebuilds as zero factors of rank r."""
    path, _ = lora_bundles["mixed"]
    sb = SpecBundle(path)
    zero = _PREFIX + "layers.1.o"
    t = sb.lora_modules[zero]
    assert t["left"] is None and t["right"] is None and zero not in sb.core_shapes
    for member in ("mix0", "mix2"):
        r = sb.members[member]["lora"][zero][0]
        files = sb.read_member(member)
        a, b = files[zero + ".lora_A.weight"][1], files[zero + ".lora_B.weight"][1]
        assert a.shape == (r, 32) and b.shape == (32, r) and not a.any() and not b.any()
        assert not sb.read_updates(member)[zero][1].any()
    mix1 = sb.read_member("mix1")
    assert [k for k in mix1 if ".lora_" in k] == list(_factor_keys(_PREFIX + "layers.0.q"))
    # per-member coefficient layouts: only the cores of the subspace modules the member touches
    for member, mem in sb.members.items():
        expected = sum(_prod(sb.core_shapes[m]) for m in mem["lora"] if m in sb.core_shapes)
        coef = mem.get("coefficients")
        assert (sb.blobs[coef]["shape"] if coef else [0]) == [expected], member


def test_lora_bundle_is_valid_safetensors(lora_bundles):
    from safetensors import safe_open

    path, _ = lora_bundles["peft"]
    sb = SpecBundle(path)
    with safe_open(str(path), "np") as f:
        assert set(f.keys()) == set(sb.blobs) and f.metadata()["format_version"] == "2"
        for name in sb.blobs:
            assert np.array_equal(f.get_tensor(name), sb.decode_blob(name)), name


# ---------------------------------------------------------------- §7.3 structural rules


def _lora_names(sb: SpecBundle) -> tuple[str, str, str]:
    sub = next(n for n, t in sb.lora_modules.items() if t["form"] == "subspace" and n in sb.core_shapes)
    fac = next(n for n, t in sb.lora_modules.items() if t["form"] == "factors")
    head = next(t["name"] for t in sb.tensors if t["storage"] == "raw")
    return sub, fac, head


def _find(m: dict, name: str) -> dict:
    return next(t for t in m["tensors"] if t["name"] == name)


def _lora_mutations(sb: SpecBundle) -> dict[str, dict[str, Any]]:
    sub, fac, head = _lora_names(sb)
    left = sb.lora_modules[sub]["left"]
    out_dim, _ = sb.lora_modules[sub]["shape"]
    k_out, k_in = sb.lora_modules[sub]["ranks"]

    def version_1(h: dict) -> None:
        h["__metadata__"]["format_version"] = "1"

    def set_v1(m: dict) -> None:
        m["format_version"] = 1

    def ranks_too_large(m: dict) -> None:
        _find(m, sub)["ranks"] = [out_dim + 1, k_in]

    def left_shape_header(h: dict) -> None:  # same bytes, transposed shape: only the §7.3 shape rule fails
        h[left]["shape"] = [k_out, out_dim]

    def left_shape_manifest(m: dict) -> None:
        m["blobs"][left]["shape"] = [k_out, out_dim]

    def rank_0(m: dict) -> None:
        m["members"][0]["lora"][sub][0] = 0

    def names_raw_tensor(m: dict) -> None:
        m["members"][0]["lora"][head] = [8, 2.0]

    def names_unknown(m: dict) -> None:
        m["members"][0]["lora"]["base_model.model.nowhere"] = [8, 2.0]

    def scale_string(m: dict) -> None:
        m["members"][0]["lora"][sub][1] = "2.0"

    def missing_a(m: dict) -> None:
        del m["members"][0]["raw"][fac + ".lora_A.weight"]

    def untouched_core(m: dict) -> None:  # the member no longer touches a subspace module: its core is extra
        del m["members"][0]["lora"][sub]

    def left_null(m: dict) -> None:
        _find(m, sub)["left"] = None

    def factors_a_wrong_shape(m: dict) -> None:  # the member's r no longer matches its factor blobs
        m["members"][0]["lora"][fac][0] += 1

    def lora_int_dtype(m: dict) -> None:
        _find(m, sub)["dtype"] = "I32"

    def raw_names_module(module: str) -> dict[str, Any]:
        """Member 0's raw map names ``module`` itself, with a well-formed extra blob of its shape."""
        shape = sb.lora_modules[module]["shape"]
        extra = np.zeros(shape, dtype=np.float32).tobytes()

        def edit_header(h: dict) -> None:
            end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
            h["raw/0/module"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end + len(extra)]}

        def edit_manifest(m: dict) -> None:
            m["blobs"]["raw/0/module"] = {
                "dtype": "F32",
                "shape": shape,
                "codec": "none",
                "shuffle": False,
                "sha256": hashlib.sha256(extra).hexdigest(),
            }
            m["members"][0]["raw"][module] = "raw/0/module"

        return {"edit_header": edit_header, "edit_manifest": edit_manifest, "tail": extra}

    return {
        "version-1-with-lora": {"edit_header": version_1, "edit_manifest": set_v1},
        "ranks-exceed-shape": {"edit_manifest": ranks_too_large},
        "left-blob-wrong-shape": {"edit_header": left_shape_header, "edit_manifest": left_shape_manifest},
        "lora-map-rank-0": {"edit_manifest": rank_0},
        "lora-map-names-raw-tensor": {"edit_manifest": names_raw_tensor},
        "lora-map-names-unknown": {"edit_manifest": names_unknown},
        "lora-map-scale-not-number": {"edit_manifest": scale_string},
        "factors-member-missing-A": {"edit_manifest": missing_a},
        "factor-blob-rank-mismatch": {"edit_manifest": factors_a_wrong_shape},
        "core-of-untouched-module": {"edit_manifest": untouched_core},
        "left-null-with-rank": {"edit_manifest": left_null},
        "lora-non-float-dtype": {"edit_manifest": lora_int_dtype},
        "raw-map-names-factors-module": raw_names_module(fac),
        "raw-map-names-subspace-module": raw_names_module(sub),
    }


_LORA_MUTATIONS = [
    "version-1-with-lora",
    "ranks-exceed-shape",
    "left-blob-wrong-shape",
    "lora-map-rank-0",
    "lora-map-names-raw-tensor",
    "lora-map-names-unknown",
    "lora-map-scale-not-number",
    "factors-member-missing-A",
    "factor-blob-rank-mismatch",
    "core-of-untouched-module",
    "left-null-with-rank",
    "lora-non-float-dtype",
    "raw-map-names-factors-module",
    "raw-map-names-subspace-module",
]


@pytest.mark.parametrize("case", _LORA_MUTATIONS)
def test_lora_structural_rules(lora_bundles, tmp_path, case):
    path, _ = lora_bundles["peft"]  # codec none: one subspace module, one factors module, a raw head
    _refused_by_both(path, tmp_path / f"{case}.upk", _lora_mutations(SpecBundle(path))[case])


def _refused_by_both(path: Path, bad: Path, mutation: dict[str, Any]) -> None:
    """``path`` rewritten with ``mutation`` into ``bad``: the spec reader and unipack both refuse it."""
    _rewrite(path, bad, **mutation)
    member = _member_names(path)[0]
    with pytest.raises(SpecFormatError):
        _read_member(bad, member)
    with pytest.raises(unipack.FormatError), unipack.open(str(bad)) as b:
        b.load_numpy(member)


def _factored_mutations(sb: SpecBundle) -> dict[str, dict[str, Any]]:
    """Hostile edits of a quantized subspace-factored record (§12.3), each refused by both readers."""
    name = next(n for n, t in sb.lora_modules.items() if t["form"] == "subspace-factored")
    t = sb.lora_modules[name]
    out_dim, in_dim = t["shape"]
    k_out, k_in = t["ranks"]
    left = t["left"]

    def record(edit: Any) -> dict[str, Any]:
        return {"edit_manifest": lambda m: edit(_find(m, name))}

    def version_10(h: dict) -> None:
        h["__metadata__"]["format_version"] = "10"

    def set_v10(m: dict) -> None:
        m["format_version"] = 10

    def left_shape(m: dict) -> None:
        m["blobs"][left]["shape"] = [k_out, out_dim]

    def huge_rank(m: dict) -> None:  # §7.3: extraction would allocate factors no adapter file held
        m["members"][0]["lora"][name][0] = 2**40

    return {
        "version-10-with-factored": {"edit_header": version_10, "edit_manifest": set_v10},
        "core-rank-above-ranks": record(lambda r: r.update(core_rank=min(k_out, k_in) + 1)),
        "core-rank-0": record(lambda r: r.update(core_rank=0)),
        "core-rank-not-int": record(lambda r: r.update(core_rank=1.5)),
        "ranks-zero": record(lambda r: r.update(ranks=[0, k_in])),
        "ranks-exceed-shape": record(lambda r: r.update(ranks=[k_out, in_dim + 1])),
        "left-null": record(lambda r: r.update(left=None)),
        "left-wrong-shape": {"edit_manifest": left_shape},
        "levels-1": record(lambda r: r.update(levels=1)),
        "levels-257": record(lambda r: r.update(levels=257)),
        "levels-3-codes-length": record(lambda r: r.update(levels=3)),  # the codes blob's length no longer fits
        "codes-without-levels": record(lambda r: r.pop("levels")),
        "levels-without-codes": record(lambda r: r.pop("codes")),
        "member-rank-beyond-its-file": {"edit_manifest": huge_rank},
    }


_FACTORED_MUTATIONS = [
    "version-10-with-factored",
    "core-rank-above-ranks",
    "core-rank-0",
    "core-rank-not-int",
    "ranks-zero",
    "ranks-exceed-shape",
    "left-null",
    "left-wrong-shape",
    "levels-1",
    "levels-257",
    "levels-3-codes-length",
    "codes-without-levels",
    "levels-without-codes",
    "member-rank-beyond-its-file",
]


@pytest.mark.parametrize("case", _FACTORED_MUTATIONS)
def test_factored_structural_rules(lora_bundles, tmp_path, case):
    """§12.3: each hostile subspace-factored record is one clear error from both readers."""
    path, _ = lora_bundles["factored-quant-bf16"]  # codec none
    _refused_by_both(path, tmp_path / f"{case}.upk", _factored_mutations(SpecBundle(path))[case])


def test_lora_rewrite_roundtrip_is_accepted(lora_bundles, tmp_path):
    """The mutations above start from a bundle both readers accept when nothing is changed."""
    path, _ = lora_bundles["peft"]
    same = tmp_path / "same.upk"
    _rewrite(path, same)
    for member in _member_names(path):
        mine = _read_member(same, member)
        theirs = _unipack_numpy(same, member)
        assert all(mine[k][1].tobytes() == np.ascontiguousarray(theirs[k][1]).tobytes() for k in mine)


# --------------------------------------------------------------------------------------
# §9: the lossless tier, rebuilt bit for bit by the spec reader alone
# --------------------------------------------------------------------------------------

LOSSLESS_VARIANTS: dict[str, dict[str, Any]] = {
    "f32": {"members": ["F32"] * N_MEMBERS, "options": {}},
    "bf16": {"members": ["BF16"] * N_MEMBERS, "options": {}},
    "f16": {"members": ["F16"] * N_MEMBERS, "options": {"codec": "none"}},
    "mixed": {"members": ["F32", "F16", "F32", "F32", "F16"], "options": {}},
    "delta": {"members": ["F32"] * N_MEMBERS, "options": {"quantize": True}},
    "mean-only": {"members": ["F32"] * N_MEMBERS, "options": {"rank": 0}},
    # §3.1, §9.1 (version 7): chunks of 1 KiB, so every large blob spans several, the last partial.
    "chunked-f32": {"members": ["F32"] * N_MEMBERS, "options": {}, "chunk_bytes": 1024},
    "chunked-bf16": {"members": ["BF16"] * N_MEMBERS, "options": {"rank": 0}, "chunk_bytes": 1000},
    "chunked-mixed": {"members": ["F32", "F16", "F32", "F32", "F16"], "options": {}, "chunk_bytes": 700},
    # The layout of versions 5 and 6 (one frame per blob), which readers still read.
    "one-frame": {"members": ["F32"] * N_MEMBERS, "options": {}, "chunk_bytes": None},
}


def _with_special_values(path: Path, seed: int) -> None:
    """Put -0.0, subnormals and (in one tensor, which then is stored raw) NaN payloads and inf in
    a member, and make member 3 a near copy of member 1 (so a member base pays)."""
    tensors = _st_load(str(path))
    wide = tensors["blocks.0.wide.weight"].clone()
    tiny = torch.finfo(wide.dtype).tiny
    wide.view(-1)[:4] = torch.tensor([-0.0, tiny / 4, -tiny / 2, tiny * 3], dtype=torch.float64).to(wide.dtype)
    tensors["blocks.0.wide.weight"] = wide
    gate = tensors["adapter.gate.weight"].clone()
    bits = gate.view({2: torch.int16, 4: torch.int32}[gate.element_size()]).view(-1)
    nan_payload = {2: 0x7C01 if gate.dtype == torch.float16 else 0x7F81, 4: 0x7F800001 + seed}[gate.element_size()]
    bits[0] = nan_payload
    gate.view(-1)[1] = float("inf")
    gate.view(-1)[2] = float("-inf")
    tensors["adapter.gate.weight"] = gate
    _st_save(tensors, str(path), metadata=_st_meta(path))


def _st_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def lossless_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    out = {}
    for key, spec in LOSSLESS_VARIANTS.items():
        d = tmp_path_factory.mktemp(f"lossless-{key}")
        paths = _population(d, spec["members"], seed=3)
        for i, p in enumerate(paths):
            _with_special_values(p, i)
        if len(set(spec["members"])) == 1:  # member 3 = member 1 + a tiny change: a sibling base
            near = _st_load(str(paths[1]))
            near["blocks.0.wide.bias"] = near["blocks.0.wide.bias"] * 1.001
            _st_save(near, str(paths[3]), metadata=_st_meta(paths[3]))
        target = d / "bundle.upk"
        with pytest.MonkeyPatch.context() as mp:
            if "chunk_bytes" in spec:
                from unipack.format import codec

                mp.setattr(codec, "CHUNK_BYTES", spec["chunk_bytes"])
            unipack.merge([str(p) for p in paths], str(target), exact_tier=True, **{**_COMMON, **spec["options"]})
        out[key] = (target, paths)
    return out


@pytest.mark.parametrize("variant", list(LOSSLESS_VARIANTS))
def test_spec_reader_rebuilds_lossless_members_bit_for_bit(lossless_bundles, variant):
    """§9.2: the spec reader's exact members equal the inputs byte for byte, and unipack's."""
    path, inputs = lossless_bundles[variant]
    sb = SpecBundle(path)
    # §9, §6: version 7 only where a blob is chunked (the variants of 1 KiB chunks, not the others).
    chunked = any(rec["codec"] == "zstd-chunks" for rec in sb.blobs.values())
    assert chunked == (LOSSLESS_VARIANTS[variant].get("chunk_bytes") is not None and variant.startswith("chunked"))
    assert sb.version == (7 if chunked else 5)
    for i, name in enumerate(_member_names(path)):
        original = _original(inputs[i])
        spec_exact = sb.read_member_exact(name)
        with unipack.open(str(path)) as b:
            ours = b.load_numpy(name, exact=True)
        assert list(spec_exact) == list(ours) and set(spec_exact) == set(original)
        for tname, (dt, arr) in spec_exact.items():
            want_dt, want = original[tname]
            assert dt == want_dt and ours[tname][0] == dt
            assert np.ascontiguousarray(arr).tobytes() == np.ascontiguousarray(want).tobytes(), (name, tname)
            assert np.asarray(ours[tname][1]).tobytes() == np.ascontiguousarray(want).tobytes(), (name, tname)


def test_lossless_variants_use_every_prediction_and_coding(lossless_bundles):
    """The fixtures exercise what §9 specifies: mean and member bases, sub and xor codings (or
    bits), residuals of 16- and 32-bit members, and tensors the lossy tier already holds exactly."""
    bases, codings, dtypes_seen, plain = set(), set(), set(), 0
    for path, _ in lossless_bundles.values():
        sb = SpecBundle(path)
        for mem in sb.members.values():
            for e in mem["exact"].values():
                if e.get("blob") is None:
                    plain += 1
                    continue
                codings.add(e["coding"])
                bases.add("member" if e.get("base") not in (None, "mean") else e.get("base"))
                dtypes_seen.add(sb.blobs[e["blob"]]["dtype"])
    assert {"mean", "member"} <= bases and "sub" in codings and {"U16", "U32"} <= dtypes_seen and plain > 0


def test_corrupt_residual_is_detected_by_both_readers(lossless_bundles, tmp_path):
    path, _ = lossless_bundles["f32"]
    sb = SpecBundle(path)
    name = _member_names(path)[2]
    blob = next(e["blob"] for e in sb.members[name]["exact"].values() if e.get("blob"))
    bad = tmp_path / "bad.upk"
    _flip_byte(path, bad, blob)
    with pytest.raises(SpecChecksumError, match=re.escape(blob)):
        SpecBundle(bad).read_member_exact(name)
    with pytest.raises(unipack.ChecksumError, match=re.escape(blob)):
        with unipack.open(str(bad)) as b:
            b.load_numpy(name, exact=True)
    with unipack.open(str(bad)) as b:  # the lossy member does not read the residual
        b.load_numpy(name)


def test_a_wrong_recorded_sha256_is_refused_by_both_readers(lossless_bundles, tmp_path):
    """§9.2 step 4: a residual that decodes, but not to the original, is damage, not data."""
    path, _ = lossless_bundles["bf16"]
    header, _ = _raw_header(path)
    manifest = json.loads(header["__metadata__"]["manifest"])
    member = manifest["members"][1]
    tname = next(k for k, e in member["exact"].items() if e.get("blob"))
    member["exact"][tname]["sha256"] = "0" * 64
    bad = _repack_manifest(path, tmp_path / "bad.upk", manifest)
    with pytest.raises(SpecChecksumError, match="sha256"):
        SpecBundle(bad).read_member_exact(member["name"])
    with pytest.raises(unipack.ChecksumError, match="sha256"):
        with unipack.open(str(bad)) as b:
            b.load_numpy(member["name"], exact=True)


def _repack_manifest(path: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """A copy of a bundle (manifest in the header) with ``manifest`` in place of its own."""
    text = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)

    def edit(meta: dict[str, str]) -> None:
        assert "manifest" in meta  # the fixtures' manifests are small enough to stay in the header
        meta.update(manifest=text, manifest_sha256=hashlib.sha256(text.encode()).hexdigest())

    return _repack(path, out, meta_edit=edit)


def test_a_cycle_of_member_bases_is_refused_by_both_readers(lossless_bundles, tmp_path):
    """§9.3: following member bases must end within 3 steps; a cycle never does."""
    path, _ = lossless_bundles["f32"]
    header, _ = _raw_header(path)
    manifest = json.loads(header["__metadata__"]["manifest"])
    a, b = manifest["members"][1], manifest["members"][2]
    tname = next(k for k, e in a["exact"].items() if e.get("blob") and b["exact"][k].get("blob"))
    a["exact"][tname].update(coding="sub", base=b["name"])
    b["exact"][tname].update(coding="sub", base=a["name"])
    bad = _repack_manifest(path, tmp_path / "cycle.upk", manifest)
    with pytest.raises(SpecFormatError, match="chain"):
        SpecBundle(bad)
    with pytest.raises(unipack.FormatError, match="chain"):
        unipack.open(str(bad))


# --------------------------------------------------------------------------------------
# §3.1, §9.1 (version 7): chunked blobs and chunk digests, checked independently
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [k for k in LOSSLESS_VARIANTS if k.startswith("chunked")])
def test_chunk_digests_are_those_of_the_original_bytes(lossless_bundles, variant):
    """§9.1: each chunk_sha256 is the sha256 of the original tensor's bytes over the chunk's
    element range (E from the blob's index, the last chunk partial), computed here from the input
    file; the index's frames tile the blob and decode to the residual's bytes."""
    path, inputs = lossless_bundles[variant]
    sb = SpecBundle(path)
    names, seen_partial, most = _member_names(path), False, 0
    for i, mname in enumerate(names):
        original = _original(inputs[i])
        for tname, e in sb.members[mname]["exact"].items():
            if e.get("chunk_sha256") is None:
                continue
            raw = np.ascontiguousarray(original[tname][1]).tobytes()
            n = original[tname][1].size
            per, frames = SpecBundle.chunk_table(e["blob"], sb.blob_stored_bytes(e["blob"]), n)
            width = len(raw) // n
            want = [
                hashlib.sha256(raw[k * per * width : (k + 1) * per * width]).hexdigest() for k in range(len(frames))
            ]
            assert e["chunk_sha256"] == want and per * width <= LOSSLESS_VARIANTS[variant]["chunk_bytes"]
            seen_partial |= n % per != 0
            most = max(most, len(frames))
    assert seen_partial and most >= 3


def test_a_corrupt_chunk_is_one_clear_error_naming_tensor_and_chunk(lossless_bundles, tmp_path):
    """A byte flipped inside one frame of a chunked residual: both readers refuse the member,
    unipack with one error that names the member, tensor and chunk; the lossy member still reads."""
    path, _ = lossless_bundles["chunked-f32"]
    sb = SpecBundle(path)
    name = _member_names(path)[2]
    tname, e = next((k, e) for k, e in sb.members[name]["exact"].items() if e.get("chunk_sha256"))
    stored = sb.blob_stored_bytes(e["blob"])
    _, frames = SpecBundle.chunk_table(e["blob"], stored, _prod(sb.blobs[e["blob"]]["shape"]))
    frame_at = stored.index(frames[1][0])  # inside chunk 1's frame
    bad = tmp_path / "bad.upk"
    data = bytearray(path.read_bytes())
    start = sb.data_start + sb.entries[e["blob"]]["begin"]
    data[start + frame_at + len(frames[1][0]) // 2] ^= 0x55
    bad.write_bytes(bytes(data))
    with pytest.raises((SpecChecksumError, SpecFormatError)):
        SpecBundle(bad).read_member_exact(name)
    with pytest.raises(unipack.FormatError) as caught:
        with unipack.open(str(bad)) as b:
            b.load_numpy(name, exact=True)
    message = str(caught.value)
    assert "\n" not in message and repr(tname) in message and "chunk 1" in message and repr(name) in message
    with unipack.open(str(bad)) as b:
        b.load_numpy(name)
        problems = b.verify()  # the frame's own digest finds it without the lossless tier
    assert any("chunk 1" in p and e["blob"] in p for p in problems)


def test_a_chunked_blob_in_a_version_6_bundle_is_refused_by_both_readers(lossless_bundles, tmp_path):
    """§3.1, §5: zstd-chunks only from version 7."""
    path, _ = lossless_bundles["chunked-bf16"]
    header, _ = _raw_header(path)
    manifest = json.loads(header["__metadata__"]["manifest"])
    manifest["format_version"] = 6

    def edit(meta: dict[str, str]) -> None:
        text = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
        meta.update(format_version="6", manifest=text, manifest_sha256=hashlib.sha256(text.encode()).hexdigest())

    bad = _repack(path, tmp_path / "v6.upk", meta_edit=edit)
    with pytest.raises(SpecFormatError, match="version 7"):
        SpecBundle(bad)
    with pytest.raises(unipack.FormatError, match="version 7"):
        unipack.open(str(bad))
