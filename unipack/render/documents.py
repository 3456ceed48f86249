"""The ``--json`` twins of the summaries that ``merge``, ``add`` and ``export`` print.

Each document carries every number its table shows (and the full lists the table abbreviates),
so a script never has to parse a table.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from unipack.analysis.report import recorded_alternatives, rule_text
from unipack.format.manifest import BaseReference
from unipack.pack.add import AddResult
from unipack.pack.base_match import BaseMatch
from unipack.pack.merge import MergeResult

if TYPE_CHECKING:  # importing it at run time would load torch for every command
    from unipack.export.onnx import OnnxCheck


def worst_member(result: MergeResult) -> tuple[str | None, float]:
    """The member with the largest recorded relative error on any tensor, and that error."""
    return max(
        ((m.name, max(m.errors, default=0.0)) for m in result.manifest.members),
        key=lambda x: x[1],
        default=(None, 0.0),
    )


def merge_document(result: MergeResult) -> dict[str, Any]:
    """What ``unipack merge`` wrote: the merge summary's rows, with the full list of task-specific tensors."""
    name, worst = worst_member(result)
    evaluation = result.manifest.stats.get("evaluation")
    return {
        "path": str(result.path),
        "members": [m.name for m in result.manifest.members],
        "input_bytes": result.input_bytes,
        "file_bytes": result.file_bytes,
        "ratio": result.ratio,
        "worst_error": worst,
        "worst_member": name,
        "rule": rule_text(result.manifest.options),
        "options": result.manifest.options,
        "task_specific": result.shape_mismatched,
        "alternatives": _alternatives_document(result),
        "evaluation": evaluation if isinstance(evaluation, dict) else None,
        "size_target": sized if isinstance(sized := result.manifest.stats.get("size_target"), dict) else None,
        "seconds": result.seconds,
        "peak_rss_bytes": result.peak_rss_bytes,
        **({"base": base_document(result.manifest.base, result.base)} if result.base is not None else {}),
    }


def base_document(base: BaseReference | None, match: BaseMatch | None = None) -> dict[str, Any]:
    """The referenced base model (``None``: given to the merge, but no tensor uses it): what every
    ratio of the bundle leaves out (``ratio_excludes_base_bytes``)."""
    doc: dict[str, Any] = {"referenced": base is not None}
    if base is not None:
        doc.update(
            source=base.source,
            sha256=base.sha256,
            tensors=len(base.tensors),
            ratio_excludes_base_bytes=base.nbytes,
        )
    if match is not None:
        doc.update(prefix=match.prefix, members_prefixed=match.members_prefixed, matched=match.matched)
        doc["unmatched"] = list(match.unmatched)
    return doc


def _alternatives_document(result: MergeResult) -> dict[str, Any] | None:
    """The one-line alternatives measured during the merge (the report's table), or None."""
    a = recorded_alternatives(result.manifest)
    return None if a is None else dataclasses.asdict(a)


def add_document(result: AddResult) -> dict[str, Any]:
    """What ``unipack add`` stored: the add summary's rows, with every tensor's outcome."""
    over = [o for o in result.outcomes if o.over_budget]
    kinds = {o.kind for o in result.outcomes}
    return {
        "path": str(result.path),
        "member": result.member,
        "source": result.record.source,
        "source_bytes": result.record.source_bytes,
        # every outcome kind, those of newer storage schemes too; "override": raw for this member only
        "tensors": {kind: result.count(kind) for kind in sorted({"projected", "raw", "exact", "override"} | kinds)},
        "worst_error": result.worst_error,
        "worst_tensor": result.worst_tensor,
        "rule": rule_text(result.options.to_dict()),
        "budget_met": result.budget_met,
        "over_budget": [o.tensor for o in over],
        "over_budget_bytes": sum(o.stored_bytes for o in over),
        "bytes_added": result.bytes_added,
        "file_bytes_before": result.file_bytes_before,
        "file_bytes_after": result.file_bytes_after,
        "input_bytes": result.input_bytes,
        "ratio": result.ratio,
        **({"ratio_excludes_base_bytes": result.base_bytes} if result.base_bytes is not None else {}),
        "bundle_worst_error": result.bundle_worst_error,
        "lora": result.lora,
        "format_version": result.format_version,
        "outcomes": [dataclasses.asdict(o) for o in result.outcomes],
    }


def onnx_document(check: OnnxCheck) -> dict[str, Any]:
    """What ``unipack export --onnx`` wrote and how closely ONNX Runtime reproduces torch."""
    return {
        "member": check.member,
        "path": str(check.path),
        "files": [str(f) for f in check.files],
        "source": check.source,
        "opset": check.opset,
        "provider": check.provider,
        "outputs": list(check.outputs),
        "runs": [dataclasses.asdict(r) for r in check.runs],
        "max_abs_diff": check.max_abs_diff,
        "max_rel_diff": check.max_rel_diff,
        "atol": check.atol,
        "passed": check.passed,
    }
