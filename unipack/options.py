"""Merge options: one typed, frozen model shared by the Python API and the CLI.

The CLI generates its ``merge`` flags from the field metadata below (see ``cli.py``), and the
bundle records ``MergeOptions.to_dict()`` in its manifest, so the three cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from unipack.errors import OptionsError
from unipack.format.codec import SELECTABLE as CODEC_REGISTRY
from unipack.format.dtypes import STORAGE_DTYPES

#: The default fidelity target: every member's relative Frobenius error on every tensor, against
#: what its fine-tune changed (``max_delta_error``: the bound that decides, measured to keep the
#: accuracy of real fine-tunes, README "Measured") and, as a cap for members far from the others,
#: against its weight (``max_error``). Both apply when neither --max-error, --max-delta-error,
#: --rank nor --energy is given.
DEFAULT_MAX_ERROR = 0.05
DEFAULT_MAX_DELTA_ERROR: float | None = 0.4
#: LoRA adapters are already deltas, measured against their own update: their default is this
#: bound alone (relative to each adapter's update). 0.1 kept the accuracy of real MiniLM LoRA
#: adapters (tools/bench_lora_minilm.py: 0.05 points mean, 0.80 worst, at 8.5x; 0.01 stored them
#: at 1.1x, worse than a fp16 cast of the files).
LORA_DEFAULT_MAX_ERROR = 0.1
#: The delta bound is never tighter than this share of the weight, about fp16's precision (2^-11).
DELTA_FLOOR = 2.0**-11

#: The decompositions ``--scheme`` chooses between (``unipack.schemes.rows`` and ``.flat``).
DECOMPOSITIONS = ("rows", "flat")
SCHEMES = ("auto", *DECOMPOSITIONS)
DTYPES = tuple(STORAGE_DTYPES)
#: zstd first: the default.
CODECS = tuple(sorted(CODEC_REGISTRY, key=lambda name: name != "zstd"))
LOSSLESS = ("auto", "full", "sample", "off")


def rule_text(
    rule: str, *, rank: object = None, energy: object = None, max_error: object = None, max_delta_error: object = None
) -> str:
    """The rule in words, as reasons and reports print it: ``fixed rank 4``, ``max-error 0.01``,
    ``max-error 0.01 and max-delta-error 0.2``."""
    if rule == "rank":
        return f"fixed rank {rank}"
    if rule == "energy":
        return f"energy {energy}"
    bounds = [f"max-error {max_error}"] if max_error is not None else []
    bounds += [f"max-delta-error {max_delta_error}"] if max_delta_error is not None else []
    return " and ".join(bounds) or "max-error None"


@dataclass(frozen=True)
class ErrorBudget:
    """The error rule: every member, on every tensor, within ``max_error`` of its weight
    (||W-Ŵ||/||W||) and within ``max_delta_error`` of what its fine-tune changed
    (||W-Ŵ||/||W-M||, M the members' mean); one or both are set."""

    max_error: float | None = None
    max_delta_error: float | None = None

    def absolute(self, norm: float, delta_norm: float) -> float:
        """A member's budget for ||W - Ŵ||: the tighter of the two bounds. The delta bound never
        asks for less than ``DELTA_FLOOR`` of the weight: a member at (or next to) the mean would
        otherwise have to be stored exactly, to below the precision any checkpoint is shipped at."""
        bounds = []
        if self.max_error is not None:
            bounds.append(self.max_error * (norm if norm > 0.0 else 1.0))
        if self.max_delta_error is not None:
            bounds.append(max(self.max_delta_error * delta_norm, DELTA_FLOOR * norm))
        return min(bounds)

    def met(self, errors: Sequence[float], delta_errors: Sequence[float] | None = None) -> bool:
        """Whether every member is within both bounds (``errors``: ||W-Ŵ||/||W|| each,
        ``delta_errors``: ||W-Ŵ||/||W-M|| each)."""
        if self.max_error is not None and max(errors, default=0.0) > self.max_error:
            return False
        if self.max_delta_error is not None:
            assert delta_errors is not None
            return all(d <= self.max_delta_error or e <= DELTA_FLOOR for e, d in zip(errors, delta_errors))
        return True

    @property
    def text(self) -> str:
        return rule_text("max-error", max_error=self.max_error, max_delta_error=self.max_delta_error)


def _opt(default: Any, flag: str, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class MergeOptions:
    """How to pack members. One rule applies: ``rank``, ``energy``, or error bounds (``max_error``
    and/or ``max_delta_error``, every member within both)."""

    max_error: float | None = _opt(
        None,
        "--max-error",
        f"Per-tensor budget: every member's relative error ||W-Ŵ||/||W|| is <= E. Default: "
        f"{DEFAULT_MAX_ERROR} together with --max-delta-error {DEFAULT_MAX_DELTA_ERROR} (LoRA adapters: "
        f"{LORA_DEFAULT_MAX_ERROR} of each update, alone), unless a rule option (--max-error, "
        "--max-delta-error, --rank, --energy) is given.",
        type=float,
    )
    max_delta_error: float | None = _opt(
        None,
        "--max-delta-error",
        "Per-tensor budget relative to what the fine-tune changed: every member's ||W-Ŵ||/||W-M|| "
        "is <= D (M: the members' mean). The right axis for gentle fine-tunes, where 1% of the "
        f"weight can be the whole fine-tune. With --max-error, both hold (default: {DEFAULT_MAX_DELTA_ERROR} "
        f"with --max-error {DEFAULT_MAX_ERROR}).",
        type=float,
    )
    rank: int | None = _opt(
        None, "--rank", "Fixed rank K for every shared tensor (lossy: errors are recorded, not bounded).", type=int
    )
    energy: float | None = _opt(
        None,
        "--energy",
        "Smallest rank keeping fraction F of each tensor's centred variance (lossy: errors are recorded, not bounded).",
        type=float,
    )
    scheme: str = _opt(
        "auto",
        "--scheme",
        "Decomposition: rows (mode-1 HOSVD of stacked matrix rows), flat "
        "(whole tensor as one vector), auto (per tensor, whichever of the two needs fewer bytes; "
        "1-D tensors always use flat).",
        choices=SCHEMES,
    )
    dtype: str = _opt(
        "float32",
        "--dtype",
        "Precision of bases and coefficients (the error budget is checked after rounding).",
        choices=DTYPES,
    )
    raw: tuple[str, ...] = _opt(
        (),
        "--raw",
        "Store tensors matching this glob raw per member (repeatable), e.g. --raw 'classifier.*'.",
        multiple=True,
    )
    raw_mismatched: bool = _opt(
        True,
        "--raw-mismatched/--strict-shapes",
        "Tensors whose shape differs between members (task-specific heads, first layers with other "
        "input channels) are stored raw per member (the default); --strict-shapes refuses them instead.",
    )
    quantize: bool = _opt(
        True,
        "--quantize/--no-quantize",
        "Also try, per tensor, the mean plus each member's quantized delta (storage delta) and keep "
        "it where it is the cheapest storage meeting the budget (--max-error or --max-delta-error); "
        "for LoRA adapters, each adapter's own factors at a few bits (lora form quant).",
    )
    codec: str = _opt("zstd", "--codec", "Lossless codec for stored blobs.", choices=CODECS)
    zstd_level: int = _opt(3, "--zstd-level", "zstd level (1-22).", type=int)
    gram_limit: int = _opt(
        4096,
        "--gram-limit",
        "Largest side length of the Gram matrix the rows scheme may "
        "form; a matrix with both sides larger uses the flat scheme.",
        type=int,
    )

    baselines: bool = _opt(
        True,
        "--baselines/--no-baselines",
        "Also measure, per member and tensor, the "
        "per-member truncated SVD at equal bytes (for `unipack report`; costs one small "
        "eigendecomposition per member and tensor).",
    )
    exact_tier: bool = _opt(
        False,
        "--lossless/--lossy",
        "Also store a lossless tier: per member and tensor, the sha256 of the original and a "
        "residual against the stored mean or a sibling member, so `extract --exact` gives every "
        "member back bit for bit (plain `extract` still gives the lossy member). With --rank 0 the "
        "lossy tier is the mean alone: the smallest lossless bundle.",
    )
    lossless: str = _opt(
        "auto",
        "--lossless-baseline",
        "Measure the inputs compressed losslessly (zstd -1 of byte-grouped floats, every "
        "byte) for the report: full (also auto), sample (an estimate from 16 MiB), or off. "
        "With --lossless, also ZipNN where the zipnn package is installed.",
        choices=LOSSLESS,
    )
    #: Per-tensor error bounds replacing the rule's for the tensors named (``merge --size``
    #: allocates them; no CLI flag): ``(name, max_error, max_delta_error)`` sorted by name, given
    #: as that or as a mapping ``{name: (max_error, max_delta_error)}``; recorded in the manifest as
    #: ``{name: {"max_error": ..., "max_delta_error": ...}}`` (spec 3.4).
    tensor_bounds: tuple[tuple[str, float | None, float | None], ...] = field(default=(), metadata={})

    def __post_init__(self) -> None:
        fixed = [n for n in ("rank", "energy") if getattr(self, n) is not None]
        bounds = [n for n in ("max_error", "max_delta_error") if getattr(self, n) is not None]
        if len(fixed) > 1 or (fixed and bounds):
            flags = " and ".join("--" + n.replace("_", "-") for n in bounds + fixed)
            raise OptionsError(
                f"options {flags} contradict each other: give --rank, --energy, or error bounds "
                f"(--max-error and/or --max-delta-error)"
            )
        if not fixed and not bounds:
            object.__setattr__(self, "max_error", DEFAULT_MAX_ERROR)
            object.__setattr__(self, "max_delta_error", DEFAULT_MAX_DELTA_ERROR)
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise OptionsError(f"--max-error {self.max_error}: must be in [0, 1) (0.01 means 1% relative error)")
        if self.max_delta_error is not None and not 0 <= self.max_delta_error < 1:
            raise OptionsError(
                f"--max-delta-error {self.max_delta_error}: must be in [0, 1) "
                f"(0.2: each member's error is at most 20% of its difference from the mean)"
            )
        if self.rank is not None and self.rank < 0:
            raise OptionsError(f"--rank {self.rank}: must be >= 0")
        if self.energy is not None and not 0 <= self.energy <= 1:
            raise OptionsError(f"--energy {self.energy}: must be in [0, 1]")
        for name, allowed in (("scheme", SCHEMES), ("dtype", DTYPES), ("codec", CODECS), ("lossless", LOSSLESS)):
            if getattr(self, name) not in allowed:
                raise OptionsError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not 1 <= self.zstd_level <= 22:
            raise OptionsError(f"--zstd-level {self.zstd_level}: must be in 1..22")
        if self.gram_limit < 1:
            raise OptionsError(f"--gram-limit {self.gram_limit}: must be >= 1")
        object.__setattr__(self, "raw", tuple(self.raw))
        object.__setattr__(self, "tensor_bounds", _tensor_bounds(self.tensor_bounds, self.rule))
        for pattern in self.raw:
            if not isinstance(pattern, str) or not pattern:
                raise OptionsError(f"--raw {pattern!r}: must be a non-empty glob pattern")

    @property
    def is_default_rule(self) -> bool:
        """Whether the error bounds are the defaults (none of the rule options was changed)."""
        return not self.tensor_bounds and (self.rank, self.energy, self.max_error, self.max_delta_error) == (
            None,
            None,
            DEFAULT_MAX_ERROR,
            DEFAULT_MAX_DELTA_ERROR,
        )

    def for_adapters(self) -> MergeOptions:
        """These options for PEFT adapters: the default rule becomes the LoRA default (an adapter
        is already a delta, its errors measured against its own update: the delta bound has
        nothing to add); any rule the user gave stays."""
        if not self.is_default_rule:
            return self
        return dataclasses.replace(self, max_error=LORA_DEFAULT_MAX_ERROR, max_delta_error=None)

    @property
    def rule(self) -> str:
        """Which rule applies: ``max-error`` (error bounds: ``budget``), ``rank`` or ``energy``."""
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        return "max-error"

    @property
    def budget(self) -> ErrorBudget | None:
        """The error bounds of a ``max-error`` rule (None for a rank or energy rule)."""
        if self.rule != "max-error":
            return None
        return ErrorBudget(self.max_error, self.max_delta_error)

    @property
    def rule_text(self) -> str:
        return rule_text(
            self.rule,
            rank=self.rank,
            energy=self.energy,
            max_error=self.max_error,
            max_delta_error=self.max_delta_error,
        )

    def for_tensor(self, tensor: str) -> MergeOptions:
        """These options as they apply to ``tensor``: its own bounds where ``tensor_bounds``
        names it (and no per-tensor bounds left), else these options."""
        bounds = self._bounds_by_tensor.get(tensor)
        if bounds is None:
            return self
        return dataclasses.replace(self, max_error=bounds[0], max_delta_error=bounds[1], tensor_bounds=())

    @functools.cached_property
    def _bounds_by_tensor(self) -> dict[str, tuple[float | None, float | None]]:
        return {name: (e, d) for name, e, d in self.tensor_bounds}

    def raw_pattern_for(self, tensor: str) -> str | None:
        """The first ``--raw`` pattern that names ``tensor``, if any."""
        for pattern in self.raw:
            if fnmatch.fnmatchcase(tensor, pattern):
                return pattern
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["raw"] = list(self.raw)
        del d["tensor_bounds"]
        if self.tensor_bounds:  # written only where set: a bundle without keeps its options as before
            d["tensor_bounds"] = tensor_bounds_doc(self.tensor_bounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise OptionsError(f"unknown merge options: {', '.join(sorted(unknown))}")
        kwargs = dict(d)
        if "raw" in kwargs:
            kwargs["raw"] = tuple(kwargs["raw"])
        if "tensor_bounds" in kwargs:
            recorded = kwargs["tensor_bounds"]
            shape = "a list of {max_error, max_delta_error, tensors: [names]}"
            if not isinstance(recorded, list) or not all(
                isinstance(g, dict) and isinstance(g.get("tensors"), list) for g in recorded
            ):
                raise OptionsError(f"tensor_bounds: expected {shape}")
            kwargs["tensor_bounds"] = tuple(
                (n, g.get("max_error"), g.get("max_delta_error")) for g in recorded for n in g["tensors"]
            )
        return cls(**kwargs)


def tensor_bounds_doc(
    tensor_bounds: Sequence[tuple[str, float | None, float | None]],
) -> list[dict[str, Any]]:
    """Per-tensor bounds as the manifest records them (spec 3.4): one entry per pair of bounds,
    ``{"max_error", "max_delta_error", "tensors": [names]}``, loosest first."""
    groups: dict[tuple[float | None, float | None], list[str]] = {}
    for name, max_error, max_delta_error in tensor_bounds:
        groups.setdefault((max_error, max_delta_error), []).append(name)
    order = sorted(groups, key=lambda b: [-(x if x is not None else -1.0) for x in b])
    return [{"max_error": b[0], "max_delta_error": b[1], "tensors": sorted(groups[b])} for b in order]


def _tensor_bounds(given: object, rule: str) -> tuple[tuple[str, float | None, float | None], ...]:
    """``MergeOptions.tensor_bounds`` checked and in its canonical form (sorted by name)."""
    items = list(given.items()) if isinstance(given, Mapping) else [(t[0], tuple(t[1:])) for t in given]  # type: ignore[attr-defined]
    if items and rule != "max-error":
        raise OptionsError("per-tensor bounds (tensor_bounds) need error bounds, not --rank or --energy")
    out = []
    for name, bounds in items:
        if not isinstance(name, str) or not name or len(bounds) != 2:
            raise OptionsError(f"tensor_bounds {name!r}: expected a tensor name and (max_error, max_delta_error)")
        max_error, max_delta_error = bounds
        if max_error is None and max_delta_error is None:
            raise OptionsError(f"tensor_bounds {name!r}: give max_error and/or max_delta_error")
        for flag, value in (("max_error", max_error), ("max_delta_error", max_delta_error)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1
            ):
                raise OptionsError(f"tensor_bounds {name!r}: {flag} {value!r} must be a number in [0, 1)")
        out.append(
            (
                name,
                None if max_error is None else float(max_error),
                None if max_delta_error is None else float(max_delta_error),
            )
        )
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise OptionsError("tensor_bounds: a tensor is named twice")
    return tuple(sorted(out))
