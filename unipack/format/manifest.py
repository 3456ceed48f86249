"""The .upk manifest: what a bundle holds and how to rebuild every member, as typed records.

``Manifest.to_json`` writes it; ``Manifest.from_json`` reads it back with a strict schema
check (types, ranges, references between records), so code past this module can trust it.
The layout is specified in ``format_spec/upk-v1.md``; change both together.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.safetensors_file import MAX_DIM, MAX_NDIM, is_int

FORMAT_NAME = "unipack.upk"
FORMAT_VERSION = 1
#: Version 2 adds the ``lora`` storage (LoRA adapter modules); a bundle without it stays version 1
#: so that readers predating it still read every dense bundle.
LORA_FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

STORAGES = ("shared", "raw", "exact", "lora")
LORA_FORMS = ("subspace", "factors")
SCHEMES = ("rows", "flat")
SIDES = ("right", "left")
RAW_CAUSES = ("requested", "budget", "values")

MAX_NAME_CHARS = 255
MAX_TENSOR_NAME_CHARS = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_member_name(name: object, where: str = "member name") -> str:
    """Member names become file names (``extract --all``): keep them inert."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise FormatError(f"{where}: {len(name)} characters (at most {MAX_NAME_CHARS})")
    if _CONTROL.search(name) or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise FormatError(f"{where} {name!r}: control characters, path separators and leading dots "
                          f"are not allowed")
    return name


#: Largest config file kept verbatim per member (config.json and friends are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024


def check_config_name(name: object, where: str = "config file name") -> str:
    """Config files are written back into a folder (``extract --format hf``): a plain ``*.json`` name."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}", name) \
            or not name.endswith(".json"):
        raise FormatError(f"{where}: {str(name)[:80]!r} is not a plain .json file name")
    return name


def check_tensor_name(name: object, where: str = "tensor name") -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: must be a non-empty string")
    if len(name) > MAX_TENSOR_NAME_CHARS or _CONTROL.search(name):
        raise FormatError(f"{where} {name[:80]!r}: too long or contains control characters")
    return name


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
class TensorRecord:
    """How one tensor name is stored across all members."""

    name: str
    storage: str  # shared | raw | exact
    dtype: str  # the members' dtype (a member's entry in MemberRecord.dtypes overrides it)
    shape: tuple[int, ...] | None  # None only for raw tensors whose shape varies by member
    reason: str  # why this storage and rank were chosen, for humans
    scheme: str | None = None  # shared: rows | flat
    rank: int = 0
    side: str | None = None  # rows: the basis spans the right (columns) or left (rows) side
    matrix: tuple[int, int] | None = None  # rows: the 2-D view (shape[0], prod(shape[1:]))
    mean: str | None = None
    basis: str | None = None
    blob: str | None = None  # exact: the one blob all members share
    energy: float | None = None  # shared: fraction of centred variance the rank keeps
    spectrum: tuple[float, ...] | None = None  # shared: leading centred eigenvalues, descending (informative)
    variance: float | None = None  # shared: total centred variance, the sum of all eigenvalues (informative)
    raw_cause: str | None = None  # raw: requested (--raw, shapes differ) | budget (cheaper raw) | values (NaN, ints)
    # lora: a LoRA module (name = the key prefix before ".lora_A.weight"), shape = [out, in] of its update
    form: str | None = None  # lora: subspace (shared bases U, V + per-member cores) | factors (each member's own A, B)
    ranks: tuple[int, int] | None = None  # lora subspace: (k_out, k_in), the sizes of U and V
    left: str | None = None  # lora subspace: U, out x k_out (None when k_out is 0)
    right: str | None = None  # lora subspace: V, in x k_in (None when k_in is 0)

    @property
    def lora_keys(self) -> tuple[str, str]:
        """A LoRA module's two keys in an adapter file: (A, B)."""
        return f"{self.name}.lora_A.weight", f"{self.name}.lora_B.weight"

    def has_coefficients(self) -> bool:
        """Whether members touching this record keep coefficients (a block of the coefficient blob)."""
        if self.storage == "shared":
            return self.rank > 0
        return self.storage == "lora" and self.form == "subspace" and self.ranks is not None \
            and self.ranks[0] * self.ranks[1] > 0

    def coef_shape(self) -> tuple[int, ...]:
        """Shape of one member's coefficients for this (shared) tensor, or its core (lora subspace)."""
        if self.storage == "lora" and self.ranks is not None:
            return self.ranks
        if self.storage != "shared":
            return (0,)
        if self.scheme == "flat":
            return (self.rank,)
        assert self.matrix is not None
        m, n = self.matrix
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    def basis_shape(self) -> tuple[int, ...]:
        assert self.shape is not None
        if self.scheme == "flat":
            return (self.rank, math.prod(self.shape))
        assert self.matrix is not None
        m, n = self.matrix
        return (n, self.rank) if self.side == "right" else (m, self.rank)


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


@dataclass(frozen=True)
class MemberRecord:
    name: str
    source: str  # the input's file name
    source_bytes: int  # the input file's size
    metadata: dict[str, str] | None  # the input's safetensors __metadata__, verbatim
    coefficients: str | None  # blob holding all this member's coefficients, or None if rank 0 everywhere
    raw: dict[str, str] = field(default_factory=dict)  # tensor name -> blob, for raw tensors
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> dtype where it differs
    errors: tuple[float, ...] = ()  # relative Frobenius error per tensor, aligned with Manifest.tensors
    added: bool = False  # joined by `unipack add` (projected onto existing bases), not by the merge
    lossless_bytes: int | None = None  # the input losslessly compressed (zstd -19), informative
    fidelity: FidelityRecord | None = None
    metrics: dict[str, dict[str, float]] | None = None  # eval results: {"original": {...}, "unipack": {...}}
    configs: dict[str, str] | None = None  # small files of its Hugging Face folder, verbatim (config.json, ...)
    lora: dict[str, tuple[int, float]] = field(default_factory=dict)  # lora module -> (rank r, PEFT scale s)

    def dtype_of(self, tensor: TensorRecord) -> str:
        return self.dtypes.get(tensor.name, tensor.dtype)


@dataclass(frozen=True)
class Manifest:
    created_by: str
    options: dict[str, Any]
    tensors: tuple[TensorRecord, ...]
    members: tuple[MemberRecord, ...]
    blobs: dict[str, BlobRecord]
    format_version: int = FORMAT_VERSION
    stats: dict[str, Any] = field(default_factory=dict)  # informative numbers (input bytes, timings)

    def member(self, name: str) -> MemberRecord:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def coef_offsets(self, member: MemberRecord | None = None) -> dict[str, tuple[int, int]]:
        """Element range of each shared tensor's coefficients inside ``member``'s coefficient blob.

        A tensor the member holds raw (an override, see spec §4.4) has no coefficients there; a
        LoRA module has a core only in the members that touch it.
        """
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        overrides = member.raw if member is not None else {}
        touched = member.lora if member is not None else {}
        for t in self.tensors:
            if t.storage == "lora" and t.name not in touched:
                continue
            if t.has_coefficients() and t.name not in overrides:
                n = math.prod(t.coef_shape())
                out[t.name] = (offset, offset + n)
                offset += n
        return out

    # -- serialisation -------------------------------------------------------------------------

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "options": self.options,
            "stats": self.stats,
            "tensors": [_tensor_to_doc(t) for t in self.tensors],
            "members": [_member_to_doc(m) for m in self.members],
            "blobs": {name: _blob_to_doc(b) for name, b in self.blobs.items()},
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @staticmethod
    def from_json(doc: Any, where: str) -> Manifest:
        return _parse_manifest(doc, where)


def _tensor_to_doc(t: TensorRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": t.name, "storage": t.storage, "dtype": t.dtype,
                           "shape": None if t.shape is None else list(t.shape), "reason": t.reason}
    if t.storage == "shared":
        doc.update(scheme=t.scheme, rank=t.rank, mean=t.mean, basis=t.basis, energy=t.energy)
        if t.spectrum is not None:
            doc.update(spectrum=list(t.spectrum), variance=t.variance)
        if t.scheme == "rows":
            doc.update(side=t.side, matrix=list(t.matrix) if t.matrix else None)
    if t.storage == "exact":
        doc["blob"] = t.blob
    if t.storage == "raw" and t.raw_cause is not None:
        doc["raw_cause"] = t.raw_cause
    if t.storage == "lora":
        doc["form"] = t.form
        if t.form == "subspace":
            assert t.ranks is not None
            doc.update(ranks=list(t.ranks), left=t.left, right=t.right)
        if t.spectrum is not None:
            doc.update(spectrum=list(t.spectrum), variance=t.variance)
    return doc


def _member_to_doc(m: MemberRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": m.name, "source": m.source, "source_bytes": m.source_bytes, "metadata": m.metadata,
        "coefficients": m.coefficients, "raw": m.raw, "dtypes": m.dtypes, "errors": list(m.errors)}
    if m.added:
        doc["added"] = True
    if m.lossless_bytes is not None:
        doc["lossless_bytes"] = m.lossless_bytes
    if m.fidelity is not None:
        f = m.fidelity
        doc["fidelity"] = {"norms": list(f.norms), "delta_errors": list(f.delta_errors),
                           "mean_errors": list(f.mean_errors)}
        if f.svd_errors is not None and f.svd_ranks is not None:
            doc["fidelity"].update(svd_errors=list(f.svd_errors), svd_ranks=list(f.svd_ranks))
    if m.metrics is not None:
        doc["metrics"] = m.metrics
    if m.configs is not None:
        doc["configs"] = m.configs
    if m.lora:
        doc["lora"] = {module: [rank, scale] for module, (rank, scale) in m.lora.items()}
    return doc


def _blob_to_doc(b: BlobRecord) -> dict[str, Any]:
    return {"dtype": b.dtype, "shape": list(b.shape), "codec": b.codec, "shuffle": b.shuffle,
            "sha256": b.sha256}


# -- strict parsing ------------------------------------------------------------------------------

class _Doc:
    """Typed access to one JSON object with errors that say where the problem is."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: expected a JSON object")
        self.doc, self.where = doc, where

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.doc:
            if optional:
                return None
            raise FormatError(f"{self.where}: missing field {key!r}")
        return self.doc[key]

    def _typed(self, key: str, optional: bool, ok: Callable[[Any], bool], what: str) -> Any:
        """The field's value if ``ok(value)``; None if it is optional and absent or null."""
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not ok(v):
            raise FormatError(f"{self.where}: field {key!r} must be {what}")
        return v

    def text(self, key: str, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: isinstance(v, str), "a string")

    def integer(self, key: str, lo: int = 0, hi: int = 2**62, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")

    def num(self, key: str, optional: bool = False) -> Any:
        v = self._typed(key, optional, lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v),
                        "a finite number")
        return None if v is None else float(v)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        v = self.text(key)
        if v not in allowed:
            raise FormatError(f"{self.where}: field {key!r} is {v!r}, expected one of {allowed}")
        return v

    def shape(self, key: str, optional: bool = False) -> Any:
        v = self._typed(key, optional,
                        lambda v: isinstance(v, list) and len(v) <= MAX_NDIM
                        and all(is_int(d) and 0 <= d <= MAX_DIM for d in v),
                        f"a list of at most {MAX_NDIM} non-negative integers")
        return None if v is None else tuple(v)

    def numbers(self, key: str, optional: bool = False, count: int | None = None, ints: bool = False) -> Any:
        """A list of finite non-negative numbers (``count`` long if given) as a tuple."""
        def ok(v: Any) -> bool:
            return isinstance(v, list) and (count is None or len(v) == count) and all(
                (is_int(x) or (not ints and isinstance(x, float) and math.isfinite(x))) and x >= 0 for x in v)
        what = "integers" if ints else "numbers"
        v = self._typed(key, optional, ok, f"a list of {'' if count is None else count} non-negative {what}")
        return None if v is None else tuple(int(x) if ints else float(x) for x in v)

    def obj(self, key: str, optional: bool = False) -> Any:
        return self._typed(key, optional, lambda v: isinstance(v, dict), "an object")

    def array(self, key: str) -> list[Any]:
        return self._typed(key, False, lambda v: isinstance(v, list), "a list")  # type: ignore[no-any-return]


def _str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{where}: must map strings to strings")
    return dict(value)


def _parse_manifest(raw: Any, where: str) -> Manifest:
    d = _Doc(raw, f"{where}: manifest")
    if d.text("format") != FORMAT_NAME:
        raise FormatError(f"{where}: manifest format is {d.doc.get('format')!r}, expected {FORMAT_NAME!r}")
    version = d.integer("format_version", 0, 2**31)
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"{where}: .upk format version {version} is not supported by this unipack "
                          f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade unipack")
    blobs: dict[str, BlobRecord] = {}
    for name, spec in d.obj("blobs").items():
        b = _Doc(spec, f"{where}: blob {name!r}")
        sha = b.text("sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise FormatError(f"{where}: blob {name!r}: sha256 must be 64 lowercase hex digits")
        shuffle = b.doc.get("shuffle")
        if not isinstance(shuffle, bool):
            raise FormatError(f"{where}: blob {name!r}: shuffle must be true or false")
        blobs[name] = BlobRecord(dtypes.check_dtype(b.doc.get("dtype"), f"{where}: blob {name!r}"),
                                 b.shape("shape"), b.choice("codec", ("none", "zstd")), shuffle, sha)
    tensors = tuple(_parse_tensor(t, f"{where}: tensors[{i}]", blobs) for i, t in enumerate(d.array("tensors")))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: manifest lists a tensor name twice")
    members = tuple(_parse_member(m, f"{where}: members[{i}]", tensors, blobs)
                    for i, m in enumerate(d.array("members")))
    if len({m.name for m in members}) != len(members):
        raise FormatError(f"{where}: manifest lists a member name twice")
    stats = d.obj("stats", optional=True) or {}
    input_bytes = stats.get("input_bytes", 0)
    if not isinstance(input_bytes, int) or isinstance(input_bytes, bool) or input_bytes < 0:
        raise FormatError(f"{where}: manifest stats.input_bytes must be a non-negative integer")
    manifest = Manifest(created_by=d.text("created_by"), options=d.obj("options"), tensors=tensors,
                        members=members, blobs=blobs, format_version=version, stats=stats)
    _check_references(manifest, where)
    return manifest


def _parse_tensor(raw: Any, where: str, blobs: dict[str, BlobRecord]) -> TensorRecord:
    d = _Doc(raw, where)
    name = check_tensor_name(d.text("name"), f"{where}: name")
    where = f"{where.rsplit(':', 1)[0]}: tensor {name!r}"
    d.where = where
    storage = d.choice("storage", STORAGES)
    dtype = dtypes.check_dtype(d.doc.get("dtype"), where)
    shape = d.shape("shape", optional=storage == "raw")
    rec = TensorRecord(name=name, storage=storage, dtype=dtype, shape=shape, reason=d.text("reason"))
    if storage == "exact":
        return TensorRecord(**{**rec.__dict__, "blob": d.text("blob")})
    if storage == "raw":
        cause = d.doc.get("raw_cause")
        if cause is not None and cause not in RAW_CAUSES:
            raise FormatError(f"{where}: field 'raw_cause' is {cause!r}, expected one of {RAW_CAUSES}")
        return TensorRecord(**{**rec.__dict__, "raw_cause": cause})
    if dtype not in dtypes.FLOAT_DTYPES:
        raise FormatError(f"{where}: {storage} tensors must have a float dtype, not {dtype}")
    if storage == "lora":
        return _parse_lora(d, rec)
    scheme = d.choice("scheme", SCHEMES)
    side = d.choice("side", SIDES) if scheme == "rows" else None
    matrix = None
    assert shape is not None
    numel = math.prod(shape)
    if scheme == "rows":
        matrix = d.shape("matrix")
        if len(shape) < 1 or len(matrix) != 2 or matrix[0] != shape[0] or matrix[0] * matrix[1] != numel:
            raise FormatError(f"{where}: matrix {list(matrix)} is not the 2-D view of shape {list(shape)}")
        limit = matrix[1] if side == "right" else matrix[0]
    else:
        limit = numel
    rank = d.integer("rank", 0, limit)
    energy = d.num("energy", optional=True)
    spectrum = d.numbers("spectrum", optional=True)
    return TensorRecord(name=name, storage=storage, dtype=dtype, shape=shape, reason=rec.reason, scheme=scheme,
                        rank=rank, side=side, matrix=matrix, mean=d.text("mean"),
                        basis=d.text("basis", optional=True), energy=energy, spectrum=spectrum,
                        variance=d.num("variance", optional=spectrum is None))


def _parse_lora(d: _Doc, rec: TensorRecord) -> TensorRecord:
    """A LoRA module: shape [out, in]; ``subspace`` names U and V and their sizes."""
    assert rec.shape is not None
    if len(rec.shape) != 2 or 0 in rec.shape:
        raise FormatError(f"{d.where}: a lora module's shape must be [out, in], got {list(rec.shape)}")
    form = d.choice("form", LORA_FORMS)
    spectrum = d.numbers("spectrum", optional=True)
    fields = {**rec.__dict__, "form": form, "spectrum": spectrum,
              "variance": d.num("variance", optional=spectrum is None)}
    if form == "subspace":
        ranks = d.shape("ranks")
        out_dim, in_dim = rec.shape
        if len(ranks) != 2 or ranks[0] > out_dim or ranks[1] > in_dim:
            raise FormatError(f"{d.where}: ranks {list(ranks)} must be [k_out <= {out_dim}, k_in <= {in_dim}]")
        fields.update(ranks=ranks, left=d.text("left", optional=True), right=d.text("right", optional=True))
    return TensorRecord(**fields)


def _parse_lora_map(value: Any, where: str, tensors: tuple[TensorRecord, ...]) -> dict[str, tuple[int, float]]:
    """A member's ``lora`` map: module -> [rank >= 1, finite scale], modules being lora records."""
    if not isinstance(value, dict):
        raise FormatError(f"{where}: field 'lora' must be an object")
    modules = {t.name for t in tensors if t.storage == "lora"}
    out: dict[str, tuple[int, float]] = {}
    for module, entry in value.items():
        if module not in modules:
            raise FormatError(f"{where}: lora entry {module!r} is not a lora module of this bundle")
        if not (isinstance(entry, list) and len(entry) == 2 and is_int(entry[0]) and 1 <= entry[0] <= MAX_DIM
                and (is_int(entry[1]) or isinstance(entry[1], float)) and math.isfinite(entry[1])):
            raise FormatError(f"{where}: lora entry {module!r} must be [rank >= 1, finite scale]")
        out[module] = (int(entry[0]), float(entry[1]))
    return out


def _parse_member(raw: Any, where: str, tensors: tuple[TensorRecord, ...],
                  blobs: dict[str, BlobRecord]) -> MemberRecord:
    d = _Doc(raw, where)
    name = check_member_name(d.text("name"), f"{where}: name")
    d.where = where = f"{where.rsplit(':', 1)[0]}: member {name!r}"
    metadata = d.obj("metadata", optional=True)
    errors = d.array("errors")
    if len(errors) != len(tensors) or not all(
        isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0 for e in errors
    ):
        raise FormatError(f"{where}: errors must list one non-negative number per tensor ({len(tensors)})")
    fidelity = None
    if d.obj("fidelity", optional=True) is not None:
        f = _Doc(d.doc["fidelity"], f"{where}: fidelity")
        n = len(tensors)
        svd_errors = f.numbers("svd_errors", optional=True, count=n)
        fidelity = FidelityRecord(f.numbers("norms", count=n), f.numbers("delta_errors", count=n),
                                  f.numbers("mean_errors", count=n), svd_errors,
                                  f.numbers("svd_ranks", optional=svd_errors is None, count=n, ints=True))
    metrics = d.obj("metrics", optional=True)
    if metrics is not None:
        metrics = _metrics(metrics, f"{where}: metrics")
    configs = d.obj("configs", optional=True)
    if configs is not None:
        configs = _str_map(configs, f"{where}: configs")
        for file_name in configs:
            check_config_name(file_name, f"{where}: configs")
    lora = _parse_lora_map(d.doc["lora"], where, tensors) if d.doc.get("lora") is not None else {}
    added = d.doc.get("added", False)
    if not isinstance(added, bool):
        raise FormatError(f"{where}: field 'added' must be true or false")
    member_dtypes = _str_map(d.obj("dtypes"), f"{where}: dtypes")
    for dt in member_dtypes.values():
        dtypes.check_dtype(dt, f"{where}: dtypes")
    return MemberRecord(
        name=name, source=d.text("source"), source_bytes=d.integer("source_bytes"),
        metadata=None if metadata is None else _str_map(metadata, f"{where}: metadata"),
        coefficients=d.text("coefficients", optional=True), raw=_str_map(d.obj("raw"), f"{where}: raw"),
        dtypes=member_dtypes, errors=tuple(float(e) for e in errors), added=added,
        lossless_bytes=d.integer("lossless_bytes", optional=True), fidelity=fidelity, metrics=metrics,
        configs=configs, lora=lora,
    )


def _metrics(value: dict[str, Any], where: str) -> dict[str, dict[str, float]]:
    """``{"original": {name: number}, "bundle": {...}}``: finite numbers under string keys."""
    out: dict[str, dict[str, float]] = {}
    for key, scores in value.items():
        if not isinstance(scores, dict) or not all(
                isinstance(k, str) and (is_int(v) or isinstance(v, float)) and math.isfinite(v)
                for k, v in scores.items()):
            raise FormatError(f"{where}: {key!r} must map metric names to finite numbers")
        out[key] = {k: float(v) for k, v in scores.items()}
    return out


def _check_references(m: Manifest, where: str) -> None:
    """Every blob a record names exists with the shape it must have; no blob is unaccounted for."""
    used: set[str] = set()

    def blob(name: str | None, what: str, shape: tuple[int, ...] | None, dtype: str | None) -> BlobRecord:
        if name is None or name not in m.blobs:
            raise FormatError(f"{where}: {what} refers to blob {name!r}, which the manifest does not list")
        if name in used:
            raise FormatError(f"{where}: blob {name!r} is referenced twice")
        used.add(name)
        b = m.blobs[name]
        if shape is not None and b.shape != shape:
            raise FormatError(f"{where}: {what}: blob {name!r} has shape {list(b.shape)}, expected {list(shape)}")
        if dtype is not None and b.dtype != dtype:
            raise FormatError(f"{where}: {what}: blob {name!r} has dtype {b.dtype}, expected {dtype}")
        return b

    coef_dtype = None
    by_name = {t.name: t for t in m.tensors}
    for t in m.tensors:
        what = f"tensor {t.name!r}"
        if t.storage == "exact":
            blob(t.blob, what, t.shape, t.dtype)
        elif t.storage == "shared":
            mean = blob(t.mean, f"{what} mean", t.shape, None)
            if mean.dtype not in dtypes.FLOAT_DTYPES:
                raise FormatError(f"{where}: {what}: mean blob must be float")
            if t.rank > 0:
                b = blob(t.basis, f"{what} basis", t.basis_shape(), coef_dtype)
                coef_dtype = coef_dtype or b.dtype
                if b.dtype not in dtypes.FLOAT_DTYPES:
                    raise FormatError(f"{where}: {what}: basis blob must be float")
            elif t.basis is not None:
                raise FormatError(f"{where}: {what}: rank 0 but a basis blob is named")
        elif t.storage == "lora":
            if m.format_version < LORA_FORMAT_VERSION:
                raise FormatError(f"{where}: {what}: lora modules need format version {LORA_FORMAT_VERSION}, "
                                  f"the manifest says {m.format_version}")
            if t.form == "subspace":
                assert t.shape is not None and t.ranks is not None
                for side, name, dim, k in (("left", t.left, t.shape[0], t.ranks[0]),
                                           ("right", t.right, t.shape[1], t.ranks[1])):
                    if k == 0:
                        if name is not None:
                            raise FormatError(f"{where}: {what}: {side} rank 0 but a {side} blob is named")
                        continue
                    b = blob(name, f"{what} {side} basis", (dim, k), coef_dtype)
                    coef_dtype = coef_dtype or b.dtype
                    if b.dtype not in dtypes.FLOAT_DTYPES:
                        raise FormatError(f"{where}: {what}: {side} basis blob must be float")
    for mem in m.members:
        total = sum(b - a for a, b in m.coef_offsets(mem).values())
        what = f"member {mem.name!r}"
        for tname, dt in mem.dtypes.items():
            known = by_name.get(tname)
            if known is None:
                raise FormatError(f"{where}: {what}: dtype given for unknown tensor {tname!r}")
            if known.storage == "exact" and tname not in mem.raw:
                raise FormatError(f"{where}: {what}: overrides the dtype of exact tensor {tname!r}")
            if (known.dtype in dtypes.FLOAT_DTYPES) != (dt in dtypes.FLOAT_DTYPES):
                raise FormatError(f"{where}: {what}: tensor {tname!r} dtype {dt} differs in kind from {known.dtype}")
        if total:
            blob(mem.coefficients, f"{what} coefficients", (total,), coef_dtype)
        elif mem.coefficients is not None:
            raise FormatError(f"{where}: {what}: names a coefficient blob but no tensor has rank > 0")
        raw_names = {t.name for t in m.tensors if t.storage == "raw"}
        factor_keys = _factor_keys(m, mem)
        if not raw_names <= set(mem.raw) or not set(mem.raw) <= (set(by_name) | set(factor_keys)):
            raise FormatError(f"{where}: {what}: raw blobs {sorted(mem.raw)[:5]} do not cover the raw tensors "
                              f"{sorted(raw_names)[:5]} (or name unknown tensors)")
        for key, (t, shape) in factor_keys.items():
            if key not in mem.raw:
                raise FormatError(f"{where}: {what}: touches lora module {t.name!r} (stored as factors) but "
                                  f"has no raw blob for {key!r}")
            blob(mem.raw[key], f"{what} lora factor {key!r}", shape, mem.dtype_of(t))
        for tname, bname in mem.raw.items():
            if tname in factor_keys:
                continue
            t = by_name[tname]
            if t.storage == "lora":
                raise FormatError(f"{where}: {what}: raw entry {tname!r} names a lora module; its factors are "
                                  f"stored under their own keys")
            # A raw tensor's shape may vary by member; an override keeps the tensor's shape.
            blob(bname, f"{what} raw tensor {tname!r}", t.shape, mem.dtype_of(t))
    unused = set(m.blobs) - used
    if unused:
        raise FormatError(f"{where}: blobs {sorted(unused)[:5]} are not referenced by any record")


def _factor_keys(m: Manifest, mem: MemberRecord) -> dict[str, tuple[TensorRecord, tuple[int, int]]]:
    """The raw keys a member must have for the ``factors``-form LoRA modules it touches, with
    each factor's shape: A is r x in, B is out x r."""
    out: dict[str, tuple[TensorRecord, tuple[int, int]]] = {}
    for t in m.tensors:
        if t.storage == "lora" and t.form == "factors" and t.name in mem.lora:
            assert t.shape is not None
            rank = mem.lora[t.name][0]
            a_key, b_key = t.lora_keys
            out[a_key] = (t, (rank, t.shape[1]))
            out[b_key] = (t, (t.shape[0], rank))
    return out
