"""Fuzz the bundle reader: corrupt bundles must give a UnipackError, never another exception.

The harness lives in ``tools/fuzz_upk.py``; here it runs in-process with a fixed seed, plus a few
hand-picked mutations. Time budgets:

* a plain ``pytest`` run does a smoke fuzz of ``UNIPACK_FUZZ_SECONDS`` seconds (default 10; 0 skips it);
* the long run is opt-in, either through the environment (the "short run" of the safety issue is
  ``UNIPACK_FUZZ_SECONDS=60``, a long one ``UNIPACK_FUZZ_SECONDS=600 python -m pytest tests/test_fuzz.py``)
  or through the ``fuzz_long`` marker: ``python -m pytest -m fuzz_long`` runs
  :func:`test_fuzz_reader_long` for ``UNIPACK_FUZZ_SECONDS`` seconds (default 600). Without ``-m fuzz_long``
  that test is skipped.

Both run in whichever process (or pytest-xdist worker) collects them; seeds and findings go under
pytest's temporary directories.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from pathlib import Path

import pytest

import unipack

_TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_upk.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_upk", _TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_upk", module)
    spec.loader.exec_module(module)
    return module


fuzz_upk = _load_tool()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    return fuzz_upk.build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def _expect_unipack_error(data: bytes, tmp_path: Path, label: str) -> unipack.UnipackError:
    outcome, exc, _ = fuzz_upk.run_one(data, str(tmp_path / f"{label}.upk"))
    assert outcome == "rejected", (
        f"{label}: expected a UnipackError, got outcome {outcome!r} ({type(exc).__name__ if exc else None}: {exc})"
    )
    assert isinstance(exc, unipack.UnipackError)
    return exc


def test_seeds_are_valid_and_varied(seeds: list[tuple[str, bytes]], tmp_path: Path) -> None:
    assert len(seeds) >= 4
    for name, data in seeds:
        outcome, exc, _ = fuzz_upk.run_one(data, str(tmp_path / f"{name}.upk"))
        assert outcome == "ok", f"seed {name}: {exc!r}"
    parsed = {name: fuzz_upk.parse(data) for name, data in seeds}
    in_header = [p for p in parsed.values() if p.manifest is not None]
    codecs = {b["codec"] for p in in_header for b in p.manifest["blobs"].values()}
    storages = {t["storage"] for p in in_header for t in p.manifest["tensors"]}
    assert codecs == {"none", "zstd", "zstd-chunks"}
    assert storages == {"shared", "raw", "exact", "delta", "lora"}
    versions = {p.manifest["format_version"] for p in in_header}
    assert versions == {1, 3, 5, 6, 7, 8, 10, 11}
    # every LoRA form (spec 7, 10, 12), the factored cores both cast and quantized
    lora = [t for p in in_header for t in p.manifest["tensors"] if t["storage"] == "lora"]
    assert {t["form"] for t in lora} == {"subspace", "factors", "quant", "cast", "subspace-factored"}
    assert {"levels" in t for t in lora if t["form"] == "subspace-factored"} == {True, False}
    # an added adapter held as its own factors where the record's form is subspace (an override,
    # spec 7.4), and one added in a quant record's form (its codes appended)
    subspace = {t["name"] for t in lora if t["form"] == "subspace"}
    members = [m for p in in_header for m in p.manifest["members"] if m.get("added")]
    assert any(f"{name}.lora_A.weight" in m["raw"] for m in members for name in subspace)
    assert any(m.get("coefficients") is not None and not m["raw"] for m in members)
    # members with a lossless tier (spec 9): every coding, predictions from the mean and from
    # another member, and residuals in zstd-chunks with their chunk digests
    exact = [e for p in in_header for m in p.manifest["members"] for e in (m.get("exact") or {}).values()]
    assert {e.get("coding") for e in exact} == {None, "bits", "xor", "sub"}
    assert {"mean", "member0"} <= {e.get("base") for e in exact}
    assert any(e.get("chunk_sha256") for e in exact)
    # one seed whose deltas are taken from a referenced base (version 10), opened with its base
    assert [p.header["__metadata__"]["format_version"] for p in in_header if "base" in p.manifest] == ["10"]
    # and one seed with the compressed manifest and its members' numbers section (version 9)
    packed = [p.header for p in parsed.values() if p.manifest is None]
    assert len(packed) == 1 and {"__numbers__", "__manifest__"} <= set(packed[0])


def test_a_damaged_numbers_section_is_rejected(seeds: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """Every byte of the numbers section matters to whoever reads the numbers (here ``summary``)."""
    name, data = next((n, d) for n, d in seeds if n == "packed-numbers")
    p = fuzz_upk.parse(data)
    begin, end = p.header["__numbers__"]["data_offsets"]
    start = 8 + struct.unpack("<Q", data[:8])[0]
    for offset in range(begin, end, max(1, (end - begin) // 16)):
        body = bytearray(data)
        body[start + offset] ^= 0x01
        exc = _expect_unipack_error(bytes(body), tmp_path, f"{name}-numbers-{offset}")
        assert "numbers section" in str(exc), exc


def test_hand_picked_mutations_are_rejected(seeds: list[tuple[str, bytes]], tmp_path: Path) -> None:
    for name, data in seeds:
        # truncated to 7 bytes: shorter than the length prefix
        _expect_unipack_error(data[:7], tmp_path, f"{name}-trunc7")
        # header length zeroed
        _expect_unipack_error(b"\0" * 8 + data[8:], tmp_path, f"{name}-zero-hlen")
        # one byte of the manifest string changed (manifest_sha256 left as it was)
        p = fuzz_upk.parse(data)
        if p.manifest is not None:  # a compressed one: its frame and numbers are fuzzed as bytes
            text = p.header["__metadata__"]["manifest"]
            i = text.index('"tensors"') + 2
            flipped = text[:i] + chr(ord(text[i]) ^ 0x01) + text[i + 1 :]
            bad = fuzz_upk.serialize(p, fix_manifest_sha=False, manifest_text=flipped)
            exc = _expect_unipack_error(bad, tmp_path, f"{name}-manifest-byte")
            assert isinstance(exc, unipack.ChecksumError)
        # a flipped bit in a blob's stored bytes: caught by the blob checksum when loading
        hlen = struct.unpack("<Q", data[:8])[0]
        body = bytearray(data)
        body[8 + hlen] ^= 0x10
        _expect_unipack_error(bytes(body), tmp_path, f"{name}-blob-bit")


def test_manifest_sha_refix_reaches_manifest_checks(seeds: list[tuple[str, bytes]], tmp_path: Path) -> None:
    """With manifest_sha256 recomputed, a broken manifest is rejected by the manifest parser."""
    _, data = seeds[0]
    p = fuzz_upk.parse(data)
    p.manifest["tensors"][0]["rank"] = -1
    if p.manifest["tensors"][0]["storage"] != "shared":
        p.manifest["tensors"][0]["storage"] = "bogus"
    exc = _expect_unipack_error(fuzz_upk.serialize(p), tmp_path, "refixed")
    assert not isinstance(exc, unipack.ChecksumError), exc


SMOKE_SECONDS = 10.0  # default budget of a plain pytest run
LONG_SECONDS = 600.0  # default budget of ``pytest -m fuzz_long``


def _env_seconds(default: float) -> float:
    return float(os.environ.get("UNIPACK_FUZZ_SECONDS", str(default)))


def _check_fuzz(seconds: float, tmp_path: Path) -> None:
    if seconds <= 0:
        pytest.skip("UNIPACK_FUZZ_SECONDS=0")
    result = fuzz_upk.fuzz(seconds, seed=12345, findings_dir=tmp_path / "findings")
    assert result.executions > 0
    if result.findings:
        pytest.fail(
            "the bundle reader raised non-UnipackError exceptions or was too slow (inputs saved "
            f"under {tmp_path / 'findings'}):\n" + result.summary(),
            pytrace=False,
        )


def _long_run_requested(config: pytest.Config) -> bool:
    """True when ``-m`` names ``fuzz_long`` (and not as ``not fuzz_long``)."""
    markexpr = config.getoption("markexpr", "") or ""
    words = markexpr.replace("(", " ( ").replace(")", " ) ").split()
    return any(w == "fuzz_long" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def test_fuzz_reader_finds_nothing(tmp_path: Path) -> None:
    _check_fuzz(_env_seconds(SMOKE_SECONDS), tmp_path)


@pytest.mark.fuzz_long
def test_fuzz_reader_long(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not _long_run_requested(request.config):
        pytest.skip("opt-in: python -m pytest -m fuzz_long (or UNIPACK_FUZZ_SECONDS=600 for the smoke run)")
    _check_fuzz(_env_seconds(LONG_SECONDS), tmp_path)
