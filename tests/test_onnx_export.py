"""``unipack export --onnx`` and ``Bundle.to_module``: members as torch modules and as ONNX models.

Populations of tiny real Hugging Face models (ViT and BERT, heads of 2/3/4 labels stored raw) are
built here (no downloads), saved with safetensors, merged, and given their config.json the way a
Hugging Face folder input records it. Every member is exported through the CLI, and the written
file is checked independently: ONNX Runtime on it against a transformers model that this test
builds itself and loads with ``bundle.load(member)``, and the numbers the CLI printed against
the ones recomputed that way.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file, save_model

import unipack
import unipack.cli
from unipack.export import onnx as onnx_export
from unipack.export.torch_module import build_module
from unipack.format.container import rewrite_bundle

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

LABELS = (2, 3, 4)  # a different head per member: stored raw (raw_mismatched)
ATOL = 1e-4
RUN_LINE = re.compile(r"^  (batch \d+(?:, sequence \d+)?)\s+max abs diff (\S+), max rel diff (\S+)$", re.MULTILINE)


def vit(num_labels: int) -> Any:
    return transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=num_labels,
        )
    )


def bert(num_labels: int) -> Any:
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=num_labels,
        )
    )


BUILDERS = {"vit": vit, "bert": bert}


def attach_configs(bundle: Path, configs: dict[str, str]) -> None:
    """Record each member's config.json text in its MemberRecord, as a Hugging Face folder input would."""

    def update(manifest: Any, writer: Any) -> Any:
        members = tuple(
            dataclasses.replace(m, configs={"config.json": configs[m.name]}) if m.name in configs else m
            for m in manifest.members
        )
        return dataclasses.replace(manifest, members=members, blobs=writer.blobs)

    rewrite_bundle(bundle, update, force=True)


def hf_population(directory: Path, models: list[tuple[str, Any]]) -> Path:
    """``models`` saved as safetensors, merged (differing heads raw) and given their configs."""
    directory.mkdir(parents=True)
    paths, configs = [], {}
    for name, model in models:
        path = directory / f"{name}.safetensors"
        save_model(model, str(path))  # drops tied duplicates, as Hugging Face checkpoints do
        model.config.architectures = [type(model).__name__]
        configs[name] = model.config.to_json_string()
        paths.append(path)
    out = directory / "bundle.upk"
    unipack.merge(paths, out, raw_mismatched=True)
    attach_configs(out, configs)
    return out


@pytest.fixture(scope="module", params=["vit", "bert"])
def population(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind = request.param
    torch.manual_seed(0)
    base = BUILDERS[kind](LABELS[0]).state_dict()
    models = []
    for labels in LABELS:  # fine-tunes of one base: shared backbone + small deltas, own heads
        model = BUILDERS[kind](labels)
        model.load_state_dict(
            {
                k: v + 0.01 * torch.randn_like(v)
                if v.is_floating_point() and model.state_dict()[k].shape == v.shape
                else model.state_dict()[k]
                for k, v in base.items()
            }
        )
        models.append((f"{kind}-{labels}", model))
    return kind, hf_population(tmp_path_factory.mktemp(kind) / "population", models)


MLP_FACTORY = """
import torch


def build(state_dict, member_name):
    hidden = state_dict["0.weight"].shape[0]
    module = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
    return module, torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


def raises(state_dict, member_name):
    raise RuntimeError("no architecture for " + member_name)


def wrong_type(state_dict, member_name):
    return "a module"


def wrong_inputs(state_dict, member_name):
    return torch.nn.Linear(8, 4), [1, 2, 3]


def wrong_keys(state_dict, member_name):
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), torch.randn(1, 8)
"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain ``torch.nn.Sequential`` population (no config.json) and tests_factory.py beside it."""
    directory = tmp_path_factory.mktemp("mlp")
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict()
    paths = []
    for i in range(3):
        path = directory / f"mlp-{i}.safetensors"
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(path))
        paths.append(path)
    unipack.merge(paths, directory / "mlp.upk")
    (directory / "tests_factory.py").write_text(textwrap.dedent(MLP_FACTORY))
    return directory


def invoke(*args: str) -> Result:
    return CliRunner().invoke(unipack.cli.cli, list(args))


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def reference_model(kind: str, bundle: unipack.Bundle, member: str) -> Any:
    """The member as transformers itself builds it: this test's class, the bundle's weights."""
    state = bundle.load(member)
    model = BUILDERS[kind](int(member.rsplit("-", 1)[1]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def ort_vs(session: Any, model: Any, inputs: dict[str, torch.Tensor]) -> float:
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = model(**inputs).logits.numpy()
    assert len(got) == 1 and got[0].shape == want.shape
    return float(np.max(np.abs(got[0].astype(np.float64) - want.astype(np.float64))))


# ------------------------------------------------------------------------------------------
# Hugging Face members
# ------------------------------------------------------------------------------------------


def test_every_member_exports_and_matches_transformers(population: tuple[str, Path], tmp_path: Path) -> None:
    """The CLI for all members but the last, the API for the last; every file checked independently."""
    kind, path = population
    with unipack.open(path) as bundle:
        assert len(bundle.members) == len(LABELS)
        for member in bundle.members:
            out = tmp_path / f"{member}.onnx"
            if member != bundle.members[-1]:
                result = invoke("export", str(path), "--member", member, "--onnx", str(out))
                assert result.exit_code == 0, (result.output, result.exception)
                assert "CPUExecutionProvider" in result.output and "PASS" in result.output
                printed = [(label, float(a), float(r)) for label, a, r in RUN_LINE.findall(result.output)]
            else:
                check = bundle.export_onnx(member, out)
                assert check.passed and check.provider == "CPUExecutionProvider" and check.outputs == ("logits",)
                assert check.files == (out,) and check.path == out and check.member == member
                assert check.max_abs_diff == max(r.max_abs_diff for r in check.runs) <= ATOL
                assert check.max_rel_diff == max(r.max_rel_diff for r in check.runs)
                assert check.source == "transformers " + type(BUILDERS[kind](2)).__name__
                printed = [(r.inputs, r.max_abs_diff, r.max_rel_diff) for r in check.runs]
            assert [p[0].split(",")[0] for p in printed] == ["batch 1", "batch 3"], printed
            if kind == "bert":
                assert [p[0] for p in printed] == ["batch 1, sequence 16", "batch 3, sequence 10"]

            # Independently: ONNX Runtime on the file vs transformers' own model with the bundle's weights.
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # a dynamic batch axis
            reference = reference_model(kind, bundle, member)
            built = build_module(bundle, member)
            for (label, abs_diff, rel_diff), inputs in zip(printed, (built.example, built.probe)):
                diff = ort_vs(session, reference, inputs.kwargs)
                assert diff <= ATOL
                assert abs_diff == pytest.approx(diff, rel=1e-2, abs=1e-15), label
                assert 0 <= rel_diff <= 1e-3
            g = torch.Generator().manual_seed(7)  # inputs unipack never saw: batch 2, another length
            if kind == "vit":
                fresh = {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
            else:
                fresh = {
                    "input_ids": torch.randint(0, 100, (2, 7), generator=g),
                    "attention_mask": torch.ones(2, 7, dtype=torch.long),
                }
            assert ort_vs(session, reference, fresh) <= ATOL
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{m}.onnx" for m in bundle.members)


def test_to_module_equals_transformers(population: tuple[str, Path]) -> None:
    kind, path = population
    with unipack.open(path) as bundle:
        for member in (bundle.members[0], bundle.members[-1]):  # two different head sizes
            module = bundle.to_module(member)
            assert not module.training
            reference = reference_model(kind, bundle, member)
            built = build_module(bundle, member)
            with torch.no_grad():
                for inputs in (built.example, built.probe):
                    assert torch.equal(module(**inputs.kwargs).logits, reference(**inputs.kwargs).logits)


def test_tied_weights_missing_from_the_file_are_allowed(tmp_path: Path) -> None:
    """BertForMaskedLM ties its decoder to the embeddings; safetensors stores that tensor once."""
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(3)
    models = [(f"mlm-{i}", transformers.BertForMaskedLM(config)) for i in range(2)]
    path = hf_population(tmp_path / "mlm", models)
    with unipack.open(path) as bundle:
        state = bundle.load("mlm-1")
        assert "cls.predictions.decoder.weight" not in state  # the file really lacks the tied key
        module = bundle.to_module("mlm-1")
        reference = transformers.BertForMaskedLM(config)
        reference.load_state_dict(state, strict=False)
        reference.eval()
    assert module.cls.predictions.decoder.weight is module.bert.embeddings.word_embeddings.weight
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(module(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_unknown_model_type_is_one_line(tmp_path: Path, mlp: Path) -> None:
    path = tmp_path / "odd.upk"
    path.write_bytes((mlp / "mlp.upk").read_bytes())
    attach_configs(
        path, {"mlp-0": '{"model_type": "no-such-model", "architectures": ["NoSuchModel"]}', "mlp-1": "{not json"}
    )
    with unipack.open(path) as bundle:
        with pytest.raises(unipack.ModelError, match="model_type 'no-such-model'.*--model module:function"):
            bundle.to_module("mlp-0")
        with pytest.raises(unipack.ModelError, match="config.json is not valid JSON"):
            bundle.to_module("mlp-1")


def test_missing_transformers_says_what_to_install(
    population: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = population
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with (
        unipack.open(path) as bundle,
        pytest.raises(
            unipack.UnipackError,
            match=r"needs transformers: pip "
            r"install 'unipack\[hf\]'",
        ),
    ):
        bundle.to_module(bundle.members[0])


# ------------------------------------------------------------------------------------------
# user factories (--model)
# ------------------------------------------------------------------------------------------


def assert_ort_matches_mlp(onnx_path: str, state: dict[str, torch.Tensor]) -> None:
    """ONNX Runtime on ``onnx_path`` against ``MLP_FACTORY``'s module with the weights ``state``,
    built here, on random inputs."""
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    reference.load_state_dict(state)
    x = torch.randn(5, 8)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.max(np.abs(got - reference(x).numpy())) <= ATOL


def test_factory_module_exports(mlp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mlp)
    result = invoke(
        "export", "mlp.upk", "--member", "mlp-1", "--onnx", "mlp-1.onnx", "--model", "tests_factory.py:build"
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "PASS" in result.output and "(Sequential)" in result.output
    assert [p[0] for p in RUN_LINE.findall(result.output)] == ["batch 2", "batch 3"]
    # ONNX Runtime on the file vs the original weights in a module this test builds
    with unipack.open("mlp.upk") as bundle:
        state = bundle.load("mlp-1")
    assert_ort_matches_mlp("mlp-1.onnx", state)


def test_a_member_of_a_base_referencing_bundle_exports_with_its_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export --onnx --base``: for a bundle merged with --base, the base it references (spec §11)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests_factory.py").write_text(textwrap.dedent(MLP_FACTORY))
    g = torch.Generator().manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).state_dict()
    save_file(base, "base.safetensors")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"mlp-{i}.safetensors")
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(paths[-1]))
    unipack.merge(paths, "b.upk", base="base.safetensors")
    args = ["export", "b.upk", "--member", "mlp-1", "--onnx", "m.onnx", "--model", "tests_factory.py:build"]
    assert "--base PATH" in one_error_line(invoke(*args))
    result = invoke(*args, "--base", "base.safetensors")
    assert result.exit_code == 0, (result.output, result.exception)
    with unipack.open("b.upk", base="base.safetensors") as bundle:
        assert bundle.manifest.base is not None
        state = bundle.load("mlp-1")
    assert_ort_matches_mlp("m.onnx", state)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("raises", r"model tests_factory.py:raises: RuntimeError: no architecture for mlp-0 \(member 'mlp-0'\)"),
        ("wrong_type", r"returned str, expected \(torch.nn.Module, example_inputs\)"),
        ("wrong_inputs", r"returned list as the example input, expected a tensor, a tuple of tensors or a dict"),
        (
            "wrong_keys",
            (
                r"member 'mlp-0' does not fit model tests_factory.py:wrong_keys \(Sequential\): "
                r"2 missing \(1.weight, 1.bias\); 2 unexpected \(2.(weight|bias), 2.(weight|bias)\)"
            ),
        ),
        ("nothing", r"model tests_factory.py:nothing: .*has no function 'nothing' \(it defines build, raises"),
    ],
)
def test_factory_errors_are_one_line(mlp: Path, monkeypatch: pytest.MonkeyPatch, function: str, expected: str) -> None:
    monkeypatch.chdir(mlp)
    result = invoke(
        "export", "mlp.upk", "--member", "mlp-0", "--onnx", "x.onnx", "--model", f"tests_factory.py:{function}"
    )
    assert re.search(expected, one_error_line(result)), result.output
    assert not (mlp / "x.onnx").exists()


def test_no_config_and_no_model(mlp: Path, tmp_path: Path) -> None:
    result = invoke("export", str(mlp / "mlp.upk"), "--member", "mlp-2", "--onnx", str(tmp_path / "x.onnx"))
    assert one_error_line(result) == (
        "Error: member 'mlp-2' has no Hugging Face config.json: give --model "
        "module:function (a factory returning the module and an example input)"
    )


def test_tolerance_failure_keeps_the_file_and_prints_numbers(
    mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = onnx_export._run

    def off_by_one(*args: Any) -> list[np.ndarray]:
        return [a + 1.0 for a in real_run(*args)]

    monkeypatch.setattr(onnx_export, "_run", off_by_one)
    out = tmp_path / "bad.onnx"
    result = invoke(
        "export",
        str(mlp / "mlp.upk"),
        "--member",
        "mlp-0",
        "--onnx",
        str(out),
        "--model",
        str(mlp / "tests_factory.py"),
    )  # the default function: build
    line = one_error_line(result)
    assert "differ from torch's by 1 (max abs diff; max rel diff" in line and "> atol 0.0001" in line
    assert "the file was kept" in line
    assert "FAIL: max abs diff 1 > atol 0.0001" in result.output
    assert [p[1] for p in RUN_LINE.findall(result.output)] == ["1", "1"]
    assert out.is_file()
    with pytest.raises(unipack.OnnxCheckError) as info, unipack.open(mlp / "mlp.upk") as bundle:
        bundle.export_onnx("mlp-0", out, model=str(mlp / "tests_factory.py"), force=True)
    assert info.value.check.max_abs_diff == pytest.approx(1.0) and not info.value.check.passed


def test_external_data(mlp: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(mlp))
    try:
        import tests_factory  # the same factory, passed as a callable
    finally:
        sys.path.remove(str(mlp))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "mlp.onnx"
    with unipack.open(mlp / "mlp.upk") as bundle:
        check = onnx_export.export_onnx(bundle, "mlp-2", out, model=tests_factory.build, external_data_threshold=0)
    data = out_dir / "mlp.onnx.data"
    assert check.passed and check.files == (out, data)
    assert sorted(p.name for p in out_dir.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"mlp.onnx.data"}
    assert data.stat().st_size >= 8 * 16 * 4  # at least the first layer's weight (tiny tensors stay inline)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # finds the data beside it
    assert session.run(None, {session.get_inputs()[0].name: np.zeros((4, 8), np.float32)})[0].shape == (4, 4)
    with unipack.open(mlp / "mlp.upk") as bundle, pytest.raises(unipack.OutputExistsError):
        bundle.export_onnx("mlp-2", out, model=tests_factory.build)


def test_missing_onnx_extras_say_what_to_install(mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = invoke("export", str(mlp / "mlp.upk"), "--member", "mlp-0", "--onnx", str(tmp_path / "x.onnx"))
    assert one_error_line(result) == (
        "Error: ONNX export needs onnx and onnxruntime (missing: onnxruntime): pip install 'unipack[onnx]'"
    )


def test_existing_output_is_refused_before_any_work(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    result = invoke("export", str(mlp / "mlp.upk"), "--member", "mlp-0", "--onnx", str(out))
    assert "already exists; pass --force" in one_error_line(result)
    assert out.read_bytes() == b"keep me"


def test_torch_is_not_imported_by_the_cli_at_start() -> None:
    import subprocess

    code = (
        "import sys, unipack.cli; print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_members_merged_from_save_pretrained_folders(tmp_path: Path) -> None:
    """Folders written by ``save_pretrained`` keep the checkpoint's key layout, which transformers
    may rename on load (v5 does for ViT): to_module then goes through ``from_pretrained`` and gives
    exactly the original folder's model, and the ONNX export passes."""
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    folders = []
    for i in range(2):
        torch.manual_seed(10 + i)
        transformers.ViTForImageClassification(config).save_pretrained(tmp_path / f"m{i}")
        folders.append(tmp_path / f"m{i}")
    unipack.merge(folders, tmp_path / "b.upk", max_error=0.0)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with unipack.open(tmp_path / "b.upk") as b:
        module = b.to_module("m1")
        check = b.export_onnx("m1", tmp_path / "m1.onnx")
    reference = transformers.ViTForImageClassification.from_pretrained(folders[1]).eval()
    with torch.no_grad():
        assert torch.equal(module(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)
    assert check.passed and check.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m1.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, reference(pixel_values=pixels).logits.numpy(), atol=1e-4, rtol=0)
