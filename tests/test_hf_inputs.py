"""Inputs other than single .safetensors files: Hugging Face model folders (one file or sharded,
safetensors or pytorch_model.bin) and PyTorch .bin/.pt state dicts.

Every checkpoint is built here (no downloads), and every number is checked against the
reference loaders: ``safetensors.torch.load_file`` for safetensors files and shards,
``torch.load(weights_only=True)`` for pickles. Errors are checked by message, through the API
and through the CLI (one line, exit 1, no output left behind).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import (
    Population,
    TensorSpec,
    assert_close_errors,
    assert_one_line_error,
    bits_equal,
    check_against_originals,
    grouped_zstd_size,
    main_width,
    make_values,
    read_safetensors,
    rel_error,
    run,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import unipack
from unipack import FormatError, InputError, UnipackError
from unipack.analysis.report import find_originals
from unipack.format.manifest import MAX_CONFIG_BYTES
from unipack.options import DEFAULT_MAX_ERROR

SPECS = {
    "embeddings.weight": TensorSpec((24, 16), kind="right", rank=2),
    "encoder.0.attn.weight": TensorSpec((16, 16), kind="left", rank=2),
    "encoder.0.mlp.weight": TensorSpec((32, 16), dtype="bfloat16", kind="right", rank=2),
    "encoder.0.mlp.bias": TensorSpec((32,), dtype="float16", kind="flat", rank=2, scale=0.05),
    "encoder.0.norm.weight": TensorSpec((16,), kind="same"),
    "pooler.weight": TensorSpec((16, 16), dtype="float64", kind="right", rank=1),
    "position_ids": TensorSpec((1, 8), dtype="int64", kind="int_same"),
    "mask": TensorSpec((4,), dtype="bool", kind="int"),
}

#: A small ViT-like config.json; the non-ASCII label checks that the text is kept byte for byte.
CONFIG = {
    "architectures": ["ViTForImageClassification"],
    "model_type": "vit",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "image_size": 16,
    "patch_size": 4,
    "id2label": {"0": "chat 🐱", "1": "dog"},
    "torch_dtype": "float32",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ------------------------------------------------------------------------------------------
# writers: the layouts save_pretrained and torch.save produce
# ------------------------------------------------------------------------------------------


def write_config(folder: Path, name: str = "config.json", doc: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # indent and a trailing newline, as transformers writes them: the bundle must keep exactly this
    (folder / name).write_text(json.dumps(doc or CONFIG, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def shard_names(tensors: dict[str, torch.Tensor], n: int) -> list[list[str]]:
    """``n`` shards, filled in reverse name order: neither the dict's nor the index's (sorted) order."""
    names = sorted(tensors, reverse=True)
    return [names[i::n] for i in range(n)]


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, n: int, *, kind: str = "safetensors") -> list[Path]:
    """``model-0000i-of-0000n.safetensors`` (or ``pytorch_model-...bin``) plus the index."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix, suffix = ("model", ".safetensors") if kind == "safetensors" else ("pytorch_model", ".bin")
    weight_map, paths = {}, []
    for i, names in enumerate(shard_names(tensors, n)):
        file_name = f"{prefix}-{i + 1:05d}-of-{n:05d}{suffix}"
        part = {k: tensors[k] for k in names}
        if kind == "safetensors":
            save_file(part, str(folder / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
        paths.append(folder / file_name)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / f"{prefix}{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return paths


def write_member(kind: str, tensors: dict[str, torch.Tensor], root: Path) -> Path:
    """One member in one of the input layouts; returns the path given to merge."""
    if kind == "single":
        path = root / "single.safetensors"
        save_file(tensors, str(path), metadata={"task": "single", "note": "ünïcode"})
    elif kind == "hf-single":
        path = root / "hf-single"
        write_config(path)
        write_config(path, "generation_config.json", {"max_length": 20})
        (path / "tokenizer.json").write_text("{}")  # not a config unipack keeps
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif kind == "hf-sharded":
        path = root / "hf-sharded"
        write_config(path)
        write_config(path, "preprocessor_config.json", {"do_resize": True, "size": 16})
        save_sharded(tensors, path, 3)
    elif kind == "hf-bin":
        path = root / "hf-bin"
        write_config(path)
        torch.save(tensors, path / "pytorch_model.bin")
    elif kind == "hf-bin-sharded":
        path = root / "hf-bin-sharded"
        write_config(path)
        save_sharded(tensors, path, 2, kind="bin")
    elif kind == "plain-bin":
        path = root / "plain.bin"
        torch.save(tensors, path)
    elif kind == "pt":
        path = root / "state.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=False)  # the legacy format: no mmap
    else:
        raise ValueError(kind)
    return path


KINDS = ["single", "hf-single", "hf-sharded", "hf-bin", "hf-bin-sharded", "plain-bin", "pt"]
NAMES = ["single", "hf-single", "hf-sharded", "hf-bin", "hf-bin-sharded", "plain", "state"]


# ------------------------------------------------------------------------------------------
# reference loaders (never unipack's own reader)
# ------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """A member's tensors and metadata as the reference loaders read them (a folder: all its shards)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata = None
    for i, f in enumerate(weight_files(path)):
        if f.suffix == ".safetensors":
            part = load_file(str(f))
            if i == 0:
                with safe_open(str(f), framework="pt") as g:
                    metadata = g.metadata()
        else:
            part = torch.load(f, map_location="cpu", weights_only=True)
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors, metadata


def data_order(path: Path) -> list[str]:
    """Tensor names of a safetensors file in data order, from its raw header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"])


@pytest.fixture
def mixed(tmp_path: Path) -> Population:
    """Seven members of one architecture, each in another input layout, with their reference tensors."""
    values = make_values(SPECS, len(KINDS), seed=3)
    root = tmp_path / "in"
    root.mkdir()
    paths, tensors, metas = [], [], []
    for kind, member in zip(KINDS, values):
        path = write_member(kind, member, root)
        ref, meta = reference(path)
        assert set(ref) == set(member) and all(bits_equal(ref[k], member[k]) for k in member), kind
        paths.append(path)
        tensors.append(ref)
        metas.append(meta)
    return Population(paths, list(NAMES), tensors, metas, dict(SPECS))


# ------------------------------------------------------------------------------------------
# a mixed population: every layout round-trips
# ------------------------------------------------------------------------------------------


def test_mixed_layouts_round_trip_bit_exact(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "mixed.upk"
    unipack.merge(mixed.paths, bundle, max_error=0.0)
    out = tmp_path / "out"
    assert open_files_under(tmp_path / "in") == [], "merge left input files open"
    with unipack.open(bundle) as b:
        assert b.members == NAMES
        b.extract_all(out)
        manifest = b.manifest
    for i, name in enumerate(NAMES):
        got, meta, _ = read_safetensors(out / f"{name}.safetensors")
        assert meta == mixed.metadata[i], name
        assert set(got) == set(mixed.tensors[i])
        for tensor, w in mixed.tensors[i].items():
            assert bits_equal(got[tensor], w), f"{name}/{tensor}"
        assert manifest.member(name).errors == (0.0,) * len(manifest.tensors)


def test_mixed_layouts_within_the_default_budget(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "mixed.upk"
    result = unipack.merge(mixed.paths, bundle)
    with unipack.open(bundle) as b:
        assert any(t.storage == "delta" or t.rank > 0 for t in b.manifest.tensors), "nothing was compressed"
    measured = check_against_originals(mixed, bundle, tmp_path / "out", max_error=DEFAULT_MAX_ERROR)
    assert max(max(m.values()) for m in measured.values()) == pytest.approx(result.worst_error, rel=1e-6)


def test_sources_sizes_metadata_and_configs(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "mixed.upk"
    result = unipack.merge(mixed.paths, bundle, lossless="full")
    manifest = result.manifest
    for path, name in zip(mixed.paths, NAMES):
        rec = manifest.member(name)
        assert rec.source == path.name
        assert rec.source_bytes == sum(f.stat().st_size for f in weight_files(path)), name
        if path.is_dir():
            kept = sorted(
                n for n in ("config.json", "generation_config.json", "preprocessor_config.json") if (path / n).exists()
            )
            assert rec.configs is not None and sorted(rec.configs) == kept
            for file_name, text in rec.configs.items():
                assert text.encode("utf-8") == (path / file_name).read_bytes(), f"{name}/{file_name}"
        else:
            assert rec.configs is None
        # the lossless baseline of a folder is the sum over its weight files (each compressed whole,
        # its bytes grouped for the member's main float dtype: spec 3.6)
        files = weight_files(path)
        expected = sum(grouped_zstd_size([f], main_width(files)) for f in files)
        assert rec.lossless_bytes == expected, name
    assert manifest.stats["input_bytes"] == sum(m.source_bytes for m in manifest.members)
    assert manifest.stats["lossless"]["sampled"] is False
    # the configs are in the file itself, not only in the parsed manifest
    with unipack.open(bundle) as b:
        assert b.manifest.member("hf-sharded").configs["preprocessor_config.json"] == (
            mixed.paths[2] / "preprocessor_config.json"
        ).read_text(encoding="utf-8")


def test_tensor_order_follows_the_shards_not_the_index(mixed: Population, tmp_path: Path) -> None:
    """With a sharded folder first, the bundle lists tensors shard by shard in data order."""
    sharded = mixed.paths[2]
    order = [name for shard in sorted(sharded.glob("model-*.safetensors")) for name in data_order(shard)]
    index_order = list(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"])
    assert order != index_order and sorted(order) == sorted(index_order)
    bundle = tmp_path / "b.upk"
    unipack.merge([sharded, *mixed.paths[:2]], bundle, max_error=0.0)
    with unipack.open(bundle) as b:
        assert [t.name for t in b.manifest.tensors] == order
        extracted = b.extract("hf-sharded", tmp_path / "x.safetensors")
    assert data_order(extracted) == order


def test_default_names_and_the_cli(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "cli.upk"
    result = run("merge", *mixed.paths, "-o", bundle, "-q")
    assert result.exit_code == 0, result.output
    with unipack.open(bundle) as b:
        assert b.members == NAMES
        assert [m.source for m in b.manifest.members] == [p.name for p in mixed.paths]


# ------------------------------------------------------------------------------------------
# .bin specifics: dtypes, tied and non-contiguous tensors
# ------------------------------------------------------------------------------------------


def test_bin_dtypes_tied_and_strided_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(2):
        base = torch.randn(6, 4, generator=g)
        state = {
            "embed.weight": base,
            "lm_head.weight": base,  # tied: the same tensor under two names
            "row": base[2],  # a view into the same storage, at an offset
            "transposed": base.t(),  # non-contiguous
            "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
            "f16": torch.randn(3, 2, generator=g).to(torch.float16),
            "f64": torch.randn(4, generator=g, dtype=torch.float64),
            "f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
            "i8": torch.arange(-3, 3, dtype=torch.int8),
            "u8": torch.arange(6, dtype=torch.uint8) + i,
            "i32": torch.tensor([7, -7], dtype=torch.int32),
            "flag": torch.tensor([True, bool(i)]),
            "scalar": torch.tensor(1.5 + i),
        }
        path = tmp_path / f"m{i}.bin"
        torch.save(state, path)
        paths.append(path)
    bundle = tmp_path / "b.upk"
    unipack.merge(paths, bundle, max_error=0.0)
    with unipack.open(bundle) as b:
        for i, path in enumerate(paths):
            ref = torch.load(path, map_location="cpu", weights_only=True)
            got = b.load(f"m{i}")
            assert list(got) == list(ref)
            for name, w in ref.items():
                assert bits_equal(got[name], w.contiguous()), name
            assert b.manifest.member(f"m{i}").metadata is None


def test_bin_members_lossy_match_torch_load(tmp_path: Path) -> None:
    """Within the budget against torch.load's tensors, not only bit-exact ones."""
    values = make_values(SPECS, 4, seed=9)
    paths = []
    for i, state in enumerate(values):
        paths.append(tmp_path / f"ft{i}.pt")
        torch.save(state, paths[-1])
    bundle = tmp_path / "b.upk"
    unipack.merge(paths, bundle)
    with unipack.open(bundle) as b:
        index = {t.name: j for j, t in enumerate(b.manifest.tensors)}
        for i, path in enumerate(paths):
            ref = torch.load(path, map_location="cpu", weights_only=True)
            got = b.load(f"ft{i}")
            rec = b.manifest.member(f"ft{i}")
            for name, w in ref.items():
                assert got[name].dtype == w.dtype and got[name].shape == w.shape
                if not w.is_floating_point():
                    assert bits_equal(got[name], w)
                    continue
                err = rel_error(w, got[name])
                assert err <= DEFAULT_MAX_ERROR * (1 + 1e-9)
                assert_close_errors(err, rec.errors[index[name]])


# ------------------------------------------------------------------------------------------
# --name SOURCE=NAME
# ------------------------------------------------------------------------------------------


def test_name_pairs(mixed: Population, tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "lr=1e-4"  # a path with "=": the pair splits at the last one
    runs.parent.mkdir()
    mixed.paths[1].rename(runs)
    paths = [mixed.paths[0], runs, mixed.paths[2], mixed.paths[5]]
    bundle = tmp_path / "named.upk"
    result = run(
        "merge",
        *paths,
        "-o",
        bundle,
        "-q",
        "--name",
        f"{runs}=fast",
        "--name",
        "hf-sharded=sharded",
        "--name",
        f"{paths[0]}=first",
    )
    assert result.exit_code == 0, result.output
    with unipack.open(bundle) as b:
        assert b.members == ["first", "fast", "sharded", "plain"]
        assert [m.source for m in b.manifest.members] == ["single.safetensors", "lr=1e-4", "hf-sharded", "plain.bin"]
    # the Python API takes a list aligned with the paths
    unipack.merge(paths, tmp_path / "api.upk", names=["a", "b", "c", "d"])
    with unipack.open(tmp_path / "api.upk") as b:
        assert b.members == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "pairs, fragments",
    [
        (["nodelimiter"], ["--name 'nodelimiter'", "expected SOURCE=NAME"]),
        (["=x"], ["expected SOURCE=NAME"]),
        (["single="], ["expected SOURCE=NAME"]),
        (["nope=x"], ["'nope' matches no input", "'single'"]),
        (["single=hf-single"], ["duplicate member name 'hf-single'", "--name SOURCE=NAME"]),
        (["single=a", "single=b"], ["already named 'a'"]),
        (["single=.hidden"], ["'.hidden'", "leading dots"]),
    ],
)
def test_name_pair_errors(mixed: Population, tmp_path: Path, pairs: list[str], fragments: list[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args: list[str | Path] = ["merge", *mixed.paths[:3], "-o", out_dir / "x.upk", "-q"]
    for pair in pairs:
        args += ["--name", pair]
    line = assert_one_line_error(run(*args))
    for fragment in fragments:
        assert fragment in line, line
    assert list(out_dir.iterdir()) == []


def test_name_pair_ambiguous_default(tmp_path: Path) -> None:
    values = make_values(SPECS, 2, seed=1)
    paths = []
    for i, state in enumerate(values):
        (tmp_path / f"run{i}").mkdir()
        paths.append(tmp_path / f"run{i}" / "model.safetensors")
        save_file(state, str(paths[-1]))
    line = assert_one_line_error(run("merge", *paths, "-o", tmp_path / "x.upk", "-q", "--name", "model=x"))
    assert "'model' is the default name of 2 inputs" in line and "give the input's path instead" in line
    result = run("merge", *paths, "-o", tmp_path / "x.upk", "-q", "--name", f"{paths[0]}=a", "--name", f"{paths[1]}=b")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------
# bad inputs: one line, the file named, nothing written
# ------------------------------------------------------------------------------------------


def _rewrite_index(folder: Path, change: Callable[[dict[str, str]], None]) -> None:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    change(doc["weight_map"])
    index.write_text(json.dumps(doc))


def _bad_case(kind: str, mixed: Population, tmp: Path) -> tuple[Path, type[UnipackError], list[str]]:
    """Break one input; return the input to merge, the error class and what the message must say."""
    sharded = mixed.paths[2]
    state = mixed.tensors[0]
    shard = "model-00002-of-00003.safetensors"
    if kind == "missing_shard":
        (sharded / shard).unlink()
        return sharded, InputError, [str(sharded / shard), "is missing"]
    if kind == "index_names_missing_tensor":
        _rewrite_index(sharded, lambda m: m.update({"ghost.weight": shard}))
        return (
            sharded,
            InputError,
            [str(sharded / "model.safetensors.index.json"), "'ghost.weight'", "does not hold it"],
        )
    if kind == "tensor_in_other_shard":
        moved = data_order(sharded / shard)[0]
        _rewrite_index(sharded, lambda m: m.update({moved: "model-00001-of-00003.safetensors"}))
        return sharded, InputError, [repr(moved), "model-00001-of-00003.safetensors", "does not hold it"]
    if kind == "shard_holds_unlisted_tensor":
        part = load_file(str(sharded / shard))
        part["extra.weight"] = torch.zeros(2)
        save_file(part, str(sharded / shard))
        return sharded, InputError, [str(sharded / shard), "'extra.weight'", "does not list it"]
    if kind == "unlisted_shard_on_disk":
        save_file({"x": torch.zeros(1)}, str(sharded / "model-00004-of-00004.safetensors"))
        return sharded, InputError, [str(sharded / "model-00004-of-00004.safetensors"), "does not list"]
    if kind == "index_skips_a_shard":
        (sharded / shard).unlink()
        _rewrite_index(sharded, lambda m: [m.pop(k) for k in [k for k, v in m.items() if v == shard]])
        return sharded, InputError, ["lists no tensor in shard 2 of 3"]
    if kind == "index_not_json":
        (sharded / "model.safetensors.index.json").write_text("{not json")
        return sharded, InputError, [str(sharded / "model.safetensors.index.json"), "not a valid JSON index"]
    if kind == "index_escapes_folder":
        _rewrite_index(sharded, lambda m: m.update({"ghost.weight": "../single.safetensors"}))
        return sharded, InputError, ["'../single.safetensors'", "not a file name in the folder"]
    if kind == "folder_without_weights":
        empty = tmp / "in" / "just-config"
        write_config(empty)
        return empty, InputError, [str(empty), "a folder without model weights", "model.safetensors"]
    if kind == "config_too_big":
        folder = mixed.paths[1]
        (folder / "config.json").write_text(json.dumps({"x": "a" * MAX_CONFIG_BYTES}))
        return folder, InputError, [str(folder / "config.json"), f"over the {MAX_CONFIG_BYTES}-byte limit"]
    if kind == "config_not_utf8":
        folder = mixed.paths[1]
        (folder / "config.json").write_bytes(b'{"label": "caf\xe9"}')
        return folder, InputError, [str(folder / "config.json"), "not UTF-8"]
    if kind == "config_not_json":
        folder = mixed.paths[1]
        (folder / "generation_config.json").write_text("{'python': 'dict'}")
        return folder, InputError, [str(folder / "generation_config.json"), "not valid JSON"]
    bad = tmp / "in" / "bad.bin"
    if kind == "non_tensor_value":
        torch.save({**state, "step": 5}, bad)
        return bad, InputError, [str(bad), "entry 'step' is an int, not a tensor", "flat dict"]
    if kind == "nested_state_dict":
        torch.save({"state_dict": state}, bad)
        return bad, InputError, [str(bad), "'state_dict' is a dict", "nested state dict"]
    if kind == "list_of_tensors":
        torch.save(list(state.values()), bad)
        return bad, InputError, [str(bad), "holds a list, not a state dict"]
    if kind == "model_object":
        torch.save(torch.nn.Linear(3, 2), bad)
        return (
            bad,
            InputError,
            [
                str(bad),
                "not a plain state dict loadable with torch.load(weights_only=True)",
                "refusing to unpickle arbitrary objects",
                "torch.nn.modules.linear.Linear",
                "model.state_dict()",
            ],
        )
    if kind == "unsupported_dtype":
        torch.save({**state, "phase": torch.zeros(2, dtype=torch.complex64)}, bad)
        return bad, InputError, [str(bad), "'phase'", "complex64", "cannot store"]
    if kind == "truncated_bin":
        torch.save(state, bad)
        bad.write_bytes(bad.read_bytes()[:300])
        return bad, FormatError, [str(bad), "cannot load as a PyTorch checkpoint"]
    if kind == "missing_path":
        return tmp / "in" / "nowhere", InputError, [str(tmp / "in" / "nowhere"), "no such file or folder"]
    raise ValueError(kind)


BAD_CASES = [
    "missing_shard",
    "index_names_missing_tensor",
    "tensor_in_other_shard",
    "shard_holds_unlisted_tensor",
    "unlisted_shard_on_disk",
    "index_skips_a_shard",
    "index_not_json",
    "index_escapes_folder",
    "folder_without_weights",
    "config_too_big",
    "config_not_utf8",
    "config_not_json",
    "non_tensor_value",
    "nested_state_dict",
    "list_of_tensors",
    "model_object",
    "unsupported_dtype",
    "truncated_bin",
    "missing_path",
]


@pytest.mark.parametrize("kind", BAD_CASES)
def test_bad_inputs_fail_with_one_clear_line(mixed: Population, tmp_path: Path, kind: str) -> None:
    bad, error, fragments = _bad_case(kind, mixed, tmp_path)
    good = [p for p in mixed.paths if p != bad][:2]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UnipackError) as info:
        unipack.merge([*good, bad], out_dir / "x.upk")
    assert type(info.value) is error, repr(info.value)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    line = assert_one_line_error(run("merge", *good, bad, "-o", out_dir / "x.upk", "-q"))
    assert line == f"Error: {message}"
    assert list(out_dir.iterdir()) == []
    assert open_files_under(tmp_path / "in") == [], "a failed merge left input files open"


def open_files_under(directory: Path) -> list[str]:
    """Files below ``directory`` this process still holds open (Linux: /proc/self/fd)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return []
    root = str(directory.resolve())
    found = []
    for fd in fds.iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(root + "/"):
            found.append(target)
    return found


# ------------------------------------------------------------------------------------------
# add and report take the same inputs
# ------------------------------------------------------------------------------------------


def test_add_accepts_a_folder_and_a_bin(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "b.upk"
    unipack.merge([mixed.paths[0], mixed.paths[5], mixed.paths[6]], bundle)
    folder = mixed.paths[2]
    result = run("add", bundle, folder)
    assert result.exit_code == 0, result.output
    unipack.add(bundle, mixed.paths[4], name="bin-shards")
    with unipack.open(bundle) as b:
        assert b.members == ["single", "plain", "state", "hf-sharded", "bin-shards"]
        for name, index in (("hf-sharded", 2), ("bin-shards", 4)):
            rec = b.manifest.member(name)
            path = mixed.paths[index]
            assert rec.added and rec.source == path.name
            assert rec.source_bytes == sum(f.stat().st_size for f in weight_files(path))
            assert rec.configs is not None
            assert rec.configs["config.json"].encode() == (path / "config.json").read_bytes()
            assert rec.metadata == mixed.metadata[index]
            got = b.load(name)
            for tensor, w in mixed.tensors[index].items():
                if w.is_floating_point():
                    assert rel_error(w, got[tensor]) <= DEFAULT_MAX_ERROR * (1 + 1e-9), (name, tensor)
                else:
                    assert bits_equal(got[tensor], w), (name, tensor)


def test_report_finds_folder_originals(mixed: Population, tmp_path: Path) -> None:
    bundle = tmp_path / "b.upk"
    unipack.merge(mixed.paths, bundle, baselines=False)
    originals = mixed.paths[0].parent
    eval_file = tmp_path / "score.py"
    eval_file.write_text(
        "def evaluate(state, name):\n    return {'sum': float(state['embeddings.weight'].double().sum())}\n"
    )
    with unipack.open(bundle) as b:
        found = find_originals(b.manifest, originals)
        assert found == dict(zip(NAMES, mixed.paths))
        r = unipack.report(b, originals=originals, recompute=True, hook=unipack.load_eval(str(eval_file)))
    for i, name in enumerate(NAMES):
        member = next(m for m in r.members if m.name == name)
        assert member.errors["svd"] is not None, name  # measured again from the folder / .bin original
        expected = float(mixed.tensors[i]["embeddings.weight"].double().sum())
        assert r.evaluation["members"][name]["original"]["sum"] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------
# a real transformers model (optional)
# ------------------------------------------------------------------------------------------


def test_transformers_vit_folders(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    folders = []
    for seed, shard_size in ((0, None), (1, "20KB")):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(config)
        folder = tmp_path / f"vit-{seed}"
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        folders.append(folder)
    assert (folders[0] / "model.safetensors").exists()
    assert len(list(folders[1].glob("model-*-of-*.safetensors"))) >= 3  # really sharded
    for max_error in (0.0, 0.01):
        bundle = tmp_path / f"vit-{max_error}.upk"
        unipack.merge(folders, bundle, max_error=max_error)
        with unipack.open(bundle) as b:
            assert b.members == ["vit-0", "vit-1"]
            for folder in folders:
                rec = b.manifest.member(folder.name)
                assert rec.configs == {"config.json": (folder / "config.json").read_text(encoding="utf-8")}
                ref, meta = reference(folder)
                assert rec.metadata == meta
                got = b.load(folder.name)
                assert set(got) == set(ref)
                for name, w in ref.items():
                    if max_error == 0.0 or not w.is_floating_point():
                        assert bits_equal(got[name], w), name
                    else:
                        assert rel_error(w, got[name]) <= max_error * (1 + 1e-9), name


def test_lossless_baseline_of_several_files_is_an_estimate_if_any_is_sampled(tmp_path: Path) -> None:
    from unipack.pack import lossless

    big, small = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    big.write_bytes(bytes(3 * lossless.WINDOW) + torch.randn(lossless.WINDOW // 4).numpy().tobytes())
    small.write_bytes(torch.randn(256).numpy().tobytes())
    files = [(big, big.stat().st_size), (small, small.stat().st_size)]
    measured = lossless.measure_files(files, "sample", share=1 / 16)  # one 1 MiB window for the big file
    assert measured.sampled
    assert measured.read_bytes == lossless.WINDOW + small.stat().st_size
    small_size = len(zstandard.ZstdCompressor(level=19).compress(small.read_bytes()))
    assert (
        measured.compressed_bytes == lossless.measure(big, files[0][1], "sample", 1 / 16).compressed_bytes + small_size
    )
    whole = lossless.measure_files(files, "full")
    one_shot = sum(len(zstandard.ZstdCompressor(level=19).compress(f.read_bytes())) for f, _ in files)
    # streamed in 1 MiB chunks, so block boundaries (and a few bytes) differ from one-shot compression
    assert not whole.sampled and whole.compressed_bytes == pytest.approx(one_shot, rel=1e-4)
