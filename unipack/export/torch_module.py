"""A member as a runnable torch module, with an example input to call it with.

Two ways to build one (``BundleReader.to_module``, ``unipack export --onnx``):

* **Hugging Face members** (their ``config.json`` recorded in the bundle,
  ``MemberRecord.configs``): ``transformers`` (``pip install 'unipack[hf]'``) builds the config,
  the class named by ``config.architectures[0]`` (else ``AutoModel`` for the ``model_type``) is
  constructed from it (nothing is downloaded) and the member's state dict is loaded strictly.
  The example input comes from the config: vision models (``image_size``, ``num_channels``) get
  ``pixel_values`` of shape (1, C, H, W), text models (``vocab_size`` and
  ``max_position_embeddings``) get ``input_ids`` and ``attention_mask`` of shape (1, 16) (shorter if
  the model's positions are fewer); random with a fixed seed.
* **Anything else, or to override**: a factory the user names, ``--model path/to/model.py[:build]``
  or ``--model package.module:build`` (loaded like ``--eval``, see unipack.usercode)::

      def build(state_dict: dict[str, torch.Tensor], member_name: str) -> tuple[torch.nn.Module, Inputs]

  It returns the module **without** loading the weights, and an example input: a tensor, a
  tuple of tensors (positional arguments) or a dict of tensors (keyword arguments), with the
  batch on dimension 0. ``state_dict`` is passed so that the factory can size the module from it
  (heads that differ between members). unipack then loads the state dict strictly and names the
  missing, unexpected and wrongly shaped keys if it does not fit.

A LoRA adapter is not a model: with ``base`` (``--base BASE_DIR``), the base model's folder, it is
folded into its base first (unipack.export.folded) and then built like a Hugging Face member from
the base's ``config.json`` (or given to ``--model``'s factory as the folded state dict).

Strict, with two allowances: a key may be missing when the module ties it to a key that is present
(``lm_head.weight`` and the input embeddings: one tensor under two names, which safetensors files
store once), and keys the model class itself lists as ignorable on load
(transformers' ``_keys_to_ignore_on_load_*``).

Safety: a config.json read from a bundle only ever selects a class that ``transformers`` itself
exports and that is a ``PreTrainedModel``; ``trust_remote_code`` is never set, so ``auto_map``
entries are ignored. For a Hugging Face member the model is first built on the ``meta`` device
(no memory) and checked against the member's tensors, so a config that claims a huge model
allocates no weights that the bundle does not really hold (only buffers the model makes itself
from its config, such as position ids, are not bounded by the bundle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from unipack.errors import ModelError, UnipackError
from unipack.errors import first_line as one_line
from unipack.export.folded import Fold, write_folded_folder
from unipack.export.hf_folder import write_hf_folder
from unipack.usercode import HookKind, load_function

if TYPE_CHECKING:
    from unipack.bundle.reader import BundleReader

MODEL = HookKind("model", "build", "path/to/model.py", ModelError)
#: A factory: ``build(state_dict, member_name) -> (module, example_inputs)``.
Factory = Callable[[dict[str, torch.Tensor], str], Any]

SEED = 0
#: Sequence length of the example text input (shorter when the model has fewer positions).
TEXT_LENGTH = 16
#: Batch size of the second input: a size the example does not have, to prove the batch axis dynamic.
PROBE_BATCH = 3
#: Largest example image (C*H*W elements) unipack makes from a config's claims (a 4096² RGB image).
MAX_IMAGE_ELEMENTS = 3 * 4096 * 4096
#: How many keys an error line names before it only counts the rest.
SHOWN_KEYS = 4


@dataclass(frozen=True)
class Inputs:
    """What a module is called with: positional tensors or keyword tensors.

    ``dynamic`` maps each input's name to its dynamic axes (``{0: "batch"}``), as the ONNX
    exporter wants them.
    """

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Input names: the keywords, or ``input`` / ``input_0, input_1, ...`` for positional ones."""
        if self.kwargs:
            return list(self.kwargs)
        return ["input"] if len(self.args) == 1 else [f"input_{i}" for i in range(len(self.args))]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.args)) if self.args else dict(self.kwargs)

    def describe(self) -> str:
        """``batch 3, sequence 10``: the sizes of the dynamic axes, as the CLI prints them."""
        sizes: dict[str, int] = {}
        for name, axes in self.dynamic.items():
            for dim, axis in axes.items():
                sizes.setdefault(axis, int(self.tensors[name].shape[dim]))
        return ", ".join(f"{axis} {size}" for axis, size in sizes.items()) or "static shapes"

    def __call__(self, module: torch.nn.Module) -> Any:
        with torch.no_grad():
            return module(*self.args, **self.kwargs)


@dataclass
class MemberModule:
    """A member's module (weights loaded, eval mode) and the inputs to check it with."""

    module: torch.nn.Module
    example: Inputs  # batch 1 for Hugging Face members; the factory's own example otherwise
    probe: Inputs  # another batch size (and sequence length): proves the dynamic axes
    source: str  # how it was built, for messages: "transformers ViTForImageClassification"


def build_module(
    bundle: BundleReader,
    member: str,
    model: str | Factory | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
) -> MemberModule:
    """Member ``member`` of ``bundle`` as a torch module; ``model`` is a factory SPEC or callable;
    ``base`` (LoRA bundles): the base model's folder, the adapter folded into it (export.folded)."""
    record = bundle.member(member)  # a clear error for an unknown member before any work
    if base is not None:
        return _folded(bundle, member, model, base)
    if model is not None:
        return _from_factory(member, model, bundle.load(member))
    if bundle.is_lora:
        raise ModelError(
            f"member {member!r} is a LoRA adapter, not a model: give --base BASE_DIR (base=), the base "
            f"model's Hugging Face folder, to export it folded into its base; or --model module:function "
            f"(a factory that applies the adapter's state dict to the base and returns it with an "
            f"example input)"
        )
    config_text = (record.configs or {}).get("config.json")
    if config_text is None:
        raise ModelError(
            f"member {member!r} has no Hugging Face config.json: give --model module:function "
            f"(a factory returning the module and an example input)"
        )
    return _from_config(
        member, config_text, bundle.load(member), lambda folder: write_hf_folder(bundle, member, folder)
    )


def _folded(
    bundle: BundleReader, member: str, model: str | Factory | None, base: str | os.PathLike[str]
) -> MemberModule:
    """The adapter folded into ``base``: built from the base's config.json (or by ``model``, given
    the folded state dict)."""
    from unipack.format.torch_bridge import to_torch

    with Fold(bundle, member, base) as fold:
        state = {name: to_torch(array, dtype) for name, dtype, array in fold.arrays()}
        config_text = fold.configs.get("config.json")
    if model is not None:
        return _from_factory(member, model, state)
    assert config_text is not None  # Fold refuses a base without config.json
    built = _from_config(
        member,
        config_text,
        state,
        lambda folder: write_folded_folder(bundle, member, folder, base=base),
    )
    built.source += f", folded into {base}"
    return built


# ------------------------------------------------------------------------------------------
# Hugging Face members
# ------------------------------------------------------------------------------------------


def _from_config(
    member: str, config_text: str, state: dict[str, torch.Tensor], write_folder: Callable[[Path], object]
) -> MemberModule:
    """``state`` loaded into the class its config.json names; ``write_folder`` writes the member as
    a Hugging Face folder for transformers to load itself where the state dict's names need it."""
    transformers = _import_transformers(member)
    config = _hf_config(transformers, config_text, member)
    make, name = _model_class(transformers, config)
    example, probe = _config_inputs(config, member)
    source = f"transformers {name}"
    with torch.device("meta"):  # shapes and names only: check the fit before allocating anything
        skeleton = _construct(make, config, member, name)
    try:
        _check_fit(skeleton, state, member, source)
    except ModelError:
        # Maybe a checkpoint in the layout save_pretrained writes, which this transformers renames
        # on load (v5: vit.layers.N.* from vit.encoder.layer.N.*): let transformers itself load it.
        del skeleton
        return MemberModule(
            _via_from_pretrained(transformers, member, make, name, write_folder).eval(),
            example,
            probe,
            f"{source} (from_pretrained)",
        )
    del skeleton
    module = _construct(make, config, member, name)
    _load(module, state, member, source)
    return MemberModule(module.eval(), example, probe, source)


def _via_from_pretrained(
    transformers: ModuleType, member: str, make: Any, name: str, write_folder: Callable[[Path], object]
) -> torch.nn.Module:
    """The member written as a Hugging Face folder (a temp dir) and loaded by ``from_pretrained``,
    demanding a clean load: no missing, unexpected or mismatched keys."""
    import tempfile

    cls: Any = make if isinstance(make, type) else transformers.AutoModel
    with tempfile.TemporaryDirectory(prefix="unipack-hf-") as tmp:
        folder = Path(tmp) / member
        write_folder(folder)
        try:
            module, info = cls.from_pretrained(folder, output_loading_info=True)
        except Exception as exc:
            raise ModelError(
                f"member {member!r}: transformers could not load it as {name}: {one_line(exc)}; "
                f"give --model module:function instead"
            ) from None
    problems = [
        _listed(list(info.get(key) or ()), what)
        for key, what in (
            ("missing_keys", "missing"),
            ("unexpected_keys", "unexpected"),
            ("mismatched_keys", "of another shape"),
        )
        if info.get(key)
    ]
    if problems:
        raise ModelError(
            f"member {member!r} does not fit transformers {name}: {'; '.join(problems)}; check that "
            f"the member and the model match"
        )
    return module


def _import_transformers(member: str) -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise UnipackError(
            f"member {member!r} is a Hugging Face model; building it needs transformers: pip install 'unipack[hf]'"
        ) from None
    return transformers


def _hf_config(transformers: ModuleType, text: str, member: str) -> Any:
    where = f"member {member!r}: its config.json"
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{where} is not valid JSON ({exc}); give --model module:function instead") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise ModelError(f'{where} has no "model_type"; give --model module:function instead')
    try:
        # The config class is found by model_type in transformers' own table (no remote code).
        return transformers.AutoConfig.for_model(**doc)
    except Exception as exc:
        raise ModelError(
            f"{where} (model_type {doc['model_type']!r}) cannot be read by transformers "
            f"{transformers.__version__}: {one_line(exc)}; upgrade transformers or give "
            f"--model module:function"
        ) from None


def _model_class(transformers: ModuleType, config: Any) -> tuple[Callable[[Any], torch.nn.Module], str]:
    """The constructor for ``config``: its ``architectures[0]`` if transformers exports that class."""
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures and isinstance(architectures[0], str) else None
    if name is not None and name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # transformers' lazy import of a name it lists may fail on a missing backend
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, name
    return transformers.AutoModel.from_config, f"AutoModel ({config.model_type})"


def _construct(make: Callable[[Any], torch.nn.Module], config: Any, member: str, name: str) -> torch.nn.Module:
    try:
        return make(config)
    except Exception as exc:
        raise ModelError(
            f"member {member!r}: transformers could not build {name} from its config.json: "
            f"{one_line(exc)}; give --model module:function instead"
        ) from None


def _config_inputs(config: Any, member: str) -> tuple[Inputs, Inputs]:
    """Example (batch 1) and probe (batch 3) inputs for a vision or text model, from its config."""
    image_size, channels = getattr(config, "image_size", None), _count(getattr(config, "num_channels", None))
    vocab = _count(getattr(config, "vocab_size", None))
    positions = _count(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))
    if image_size is not None and channels is not None:
        sides = [image_size] * 2 if _count(image_size) else image_size
        height, width = (
            (_count(sides[0]), _count(sides[1]))
            if isinstance(sides, (list, tuple)) and len(sides) == 2
            else (None, None)
        )
        if height is None or width is None or channels * height * width > MAX_IMAGE_ELEMENTS:
            raise ModelError(
                f"member {member!r}: config.json's image_size {image_size!r} is not a usable image "
                f"size; give --model module:function instead"
            )
        return _images(1, channels, height, width), _images(PROBE_BATCH, channels, height, width)
    if vocab is not None and positions is not None:
        length = min(TEXT_LENGTH, positions)
        return _tokens(1, length, vocab), _tokens(PROBE_BATCH, max(1, 2 * length // 3), vocab)
    raise ModelError(
        f"member {member!r}: cannot make an example input for model_type {config.model_type!r} "
        f"(its config.json has neither image_size and num_channels nor vocab_size and "
        f"max_position_embeddings): give --model module:function (a factory returning the module "
        f"and an example input)"
    )


def _images(batch: int, channels: int, height: int, width: int) -> Inputs:
    generator = torch.Generator().manual_seed(SEED + batch)
    pixels = torch.randn(batch, channels, height, width, generator=generator)
    return Inputs(kwargs={"pixel_values": pixels}, dynamic={"pixel_values": {0: "batch"}})


def _tokens(batch: int, length: int, vocab: int) -> Inputs:
    generator = torch.Generator().manual_seed(SEED + batch)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, (length + 1) // 2 :] = 0  # one padded row, so that the mask really is used
    axes = {0: "batch", 1: "sequence"}
    return Inputs(
        kwargs={"input_ids": ids, "attention_mask": mask}, dynamic={"input_ids": axes, "attention_mask": axes}
    )


def _count(value: object) -> int | None:
    """``value`` if it is a positive int (a size read from a config), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# ------------------------------------------------------------------------------------------
# user factories
# ------------------------------------------------------------------------------------------


def _from_factory(member: str, model: str | Factory, state: dict[str, torch.Tensor]) -> MemberModule:
    spec = model if isinstance(model, str) else getattr(model, "__qualname__", repr(model))
    factory = load_function(model, MODEL) if isinstance(model, str) else model
    where = f"model {spec}"
    try:
        result = factory(dict(state), member)
    except Exception as exc:
        # Chained so that API users still get the user's traceback; the CLI shows the line.
        raise ModelError(f"{where}: {type(exc).__name__}: {one_line(exc)} (member {member!r})") from exc
    expected = "expected (torch.nn.Module, example_inputs)"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ModelError(
            f"{where}: returned {_kind(result)}, {expected} (member {member!r}); return (module, example_input)"
        )
    module, raw_inputs = result
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{where}: returned {_kind(module)} as the module, {expected} (member {member!r})")
    example = _factory_inputs(raw_inputs, where, member)
    source = f"{where} ({type(module).__name__})"
    _load(module, state, member, source)
    return MemberModule(module.eval(), example, _probe(example), source)


def _factory_inputs(raw: object, where: str, member: str) -> Inputs:
    problem = (
        f"{where}: returned {_kind(raw)} as the example input, expected a tensor, a tuple of tensors or "
        f"a dict of tensors (member {member!r})"
    )
    if isinstance(raw, torch.Tensor):
        raw = (raw,)
    if isinstance(raw, (tuple, list)):
        if not raw or not all(isinstance(t, torch.Tensor) for t in raw):
            raise ModelError(problem)
        inputs = Inputs(args=tuple(raw))
    elif isinstance(raw, Mapping):
        if not raw or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, torch.Tensor) for k, v in raw.items()
        ):
            raise ModelError(problem)
        inputs = Inputs(kwargs=dict(raw))
    else:
        raise ModelError(problem)
    batched = {name: {0: "batch"} for name, t in inputs.tensors.items() if t.ndim >= 1}
    return Inputs(inputs.args, inputs.kwargs, batched)


def _probe(example: Inputs) -> Inputs:
    """The example with another batch size: fresh values drawn like the example's (fixed seed).

    Floats get the example's mean and spread, integers its range (token ids stay valid ids).
    """
    generator = torch.Generator().manual_seed(SEED + 1)
    batch = (
        PROBE_BATCH if all(t.shape[0] != PROBE_BATCH for t in example.tensors.values() if t.ndim) else PROBE_BATCH + 1
    )

    def draw(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            return t
        shape = (batch, *t.shape[1:])
        if t.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        if t.dtype.is_floating_point:
            values = t.double()
            values = values[torch.isfinite(values)]
            centre = values.mean().item() if values.numel() else 0.0
            spread = values.std().item() if values.numel() > 1 else 0.0
            spread = spread if spread > 0 else 1.0  # constant (or NaN) examples: unit spread
            return (torch.randn(shape, generator=generator, dtype=torch.float64) * spread + centre).to(t.dtype)
        if t.dtype.is_complex:
            return torch.randn(shape, generator=generator, dtype=t.dtype)
        low, high = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
        return torch.randint(low, high + 1, shape, generator=generator, dtype=t.dtype)

    if example.args:
        return Inputs(args=tuple(draw(t) for t in example.args), dynamic=example.dynamic)
    return Inputs(kwargs={k: draw(t) for k, t in example.kwargs.items()}, dynamic=example.dynamic)


# ------------------------------------------------------------------------------------------
# loading the state dict strictly
# ------------------------------------------------------------------------------------------


def _check_fit(module: torch.nn.Module, state: Mapping[str, torch.Tensor], member: str, source: str) -> None:
    """A ModelError naming every missing, unexpected and wrongly shaped key, if any."""
    own = module.state_dict(keep_vars=True)
    missing = [
        k
        for k in own
        if k not in state
        and not _tied_elsewhere(k, own, state)
        and not _ignored(module, "_keys_to_ignore_on_load_missing", k)
    ]
    unexpected = [k for k in state if k not in own and not _ignored(module, "_keys_to_ignore_on_load_unexpected", k)]
    shapes = [
        f"{k}: bundle {tuple(state[k].shape)} vs module {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        _listed(n, what)
        for n, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if n
    ]
    if problems:
        raise ModelError(
            f"member {member!r} does not fit {source}: {'; '.join(problems)}; check that the member and the model match"
        )


def _load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], member: str, source: str) -> None:
    _check_fit(module, state, member, source)
    own = module.state_dict(keep_vars=True)
    # Keys the check allowed to be unexpected are dropped; missing tied keys share a present tensor.
    # load_state_dict copies (casting to the module's dtype), so the member's tensors stay untouched.
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _tied_elsewhere(key: str, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the module holds ``key``'s tensor under another name that ``state`` provides."""
    tensor = own[key]
    return any(other is tensor and other_key in state for other_key, other in own.items() if other_key != key)


def _ignored(module: torch.nn.Module, attribute: str, key: str) -> bool:
    patterns = getattr(module, attribute, None) or ()
    return any(isinstance(p, str) and re.search(p, key) for p in patterns)


def _listed(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} {what} ({shown})"


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__
