"""``unipack export --onnx``: a member as an ONNX model, checked against torch before it counts.

The member is built as a torch module (unipack.export.torch_module), exported with a dynamic batch axis
(and sequence axis for text models), written atomically, then run with ONNX Runtime's CPU
provider on the example input and on a second input of another batch size (and length). Every
output is compared with the torch module's on the same inputs; a difference over ``atol`` is an
error, raised after writing, so the file stays there to be inspected.

Models whose weights exceed ``external_data_threshold`` are written with their weights in
``<name>.data`` beside ``<name>`` (ONNX "external data"): a single protobuf cannot hold 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unipack.errors import (
    ModelError,
    OnnxCheckError,
    OptionsError,
    OutputExistsError,
    UnipackError,
)
from unipack.errors import first_line as one_line
from unipack.export.torch_module import Factory, Inputs, MemberModule, build_module
from unipack.format.atomic import check_writable

if TYPE_CHECKING:
    from unipack.bundle.reader import BundleReader

#: ONNX opset written: ONNX Runtime supports it from 1.14 on (the extra asks for >= 1.17).
OPSET = 18
#: Weights above this many bytes go to external data. torch's own exporter switches at 1.5 GiB,
#: leaving room under protobuf's 2 GiB limit for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class OnnxRun:
    """One input run through both torch and ONNX Runtime."""

    inputs: str  # "batch 3, sequence 10"
    max_abs_diff: float
    max_rel_diff: float  # largest |onnx - torch| over the largest |torch| of that output


@dataclass(frozen=True)
class OnnxCheck:
    """What ``export_onnx`` wrote and how closely ONNX Runtime reproduces the torch module."""

    path: Path
    files: tuple[Path, ...]  # the model, and its external data file if any
    member: str
    source: str  # how the module was built, e.g. "transformers ViTForImageClassification"
    outputs: tuple[str, ...]
    runs: tuple[OnnxRun, ...]
    atol: float
    provider: str
    opset: int = OPSET

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.runs)

    @property
    def max_rel_diff(self) -> float:
        return max(r.max_rel_diff for r in self.runs)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def lines(self) -> list[str]:
        """The check as the CLI prints it."""
        size = sum(f.stat().st_size for f in self.files if f.exists())
        data = f" + external data {self.files[1].name}" if len(self.files) > 1 else ""
        out = [
            (f"member {self.member!r} ({self.source}) -> {self.path}{data}: opset {self.opset}, {size / 1024:.0f} KiB"),
            f"ONNX Runtime {self.provider} vs torch, outputs: {', '.join(self.outputs)}",
        ]
        width = max(len(r.inputs) for r in self.runs)
        out += [
            f"  {r.inputs:<{width}}  max abs diff {r.max_abs_diff:.3g}, max rel diff {r.max_rel_diff:.3g}"
            for r in self.runs
        ]
        verdict = "PASS" if self.passed else "FAIL"
        sign = "<=" if self.passed else ">"
        out.append(f"{verdict}: max abs diff {self.max_abs_diff:.3g} {sign} atol {self.atol:g}")
        return out


def export_onnx(
    bundle: BundleReader,
    member: str,
    out: str | os.PathLike[str],
    *,
    model: str | Factory | None = None,
    base: str | os.PathLike[str] | None = None,
    atol: float = 1e-4,
    force: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> OnnxCheck:
    """Export ``member`` of ``bundle`` to ``out`` and check it with ONNX Runtime (see the module docstring).

    ``model`` is a factory SPEC or callable (unipack.export.torch_module) for members without a Hugging
    Face config; ``base``, for a LoRA bundle, the base model's folder that the adapter is folded into
    (unipack.export.folded). Raises OnnxCheckError, after writing, when an output differs by more
    than ``atol``.
    """
    if not (atol >= 0 and math.isfinite(atol)):
        raise OptionsError(f"--atol {atol}: give a finite tolerance >= 0, e.g. 1e-4")
    bundle.member(member)  # an unknown member is the first thing to say
    onnxruntime = _import_onnx()
    path = Path(out)
    data_path = path.with_name(path.name + ".data")
    check_writable(path, force=force, inputs=[bundle.path])  # before any heavy work
    if data_path.exists() and not force:
        raise OutputExistsError(f"{data_path}: already exists; pass --force (force=True) to overwrite it")
    built = build_module(bundle, member, model, base=base)
    config = getattr(built.module, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a key/value cache is a generation detail, not part of the graph checked
    expected = [_flatten(inputs(built.module), "output") for inputs in (built.example, built.probe)]
    names = [name for name, _ in expected[0]]
    program = _export(built, names, member)
    external = _initializer_bytes(program) > external_data_threshold
    files = _write(program, path, data_path if external else None)

    session = _session(onnxruntime, path)
    if len(session.get_outputs()) != len(names):
        raise ModelError(
            f"{path}: the ONNX model has {len(session.get_outputs())} outputs but the torch module "
            f"returns {len(names)} tensors ({', '.join(names)}); the file was kept"
        )
    runs = []
    for inputs, reference in zip((built.example, built.probe), expected):
        got = _run(session, inputs, path)
        abs_diff, rel_diff = _differences([t for _, t in reference], got)
        runs.append(OnnxRun(inputs.describe(), abs_diff, rel_diff))
    check = OnnxCheck(path, files, member, built.source, tuple(names), tuple(runs), atol, session.get_providers()[0])
    if not check.passed:
        raise OnnxCheckError(
            f"{path}: ONNX Runtime's outputs differ from torch's by {check.max_abs_diff:.3g} "
            f"(max abs diff; max rel diff {check.max_rel_diff:.3g}) > atol {atol:g} on member "
            f"{member!r}; the file was kept: inspect it, or raise --atol if that is acceptable",
            check,
        )
    return check


def _import_onnx() -> ModuleType:
    """onnxruntime, after checking that the exporter's own dependencies are there too."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
        import onnx_ir  # noqa: F401 - ships with onnxscript; writes the model
        import onnxruntime
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as exc:
        raise UnipackError(
            f"ONNX export needs onnx and onnxruntime (missing: {exc.name}): pip install 'unipack[onnx]'"
        ) from None
    return onnxruntime


def _flatten(value: Any, name: str) -> list[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor of a module's output, in the exporter's order.

    Hugging Face outputs are ordered dicts (``logits``, ...) whose unset fields are absent; the
    exporter flattens them the same way.
    """
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items() if v is not None]
        return [pair for k, v in items for pair in _flatten(v, k if name == "output" else f"{name}.{k}")]
    if isinstance(value, (tuple, list)):
        return [pair for i, v in enumerate(value) for pair in _flatten(v, f"{name}_{i}")]
    raise ModelError(
        f"the module returned {type(value).__name__} in its output ({name}); ONNX export needs "
        f"tensors, tuples or dicts of tensors"
    )


def _export(built: MemberModule, output_names: list[str], member: str) -> Any:
    """The ``ONNXProgram`` of ``built.module`` with dynamic batch (and sequence) axes.

    The dynamo exporter (torch.export), not the TorchScript one: it is the exporter torch
    maintains (the TorchScript exporter is deprecated since torch 2.9), it exports ViT and BERT
    with dynamic batch and sequence axes, and it gives the in-memory model that external data
    needs without a 2 GB protobuf round trip.
    """
    example = built.example
    dynamic: Any = example.dynamic if example.kwargs else tuple(example.dynamic.get(n) for n in example.names)
    try:
        with _quiet():
            return torch.onnx.export(
                built.module,
                example.args,
                kwargs=example.kwargs or None,
                dynamo=True,
                input_names=example.names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as exc:
        raise ModelError(
            f"member {member!r}: torch.onnx.export failed on {built.source}: {type(exc).__name__}: "
            f"{one_line(exc, 300)}; a module must be traceable by torch.export with a dynamic batch "
            f"axis"
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's exporter chatter (optional torchvision ops, internal deprecations).

    It is about torch's internals, not about the user's model; failures still raise.
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _initializer_bytes(program: Any) -> int:
    return sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)


def _write(program: Any, path: Path, data_path: Path | None) -> tuple[Path, ...]:
    """Write the model (and its external data) into a temp folder beside ``path``, then rename.

    The data file is renamed first, so a model file in place never points at missing data; each
    file replaces any old one atomically. A failure leaves no temp files and the old files intact.
    """
    import onnx_ir

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise UnipackError(f"{path}: cannot create a temp folder in {path.parent} ({exc.strerror or exc})") from None
    try:
        staged = tmp / path.name
        # onnx_ir is what torch's exporter saves with; its external_data names a file relative to
        # the model, recorded as the tensors' "location": exactly <name>.data beside <name>.
        onnx_ir.save(program.model, staged, external_data=data_path.name if data_path else None)
        moves = ([(tmp / data_path.name, data_path)] if data_path else []) + [(staged, path)]
        for src, _ in moves:
            _fsync(src)
        for src, dst in moves:
            os.replace(src, dst)
    except OSError as exc:
        raise UnipackError(
            f"{path}: write failed ({exc.strerror or exc}); the previous file, if any, is intact"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync(path.parent)
    return (path, data_path) if data_path else (path,)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _session(onnxruntime: ModuleType, path: Path) -> Any:
    try:
        return onnxruntime.InferenceSession(str(path), providers=[PROVIDER])
    except Exception as exc:
        raise ModelError(
            f"{path}: ONNX Runtime cannot load the exported model: {one_line(exc)}; the file was kept"
        ) from None


def _run(session: Any, inputs: Inputs, path: Path) -> list[np.ndarray]:
    tensors = inputs.tensors
    feed = {}
    for spec in session.get_inputs():
        if spec.name not in tensors:
            raise ModelError(
                f"{path}: the ONNX model wants an input {spec.name!r} that the example does not "
                f"have ({', '.join(tensors)}); the file was kept"
            )
        feed[spec.name] = tensors[spec.name].detach().cpu().numpy()
    try:
        return list(session.run(None, feed))
    except Exception as exc:
        raise ModelError(
            f"{path}: ONNX Runtime failed on the input with {inputs.describe()}: {one_line(exc)}; "
            f"the export may not have kept that axis dynamic; the file was kept"
        ) from None


def _differences(reference: list[torch.Tensor], got: list[np.ndarray]) -> tuple[float, float]:
    """Max abs difference and max difference relative to each output's largest magnitude.

    Equal values (infinities, NaN where torch has NaN too) differ by 0; a NaN on one side only
    by infinity, so that it fails any tolerance.
    """
    worst_abs = worst_rel = 0.0
    for want, have in zip(reference, got):
        want64 = want.detach().cpu().double().numpy()
        have64 = np.asarray(have, dtype=np.float64)
        if want64.shape != have64.shape:
            return math.inf, math.inf
        if want64.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            same = (want64 == have64) | (np.isnan(want64) & np.isnan(have64))
            gaps = np.where(same, 0.0, np.abs(have64 - want64))
        diff = float(np.max(np.nan_to_num(gaps, nan=math.inf)))
        finite = want64[np.isfinite(want64)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst_abs, worst_rel
