"""The storage-scheme registry: every record is read, written and dispatched through its scheme.

Checked against the manifest JSON itself (parsed with the standard library, independently of
unipack's records): each record's fields round-trip exactly, the scheme ``scheme_of`` picks is
the one its ``storage``/``scheme``/``form`` fields name, and each scheme's byte parts cover the
file's blobs exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_raw_header, standard_specs, write_population

import unipack
from unipack.errors import FormatError
from unipack.format.manifest import parse
from unipack.format.manifest.storages import storages
from unipack.format.safetensors_file import strict_json
from unipack.schemes import SCHEMES, scheme_of

EXPECTED = {  # registry name -> (storage, discriminating field value)
    "rows": ("shared", "rows"),
    "flat": ("shared", "flat"),
    "raw": ("raw", None),
    "exact": ("exact", None),
    "lora-subspace": ("lora", "subspace"),
    "lora-factors": ("lora", "factors"),
    "delta": ("delta", None),
    "lora-quant": ("lora", "quant"),
    "lora-cast": ("lora", "cast"),
    "lora-subspace-factored": ("lora", "subspace-factored"),
}


def test_registry_lists_the_schemes_in_spec_order() -> None:
    assert list(SCHEMES) == list(EXPECTED)
    assert storages() == ("shared", "raw", "exact", "lora", "delta")
    for name, (storage, variant) in EXPECTED.items():
        scheme = SCHEMES[name]
        assert scheme.storage == storage
        assert (scheme.variant[1] if scheme.variant else None) == variant


@pytest.fixture
def dense_bundle(tmp_path: Path) -> Path:
    pop = write_population(tmp_path / "in", standard_specs(), n=4, seed=3)
    out = tmp_path / "b.upk"
    unipack.merge(pop.paths, out, rank=2)
    return out


def _manifest_doc(path: Path) -> dict:
    header, _ = read_raw_header(path)
    return json.loads(header["__metadata__"]["manifest"])


def test_records_round_trip_and_dispatch(dense_bundle: Path) -> None:
    doc = _manifest_doc(dense_bundle)
    with unipack.open(dense_bundle) as b:
        manifest = b.manifest
    seen = set()
    for raw, t in zip(doc["tensors"], manifest.tensors):
        scheme = scheme_of(t)
        seen.add(scheme.name)
        storage, variant = EXPECTED[scheme.name]
        assert raw["storage"] == storage == t.storage
        if variant is not None:
            assert raw[scheme.variant[0]] == variant
        # The record writes back exactly the JSON it was read from (same keys, same order).
        written = {
            "name": t.name,
            "storage": t.storage,
            "dtype": t.dtype,
            "shape": None if t.shape is None else list(t.shape),
            "reason": t.reason,
            **t.params.to_doc(t),
        }
        assert list(written) == list(raw)
        assert written == raw
    assert {"rows", "flat", "exact"} <= seen
    assert parse.to_json(manifest) == doc_text(dense_bundle)


def doc_text(path: Path) -> str:
    header, _ = read_raw_header(path)
    return header["__metadata__"]["manifest"]


def test_byte_parts_cover_every_blob_once(dense_bundle: Path) -> None:
    with unipack.open(dense_bundle) as b:
        manifest = b.manifest
        owned: list[str] = [m.coefficients for m in manifest.members if m.coefficients]
        for t in manifest.tensors:
            owned.extend(scheme_of(t).blob_parts(t, manifest))
        assert sorted(owned) == sorted(manifest.blobs)
        assert b.summary().file_bytes == sum(b.summary().parts.values())


def test_legacy_fields_read_through_the_record(dense_bundle: Path) -> None:
    with unipack.open(dense_bundle) as b:
        for t in b.manifest.tensors:
            name = scheme_of(t).name
            if name in ("rows", "flat"):
                assert t.scheme == name
                assert t.rank == t.params.rank <= 2
                assert t.mean == t.params.mean
            else:
                assert t.rank == 0 and t.scheme is None and t.form is None
            with pytest.raises(AttributeError):
                _ = t.no_such_field


def test_unknown_variant_is_refused_with_the_registered_choices(dense_bundle: Path) -> None:
    doc = _manifest_doc(dense_bundle)
    shared = next(t for t in doc["tensors"] if t["storage"] == "shared")
    shared["scheme"] = "tucker"
    with pytest.raises(FormatError, match=r"field 'scheme' is 'tucker', expected one of \('rows', 'flat'\)"):
        parse.from_json(strict_json(json.dumps(doc), "test"), "test")
    shared["scheme"], shared["storage"] = "rows", "sparse"
    with pytest.raises(FormatError, match=r"expected one of \('shared', 'raw', 'exact', 'lora', 'delta'\)"):
        parse.from_json(strict_json(json.dumps(doc), "test"), "test")
