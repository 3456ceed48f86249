"""``merge --base``: delta tensors centred on a base model the bundle references by sha256 (spec §11).

The population: a base model (names without a prefix) and fine-tunes of it whose names carry
``bert.`` (as Hugging Face's task models do), each the base plus a shared drift, its own change
and a task head of its own shape. Everything is checked against numpy in float64 on the files
themselves (read with safetensors' own loader), and the spec's independent reader decodes every
base-referencing bundle bit for bit, given the base.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, read_raw_header, rewrite_header, run
from safetensors.numpy import load_file, save_file
from test_spec_reader import SpecBundle, SpecFormatError

import unipack
from unipack.errors import FormatError, InputError, OptionsError

N = 4
SHAPES = {
    "encoder.layer.0.attention.query.weight": (48, 40),
    "encoder.layer.0.attention.query.bias": (48,),
    "embeddings.word_embeddings.weight": (120, 40),
}
#: The default rule (README): every member within 5% of its weight and 40% of its change.
MAX_ERROR, MAX_DELTA_ERROR, DELTA_FLOOR = 0.05, 0.4, 2.0**-11


def _population(tmp: Path, *, base_prefix: str = "", member_prefix: str = "bert.") -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(7)
    base = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    save_file({base_prefix + k: v for k, v in base.items()}, str(tmp / "base.safetensors"))
    drift = {k: 0.02 * rng.standard_normal(v.shape) for k, v in base.items()}
    paths = []
    for i in range(N):
        member = {
            member_prefix + k: (v + drift[k] + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in base.items()
        }
        member["classifier.weight"] = rng.standard_normal((2 + i, 40)).astype(np.float32)
        paths.append(tmp / f"ft{i}.safetensors")
        save_file(member, str(paths[-1]))
    return tmp / "base.safetensors", paths


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _base_dict(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {k: ("F32", v) for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("base_ref")
    base, paths = _population(tmp)
    out = tmp / "b.upk"
    result = run("merge", *paths, "--base", base, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    return out, base, paths


def test_base_reference_recorded_and_version_10(merged):
    bundle, base, _ = merged
    originals = load_file(str(base))
    with unipack.open(bundle) as b:
        m = b.manifest
        assert m.format_version == 10
        assert m.base is not None and m.base.source == "base.safetensors"
        centred = [t for t in m.tensors if t.params.base_centred(t)]
        assert {t.name for t in centred} == set(m.base.tensors) == {"bert." + k for k in SHAPES}
        for name, ref in m.base.tensors.items():
            assert ref.name == name.removeprefix("bert.")
            assert ref.sha256 == _sha(originals[ref.name]) and ref.dtype == "F32"
            assert ref.shape == originals[ref.name].shape
        lines = "".join(f"{r.name} {r.sha256}\n" for r in sorted(m.base.tensors.values(), key=lambda r: r.name))
        assert m.base.sha256 == hashlib.sha256(lines.encode()).hexdigest()
        # No mean blob for the centred tensors: the base is referenced, not stored.
        assert not any(name.startswith("mean/bert.") for name in m.blobs)
    header, _ = read_raw_header(bundle)
    manifest = json.loads(header["__metadata__"]["manifest"])
    record = next(t for t in manifest["tensors"] if t["name"] == "bert.embeddings.word_embeddings.weight")
    assert record["center"] == "base" and "mean" not in record


def test_members_within_the_rule_relative_to_the_base(merged, tmp_path):
    """W ≈ base + dequantized delta, every member within 5% of ||W|| and 40% of ||W - base||,
    and the recorded errors are the ones numpy measures on the extracted files."""
    bundle, base, paths = merged
    b_arrays = load_file(str(base))
    with unipack.open(bundle) as b:
        records = {t.name: i for i, t in enumerate(b.manifest.tensors)}
        errors = {m.name: m.errors for m in b.manifest.members}
        delta_errors = {m.name: m.fidelity.delta_errors for m in b.manifest.members if m.fidelity}
    for path in paths:
        out = tmp_path / path.name
        result = run("extract", bundle, "--member", path.stem, "--base", base, "-o", out)
        assert result.exit_code == 0, result.output
        original, rebuilt = load_file(str(path)), load_file(str(out))
        assert set(original) == set(rebuilt)
        for name, w in original.items():
            x = w.astype(np.float64)
            e = float(np.linalg.norm(x - rebuilt[name].astype(np.float64)))
            norm = float(np.linalg.norm(x))
            if name.startswith("classifier"):
                assert e == 0.0
                continue
            change = float(np.linalg.norm(x - b_arrays[name.removeprefix("bert.")].astype(np.float64)))
            assert e <= MAX_ERROR * norm * (1 + 1e-9)
            assert e <= max(MAX_DELTA_ERROR * change, DELTA_FLOOR * norm) * (1 + 1e-9)
            assert math.isclose(errors[path.stem][records[name]], e / norm, rel_tol=1e-6)
            assert math.isclose(delta_errors[path.stem][records[name]], e / change, rel_tol=2e-3)


def test_spec_reader_decodes_with_the_base(merged):
    bundle, base, paths = merged
    spec = SpecBundle(bundle, base=_base_dict(base))
    assert spec.version == 10
    with unipack.open(bundle, base=base) as b:
        for path in paths:
            ours = b.load_numpy(path.stem)
            theirs = spec.read_member(path.stem)
            assert list(ours) == list(theirs)
            for name, (dtype, array) in theirs.items():
                assert ours[name][0] == dtype
                assert np.ascontiguousarray(ours[name][1]).tobytes() == np.ascontiguousarray(array).tobytes(), name
    with pytest.raises(SpecFormatError):  # without the base, the spec reader refuses too
        SpecBundle(bundle).read_member(paths[0].stem)


def test_lossless_tier_with_a_base(tmp_path):
    base, paths = _population(tmp_path)
    bundle = tmp_path / "l.upk"
    assert run("merge", *paths, "--base", base, "--lossless", "-o", bundle, "-q").exit_code == 0
    with unipack.open(bundle) as b:
        member = b.manifest.members[0]
        assert member.exact is not None and member.exact["bert.embeddings.word_embeddings.weight"].base == "mean"
    line = assert_one_line_error(run("extract", bundle, "--member", "ft1", "--exact", "-o", tmp_path / "x.safetensors"))
    assert "--base" in line and "'ft1'" in line
    spec = SpecBundle(bundle, base=_base_dict(base))
    for path in paths:
        out = tmp_path / f"exact-{path.name}"
        assert run("extract", bundle, "--member", path.stem, "--exact", "--base", base, "-o", out).exit_code == 0
        original, rebuilt = load_file(str(path)), load_file(str(out))
        exact = spec.read_member_exact(path.stem)
        for name, w in original.items():
            assert rebuilt[name].tobytes() == w.tobytes() == np.ascontiguousarray(exact[name][1]).tobytes()


@pytest.mark.parametrize(
    "base_prefix, member_prefix, shown",
    [
        ("", "bert.", "less the prefix 'bert.'"),
        ("model.", "", "with the prefix 'model.'"),
        ("", "", "same tensor names"),
    ],
)
def test_prefix_detected_and_named(tmp_path, base_prefix, member_prefix, shown):
    base, paths = _population(tmp_path, base_prefix=base_prefix, member_prefix=member_prefix)
    out = tmp_path / "p.upk"
    result = run("merge", *paths, "--base", base, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["base"]["matched"] == len(SHAPES) and doc["base"]["prefix"] == (base_prefix or member_prefix)
    assert doc["base"]["ratio_excludes_base_bytes"] == sum(4 * math.prod(s) for s in SHAPES.values())
    text = run("merge", *paths, "--base", base, "-o", out, "--force", "-q").output
    assert shown in text and "not counting the base model" in text
    with unipack.open(out, base=base) as b:
        assert {r.name for r in b.manifest.base.tensors.values()} == {base_prefix + k for k in SHAPES}


def test_tensors_the_base_lacks_stay_mean_centred(tmp_path):
    base, paths = _population(tmp_path)
    partial = load_file(str(base))
    del partial["embeddings.word_embeddings.weight"]
    partial["encoder.layer.0.attention.query.bias"] = partial["encoder.layer.0.attention.query.bias"][:10]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    out = tmp_path / "q.upk"
    result = run("merge", *paths, "--base", tmp_path / "partial.safetensors", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "2 it lacks (or holds otherwise) stay mean-centred" in result.output
    with unipack.open(out) as b:
        assert set(b.manifest.base.tensors) == {"bert.encoder.layer.0.attention.query.weight"}
        mean_centred = b.manifest.tensors[
            [t.name for t in b.manifest.tensors].index("bert.embeddings.word_embeddings.weight")
        ]
        assert not mean_centred.params.base_centred(mean_centred)


def test_version_10_only_when_a_base_is_referenced(tmp_path):
    base, paths = _population(tmp_path)
    plain = tmp_path / "plain.upk"
    assert run("merge", *paths, "-o", plain, "-q").exit_code == 0
    with unipack.open(plain) as b:
        assert b.manifest.format_version == 3 and b.manifest.base is None
    # A base far from the members (another model of the same shapes): no delta from it is cheaper.
    rng = np.random.default_rng(1)
    save_file(
        {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}, str(tmp_path / "far.safetensors")
    )
    far = tmp_path / "far.upk"
    result = run("merge", *paths, "--base", tmp_path / "far.safetensors", "-o", far, "-q")
    assert result.exit_code == 0, result.output
    assert "does not reference it" in result.output
    with unipack.open(far) as b:
        assert b.manifest.format_version == 3 and b.manifest.base is None
        b.load("ft0")  # no base needed
    # A bundle that references none refuses a base: the user gave the wrong bundle or base.
    line = assert_one_line_error(
        run("extract", plain, "--member", "ft0", "--base", base, "-o", tmp_path / "x.safetensors")
    )
    assert "references no base model" in line


def _variant(tmp: Path, base: Path, name: str, edit) -> Path:
    arrays = load_file(str(base))
    edit(arrays)
    save_file(arrays, str(tmp / name))
    return tmp / name


@pytest.mark.parametrize(
    "case, mentions",
    [
        ("changed", "does not match the sha256"),
        ("missing", "lacks tensor 'embeddings.word_embeddings.weight'"),
        ("dtype", "is F16 [120, 40]"),
        ("shape", "is F32 [40, 48]"),
        ("absent", "no such file or folder"),
    ],
)
def test_a_wrong_base_is_refused_in_one_line(merged, tmp_path, case, mentions):
    bundle, base, _ = merged
    key = "embeddings.word_embeddings.weight"
    edits = {
        "changed": lambda a: a.__setitem__(key, a[key] + np.float32(1e-6)),
        "missing": lambda a: a.pop(key),
        "dtype": lambda a: a.__setitem__(key, a[key].astype(np.float16)),
        "shape": lambda a: a.__setitem__("encoder.layer.0.attention.query.weight", np.zeros((40, 48), np.float32)),
    }
    wrong = (
        tmp_path / "nowhere.safetensors"
        if case == "absent"
        else _variant(tmp_path, base, f"{case}.safetensors", edits[case])
    )
    line = assert_one_line_error(
        run("extract", bundle, "--member", "ft0", "--base", wrong, "-o", tmp_path / "x.safetensors")
    )
    assert mentions in line and "base.safetensors (sha256" in line
    assert not (tmp_path / "x.safetensors").exists()
    if case != "absent":
        assert_one_line_error(run("add", bundle, base, "--base", wrong, "-o", tmp_path / "grown.upk"))
        assert_one_line_error(run("verify", bundle, "--base", wrong))


def test_a_member_needing_the_base_without_one(merged, tmp_path):
    bundle, _, _ = merged
    line = assert_one_line_error(run("extract", bundle, "--member", "ft2", "-o", tmp_path / "x.safetensors"))
    assert str(bundle) in line and "'ft2'" in line and "--base PATH" in line and "base.safetensors (sha256" in line
    with unipack.open(bundle) as b, pytest.raises(InputError, match="pass --base PATH"):
        b.load("ft2")
    assert_one_line_error(
        run("add", bundle, bundle.parent / "ft0.safetensors", "--name", "again", "-o", tmp_path / "g.upk")
    )
    result = run("verify", bundle)  # the blobs are sound; the members are not rebuilt, and it says so
    assert result.exit_code == 0 and f"{N} members not rebuilt" in result.output


def test_add_takes_deltas_from_the_base(merged, tmp_path):
    bundle, base, paths = merged
    rng = np.random.default_rng(11)
    b_arrays = load_file(str(base))
    new = {"bert." + k: (v + 0.015 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in b_arrays.items()}
    new["classifier.weight"] = rng.standard_normal((3, 40)).astype(np.float32)
    save_file(new, str(tmp_path / "new.safetensors"))
    grown = tmp_path / "grown.upk"
    result = run("add", bundle, tmp_path / "new.safetensors", "--base", base, "-o", grown)
    assert result.exit_code == 0, result.output
    assert "not counting the base model" in result.output
    with unipack.open(bundle, base=base) as before, unipack.open(grown, base=base) as after:
        assert after.manifest.format_version == 10 and after.manifest.base == before.manifest.base
        for path in paths:  # old members are unchanged, bit for bit
            old, now = before.load_numpy(path.stem), after.load_numpy(path.stem)
            assert all(old[k][1].tobytes() == now[k][1].tobytes() for k in old)
        rebuilt = after.load_numpy("new")
    for name, w in new.items():
        x, got = w.astype(np.float64), rebuilt[name][1].astype(np.float64)
        e, norm = float(np.linalg.norm(x - got)), float(np.linalg.norm(x))
        if name.startswith("bert."):
            change = float(np.linalg.norm(x - b_arrays[name.removeprefix("bert.")]))
            assert e <= min(MAX_ERROR * norm, max(MAX_DELTA_ERROR * change, DELTA_FLOOR * norm)) * (1 + 1e-9)
    spec = SpecBundle(grown, base=_base_dict(base))
    theirs = spec.read_member("new")
    assert all(np.ascontiguousarray(theirs[k][1]).tobytes() == rebuilt[k][1].tobytes() for k in theirs)


def test_a_member_without_centred_tensors_loads_without_the_base(merged, tmp_path):
    """A member added with non-finite values holds every centred tensor raw (an override): it
    needs no base, and loads without one while the others still refuse."""
    bundle, base, _ = merged
    rng = np.random.default_rng(3)
    odd = {"bert." + k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    odd["classifier.weight"] = rng.standard_normal((2, 40)).astype(np.float32)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    grown = tmp_path / "odd.upk"
    assert run("add", bundle, tmp_path / "odd.safetensors", "--base", base, "-o", grown).exit_code == 0
    with unipack.open(grown) as b:
        loaded = b.load_numpy("odd")
        assert all(np.isnan(loaded["bert." + k][1]).all() for k in SHAPES)
        with pytest.raises(InputError):
            b.load("ft0")


def test_reports_say_the_base_is_left_out(merged):
    bundle, _, _ = merged
    info = run("info", bundle)
    assert info.exit_code == 0 and "referenced, not stored" in info.output and "the ratio leaves it out" in info.output
    doc = json.loads(run("info", bundle, "--json").output)
    assert doc["base"]["bytes"] == sum(4 * math.prod(s) for s in SHAPES.values())
    report = run("report", bundle)
    text = " ".join(report.output.split())  # the headline wraps
    assert report.exit_code == 0 and "every ratio leaves out the base model" in text
    assert "base + int4 per-row deltas (base not stored)" in text
    methods = json.loads(run("report", bundle, "--json").output)["alternatives"]["rows"]
    assert {"base-int8", "base-int4", "base-int2"} <= {r["method"] for r in methods}


def test_a_base_table_in_an_older_version_is_refused(merged, tmp_path):
    """A reader of version 10 refuses base-centred records that claim an older version (as one
    without version 10 would refuse the bundle by its version)."""
    bundle, base, _ = merged
    header, _ = read_raw_header(bundle)
    manifest = json.loads(header["__metadata__"]["manifest"])
    manifest["format_version"] = 8
    text = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
    header["__metadata__"].update(
        format_version="8", manifest=text, manifest_sha256=hashlib.sha256(text.encode()).hexdigest()
    )
    old = rewrite_header(bundle, header, tmp_path / "old.upk")
    with pytest.raises(FormatError, match="version 10"):
        unipack.open(old)
    with pytest.raises(SpecFormatError):
        SpecBundle(old, base=_base_dict(base))


def test_python_api_base_on_open_and_on_methods(merged, tmp_path):
    bundle, base, paths = merged
    with unipack.open(bundle, base=base) as b:
        out = b.extract("ft0", tmp_path / "a.safetensors")
    with unipack.open(bundle) as b:  # a method's base= gives it to the bundle: "the base model"
        folder = b.extract_hf("ft0", tmp_path / "hf", base=base)
    assert (
        load_file(str(out))["bert.embeddings.word_embeddings.weight"].tobytes()
        == load_file(str(folder.directory / "model.safetensors"))["bert.embeddings.word_embeddings.weight"].tobytes()
    )
    with pytest.raises(OptionsError, match="references no base model"):
        plain = tmp_path / "plain.upk"
        unipack.merge(paths, plain)
        unipack.open(plain, base=base)


def test_a_base_folder_serves_as_the_base(merged, tmp_path):
    """A Hugging Face folder is a base as a member may be one: the same tensors, the same hashes."""
    bundle, base, paths = merged
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(base.read_bytes())
    (folder / "config.json").write_text("{}")
    out = tmp_path / "f.upk"
    assert run("merge", *paths, "--base", folder, "-o", out, "-q").exit_code == 0
    with unipack.open(out) as b:
        assert b.manifest.base.source == "base-model"
    # Either form of the base reads either bundle: only the tensors' bytes identify it.
    assert run("extract", bundle, "--member", "ft0", "--base", folder, "-o", tmp_path / "a.safetensors").exit_code == 0
    assert run("extract", out, "--member", "ft0", "--base", base, "-o", tmp_path / "b.safetensors").exit_code == 0
    report = run("report", out, "--base", folder, "--originals", paths[0].parent)
    assert report.exit_code == 0, report.output


def test_eval_and_size_searches_merge_against_the_base(tmp_path):
    base, paths = _population(tmp_path)
    hook = tmp_path / "ev.py"
    hook.write_text(
        "import numpy as np\n"
        "def evaluate(state_dict, name):\n"
        "    w = state_dict['bert.encoder.layer.0.attention.query.weight'].double().numpy()\n"
        "    return {'score': float(100 * np.abs(w).mean())}\n"
    )
    out = tmp_path / "e.upk"
    result = run("merge", *paths, "--base", base, "--eval", hook, "--max-drop", "0.5", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    with unipack.open(out, base=base) as b:
        assert b.manifest.base is not None
        for member in b.manifest.members:  # scored on the members as rebuilt from the base
            w = b.load_numpy(member.name)["bert.encoder.layer.0.attention.query.weight"][1].astype(np.float64)
            assert member.metrics["unipack"]["score"] == pytest.approx(100 * np.abs(w).mean(), rel=1e-12)
    sized = tmp_path / "s.upk"
    result = run("merge", *paths, "--base", base, "--size", "20KB", "-o", sized, "-q")
    assert result.exit_code == 0, result.output
    assert "not counting the base model" in result.output and sized.stat().st_size <= 20_000


def _edited(bundle: Path, out: Path, edit) -> Path:
    """A copy of ``bundle`` whose manifest ``edit`` changed (its sha256 recomputed)."""
    header, _ = read_raw_header(bundle)
    manifest = json.loads(header["__metadata__"]["manifest"])
    edit(manifest)
    text = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
    header["__metadata__"].update(manifest=text, manifest_sha256=hashlib.sha256(text.encode()).hexdigest())
    return rewrite_header(bundle, header, out)


def _centred_record(m: dict) -> dict:
    return next(t for t in m["tensors"] if t.get("center") == "base")


@pytest.mark.parametrize(
    "case",
    ["digest", "dtype", "stray", "unlisted", "with-mean", "unknown-center", "empty"],
)
def test_malformed_base_references_are_refused_by_both_readers(merged, tmp_path, case):
    bundle, base, _ = merged
    first = "bert.embeddings.word_embeddings.weight"
    edits = {
        "digest": lambda m: m["base"].update(sha256="0" * 64),
        "dtype": lambda m: m["base"]["tensors"][first].update(dtype="F16"),
        "stray": lambda m: m["base"]["tensors"].update(
            {"classifier.weight": {"name": "x", "dtype": "F32", "shape": [1], "sha256": "0" * 64}}
        ),
        "unlisted": lambda m: m["base"]["tensors"].pop(first),
        "with-mean": lambda m: _centred_record(m).update(mean="coef/0"),
        "unknown-center": lambda m: _centred_record(m).update(center="median"),
        "empty": lambda m: m["base"].update(tensors={}),
    }
    bad = _edited(bundle, tmp_path / f"{case}.upk", edits[case])
    with pytest.raises(FormatError):
        unipack.open(bad, base=base)
    with pytest.raises(SpecFormatError):
        SpecBundle(bad, base=_base_dict(base))


@pytest.mark.parametrize("option", [["--no-quantize"], ["--rank", "2"], ["--energy", "0.9"]])
def test_base_needs_quantized_deltas_under_an_error_rule(tmp_path, option):
    base, paths = _population(tmp_path)
    line = assert_one_line_error(run("merge", *paths, "--base", base, *option, "-o", tmp_path / "x.upk"))
    assert "--base centres quantized deltas" in line
    assert not (tmp_path / "x.upk").exists()


def test_a_large_manifest_with_a_base_has_the_numbers_section_too(tmp_path, monkeypatch):
    """Versions 9 and 10 together: a base-referencing bundle whose manifest is compressed keeps
    its members' numbers in their own section, is version 10, and both readers agree."""
    from unipack.format import container

    base, paths = _population(tmp_path)
    monkeypatch.setattr(container, "COMPRESS_MANIFEST_ABOVE", 0)  # every manifest counts as large
    out = tmp_path / "packed.upk"
    unipack.merge(paths, out, base=base, lossless="off")
    spec = SpecBundle(out, base=_base_dict(base))
    assert spec.version == 10 and spec.packed_numbers is not None
    with unipack.open(out, base=base) as b:
        assert not b.verify()
        for i, path in enumerate(paths):
            assert list(spec.members[path.stem]["errors"]) == list(b.manifest.members[i].errors)
            theirs, ours = spec.read_member(path.stem), b.load_numpy(path.stem)
            for name, (dtype, array) in theirs.items():
                assert ours[name][0] == dtype and ours[name][1].tobytes() == np.ascontiguousarray(array).tobytes()
