"""``extract --format hf``: members back as Hugging Face folders that ``from_pretrained`` loads.

The populations are tiny real transformers models (a ViT and a BERT classifier), built here from
a config, never downloaded: a base model plus small per-member deltas along a few shared
directions, so the members share a subspace the way fine-tunes of one base do. Until merge takes
Hugging Face folders, each member's ``config.json`` is attached to its record with
``rewrite_bundle``. Folders are checked with transformers itself (no missing or unexpected keys,
same logits) and their shards with the reference safetensors loader.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import bits_equal, listing, run, small_specs, write_population
from safetensors import safe_open
from safetensors.torch import save_model

import unipack
from unipack import OptionsError, OutputExistsError, UnipackError
from unipack.export import hf_folder
from unipack.export.hf_folder import parse_size, plan_shards
from unipack.format.container import rewrite_bundle

transformers = pytest.importorskip("transformers")

MESSAGE = (
    "no config.json recorded for member {}: the folder has weights only "
    "(merge the member's Hugging Face folder to keep its config)"
)


# --------------------------------------------------------------------------------------------
# tiny populations of real models
# --------------------------------------------------------------------------------------------


def vit_config() -> Any:
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )


def bert_config() -> Any:
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )


@dataclass
class HFPopulation:
    bundle: Path
    names: list[str]
    models: dict[str, torch.nn.Module]  # the originals, in eval mode
    config_files: dict[str, bytes]  # each member's config.json as save_pretrained wrote it
    model_class: Callable[..., Any]  # the architecture, to load a state dict into
    auto_class: Any  # the Auto* class that from_pretrained goes through
    inputs: dict[str, torch.Tensor]  # a fixed input batch


def make_hf_population(directory: Path, kind: str, *, n: int = 3, max_error: float = 0.01) -> HFPopulation:
    """``n`` members = one base model + deltas along 2 shared directions per tensor, merged."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "vit":
        config, model_class = vit_config(), transformers.ViTForImageClassification
        auto_class = transformers.AutoModelForImageClassification
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))}
    else:
        config, model_class = bert_config(), transformers.BertForSequenceClassification
        auto_class = transformers.AutoModelForSequenceClassification
        gen = torch.Generator().manual_seed(7)
        inputs = {
            "input_ids": torch.randint(0, 100, (2, 10), generator=gen),
            "attention_mask": torch.ones(2, 10, dtype=torch.long),
        }
    torch.manual_seed(0)
    base = model_class(config).state_dict()
    shared = torch.Generator().manual_seed(1)
    directions = {k: torch.randn((2, *v.shape), generator=shared) for k, v in base.items() if v.is_floating_point()}
    paths, names, models, configs = [], [], {}, {}
    for i in range(n):
        name = f"{kind}{i}"
        gen = torch.Generator().manual_seed(100 + i)
        state = {}
        for key, value in base.items():
            if key not in directions:
                state[key] = value.clone()
                continue
            scale = float(value.abs().mean()) or 0.02  # LayerNorm weights are all ones: still move them
            coef = torch.randn(2, generator=gen)
            delta = torch.tensordot(coef, directions[key], dims=1) + 0.01 * torch.randn(value.shape, generator=gen)
            state[key] = value + 0.05 * scale * delta
        model = model_class(config)
        model.load_state_dict(state, strict=True)
        model.eval()
        path = directory / f"{name}.safetensors"
        save_model(model, str(path), metadata={"task": f"task-{i}"})  # drops tied duplicates, if any
        folder = directory / f"{name}-config"
        model.config.save_pretrained(folder)
        configs[name] = (folder / "config.json").read_bytes()
        paths.append(path)
        names.append(name)
        models[name] = model
    bundle = directory / f"{kind}.upk"
    unipack.merge(paths, bundle, raw_mismatched=True, max_error=max_error)
    attach_configs(bundle, {name: {"config.json": text.decode("utf-8")} for name, text in configs.items()})
    return HFPopulation(bundle, names, models, configs, model_class, auto_class, inputs)


def attach_configs(bundle: Path, configs: dict[str, dict[str, str]]) -> None:
    """Record config files on members, as merging Hugging Face folders will (spec §3.3 ``configs``)."""

    def update(manifest: Any, writer: Any) -> Any:
        members = tuple(replace(m, configs=configs.get(m.name, m.configs)) for m in manifest.members)
        return replace(manifest, members=members, blobs=writer.blobs)

    rewrite_bundle(bundle, update, force=True)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> HFPopulation:
    return make_hf_population(tmp_path_factory.mktemp("vit"), "vit")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> HFPopulation:
    return make_hf_population(tmp_path_factory.mktemp("bert"), "bert")


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def load_folder(pop: HFPopulation, folder: Path) -> torch.nn.Module:
    """``from_pretrained`` through the Auto class, demanding a clean load."""
    model, info = pop.auto_class.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, pop.model_class)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])
    model.eval()
    return model


def reconstructed(pop: HFPopulation, member: str) -> torch.nn.Module:
    """The same architecture with ``bundle.load(member)``: what the folder must reproduce."""
    model = pop.model_class(pop.models[member].config)
    with unipack.open(pop.bundle) as b:
        model.load_state_dict(b.load(member), strict=True)
    return model.eval()


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def shard_contents(folder: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, str] | None], dict[str, Any]]:
    """Per shard file: tensor names in file order, ``__metadata__``, and every tensor."""
    names, metas, tensors = {}, {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names[path.name] = list(f.keys())
            metas[path.name] = f.metadata()
            tensors.update({k: f.get_tensor(k) for k in names[path.name]})
    return names, metas, tensors


# --------------------------------------------------------------------------------------------
# one folder: from_pretrained loads it and reproduces the member
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_folder_loads_with_from_pretrained(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pop: HFPopulation = request.getfixturevalue(kind)
    member = pop.names[1]
    out = tmp_path / "folder"
    result = run("extract", pop.bundle, "--member", member, "--format", "hf", "-o", out)
    assert_ok(result)
    assert result.stdout.strip() == str(out)
    assert "no config.json" not in result.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == pop.config_files[member]  # verbatim

    loaded = load_folder(pop, out)
    got = logits(loaded, pop.inputs)
    torch.testing.assert_close(got, logits(reconstructed(pop, member), pop.inputs), rtol=0, atol=1e-6)
    # The budget bounds every tensor's relative error by 1%; through two layers the logits move by
    # less than 3% of their largest value (0.4% measured here).
    original = logits(pop.models[member], pop.inputs)
    assert (got - original).abs().max() <= 0.03 * original.abs().max()
    assert not torch.equal(got, original)  # the merge really was lossy: the check above means something

    # Names, dtypes, shapes and values exactly as the bundle yields them; metadata keeps format=pt.
    names, metas, tensors = shard_contents(out)
    with unipack.open(pop.bundle) as b:
        expected = b.load(member)
        assert names["model.safetensors"] == b.tensor_names
    assert set(tensors) == set(expected)
    assert all(bits_equal(tensors[k], expected[k]) for k in expected)
    assert metas["model.safetensors"] == {"format": "pt", "task": "task-1"}


def test_exact_budget_gives_the_original_logits(tmp_path: Path) -> None:
    pop = make_hf_population(tmp_path / "pop", "vit", max_error=0.0)
    with unipack.open(pop.bundle) as b:
        for member in pop.names:
            export = b.extract_hf(member, tmp_path / member)
            assert export.has_config and not export.sharded and export.note is None
            assert export.files == ("config.json", "model.safetensors")
            model = load_folder(pop, export.directory)
            assert torch.equal(logits(model, pop.inputs), logits(pop.models[member], pop.inputs))


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------


def test_sharded_folder(vit: HFPopulation, tmp_path: Path) -> None:
    member = vit.names[0]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert_ok(run("extract", vit.bundle, "-m", member, "--format", "hf", "-o", whole))
    result = run("extract", vit.bundle, "-m", member, "--format", "hf", "-o", sharded, "--max-shard-size", "20KB")
    assert_ok(result)

    files = sorted(os.listdir(sharded))
    shards = [f for f in files if f.endswith(".safetensors")]
    count = len(shards)
    assert count >= 3
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert (sharded / "config.json").read_bytes() == vit.config_files[member]

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    names, metas, tensors = shard_contents(sharded)
    with unipack.open(vit.bundle) as b:
        order = b.tensor_names
        expected = b.load(member)
    # Every tensor in exactly one shard, the index says which, and the bundle's order is kept.
    assert [n for shard in shards for n in names[shard]] == order
    assert index["weight_map"] == {n: shard for shard in shards for n in names[shard]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert all(bits_equal(tensors[k], expected[k]) for k in expected)
    assert all(m == {"format": "pt", "task": "task-0"} for m in metas.values())
    # Greedy: each shard is within the limit (or one oversized tensor), and the next shard's first
    # tensor would not have fitted.
    sizes = {shard: [expected[n].numel() * expected[n].element_size() for n in names[shard]] for shard in shards}
    for i, shard in enumerate(shards):
        assert sum(sizes[shard]) <= 20_000 or len(sizes[shard]) == 1
        if i + 1 < count:
            assert sum(sizes[shard]) + sizes[shards[i + 1]][0] > 20_000

    torch.testing.assert_close(
        logits(load_folder(vit, sharded), vit.inputs), logits(load_folder(vit, whole), vit.inputs), rtol=0, atol=0
    )


def test_bert_sharded_loads(bert: HFPopulation, tmp_path: Path) -> None:
    member = bert.names[2]
    with unipack.open(bert.bundle) as b:
        export = b.extract_hf(member, tmp_path / "out", max_shard_size="20KB")
    assert export.sharded and export.files[0] == "config.json" and export.files[-1] == "model.safetensors.index.json"
    torch.testing.assert_close(
        logits(load_folder(bert, export.directory), bert.inputs),
        logits(reconstructed(bert, member), bert.inputs),
        rtol=0,
        atol=1e-6,
    )


def test_plan_gives_oversized_tensors_their_own_shard() -> None:
    entries = [(n, "F32", (s // 4,), s) for n, s in [("a", 10), ("b", 10), ("c", 50), ("d", 5), ("e", 25), ("f", 5)]]
    plan = plan_shards(entries, 20)
    assert [[e[0] for e in shard] for shard in plan] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert [[e[0] for e in shard] for shard in plan_shards(entries, 10**9)] == [["a", "b", "c", "d", "e", "f"]]


def test_small_limit_with_real_model(vit: HFPopulation, tmp_path: Path) -> None:
    """At 4KB most weight matrices (8 KiB) exceed the limit: each gets a shard of its own."""
    with unipack.open(vit.bundle) as b:
        export = b.extract_hf(vit.names[0], tmp_path / "out", max_shard_size=4000)
    names, _, tensors = shard_contents(export.directory)
    for shard, keys in names.items():
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size <= 4000 or len(keys) == 1, (shard, keys, size)
    assert any(tensors[keys[0]].numel() * 4 > 4000 for keys in names.values())
    load_folder(vit, export.directory)


@pytest.mark.parametrize(
    "text, size",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("20KB", 20_000),
        ("5GiB", 5 * 2**30),
        ("123", 123),
        ("1.5gb", 1_500_000_000),
        (" 2 MiB ", 2 * 2**20),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5XB", "-1", "0", "", "GB", "1e9", "0.1"])
def test_bad_shard_size_cli(vit: HFPopulation, tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out"
    result = run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", "-o", out, "--max-shard-size", bad)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--max-shard-size'" in result.stderr and "Traceback" not in result.output
    assert ("not a size" in result.stderr) or ("at least 1 byte" in result.stderr)
    assert not out.exists()


@pytest.mark.parametrize("bad", ["5XB", -1, 0, True])
def test_bad_shard_size_api(vit: HFPopulation, tmp_path: Path, bad: Any) -> None:
    with unipack.open(vit.bundle) as b, pytest.raises(OptionsError, match="max_shard_size"):
        b.extract_hf(vit.names[0], tmp_path / "out", max_shard_size=bad)
    assert listing(tmp_path) == []


def test_shard_size_needs_format_hf(vit: HFPopulation, tmp_path: Path) -> None:
    result = run("extract", vit.bundle, "-m", vit.names[0], "-o", tmp_path / "x.safetensors", "--max-shard-size", "5GB")
    assert result.exit_code == 2 and "--format hf only" in result.stderr


# --------------------------------------------------------------------------------------------
# members without a config, --all, the default formats
# --------------------------------------------------------------------------------------------


def test_no_config_writes_weights_and_says_so(tmp_path: Path) -> None:
    pop = write_population(tmp_path / "in", small_specs(), n=2, metadata=False)
    bundle = tmp_path / "plain.upk"
    unipack.merge(pop.paths, bundle)
    out = tmp_path / "folder"
    result = run("extract", bundle, "-m", "ft0", "--format", "hf", "-o", out)
    assert_ok(result)
    assert MESSAGE.format("ft0") in result.stderr
    assert result.stderr.startswith("Warning: " + MESSAGE.format("ft0") + "\n")
    assert result.stdout.strip() == str(out)
    assert os.listdir(out) == ["model.safetensors"]
    _, metas, tensors = shard_contents(out)
    assert metas["model.safetensors"] == {"format": "pt"}  # transformers needs it even when the input had none
    with unipack.open(bundle) as b:
        expected = b.load("ft0")
        export = b.extract_hf("ft0", tmp_path / "api")
    assert all(bits_equal(tensors[k], expected[k]) for k in expected)
    assert not export.has_config and export.note == MESSAGE.format("ft0")


def test_all_writes_one_folder_per_member(vit: HFPopulation, tmp_path: Path) -> None:
    out = tmp_path / "all"
    result = run("extract", vit.bundle, "--all", "--format", "hf", "-o", out)
    assert_ok(result)
    assert sorted(os.listdir(out)) == sorted(vit.names)
    assert result.stdout.split() == [str(out / n) for n in vit.names]
    for member in vit.names:
        assert sorted(os.listdir(out / member)) == ["config.json", "model.safetensors"]
        assert (out / member / "config.json").read_bytes() == vit.config_files[member]
    model = load_folder(vit, out / vit.names[2])
    torch.testing.assert_close(
        logits(model, vit.inputs), logits(reconstructed(vit, vit.names[2]), vit.inputs), rtol=0, atol=1e-6
    )
    # A second run is refused as a whole before anything is written; --force replaces every folder.
    (out / vit.names[0] / "config.json").write_text("{}")
    again = run("extract", vit.bundle, "--all", "--format", "hf", "-o", out)
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert (out / vit.names[0] / "config.json").read_text() == "{}"
    assert_ok(run("extract", vit.bundle, "--all", "--format", "hf", "-o", out, "--force"))
    assert (out / vit.names[0] / "config.json").read_bytes() == vit.config_files[vit.names[0]]
    assert [p for p in os.listdir(out) if p.startswith(".")] == []


def test_default_format_is_unchanged(vit: HFPopulation, tmp_path: Path) -> None:
    assert_ok(run("extract", vit.bundle, "-m", vit.names[0], cwd=tmp_path))
    assert os.listdir(tmp_path) == [f"{vit.names[0]}.safetensors"]
    assert_ok(run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", cwd=tmp_path))
    assert sorted(os.listdir(tmp_path / vit.names[0])) == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------------------------
# existing outputs, failures
# --------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_existing_folder_refused_without_force(vit: HFPopulation, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("mine")
    before = _snapshot(out)
    result = run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", "-o", out)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "already exists" in result.stderr and "--force" in result.stderr
    assert _snapshot(out) == before
    assert listing(tmp_path) == ["out"]
    # --force replaces the folder as a whole, and only once the new one is complete.
    assert_ok(run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", "-o", out, "--force"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]


def test_force_refuses_folders_it_must_not_replace(vit: HFPopulation, tmp_path: Path) -> None:
    nested = tmp_path / "run"
    (nested / "checkpoint-500").mkdir(parents=True)
    with unipack.open(vit.bundle) as b:
        with pytest.raises(OutputExistsError, match="subfolders"):
            b.extract_hf(vit.names[0], nested, force=True)
        assert os.listdir(nested) == ["checkpoint-500"]
        with pytest.raises(OutputExistsError, match="bundle"):
            b.extract_hf(vit.names[0], vit.bundle.parent, force=True)  # would delete the bundle
        with pytest.raises(OutputExistsError, match="bundle"):
            b.extract_hf(vit.names[0], vit.bundle, force=True)
        (tmp_path / "file").write_text("x")
        with pytest.raises(OutputExistsError, match="not a directory"):
            b.extract_hf(vit.names[0], tmp_path / "file", force=True)
        (tmp_path / "link").symlink_to(nested)
        with pytest.raises(OutputExistsError, match="not a directory"):
            b.extract_hf(vit.names[0], tmp_path / "link", force=True)
        with pytest.raises(UnipackError, match="cannot create directory"):
            b.extract_hf(vit.names[0], tmp_path / "file" / "out")  # a file stands where a parent must go
        made = b.extract_hf(vit.names[0], tmp_path / "missing" / "parents" / "out")  # created like mkdir -p
        assert made.directory.is_dir() and (made.directory / "config.json").is_file()
    cwd = tmp_path / "here"
    cwd.mkdir()
    result = run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", "-o", ".", "--force", cwd=cwd)
    assert result.exit_code == 1 and "current directory" in result.stderr
    assert os.listdir(cwd) == []


def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int, exc: BaseException) -> None:
    """Make the ``calls``-th tensor write (bytes for a shard) raise ``exc``."""
    real = hf_folder.dtypes.to_bytes
    seen = {"n": 0}

    def to_bytes(array: Any, dtype: str) -> bytes:
        seen["n"] += 1
        if seen["n"] >= calls:
            raise exc
        return real(array, dtype)

    monkeypatch.setattr(hf_folder.dtypes, "to_bytes", to_bytes)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(
    vit: HFPopulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    out = tmp_path / "out"
    _fail_after(monkeypatch, 12, exc)  # a few shards are complete by then
    with (
        unipack.open(vit.bundle) as b,
        pytest.raises(
            UnipackError if isinstance(exc, OSError) else KeyboardInterrupt,
            match="write failed" if isinstance(exc, OSError) else None,
        ),
    ):
        b.extract_hf(vit.names[0], out, max_shard_size="20KB")
    assert os.listdir(tmp_path) == []  # no folder, no temp folder


def test_failure_with_force_keeps_the_old_folder(
    vit: HFPopulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_bytes(b"old weights")
    before = _snapshot(out)
    _fail_after(monkeypatch, 5, OSError(errno.EIO, "Input/output error"))
    result = run("extract", vit.bundle, "-m", vit.names[0], "--format", "hf", "-o", out, "--force")
    assert result.exit_code == 1 and "write failed" in result.stderr and "intact" in result.stderr
    assert _snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_failed_final_rename_puts_the_old_folder_back(
    vit: HFPopulation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    before = _snapshot(out)
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if str(src).endswith(".tmp"):  # the new folder's rename into place
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with unipack.open(vit.bundle) as b, pytest.raises(UnipackError, match="write failed"):
        b.extract_hf(vit.names[0], out, force=True)
    assert _snapshot(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_unknown_member(vit: HFPopulation, tmp_path: Path) -> None:
    result = run("extract", vit.bundle, "-m", "nope", "--format", "hf", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "no member 'nope'" in result.stderr
    assert os.listdir(tmp_path) == []


def test_folders_in_folders_out(vit: HFPopulation, tmp_path: Path) -> None:
    """The whole Hugging Face round trip: members saved with ``save_pretrained`` (one of them
    sharded; the checkpoint's own key names, which transformers may rename on load) are merged as
    folders, configs come along by themselves, and each folder extracted from a lossless bundle
    loads with ``from_pretrained`` to exactly the logits of the original folder."""
    folders = []
    for i, name in enumerate(vit.names):
        folder = tmp_path / "in" / name
        vit.models[name].save_pretrained(folder, safe_serialization=True, max_shard_size="20KB" if i == 0 else "5GB")
        folders.append(folder)
    assert (folders[0] / "model.safetensors.index.json").is_file()  # really sharded
    bundle = tmp_path / "from-folders.upk"
    unipack.merge(folders, bundle, max_error=0.0)
    with unipack.open(bundle) as b:
        assert b.members == vit.names  # named after the folders
        for name in vit.names:
            assert (
                b.member(name).configs["config.json"].encode("utf-8")
                == (tmp_path / "in" / name / "config.json").read_bytes()
            )
    (tmp_path / "out").mkdir()
    for name, folder in zip(vit.names, folders):
        out = tmp_path / "out" / name
        assert_ok(run("extract", bundle, "--member", name, "--format", "hf", "-o", out))
        assert torch.equal(logits(load_folder(vit, out), vit.inputs), logits(load_folder(vit, folder), vit.inputs))
