"""Decide, per tensor name, how a merge stores it: shared (decomposed), raw, or exact.

Planning reads only headers, so every shape or dtype conflict is reported before the merge
reads a single tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from unipack.errors import InputError
from unipack.format import dtypes
from unipack.options import DECOMPOSITIONS, MergeOptions
from unipack.schemes.rows import usable_sides
from unipack.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class BaseTensorPlan:
    """Where a tensor's counterpart in the base model is (``merge --base``), as plain data a
    worker process opens by itself."""

    path: str  # the base model's absolute path
    name: str | None  # the tensor's name in the base; None: the base lacks it (or holds it otherwise)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    storage: str  # shared | raw | exact-candidate (exact if all members hold the same bytes)
    reason: str
    schemes: tuple[str, ...]  # for shared: the candidate schemes, the cheapest is kept
    shape: tuple[int, ...] | None  # None if it differs between members
    dtypes: tuple[str, ...]  # per member
    base: BaseTensorPlan | None = None  # set in a merge given a base model (``pack.base_match``)


def plan_tensors(checkpoints: list[Checkpoint], options: MergeOptions) -> list[TensorPlan]:
    """One plan per tensor, in the first member's data order."""
    first = checkpoints[0]
    plans: list[TensorPlan] = []
    mismatched: list[str] = []
    for name in first.tensors:
        entries = [c.tensors[name] for c in checkpoints]
        member_dtypes = tuple(e.dtype for e in entries)
        shapes = {e.shape for e in entries}
        shape = entries[0].shape if len(shapes) == 1 else None
        floats = [d in dtypes.FLOAT_DTYPES for d in member_dtypes]
        if any(floats) and not all(floats):
            odd = next(c for c, f in zip(checkpoints, floats) if f != floats[0])
            raise InputError(
                f"tensor {name!r} is {entries[0].dtype} in {first.path} but "
                f"{odd.tensors[name].dtype} in {odd.path}: float and non-float "
                f"versions of one tensor cannot be merged"
            )
        pattern = options.raw_pattern_for(name)
        if pattern is not None:
            plans.append(TensorPlan(name, "raw", f"--raw {pattern!r}", (), shape, member_dtypes))
        elif shape is None:
            if not options.raw_mismatched:
                mismatched.append(name)
                continue
            plans.append(TensorPlan(name, "raw", "shape differs between members", (), None, member_dtypes))
        elif not floats[0]:
            plans.append(
                TensorPlan(
                    name,
                    "exact-candidate",
                    f"{member_dtypes[0]} tensor, identical in every member",
                    (),
                    shape,
                    member_dtypes,
                )
            )
        elif entries[0].numel == 0:
            plans.append(TensorPlan(name, "raw", "empty tensor", (), shape, member_dtypes))
        else:
            plans.append(TensorPlan(name, "shared", "", _schemes_for(shape, options), shape, member_dtypes))
    if mismatched:
        examples = []
        for name in mismatched[:3]:
            by_shape: dict[tuple[int, ...], Checkpoint] = {}
            for c in checkpoints:
                by_shape.setdefault(c.tensors[name].shape, c)
            examples.append(
                f"{name!r} (" + " vs ".join(f"{list(s)} in {c.path.name}" for s, c in list(by_shape.items())[:2]) + ")"
            )
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise InputError(
            f"tensor shapes differ between members: {'; '.join(examples)}{more}; --strict-shapes "
            f"(raw_mismatched=False) refuses them: drop it to store such task-specific tensors raw per member"
        )
    return plans


def _schemes_for(shape: tuple[int, ...], options: MergeOptions) -> tuple[str, ...]:
    """Candidate schemes: ``flat`` only for vectors, scalars and matrices too large for a Gram."""
    if len(shape) < 2 or options.scheme == "flat" or not usable_sides(shape, options.gram_limit):
        return ("flat",)
    return DECOMPOSITIONS if options.scheme == "auto" else ("rows",)
