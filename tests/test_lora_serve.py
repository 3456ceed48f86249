"""Serving a LoRA bundle without PEFT: ``extract --format hf --base`` and ``export --onnx --base``.

A tiny real BERT classifier (hidden 32, 2 layers) is built by transformers from a config (nothing
is downloaded) and saved with ``save_pretrained``; peft makes three LoRA adapters on it (random
non-zero factors, different r and lora_alpha, one with rsLoRA, the classifier in
``modules_to_save`` with its own random weights), and unipack merges them at its default rule.
Every folded folder is checked against an independent computation: W + s·B·A in float64 from the
factors ``extract --format peft`` gives back (s from that folder's adapter_config.json), the
adapter's classifier in place of the base's, every other tensor the base's bit for bit; and
transformers' model loaded from it scores what ``PeftModel.from_pretrained`` scores on the base
with the extracted adapter.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import assert_one_line_error, run
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import unipack
from unipack.errors import InputError, ModelError, OptionsError, OutputExistsError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
TARGETS = ["query", "value", "dense"]
#: The three adapters: (r, lora_alpha, use_rslora).
ADAPTERS = {"cola": (4, 8, False), "sst": (8, 4, False), "mrpc": (2, 3, True)}
IDS = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(5))
MASK = torch.ones(3, 12, dtype=torch.long)
MASK[2, 7:] = 0


def bert_config(**overrides: Any) -> Any:
    sizes = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 64,
        "num_labels": 3,
        **overrides,
    }
    return transformers.BertConfig(**sizes)


def save_base(folder: Path, seed: int = 0, dtype: torch.dtype | None = None, **overrides: Any) -> Path:
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(bert_config(**overrides)).eval()
    if dtype is not None:
        model = model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def load_base(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForSequenceClassification.from_pretrained(folder).eval()


def logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.double().numpy()


def peft_logits(base: Path, adapter: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(load_base(base), str(adapter)).eval()
    return logits(model)


def assert_usage_error(result: Result, words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output


def rel(want: np.ndarray, got: np.ndarray) -> float:
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    assert want.shape == got.shape
    return float(np.linalg.norm(want - got) / np.linalg.norm(want))


# --------------------------------------------------------------------------------------------
# the population, once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base folder, three peft-made adapters on it, and their bundle (default rule)."""
    root = tmp_path_factory.mktemp("serve")
    base = save_base(root / "base")
    folders = []
    for i, (name, (r, alpha, rslora)) in enumerate(ADAPTERS.items()):
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=TARGETS,
            modules_to_save=["classifier"],
            init_lora_weights=False,  # random, non-zero lora_B: every update really changes the model
        )
        torch.manual_seed(100 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(load_base(base), cfg).eval()
            head = model.base_model.model.classifier.modules_to_save["default"]
            with torch.no_grad():  # a trained head of its own, unlike the base's
                head.weight.normal_(0.0, 1.0)
                head.bias.normal_(0.0, 1.0)
            model.save_pretrained(str(root / name))
        folders.append(root / name)
    bundle = root / "loras.upk"
    unipack.merge(folders, bundle)
    extracted = {}
    with unipack.open(bundle) as b:
        for name in ADAPTERS:
            b.extract_peft(name, root / "peft" / name)
            extracted[name] = root / "peft" / name
    return {"root": root, "base": base, "bundle": bundle, "adapters": folders, "extracted": extracted}


def expected_folded(base: Path, adapter: Path) -> tuple[dict[str, np.ndarray], set[str]]:
    """W + s·B·A in float64 from a PEFT folder's own factors and config, the adapter's own tensors
    in place of the base's; and the names of the tensors the adapter changes."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    factors = load_numpy(str(adapter / "adapter_model.safetensors"))
    weights = {k: v.astype(np.float64) for k, v in load_numpy(str(base / "model.safetensors")).items()}
    changed = set()
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = factors[f"{module}.lora_B.weight"]
        r = a.shape[0]
        s = config["lora_alpha"] / (math.sqrt(r) if config["use_rslora"] else r)
        target = module.removeprefix(PREFIX) + ".weight"
        weights[target] = weights[target] + s * (b.astype(np.float64) @ a.astype(np.float64))
        changed.add(target)
    for key, value in factors.items():
        if ".lora_" not in key:
            weights[key.removeprefix(PREFIX)] = value.astype(np.float64)
            changed.add(key.removeprefix(PREFIX))
    return weights, changed


# --------------------------------------------------------------------------------------------
# the folded folders: numbers and scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", list(ADAPTERS))
def test_folded_weights_are_w_plus_sba_of_the_extracted_adapter(lab, member, tmp_path) -> None:
    with unipack.open(lab["bundle"]) as b:
        done = b.extract_hf(member, tmp_path / "folded", base=lab["base"])
    assert done.files == ("config.json", "model.safetensors") and not done.sharded and done.base == lab["base"]
    assert (tmp_path / "folded" / "config.json").read_bytes() == (lab["base"] / "config.json").read_bytes()
    folded = load_numpy(str(tmp_path / "folded" / "model.safetensors"))
    base = load_numpy(str(lab["base"] / "model.safetensors"))
    want, changed = expected_folded(lab["base"], lab["extracted"][member])
    assert list(folded) == list(base)  # the base's tensors, in its order
    # query, value and the four dense layers of both blocks (pooler included), and the head
    assert len(changed) == 2 * 4 + 2 + 1 + 2, sorted(changed)
    for key, value in folded.items():
        assert value.dtype == base[key].dtype and value.shape == base[key].shape, key
        if key in changed:
            assert rel(want[key], value) <= 1e-6, (key, rel(want[key], value))
            assert np.max(np.abs(value - base[key])) > 1e-2, key  # the adapter really changed it
        else:
            assert np.array_equal(value, base[key]), key


@pytest.mark.parametrize("member", list(ADAPTERS))
def test_folded_model_scores_what_peft_scores(lab, member, tmp_path) -> None:
    with unipack.open(lab["bundle"]) as b:
        b.extract_hf(member, tmp_path / "folded", base=lab["base"])
    got = logits(load_base(tmp_path / "folded"))
    want = peft_logits(lab["base"], lab["extracted"][member])
    assert np.max(np.abs(got - want)) <= 1e-5, np.max(np.abs(got - want))
    assert np.max(np.abs(want - logits(load_base(lab["base"])))) > 0.1  # not the base's scores


def test_cli_extract_base_matches_the_api_and_shards(lab, tmp_path) -> None:
    with unipack.open(lab["bundle"]) as b:
        b.extract_hf("sst", tmp_path / "api", base=lab["base"])
    result = run("extract", lab["bundle"], "-m", "sst", "--format", "hf", "--base", lab["base"], "-o", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    assert "folded into" in result.output
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    # --json names the base; --max-shard-size shards the folded weights like any hf extract
    result = run(
        "extract", lab["bundle"], "-m", "sst", "--format", "hf", "--base", lab["base"],
        "-o", tmp_path / "shards", "--max-shard-size", "20KB", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (record,) = doc["extracted"]
    assert record["base"] == str(lab["base"]) and record["sharded"] is True
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_array_equal(logits(load_base(tmp_path / "shards")), logits(load_base(tmp_path / "api")))


def test_sharded_base_and_extract_all(lab, tmp_path) -> None:
    sharded = tmp_path / "sharded-base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_base(lab["base"]).save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").exists()
    result = run("extract", lab["bundle"], "--all", "--format", "hf", "--base", sharded, "-o", tmp_path / "all")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(ADAPTERS)
    for member in ADAPTERS:
        got = logits(load_base(tmp_path / "all" / member))
        want = peft_logits(lab["base"], lab["extracted"][member])
        assert np.max(np.abs(got - want)) <= 1e-5, member


def test_bf16_base_is_folded_in_float64_and_rounded_once(lab, tmp_path) -> None:
    base16 = save_base(tmp_path / "base16", dtype=torch.bfloat16)
    with unipack.open(lab["bundle"]) as b:
        b.extract_hf("cola", tmp_path / "folded", base=base16)
    with unipack.open(lab["bundle"]) as b:
        updates = {k: v.double() for k, v in b.load("cola", lora="updates").items()}
    import safetensors.torch

    folded = safetensors.torch.load_file(str(tmp_path / "folded" / "model.safetensors"))
    base = safetensors.torch.load_file(str(base16 / "model.safetensors"))
    for key, delta in updates.items():
        assert folded[key].dtype == torch.bfloat16
        exact = base[key].double() + delta
        # one rounding of the float64 sum to bf16: within half a bf16 step (2^-8 relative) of it
        gap = (folded[key].double() - exact).abs()
        assert bool((gap <= exact.abs() * 2.0**-8 + 1e-30).all()), key


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def test_onnx_export_of_the_folded_model_passes_the_ort_check(lab, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    with unipack.open(lab["bundle"]) as b:
        check = b.export_onnx("mrpc", tmp_path / "mrpc.onnx", base=lab["base"])
        module = b.to_module("mrpc", base=lab["base"])
    assert check.passed and check.max_abs_diff <= 1e-4 and len(check.runs) == 2
    assert "folded into" in check.source
    # the module it exported is the folded model: PEFT's scores
    got = logits(module)
    assert np.max(np.abs(got - peft_logits(lab["base"], lab["extracted"]["mrpc"]))) <= 1e-5
    result = run("export", lab["bundle"], "-m", "cola", "--onnx", tmp_path / "cola.onnx", "--base", lab["base"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and (tmp_path / "cola.onnx").exists()


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 1 (or 2 for usage), nothing written
# --------------------------------------------------------------------------------------------


def other_base(lab: dict[str, Any], name: str, **overrides: Any) -> Path:
    folder = lab["root"] / "bases" / name
    return folder if folder.exists() else save_base(folder, **overrides)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", "no such base model folder"),
        ("file", "not a folder"),
        ("no-config", "has no config.json"),
        ("no-weights", "without model weights"),
        ("fewer-layers", "has no tensor bert.encoder.layer.1."),
        ("other-intermediate", "adds to it has shape [37, 32]"),
        ("other-head", "brings (modules_to_save) has shape [3]"),
    ],
)
def test_bad_bases_are_one_line_errors(lab, case, words, tmp_path) -> None:
    if case == "missing":
        base = tmp_path / "nowhere"
    elif case == "file":
        base = tmp_path / "base.safetensors"
        shutil.copy(lab["base"] / "model.safetensors", base)
    elif case == "no-config":
        base = tmp_path / "weights-only"
        base.mkdir()
        shutil.copy(lab["base"] / "model.safetensors", base)
    elif case == "no-weights":
        base = tmp_path / "config-only"
        base.mkdir()
        shutil.copy(lab["base"] / "config.json", base)
    elif case == "fewer-layers":
        base = other_base(lab, case, num_hidden_layers=1)
    elif case == "other-intermediate":
        base = other_base(lab, case, intermediate_size=41)
    else:
        base = other_base(lab, case, num_labels=5)
    out = tmp_path / "out"
    line = assert_one_line_error(
        run("extract", lab["bundle"], "-m", "cola", "--format", "hf", "--base", base, "-o", out)
    )
    assert words in line and str(base) in line, line
    assert not out.exists()
    with unipack.open(lab["bundle"]) as b, pytest.raises(InputError, match=re.escape(words)):
        b.extract_hf("cola", out, base=base)
    assert not out.exists()
    line = assert_one_line_error(
        run("export", lab["bundle"], "-m", "cola", "--onnx", tmp_path / "x.onnx", "--base", base)
    )
    assert words in line
    assert not (tmp_path / "x.onnx").exists()


def test_missing_module_message_counts_every_one(lab, tmp_path) -> None:
    """A base without the query weights: the line names three and counts the rest."""
    base = tmp_path / "no-query"
    shutil.copytree(lab["base"], base)
    weights = load_numpy(str(base / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if ".query." not in k and "intermediate" not in k}
    save_numpy(kept, str(base / "model.safetensors"), metadata={"format": "pt"})
    line = assert_one_line_error(
        run("extract", lab["bundle"], "-m", "sst", "--format", "hf", "--base", base, "-o", tmp_path / "o")
    )
    assert "... (1 more)" in line and "(4 missing)" in line, line


def test_base_with_a_dense_bundle_or_another_format(lab, tmp_path) -> None:
    paths = []
    rng = np.random.default_rng(0)
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_numpy({"w": rng.standard_normal((8, 8)).astype(np.float32)}, str(paths[-1]))
    dense = tmp_path / "dense.upk"
    unipack.merge(paths, dense, max_error=0.1)
    line = assert_one_line_error(
        run("extract", dense, "-m", "m0", "--format", "hf", "--base", lab["base"], "-o", tmp_path / "d")
    )
    assert "not LoRA adapters" in line and "--base" in line
    line = assert_one_line_error(run("export", dense, "-m", "m0", "--onnx", tmp_path / "d.onnx", "--base", lab["base"]))
    assert "not LoRA adapters" in line
    with unipack.open(dense) as b, pytest.raises(OptionsError, match="not LoRA adapters"):
        b.extract_hf("m0", tmp_path / "d", base=lab["base"])
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.onnx").exists()
    for fmt in ("peft", "safetensors"):
        result = run(
            "extract", lab["bundle"], "-m", "cola", "--format", fmt, "--base", lab["base"], "-o", tmp_path / fmt
        )
        assert_usage_error(result, "--base applies to --format hf only")
        assert not (tmp_path / fmt).exists()
    result = run("extract", lab["bundle"], "-m", "cola", "--base", lab["base"], "--exact", "-o", tmp_path / "e")
    assert result.exit_code == 2


def test_lora_without_base_says_how(lab, tmp_path) -> None:
    line = assert_one_line_error(run("extract", lab["bundle"], "-m", "cola", "--format", "hf", "-o", tmp_path / "h"))
    assert "--format peft" in line and "--base" in line
    line = assert_one_line_error(run("export", lab["bundle"], "-m", "cola", "--onnx", tmp_path / "h.onnx"))
    assert "--base BASE_DIR" in line
    with unipack.open(lab["bundle"]) as b, pytest.raises(ModelError, match="base="):
        b.to_module("cola")


def test_the_base_itself_is_never_the_output(lab, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(lab["base"], base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for target in (base, tmp_path):
        line = assert_one_line_error(
            run("extract", lab["bundle"], "-m", "cola", "--format", "hf", "--base", base, "-o", target, "--force")
        )
        assert "is or holds the base model" in line
        with unipack.open(lab["bundle"]) as b, pytest.raises(OutputExistsError):
            b.extract_hf("cola", target, base=base, force=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    # an existing output without --force is refused as for any hf extract
    (tmp_path / "taken").mkdir()
    line = assert_one_line_error(
        run("extract", lab["bundle"], "-m", "cola", "--format", "hf", "--base", base, "-o", tmp_path / "taken")
    )
    assert "--force" in line
