"""A member's codes blob is one zstd frame in which every run of tensors with one level count
starts a block of its own (its own Huffman table), where that is smaller than one block over the
mixture: checked against zstd itself, on the bytes, and on a merged bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import TensorSpec, write_population

import unipack
from unipack.format import codec
from unipack.format.manifest import code_runs


def _mixture(seed: int = 0) -> tuple[bytes, list[int]]:
    """Packed codes of two alphabets, as a member holding a 9-level and a 15-level tensor has."""
    rng = np.random.default_rng(seed)
    nine = np.clip(np.rint(rng.normal(0, 1.2, (2, 6000))) + 4, 0, 8).astype(np.uint8)
    fifteen = np.clip(np.rint(rng.normal(0, 2.5, (2, 6000))) + 7, 0, 14).astype(np.uint8)
    a = (nine[0] + 9 * nine[1]).astype(np.uint8)  # two codes to a byte, first least significant
    b = (fifteen[0] + 15 * fifteen[1]).astype(np.uint8)
    return a.tobytes() + b.tobytes() + a[:3000].tobytes(), [6000, 6000, 3000]


def test_blocks_decode_as_one_frame_and_are_smaller_on_a_mixture() -> None:
    data, parts = _mixture()
    stored, used, shuffled = codec.encode(data, 1, "zstd", 1, parts=parts)
    one = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False).compress(data)
    assert used == "zstd" and not shuffled
    assert len(stored) < len(one)  # a table per alphabet beats one over the mixture
    assert zstandard.ZstdDecompressor().decompress(stored) == data  # any zstd reader: one frame
    assert zstandard.get_frame_parameters(stored[:18]).content_size == len(data)
    assert bytes(codec.decode(stored, "zstd", False, 1, len(data), "test")) == data
    # one alphabet: the frame without blocks is kept where blocks would only cost their tables
    same = data[:6000] * 3
    alone = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False).compress(same)
    assert codec.encode(same, 1, "zstd", 1, parts=[6000, 6000, 6000])[0] == alone


def test_parts_must_cover_the_data() -> None:
    data, parts = _mixture()
    with pytest.raises(ValueError, match="parts sum to"):
        codec.encode(data, 1, "zstd", 1, parts=parts[:-1])
    # other codecs, and shuffled (multi-byte) data, take no parts
    assert codec.encode(data, 1, "none", 1, parts=parts)[1] == "none"
    floats = np.arange(4000, dtype=np.float32).tobytes()
    plain = codec.encode(floats, 4, "zstd", 3)
    assert codec.encode(floats, 4, "zstd", 3, parts=[8000, 8000])[0] == plain[0]


SPECS = {
    "a.weight": TensorSpec((64, 96), kind="noise", scale=0.02),
    "b.weight": TensorSpec((96, 64), kind="right", rank=3, scale=0.05),
    "c.bias": TensorSpec((64,), kind="noise", scale=0.01),
    "d.weight": TensorSpec((128, 64), kind="noise", scale=0.03),
}


def test_a_merged_members_codes_are_coded_run_by_run(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", SPECS, n=4, seed=3)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off")
    with unipack.open(out) as b:
        m = b.manifest
        deltas = [t for t in m.tensors if t.storage == "delta"]
        assert deltas, "the population must hold delta tensors"
        for member in m.members:
            assert member.codes is not None
            offsets = m.code_offsets(member)
            # the runs: consecutive delta tensors of one level count, their codes' bytes summed
            expected: list[list[int]] = []
            for t in m.tensors:
                if t.name in offsets:
                    size = offsets[t.name][1] - offsets[t.name][0]
                    if expected and expected[-1][0] == t.params.levels:
                        expected[-1][1] += size
                    else:
                        expected.append([t.params.levels, size])
            runs = code_runs(m.tensors, member.raw)
            assert runs == [n for _, n in expected]
            decoded = bytes(b._file.read_blob(member.codes).tobytes())
            assert sum(runs) == len(decoded)
            # what is stored is the smaller of one frame and a frame of blocks per run
            stored = b._file.read_stored(member.codes)
            one = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=False).compress(decoded)
            blocks = codec.encode(decoded, 1, "zstd", 1, parts=runs)[0]
            assert bytes(stored) == min(one, bytes(blocks), key=len)
        assert not b.verify()
