"""A large manifest is stored zstd-compressed in the data section (format version 4, spec §2.3):
the same bundle otherwise, every tool reads it, its bytes are accounted for, and `add` keeps it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner
from conftest import standard_specs, write_population

import unipack
from unipack.cli import cli
from unipack.format import container


def _header(path: Path) -> dict:
    data = path.read_bytes()
    (h,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + h])


@pytest.fixture
def packed_and_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[Path]]:
    pop = write_population(tmp_path / "in", standard_specs(), n=4, seed=11)
    plain = tmp_path / "plain.upk"
    unipack.merge(pop.paths[:3], plain, lossless="off")
    monkeypatch.setattr(container, "COMPRESS_MANIFEST_ABOVE", 0)  # every manifest counts as large
    packed = tmp_path / "packed.upk"
    unipack.merge(pop.paths[:3], packed, lossless="off")
    return packed, plain, pop.paths


def test_the_manifest_moves_to_a_zstd_tensor_and_nothing_else_changes(packed_and_plain) -> None:
    packed, plain, _ = packed_and_plain
    header = _header(packed)
    meta = header["__metadata__"]
    assert "manifest" not in meta and meta["manifest_codec"] == "zstd" and meta["format_version"] == "4"
    entry = header["__manifest__"]
    last = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert entry["dtype"] == "U8" and entry["data_offsets"][1] == last  # the last range
    data = packed.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    frame = data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]]
    text = zstandard.ZstdDecompressor().decompress(frame)
    assert len(text) == int(meta["manifest_bytes"])
    plain_doc = json.loads(_header(plain)["__metadata__"]["manifest"])
    packed_doc = json.loads(text)
    assert packed_doc.pop("format_version") == 4 and plain_doc.pop("format_version") in (1, 3)
    assert packed_doc == plain_doc
    with unipack.open(packed) as a, unipack.open(plain) as b:
        for member in a.members:
            x, y = a.load_numpy(member), b.load_numpy(member)
            assert all(np.array_equal(x[k][1], y[k][1]) for k in x)


def test_info_and_report_count_the_compressed_manifest(packed_and_plain) -> None:
    packed, _, _ = packed_and_plain
    size = _header(packed)["__manifest__"]
    nbytes = size["data_offsets"][1] - size["data_offsets"][0]
    runner = CliRunner()
    for command in ("info", "report"):
        doc = json.loads(runner.invoke(cli, [command, str(packed), "--json"]).output)
        parts = doc["bytes"]["parts"] if command == "report" else doc["parts"]
        assert parts["manifest"] == nbytes, command
        assert sum(parts.values()) == packed.stat().st_size, command
    assert runner.invoke(cli, ["verify", str(packed)]).exit_code == 0


def test_add_rewrites_a_packed_bundle(packed_and_plain) -> None:
    packed, _, paths = packed_and_plain
    unipack.add(packed, paths[3])
    header = _header(packed)
    assert header["__metadata__"]["format_version"] == "4" and "__manifest__" in header
    with unipack.open(packed) as b:
        assert len(b.members) == 4 and not b.verify()


def test_small_manifests_stay_in_the_header(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", standard_specs(), n=3, seed=12)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off")
    meta = _header(out)["__metadata__"]
    assert "manifest" in meta and "manifest_codec" not in meta and meta["format_version"] in ("1", "3")
    assert len(meta["manifest"].encode()) <= container.COMPRESS_MANIFEST_ABOVE
