"""A PEFT LoRA adapter folder as a source: what ``peft_model.save_pretrained(dir)`` writes.

The folder holds ``adapter_config.json`` and one weights file, ``adapter_model.safetensors`` or
(``safe_serialization=False``) the pickle ``adapter_model.bin``, opened by the same sources as a
plain checkpoint. Each adapted module ``M`` has two factors, ``M.lora_A.weight`` (r x in) and
``M.lora_B.weight`` (out x r), and its update is ``scale · B · A``. The scale is not in the file:
it comes from the config (``lora_alpha``, ``r``, their per-module ``alpha_pattern`` /
``rank_pattern`` overrides, ``use_rslora``), resolved here exactly as PEFT resolves it, so a
merge never has to read the config itself. Other keys (``modules_to_save`` copies, ``bias``
tensors, trainable tokens) are plain tensors, kept as ``extra_tensors``.

Only plain LoRA on linear layers is accepted. Everything whose update is not ``scale · B · A``
(DoRA and the other LoRA variants, LoRA biases, embedding and convolution LoRA, LoRA on raw
parameters) is refused up front, by its config flag or by its keys, so it cannot be merged as
if it were plain LoRA and come back silently wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unipack.core.lora import lora_scale
from unipack.errors import InputError
from unipack.format.dtypes import FLOAT_DTYPES
from unipack.format.manifest import MAX_CONFIG_BYTES
from unipack.format.safetensors_file import reject_duplicate_keys
from unipack.sources.base import MAX_MAGNITUDE, TensorInfo, TensorSource
from unipack.sources.files import exists, open_file
from unipack.sources.patterns import Budget, PatternError, PatternMatcher
from unipack.sources.url import InputPath
from unipack.sources.weights import open_weights_file

ADAPTER_CONFIG = "adapter_config.json"
#: The weights files ``save_pretrained`` writes, and how to open each (as what its content is).
WEIGHT_FILES: tuple[tuple[str, Callable[[Path], TensorSource]], ...] = (
    ("adapter_model.safetensors", open_weights_file),
    ("adapter_model.bin", open_weights_file),
)
#: What PEFT puts before every module name of the base model.
KEY_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
#: LoraConfig's defaults, which PEFT applies to a config that leaves ``r`` / ``lora_alpha`` out.
DEFAULT_R, DEFAULT_ALPHA = 8, 8
#: LoraConfig fields that switch on a LoRA variant whose update is not ``scale · B · A``.
#: (``init_lora_weights`` options such as PiSSA or MiCA change the start, not the update: allowed.)
VARIANTS = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
}

_MERGE_INSTEAD = "merge it into its base model (peft's merge_and_unload) and pack the merged checkpoints instead"
_RESAVE = "re-save the adapter with save_pretrained"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are, their sizes, and PEFT's scale for it."""

    name: str  # the key prefix before ".lora_A.weight", e.g. "base_model.model.body.0"
    a_key: str  # f"{name}.lora_A.weight"
    b_key: str  # f"{name}.lora_B.weight"
    rank: int  # r, from the tensor shapes
    out_dim: int  # B's rows
    in_dim: int  # A's columns
    alpha: float  # lora_alpha for this module (alpha_pattern applied)
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora


class PeftAdapterSource:
    """An adapter folder: its parsed config, its weights file, and the LoRA modules found in it."""

    def __init__(
        self,
        path: Path,
        weights: TensorSource,
        config_text: str,
        config: dict[str, Any],
        lora_modules: dict[str, LoraModule],
    ) -> None:
        self._path, self._weights = path, weights
        self.configs = {ADAPTER_CONFIG: config_text}
        self.config = config
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.lora_modules = lora_modules
        factors = {k for m in lora_modules.values() for k in (m.a_key, m.b_key)}
        self.extra_tensors = tuple(k for k in weights.tensors if k not in factors)

    @classmethod
    def open(cls, path: Path) -> PeftAdapterSource:
        # The config first: a refused adapter fails before its .bin is unpickled.
        config_path = path / ADAPTER_CONFIG
        text, config = read_adapter_config(config_path)
        scaling = _Scaling.from_config(config_path, config)
        weights = _open_weights(path)
        try:
            modules = _lora_modules(weights, scaling)
        except BaseException:
            weights.close()
            raise
        return cls(path, weights, text, config, modules)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def weights(self) -> TensorSource:
        """The adapter's weights file (safetensors or a torch ``.bin``)."""
        return self._weights

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._weights.tensors

    @property
    def file_size(self) -> int:
        return self._weights.file_size

    @property
    def metadata(self) -> dict[str, str] | None:
        return self._weights.metadata

    @property
    def files(self) -> tuple[tuple[InputPath, int], ...]:
        return self._weights.files

    def read(self, name: str) -> np.ndarray:
        return self._weights.read(name)

    def close(self) -> None:
        self._weights.close()


def is_peft_adapter(path: Path) -> bool:
    """A folder with ``adapter_config.json``: what PEFT itself looks for to load an adapter.

    Anything by that name counts (a FIFO, a broken link): reading it then says what it is.
    """
    return path.is_dir() and exists(path / ADAPTER_CONFIG)


def read_adapter_config(path: Path) -> tuple[str, dict[str, Any]]:
    """The config's exact text (kept with the member) and its parsed object.

    Like ``hf_configs.read_config`` (at most ``MAX_CONFIG_BYTES``, UTF-8, JSON), but an object
    with no key given twice, and with advice for an adapter: removing this file is no fix.
    """
    fd = open_file(path, "adapter config")  # a regular file, or an InputError saying what it is
    try:
        with open(fd, "rb") as f:  # owns fd from here
            data = f.read(MAX_CONFIG_BYTES + 1)  # never read more than the limit, whatever stat says
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(
            f"{path}: larger than the {MAX_CONFIG_BYTES}-byte limit for a config file kept in the "
            f"bundle; not an adapter config, or {_RESAVE}"
        )
    try:
        text = data.decode("utf-8")
        config = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise InputError(f"{path}: not valid UTF-8 JSON ({exc}); fix it or {_RESAVE}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: holds a JSON {type(config).__name__}, not an object; fix it or {_RESAVE}")
    return text, config


@dataclass(frozen=True)
class _Scaling:
    """The config's rank and alpha rules, checked once; resolved per module as PEFT does."""

    path: Path
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool
    rank_matcher: PatternMatcher
    alpha_matcher: PatternMatcher

    @classmethod
    def from_config(cls, path: Path, config: dict[str, Any]) -> _Scaling:
        _check_plain_lora(path, config)
        rank_pattern = {
            p: _rank(path, f"rank_pattern[{p[:80]!r}]", v) for p, v in _patterns(path, config, "rank_pattern").items()
        }
        alpha_pattern = {
            p: _alpha(path, f"alpha_pattern[{p[:80]!r}]", v)
            for p, v in _patterns(path, config, "alpha_pattern").items()
        }
        budget = Budget()  # one for the adapter: every pattern against every module, bounded
        return cls(
            path=path,
            r=_rank(path, "r", config.get("r", DEFAULT_R)),
            alpha=_alpha(path, "lora_alpha", config.get("lora_alpha", DEFAULT_ALPHA)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            rslora=_flag(path, config, "use_rslora"),
            rank_matcher=_matcher(path, "rank_pattern", rank_pattern, budget),
            alpha_matcher=_matcher(path, "alpha_pattern", alpha_pattern, budget),
        )

    def for_module(self, key: str) -> tuple[int, float]:
        """(r, alpha) for module ``key`` (its name in the base model), as PEFT's ``get_pattern_key``:
        the first pattern that matches the end of the key at a dot boundary, else the key itself."""
        try:
            rank_key = self.rank_matcher.first_match(key)
            alpha_key = self.alpha_matcher.first_match(key)
        except PatternError as exc:
            raise InputError(
                f"{self.path}: rank_pattern/alpha_pattern {exc}; give the modules' names, or simpler patterns"
            ) from None
        r = self.rank_pattern[rank_key] if rank_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.alpha
        return r, alpha


def _matcher(path: Path, field: str, patterns: dict[str, Any], budget: Budget) -> PatternMatcher:
    """The field's patterns, compiled to be matched exactly as PEFT matches them, in bounded time."""
    try:
        return PatternMatcher(patterns, budget)
    except PatternError as exc:
        raise InputError(
            f"{path}: {field} key {str(exc.pattern)[:80]!r} {exc}; give the modules' names, or a simpler pattern"
        ) from None


def _check_plain_lora(path: Path, config: dict[str, Any]) -> None:
    """Refuse, by the config alone, adapters whose update is not ``scale · B · A`` on a linear layer."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f'{path}: peft_type is {json.dumps(peft_type)[:40]}, not "LORA"; unipack merges LoRA '
            f"adapters only: {_MERGE_INSTEAD}"
        )
    for field, variant in VARIANTS.items():
        if config.get(field):
            raise InputError(
                f"{path}: uses {variant} ({field}: {json.dumps(config[field])[:80]}), whose update is "
                f"not scale * B * A; unipack merges plain LoRA only: {_MERGE_INSTEAD}"
            )
    if config.get("lora_bias"):
        raise InputError(
            f"{path}: has LoRA biases (lora_bias: true), which PEFT adds to the update; unipack "
            f"merges LoRA without lora_bias only: {_MERGE_INSTEAD}"
        )
    if config.get("target_parameters"):
        raise InputError(
            f"{path}: puts LoRA on raw parameters (target_parameters: "
            f"{json.dumps(config['target_parameters'])[:80]}), whose factors are not a module's "
            f"B and A; unipack merges LoRA on linear layers only: {_MERGE_INSTEAD}"
        )
    _flag(path, config, "fan_in_fan_out")


def _rank(path: Path, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{path}: {what} is {_shown(value)}, not a positive integer; fix it or {_RESAVE}")
    return value


def _alpha(path: Path, what: str, value: Any) -> float:
    # Kept as given (an int stays an int): alpha / r is then the very float PEFT computes.
    # ``abs`` compares a JSON integer of any length without converting it to a float (which would
    # overflow); a scale past MAX_MAGNITUDE would overflow the update's sums of squares.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise InputError(f"{path}: {what} is {_shown(value)}, not a finite number; fix it or {_RESAVE}")
    if abs(value) > MAX_MAGNITUDE:
        raise InputError(
            f"{path}: {what} is {_shown(value)}, beyond ±{MAX_MAGNITUDE:.3g}, where the LoRA update's "
            f"arithmetic overflows; fix it or {_RESAVE}"
        )
    return value


def _shown(value: Any) -> str:
    """A JSON value for a message: at most 40 characters, and no conversion that can fail."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    return json.dumps(value)[:40]


def _patterns(path: Path, config: dict[str, Any], field: str) -> dict[str, Any]:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise InputError(f"{path}: {field} is not an object of module patterns; fix it or {_RESAVE}")
    return patterns


def _flag(path: Path, config: dict[str, Any], field: str) -> bool:
    value = config.get(field)
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{path}: {field} is {json.dumps(value)[:40]}, not true or false; fix it or {_RESAVE}")
    return bool(value)


def _open_weights(folder: Path) -> TensorSource:
    found = [(folder / name, opener) for name, opener in WEIGHT_FILES if exists(folder / name)]
    if not found:
        raise InputError(
            f"{folder}: a PEFT adapter folder without weights (no adapter_model.safetensors or "
            f"adapter_model.bin); {_RESAVE}"
        )
    if len(found) > 1:
        # PEFT would silently take the safetensors file; the other is likely left from an earlier save.
        raise InputError(
            f"{folder}: has both adapter_model.safetensors and adapter_model.bin, so which is the "
            f"adapter is ambiguous; remove the stale one"
        )
    weights_path, opener = found[0]
    return opener(weights_path)


def _lora_modules(weights: TensorSource, scaling: _Scaling) -> dict[str, LoraModule]:
    """Pair every ``lora_A``/``lora_B`` factor, check their shapes against each other and the config."""
    where = weights.files[0][0]
    names: dict[str, None] = {}  # module names, in the file order of their first factor
    for key in weights.tensors:
        suffix = next((s for s in (A_SUFFIX, B_SUFFIX) if key.endswith(s) and len(key) > len(s)), None)
        if suffix:
            names[key[: -len(suffix)]] = None
        else:
            _check_extra(where, key)
    if not names:
        raise InputError(
            f"{where}: holds no LoRA factors (no '*{A_SUFFIX}' / '*{B_SUFFIX}' keys); not a LoRA adapter, or {_RESAVE}"
        )
    return {name: _module(where, name, weights.tensors, scaling) for name in names}


def _check_extra(where: InputPath, key: str) -> None:
    """A key that is not a factor is stored raw, unless it is part of a LoRA update unipack cannot merge."""
    parts = key.split(".")
    if "lora_magnitude_vector" in parts:
        raise InputError(
            f"{where}: holds DoRA magnitudes ({key[:80]!r}), whose update is not scale * B * A; "
            f"unipack merges plain LoRA only: {_MERGE_INSTEAD}"
        )
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        raise InputError(
            f"{where}: holds embedding LoRA ({key[:80]!r}); unipack merges LoRA on linear layers "
            f"only: leave embeddings out of target_modules, or {_MERGE_INSTEAD}"
        )
    if key.endswith((".lora_A.bias", ".lora_B.bias")):
        raise InputError(
            f"{where}: holds a LoRA bias ({key[:80]!r}), which PEFT adds to the update; unipack "
            f"merges LoRA without lora_bias only: {_MERGE_INSTEAD}"
        )
    if any(p.startswith("lora_") for p in parts):
        raise InputError(
            f"{where}: holds {key[:80]!r}, a LoRA tensor that is neither lora_A.weight nor "
            f"lora_B.weight; unipack merges plain LoRA only: {_MERGE_INSTEAD}"
        )


def _module(where: InputPath, name: str, tensors: Mapping[str, TensorInfo], scaling: _Scaling) -> LoraModule:
    a_key, b_key = f"{name}{A_SUFFIX}", f"{name}{B_SUFFIX}"
    for key, other in ((a_key, b_key), (b_key, a_key)):
        if other not in tensors:
            raise InputError(
                f"{where}: has {key[:80]!r} but not {other[:80]!r}; a LoRA factor without its "
                f"pair is a damaged adapter: {_RESAVE}"
            )
    a, b = tensors[a_key], tensors[b_key]
    for key, info in ((a_key, a), (b_key, b)):
        if len(info.shape) != 2:
            raise InputError(
                f"{where}: {key[:80]!r} has shape {list(info.shape)}, not 2-D (LoRA on a "
                f"convolution?); unipack merges LoRA on linear layers only: {_MERGE_INSTEAD}"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{where}: {key[:80]!r} has dtype {info.dtype}; LoRA factors must be "
                f"{'/'.join(sorted(FLOAT_DTYPES))}: {_RESAVE}"
            )
    rank, in_dim = a.shape
    out_dim, b_rank = b.shape
    if b_rank != rank:
        raise InputError(
            f"{where}: module {name[:80]!r} has lora_B {list(b.shape)} and lora_A {list(a.shape)}: "
            f"B's columns must equal A's rows (the rank); {_RESAVE}"
        )
    if rank == 0:
        raise InputError(f"{where}: module {name[:80]!r} has rank 0 (empty factors); {_RESAVE}")
    r, alpha = scaling.for_module(name.removeprefix(KEY_PREFIX))
    if r != rank:
        raise InputError(
            f"{where}: module {name[:80]!r} has rank {rank} but {ADAPTER_CONFIG} gives it r={r}, so "
            f"its scale is unknown: the weights do not match their config; {_RESAVE}"
        )
    return LoraModule(
        name=name,
        a_key=a_key,
        b_key=b_key,
        rank=rank,
        out_dim=out_dim,
        in_dim=in_dim,
        alpha=float(alpha),
        scale=lora_scale(alpha, rank, scaling.rslora),
    )
