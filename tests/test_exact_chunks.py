"""Chunked blobs (``zstd-chunks``, format version 7) and the lossless tier's chunk digests.

Chunks are made small here (``codec.CHUNK_BYTES``), so every large tensor spans several and ends
in a partial chunk. Round trips are checked by sha256 against the input files as the reference
safetensors loader reads them; chunk layouts and digests against an independent numpy/zstandard
computation from the spec (§3.1, §9.1); damage against the one-line errors of ``errors.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import TensorSpec, blob_range, run, standard_specs, write_population
from safetensors.torch import load_file, save_file

import unipack
from unipack.errors import ChecksumError, FormatError
from unipack.format import codec
from unipack.format.manifest import CHUNKED_CODEC

#: Logical bytes per chunk in these tests: 256 F32 or 512 16-bit elements.
CHUNK = 1024


def tensor_sha(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def special_bits(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """NaN payloads (quiet and signalling, both signs), +-inf, -0.0 and subnormals."""
    width = torch.finfo(dtype).bits
    exp_bits = {torch.float32: 8, torch.float16: 5, torch.bfloat16: 8}[dtype]
    mant = width - 1 - exp_bits
    inf = ((1 << exp_bits) - 1) << mant
    sign = 1 << (width - 1)
    rng = np.random.default_rng(seed)
    pool = [inf | 1, inf | (1 << (mant - 1)) | 3, sign | inf | 5, inf, sign | inf, sign, 1, 3, sign | 2]
    bits = np.array([pool[k] for k in rng.integers(0, len(pool), n)], dtype=np.int64)
    holder = {16: torch.int16, 32: torch.int32}[width]
    signed = np.where(bits >= 1 << (width - 1), bits - (1 << width), bits)
    return torch.from_numpy(signed.astype({16: np.int16, 32: np.int32}[width])).view(holder).view(dtype)


def chunked_population(directory: Path, dtype: torch.dtype, n: int = 4, seed: int = 0) -> list[Path]:
    """Fine-tunes whose large tensors span several chunks (the last partial), special bit patterns
    scattered through a shared tensor (residuals) and through one stored raw (NaN and inf)."""
    specs = {
        **standard_specs(),
        "big.weight": TensorSpec((37, 29), kind="flat", rank=1),  # 1073 elements: 4+ chunks, partial
        "wild.weight": TensorSpec((31, 23), kind="flat", rank=1),
    }
    pop = write_population(directory, specs, n=n, seed=seed)
    for i, path in enumerate(pop.paths):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        big = tensors["big.weight"].reshape(-1)
        tiny = torch.finfo(dtype).tiny
        big[::97] = (
            torch.tensor([-0.0, tiny / 4, -tiny / 2], dtype=torch.float64).to(dtype).repeat(4)[: big[::97].numel()]
        )
        wild = tensors["wild.weight"].reshape(-1)
        wild[::5] = special_bits(dtype, wild[::5].numel(), seed=i)  # not finite: stored raw
        save_file(tensors, str(path))
    return pop.paths


@pytest.fixture(scope="module", params=["F32", "F16", "BF16"])
def chunked(request, tmp_path_factory) -> tuple[Path, list[Path]]:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[request.param]
    d = tmp_path_factory.mktemp(f"chunked-{request.param}")
    paths = chunked_population(d / "in", dtype)
    out = d / "bundle.upk"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codec, "CHUNK_BYTES", CHUNK)
        unipack.merge(paths, out, exact_tier=True, lossless="off", baselines=False)
    return out, paths


def index_of(stored: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """§3.1, read independently: E and each chunk's (frame length, digest)."""
    per, count = struct.unpack_from("<QI", stored)
    return per, [struct.unpack_from("<Q32s", stored, 12 + 40 * k) for k in range(count)]


def stored_bytes(path: Path, blob: str) -> bytes:
    start, end = blob_range(path, blob)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


@pytest.mark.parametrize("threads", [1, None])
def test_every_member_comes_back_bit_for_bit_across_chunks(chunked, threads):
    bundle, paths = chunked
    with unipack.open(bundle) as b:
        assert b.manifest.format_version == 7
        for name, path in zip(b.members, paths):
            original = load_file(str(path))
            got = b.load_numpy(name, exact=True, threads=threads)
            assert set(got) == set(original)
            for tname, (_, array) in got.items():
                want = tensor_sha(original[tname])
                assert hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest() == want, (name, tname)


def test_chunked_blobs_and_digests_match_an_independent_computation(chunked):
    """Every chunked blob: E = CHUNK / s elements, ceil(n / E) frames tiling the blob, each frame's
    digest its sha256, each decoding to its chunk's byte planes; each residual's chunk_sha256 the
    sha256 of the original's bytes over the chunk's range."""
    bundle, paths = chunked
    with unipack.open(bundle) as b:
        manifest = b.manifest
        kinds, most, partial = set(), 0, False
        for name, rec in manifest.blobs.items():
            if rec.codec != CHUNKED_CODEC:
                assert rec.nbytes <= CHUNK or rec.codec == "none", name
                continue
            stored = stored_bytes(bundle, name)
            s = int(np.dtype(f"u{rec.nbytes // rec.numel}").itemsize)
            per, entries = index_of(stored)
            assert per == CHUNK // s and len(entries) == -(-rec.numel // per) >= 2
            most, partial = max(most, len(entries)), partial or rec.numel % per != 0
            assert hashlib.sha256(stored).hexdigest() == rec.sha256
            logical, pos = [], 12 + 40 * len(entries)
            for length, digest in entries:
                frame = stored[pos : pos + length]
                pos += length
                assert hashlib.sha256(frame).digest() == digest
                planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), np.uint8)
                logical.append(planes.reshape(s, -1).T.tobytes() if rec.shuffle else planes.tobytes())
            assert pos == len(stored)
            assert b"".join(logical) == np.ascontiguousarray(b.read_blob(name)).tobytes()
            kinds.add(name.split("/")[0])
        assert {"residual", "mean"} <= kinds and most >= 3 and partial
        checked = 0
        for m, path in zip(manifest.members, paths):
            original = load_file(str(path))
            for tname, e in (m.exact or {}).items():
                if e.chunks is None:
                    continue
                raw = original[tname].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                per, _ = index_of(stored_bytes(bundle, str(e.blob)))
                step = per * original[tname].element_size()
                assert list(e.chunks) == [
                    hashlib.sha256(raw[k : k + step]).hexdigest() for k in range(0, len(raw), step)
                ]
                assert e.sha256 == hashlib.sha256(raw).hexdigest()
                checked += 1
        assert checked >= len(manifest.members)


def test_a_damaged_chunk_is_one_clear_error_naming_tensor_and_chunk(chunked, tmp_path):
    bundle, _ = chunked
    with unipack.open(bundle) as b:
        member = b.manifest.members[1]
        tname, entry = next((k, e) for k, e in (member.exact or {}).items() if e.chunks)
    stored = stored_bytes(bundle, str(entry.blob))
    _, entries = index_of(stored)
    at = 12 + 40 * len(entries) + entries[0][0] + entries[1][0] // 2  # the middle of chunk 1's frame
    bad = tmp_path / "bad.upk"
    data = bytearray(bundle.read_bytes())
    data[blob_range(bundle, str(entry.blob))[0] + at] ^= 0x10
    bad.write_bytes(bytes(data))
    with unipack.open(bad) as b, pytest.raises(FormatError) as caught:
        b.load_numpy(member.name, exact=True)
    text = str(caught.value)
    assert f"tensor {tname!r}" in text and "chunk 1 of" in text and "\n" not in text
    out = tmp_path / "x.safetensors"
    result = run("extract", bad, "--member", member.name, "--exact", "-o", out)
    assert result.exit_code == 1 and "Traceback" not in result.output and "chunk 1 of" in result.output
    assert not out.exists()
    assert run("extract", bad, "--member", member.name, "-o", tmp_path / "y.safetensors").exit_code == 0
    verify = run("verify", bad)
    assert verify.exit_code == 1 and "chunk 1 of" in verify.output


def test_a_wrong_chunk_digest_is_refused(chunked, tmp_path):
    """A residual that decodes, but not to the recorded chunk digest (a writer's mistake)."""
    bundle, _ = chunked
    with unipack.open(bundle) as b:
        doc = json.loads(b.header.metadata["manifest"]) if "manifest" in b.header.metadata else None
    if doc is None:
        pytest.skip("manifest stored compressed")
    member = doc["members"][2]
    tname = next(k for k, e in member["exact"].items() if e.get("chunk_sha256"))
    member["exact"][tname]["chunk_sha256"][-1] = "0" * 64
    bad = _with_manifest(bundle, tmp_path / "bad.upk", doc)
    with unipack.open(bad) as b, pytest.raises(ChecksumError, match=f"tensor {tname!r} chunk"):
        b.load_numpy(member["name"], exact=True)


def _with_manifest(src: Path, out: Path, doc: dict) -> Path:
    """``src`` with the manifest ``doc`` in its header (its checksum updated)."""
    from conftest import read_raw_header

    header, start = read_raw_header(src)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    header["__metadata__"].update(manifest=text, manifest_sha256=hashlib.sha256(text.encode()).hexdigest())
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + src.read_bytes()[start:])
    return out


def test_a_digest_count_that_differs_from_the_index_is_refused(chunked, tmp_path):
    bundle, _ = chunked
    with unipack.open(bundle) as b:
        doc = json.loads(b.header.metadata["manifest"])
    member = doc["members"][0]
    tname = next(k for k, e in member["exact"].items() if e.get("chunk_sha256"))
    member["exact"][tname]["chunk_sha256"].pop()
    bad = _with_manifest(bundle, tmp_path / "bad.upk", doc)
    with unipack.open(bad) as b, pytest.raises(FormatError, match="chunk digests for"):
        b.load_numpy(member["name"], exact=True)


def test_the_one_frame_layout_of_versions_5_and_6_still_reads(tmp_path):
    """The internal switch (``CHUNK_BYTES = None``) writes the old layout: version 5, one frame per
    blob, no chunk digests; it reads bit for bit."""
    paths = chunked_population(tmp_path / "in", torch.float32)
    out = tmp_path / "old.upk"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codec, "CHUNK_BYTES", None)
        unipack.merge(paths, out, exact_tier=True, lossless="off", baselines=False)
    with unipack.open(out) as b:
        assert b.manifest.format_version == 5
        assert {rec.codec for rec in b.manifest.blobs.values()} <= {"none", "zstd"}
        assert all(e.chunks is None for m in b.manifest.members for e in (m.exact or {}).values())
        for name, path in zip(b.members, paths):
            original = load_file(str(path))
            for tname, (_, array) in b.load_numpy(name, exact=True).items():
                assert hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest() == tensor_sha(original[tname])
    # A lossy bundle never chunks (its version stays what older readers read).
    lossy = tmp_path / "lossy.upk"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codec, "CHUNK_BYTES", CHUNK)
        unipack.merge(paths, lossy, lossless="off", baselines=False)
    with unipack.open(lossy) as b:
        assert b.manifest.format_version < 7 and CHUNKED_CODEC not in {r.codec for r in b.manifest.blobs.values()}


# -- the codec alone -----------------------------------------------------------------------------


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_the_codec_round_trips_and_matches_the_spec_layout(itemsize):
    rng = np.random.default_rng(itemsize)
    data = rng.integers(0, 6, 5003 * itemsize, dtype=np.uint8).tobytes()
    stored, used, shuffled = codec.encode(data, itemsize, "zstd", 3, chunk_bytes=1000)
    assert used == CHUNKED_CODEC and shuffled == (itemsize > 1)
    per, entries = index_of(bytes(stored))
    assert per == 1000 // itemsize and len(entries) == -(-5003 // per)
    assert bytes(codec.decode(bytes(stored), used, shuffled, itemsize, len(data), "t")) == data
    # Up to the chunk size, a blob stays one zstd frame (the old layout).
    assert codec.encode(data[: 1000 // itemsize * itemsize], itemsize, "zstd", 3, chunk_bytes=1000)[1] == "zstd"


def _index(per: int, frames: list[bytes]) -> bytes:
    head = struct.pack("<QI", per, len(frames))
    head += b"".join(struct.pack("<Q", len(f)) + hashlib.sha256(f).digest() for f in frames)
    return head + b"".join(frames)


def _frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


@pytest.mark.parametrize(
    "case, stored, message",
    [
        ("no index", b"\x01\x00", "needs an index"),
        ("count", _index(4, [_frame(bytes(16))]), "does not cover"),
        ("zero per chunk", struct.pack("<QI", 0, 1), "does not cover"),
        ("short index", struct.pack("<QI", 8, 1), "runs past the blob"),
        ("trailing", _index(8, [_frame(bytes(range(32)))]) + b"x", "after the last chunk"),
        ("frame size", _index(8, [_frame(bytes(range(16)))]), "declares 16 bytes, the index implies 32"),
        ("not zstd", _index(8, [bytes(range(40))]), "not a zstd frame"),
        ("two frames", _index(8, [_frame(bytes(range(32))) + _frame(b"")]), "trailing data"),
        (
            "digest",
            _index(8, [_frame(bytes(range(32)))])[:20] + bytes(32) + _index(8, [_frame(bytes(range(32)))])[52:],
            "checksum",
        ),
    ],
)
def test_a_malformed_chunked_blob_is_one_clear_error(case, stored, message):
    with pytest.raises(FormatError, match=message) as caught:
        codec.decode(stored, CHUNKED_CODEC, False, 4, 32, "blob 'x'")
    assert str(caught.value).startswith("blob 'x'") and "\n" not in str(caught.value)


def test_a_bomb_is_refused_before_decoding_but_a_run_of_zeros_in_one_chunk_is_not():
    """The ratio bound is on the whole blob (what a reader allocates), not on each frame."""
    zeros = _frame(bytes(1 << 20))
    with pytest.raises(FormatError, match="decompression bomb"):
        codec.decode(_index(1 << 20, [zeros]), CHUNKED_CODEC, False, 1, 1 << 20, "b")
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    data = bytes(1 << 20) + noise  # one chunk of zeros far past 1024:1, the blob within it
    stored, used, _ = codec.encode(data, 1, "zstd", 3, chunk_bytes=1 << 20)
    assert used == CHUNKED_CODEC and bytes(codec.decode(bytes(stored), used, False, 1, len(data), "b")) == data
