"""Score members with the user's eval hook: the original, the bundle's reconstruction, and the
baselines (mean only; per-member SVD at equal bytes), so a report shows what the bytes buy in
the metric users care about (accuracy points), not only in weight error.

Metrics are higher-is-better; a *drop* is original minus method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unipack.analysis.baselines import Arrays, mean_only, per_member_svd
from unipack.bundle.reader import BundleReader
from unipack.errors import InputError
from unipack.sources.checkpoint import Checkpoint, open_checkpoint
from unipack.usercode import EvalHook, pick_metric

if TYPE_CHECKING:
    import torch

#: Table columns, in order.
COLUMNS = ("original", "unipack", "mean-only", "svd")


def as_torch(arrays: Arrays) -> dict[str, torch.Tensor]:
    from unipack.format.torch_bridge import to_torch

    return {name: to_torch(array, dtype) for name, (dtype, array) in arrays.items()}


def score_members(
    bundle: BundleReader,
    hook: EvalHook,
    originals: Mapping[str, Path],
    metric: str | None,
    *,
    baselines: bool = True,
    members: Sequence[str] | None = None,
    on_member: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``{"eval", "metric", "members": {name: {column: scores | None}}, "drops": {...}}``.

    A member's original comes from ``originals`` (its file) or, failing that, from the scores
    recorded in the bundle at merge time (``--max-drop``), marked ``"original_recorded"``.
    """
    table: dict[str, dict[str, dict[str, float] | None]] = {}
    recorded: list[str] = []
    # A LoRA adapter's baselines (the mean update, its own SVD) are recorded per module at merge
    # time, but neither is an adapter of the member's rank that its PEFT state dict could carry.
    baselines = baselines and not bundle.is_lora
    for name in members if members is not None else bundle.members:
        if on_member:
            on_member(name)
        row: dict[str, dict[str, float] | None] = dict.fromkeys(COLUMNS)
        row["unipack"] = hook(bundle.load(name), name)
        if baselines:
            row["mean-only"] = hook(as_torch(mean_only(bundle, name)), name)
        if name in originals:
            original = open_checkpoint(originals[name], name)
            try:
                _check_same_tensors(bundle, name, original)
                row["original"] = hook(original.state_dict(), name)
                if baselines:
                    row["svd"] = hook(as_torch(per_member_svd(bundle, name, original)), name)
            finally:
                original.close()
        else:
            stored = bundle.member(name).metrics or {}
            if "original" in stored:
                row["original"] = dict(stored["original"])
                recorded.append(name)
        table[name] = row
    first = next(iter(table.values()))["unipack"] if table else {}
    chosen = pick_metric(first or {}, metric, hook.spec)
    return {
        "eval": hook.spec,
        "metric": chosen,
        "members": table,
        "original_recorded": recorded,
        "drops": drops(table, chosen),
    }


def drops(table: Mapping[str, Mapping[str, Mapping[str, float] | None]], metric: str) -> dict[str, Any]:
    """Per column: the largest and the mean drop from the original, over members that have both."""
    out: dict[str, Any] = {}
    for column in COLUMNS[1:]:
        values = []
        for row in table.values():
            original, scores = row.get("original"), row.get(column)
            if original and scores and metric in scores and metric in original:
                values.append(original[metric] - scores[metric])
        out[column] = (
            {"worst": max(values), "mean": sum(values) / len(values), "members": len(values)} if values else None
        )
    return out


def _check_same_tensors(bundle: BundleReader, name: str, original: Checkpoint) -> None:
    if set(original.tensors) != {entry[0] for entry in bundle.tensor_entries(name)}:
        raise InputError(
            f"{original.path}: its tensor names differ from member {name!r} of {bundle.path}; "
            f"is it really that member's original?"
        )
