"""``delta``: a shared mean plus each member's quantized delta (spec §4.5).

Each member's tensor is rebuilt as ``round(M + q * s)``: ``M`` the record's mean (fp16 where the
members are wider and fp16 holds it, else the members' precision: the deltas absorb its
rounding), ``q`` one of the record's L levels per element, from the member's packed codes,
and ``s`` one step per group of ``group`` consecutive elements, from the member's coefficient
blob. The merge searches every member's steps to meet its budget (``unipack.core.quantize``)
and keeps, among the level counts and groupings it tries, the one whose compressed bytes are
fewest (``fit``); the cheapest of this and the other schemes wins the tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from unipack.core import quantize
from unipack.core.fidelity import MemberFidelity, matrix_view, measure, round_up
from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest import BlobRef, Manifest, MemberRecord, StorageParams, TensorRecord
from unipack.format.manifest.doc import Doc
from unipack.format.manifest.records import DELTA_FORMAT_VERSION
from unipack.options import ErrorBudget
from unipack.schemes.base import AddContext, Array, MemberView, ReadBase, ReadBlob, RebuiltScheme
from unipack.schemes.registry import register

#: A ``delta`` record's ``center``: the members' mean (a blob), or the tensor of the base model the
#: bundle references (spec §11). Also the ``Candidate.mean_dtype`` that stands for the base.
MEAN_CENTER = "mean"
BASE_CENTER = "base"


@dataclass(frozen=True)
class DeltaParams(StorageParams):
    scheme_name: ClassVar[str] = "delta"
    mean: str | None = None
    levels: int = 3  # L: q = u - (L - 1)/2 for codes u < L
    group: int = 1  # consecutive elements (row-major) sharing one step
    mean_step: float | None = None  # set: the mean blob is I16, the mean is its integers x this step
    center: str = MEAN_CENTER  # what the deltas are from: the mean blob, or the base model's tensor

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        if self.center == BASE_CENTER:
            return {"center": BASE_CENTER, "levels": self.levels, "group": self.group}
        doc: dict[str, Any] = {"mean": self.mean, "levels": self.levels, "group": self.group}
        if self.mean_step is not None:
            doc["mean_step"] = self.mean_step
        return doc

    def base_centred(self, tensor: TensorRecord) -> bool:
        return self.center == BASE_CENTER

    def numel(self, tensor: TensorRecord) -> int:
        assert tensor.shape is not None
        return math.prod(tensor.shape)

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        if member is not None and tensor.name in member.raw:
            return None
        assert tensor.shape is not None
        return (_blocks(tensor.shape, self.group, self.levels)[0],)

    def code_bytes(self, tensor: TensorRecord, member: MemberRecord | None) -> int | None:
        if member is not None and tensor.name in member.raw:
            return None
        assert tensor.shape is not None
        return _blocks(tensor.shape, self.group, self.levels)[1]

    def code_levels(self) -> int | None:
        return self.levels

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        if self.center == BASE_CENTER:  # the center is the base model's tensor: no blob
            return []
        kind = "float" if self.mean_step is None else INT_MEAN
        return [BlobRef(self.mean, f"tensor {tensor.name!r} mean", tensor.shape, kind)]

    def mean_values(self, held: np.ndarray, dtype: str) -> np.ndarray:
        """The mean's float64 values from its blob (held as ``dtype``): floats widened, or the
        integers times ``mean_step`` (spec §8.2)."""
        if self.mean_step is None:
            return dtypes.to_float(held, dtype)
        return held.astype(np.float64) * self.mean_step

    def center_held(
        self, tensor: TensorRecord, manifest: Manifest, read_blob: ReadBlob, read_base: ReadBase
    ) -> tuple[np.ndarray, str, float | None]:
        """The center as stored: ``(array, its dtype, mean_step)``: the mean blob (spec §8.2 step
        1), or the referenced base model's tensor, its sha256 checked (§11.2). The one place that
        tells the two apart, for reading, adding and the lossless tier's prediction."""
        if self.center == BASE_CENTER:
            assert manifest.base is not None  # the manifest reader checked the record is listed
            return read_base(tensor.name), manifest.base.tensors[tensor.name].dtype, None
        assert self.mean is not None
        return read_blob(self.mean), manifest.blobs[self.mean].dtype, self.mean_step

    def center_values(
        self, tensor: TensorRecord, manifest: Manifest, read_blob: ReadBlob, read_base: ReadBase
    ) -> np.ndarray:
        """The center as float64 values, flat."""
        held, dtype, _ = self.center_held(tensor, manifest, read_blob, read_base)
        return self.mean_values(held, dtype).reshape(-1)


@functools.lru_cache(maxsize=4096)
def _blocks(shape: tuple[int, ...], group: int, levels: int) -> tuple[int, int]:
    """(steps, packed code bytes) of one member's block of a tensor of ``shape``. Cached: a reader
    asks for every member x tensor on open (checking the manifest's references), always the same
    few shapes."""
    numel = math.prod(shape)
    return quantize.n_groups(numel, group), quantize.packed_size(numel, levels)


#: The dtype of a quantized mean's integers (spec §8.1).
INT_MEAN = "I16"


def _params(t: TensorRecord) -> DeltaParams:
    assert isinstance(t.params, DeltaParams)
    return t.params


class DeltaScheme(RebuiltScheme):
    name = storage = "delta"
    min_format_version = DELTA_FORMAT_VERSION

    def parse_params(self, d: Doc, base: TensorRecord) -> DeltaParams:
        assert base.shape is not None
        numel = math.prod(base.shape)
        if numel == 0:
            raise FormatError(f"{d.where}: delta tensors must not be empty")
        levels = d.integer("levels", quantize.MIN_LEVELS, quantize.MAX_LEVELS)
        group = d.integer("group", 1, numel)
        center = MEAN_CENTER if d.doc.get("center") is None else d.choice("center", (MEAN_CENTER, BASE_CENTER))
        if center == BASE_CENTER:
            if d.doc.get("mean") is not None or d.doc.get("mean_step") is not None:
                raise FormatError(f"{d.where}: a delta centred on the base model has no 'mean' or 'mean_step'")
            return DeltaParams(levels=levels, group=group, center=BASE_CENTER)
        mean_step = d.num("mean_step", optional=True)
        if mean_step is not None and not mean_step > 0:
            raise FormatError(f"{d.where}: field 'mean_step' must be a positive number")
        return DeltaParams(mean=d.text("mean"), levels=levels, group=group, mean_step=mean_step)

    def rebuilt_arrays(self, view: MemberView, t: TensorRecord) -> Iterator[Array]:
        p = _params(t)
        packed, scales = view.codes(t), view.coefficients(t)
        assert packed is not None and scales is not None  # the manifest reader checked both exist
        dtype = view.member.dtype_of(t)
        where = f"member {view.member.name!r}"
        if not quantize.valid_bytes(packed, p.levels):
            raise FormatError(f"{where}: tensor {t.name!r}: a code byte is not a packing of codes < {p.levels}")
        assert t.shape is not None
        center, center_dtype, step = p.center_held(t, view.manifest, view.read_blob, view.read_base)
        # Block by block from the packed bytes, straight to the member's dtype (spec §8.2's
        # arithmetic, then its rounding).
        rounded = quantize.dequantize_packed(
            center, center_dtype, step, packed, p.numel(t), scales, p.levels, p.group, dtype
        )
        yield t, dtype, rounded.reshape(t.shape)

    def blob_parts(self, t: TensorRecord, manifest: Manifest) -> dict[str, str]:
        p = _params(t)
        parts = {p.mean: "means"} if p.mean is not None else {}
        return {**parts, **super().blob_parts(t, manifest)}

    def rank_text(self, t: TensorRecord) -> str:
        return f"L={_params(t).levels}"

    def report_scheme(self, t: TensorRecord) -> str | None:
        p = _params(t)
        return f"delta L={p.levels}" + ("" if p.group == p.numel(t) else f" g={p.group}")

    def compared(self, t: TensorRecord) -> bool:
        return True

    def projected(self, t: TensorRecord, member: MemberRecord) -> bool:
        return t.name not in member.raw

    def replaced_by_mean(self, t: TensorRecord, member: MemberRecord) -> bool:
        # A delta from the base model has no stored mean to stand in for it.
        return _params(t).center == MEAN_CENTER

    def baseline_mean(self, manifest: Manifest, read_blob: ReadBlob, t: TensorRecord) -> np.ndarray | None:
        p = _params(t)
        if p.mean is None:
            return None
        assert t.shape is not None
        return p.mean_values(read_blob(p.mean), manifest.blobs[p.mean].dtype).reshape(t.shape)

    def mean_only_change(self, t: TensorRecord, manifest: Manifest, stored: dict[str, int]) -> int:
        # A delta from the base stores no mean, which a rank-0 bundle would have to (counted
        # uncompressed, at the tensor's dtype: in the mean-only baseline's favour by zstd's share).
        return self.original_bytes(t, manifest.members[0], manifest) if _params(t).center == BASE_CENTER else 0

    def add_finite(
        self, ctx: AddContext, t: TensorRecord, dtype: str, array: np.ndarray, values: np.ndarray
    ) -> TensorRecord:
        """Quantize the new member's delta from the record's center (the stored mean, or the base
        model's tensor) with the record's levels and grouping, at the coarsest step meeting the
        merge's rule; raw where none does."""
        p = _params(t)
        x, m = values.reshape(-1), p.center_values(t, ctx.old, ctx.read_blob, ctx.read_base)
        norm = float(np.linalg.norm(x))
        rule = ctx.options.budget
        result = None
        if rule is not None:
            budget = rule.absolute(norm, float(np.linalg.norm(x - m)))
            result = quantize.fit_step(
                x,
                m,
                budget,
                levels=p.levels,
                group=p.group,
                scale_dtype=ctx.coef_dtype,
                member_dtype=dtype,
                keep_out=False,  # the error is what is recorded
            )
        if result is None or not math.isfinite(result.error):
            ctx.store_raw(
                t,
                dtype,
                array,
                "override",
                f"no step of the record's {p.levels} levels meets {ctx.options.rule_text}: stored raw",
                over_budget=True,
            )
            return t
        shape = matrix_view(t.shape or ())
        fidelity = measure(
            x.reshape(shape), None, m.reshape(shape), norm, dtype, ctx.coef_dtype, None, error=result.error
        )
        ctx.keep(
            t,
            "quantized",
            round_up(result.error / norm if norm > 0.0 else result.error),  # rel_error's arithmetic
            f"quantized from the bundle's {'base model' if p.center == BASE_CENTER else 'mean'} ({p.levels} levels)",
            fidelity,
            result.scales_held,
            codes=quantize.pack(result.codes, p.levels),
        )
        return t


# -- fitting at merge time -----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way of quantizing a tensor's deltas: a mean dtype, a level count, a grouping."""

    mean_dtype: str
    levels: int
    group: int


@dataclass
class DeltaEncoded:
    """The chosen candidate, encoded: what the merge writes for the tensor."""

    mean: np.ndarray  # held as holder(mean_dtype), in the tensor's shape
    mean_dtype: str
    levels: int
    group: int
    codes: list[np.ndarray]  # per member, packed (uint8)
    scales: list[np.ndarray]  # per member, held as holder(coef dtype)
    errors: list[float]  # relative to ||W||, after every rounding
    fidelity: list[MemberFidelity]
    stored_bytes: int  # compressed: mean + every member's codes + steps
    reason: str = ""
    # candidate -> bytes (None: missed the rule; -1: dropped after the first member, see PRUNE)
    tried: dict[str, int | None] = field(default_factory=dict)
    mean_step: float | None = None  # a quantized mean's step (``mean_dtype`` is then INT_MEAN)
    reference: np.ndarray | None = None  # what the rule's delta bound is relative to, float64 flat

    @property
    def on_base(self) -> bool:
        """Whether the deltas are from the base model's tensor (no mean blob to write)."""
        return self.mean_dtype == BASE_CENTER


#: The level counts the merge tries: a sign (2), then odd counts (zero is a level) that pack
#: 5, 3, 2, 2 and 1 codes to a byte, and 16 (the most that still packs two to a byte).
LEVELS = (2, 3, 5, 7, 9, 15, 16, 31, 255)


def candidates(
    shape: tuple[int, ...], member_dtypes: Sequence[str], mean: np.ndarray, budget: float, int_mean: bool
) -> list[list[Candidate]]:
    """Chains of candidates, each a mean dtype and grouping with its level counts from the most
    to the fewest: along a chain the cost falls while fewer levels pack more codes per byte,
    then rises once clipping forces finer steps (``fit`` walks each chain until it does).

    Means tried: the quantized one (``int_mean``: when ``quantized_mean`` found one), fp16 where
    the members are wider and its rounding is well inside the first member's ``budget`` (the
    deltas absorb that rounding), and the members' own precision where fp16's is not."""
    numel = math.prod(shape)
    rows = numel // shape[0] if len(shape) > 1 and shape[0] > 1 else numel
    groups = [numel] if rows == numel else [numel, rows]
    widest = dtypes.widest_float(frozenset(member_dtypes))
    means = [widest]
    if widest in ("F32", "F64"):
        half = dtypes.round_trip(mean, "F16")
        if np.isfinite(half).all():
            means = ["F16"] if float(np.linalg.norm(half - mean)) <= MEAN_ROUNDING * budget else ["F16", widest]
    if int_mean:
        means.insert(0, INT_MEAN)
    return [[Candidate(m, levels, g) for levels in reversed(LEVELS)] for m in means for g in groups]


def quantized_mean(
    exact_mean: np.ndarray, spread: float, n_members: int
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The mean as int16 multiples of one step (held, values, step), or None where they do not fit.

    Every member's delta absorbs the mean's rounding, so a coarser mean costs the members bits:
    with ``spread`` the members' RMS distance from the mean, a step of ``spread * sqrt(12 / N)``
    adds to each delta the variance the mean's own sampling noise has (spread^2 / N), which
    balances the bits the mean saves against those the N deltas then spend (to first order).
    """
    step = spread * math.sqrt(12.0 / n_members)
    if not (math.isfinite(step) and step > 0.0):
        return None
    step = float(f"{step:.6g}")  # a short decimal: the manifest records it exactly
    q = np.round(exact_mean / step)
    if not np.isfinite(q).all() or float(np.abs(q).max(initial=0.0)) > INT_MEAN_LIMIT:
        return None
    return q.astype(np.int16), q * step, step


#: The largest |integer| a quantized mean may use (int16).
INT_MEAN_LIMIT = 32767


#: The fp16 mean alone where its rounding error is at most this share of the first member's budget.
MEAN_ROUNDING = 0.1

#: Along a chain, the walk stops at a candidate costing more than this times the chain's best.
PRUNE = 1.2
#: Candidates whose estimated total (N times the first member's bytes, plus the mean's) exceeds
#: this times the cheapest estimate are searched for the other members only if the rest all miss.
LEAD = 1.05
#: At most this many leaders go on to the other members (the cheapest estimates first): near-ties
#: on member 0 differ by a few percent at most in the end, and each costs N - 1 step searches.
MAX_LEADERS = 2

#: A compressor for cost estimates: the stored size of an array (held as the dtype) in the bundle.
Compressed = Callable[[np.ndarray, str], int]


def fit(
    *,
    shape: tuple[int, ...],
    member_dtypes: Sequence[str],
    load: Callable[[int], np.ndarray],
    budget: ErrorBudget,
    scale_dtype: str,
    compressed: Compressed,
    base: tuple[np.ndarray, str] | None = None,
) -> DeltaEncoded | None:
    """The cheapest candidate meeting the rule for every member, encoded; None if none does.
    ``base``: the base model's tensor (held array, dtype) where the merge was given one that holds
    it; then its chains of candidates centred on it (no mean stored: 0 bytes) are tried beside
    the mean's, and the delta bound is relative to ||W - base|| for every candidate (spec §11.4).
    (Candidates far behind on the first member are not pursued: ``PRUNE``, ``candidates``.)
    The per-member SVD baselines are left out of its fidelity: the merge measures them once,
    for whichever storage wins the tensor.

    Three passes over the members: the exact mean; every candidate's step search per member
    (only its compressed size and steps are kept, so memory holds one member's tensor at a
    time); the winner's codes, re-made from its recorded steps (bit-identical to the search's).
    """
    n_members = len(member_dtypes)
    numel = math.prod(shape)
    total = np.zeros(numel)
    squares = 0.0
    first = load(0).reshape(-1)  # kept: the candidates' search starts with it
    for i in range(n_members):
        x = first if i == 0 else load(i).reshape(-1)
        total += x
        squares += float(np.dot(x, x))
    total /= n_members  # in place: the mean without a second full-size array
    exact_mean = total
    del total
    spread = math.sqrt(max(squares / n_members - float(np.dot(exact_mean, exact_mean)), 0.0) / numel)
    # The delta bound is relative to what the fine-tune changed: from the base model where it is
    # known, else from the members' mean.
    reference = exact_mean if base is None else dtypes.to_float(base[0], base[1]).reshape(-1)
    first_budget = budget.absolute(float(np.linalg.norm(first)), float(np.linalg.norm(first - reference)))
    int_mean = quantized_mean(exact_mean, spread, n_members)
    chains = candidates(shape, member_dtypes, exact_mean, first_budget, int_mean is not None)
    lead = chains[0][0].mean_dtype
    # The base's chains: the lead mean's groupings and level counts, centred on the base instead.
    base_chains = (
        []
        if base is None
        else [
            [Candidate(BASE_CENTER, c.levels, c.group) for c in chain]
            for chain in chains
            if chain[0].mean_dtype == lead
        ]
    )
    cands = [c for chain in chains + base_chains for c in chain]
    # Each center as stored (held); its float64 values are made when a candidate needs them and
    # only the last center's are kept (candidates come chain by chain): one full-size float64
    # array instead of one per mean dtype.
    held_means = {
        c.mean_dtype: dtypes.from_float(np.ascontiguousarray(exact_mean), c.mean_dtype)
        for c in cands
        if c.mean_dtype not in (INT_MEAN, BASE_CENTER)
    }
    mean_step = None
    if int_mean is not None:
        # Its float64 values are dropped here and made again from the int16 ones when needed.
        held_means[INT_MEAN], mean_step = int_mean[0], int_mean[2]
        int_mean = None
    mean_bytes = {dtype: compressed(held, dtype) for dtype, held in held_means.items()}
    if base is not None:
        held_means[BASE_CENTER] = base[0]
        mean_bytes[BASE_CENTER] = 0  # referenced, not stored
    widened: dict[str, np.ndarray] = {}

    def center(dtype: str) -> np.ndarray:
        """A center's float64 values, as a reader rebuilds them (``store_as``'s, bit for bit)."""
        if dtype == BASE_CENTER:
            return reference
        values = widened.get(dtype)
        if values is None:
            widened.clear()
            held = held_means[dtype]
            if dtype == INT_MEAN:
                assert mean_step is not None
                values = held.astype(np.float64) * mean_step  # quantized_mean's q * step
            else:
                values = dtypes.to_float(held, dtype)
            widened[dtype] = values
        return values

    tried: dict[str, int | None] = {}
    # Member 0's c / c0 per candidate: members of one collection need about the same, so the
    # others' searches start there (a few tries instead of a full bracket).
    hints: dict[Candidate, float] = {}
    # ||x - mean|| with every code zero depends on the member and the mean only: once each.
    zeros: dict[tuple[int, str], float] = {}

    # The member being searched: its delta from the last center tried (one full-size array:
    # candidates come chain by chain, a chain keeps its center), and its step shape for each
    # center and grouping (one number per group), shared by the candidates tried on it.
    deltas: dict[tuple[int, str], np.ndarray] = {}
    shapes: dict[tuple[int, str, int, bool], np.ndarray] = {}

    def search(cand: Candidate, i: int, x: np.ndarray, limit: float) -> tuple[int, np.ndarray] | None:
        mean = center(cand.mean_dtype)
        zero = zeros.get((i, cand.mean_dtype))
        if zero is None:
            zero = zeros[i, cand.mean_dtype] = quantize.zero_error(x, mean, member_dtypes[i])
        if any(key[0] != i for key in shapes):
            shapes.clear()
        d = deltas.get((i, cand.mean_dtype))
        if d is None:
            deltas.clear()
            d = deltas[i, cand.mean_dtype] = x - mean
        shape_key = (i, cand.mean_dtype, cand.group, cand.levels == 2)
        steps_shape = shapes.get(shape_key)
        if steps_shape is None:
            steps_shape = shapes[shape_key] = quantize.step_shape(d, cand.levels, cand.group)
        result = quantize.fit_step(
            x,
            mean,
            limit,
            levels=cand.levels,
            group=cand.group,
            scale_dtype=scale_dtype,
            member_dtype=member_dtypes[i],
            hint=hints.get(cand),
            zero=zero,
            delta=d,
            shape=steps_shape,
            keep_out=False,  # only the codes' cost is kept: the winner is re-made by _encode
        )
        if result is None:
            tried[_label(cand, shape)] = None
            return None
        if i == 0 and math.isfinite(result.multiplier):
            hints[cand] = result.multiplier
        cost = compressed(quantize.pack(result.codes, cand.levels), "U8") + compressed(result.scales_held, scale_dtype)
        return cost, result.scales_held

    # The first member: walk each chain of the first mean until a candidate misses the rule or
    # costs PRUNE times the chain's best so far (the ones after it are not tried: most of the
    # search time). The other means change the members' bytes little (their deltas absorb the
    # mean's rounding), so each is tried at the levels and grouping that won; their chains are
    # walked only if the first mean's all miss.
    alive: dict[Candidate, tuple[int, list[np.ndarray]]] = {}

    def walk(chain: list[Candidate], x: np.ndarray) -> None:
        chain_best = math.inf
        for cand in chain:
            found = search(cand, 0, x, first_budget)
            if found is None or found[0] > PRUNE * chain_best:
                if found is not None:
                    tried[_label(cand, shape)] = -1
                if cand.levels % 2 == 0:
                    # An even count has no zero level: off the chain's cost curve (16 often costs
                    # more than both 31 and 15), so it cannot say the fewer counts after it will.
                    continue
                break
            chain_best = min(chain_best, found[0])
            alive[cand] = (found[0], [found[1]])

    for chain in chains + base_chains:
        if chain[0].mean_dtype in (lead, BASE_CENTER):
            walk(chain, first)
    others = [c for c in chains if c[0].mean_dtype != lead]
    centred_on_mean = [c for c in alive if c.mean_dtype != BASE_CENTER]
    if centred_on_mean:
        winner = min(centred_on_mean, key=lambda c: alive[c][0])
        for chain in others:
            cand = Candidate(chain[0].mean_dtype, winner.levels, winner.group)
            if chain[0].group == winner.group and (found := search(cand, 0, first, first_budget)) is not None:
                alive[cand] = (found[0], [found[1]])
    else:
        for chain in others:
            walk(chain, first)
    del first
    if not alive:
        return None

    def search_rest(
        pool: dict[Candidate, tuple[int, list[np.ndarray]]],
    ) -> dict[Candidate, tuple[int, list[np.ndarray]]]:
        """The pool's candidates searched for members 1..N-1: those meeting the rule for all."""
        for i in range(1, n_members):
            if not pool:
                break
            x = load(i).reshape(-1)
            limit = budget.absolute(float(np.linalg.norm(x)), float(np.linalg.norm(x - reference)))
            for cand in list(pool):
                found = search(cand, i, x, limit)
                if found is None:
                    del pool[cand]
                    continue
                so_far, steps = pool[cand]
                pool[cand] = (so_far + found[0], [*steps, found[1]])
        return pool

    # Members of one collection cost alike under each candidate, so those far behind on the
    # first member (its bytes N times, plus the mean's) are searched for the others only if
    # every leader misses the rule for one of them (a member whose delta needs more levels).
    estimate = {c: mean_bytes[c.mean_dtype] + n_members * alive[c][0] for c in alive}
    ranked = sorted(alive, key=lambda c: estimate[c])
    cheapest = estimate[ranked[0]]
    leaders = [c for c in ranked if estimate[c] <= LEAD * cheapest][:MAX_LEADERS]
    behind = [c for c in ranked if c not in leaders]
    survivors = search_rest({c: alive[c] for c in leaders})
    if survivors:
        # The leaders were picked on one member's bytes: a candidate behind them is still
        # searched where its estimate is under what the best leader actually cost (a member
        # whose delta suits it less can reverse a near-tie on member 0).
        leading_price = min(cost + mean_bytes[c.mean_dtype] for c, (cost, _) in survivors.items())
        challengers = [c for c in behind if estimate[c] < leading_price]
        if challengers:
            survivors.update(search_rest({c: alive[c] for c in challengers}))
    else:
        survivors = search_rest({c: alive[c] for c in behind})
    deltas.clear()  # the search is over: no member's delta is held while the winner is encoded
    if not survivors:
        return None
    for cand in ranked:
        if cand not in survivors and tried.get(_label(cand, shape), -1) is not None:
            tried[_label(cand, shape)] = -1
    alive = survivors
    priced = {c: cost + mean_bytes[c.mean_dtype] for c, (cost, _) in alive.items()}
    for c, cost in priced.items():
        tried[_label(c, shape)] = cost
    best = min(priced, key=lambda c: (priced[c], cands.index(c)))
    encoded = _encode(
        best,
        alive[best][1],
        (held_means[best.mean_dtype], center(best.mean_dtype)),
        exact_mean,
        reference,
        shape,
        member_dtypes,
        load,
        scale_dtype,
        priced[best],
        tried,
    )
    if best.mean_dtype == INT_MEAN:
        encoded.mean_step = mean_step
    if base is not None:
        encoded.reference = reference
    return encoded


def _label(c: Candidate, shape: tuple[int, ...]) -> str:
    grouping = "tensor" if c.group == math.prod(shape) else f"group {c.group}"
    if c.mean_dtype == BASE_CENTER:
        return f"base model (referenced), {c.levels} levels, one step per {grouping}"
    mean = "quantized (int16)" if c.mean_dtype == INT_MEAN else c.mean_dtype
    return f"{mean} mean, {c.levels} levels, one step per {grouping}"


def _encode(
    cand: Candidate,
    steps: list[np.ndarray],
    mean: tuple[np.ndarray, np.ndarray],
    exact_mean: np.ndarray,
    reference: np.ndarray,
    shape: tuple[int, ...],
    member_dtypes: Sequence[str],
    load: Callable[[int], np.ndarray],
    scale_dtype: str,
    stored_bytes: int,
    tried: dict[str, int | None],
) -> DeltaEncoded:
    mean_held, mean_q = mean
    matrix = matrix_view(shape)
    codes, errors, fidelity = [], [], []
    for i, held in enumerate(steps):
        x = load(i).reshape(-1)
        result = quantize.quantize(
            x,
            mean_q,
            dtypes.to_float(held, scale_dtype),
            levels=cand.levels,
            group=cand.group,
            scale_dtype=scale_dtype,
            member_dtype=member_dtypes[i],
            keep_out=False,  # its error is what is recorded: no copy of what extract returns
        )
        norm = float(np.linalg.norm(x))
        codes.append(quantize.pack(result.codes, cand.levels))
        errors.append(result.error / norm if norm > 0.0 else result.error)  # rel_error's arithmetic
        fidelity.append(
            measure(
                x.reshape(matrix),
                None,
                exact_mean.reshape(matrix),
                norm,
                member_dtypes[i],
                scale_dtype,
                None,
                reference=reference.reshape(matrix),
                error=result.error,
            )
        )
    return DeltaEncoded(
        mean=mean_held.reshape(shape),
        mean_dtype=cand.mean_dtype,
        levels=cand.levels,
        group=cand.group,
        codes=codes,
        scales=list(steps),
        errors=errors,
        fidelity=fidelity,
        stored_bytes=stored_bytes,
        reason=_label(cand, shape),
        tried=tried,
    )


DELTA = register(DeltaScheme())
