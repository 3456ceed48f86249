"""The manifest as typed records: what a bundle holds and how to rebuild every member.

A ``TensorRecord`` has the fields every storage shares (name, storage, dtype, shape, reason)
and ``params``: the storage scheme's own fields, an instance of a ``StorageParams`` subclass
that the scheme's module defines (``unipack/schemes/``). This module knows no scheme: it asks
the params what it needs (their JSON fields, their coefficient block, the blobs they name).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unipack.format import dtypes

FORMAT_NAME = "unipack.upk"
FORMAT_VERSION = 1
#: Version 2 adds the ``lora`` storage (LoRA adapter modules); a bundle without it stays version 1
#: so that readers predating it still read every dense bundle.
LORA_FORMAT_VERSION = 2
#: Version 3 adds the ``delta`` storage (quantized per-member deltas) and a member's ``codes``
#: blob; only bundles that use it are written as version 3.
DELTA_FORMAT_VERSION = 3
#: Version 4 moves a large manifest out of the header into a zstd-compressed U8 tensor named
#: ``MANIFEST_BLOB`` (the last one in the data section); smaller manifests stay in the header.
COMPRESSED_MANIFEST_VERSION = 4
#: Version 5 adds the lossless tier: a member's ``exact`` map (the sha256 of each original tensor
#: and, where the lossy tier does not rebuild it bit for bit, a residual blob; spec §9).
EXACT_TIER_FORMAT_VERSION = 5
#: Version 6 adds the ``lora`` forms ``quant`` (each adapter's factors at L levels, codes in its
#: ``codes`` blob) and ``cast`` (its factors at the coefficient dtype); only bundles that use one
#: are written as version 6.
LORA_QUANT_FORMAT_VERSION = 6
#: Version 7 adds the ``zstd-chunks`` codec (a blob as independent frames of whole elements, each
#: with its digest) and a lossless tier entry's ``chunk_sha256`` (the original's bytes per chunk of
#: its residual); only bundles with such a blob are written as version 7.
CHUNKED_FORMAT_VERSION = 7
#: The codec of a chunked blob (``format/codec.py``).
CHUNKED_CODEC = "zstd-chunks"
#: Version 8 lets a member added by ``unipack add`` hold a LoRA module of any form as its own
#: exact factors (an override, spec §7.4), where the record's form cannot meet the bundle's rule
#: for it or costs more. Only bundles with such an override are written as version 8. (A reader of 8
#: reads every earlier version.)
LORA_OVERRIDE_FORMAT_VERSION = 8
#: Version 9 keeps the members' informative numbers (``errors``, ``fidelity``) out of the
#: manifest, in a zstd-compressed section of their own (``NUMBERS_BLOB``, spec §2.4) that is read
#: only when they are asked for: opening a bundle of many members to load one then parses what
#: loading needs and nothing else. Written where the manifest is large (the version 4 rule).
MEMBER_NUMBERS_FORMAT_VERSION = 9
#: Version 10 lets a ``delta`` record be centred on a base model that the bundle references by the
#: sha256 of its tensors but does not store (``Manifest.base``, spec §11): extracting a member that
#: uses one needs that base. Only bundles that reference a base are written as version 10.
#: (A reader of 10 reads every earlier version.)
BASE_REF_FORMAT_VERSION = 10
#: Version 11 adds the ``lora`` form ``subspace-factored`` (spec §12): the subspace's bases with each
#: member's core stored as its factors P Q, cast or quantized. Only bundles that use it are
#: written as version 11. (A reader of 11 reads every earlier version.)
FACTORED_CORES_FORMAT_VERSION = 11
SUPPORTED_VERSIONS = (
    1,
    2,
    3,
    4,
    EXACT_TIER_FORMAT_VERSION,
    LORA_QUANT_FORMAT_VERSION,
    CHUNKED_FORMAT_VERSION,
    LORA_OVERRIDE_FORMAT_VERSION,
    MEMBER_NUMBERS_FORMAT_VERSION,
    BASE_REF_FORMAT_VERSION,
    FACTORED_CORES_FORMAT_VERSION,
)
#: The tensor that holds a compressed manifest (never a blob of the manifest's own table).
MANIFEST_BLOB = "__manifest__"
#: The tensor that holds the members' numbers (version 9; never a blob of the manifest's table).
NUMBERS_BLOB = "__numbers__"


@dataclass(frozen=True)
class BlobRecord:
    """A stored array: its logical dtype and shape, how its bytes are coded, and their checksum."""

    dtype: str
    shape: tuple[int, ...]
    codec: str = "none"
    shuffle: bool = False
    sha256: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Logical (decoded) size in bytes."""
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class BlobRef:
    """A blob a record names, with what the blob must be.

    ``dtype`` is a dtype name, ``"float"`` (any float dtype) or ``"coef"`` (the dtype every basis
    and coefficient blob of the bundle shares, spec §3.2); ``shape`` None accepts any shape.
    ``name`` None, or a blob the manifest does not list, is an error.
    """

    name: str | None
    what: str
    shape: tuple[int, ...] | None
    dtype: str | None
    #: Set where the record must *not* name this blob (a rank-0 basis): the complaint if it does.
    absent: str | None = None


class StorageParams:
    """Base class of every scheme's params. The informative numbers below are shared by the
    schemes that have a spectrum; a scheme without one keeps the defaults (None)."""

    #: The scheme's registry name (``unipack.schemes``): rows, flat, raw, exact, lora-subspace, ...
    scheme_name: ClassVar[str] = ""
    energy: float | None = None
    spectrum: tuple[float, ...] | None = None
    variance: float | None = None

    def to_doc(self, tensor: TensorRecord) -> dict[str, Any]:
        """The record's JSON fields after the common ones, in the order the spec lists them."""
        return {}

    def coefficient_shape(self, tensor: TensorRecord, member: MemberRecord | None) -> tuple[int, ...] | None:
        """Shape of ``member``'s block of its coefficient blob for this tensor, or None if it has none."""
        return None

    def code_bytes(self, tensor: TensorRecord, member: MemberRecord | None) -> int | None:
        """Bytes of ``member``'s packed codes for this tensor in its codes blob, or None if it has none."""
        return None

    def code_levels(self) -> int | None:
        """The level count of the codes ``code_bytes`` counts (their alphabet), if it has any."""
        return None

    def blob_refs(self, tensor: TensorRecord) -> list[BlobRef]:
        """The blobs the record itself names (shared by every member)."""
        return []

    def sized_by_members(self, tensor: TensorRecord, members: tuple[MemberRecord, ...]) -> dict[str, tuple[int, ...]]:
        """Blobs of the record (``blob_refs``) whose shape follows from the members, with that shape."""
        return {}

    def member_blobs(self, tensor: TensorRecord, member: MemberRecord) -> list[tuple[str, tuple[int, ...] | None]]:
        """Keys ``member.raw`` must hold for this tensor, with each blob's shape (None: any)."""
        return []

    def base_centred(self, tensor: TensorRecord) -> bool:
        """Whether the record is centred on the referenced base model's tensor (spec §11)."""
        return False

    def member_format_version(self, tensor: TensorRecord, member: MemberRecord) -> int:
        """The format version the way ``member`` holds this tensor needs (a LoRA override: 8)."""
        return FORMAT_VERSION

    #: Whether a member may hold the tensor raw instead (an override, spec §4.4).
    overridable: ClassVar[bool] = True
    #: Whether the record is a LoRA module (a member's ``lora`` map may name it).
    lora_module: ClassVar[bool] = False
    #: False: ``coefficient_shape``, ``code_bytes`` and ``member_blobs`` give every member that
    #: does not hold the tensor raw the same answer, so a reader may compute them once per tensor
    #: instead of once per member and tensor (checking a manifest of many members is then
    #: O(members + tensors), not O(members x tensors)). True where they depend on the member
    #: otherwise (a LoRA module: on whether, and at which rank, the member touches it).
    per_member_blocks: ClassVar[bool] = False


#: Attributes that records had before their params were split out, with their value where a
#: scheme does not define them: ``t.rank`` reads 0 on a raw tensor, ``t.form`` None on a dense one.
LEGACY_FIELDS: dict[str, Any] = {
    "scheme": None,
    "rank": 0,
    "side": None,
    "matrix": None,
    "mean": None,
    "basis": None,
    "blob": None,
    "raw_cause": None,
    "form": None,
    "ranks": None,
    "left": None,
    "right": None,
}


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor name is stored across all members."""

    name: str
    storage: str  # the manifest's "storage" field: shared | raw | exact | lora
    dtype: str  # the members' dtype (a member's entry in MemberRecord.dtypes overrides it)
    shape: tuple[int, ...] | None  # None only for raw tensors whose shape varies by member
    reason: str  # why this storage and rank were chosen, for humans
    params: StorageParams = field(default_factory=StorageParams)  # the scheme's own fields

    def __getattr__(self, name: str) -> Any:
        # Reading a scheme field through the record (``t.rank``, ``t.form``) keeps scripts and
        # tests written against the flat record working; unipack itself reads ``t.params``.
        if name.startswith("__") or name == "params":
            raise AttributeError(name)
        params = object.__getattribute__(self, "params")
        if hasattr(params, name):
            return getattr(params, name)
        if name in LEGACY_FIELDS:
            return LEGACY_FIELDS[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def lora_keys(self) -> tuple[str, str]:
        """A LoRA module's two keys in an adapter file: (A, B)."""
        return f"{self.name}.lora_A.weight", f"{self.name}.lora_B.weight"

    def coef_shape(self, member: MemberRecord | None = None) -> tuple[int, ...]:
        """Shape of one member's coefficients for this tensor ((0,) where it keeps none)."""
        return self.params.coefficient_shape(self, member) or (0,)


@dataclass(frozen=True)
class FidelityRecord:
    """Informative per-tensor numbers for one member, aligned with ``Manifest.tensors``.

    Measured at merge (or add) time for shared tensors; 0 for tensors the member holds raw or
    exactly. See ``core/fidelity.py`` for their definitions.
    """

    norms: tuple[float, ...]  # ||W||
    delta_errors: tuple[float, ...]  # ||W - Ŵ|| / ||W - M||
    mean_errors: tuple[float, ...]  # mean-only baseline, relative to ||W||
    svd_errors: tuple[float, ...] | None = None  # per-member SVD at equal bytes, relative to ||W||
    svd_ranks: tuple[int, ...] | None = None


#: How a residual blob rebuilds a tensor (spec §9.2; the arithmetic is in ``core/residual.py``).
RESIDUAL_CODINGS = ("bits", "xor", "sub")
#: The blob dtype of a residual, by the element width in bytes of the tensor it rebuilds.
RESIDUAL_DTYPES = {1: "U8", 2: "U16", 4: "U32", 8: "U64"}
#: An ``ExactEntry.base`` naming the tensor's stored mean (any other base names a member).
MEAN_BASE = "mean"
#: The longest chain of member bases (member -> its base member -> ... -> mean or stored tensor):
#: extracting a member decodes at most this many residuals per tensor. Chains let fine-tunes of
#: one recipe predict each other (a sibling predicts MiniLM word embeddings 8x, the mean 3x).
MAX_BASE_DEPTH = 3


@dataclass(frozen=True)
class ExactEntry:
    """One tensor of a member's lossless tier (spec §9.1): the original tensor's sha256 and, where
    the lossy tier does not already rebuild it bit for bit, how its residual rebuilds it."""

    sha256: str  # of the original tensor's little-endian bytes
    blob: str | None = None  # the residual blob (None: the lossy tier's own array is exact)
    coding: str | None = None  # bits | xor | sub (core/residual.py)
    base: str | None = None  # the prediction: "mean" (the stored mean, rounded) or a member's name
    #: With a ``zstd-chunks`` residual: the sha256 of the original's bytes over each chunk's element
    #: range, which verify each chunk as it is rebuilt (in parallel) instead of the whole tensor.
    chunks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MemberNumbers:
    """A member's informative per-tensor numbers: what ``info`` and ``report`` show, never what
    rebuilding it needs. Version 9 stores them apart from the manifest (``NumbersSection``)."""

    errors: tuple[float, ...] = ()  # relative Frobenius error per tensor, aligned with Manifest.tensors
    fidelity: FidelityRecord | None = None


class NumbersSection:
    """The members' numbers of a version-9 bundle, decoded and checked the first time any member's
    are asked for. ``load(members, tensors)``: every member's numbers, in manifest order, from the
    section's stored bytes, raising the reader's errors for a damaged section; the manifest's
    parser gives the counts (``bind``). Safe to share between threads."""

    def __init__(self, load: Callable[[int, int], tuple[MemberNumbers, ...]]) -> None:
        self._load: Callable[[int, int], tuple[MemberNumbers, ...]] | None = load
        self._counts = (0, 0)
        self._numbers: tuple[MemberNumbers, ...] | None = None
        self._lock = threading.Lock()

    def bind(self, members: int, tensors: int) -> None:
        """The manifest's member and tensor counts, which the section must match."""
        self._counts = (members, tensors)

    def member(self, index: int) -> MemberNumbers:
        if self._numbers is None:
            with self._lock:
                if self._numbers is None:
                    assert self._load is not None
                    self._numbers = self._load(*self._counts)
                    self._load = None  # the stored bytes it holds are no longer needed
        return self._numbers[index]


@dataclass(frozen=True, eq=False)
class DeferredNumbers:
    """One member's numbers in a ``NumbersSection``, read when first asked for."""

    section: NumbersSection
    index: int

    def resolve(self) -> MemberNumbers:
        return self.section.member(self.index)

    def __reduce__(self) -> tuple[Any, ...]:
        # A manifest sent to another process takes the numbers themselves, not the section.
        numbers = self.resolve()
        return MemberNumbers, (numbers.errors, numbers.fidelity)


@dataclass(frozen=True)
class MemberRecord:
    name: str
    source: str  # the input's file name
    source_bytes: int  # the input file's size
    metadata: dict[str, str] | None  # the input's safetensors __metadata__, verbatim
    coefficients: str | None  # blob holding all this member's coefficients, or None if rank 0 everywhere
    raw: dict[str, str] = field(default_factory=dict)  # tensor name -> blob, for raw tensors
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> dtype where it differs
    #: ``errors`` and ``fidelity`` (the properties below), or where a version-9 section holds them.
    numbers: MemberNumbers | DeferredNumbers = field(default_factory=MemberNumbers)
    added: bool = False  # joined by `unipack add` (projected onto existing bases), not by the merge
    lossless_bytes: int | None = None  # the input compressed by zstd at stats.lossless.level, informative
    metrics: dict[str, dict[str, float]] | None = None  # eval results: {"original": {...}, "unipack": {...}}
    configs: dict[str, str] | None = None  # small files of its Hugging Face folder, verbatim (config.json, ...)
    lora: dict[str, tuple[int, float]] = field(default_factory=dict)  # lora module -> (rank r, PEFT scale s)
    codes: str | None = None  # U8 blob of the packed codes of its ``delta`` tensors (spec §3.3, §4.5)
    exact: dict[str, ExactEntry] | None = None  # the lossless tier, per tensor name (spec §9)

    def dtype_of(self, tensor: TensorRecord) -> str:
        return self.dtypes.get(tensor.name, tensor.dtype)

    @property
    def resolved_numbers(self) -> MemberNumbers:
        n = self.numbers
        return n.resolve() if isinstance(n, DeferredNumbers) else n

    @property
    def errors(self) -> tuple[float, ...]:
        """Relative Frobenius error per tensor, aligned with ``Manifest.tensors``."""
        return self.resolved_numbers.errors

    @property
    def fidelity(self) -> FidelityRecord | None:
        return self.resolved_numbers.fidelity


@dataclass(frozen=True)
class BaseTensor:
    """One tensor of the base model a bundle references (spec §11.1): what a base given at
    extraction must hold under ``name``, bit for bit."""

    name: str  # its name in the base model's files (the bundle's name less or plus a prefix)
    dtype: str
    shape: tuple[int, ...]
    sha256: str  # of its little-endian bytes in C order (as a lossless tier's sha256, spec §9.1)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class BaseReference:
    """The base model a bundle's ``delta`` tensors are centred on, referenced, not stored (spec §11)."""

    source: str  # the base's file or folder name at merge time (informative, for messages)
    sha256: str  # ``base_digest(tensors)``: the referenced tensors' identity in one string
    tensors: dict[str, BaseTensor]  # bundle tensor name -> the base tensor its center is

    @property
    def nbytes(self) -> int:
        """Bytes of the referenced tensors (what the bundle does not store)."""
        return sum(b.nbytes for b in self.tensors.values())


def base_digest(tensors: dict[str, BaseTensor]) -> str:
    """SHA-256 of the lines ``<base tensor name> <sha256>\n`` (UTF-8), sorted by name (spec §11.1)."""
    lines = "".join(f"{b.name} {b.sha256}\n" for b in sorted(tensors.values(), key=lambda b: b.name))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    created_by: str
    options: dict[str, Any]
    tensors: tuple[TensorRecord, ...]
    members: tuple[MemberRecord, ...]
    blobs: dict[str, BlobRecord]
    format_version: int = FORMAT_VERSION
    stats: dict[str, Any] = field(default_factory=dict)  # informative numbers (input bytes, timings)
    base: BaseReference | None = None  # the base model its delta tensors may be centred on (spec §11)

    def member(self, name: str) -> MemberRecord:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def coef_offsets(self, member: MemberRecord | None = None) -> dict[str, tuple[int, int]]:
        """Element range of each tensor's coefficients inside ``member``'s coefficient blob.

        A tensor the member holds raw (an override, see spec §4.4) has no coefficients there; a
        LoRA module has a core only in the members that touch it.
        """
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        for t in self.tensors:
            shape = t.params.coefficient_shape(t, member)
            if shape is not None:
                n = math.prod(shape)
                out[t.name] = (offset, offset + n)
                offset += n
        return out

    def code_offsets(self, member: MemberRecord | None = None) -> dict[str, tuple[int, int]]:
        """Byte range of each tensor's packed codes inside ``member``'s codes blob (tensor order)."""
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        for t in self.tensors:
            n = t.params.code_bytes(t, member)
            if n is not None:
                out[t.name] = (offset, offset + n)
                offset += n
        return out

    def coefficient_dtype(self) -> str:
        """The dtype every basis and coefficient blob shares (spec §3.2): the merge's ``--dtype``."""
        for t in self.tensors:
            for ref in t.params.blob_refs(t):
                if ref.dtype == "coef" and ref.name is not None:
                    return self.blobs[ref.name].dtype
        return dtypes.STORAGE_DTYPES.get(str(self.options.get("dtype")), "F32")


def code_runs(tensors: Sequence[TensorRecord], raw: Collection[str]) -> list[int]:
    """Bytes of each run of consecutive tensors (of ``tensors``, in order) whose codes share a
    level count, in the codes blob of a member that holds the tensors named ``raw`` as its own.
    The writer codes each run as a zstd block of its own (``codec.encode``'s ``parts``)."""
    runs: list[list[int]] = []  # [levels, bytes]
    for t in tensors:
        n = None if t.name in raw else t.params.code_bytes(t, None)
        if n is None:
            continue
        levels = t.params.code_levels() or 0
        if runs and runs[-1][0] == levels:
            runs[-1][1] += n
        else:
            runs.append([levels, n])
    return [n for _, n in runs]
