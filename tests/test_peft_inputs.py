"""PEFT LoRA adapter folders as inputs (``sources.peft_adapter``).

Every adapter is saved by peft itself (``save_pretrained``) from a tiny model built here, no
downloads. Values are checked against the reference loaders (``safetensors.numpy.load_file``,
``torch.load(weights_only=True)``), and every module's scale against the ``scaling`` peft gives
the layer, both in the model that was saved and in the model peft loads back from the folder.
Every refused adapter is checked by message, through ``PeftAdapterSource.open`` and
``open_source``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from torch import nn

from unipack import InputError
from unipack.format.manifest import MAX_CONFIG_BYTES
from unipack.sources import (
    LoraModule,
    PeftAdapterSource,
    is_peft_adapter,
    open_source,
)

CONFIG, SAFETENSORS, BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v, self.up = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 12)


class Tiny(nn.Module):
    """Just enough structure for target_modules, patterns, modules_to_save and the refused kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 3)
        self.moe = nn.Module()
        self.moe.experts = nn.Parameter(torch.randn(2, 8, 8))


def save_adapter(
    folder: Path, *, safe: bool = True, dtype: torch.dtype = torch.float32, config: Any = None, **lora: Any
) -> nn.Module:
    """A peft model of ``Tiny`` with random (not zero) factors, saved to ``folder``; returned."""
    torch.manual_seed(0)
    cfg = config or LoraConfig(init_lora_weights=False, **{"target_modules": ["q", "v"], **lora})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Tiny().to(dtype), cfg, autocast_adapter_dtype=False)
        model.save_pretrained(str(folder), safe_serialization=safe)
    return model


def reference(folder: Path) -> dict[str, np.ndarray]:
    """The weights file's tensors, by the reference loader for its kind, in file order."""
    if (folder / SAFETENSORS).exists():
        return load_numpy(folder / SAFETENSORS)
    return {k: t.numpy() for k, t in torch.load(folder / BIN, weights_only=True).items()}


def lora_layers(model: nn.Module) -> dict[str, Any]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# ------------------------------------------------------------------------------------------
# adapters peft saves, read back
# ------------------------------------------------------------------------------------------

GOOD: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8},
    "patterns": {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q", "v", "up"],
        "rank_pattern": {"layers.0.q": 2, "up": 3},
        "alpha_pattern": {"v": 5.5, r"layers\.1\.up": 7},
    },
    "rslora": {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"v": 6}, "alpha_pattern": {"q": 3}},
    "partial_modules_to_save": {"r": 2, "target_modules": ["layers.1.up"], "modules_to_save": ["head"], "bias": "all"},
    "bin": {"r": 3, "lora_alpha": 5, "modules_to_save": ["head"], "bias": "lora_only", "safe": False},
    "trainable_tokens": {"r": 2, "trainable_token_indices": {"emb": [1, 2]}},
    "float16": {"r": 2, "dtype": torch.float16},
    "float64_bin": {"r": 2, "dtype": torch.float64, "safe": False, "use_rslora": True},
}


@pytest.mark.parametrize("case", GOOD)
def test_adapter_reads_like_the_reference(tmp_path: Path, case: str) -> None:
    model = save_adapter(tmp_path, **GOOD[case])
    ref = reference(tmp_path)
    weights = tmp_path / (BIN if (tmp_path / BIN).exists() else SAFETENSORS)
    assert is_peft_adapter(tmp_path) and not is_peft_adapter(weights)
    src = PeftAdapterSource.open(tmp_path)
    try:
        assert set(src.tensors) == set(ref)
        for name, array in ref.items():
            got = src.read(name)
            assert src.tensors[name].shape == array.shape
            assert got.dtype == array.dtype and np.array_equal(got, array), name
        if weights.suffix == ".bin":  # a state dict keeps its order; safetensors files are in data order
            assert list(src.tensors) == list(ref)
        assert src.path == tmp_path
        assert src.files == ((weights, weights.stat().st_size),) and src.file_size == weights.stat().st_size
        assert src.metadata == ({"format": "pt"} if weights.suffix == ".safetensors" else None)
        text = (tmp_path / CONFIG).read_text(encoding="utf-8")
        assert src.configs == {CONFIG: text} and src.config == json.loads(text)
        assert src.fan_in_fan_out is False

        layers = lora_layers(model)
        assert list(src.lora_modules) == [m.name for m in src.lora_modules.values()]
        assert set(src.lora_modules) == set(layers)
        for name, module in src.lora_modules.items():
            layer = layers[name]
            out_dim, in_dim = layer.get_base_layer().weight.shape  # nn.Linear: out x in
            assert module == LoraModule(
                name=name,
                a_key=f"{name}.lora_A.weight",
                b_key=f"{name}.lora_B.weight",
                rank=layer.r["default"],
                out_dim=out_dim,
                in_dim=in_dim,
                alpha=float(layer.lora_alpha["default"]),
                scale=layer.scaling["default"],
            )
            assert module.scale == layer.scaling["default"]  # exactly, not approximately
        factors = {k for m in src.lora_modules.values() for k in (m.a_key, m.b_key)}
        assert src.extra_tensors == tuple(k for k in src.tensors if k not in factors)
        assert all("lora_" not in k for k in src.extra_tensors)
    finally:
        src.close()

    # The scales peft gives the model it loads from this very folder.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(Tiny().to(GOOD[case].get("dtype", torch.float32)), tmp_path)
    for name, layer in lora_layers(loaded).items():
        assert src.lora_modules[name].scale == layer.scaling["default"]


def test_patterns_and_extras_as_expected(tmp_path: Path) -> None:
    """The pattern case by hand, so a peft change could not make both sides wrong together."""
    save_adapter(tmp_path / "p", **GOOD["patterns"])
    with PeftAdapterSourceOpen(tmp_path / "p") as src:
        got = {n.removeprefix("base_model.model."): (m.rank, m.alpha, m.scale) for n, m in src.lora_modules.items()}
    assert got == {
        "layers.0.q": (2, 16.0, 8.0),
        "layers.0.v": (4, 5.5, 1.375),
        "layers.0.up": (3, 16.0, 16 / 3),
        "layers.1.q": (4, 16.0, 4.0),
        "layers.1.v": (4, 5.5, 1.375),
        "layers.1.up": (3, 7.0, 7 / 3),
    }
    # bias="all" would add every bias of the model, even the modules_to_save wrapper's copies.
    save_adapter(tmp_path / "x", r=2, target_modules=["layers.1.up"], modules_to_save=["head"], bias="lora_only")
    with PeftAdapterSourceOpen(tmp_path / "x") as src:
        assert list(src.lora_modules) == ["base_model.model.layers.1.up"]
        assert set(src.extra_tensors) == {
            "base_model.model.head.weight",
            "base_model.model.head.bias",
            "base_model.model.layers.1.up.base_layer.bias",
        }


def test_fan_in_fan_out_from_config(tmp_path: Path) -> None:
    """GPT-2 style Conv1D layers store W transposed: the flag comes from the config as saved."""
    from transformers.pytorch_utils import Conv1D

    class Gpt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(24, 8)  # nf=out, nx=in

    torch.manual_seed(0)
    model = get_peft_model(
        Gpt(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    )
    model.save_pretrained(str(tmp_path))
    with PeftAdapterSourceOpen(tmp_path) as src:
        assert src.fan_in_fan_out is True
        (module,) = src.lora_modules.values()
        assert (module.rank, module.out_dim, module.in_dim) == (2, 24, 8)


def test_open_source_dispatches_adapter_folders(tmp_path: Path) -> None:
    save_adapter(tmp_path / "a", r=2)
    src = open_source(tmp_path / "a")
    assert isinstance(src, PeftAdapterSource)
    src.close()
    assert not is_peft_adapter(tmp_path / "missing")


def test_adapter_in_a_subfolder_is_pointed_at(tmp_path: Path) -> None:
    """PEFT writes an adapter not named "default" to DIR/<name>/: naming DIR gets a hint, not the
    model-folder error."""
    save_adapter(tmp_path / "run" / "pets", r=2)
    with pytest.raises(InputError) as info:
        open_source(tmp_path / "run")
    message = str(info.value)
    assert "subfolder 'pets'" in message and str(tmp_path / "run" / "pets") in message, message


class PeftAdapterSourceOpen:
    """``with`` for a source: open it, close it whatever happens."""

    def __init__(self, path: Path) -> None:
        self.src = PeftAdapterSource.open(path)

    def __enter__(self) -> PeftAdapterSource:
        return self.src

    def __exit__(self, *exc: object) -> None:
        self.src.close()


# ------------------------------------------------------------------------------------------
# refused adapters
# ------------------------------------------------------------------------------------------


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")  # NaN stays NaN, as peft writes it


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / SAFETENSORS)
    change(tensors)
    save_file(tensors, folder / SAFETENSORS, metadata={"format": "pt"})


def drop(suffix: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for k in [k for k in tensors if k.endswith(suffix)]:
            del tensors[k]

    return change


def set_tensor(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value

    return change


Q0 = "base_model.model.layers.0.q"


def rank_zero(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{Q0}.lora_A.weight"], tensors[f"{Q0}.lora_B.weight"] = torch.zeros(0, 8), torch.zeros(8, 0)


def only_extras(tensors: dict[str, torch.Tensor]) -> None:
    for k in [k for k in tensors if ".lora_" in k]:
        del tensors[k]
    tensors["base_model.model.head.weight"] = torch.zeros(3, 12)


def config_text(text: str) -> Callable[[Path], object]:
    return lambda folder: (folder / CONFIG).write_text(text, encoding="utf-8")


#: kind -> (how to make the bad folder from a good plain adapter (r=4, q and v) or None for a
#: fresh peft save, the peft save's arguments, and what the message must say).
BAD: dict[str, tuple[Callable[[Path], object] | None, dict[str, Any], str]] = {
    "config_not_json": (config_text('{"peft_type": "LORA",'), {}, "not valid UTF-8 JSON"),
    "config_not_utf8": (lambda f: (f / CONFIG).write_bytes(b'{"r": "\xff"}'), {}, "not valid UTF-8 JSON"),
    "config_duplicate_key": (config_text('{"peft_type": "LORA", "r": 4, "r": 8}'), {}, "duplicate key 'r'"),
    "config_not_object": (config_text("[1, 2]"), {}, "holds a JSON list, not an object"),
    "config_too_big": (lambda f: edit_config(f, pad="x" * MAX_CONFIG_BYTES), {}, "byte limit"),
    "peft_type_ia3": (
        None,
        {"config": IA3Config(target_modules=["q", "v"], feedforward_modules=[])},
        'peft_type is "IA3", not "LORA"; unipack merges LoRA adapters only',
    ),
    "peft_type_missing": (lambda f: edit_config(f, peft_type=None), {}, 'peft_type is null, not "LORA"'),
    "dora": (None, {"use_dora": True}, "uses DoRA (use_dora: true)"),
    "dora_keys_only": (lambda f: edit_config(f, use_dora=False), {"use_dora": True}, "holds DoRA magnitudes"),
    "alora": (lambda f: edit_config(f, alora_invocation_tokens=[1, 2]), {}, "uses aLoRA"),
    "embedding": (None, {"target_modules": ["emb", "q"]}, "holds embedding LoRA"),
    "lora_bias": (None, {"lora_bias": True}, "has LoRA biases (lora_bias: true)"),
    "lora_bias_keys_only": (
        lambda f: edit_config(f, lora_bias=False),
        {"lora_bias": True},
        "holds a LoRA bias ('base_model.model.layers.0.q.lora_B.bias')",
    ),
    "target_parameters": (
        None,
        {"target_modules": [], "target_parameters": ["moe.experts"]},
        'puts LoRA on raw parameters (target_parameters: ["moe.experts"])',
    ),
    "conv": (None, {"target_modules": ["conv"]}, "has shape [4, 3, 3, 3], not 2-D (LoRA on a convolution?)"),
    "unknown_lora_key": (
        lambda f: edit_weights(f, set_tensor(f"{Q0}.lora_E.weight", torch.zeros(4))),
        {},
        f"holds '{Q0}.lora_E.weight', a LoRA tensor that is neither",
    ),
    "int_factor": (
        lambda f: edit_weights(f, set_tensor(f"{Q0}.lora_A.weight", torch.zeros(4, 8, dtype=torch.int32))),
        {},
        "has dtype I32; LoRA factors must be",
    ),
    "a_without_b": (
        lambda f: edit_weights(f, drop("layers.1.v.lora_B.weight")),
        {},
        "has 'base_model.model.layers.1.v.lora_A.weight' but not",
    ),
    "b_without_a": (
        lambda f: edit_weights(f, drop("layers.0.q.lora_A.weight")),
        {},
        f"has '{Q0}.lora_B.weight' but not '{Q0}.lora_A.weight'",
    ),
    "rank_mismatch": (
        lambda f: edit_weights(f, set_tensor(f"{Q0}.lora_B.weight", torch.zeros(8, 5))),
        {},
        "B's columns must equal A's rows",
    ),
    "rank_zero": (lambda f: edit_weights(f, rank_zero), {}, "has rank 0"),
    "no_factors": (lambda f: edit_weights(f, only_extras), {}, "holds no LoRA factors"),
    "config_rank_differs": (lambda f: edit_config(f, r=5), {}, "has rank 4 but adapter_config.json gives it r=5"),
    "rank_pattern_differs": (
        lambda f: edit_config(f, rank_pattern={"v": 2}),
        {},
        "'base_model.model.layers.0.v' has rank 4 but adapter_config.json gives it r=2",
    ),
    "no_weights": (lambda f: (f / SAFETENSORS).unlink(), {}, "a PEFT adapter folder without weights"),
    "both_weights": (lambda f: (f / BIN).write_bytes(b"stale"), {}, "has both adapter_model.safetensors and"),
    "alpha_nan": (lambda f: edit_config(f, lora_alpha=float("nan")), {}, "lora_alpha is NaN, not a finite number"),
    "alpha_infinite": (lambda f: edit_config(f, lora_alpha=float("inf")), {}, "lora_alpha is Infinity, not a finite"),
    "alpha_string": (lambda f: edit_config(f, lora_alpha="8"), {}, 'lora_alpha is "8", not a finite number'),
    "alpha_pattern_nan": (
        lambda f: edit_config(f, alpha_pattern={"q": float("nan")}),
        {},
        "alpha_pattern['q'] is NaN, not a finite number",
    ),
    "r_string": (lambda f: edit_config(f, r="4"), {}, 'r is "4", not a positive integer'),
    "r_float": (lambda f: edit_config(f, r=4.0), {}, "r is 4.0, not a positive integer"),
    "r_bool": (lambda f: edit_config(f, r=True), {}, "r is true, not a positive integer"),
    "bad_pattern_regex": (
        lambda f: edit_config(f, rank_pattern={"q(": 2}),
        {},
        "rank_pattern key 'q(' is not a valid regular expression (missing ), ",
    ),
    "rslora_not_bool": (lambda f: edit_config(f, use_rslora="yes"), {}, 'use_rslora is "yes", not true or false'),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One peft save per distinct set of arguments, copied for each case that breaks it."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        _, args, _ = BAD[kind]
        key = repr(sorted(args.items()))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp("adapter")
            save_adapter(cache[key], r=4, **args)
        return cache[key]

    return get


@pytest.mark.parametrize("opener", [PeftAdapterSource.open, open_source], ids=["PeftAdapterSource", "open_source"])
@pytest.mark.parametrize("kind", BAD)
def test_bad_adapter_is_refused(
    tmp_path: Path, saved: Callable[[str], Path], kind: str, opener: Callable[[Path], Any]
) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in saved(kind).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    breaker, _, expected = BAD[kind]
    if breaker is not None:
        breaker(folder)
    with pytest.raises(InputError) as info:
        opener(folder)
    message = str(info.value)
    assert message.startswith((f"{folder}/", f"{folder}:")), message
    assert expected in message, f"{expected!r} not in {message!r}"
    assert "\n" not in message and "; " in message, message  # one line: what is wrong; what to do
