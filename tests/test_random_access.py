"""Random access: opening reads the header only; loading one member reads only its own blobs
and the shared ones, never another member's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import unipack
from unipack.format import container


def test_load_reads_only_shared_and_own_blobs(tmp_path: Path, population, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "b.upk"
    unipack.merge(population.paths, out, raw_mismatched=True)
    reads: list[str] = []
    original = container.BundleFile.read_blob

    def spy(self: container.BundleFile, name: str):  # type: ignore[no-untyped-def]
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(container.BundleFile, "read_blob", spy)
    with unipack.open(out) as bundle:
        assert reads == []  # opening and listing touch no blob
        assert bundle.members == population.names
        target = bundle.members[1]
        index = bundle.members.index(target)
        bundle.load(target)
        own = {f"coef/{index}", f"codes/{index}"} | {b for b in bundle.manifest.member(target).raw.values()}
        others = {
            b
            for i, m in enumerate(bundle.manifest.members)
            if i != index
            for b in list(m.raw.values()) + [x for x in (m.coefficients, m.codes) if x]
        }
        assert not set(reads) & others
        assert own & set(reads)
        assert all(r.startswith(("mean/", "basis/", "exact/")) or r in own for r in reads)


def test_open_reads_no_more_than_the_header(tmp_path: Path, population, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "b.upk"
    unipack.merge(population.paths, out, raw_mismatched=True)
    with unipack.open(out) as bundle:
        header_end = bundle._file.header.data_start
    read_upto: list[int] = []
    real_pread = os.preadv

    def spy(fd: int, buffers, offset: int):  # type: ignore[no-untyped-def]
        read_upto.append(offset)
        return real_pread(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    with unipack.open(out) as bundle:
        bundle.summary()
        assert bundle.members
    assert read_upto == [] or max(read_upto) < header_end
