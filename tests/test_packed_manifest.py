"""A large manifest is stored zstd-compressed in the data section (format version 4, spec §2.3),
with the members' numbers in a section of their own read only when asked for (version 9, §2.4):
the same bundle otherwise, every tool reads it, its bytes are accounted for, `add` keeps it, and a
damaged numbers section is found by whoever reads it (`verify`, `info`) but not by `load`."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner
from conftest import standard_specs, write_population
from test_spec_reader import SpecBundle, SpecChecksumError, _repack

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


def _section(path: Path, name: str) -> bytes:
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    begin, end = _header(path)[name]["data_offsets"]
    return data[start + begin : start + end]


def test_the_manifest_moves_to_a_zstd_tensor_and_nothing_else_changes(packed_and_plain) -> None:
    packed, plain, _ = packed_and_plain
    header = _header(packed)
    meta = header["__metadata__"]
    assert "manifest" not in meta and meta["manifest_codec"] == "zstd" and meta["format_version"] == "9"
    ends = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in ends[-2:]] == ["__numbers__", "__manifest__"]  # the last two ranges, in this order
    assert header["__manifest__"]["dtype"] == header["__numbers__"]["dtype"] == "U8"
    text = zstandard.ZstdDecompressor().decompress(_section(packed, "__manifest__"))
    numbers = zstandard.ZstdDecompressor().decompress(_section(packed, "__numbers__"))
    assert len(text) == int(meta["manifest_bytes"]) and len(numbers) == int(meta["numbers_bytes"])
    assert hashlib.sha256(numbers).hexdigest() == meta["numbers_sha256"]
    assert hashlib.sha256(text).hexdigest() == meta["manifest_sha256"]
    plain_doc = json.loads(_header(plain)["__metadata__"]["manifest"])
    packed_doc = json.loads(text)
    # The numbers section holds each member's errors and fidelity, in member order, and the
    # manifest nothing of them: put back, the two are the plain bundle's manifest.
    entries = json.loads(numbers)["members"]
    assert len(entries) == len(packed_doc["members"])
    for member, entry in zip(packed_doc["members"], entries):
        assert "errors" not in member and "fidelity" not in member
        member.update(entry)
    assert packed_doc.pop("format_version") == 9 and plain_doc.pop("format_version") in (1, 3)
    assert packed_doc == plain_doc
    with unipack.open(packed) as a, unipack.open(plain) as b:
        assert [m.errors for m in a.manifest.members] == [m.errors for m in b.manifest.members]
        assert [m.fidelity for m in a.manifest.members] == [m.fidelity for m in b.manifest.members]
        for member in a.members:
            x, y = a.load_numpy(member), b.load_numpy(member)
            assert all(np.array_equal(x[k][1], y[k][1]) for k in x)


def _damage_numbers(packed: Path, out: Path) -> None:
    """A copy of ``packed`` with one byte of its numbers section flipped."""
    data = bytearray(packed.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    begin, end = _header(packed)["__numbers__"]["data_offsets"]
    data[start + (begin + end) // 2] ^= 0x5A
    out.write_bytes(bytes(data))


def test_the_numbers_are_read_only_when_asked_for(packed_and_plain, tmp_path: Path) -> None:
    packed, _, _ = packed_and_plain
    damaged = tmp_path / "damaged.upk"
    _damage_numbers(packed, damaged)
    with unipack.open(damaged) as b, unipack.open(packed) as good:
        for member in b.members:  # loading never needs the numbers
            x, y = b.load_numpy(member), good.load_numpy(member)
            assert all(np.array_equal(x[k][1], y[k][1]) for k in x)
        with pytest.raises(unipack.ChecksumError, match="members' numbers section is corrupt"):
            _ = b.manifest.members[0].errors
        problems = b.verify()
        assert len(problems) == 1 and "numbers section is corrupt" in problems[0]
    result = CliRunner().invoke(cli, ["info", str(damaged)])
    assert result.exit_code == 1 and "numbers section is corrupt" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_numbers_section_must_match_the_manifest(packed_and_plain, tmp_path: Path) -> None:
    """A section listing another number of members, or of errors, is refused when read."""
    from unipack.format.manifest import parse

    packed, _, _ = packed_and_plain
    with unipack.open(packed) as b:
        members, tensors = len(b.manifest.members), len(b.manifest.tensors)
        doc = json.loads(zstandard.ZstdDecompressor().decompress(_section(packed, "__numbers__")))
    with pytest.raises(unipack.FormatError, match=f"numbers for {members - 1} members, the manifest has {members}"):
        parse.parse_numbers(json.dumps({"members": doc["members"][1:]}), "s", members, tensors)
    doc["members"][1]["errors"] = doc["members"][1]["errors"][1:]
    with pytest.raises(unipack.FormatError, match=f"one non-negative number per tensor \\({tensors}\\)"):
        parse.parse_numbers(json.dumps(doc), "s", members, tensors)


def _declaring(frame: bytes, size: int) -> bytes:
    """``frame`` with its header's content size field rewritten to 8 bytes declaring ``size``
    (RFC 8878 3.1.1.1: the descriptor's top two bits give the field's width, 0 meaning one byte in
    a single-segment frame, which has no window descriptor, else none)."""
    descriptor = frame[4]
    single_segment = descriptor >> 5 & 1
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
    rewritten = bytes([0xC0 | descriptor & 0x3F])
    return frame[:4] + rewritten + frame[5:start] + size.to_bytes(8, "little") + frame[start + width :]


@pytest.mark.parametrize("section", ["manifest", "numbers"])
def test_a_frame_declaring_more_than_its_section_is_refused_before_decoding(
    packed_and_plain, tmp_path: Path, section: str
) -> None:
    """Found by fuzzing: zstd's one-shot decompress allocates the content size a frame's header
    declares, whatever bound it is given, so a damaged header declaring 2**62 bytes was a
    MemoryError. Both readers refuse a declared size other than the metadata's before decoding
    (spec 2.3, 2.4: decompressing no more than that); unipack in one line naming the section."""
    packed, _, _ = packed_and_plain
    name, size = f"__{section}__", int(_header(packed)["__metadata__"][f"{section}_bytes"])
    frame = _section(packed, name)
    # the rewriting itself keeps a frame whole: declaring its true size in 8 bytes, it still decodes
    assert zstandard.ZstdDecompressor().decompress(_declaring(frame, size)) == zstandard.ZstdDecompressor().decompress(
        frame
    )
    huge = 2**62
    edit = {"frame" if section == "manifest" else "numbers": lambda b: _declaring(b, huge)}
    bad = _repack(packed, tmp_path / "bad.upk", **edit)
    with pytest.raises(SpecChecksumError, match=f"declares {huge} bytes, not {size}"):
        SpecBundle(bad)
    said = f"is corrupt \\(its zstd frame declares {huge} bytes, not {size}\\); re-download or re-merge"
    if section == "manifest":
        with pytest.raises(unipack.ChecksumError, match="the manifest " + said):
            unipack.open(bad)
    else:  # the numbers are read when first asked for
        with unipack.open(bad) as b, pytest.raises(unipack.ChecksumError, match="numbers section " + said):
            _ = b.manifest.members[0].errors


def test_info_and_report_count_the_compressed_manifest(packed_and_plain) -> None:
    packed, _, _ = packed_and_plain
    header = _header(packed)
    nbytes = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in ("__manifest__", "__numbers__"))
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
    assert header["__metadata__"]["format_version"] == "9" and "__manifest__" in header and "__numbers__" in header
    with unipack.open(packed) as b:
        assert len(b.members) == 4 and not b.verify()
        assert all(len(m.errors) == len(b.manifest.tensors) for m in b.manifest.members)


def test_small_manifests_stay_in_the_header(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", standard_specs(), n=3, seed=12)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, lossless="off")
    meta = _header(out)["__metadata__"]
    assert "manifest" in meta and "manifest_codec" not in meta and meta["format_version"] in ("1", "3")
    assert len(meta["manifest"].encode()) <= container.COMPRESS_MANIFEST_ABOVE


def test_add_keeps_a_version_4_bundle_at_version_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle written before version 9 (its numbers inside the compressed manifest) stays
    readable by the readers that read it: `add` keeps its layout and version."""
    pop = write_population(tmp_path / "in", standard_specs(), n=4, seed=13)
    monkeypatch.setattr(container, "COMPRESS_MANIFEST_ABOVE", 0)
    bundle = tmp_path / "v4.upk"
    finish = container.BundleWriter.finish
    with monkeypatch.context() as m:  # as unipack wrote large manifests before version 9
        m.setattr(
            container.BundleWriter, "finish", lambda self, *a, **k: finish(self, *a, **{**k, "numbers_apart": False})
        )
        unipack.merge(pop.paths[:3], bundle, lossless="off")
    assert _header(bundle)["__metadata__"]["format_version"] == "4"
    unipack.add(bundle, pop.paths[3])
    header = _header(bundle)
    assert header["__metadata__"]["format_version"] == "4" and "__numbers__" not in header
    with unipack.open(bundle) as b:
        assert len(b.members) == 4 and not b.verify()
        assert all(len(m.errors) == len(b.manifest.tensors) for m in b.manifest.members)
