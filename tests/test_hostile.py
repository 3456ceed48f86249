"""Hostile bundles: every file here is built by hand, byte by byte, to break one rule of
``format_spec/upk-v1.md``. A reader must refuse each with a clean ``UnipackError`` that says
what is wrong (never an OverflowError, MemoryError, UnicodeError or KeyError), and must not
allocate memory an attacker asks for.

The tests are named ``test_pNN_...`` after the numbered properties of the "Safety" issue.
Each starts from a small valid bundle (``unipack.merge`` of 3 checkpoints: a shared ``rows``
tensor, raw tensors, an exact tensor, zstd and plain blobs), takes it apart into
(metadata, manifest, blobs) and reassembles it with one defect, recomputing every checksum
that should still pass so that the check under test is the one that fires.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.torch import save_file

import unipack
import unipack.cli
from unipack import ChecksumError, FormatError, InputError, UnipackError
from unipack.format.manifest import SUPPORTED_VERSIONS

MIB = 1024 * 1024
GIB = 1024 * MIB


# ------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame(header: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``u64 length | header | data``; the header is padded with spaces as writers do."""
    header = header + b" " * (-(len(header) + 8) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Parts:
    """A bundle taken apart: header metadata (without the manifest), manifest, blobs in data order."""

    meta: dict[str, str]
    manifest: dict[str, Any]
    blobs: list[list[Any]]  # [name, header dtype, header shape, stored bytes]

    def blob(self, name: str) -> list[Any]:
        for b in self.blobs:
            if b[0] == name:
                return b
        raise KeyError(name)

    def tensor(self, name: str) -> dict[str, Any]:
        return next(t for t in self.manifest["tensors"] if t["name"] == name)

    def set_blob(
        self,
        name: str,
        stored: bytes,
        *,
        codec: str | None = None,
        shape: list[int] | None = None,
        dtype: str | None = None,
    ) -> None:
        """Replace a blob's stored bytes (header entry and manifest checksum follow)."""
        rec = self.manifest["blobs"][name]
        if codec is not None:
            rec["codec"] = codec
        if shape is not None:
            rec["shape"] = shape
        if dtype is not None:
            rec["dtype"] = dtype
        rec["sha256"] = sha(stored)
        b = self.blob(name)
        if rec["codec"] == "zstd":
            b[1], b[2] = "U8", [len(stored)]
        else:
            b[1], b[2] = rec["dtype"], list(rec["shape"])
        b[3] = stored

    def assemble(
        self,
        *,
        manifest_text: str | None = None,
        fix_sha: bool = True,
        tail: bytes = b"",
        header_edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> bytes:
        text = dumps(self.manifest) if manifest_text is None else manifest_text
        meta = dict(self.meta)
        meta["manifest"] = text
        if fix_sha:
            meta["manifest_sha256"] = sha(text.encode("utf-8", "surrogatepass"))
        header: dict[str, Any] = {"__metadata__": meta}
        data = bytearray()
        for name, dtype, shape, stored in self.blobs:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(stored)]}
            data += stored
        if header_edit is not None:
            header_edit(header)
        return frame(dumps(header).encode("utf-8", "surrogatepass"), bytes(data) + tail)


def take_apart(data: bytes) -> Parts:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n
    meta = header.pop("__metadata__")
    manifest = json.loads(meta.pop("manifest"))
    blobs = []
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, end = e["data_offsets"]
        blobs.append([name, e["dtype"], e["shape"], data[start + b : start + end]])
    return Parts(meta, manifest, blobs)


@dataclass
class Base:
    inputs: list[Path]
    data: bytes  # the valid bundle's bytes
    loaded: dict[str, dict[str, np.ndarray]]  # member -> tensor -> array, from the valid bundle

    def parts(self) -> Parts:
        return take_apart(self.data)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    d = tmp_path_factory.mktemp("hostile_base")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 64, generator=g)
    u, v = torch.randn(16, 1, generator=g), torch.randn(1, 64, generator=g)
    paths = []
    for i in range(3):
        tensors = {
            "w": w0 + 0.1 * (i + 1) * (u @ v),  # shared, rows/right, rank 1
            "b": torch.randn(64, generator=g) * 0.01 + torch.arange(64.0) / 64,  # raw, zstd
            "ids": torch.zeros(4096, dtype=torch.int64),  # exact, zstd
            "r": torch.randn(8, generator=g),  # raw (asked), plain
        }
        p = d / f"m{i}.safetensors"
        save_file(tensors, str(p), metadata={"k": "v"})
        paths.append(p)
    out = d / "base.upk"
    unipack.merge(paths, out, raw=["r"], quantize=False)
    with unipack.open(out) as b:
        loaded = {m: {k: a.copy() for k, (_, a) in b.load_numpy(m).items()} for m in b.members}
    data = out.read_bytes()
    parts = take_apart(data)
    # the fixture must exercise what the tests assume
    codecs = {name: rec["codec"] for name, rec in parts.manifest["blobs"].items()}
    assert codecs["exact/ids"] == "zstd" and codecs["basis/w"] == "none", codecs
    assert {t["storage"] for t in parts.manifest["tensors"]} == {"shared", "raw", "exact"}
    return Base(paths, data, loaded)


def write(tmp_path: Path, data: bytes, name: str = "hostile.upk") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def open_fails(path: Path, exc: type, *fragments: str) -> str:
    """``unipack.open(path)`` raises exactly ``exc`` (a UnipackError) whose message has every fragment."""
    with pytest.raises(UnipackError) as info:
        with unipack.open(path):
            pass
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert str(path) in msg, f"the message does not name the file: {msg!r}"
    return msg


def load_fails(path: Path, exc: type, *fragments: str, member: str | None = None) -> str:
    """The bundle opens, but loading ``member`` (default: the first) raises ``exc``."""
    with unipack.open(path) as b:
        with pytest.raises(UnipackError) as info:
            b.load_numpy(member or b.members[0])
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def opens_and_loads(path: Path, base: Base) -> None:
    with unipack.open(path) as b:
        for m in b.members:
            got = b.load_numpy(m)
            assert set(got) == set(base.loaded[m])
            for k, (_, a) in got.items():
                assert a.tobytes() == base.loaded[m][k].tobytes()


class Peak:
    """tracemalloc peak of the block (numpy and bytes allocations are traced)."""

    def __enter__(self) -> Peak:
        tracemalloc.start()
        tracemalloc.reset_peak()
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def zstd_frame(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(data)


def rle_frame(size: int, byte: int = 0, declared: int | None = None) -> bytes:
    """A hand-made zstd frame of RLE blocks: ~4 bytes per 128 KiB of output, declaring ``declared``."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    # FCS field 8 bytes, not single-segment (so a 128 KiB window suffices to decode any size: zstd's
    # own window-size limit does not stop the bomb), no checksum, no dictionary
    out.append(0xC0)
    out.append(7 << 3)  # window descriptor: 2**(10 + 7) = 128 KiB
    out += struct.pack("<Q", size if declared is None else declared)
    block = 128 * 1024
    left = size
    while True:
        n = min(block, left)
        left -= n
        last = 1 if left == 0 else 0
        out += (last | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte])
        if last:
            return bytes(out)


def test_rle_frame_helper_is_a_valid_zstd_frame() -> None:
    f = rle_frame(300 * 1024 + 5, byte=7)
    assert zstandard.get_frame_parameters(f).content_size == 300 * 1024 + 5
    assert zstandard.ZstdDecompressor().decompress(f) == bytes([7]) * (300 * 1024 + 5)


def test_reassembled_base_is_valid(tmp_path: Path, base: Base) -> None:
    """Sanity: taking the bundle apart and putting it back gives a bundle that loads the same."""
    opens_and_loads(write(tmp_path, base.parts().assemble()), base)


# ------------------------------------------------------------------------------------------
# 1. truncated below the length prefix
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7])
def test_p01_shorter_than_8_bytes(tmp_path: Path, base: Base, n: int) -> None:
    open_fails(write(tmp_path, base.data[:n]), FormatError, "truncated")


# ------------------------------------------------------------------------------------------
# 2. not a .upk
# ------------------------------------------------------------------------------------------


def test_p02_plain_safetensors_checkpoint(base: Base) -> None:
    open_fails(base.inputs[0], FormatError, "not a unipack bundle")


@pytest.mark.parametrize("seed", range(4))
def test_p02_random_bytes(tmp_path: Path, seed: int) -> None:
    open_fails(write(tmp_path, np.random.default_rng(seed).bytes(4096)), FormatError, "not a unipack bundle")


def test_p02_random_bytes_with_plausible_length(tmp_path: Path) -> None:
    body = np.random.default_rng(9).bytes(200)
    open_fails(write(tmp_path, frame(body[:100], body[100:], length=100)), FormatError, "not a unipack bundle")


@pytest.mark.parametrize("header", [b"[1,2,3]", b"[]", b'"unipack.upk"', b"42", b"null"])
def test_p02_header_not_an_object(tmp_path: Path, header: bytes) -> None:
    open_fails(write(tmp_path, frame(header)), FormatError, "not a unipack bundle")


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt"}, {"format": "unipack.UPK", "format_version": "1"}])
def test_p02_safetensors_without_unipack_format(tmp_path: Path, base: Base, meta: Any) -> None:
    p = base.parts()
    if meta is None:
        data = p.assemble(header_edit=lambda h: h.pop("__metadata__"))
    else:
        data = p.assemble(header_edit=lambda h: h.__setitem__("__metadata__", meta))
    open_fails(write(tmp_path, data), FormatError, "not a unipack bundle")


# ------------------------------------------------------------------------------------------
# 3. unknown versions
# ------------------------------------------------------------------------------------------


#: The first version this unipack does not know (each new format version moves it).
NEXT_VERSION = str(max(SUPPORTED_VERSIONS) + 1)


@pytest.mark.parametrize("version", [NEXT_VERSION, "99", "abc", "", "-1", "1.0", "١", "¹", "1\u0000"])
def test_p03_unknown_header_version(tmp_path: Path, base: Base, version: str) -> None:
    p = base.parts()
    p.meta["format_version"] = version
    open_fails(write(tmp_path, p.assemble()), FormatError, repr(version), "supported: 1")


@pytest.mark.parametrize("version", [int(NEXT_VERSION), 99])
def test_p03_consistent_future_version(tmp_path: Path, base: Base, version: int) -> None:
    p = base.parts()
    p.meta["format_version"] = str(version)
    p.manifest["format_version"] = version
    open_fails(write(tmp_path, p.assemble()), FormatError, str(version), "supported: 1")


@pytest.mark.parametrize("version", [4, 0, "1", 1.0, True, None])
def test_p03_manifest_version_disagrees_with_header(tmp_path: Path, base: Base, version: Any) -> None:
    p = base.parts()
    p.manifest["format_version"] = version
    msg = open_fails(write(tmp_path, p.assemble()), FormatError)
    assert "format_version" in msg or "format version" in msg, msg
    if version in (3, 0) and not isinstance(version, bool):
        assert str(version) in msg and "supported: 1" in msg, msg


def test_p03_header_version_missing(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    del p.meta["format_version"]
    open_fails(write(tmp_path, p.assemble()), FormatError, "supported: 1")


# ------------------------------------------------------------------------------------------
# 4. header length caps, checked before allocating
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,fragment",
    [
        (100 * MIB + 1, "limit"),
        (2**64 - 1, "limit"),
        (2**63, "limit"),
        (50 * MIB, "truncated"),  # under the cap but larger than the file
        (5000, "truncated"),
    ],
)
def test_p04_header_length_refused_before_allocating(tmp_path: Path, length: int, fragment: str) -> None:
    path = write(tmp_path, struct.pack("<Q", length) + b'{"__metadata__":{}}' + b" " * 1000)
    with Peak() as peak:
        open_fails(path, FormatError, fragment)
    assert peak.peak < 10 * MIB, f"open allocated {peak.peak} bytes for a header it refused"


# ------------------------------------------------------------------------------------------
# 5. strict JSON and manifest schema
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"],
    ids=["ff", "truncated_seq", "cesu_surrogate", "overlong_slash"],
)
def test_p05_header_invalid_utf8(tmp_path: Path, base: Base, bad: bytes) -> None:
    data = base.parts().assemble()
    (n,) = struct.unpack("<Q", data[:8])
    old = b'"format":"unipack.upk"'
    assert data[8 : 8 + n].count(old) == 1
    header = data[8 : 8 + n].rstrip().replace(old, b'"format":"' + bad + b'unipack.upk"')
    open_fails(write(tmp_path, frame(header, data[8 + n :])), FormatError, "invalid JSON")


def test_p05_manifest_string_holds_lone_surrogate(tmp_path: Path, base: Base) -> None:
    """The header JSON may escape a lone surrogate (``\\ud800``) inside the manifest string: valid
    JSON, but the manifest then is not UTF-8 text and cannot be hashed as the spec says."""
    data = base.parts().assemble()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + n].decode().rstrip()
    old = '\\"created_by\\":\\"unipack'
    assert raw.count(old) == 1, raw[:300]
    raw = raw.replace(old, '\\"created_by\\":\\"\\ud800unipack')
    open_fails(write(tmp_path, frame(raw.encode(), data[8 + n :])), FormatError)


@pytest.mark.parametrize("field", ["member", "tensor", "metadata"])
def test_p05_manifest_escaped_lone_surrogate_in_names(tmp_path: Path, base: Base, field: str) -> None:
    """``\\ud800`` escaped inside the manifest: the names it yields are not valid Unicode text
    (they cannot be written to a safetensors header or a file name): refuse on open."""
    p = base.parts()
    if field == "member":
        p.manifest["members"][0]["name"] = "m0SURR"
    elif field == "tensor":
        p.tensor("ids")["name"] = "idsSURR"
    else:
        p.manifest["members"][0]["metadata"] = {"k": "vSURR"}
    text = dumps(p.manifest).replace("SURR", "\\ud800")
    open_fails(write(tmp_path, p.assemble(manifest_text=text)), FormatError)


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_p05_header_invalid_json(tmp_path: Path, base: Base, cut: int) -> None:
    data = base.parts().assemble()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].rstrip()[:-cut]
    open_fails(write(tmp_path, frame(header, data[8 + n :])), FormatError, "invalid JSON")


@pytest.mark.parametrize("text", ["{not json", "", "[]", '"a string"', '{"format":"unipack.upk"', "null"])
def test_p05_manifest_invalid_json_or_not_object(tmp_path: Path, base: Base, text: str) -> None:
    msg = open_fails(write(tmp_path, base.parts().assemble(manifest_text=text)), FormatError)
    assert "manifest" in msg, msg


def test_p05_duplicate_key_in_safetensors_header(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    data = p.assemble()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].decode().rstrip()
    entry = '"coef/0":' + dumps(json.loads(text)["coef/0"])
    assert text.count(entry) == 1
    text = text.replace(entry, entry + "," + entry)
    open_fails(write(tmp_path, frame(text.encode(), data[8 + n :])), FormatError, "duplicate key", "coef/0")


def test_p05_duplicate_key_in_metadata(tmp_path: Path, base: Base) -> None:
    data = base.parts().assemble()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].decode().rstrip()
    assert text.startswith('{"__metadata__":{"format":"unipack.upk",')
    text = text.replace('"format":"unipack.upk",', '"format":"unipack.upk","format":"unipack.upk",', 1)
    open_fails(write(tmp_path, frame(text.encode(), data[8 + n :])), FormatError, "duplicate key", "format")


@pytest.mark.parametrize("where", ["top", "tensor", "member", "blob", "blobs"])
def test_p05_duplicate_key_in_manifest(tmp_path: Path, base: Base, where: str) -> None:
    p = base.parts()
    text = dumps(p.manifest)
    if where == "top":
        old, new = '"created_by":', '"created_by":"evil","created_by":'
    elif where == "tensor":
        old, new = '"storage":"exact",', '"storage":"exact","storage":"raw",'
    elif where == "member":
        old, new = '"name":"m1",', '"name":"m1","name":"m9",'
    elif where == "blob":
        old, new = '"codec":"none",', '"codec":"none","codec":"zstd",'
    else:
        entry = '"coef/2":' + dumps(p.manifest["blobs"]["coef/2"])
        old, new = entry, entry + "," + entry
    assert old in text
    text = text.replace(old, new, 1)
    open_fails(write(tmp_path, p.assemble(manifest_text=text)), FormatError, "duplicate key")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_p05_nan_literal_in_manifest(tmp_path: Path, base: Base, literal: str) -> None:
    p = base.parts()
    text = dumps(p.manifest)
    old = '"errors":[' + ",".join(dumps(e) for e in p.manifest["members"][0]["errors"])
    assert old in text
    text = text.replace(old, '"errors":[' + literal + old[len('"errors":[') + 3 :], 1)
    open_fails(write(tmp_path, p.assemble(manifest_text=text)), FormatError, literal.lstrip("-"))


def test_p05_nan_literal_in_header(tmp_path: Path, base: Base) -> None:
    data = base.parts().assemble()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].decode().rstrip()
    old = '"coef/0":{"dtype":"F32","shape":[16]'
    assert old in text
    text = text.replace(old, '"coef/0":{"dtype":"F32","shape":[NaN]', 1)
    open_fails(write(tmp_path, frame(text.encode(), data[8 + n :])), FormatError, "NaN")


BAD_FIELDS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("rank_as_string", lambda m: m["tensors"][3].__setitem__("rank", "1"), "'rank'"),
    ("rank_as_float", lambda m: m["tensors"][3].__setitem__("rank", 1.0), "'rank'"),
    ("rank_as_bool", lambda m: m["tensors"][3].__setitem__("rank", True), "'rank'"),
    ("rank_negative", lambda m: m["tensors"][3].__setitem__("rank", -1), "'rank'"),
    ("shape_negative_dim", lambda m: m["tensors"][3].__setitem__("shape", [16, -64]), "'shape'"),
    ("shape_not_list", lambda m: m["tensors"][3].__setitem__("shape", "16x64"), "'shape'"),
    ("blob_shape_negative", lambda m: m["blobs"]["coef/0"].__setitem__("shape", [-16]), "'shape'"),
    ("errors_too_short", lambda m: m["members"][1]["errors"].pop(), "errors"),
    ("errors_too_long", lambda m: m["members"][1]["errors"].append(0.0), "errors"),
    ("errors_negative", lambda m: m["members"][1]["errors"].__setitem__(0, -1.0), "errors"),
    ("errors_string", lambda m: m["members"][1]["errors"].__setitem__(0, "0"), "errors"),
    ("errors_not_list", lambda m: m["members"][1].__setitem__("errors", {}), "errors"),
    ("storage_unknown", lambda m: m["tensors"][0].__setitem__("storage", "pickle"), "'storage'"),
    ("scheme_unknown", lambda m: m["tensors"][3].__setitem__("scheme", "svd"), "'scheme'"),
    ("side_unknown", lambda m: m["tensors"][3].__setitem__("side", "up"), "'side'"),
    ("codec_unknown", lambda m: m["blobs"]["coef/0"].__setitem__("codec", "gzip"), "'codec'"),
    ("shuffle_string", lambda m: m["blobs"]["coef/0"].__setitem__("shuffle", "false"), "shuffle"),
    ("sha_uppercase", lambda m: m["blobs"]["coef/0"].__setitem__("sha256", "A" * 64), "sha256"),
    ("sha_short", lambda m: m["blobs"]["coef/0"].__setitem__("sha256", "a" * 63), "sha256"),
    ("source_bytes_string", lambda m: m["members"][0].__setitem__("source_bytes", "1"), "'source_bytes'"),
    ("source_bytes_negative", lambda m: m["members"][0].__setitem__("source_bytes", -1), "'source_bytes'"),
    ("metadata_values_int", lambda m: m["members"][0].__setitem__("metadata", {"k": 1}), "metadata"),
    ("raw_not_object", lambda m: m["members"][0].__setitem__("raw", ["b", "r"]), "'raw'"),
    ("dtypes_not_object", lambda m: m["members"][0].__setitem__("dtypes", None), "'dtypes'"),
    ("tensors_not_list", lambda m: m.__setitem__("tensors", {}), "'tensors'"),
    ("members_not_list", lambda m: m.__setitem__("members", None), "'members'"),
    ("blobs_not_object", lambda m: m.__setitem__("blobs", []), "'blobs'"),
    ("options_not_object", lambda m: m.__setitem__("options", "x"), "'options'"),
    ("created_by_int", lambda m: m.__setitem__("created_by", 1), "'created_by'"),
    ("energy_string", lambda m: m["tensors"][3].__setitem__("energy", "1"), "'energy'"),
    ("stats_input_bytes_negative", lambda m: m.__setitem__("stats", {"input_bytes": -5}), "input_bytes"),
    ("stats_not_object", lambda m: m.__setitem__("stats", [1]), "'stats'"),
    ("tensor_record_not_object", lambda m: m["tensors"].__setitem__(0, "ids"), "object"),
    ("member_record_not_object", lambda m: m["members"].__setitem__(0, 7), "object"),
    ("blob_record_not_object", lambda m: m["blobs"].__setitem__("coef/0", None), "object"),
    ("format_wrong", lambda m: m.__setitem__("format", "unipack.zip"), "format"),
    ("matrix_wrong", lambda m: m["tensors"][3].__setitem__("matrix", [64, 16]), "matrix"),
    ("matrix_strings", lambda m: m["tensors"][3].__setitem__("matrix", ["16", "64"]), "matrix"),
    ("duplicate_tensor_name", lambda m: m["tensors"][2].__setitem__("name", "b"), "twice"),
    ("duplicate_member_name", lambda m: m["members"][2].__setitem__("name", "m0"), "twice"),
]


@pytest.mark.parametrize("edit,fragment", [(e, f) for _, e, f in BAD_FIELDS], ids=[n for n, _, _ in BAD_FIELDS])
def test_p05_wrong_field_types(
    tmp_path: Path, base: Base, edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    p = base.parts()
    assert [t["name"] for t in p.manifest["tensors"]] == ["ids", "b", "r", "w"]
    edit(p.manifest)
    open_fails(write(tmp_path, p.assemble()), FormatError, fragment)


REQUIRED = (
    [("top", k) for k in ("format", "format_version", "created_by", "options", "tensors", "members", "blobs")]
    + [("tensor0", k) for k in ("name", "storage", "dtype", "shape", "reason", "blob")]  # exact tensor
    + [("tensor3", k) for k in ("scheme", "rank", "mean", "side", "matrix", "shape")]  # shared rows tensor
    + [("member", k) for k in ("name", "source", "source_bytes", "raw", "dtypes", "errors")]
    + [("blob", k) for k in ("dtype", "shape", "codec", "shuffle", "sha256")]
)


@pytest.mark.parametrize("where,key", REQUIRED, ids=[f"{w}-{k}" for w, k in REQUIRED])
def test_p05_missing_required_field(tmp_path: Path, base: Base, where: str, key: str) -> None:
    p = base.parts()
    m = p.manifest
    obj = {
        "top": m,
        "tensor0": m["tensors"][0],
        "tensor3": m["tensors"][3],
        "member": m["members"][0],
        "blob": m["blobs"]["coef/0"],
    }[where]
    del obj[key]
    msg = open_fails(write(tmp_path, p.assemble()), FormatError)
    assert key in msg, f"{key!r} not in {msg!r}"


def test_p05_unknown_optional_keys_are_ignored(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    m = p.manifest
    m["x_future_top"] = {"nested": [1, 2, {"a": None}]}
    for t in m["tensors"]:
        t["x_future_tensor"] = "hello"
    for mem in m["members"]:
        mem["x_future_member"] = 3.5
    for b in m["blobs"].values():
        b["x_future_blob"] = True
    m["stats"]["x_future_stat"] = [1]
    m["options"]["x_future_option"] = None
    opens_and_loads(write(tmp_path, p.assemble()), base)


def test_p05_stats_optional(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    del p.manifest["stats"]
    opens_and_loads(write(tmp_path, p.assemble()), base)


# ------------------------------------------------------------------------------------------
# 6. checked arithmetic on shapes
# ------------------------------------------------------------------------------------------

HUGE_SHAPES = {
    "2x2^63-1": [2, 2**63 - 1],
    "2^62x2^62": [2**62, 2**62],
    "2^64": [2**64],
    "2^100": [2**100],
    "negative": [16, -1],
    "all_negative": [-16, -1],
    "17_dims": [1] * 17,
    "float_dims": [16.0, 1.0],
    "bool_dims": [True, 16],
    "string_dims": ["16"],
    "null_dim": [None],
    "nested": [[16]],
}


@pytest.mark.parametrize("shape", list(HUGE_SHAPES.values()), ids=list(HUGE_SHAPES))
@pytest.mark.parametrize("where", ["header_entry", "blob_record", "tensor_record", "both_records"])
def test_p06_bad_shapes_fail_cleanly(tmp_path: Path, base: Base, shape: list[Any], where: str) -> None:
    p = base.parts()
    if where in ("blob_record", "both_records"):
        p.manifest["blobs"]["mean/w"]["shape"] = shape
    if where in ("tensor_record", "both_records"):
        p.tensor("w")["shape"] = shape
    if where == "header_entry":
        p.blob("coef/0")[2] = shape
    open_fails(write(tmp_path, p.assemble()), FormatError)  # not OverflowError / MemoryError / TypeError


@pytest.mark.parametrize("shape", [[2**53, 2**53, 2**53], [2**53, 2**53], [2**40] * 16, [0, 2**53, 2**53]])
def test_p06_huge_but_well_formed_shape_claims(tmp_path: Path, base: Base, shape: list[int]) -> None:
    """Dims within the per-dim limit whose product is astronomic: a zstd blob claims them consistently."""
    p = base.parts()
    p.tensor("ids")["shape"] = shape
    p.manifest["blobs"]["exact/ids"]["shape"] = shape
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        try:
            with unipack.open(path) as b:
                b.load_numpy(b.members[0])
        except UnipackError as exc:
            assert type(exc) is FormatError, repr(exc)
    assert peak.peak < 64 * MIB


def test_p06_huge_plain_blob_shape(tmp_path: Path, base: Base) -> None:
    """A codec-none blob claiming [2**53, 2**53] in header and manifest: refused by the byte count."""
    p = base.parts()
    p.tensor("ids")["shape"] = [2**53, 2**53]
    p.set_blob("exact/ids", p.blob("exact/ids")[3], codec="none", shape=[2**53, 2**53])
    open_fails(write(tmp_path, p.assemble()), FormatError, "do not hold")


# ------------------------------------------------------------------------------------------
# 7. blob ranges tile the data section exactly
# ------------------------------------------------------------------------------------------


def _offsets(name: str, value: list[Any]) -> Callable[[dict[str, Any]], None]:
    return lambda h: h[name].__setitem__("data_offsets", value)


@pytest.mark.parametrize(
    "value",
    [[4967, 10**6], [10**12, 10**12 + 64], [-64, 0], [5000, 4936], [0, 2**64]],
    ids=["end_past", "start_past", "negative", "reversed", "end_2^64"],
)
def test_p07_range_outside_data_section(tmp_path: Path, base: Base, value: list[int]) -> None:
    p = base.parts()
    msg = open_fails(write(tmp_path, p.assemble(header_edit=_offsets("coef/2", value))), FormatError)
    assert "outside" in msg or "data_offsets" in msg, msg


@pytest.mark.parametrize("value", [["0", "19"], [0.0, 19.0], [0], [0, 19, 20], None, [True, 19]])
def test_p07_malformed_offsets(tmp_path: Path, base: Base, value: Any) -> None:
    p = base.parts()
    open_fails(write(tmp_path, p.assemble(header_edit=_offsets("exact/ids", value))), FormatError, "data_offsets")


def test_p07_overlapping_ranges(tmp_path: Path, base: Base) -> None:
    p = base.parts()

    def edit(h: dict[str, Any]) -> None:
        h["coef/1"]["data_offsets"] = list(h["coef/0"]["data_offsets"])  # same size, same bytes

    open_fails(write(tmp_path, p.assemble(header_edit=edit)), FormatError, "overlap")


def test_p07_partially_overlapping_ranges(tmp_path: Path, base: Base) -> None:
    p = base.parts()

    def edit(h: dict[str, Any]) -> None:
        b, e = h["coef/1"]["data_offsets"]
        h["coef/1"]["data_offsets"] = [b - 4, e - 4]
        b, e = h["coef/2"]["data_offsets"]
        h["coef/2"]["data_offsets"] = [b - 4, e - 4]

    open_fails(write(tmp_path, p.assemble(header_edit=edit, tail=b"")), FormatError)


@pytest.mark.parametrize("position", ["start", "middle"])
def test_p07_gap_between_blobs(tmp_path: Path, base: Base, position: str) -> None:
    p = base.parts()
    i = 0 if position == "start" else 5
    p.blobs.insert(i, ["__gap__", "U8", [8], b"\0" * 8])
    data = p.assemble(header_edit=lambda h: h.pop("__gap__"))
    open_fails(write(tmp_path, data), FormatError, "gap")


@pytest.mark.parametrize("tail", [b"\0", b"x" * 8, b"\0" * 4096])
def test_p07_trailing_bytes(tmp_path: Path, base: Base, tail: bytes) -> None:
    open_fails(write(tmp_path, base.parts().assemble(tail=tail)), FormatError, "after the last blob")


def test_p07_truncated_data(tmp_path: Path, base: Base) -> None:
    data = base.parts().assemble()
    open_fails(write(tmp_path, data[:-1]), FormatError, "truncated")


# ------------------------------------------------------------------------------------------
# 8. dtypes and byte counts
# ------------------------------------------------------------------------------------------

BAD_DTYPES = ["F128", "c64", 5, None, "f32", "float32", "F32 ", "", ["F32"], "O"]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=[repr(d) for d in BAD_DTYPES])
@pytest.mark.parametrize("where", ["header", "blob_record", "tensor_record", "member_dtypes"])
def test_p08_dtype_not_allowed(tmp_path: Path, base: Base, dtype: Any, where: str) -> None:
    p = base.parts()
    if where == "header":
        p.blob("coef/0")[1] = dtype
    elif where == "blob_record":
        p.manifest["blobs"]["coef/0"]["dtype"] = dtype
    elif where == "tensor_record":
        p.tensor("r")["dtype"] = dtype
    else:
        p.manifest["members"][0]["dtypes"] = {"r": dtype}
    open_fails(write(tmp_path, p.assemble()), FormatError, "dtype")


@pytest.mark.parametrize("shape", [[15], [17], [4, 5], [], [0]])
def test_p08_header_byte_count_mismatch(tmp_path: Path, base: Base, shape: list[int]) -> None:
    p = base.parts()
    p.blob("coef/0")[2] = shape  # 64 bytes stored
    open_fails(write(tmp_path, p.assemble()), FormatError, "do not hold")


def test_p08_header_dtype_size_mismatch(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.blob("coef/0")[1] = "F64"  # 16 x 8 != 64
    open_fails(write(tmp_path, p.assemble()), FormatError, "do not hold")


def test_p08_header_and_manifest_disagree_on_plain_blob(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.blob("coef/0")[1], p.blob("coef/0")[2] = "I32", [16]  # same byte count, other dtype
    open_fails(write(tmp_path, p.assemble()), FormatError, "coef/0", "manifest says")


def test_p08_compressed_blob_not_u8(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    stored = p.blob("exact/ids")[3]
    assert len(stored) % 1 == 0
    p.blob("exact/ids")[1], p.blob("exact/ids")[2] = "I8", [len(stored)]
    open_fails(write(tmp_path, p.assemble()), FormatError, "U8")


# ------------------------------------------------------------------------------------------
# 9. cross-checks between records and blobs
# ------------------------------------------------------------------------------------------


def test_p09_mean_shape_differs_from_tensor(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    mean = p.blob("mean/w")[3]
    # a consistent blob of the wrong shape: [64, 16] instead of [16, 64]
    p.set_blob("mean/w", mean, shape=[64, 16])
    open_fails(write(tmp_path, p.assemble()), FormatError, "mean/w", "[16, 64]")


def test_p09_basis_shape_wrong(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.set_blob("basis/w", p.blob("basis/w")[3], shape=[1, 64])  # rows/right wants [n, k] = [64, 1]
    open_fails(write(tmp_path, p.assemble()), FormatError, "basis/w", "[64, 1]")


@pytest.mark.parametrize("n", [15, 17, 0])
def test_p09_coefficient_blob_length_wrong(tmp_path: Path, base: Base, n: int) -> None:
    p = base.parts()
    p.set_blob("coef/1", np.zeros(n, np.float32).tobytes(), shape=[n])
    open_fails(write(tmp_path, p.assemble()), FormatError, "coef/1", "[16]")


def test_p09_coefficient_blob_dtype_differs_from_basis(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.set_blob("coef/1", np.zeros(16, np.int32).tobytes(), dtype="I32")
    open_fails(write(tmp_path, p.assemble()), FormatError, "coef/1", "dtype")


@pytest.mark.parametrize("rank", [65, 2**40])
def test_p09_rank_exceeds_dimension(tmp_path: Path, base: Base, rank: int) -> None:
    p = base.parts()
    t = p.tensor("w")
    t["rank"] = rank
    if rank < 1000:  # keep the basis and coefficients consistent with the claimed rank
        p.set_blob("basis/w", np.zeros((64, rank), np.float32).tobytes(), shape=[64, rank])
        for i in range(3):
            p.set_blob(f"coef/{i}", np.zeros(16 * rank, np.float32).tobytes(), shape=[16 * rank])
    open_fails(write(tmp_path, p.assemble()), FormatError, "'rank'")


def test_p09_flat_rank_exceeds_dimension(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    t = p.tensor("w")
    t["scheme"] = "flat"
    del t["side"], t["matrix"]
    t["rank"] = 1025  # D = 1024
    open_fails(write(tmp_path, p.assemble()), FormatError, "'rank'")


@pytest.mark.parametrize(
    "field,owner",
    [("mean", "tensor"), ("basis", "tensor"), ("blob", "exact"), ("coefficients", "member"), ("raw", "member")],
)
def test_p09_referenced_blob_missing(tmp_path: Path, base: Base, field: str, owner: str) -> None:
    p = base.parts()
    m = p.manifest
    if owner == "tensor":
        p.tensor("w")[field] = "nope/x"
    elif owner == "exact":
        p.tensor("ids")[field] = "nope/x"
    elif field == "coefficients":
        m["members"][0]["coefficients"] = "nope/x"
    else:
        m["members"][0]["raw"]["b"] = "nope/x"
    open_fails(write(tmp_path, p.assemble()), FormatError, "'nope/x'")


def test_p09_referenced_blob_absent_from_header(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.blobs = [b for b in p.blobs if b[0] != "coef/2"]
    open_fails(write(tmp_path, p.assemble()), FormatError, "coef/2", "disagree")


def test_p09_null_basis_with_rank(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.tensor("w")["basis"] = None
    open_fails(write(tmp_path, p.assemble()), FormatError, "None")


def test_p09_unreferenced_extra_blob(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    extra = np.arange(4, dtype=np.float32).tobytes()
    p.blobs.append(["extra/x", "F32", [4], extra])
    p.manifest["blobs"]["extra/x"] = {
        "dtype": "F32",
        "shape": [4],
        "codec": "none",
        "shuffle": False,
        "sha256": sha(extra),
    }
    open_fails(write(tmp_path, p.assemble()), FormatError, "extra/x", "not referenced")


def test_p09_blob_in_header_not_in_manifest(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.blobs.append(["extra/x", "F32", [4], np.arange(4, dtype=np.float32).tobytes()])
    open_fails(write(tmp_path, p.assemble()), FormatError, "extra/x")


@pytest.mark.parametrize("how", ["coefficients", "raw", "exact_as_raw"])
def test_p09_blob_referenced_twice(tmp_path: Path, base: Base, how: str) -> None:
    p = base.parts()
    m = p.manifest
    if how == "coefficients":
        m["members"][1]["coefficients"] = "coef/0"
    elif how == "raw":
        m["members"][1]["raw"]["r"] = "raw/0/r"
    else:
        m["members"][1]["raw"]["b"] = "raw/0/b"
    open_fails(write(tmp_path, p.assemble()), FormatError, "referenced twice")


def test_p09_member_raw_map_missing_raw_tensor(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    del p.manifest["members"][2]["raw"]["r"]
    open_fails(write(tmp_path, p.assemble()), FormatError, "m2", "raw")


def test_p09_member_raw_map_names_non_raw_tensor(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.manifest["members"][2]["raw"]["w"] = "raw/2/r"
    open_fails(write(tmp_path, p.assemble()), FormatError, "m2", "raw")


def test_p09_raw_blob_shape_wrong(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.set_blob("raw/1/r", np.zeros(9, np.float32).tobytes(), shape=[9])
    open_fails(write(tmp_path, p.assemble()), FormatError, "raw/1/r", "[8]")


def test_p09_exact_dtype_overridden(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.manifest["members"][0]["dtypes"] = {"ids": "I32"}
    open_fails(write(tmp_path, p.assemble()), FormatError, "ids")


def test_p09_member_dtype_for_unknown_tensor(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.manifest["members"][0]["dtypes"] = {"nope": "F16"}
    open_fails(write(tmp_path, p.assemble()), FormatError, "nope")


def test_p09_shared_tensor_with_int_dtype(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.tensor("w")["dtype"] = "I32"
    open_fails(write(tmp_path, p.assemble()), FormatError, "float")


def test_p09_rank0_with_basis(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.tensor("w")["rank"] = 0
    open_fails(write(tmp_path, p.assemble()), FormatError, "rank 0")


# ------------------------------------------------------------------------------------------
# 10. compressed blobs
# ------------------------------------------------------------------------------------------

IDS_BYTES = 4096 * 8


@pytest.mark.parametrize("declared", [IDS_BYTES - 8, IDS_BYTES + 8, 0, 2**40])
def test_p10_declared_content_size_differs(tmp_path: Path, base: Base, declared: int) -> None:
    p = base.parts()
    p.set_blob("exact/ids", rle_frame(min(declared, IDS_BYTES + 8), declared=declared))
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        load_fails(path, FormatError, "exact/ids")
    assert peak.peak < 16 * MIB


def test_p10_declared_size_differs_refused_before_decompressing(tmp_path: Path, base: Base) -> None:
    """A frame that really holds 1 GiB, where the manifest expects 32 KiB: never decompressed."""
    p = base.parts()
    p.set_blob("exact/ids", rle_frame(GIB))
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        load_fails(path, FormatError, "exact/ids")
    assert peak.peak < 16 * MIB


def test_p10_frame_lies_about_its_size(tmp_path: Path, base: Base) -> None:
    """The frame header declares the expected size but its blocks hold more: zstd must stop."""
    p = base.parts()
    body = rle_frame(IDS_BYTES + 128 * 1024, declared=IDS_BYTES)
    p.set_blob("exact/ids", body)
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        load_fails(path, FormatError, "exact/ids")
    assert peak.peak < 16 * MIB


def test_p10_frame_shorter_than_declared(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.set_blob("exact/ids", rle_frame(IDS_BYTES - 1024, declared=IDS_BYTES))
    load_fails(write(tmp_path, p.assemble()), FormatError, "exact/ids")


@pytest.mark.parametrize("size", [GIB, 4 * GIB])
def test_p10_zstd_bomb_consistent_claim(tmp_path: Path, base: Base, size: int) -> None:
    """A ~32 KiB frame decoding to 1 GiB of zeros; the manifest consistently claims that size.

    Reading it must not allocate anything near 1 GiB: the spec's ratio cap (decoded <= 1024 x
    stored + 65536) refuses it with a FormatError mentioning "compression ratio".
    """
    p = base.parts()
    n = size // 8
    p.tensor("ids")["shape"] = [n]
    p.set_blob("exact/ids", rle_frame(size), shape=[n])
    assert len(p.blob("exact/ids")[3]) < 200 * 1024
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        try:
            with unipack.open(path) as b:
                b.load_numpy(b.members[0])
            raised: BaseException | None = None
        except MemoryError as exc:  # pragma: no cover - the failure this test exists to catch
            raised = exc
        except UnipackError as exc:
            raised = exc
    assert peak.peak < 64 * MIB, f"reading a zstd bomb allocated {peak.peak / MIB:.0f} MiB"
    assert isinstance(raised, FormatError), repr(raised)
    assert "compression ratio" in str(raised) and "exact/ids" in str(raised), str(raised)


@pytest.mark.parametrize("tail", [b"garbage!", b"\0", "skippable", "second_frame"])
def test_p10_trailing_data_after_frame(tmp_path: Path, base: Base, tail: Any) -> None:
    p = base.parts()
    good = p.blob("exact/ids")[3]
    if tail == "skippable":
        tail = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    elif tail == "second_frame":
        tail = zstd_frame(b"\0" * 16)
    p.set_blob("exact/ids", good + tail)
    load_fails(write(tmp_path, p.assemble()), FormatError, "exact/ids", "trailing")


def test_p10_frame_without_content_size(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    frame_ = zstd_frame(b"\0" * IDS_BYTES, content_size=False)
    assert zstandard.get_frame_parameters(frame_).content_size != IDS_BYTES
    p.set_blob("exact/ids", frame_)
    load_fails(write(tmp_path, p.assemble()), FormatError, "exact/ids", "zstd")


@pytest.mark.parametrize("stored", [b"", b"\x28\xb5\x2f", b"not a zstd frame at all", b"\0" * 64])
def test_p10_not_a_zstd_frame(tmp_path: Path, base: Base, stored: bytes) -> None:
    p = base.parts()
    p.set_blob("exact/ids", stored)
    load_fails(write(tmp_path, p.assemble()), FormatError, "exact/ids")


def test_p10_corrupt_frame_body(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    good = bytearray(p.blob("mean/w")[3])
    for i in range(20, len(good), 97):
        good[i] ^= 0x5A
    p.set_blob("mean/w", bytes(good))  # checksum recomputed: the codec must catch it
    with unipack.open(write(tmp_path, p.assemble())) as b:
        try:
            b.load_numpy("m0")
        except UnipackError as exc:
            assert type(exc) is FormatError and "mean/w" in str(exc), repr(exc)


def test_p10_shuffle_on_plain_blob_or_one_byte(tmp_path: Path, base: Base) -> None:
    """Spec: shuffle is false for codec none; a reader must not mis-decode when it is set."""
    p = base.parts()
    p.manifest["blobs"]["coef/0"]["shuffle"] = True
    path = write(tmp_path, p.assemble())
    try:
        with unipack.open(path) as b:
            got = b.load_numpy("m0")
    except UnipackError as exc:
        assert type(exc) is FormatError, repr(exc)
    else:
        for k, (_, a) in got.items():
            assert a.tobytes() == base.loaded["m0"][k].tobytes(), k


# ------------------------------------------------------------------------------------------
# 11. checksums
# ------------------------------------------------------------------------------------------


def test_p11_bit_flip_in_every_blob(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    data = p.assemble()
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n
    header = json.loads(data[8:start])
    names = [k for k in header if k != "__metadata__"]
    assert len(names) == len(p.manifest["blobs"]) >= 10
    for name in names:
        b, e = header[name]["data_offsets"]
        for bit_at in sorted({b, (b + e) // 2, e - 1}):
            corrupt = bytearray(data)
            corrupt[start + bit_at] ^= 1 << (bit_at % 8)
            path = write(tmp_path, bytes(corrupt), f"flip-{name.replace('/', '_')}-{bit_at}.upk")
            with unipack.open(path) as bundle:  # blob checksums are checked on read, not on open
                errors = []
                for m in bundle.members:
                    try:
                        bundle.load_numpy(m)
                    except UnipackError as exc:
                        errors.append(exc)
            assert errors, f"a flipped bit in blob {name!r} went unnoticed"
            for exc in errors:
                assert type(exc) is ChecksumError, repr(exc)
                assert repr(name) in str(exc) and str(path) in str(exc), str(exc)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_p11_bit_flip_in_manifest(tmp_path: Path, base: Base, where: float) -> None:
    p = base.parts()
    text = dumps(p.manifest)
    data = bytearray(p.assemble(manifest_text=text))
    (n,) = struct.unpack("<Q", data[:8])
    header_text = bytes(data[8 : 8 + n])
    # find the manifest string inside the header and flip one bit of an ASCII letter in it
    lo = header_text.index(b'"manifest":"') + len(b'"manifest":"')
    i = lo + int(where * len(text))
    while not chr(data[8 + i]).isalpha():
        i += 1
    data[8 + i] ^= 0x20  # case flip keeps the JSON valid
    msg = open_fails(write(tmp_path, bytes(data)), ChecksumError, "manifest")
    assert "checksum" in msg


def test_p11_manifest_sha_field_damaged(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.meta["manifest_sha256"] = "0" * 64
    open_fails(write(tmp_path, p.assemble(fix_sha=False)), ChecksumError, "manifest")


def test_p11_manifest_sha_missing(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    del p.meta["manifest_sha256"]
    open_fails(write(tmp_path, p.assemble(fix_sha=False)), ChecksumError, "manifest")


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(q.relative_to(directory)): (q.read_bytes(), q.stat().st_mtime_ns)
        for q in sorted(directory.rglob("*"))
        if q.is_file()
    }


def _verify(path: Path) -> list[str]:
    with unipack.open(path) as b:
        return b.verify()


def test_p11_verify_clean_bundle(tmp_path: Path, base: Base) -> None:
    d = tmp_path / "v"
    d.mkdir()
    path = write(d, base.data)
    before = _snapshot(tmp_path)
    assert _verify(path) == []
    result = CliRunner().invoke(unipack.cli.cli, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert _snapshot(tmp_path) == before, "verify wrote or touched files"


def test_p11_verify_reports_every_corrupt_blob(tmp_path: Path, base: Base) -> None:
    d = tmp_path / "v"
    d.mkdir()
    data = bytearray(base.data)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    bad = ["coef/1", "mean/w"]
    for name in bad:
        b, e = header[name]["data_offsets"]
        data[8 + n + (b + e) // 2] ^= 0x10
    path = write(d, bytes(data))
    before = _snapshot(tmp_path)
    problems = _verify(path)
    assert isinstance(problems, list) and all(isinstance(x, str) for x in problems)
    for name in bad:
        assert any(repr(name) in x for x in problems), (name, problems)
    assert all("\n" not in x for x in problems)
    result = CliRunner().invoke(unipack.cli.cli, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == len(problems), lines
    for name in bad:
        assert any(repr(name) in ln for ln in lines), (name, lines)
    assert _snapshot(tmp_path) == before, "verify wrote or touched files"


def test_p11_verify_reports_bad_zstd_and_bomb(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.tensor("ids")["shape"] = [GIB // 8]
    p.set_blob("exact/ids", rle_frame(GIB), shape=[GIB // 8])
    path = write(tmp_path, p.assemble())
    with Peak() as peak:
        problems = _verify(path)
    assert peak.peak < 64 * MIB
    assert problems and any("exact/ids" in x for x in problems), problems
    result = CliRunner().invoke(unipack.cli.cli, ["verify", str(path)])
    assert result.exit_code == 1


def test_p11_verify_cli_on_unopenable_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"\x01\x02\x03")
    result = CliRunner().invoke(unipack.cli.cli, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "truncated" in lines[0], lines


# ------------------------------------------------------------------------------------------
# 12. names are inert
# ------------------------------------------------------------------------------------------

BAD_MEMBER_NAMES = [
    "a\x00b",
    "a/b",
    "/abs",
    "a\\b",
    "..",
    ".",
    ".hidden",
    "a\x07b",
    "a\nb",
    "a\rb",
    "a\x1bb",
    "a\x7fb",
    "x" * 300,
    "x" * 256,
    "",
    "../../etc/passwd",
    "..\\..\\evil",
]


@pytest.mark.parametrize("name", BAD_MEMBER_NAMES, ids=[repr(n)[:24] for n in BAD_MEMBER_NAMES])
def test_p12_hostile_member_name(tmp_path: Path, base: Base, name: str) -> None:
    p = base.parts()
    p.manifest["members"][1]["name"] = name
    msg = open_fails(write(tmp_path, p.assemble()), FormatError, "name")
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg, "the error echoes raw control characters"


def test_p12_member_name_255_chars_accepted(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    p.manifest["members"][1]["name"] = "y" * 255
    with unipack.open(write(tmp_path, p.assemble())) as b:
        assert b.members[1] == "y" * 255


@pytest.mark.parametrize(
    "name",
    ["i\x00ds", "ids\n", "\x1b[31mids", "i\x7fds", "", "t" * 5000],
    ids=["nul", "newline", "ansi", "del", "empty", "5000chars"],
)
def test_p12_hostile_tensor_name(tmp_path: Path, base: Base, name: str) -> None:
    p = base.parts()
    p.tensor("ids")["name"] = name
    msg = open_fails(write(tmp_path, p.assemble()), FormatError, "name")
    assert "\n" not in msg and "\x1b" not in msg


@pytest.mark.parametrize(
    "names",
    [
        ["../evil", "b", "c"],
        ["a/b", "b", "c"],
        [".a", "b", "c"],
        ["", "b", "c"],
        ["a\x00", "b", "c"],
        ["a\\b", "b", "c"],
        ["z" * 300, "b", "c"],
    ],
)
def test_p12_merge_refuses_hostile_names(tmp_path: Path, base: Base, names: list[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.upk"
    with pytest.raises(UnipackError) as info:
        unipack.merge(base.inputs, out, names=names)
    assert type(info.value) is InputError, repr(info.value)
    assert list(tmp_path.rglob("*")) == [out_dir], list(tmp_path.rglob("*"))


def test_p12_extract_all_writes_only_inside_dir(tmp_path: Path, base: Base) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bundle = write(root, base.data, "b.upk")
    target = root / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    with unipack.open(bundle) as b:
        written = b.extract_all(target)
    after = set(tmp_path.rglob("*"))
    new_files = {q for q in after - before if q.is_file()}
    assert new_files == {q.resolve() for q in written} or new_files == set(written)
    for q in new_files:
        assert q.resolve().is_relative_to(target.resolve()), q
        assert q.parent.resolve() == target.resolve(), q
    assert {q.name for q in new_files} == {f"{m}.safetensors" for m in ("m0", "m1", "m2")}
    # nothing left behind but the directories leading to target and the members
    assert {q for q in after - before if not q.is_file()} <= {root / "deep", target}


def test_p12_extract_all_with_unicode_and_dotted_names_stays_inside(tmp_path: Path, base: Base) -> None:
    p = base.parts()
    for mem, name in zip(p.manifest["members"], ["a..b", "ü name", "x.safetensors"]):
        mem["name"] = name
    bundle = write(tmp_path, p.assemble(), "b.upk")
    target = tmp_path / "out"
    with unipack.open(bundle) as b:
        written = b.extract_all(target)
    assert sorted(q.name for q in target.iterdir()) == sorted(q.name for q in written)
    assert all(q.parent == target for q in written)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["b.upk", "out"]


def test_p12_open_does_not_follow_hostile_paths(tmp_path: Path) -> None:
    """os.fspath-like objects only; no shell, no glob: a literal odd path is just a missing file."""
    weird = tmp_path / "*.upk"
    with pytest.raises(UnipackError):
        unipack.open(weird)
    assert not os.path.exists(weird)


def test_hostile_suite_imports_cli() -> None:
    import unipack.cli  # noqa: F401  (the verify tests use unipack.cli.cli)

    assert hasattr(unipack.cli, "cli")
