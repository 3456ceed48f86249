"""``unipack report``: what a bundle costs, how faithful every member is, and whether the shared
subspace beats the simple answers (the mean alone; each member's own SVD at equal bytes).

Everything here is computed from the bundle's header and manifest (numbers recorded at merge
time), plus, on request, the members' originals and a user's eval function. ``Report.to_dict``
is what ``--json`` prints: it carries every number the terminal tables show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unipack.analysis.baselines import measure_member
from unipack.analysis.scoring import score_members
from unipack.bundle.summary import blob_parts, header_parts
from unipack.core.alternatives import BASE_METHODS as BASE_ALTERNATIVES
from unipack.core.alternatives import LABELS as ALTERNATIVE_LABELS
from unipack.core.alternatives import METHODS as ALTERNATIVES
from unipack.errors import InputError
from unipack.format.manifest import FidelityRecord, Manifest, MemberRecord, TensorRecord
from unipack.format.safetensors_file import SafetensorsHeader
from unipack.options import rule_text as options_rule_text
from unipack.schemes import scheme_of
from unipack.sources.checkpoint import open_checkpoint

if TYPE_CHECKING:
    from unipack.bundle.reader import BundleReader
    from unipack.usercode import EvalHook

#: Byte parts of a bundle file, in file order; they add up exactly to the file size.
PARTS = (
    "header",
    "manifest",
    "padding",
    "means",
    "bases",
    "coefficients",
    "deltas",
    "factors",
    "raw",
    "exact",
    "residuals",
)
#: The ways of storing a member that the report compares.
METHODS = ("unipack", "mean-only", "svd")


@dataclass(frozen=True)
class ByteReport:
    file: int
    inputs: int
    lossless: int | None  # inputs compressed with zstd at lossless_level (None: not measured)
    lossless_sampled: bool  # lossless is an estimate from evenly spaced samples
    parts: dict[str, int]
    mean_only: int  # what the bundle would cost without bases and coefficients (rank 0 everywhere)
    lossless_level: int = 19  # zstd's level for ``lossless`` (older bundles: 19, or 3 next to a lossless tier)
    #: ``lossless`` is zstd of byte-grouped streams (spec §3.6 ``grouping``), measured whole; older
    #: bundles recorded plain zstd
    lossless_grouped: bool = False
    exact_tier: bool = False  # every member comes back bit for bit: the file is a lossless figure
    zipnn: int | None = None  # ZipNN on every input, measured by a lossless merge where installed
    zipnn_version: str | None = None
    #: The base model the bundle references but does not hold (``merge --base``, spec §11): its
    #: referenced tensors' bytes, which no ratio here counts, and its recorded name.
    base: int | None = None
    base_source: str | None = None

    @property
    def ratio(self) -> float:
        return self.inputs / self.file if self.file else 0.0

    @property
    def ratio_vs_lossless(self) -> float | None:
        return self.lossless / self.file if self.lossless and self.file else None

    @property
    def ratio_vs_zipnn(self) -> float | None:
        return self.zipnn / self.file if self.zipnn and self.file else None


@dataclass(frozen=True)
class ErrorStats:
    """Relative errors over a member's tensors: the worst, and the mean weighted by tensor bytes."""

    worst: float
    mean: float
    worst_tensor: str | None = None


@dataclass(frozen=True)
class MemberReport:
    name: str
    source: str
    added: bool
    source_bytes: int
    own_bytes: int  # its coefficients and raw tensors
    amortized_bytes: int  # own bytes + 1/N of everything shared (header, means, bases, exact)
    errors: dict[str, ErrorStats | None]  # by METHODS; None where not measured
    delta_error: float | None  # ||W - Ŵ|| / ||W - M|| over its projected tensors (None: none)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "original", "unipack", ...


@dataclass(frozen=True)
class TensorReport:
    name: str
    storage: str
    scheme: str | None
    rank: int | None
    energy: float | None
    spectrum: list[float]
    variance: float | None
    stored_bytes: int  # its blobs, with its share of each member's coefficient blob (by element count)
    errors: dict[str, float | None]  # mean relative error over members, by METHODS
    winner: str | None  # the method with the smallest mean error (ties go to the cheaper one)
    # The cheapest one-line alternative that meets the rule on this tensor, and its bytes for all
    # members (measured at merge time; None: none meets it, or not measured).
    alternative: str | None = None
    alternative_bytes: int | None = None
    #: The parameters it stands for, over every member that holds it (None: not counted, as for
    #: a LoRA module): stored_bytes / parameters is its bits per parameter, its bit allocation.
    parameters: int | None = None


@dataclass(frozen=True)
class AlternativeRow:
    """One alternative over the whole collection (``stats.alternatives``, spec §3.6)."""

    method: str
    label: str
    bytes: int  # every tensor of every member, as a user would ship it
    ratio: float  # inputs / bytes
    tensors_met: int  # tensors on which every member meets the rule
    errors: list[float]  # per member: relative weight error over the compared tensors


@dataclass(frozen=True)
class Alternatives:
    """What a user would have stored instead, measured on the same members at merge time."""

    tensors: int  # tensors compared (the ones the merge decomposed)
    rule: str  # what "meets" means: the merge's error rule, or the bundle's own errors
    rows: list[AlternativeRow]
    bundle_errors: list[float] | None  # the bundle's own, same measure (None: not recorded)
    smallest_met: str | None  # the smallest alternative that meets the rule on every tensor

    def row(self, method: str) -> AlternativeRow:
        return next(r for r in self.rows if r.method == method)


@dataclass(frozen=True)
class Report:
    path: str
    created_by: str
    format_version: int
    rule: str
    options: dict[str, Any]
    bytes: ByteReport
    members: list[MemberReport]
    tensors: list[TensorReport]
    overall: dict[str, Any]  # byte-weighted mean error by method, winner, tensors won by method
    evaluation: dict[str, Any] | None = None  # set by evaluate_report()
    alternatives: Alternatives | None = None  # measured at merge time (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["bytes"]["ratio"] = self.bytes.ratio
        doc["bytes"]["ratio_vs_lossless"] = self.bytes.ratio_vs_lossless
        doc["bytes"]["ratio_vs_zipnn"] = self.bytes.ratio_vs_zipnn
        doc["worst_error"] = max((m.errors["unipack"].worst for m in self.members if m.errors["unipack"]), default=0.0)
        # Flat aliases the PNG and simple scripts read: worst/mean error and baselines per member.
        for m, d in zip(self.members, doc["members"]):
            unipack = m.errors["unipack"]
            d["worst_error"] = unipack.worst if unipack else None
            d["mean_error"] = unipack.mean if unipack else None
            d["baselines"] = {
                key: ({"worst_error": s.worst, "mean_error": s.mean} if s else None)
                for key, s in (("mean", m.errors["mean-only"]), ("svd", m.errors["svd"]))
            }
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def rule_text(options: Mapping[str, Any]) -> str:
    """The rule a bundle's recorded options name, and whether it bounds the errors."""
    rule = "rank" if options.get("rank") is not None else "energy" if options.get("energy") is not None else "max-error"
    words = options_rule_text(
        rule,
        rank=options.get("rank"),
        energy=options.get("energy"),
        max_error=options.get("max_error"),
        max_delta_error=options.get("max_delta_error"),
    )
    if rule != "max-error":
        return f"{words} (errors recorded, not bounded)"
    groups = options.get("tensor_bounds")
    own = sum(len(g.get("tensors") or ()) for g in groups if isinstance(g, dict)) if isinstance(groups, list) else 0
    if own:  # merge --size allocated bounds per tensor (spec 3.4): the rule's hold for the others
        return f"{words} per member per tensor ({own} tensors to bounds of their own)"
    return f"{words} per member per tensor"


def build_report(
    manifest: Manifest,
    header: SafetensorsHeader,
    header_bytes: bytes,
    fidelity: Mapping[str, FidelityRecord] | None = None,
) -> Report:
    """The report of a bundle; ``fidelity`` overrides recorded numbers (recomputed from originals)."""
    fidelity = dict(fidelity or {})
    stored = {name: e.nbytes for name, e in header.tensors.items()}
    parts = _byte_parts(manifest, header, header_bytes, stored)
    n = max(len(manifest.members), 1)
    shared_bytes = sum(parts[p] for p in ("header", "manifest", "padding", "means", "bases", "exact"))
    members = []
    for m in manifest.members:
        record = fidelity.get(m.name, m.fidelity)
        own = (
            sum(stored[b] for b in m.raw.values())
            + (stored[m.coefficients] if m.coefficients is not None else 0)
            + (stored[m.codes] if m.codes is not None else 0)
        )
        members.append(_member_report(manifest, m, record, own, own + shared_bytes // n))
    cheapest = _recorded_cheapest(manifest)
    tensors = [
        replace(t, alternative=cheapest[t.name][0], alternative_bytes=cheapest[t.name][1]) if t.name in cheapest else t
        for t in _tensor_reports(manifest, stored, fidelity)
    ]
    measured = [m.lossless_bytes for m in manifest.members if m.lossless_bytes is not None]
    complete = bool(measured) and len(measured) == len(manifest.members)  # a partial sum would flatter
    lossless_stats = manifest.stats.get("lossless")
    lossless_stats = lossless_stats if isinstance(lossless_stats, dict) else {}
    zipnn = manifest.stats.get("zipnn")
    zipnn = zipnn if isinstance(zipnn, dict) and isinstance(zipnn.get("bytes"), int) else {}
    byte_report = ByteReport(
        file=header.file_size,
        inputs=int(manifest.stats.get("input_bytes", 0)),
        lossless=sum(measured) if complete else None,
        lossless_sampled=bool(lossless_stats.get("sampled")),
        parts=parts,
        mean_only=_mean_only_bytes(manifest, parts, stored),
        lossless_level=int(lossless_stats.get("level", 19)) if _is_int(lossless_stats.get("level", 19)) else 19,
        lossless_grouped=lossless_stats.get("grouping") == "bytes",
        exact_tier=bool(manifest.members) and all(m.exact is not None for m in manifest.members),
        zipnn=zipnn.get("bytes"),
        zipnn_version=str(zipnn["version"]) if zipnn.get("version") else None,
        base=manifest.base.nbytes if manifest.base is not None else None,
        base_source=manifest.base.source if manifest.base is not None else None,
    )
    return Report(
        path=str(header.path),
        created_by=manifest.created_by,
        format_version=manifest.format_version,
        rule=rule_text(manifest.options),
        options=dict(manifest.options),
        bytes=byte_report,
        members=members,
        tensors=tensors,
        overall=_overall(members, tensors),
        alternatives=_alternatives(manifest, fidelity, cheapest),
    )


def _recorded_alternatives(manifest: Manifest) -> dict[str, Any] | None:
    """``stats.alternatives`` if it is well formed for this bundle's members, else None. The
    entry is informative (spec §3.6): one written before members were added (``unipack add``)
    describes another collection, and a malformed one is ignored rather than trusted."""
    doc = manifest.stats.get("alternatives")
    n = len(manifest.members)

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)

    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), int):
        return None
    methods, cheapest = doc.get("methods"), doc.get("cheapest")
    if not isinstance(methods, dict) or not isinstance(cheapest, dict):
        return None
    if set(methods) not in (set(ALTERNATIVES), set(ALTERNATIVES + BASE_ALTERNATIVES)):
        return None
    for entry in methods.values():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("tensors_met"), int)
            and numbers(entry.get("errors"))
        ):
            return None
    names = {t.name for t in manifest.tensors}
    for name, pair in cheapest.items():
        if not (
            name in names
            and isinstance(pair, list)
            and len(pair) == 2
            and (pair[0] is None or pair[0] in methods)
            and isinstance(pair[1], int)
        ):
            return None
    return doc


def recorded_alternatives(manifest: Manifest) -> Alternatives | None:
    """The alternatives a merge measured, as the report shows them (None: not recorded)."""
    return _alternatives(manifest, {}, _recorded_cheapest(manifest))


def _recorded_cheapest(manifest: Manifest) -> dict[str, tuple[str | None, int | None]]:
    doc = _recorded_alternatives(manifest)
    if doc is None:
        return {}
    return {name: (method, size if method else None) for name, (method, size) in doc["cheapest"].items()}


def _alternatives(
    manifest: Manifest, fidelity: Mapping[str, FidelityRecord], cheapest: Mapping[str, Any]
) -> Alternatives | None:
    doc = _recorded_alternatives(manifest)
    if doc is None:
        return None
    inputs = int(manifest.stats.get("input_bytes", 0))
    rows = [
        AlternativeRow(
            method=method,
            label=ALTERNATIVE_LABELS[method],
            bytes=doc["methods"][method]["bytes"],
            ratio=inputs / doc["methods"][method]["bytes"] if doc["methods"][method]["bytes"] else 0.0,
            tensors_met=doc["methods"][method]["tensors_met"],
            errors=[float(e) for e in doc["methods"][method]["errors"]],
        )
        for method in ALTERNATIVES + BASE_ALTERNATIVES
        if method in doc["methods"]
    ]
    met = [r for r in rows if r.tensors_met == doc["tensors"]]
    bounded = manifest.options.get("max_error") is not None or manifest.options.get("max_delta_error") is not None
    return Alternatives(
        tensors=doc["tensors"],
        rule="the merge's error rule" if bounded else "at least this bundle's accuracy",
        rows=rows,
        bundle_errors=_bundle_errors(manifest, fidelity, set(cheapest)),
        smallest_met=min(met, key=lambda r: r.bytes).method if met else None,
    )


def _bundle_errors(
    manifest: Manifest, fidelity: Mapping[str, FidelityRecord], compared: set[str]
) -> list[float] | None:
    """Each member's relative weight error over the compared tensors: sqrt(sum ||E_t||^2 /
    sum ||W_t||^2), the measure the alternatives' errors use."""
    out = []
    for m in manifest.members:
        record = fidelity.get(m.name, m.fidelity)
        if record is None:
            return None
        lost = total = 0.0
        for i, t in enumerate(manifest.tensors):
            if t.name in compared:
                lost += (m.errors[i] * record.norms[i]) ** 2
                total += record.norms[i] ** 2
        out.append(math.sqrt(lost / total) if total > 0 else 0.0)
    return out


def _mean_only_bytes(manifest: Manifest, parts: dict[str, int], stored: dict[str, int]) -> int:
    """About what a rank-0 bundle would cost: no bases or coefficients, and one mean in place of
    the per-member copies of every tensor the merge kept raw only because raw was cheaper."""
    size = sum(parts.values()) - parts["bases"] - parts["coefficients"] - parts["deltas"] - parts["residuals"]
    for t in manifest.tensors:
        size += scheme_of(t).mean_only_change(t, manifest, stored)
    return size


def _byte_parts(
    manifest: Manifest, header: SafetensorsHeader, header_bytes: bytes, stored: dict[str, int]
) -> dict[str, int]:
    """Every byte of the file in exactly one part (header = length prefix + safetensors JSON)."""
    parts = dict.fromkeys(PARTS, 0)
    parts.update(header_parts(header, header_bytes))  # the same split `info` shows
    for name, part in blob_parts(manifest).items():
        parts[part] += stored[name]
    return parts


def _tensor_bytes(manifest: Manifest, member: MemberRecord, index: int) -> int:
    """What the member's original holds for tensor ``index`` (the weight of its error in a mean)."""
    t = manifest.tensors[index]
    return scheme_of(t).original_bytes(t, member, manifest)


def _member_report(
    manifest: Manifest, m: MemberRecord, record: FidelityRecord | None, own: int, amortized: int
) -> MemberReport:
    weights = [_tensor_bytes(manifest, m, i) for i in range(len(manifest.tensors))]
    names = [t.name for t in manifest.tensors]
    errors: dict[str, ErrorStats | None] = {"unipack": _stats(m.errors, weights, names)}
    errors["mean-only"] = _stats(record.mean_errors, weights, names) if record else None
    errors["svd"] = _stats(record.svd_errors, weights, names) if record and record.svd_errors else None
    delta = None
    if record is not None:
        # ||E_t|| = error * ||W_t|| and ||D_t|| ~ mean error * ||W_t|| (the mean-only residual).
        lost = kept = 0.0
        projected = 0
        for i, t in enumerate(manifest.tensors):
            if scheme_of(t).projected(t, m):
                projected += 1
                lost += (m.errors[i] * record.norms[i]) ** 2
                if t.params.base_centred(t) and record.delta_errors[i] > 0:
                    # Its delta is from the base (spec §11.4): ||W - base|| = ||E|| / delta error.
                    kept += (m.errors[i] * record.norms[i] / record.delta_errors[i]) ** 2
                else:
                    kept += (record.mean_errors[i] * record.norms[i]) ** 2
        if projected:
            delta = math.sqrt(lost / kept) if kept > 0 else (0.0 if lost == 0 else None)
    return MemberReport(
        name=m.name,
        source=m.source,
        added=m.added,
        source_bytes=m.source_bytes,
        own_bytes=own,
        amortized_bytes=amortized,
        errors=errors,
        delta_error=delta,
        metrics=dict(m.metrics or {}),
    )


def _stats(values: tuple[float, ...] | None, weights: list[int], names: list[str]) -> ErrorStats | None:
    if values is None:
        return None
    total = sum(weights)
    worst = max(range(len(values)), key=values.__getitem__, default=None)
    return ErrorStats(
        worst=values[worst] if worst is not None else 0.0,
        mean=sum(v * w for v, w in zip(values, weights)) / total if total else 0.0,
        worst_tensor=names[worst] if worst is not None and values[worst] > 0 else None,
    )


def _tensor_reports(
    manifest: Manifest, stored: dict[str, int], fidelity: Mapping[str, FidelityRecord]
) -> list[TensorReport]:
    coef_share = _coefficient_shares(manifest, stored)
    out = []
    for i, t in enumerate(manifest.tensors):
        scheme = scheme_of(t)
        own = sum(stored[b] for b in scheme.blob_parts(t, manifest))
        errors: dict[str, float | None] = dict.fromkeys(METHODS)
        winner = None
        if scheme.compared(t):
            members = [m for m in manifest.members if scheme.replaced_by_mean(t, m)]
            records = [fidelity.get(m.name, m.fidelity) for m in members]
            if members:
                errors["unipack"] = sum(m.errors[i] for m in members) / len(members)
                if all(r is not None for r in records):
                    errors["mean-only"] = sum(r.mean_errors[i] for r in records if r) / len(members)
                    if all(r is not None and r.svd_errors is not None for r in records):
                        errors["svd"] = sum(r.svd_errors[i] for r in records if r and r.svd_errors) / len(members)
                winner = _winner(errors)
        out.append(
            TensorReport(
                name=t.name,
                storage=t.storage,
                scheme=scheme.report_scheme(t),
                rank=scheme.rank(t),
                energy=t.params.energy,
                spectrum=list(t.params.spectrum or ()),
                variance=t.params.variance,
                stored_bytes=own + coef_share.get(t.name, 0),
                errors=errors,
                winner=winner,
                parameters=_parameters(manifest, t),
            )
        )
    return out


def _parameters(manifest: Manifest, t: TensorRecord) -> int | None:
    """The parameters of ``t`` over every member: its shape's, once per member, or where its
    shape differs between members (heads, stored raw) the sum of each member's own."""
    if scheme_of(t).lora:  # an update of its base's weight, not parameters of its own
        return None
    if t.shape is not None:
        return math.prod(t.shape) * len(manifest.members)
    blobs = [manifest.blobs.get(m.raw.get(t.name, "")) for m in manifest.members]
    return sum(b.numel for b in blobs if b is not None) or None


def _winner(errors: Mapping[str, float | None]) -> str | None:
    """Smallest error wins; on a tie (within 0.1%) the cheaper method: mean-only, then the bundle."""
    measured = [
        (v, rank, k) for rank, k in enumerate(("mean-only", "unipack", "svd")) if (v := errors.get(k)) is not None
    ]
    if not measured:
        return None
    best = min(v for v, _, _ in measured)
    return min((rank, k) for v, rank, k in measured if v <= best * 1.001 + 1e-12)[1]


def _coefficient_shares(manifest: Manifest, stored: dict[str, int]) -> dict[str, int]:
    """Each tensor's share of the members' (jointly compressed) coefficient and code blobs, by
    element (coefficients) or byte (codes) count."""
    shares: dict[str, float] = {}
    for m in manifest.members:
        for blob, offsets in ((m.coefficients, manifest.coef_offsets(m)), (m.codes, manifest.code_offsets(m))):
            if blob is None:
                continue
            total = sum(hi - lo for lo, hi in offsets.values())
            for name, (lo, hi) in offsets.items():
                shares[name] = shares.get(name, 0.0) + stored[blob] * (hi - lo) / total
    return {k: round(v) for k, v in shares.items()}


def _overall(members: list[MemberReport], tensors: list[TensorReport]) -> dict[str, Any]:
    """Mean over members of each method's byte-weighted mean error, and who wins how often."""
    mean_error: dict[str, float | None] = {}
    for method in METHODS:
        stats = [m.errors[method] for m in members]
        mean_error[method] = (
            sum(s.mean for s in stats if s) / len(stats) if stats and all(s is not None for s in stats) else None
        )
    won = {method: sum(1 for t in tensors if t.winner == method) for method in METHODS}
    return {"mean_error": mean_error, "winner": _winner(mean_error), "tensors_won": won}


def find_originals(manifest: Manifest, directory: Path) -> dict[str, Path]:
    """Each member's original in ``directory``, found by its recorded source (a file or a model folder)."""
    if not directory.is_dir():
        raise InputError(f"--originals {directory}: not a directory; give the folder holding the merge's inputs")
    # A source is a plain file or folder name; a bundle naming "../x" must not send us elsewhere.
    found = {
        m.name: directory / m.source
        for m in manifest.members
        if m.source not in ("", ".", "..")
        and "/" not in m.source
        and "\\" not in m.source
        and ((directory / m.source).is_file() or (directory / m.source).is_dir())
    }
    if not found:
        raise InputError(
            f"--originals {directory}: none of the members' source files or folders "
            f"({', '.join(m.source for m in manifest.members[:3])}, ...) is there"
        )
    return found


def report(
    bundle: BundleReader,
    *,
    originals: Path | None = None,
    recompute: bool = False,
    hook: EvalHook | None = None,
    metric: str | None = None,
    on_member: Callable[[str], None] | None = None,
) -> Report:
    """The full report of an open bundle.

    ``originals``: folder with the merge's inputs (found by file name). ``recompute``: measure the
    fidelity numbers and baselines again from the originals (for bundles merged with
    ``--no-baselines``, or to check recorded ones). ``hook``: score every member with the user's
    eval function (and the originals and baselines where available).
    """
    found = find_originals(bundle.manifest, originals) if originals is not None else {}
    if recompute and bundle.is_lora:
        raise InputError(
            f"{bundle.path}: holds LoRA adapters, whose baselines are measured only at merge "
            f"time; merge again with --baselines to get them"
        )
    if recompute and not found:
        raise InputError("recomputing baselines needs the members' originals: add --originals DIR")
    fidelity: dict[str, FidelityRecord] = {}
    if recompute:
        for name, path in found.items():
            original = open_checkpoint(path, name)
            try:
                fidelity[name] = measure_member(bundle, name, original)
            finally:
                original.close()
    result = build_report(bundle.manifest, bundle.header, bundle.header_bytes(), fidelity)
    if hook is None:
        return result
    scored = score_members(bundle, hook, found, metric, on_member=on_member)
    members = [
        replace(m, metrics={k: v for k, v in scored["members"][m.name].items() if v is not None})
        for m in result.members
    ]
    return replace(result, members=members, evaluation=scored)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
