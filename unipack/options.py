"""Merge options: one typed, frozen model shared by the Python API and the CLI.

The CLI generates its ``merge`` flags from the field metadata below (see ``cli.py``), and the
bundle records ``MergeOptions.to_dict()`` in its manifest, so the three cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from unipack.errors import OptionsError
from unipack.format.codec import CODECS as CODEC_REGISTRY
from unipack.format.dtypes import STORAGE_DTYPES

#: The default fidelity target: every member's relative Frobenius error on every tensor.
DEFAULT_MAX_ERROR = 0.01

#: The decompositions ``--scheme`` chooses between (``unipack.schemes.rows`` and ``.flat``).
DECOMPOSITIONS = ("rows", "flat")
SCHEMES = ("auto", *DECOMPOSITIONS)
DTYPES = tuple(STORAGE_DTYPES)
#: zstd first: the default.
CODECS = tuple(sorted(CODEC_REGISTRY, key=lambda name: name != "zstd"))
LOSSLESS = ("auto", "full", "sample", "off")


def rule_text(rule: str, *, rank: object = None, energy: object = None, max_error: object = None) -> str:
    """The rank rule in words, as reasons and reports print it: ``fixed rank 4``, ``max-error 0.01``."""
    if rule == "rank":
        return f"fixed rank {rank}"
    if rule == "energy":
        return f"energy {energy}"
    return f"max-error {max_error}"


def _opt(default: Any, flag: str, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class MergeOptions:
    """How to pack members. Exactly one rank rule applies: ``rank``, ``energy`` or ``max_error``."""

    max_error: float | None = _opt(
        None,
        "--max-error",
        f"Per-tensor budget: smallest rank at which every member's relative error "
        f"||W-Ŵ||/||W|| is <= E (default {DEFAULT_MAX_ERROR} unless --rank/--energy is given).",
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
    lossless: str = _opt(
        "auto",
        "--lossless-baseline",
        "Measure the inputs compressed losslessly (zstd -19) "
        "for the report: full, sample (an estimate from 16 MiB), off, or auto (full up "
        "to 64 MiB of inputs, else sample).",
        choices=LOSSLESS,
    )

    def __post_init__(self) -> None:
        given = [n for n in ("max_error", "rank", "energy") if getattr(self, n) is not None]
        if len(given) > 1:
            flags = " and ".join("--" + n.replace("_", "-") for n in given)
            raise OptionsError(f"options {flags} contradict each other: give one rank rule")
        if not given:
            object.__setattr__(self, "max_error", DEFAULT_MAX_ERROR)
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise OptionsError(f"--max-error {self.max_error}: must be in [0, 1) (0.01 means 1% relative error)")
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
        for pattern in self.raw:
            if not isinstance(pattern, str) or not pattern:
                raise OptionsError(f"--raw {pattern!r}: must be a non-empty glob pattern")

    @property
    def rule(self) -> str:
        """Which rank rule applies: ``max-error``, ``rank`` or ``energy``."""
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        return "max-error"

    @property
    def rule_text(self) -> str:
        return rule_text(self.rule, rank=self.rank, energy=self.energy, max_error=self.max_error)

    def raw_pattern_for(self, tensor: str) -> str | None:
        """The first ``--raw`` pattern that names ``tensor``, if any."""
        for pattern in self.raw:
            if fnmatch.fnmatchcase(tensor, pattern):
                return pattern
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["raw"] = list(self.raw)
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
        return cls(**kwargs)
