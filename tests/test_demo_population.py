"""Tests for the built-in demo population (unipack.demo), using its fast ``small=True`` variant."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from unipack.demo import Member, build_population, default_cache_dir, evaluate  # noqa: E402
from unipack.demo.evaluate import accuracy_of  # noqa: E402
from unipack.demo.model import TinyViTConfig, build_model, config_from_state_dict, count_parameters  # noqa: E402
from unipack.demo.tasks import TASKS, require_sklearn, task_for_member  # noqa: E402


def _hf_vit_names(num_layers: int) -> set[str]:
    """The tensor names of Hugging Face ``ViTForImageClassification`` (no pooler), written out."""
    names = {
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.embeddings.patch_embeddings.projection.bias",
        "vit.layernorm.weight",
        "vit.layernorm.bias",
        "classifier.weight",
        "classifier.bias",
    }
    per_layer = [
        "layernorm_before",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "layernorm_after",
    ]
    for i in range(num_layers):
        for module in per_layer:
            names |= {f"vit.encoder.layer.{i}.{module}.weight", f"vit.encoder.layer.{i}.{module}.bias"}
    return names


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Member]]:
    cache = tmp_path_factory.mktemp("demo-cache")
    members = build_population(cache, small=True)
    return cache, members


def test_members_are_loadable_safetensors_with_metadata(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    assert len(members) >= 4
    assert len({m.name for m in members}) == len(members)
    # the population folder holds exactly the members (the base model sits in a subfolder)
    assert sorted(members[0].path.parent.glob("*.safetensors")) == sorted(m.path for m in members)
    for member in members:
        assert member.path.is_file() and member.path.suffix == ".safetensors"
        assert member.path.stem == member.name == member.task.member_name
        assert all(c.isalnum() or c in "-_" for c in member.name)
        state_dict = load_file(member.path)
        assert all(t.dtype == torch.float32 for t in state_dict.values())
        meta = _metadata(member.path)
        assert meta["task"] == member.task.name
        assert meta["num_labels"] == str(member.task.num_labels)
        assert meta["description"]


def test_keys_are_hugging_face_vit_names(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    for member in members:
        state_dict = load_file(member.path)
        layers = config_from_state_dict(state_dict).num_hidden_layers
        assert set(state_dict) == _hf_vit_names(layers)


def test_only_classifier_shapes_differ_between_tasks(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    shapes = [{k: tuple(v.shape) for k, v in load_file(m.path).items()} for m in members]
    head_rows = {m.task.num_labels: s["classifier.weight"][0] for m, s in zip(members, shapes)}
    assert len(head_rows) >= 3, "the small population should mix class counts"
    for member, member_shapes in zip(members, shapes):
        assert member_shapes["classifier.weight"][0] == member.task.num_labels
        assert member_shapes["classifier.bias"] == (member.task.num_labels,)
        body = {k: v for k, v in member_shapes.items() if not k.startswith("classifier.")}
        assert body == {k: v for k, v in shapes[0].items() if not k.startswith("classifier.")}


def test_members_genuinely_differ(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    a, b = (load_file(m.path) for m in members[:2])
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(a[key], b[key])


def test_each_member_beats_chance_on_its_task(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    for member in members:
        accuracy = evaluate(load_file(member.path), member.name)["accuracy"]
        chance = max(100.0 / member.task.num_labels, member.task.majority_rate("test"))
        assert 0.0 <= accuracy <= 100.0
        assert accuracy > chance + 20.0, f"{member.name}: {accuracy:.1f}% vs chance {chance:.1f}%"
        # the convenience wrapper reads the file itself and agrees
        assert accuracy_of(member.path, member.name) == pytest.approx(accuracy)


def test_evaluate_accepts_other_float_dtypes(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    member = members[0]
    state_dict = load_file(member.path)
    full = evaluate(state_dict, member.name)["accuracy"]
    half = evaluate({k: v.to(torch.float16) for k, v in state_dict.items()}, member.name)["accuracy"]
    assert abs(full - half) <= 2.0


def test_evaluate_rejects_unknown_member_and_mismatched_head(population: tuple[Path, list[Member]]) -> None:
    _, members = population
    state_dict = load_file(members[0].path)
    with pytest.raises(ValueError, match="unknown demo member"):
        evaluate(state_dict, "vit-digits-no-such-task")
    other = next(m for m in members if m.task.num_labels != members[0].task.num_labels)
    with pytest.raises(ValueError, match="classifier has"):
        evaluate(state_dict, other.name)


def test_second_build_uses_the_cache(population: tuple[Path, list[Member]]) -> None:
    cache, members = population
    before = {m.path: (m.path.stat().st_mtime_ns, m.path.read_bytes()) for m in members}
    messages: list[str] = []
    started = time.perf_counter()
    again = build_population(cache, small=True, log=messages.append)
    assert time.perf_counter() - started < 2.0
    assert again == members
    assert {m.path: (m.path.stat().st_mtime_ns, m.path.read_bytes()) for m in again} == before
    assert any("using cache" in message for message in messages)


def test_damaged_cache_is_rebuilt_identically(population: tuple[Path, list[Member]], tmp_path: Path) -> None:
    """A cache whose files do not match done.json is not trusted; retraining is deterministic."""
    cache, members = population
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (directory,) = copy.glob("population-*")
    victim = directory / members[1].path.name
    # clone: loaded tensors may be backed by the file mapping, which the damage below rewrites
    original_tensors = {k: v.clone() for k, v in load_file(victim).items()}
    original_meta = _metadata(victim)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # as if a write had been cut short

    messages: list[str] = []
    rebuilt = build_population(copy, small=True, log=messages.append)
    assert not any("using cache" in message for message in messages)
    # Same code, same seeds: the same weights. (Not necessarily the same bytes: safetensors
    # writes the metadata entries in hash-map order, which varies from run to run.)
    tensors = load_file(victim)
    assert set(tensors) == set(original_tensors)
    assert all(torch.equal(tensors[k], original_tensors[k]) for k in tensors)
    assert _metadata(victim) == original_meta
    assert [m.name for m in rebuilt] == [m.name for m in members]
    assert not list(directory.glob(".*.tmp")), "temporary files must not be left behind"
    done = json.loads((directory / "done.json").read_text())
    assert set(done["accuracy"]) == {m.name for m in members}


def test_task_table() -> None:
    assert len(TASKS) >= 12
    assert len({t.name for t in TASKS}) == len(TASKS)
    assert len({t.num_labels for t in TASKS}) >= 4
    parity = task_for_member("vit-digits-parity")
    assert parity.num_labels == 2 and task_for_member("parity") is parity
    x_train, y_train = parity.data("train")
    x_test, y_test = parity.data("test")
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == torch.float32
    assert len(x_train) + len(x_test) == 1797
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    assert set(y_test.tolist()) == {0, 1}
    # a restricted subset keeps only its digits
    x_sub, y_sub = task_for_member("vit-digits-one-vs-seven").data("test")
    assert len(x_sub) < len(x_test) and set(y_sub.tolist()) == {0, 1}


def test_default_model_matches_the_brief() -> None:
    torch.manual_seed(0)
    model = build_model(TinyViTConfig())
    assert 130_000 <= count_parameters(model) <= 250_000
    assert set(model.state_dict()) == _hf_vit_names(4)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert config_from_state_dict(model.state_dict()) == TinyViTConfig()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIPACK_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UNIPACK_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "unipack" / "demo"


def test_missing_sklearn_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(ImportError, match=r"pip install 'unipack\[demo\]'"):
        require_sklearn()
