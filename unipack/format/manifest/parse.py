"""The manifest as JSON, both ways: ``to_json`` writes it, ``from_json`` reads it back with a
strict schema check (types, ranges, references between records), so code past this module can
trust it. Each record's scheme-specific fields are written and read by its scheme
(``StorageParams.to_doc``, ``StorageFormat.parse_params``). The layout is specified in
``format_spec/upk-v1.md``; change both together.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from unipack.errors import FormatError
from unipack.format import codec, dtypes
from unipack.format.manifest.doc import Doc, nonnegative_numbers, str_map
from unipack.format.manifest.names import check_config_name, check_member_name, check_tensor_name
from unipack.format.manifest.records import (
    BASE_REF_FORMAT_VERSION,
    CHUNKED_CODEC,
    CHUNKED_FORMAT_VERSION,
    FORMAT_NAME,
    MANIFEST_BLOB,
    MEMBER_NUMBERS_FORMAT_VERSION,
    NUMBERS_BLOB,
    RESIDUAL_CODINGS,
    SUPPORTED_VERSIONS,
    BaseReference,
    BaseTensor,
    BlobRecord,
    DeferredNumbers,
    ExactEntry,
    FidelityRecord,
    Manifest,
    MemberNumbers,
    MemberRecord,
    NumbersSection,
    TensorRecord,
    base_digest,
)
from unipack.format.manifest.references import check_references
from unipack.format.manifest.storages import STORAGE_FORMATS, StorageFormat, formats_of, storages
from unipack.format.safetensors_file import MAX_DIM, _check_strings, _no_constants, is_int


def to_json(manifest: Manifest, *, numbers_apart: bool = False) -> str:
    """The manifest's JSON. ``numbers_apart``: without the members' ``errors`` and ``fidelity``,
    which ``numbers_to_json`` writes for a version-9 numbers section (spec §2.4)."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": manifest.format_version,
        "created_by": manifest.created_by,
        "options": manifest.options,
        "stats": manifest.stats,
        "tensors": [_tensor_to_doc(t) for t in manifest.tensors],
        "members": [_member_to_doc(m, numbers=not numbers_apart) for m in manifest.members],
        "blobs": {name: _blob_to_doc(b) for name, b in manifest.blobs.items()},
    }
    if manifest.base is not None:  # only then: a bundle without one keeps its bytes (and version)
        doc["base"] = _base_to_doc(manifest.base)
    return _dumps(doc)


def numbers_to_json(manifest: Manifest) -> str:
    """The JSON of a version-9 numbers section: every member's numbers, in manifest order."""
    return _dumps({"members": [_numbers_to_doc(m.resolved_numbers) for m in manifest.members]})


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def from_json(doc: Any, where: str, numbers: NumbersSection | None = None) -> Manifest:
    """The manifest of a parsed JSON document. ``numbers``: the bundle's version-9 numbers
    section, where its members' ``errors`` and ``fidelity`` are (read when first asked for)."""
    return _parse_manifest(doc, where, numbers)


def parse_numbers(text: str, where: str, members: int, tensors: int) -> tuple[MemberNumbers, ...]:
    """A version-9 numbers section's JSON: one entry per member (``members`` of them), each with
    the numbers ``_parse_numbers`` checks for ``tensors`` tensors."""
    d = Doc(loads(text, where), where)
    entries = d.array("members")
    if len(entries) != members:
        raise FormatError(f"{where}: lists numbers for {len(entries)} members, the manifest has {members}")
    return tuple(_parse_numbers(Doc(e, f"{where}: members[{i}]"), tensors) for i, e in enumerate(entries))


def loads(text: str, where: str) -> Any:
    """A manifest's JSON text parsed under ``safetensors_file.strict_json``'s rules, with its
    errors: no duplicate key, no NaN or Infinity, no string that is not Unicode text (a lone
    surrogate).

    The same rules, cheaper where the text gives no cause: ``strict_json`` walks every parsed
    value to encode each string, which cost as much as parsing a manifest of numbers. A lone
    surrogate can only come from the text itself (which ``encode`` finds, at C speed) or from a
    ``\\uXXXX`` escape, so the walk is made only where the text has an escape (``json.dumps`` with
    ``ensure_ascii=False``, as unipack writes, makes none outside control characters). Duplicate
    keys are looked for only in an object whose size shows one (``_unique_keys``).
    """
    try:
        text.encode("utf-8")
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
        if "\\" in text and "\\u" in text:  # a one-character search first: a memchr, no scan
            _check_strings(doc)
        return doc
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: invalid JSON header ({exc})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice is an error, not a silent overwrite. ``dict`` builds
    the object in C; only an object whose size shows a repeated key is looked at key by key."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _tensor_to_doc(t: TensorRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": t.name,
        "storage": t.storage,
        "dtype": t.dtype,
        "shape": None if t.shape is None else list(t.shape),
        "reason": t.reason,
    }
    doc.update(t.params.to_doc(t))
    return doc


def _member_to_doc(m: MemberRecord, *, numbers: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": m.name,
        "source": m.source,
        "source_bytes": m.source_bytes,
        "metadata": m.metadata,
        "coefficients": m.coefficients,
        "raw": m.raw,
        "dtypes": m.dtypes,
    }
    if numbers:
        doc.update(_numbers_to_doc(m.resolved_numbers))
    if m.added:
        doc["added"] = True
    if m.lossless_bytes is not None:
        doc["lossless_bytes"] = m.lossless_bytes
    if m.metrics is not None:
        doc["metrics"] = m.metrics
    if m.configs is not None:
        doc["configs"] = m.configs
    if m.codes is not None:
        doc["codes"] = m.codes
    if m.lora:
        doc["lora"] = {module: [rank, scale] for module, (rank, scale) in m.lora.items()}
    if m.exact is not None:
        doc["exact"] = {name: _exact_entry_to_doc(e) for name, e in m.exact.items()}
    return doc


def _numbers_to_doc(n: MemberNumbers) -> dict[str, Any]:
    doc: dict[str, Any] = {"errors": list(n.errors)}
    if n.fidelity is not None:
        f = n.fidelity
        doc["fidelity"] = {
            "norms": list(f.norms),
            "delta_errors": list(f.delta_errors),
            "mean_errors": list(f.mean_errors),
        }
        if f.svd_errors is not None and f.svd_ranks is not None:
            doc["fidelity"].update(svd_errors=list(f.svd_errors), svd_ranks=list(f.svd_ranks))
    return doc


def _exact_entry_to_doc(e: ExactEntry) -> dict[str, Any]:
    if e.blob is None:
        return {"sha256": e.sha256}
    doc: dict[str, Any] = {"sha256": e.sha256, "blob": e.blob, "coding": e.coding, "base": e.base}
    if e.chunks is not None:
        doc["chunk_sha256"] = list(e.chunks)
    return doc


def _base_to_doc(base: BaseReference) -> dict[str, Any]:
    return {
        "source": base.source,
        "sha256": base.sha256,
        "tensors": {
            name: {"name": b.name, "dtype": b.dtype, "shape": list(b.shape), "sha256": b.sha256}
            for name, b in base.tensors.items()
        },
    }


def _blob_to_doc(b: BlobRecord) -> dict[str, Any]:
    return {"dtype": b.dtype, "shape": list(b.shape), "codec": b.codec, "shuffle": b.shuffle, "sha256": b.sha256}


# -- strict parsing ------------------------------------------------------------------------------


def _parse_manifest(raw: Any, where: str, numbers: NumbersSection | None) -> Manifest:
    d = Doc(raw, f"{where}: manifest")
    if d.text("format") != FORMAT_NAME:
        raise FormatError(f"{where}: manifest format is {d.doc.get('format')!r}, expected {FORMAT_NAME!r}")
    version = d.integer("format_version", 0, 2**31)
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(
            f"{where}: .upk format version {version} is not supported by this unipack "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade unipack"
        )
    codecs = tuple(codec.CODECS)
    blobs = {name: _parse_blob(name, spec, where, codecs) for name, spec in d.obj("blobs").items()}
    if version < CHUNKED_FORMAT_VERSION:
        chunked = next((name for name, b in blobs.items() if b.codec == CHUNKED_CODEC), None)
        if chunked is not None:
            raise FormatError(
                f"{where}: blob {chunked!r}: codec {CHUNKED_CODEC!r} needs format version "
                f"{CHUNKED_FORMAT_VERSION}, not {version}"
            )
    if not STORAGE_FORMATS:  # registered by unipack.schemes, which `import unipack` loads
        raise RuntimeError("no storage schemes registered: import unipack first")
    kinds = {storage: formats_of(storage) for storage in storages()}  # looked up once, not per tensor
    tensors = tuple(_parse_tensor(t, f"{where}: tensors[{i}]", kinds) for i, t in enumerate(d.array("tensors")))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: manifest lists a tensor name twice")
    if numbers is not None:
        if version < MEMBER_NUMBERS_FORMAT_VERSION:
            raise FormatError(
                f"{where}: a members' numbers section needs format version {MEMBER_NUMBERS_FORMAT_VERSION}"
            )
        numbers.bind(len(d.array("members")), len(tensors))
    members = tuple(
        _parse_member(
            m, f"{where}: members[{i}]", tensors, blobs, None if numbers is None else DeferredNumbers(numbers, i)
        )
        for i, m in enumerate(d.array("members"))
    )
    if len({m.name for m in members}) != len(members):
        raise FormatError(f"{where}: manifest lists a member name twice")
    stats = d.obj("stats", optional=True) or {}
    input_bytes = stats.get("input_bytes", 0)
    if not isinstance(input_bytes, int) or isinstance(input_bytes, bool) or input_bytes < 0:
        raise FormatError(f"{where}: manifest stats.input_bytes must be a non-negative integer")
    base = None
    if d.doc.get("base") is not None:
        if version < BASE_REF_FORMAT_VERSION:
            raise FormatError(
                f"{where}: manifest references a base model, which needs format version "
                f"{BASE_REF_FORMAT_VERSION}, not {version}"
            )
        base = _parse_base(d.obj("base"), f"{where}: manifest base")
    manifest = Manifest(
        created_by=d.text("created_by"),
        options=d.obj("options"),
        tensors=tensors,
        members=members,
        blobs=blobs,
        format_version=version,
        stats=stats,
        base=base,
    )
    check_references(manifest, where)
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _parse_base(raw: dict[str, Any], where: str) -> BaseReference:
    """The referenced base model (spec §11.1); which records use it is checked with the references."""
    d = Doc(raw, where)
    sha = d.text("sha256")
    if not _SHA256.fullmatch(sha):
        raise FormatError(f"{where}: sha256 must be 64 lowercase hex digits")
    tensors: dict[str, BaseTensor] = {}
    for name, spec in d.obj("tensors").items():
        e = Doc(spec, f"{where}: tensor {name!r}")
        tensor_sha = e.text("sha256")
        if not _SHA256.fullmatch(tensor_sha):
            raise FormatError(f"{e.where}: sha256 must be 64 lowercase hex digits")
        tensors[name] = BaseTensor(
            check_tensor_name(e.text("name"), f"{e.where}: name"),
            dtypes.check_dtype(e.doc.get("dtype"), e.where),
            e.shape("shape"),
            tensor_sha,
        )
    if not tensors:
        raise FormatError(f"{where}: references no tensor")
    names = [b.name for b in tensors.values()]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: two tensors of the bundle reference one base tensor")
    if base_digest(tensors) != sha:
        raise FormatError(f"{where}: sha256 is not the digest of its tensors' sha256s (spec §11.1)")
    return BaseReference(d.text("source"), sha, tensors)


def _parse_blob(name: str, spec: Any, where: str, codecs: tuple[str, ...]) -> BlobRecord:
    if name in (MANIFEST_BLOB, NUMBERS_BLOB):
        raise FormatError(f"{where}: blob name {name!r} is reserved for the compressed manifest and its numbers")
    b = Doc(spec, f"{where}: blob {name!r}")
    sha = b.text("sha256")
    if not _SHA256.fullmatch(sha):
        raise FormatError(f"{where}: blob {name!r}: sha256 must be 64 lowercase hex digits")
    shuffle = b.doc.get("shuffle")
    if not isinstance(shuffle, bool):
        raise FormatError(f"{where}: blob {name!r}: shuffle must be true or false")
    return BlobRecord(
        dtypes.check_dtype(b.doc.get("dtype"), b.where), b.shape("shape"), b.choice("codec", codecs), shuffle, sha
    )


def _parse_tensor(raw: Any, where: str, kinds: dict[str, list[StorageFormat]]) -> TensorRecord:
    """One tensor record; ``kinds``: each ``storage`` value -> its schemes (``formats_of``)."""
    d = Doc(raw, where)
    name = check_tensor_name(d.text("name"), f"{where}: name")
    where = f"{where.rsplit(':', 1)[0]}: tensor {name!r}"
    d.where = where
    storage = d.choice("storage", tuple(kinds))
    candidates = kinds[storage]
    dtype = dtypes.check_dtype(d.doc.get("dtype"), where)
    shape = d.shape("shape", optional=candidates[0].shape_optional)
    base = TensorRecord(name=name, storage=storage, dtype=dtype, shape=shape, reason=d.text("reason"))
    if candidates[0].float_only and dtype not in dtypes.FLOAT_DTYPES:
        raise FormatError(f"{where}: {storage} tensors must have a float dtype, not {dtype}")
    scheme = candidates[0]
    if scheme.variant is not None:  # several schemes share this storage: its field tells which
        field_name = scheme.variant[0]
        value = d.choice(field_name, tuple(s.variant[1] for s in candidates if s.variant is not None))
        scheme = next(s for s in candidates if s.variant == (field_name, value))
    return TensorRecord(
        name=name, storage=storage, dtype=dtype, shape=shape, reason=base.reason, params=scheme.parse_params(d, base)
    )


def _parse_lora_map(value: Any, where: str, tensors: tuple[TensorRecord, ...]) -> dict[str, tuple[int, float]]:
    """A member's ``lora`` map: module -> [rank >= 1, finite scale], modules being lora records."""
    if not isinstance(value, dict):
        raise FormatError(f"{where}: field 'lora' must be an object")
    modules = {t.name for t in tensors if t.params.lora_module}
    out: dict[str, tuple[int, float]] = {}
    for module, entry in value.items():
        if module not in modules:
            raise FormatError(f"{where}: lora entry {module!r} is not a lora module of this bundle")
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and is_int(entry[0])
            and 1 <= entry[0] <= MAX_DIM
            and (is_int(entry[1]) or isinstance(entry[1], float))
            and math.isfinite(entry[1])
        ):
            raise FormatError(f"{where}: lora entry {module!r} must be [rank >= 1, finite scale]")
        out[module] = (int(entry[0]), float(entry[1]))
    return out


def _check_lora_ranks(
    lora: dict[str, tuple[int, float]],
    member_dtypes: dict[str, str],
    source_bytes: int,
    where: str,
    tensors: tuple[TensorRecord, ...],
) -> None:
    """Spec §7.3: the adapter file held each module's factors, r (in + out) numbers at the
    member's dtype, so none takes more than its ``source_bytes``. Extraction allocates factors of
    that rank whatever the form stores (a subspace core may have a far lower rank): a rank no
    file held would only exhaust memory."""
    by_name = {t.name: t for t in tensors}
    for module, (rank, _) in lora.items():
        t = by_name[module]
        dtype = member_dtypes.get(module, t.dtype)
        if t.shape is None or len(t.shape) != 2 or dtype not in dtypes.FLOAT_DTYPES:
            continue  # the record's own checks refuse these
        if rank * (t.shape[0] + t.shape[1]) * dtypes.itemsize(dtype) > source_bytes:
            raise FormatError(
                f"{where}: lora entry {module!r} has rank {rank}, whose factors take more bytes than its "
                f"adapter file ({source_bytes:,} B)"
            )


def _parse_member(
    raw: Any,
    where: str,
    tensors: tuple[TensorRecord, ...],
    blobs: dict[str, BlobRecord],
    deferred: DeferredNumbers | None,
) -> MemberRecord:
    d = Doc(raw, where)
    name = check_member_name(d.text("name"), f"{where}: name")
    d.where = where = f"{where.rsplit(':', 1)[0]}: member {name!r}"
    metadata = d.obj("metadata", optional=True)
    numbers: MemberNumbers | DeferredNumbers
    if deferred is None:
        numbers = _parse_numbers(d, len(tensors))
    elif any(d.doc.get(key) is not None for key in ("errors", "fidelity")):
        # One place for them: two could disagree, and a reader could show either.
        raise FormatError(f"{where}: errors and fidelity belong in the members' numbers section (version 9)")
    else:
        numbers = deferred
    metrics = d.obj("metrics", optional=True)
    if metrics is not None:
        metrics = _metrics(metrics, f"{where}: metrics")
    configs = d.obj("configs", optional=True)
    if configs is not None:
        configs = str_map(configs, f"{where}: configs")
        for file_name in configs:
            check_config_name(file_name, f"{where}: configs")
    lora = _parse_lora_map(d.doc["lora"], where, tensors) if d.doc.get("lora") is not None else {}
    added = d.doc.get("added", False)
    if not isinstance(added, bool):
        raise FormatError(f"{where}: field 'added' must be true or false")
    member_dtypes = str_map(d.obj("dtypes"), f"{where}: dtypes")
    for dt in member_dtypes.values():
        dtypes.check_dtype(dt, f"{where}: dtypes")
    source_bytes = d.integer("source_bytes")
    if lora:
        _check_lora_ranks(lora, member_dtypes, source_bytes, where, tensors)
    return MemberRecord(
        name=name,
        source=d.text("source"),
        source_bytes=source_bytes,
        metadata=None if metadata is None else str_map(metadata, f"{where}: metadata"),
        coefficients=d.text("coefficients", optional=True),
        raw=str_map(d.obj("raw"), f"{where}: raw"),
        dtypes=member_dtypes,
        numbers=numbers,
        added=added,
        lossless_bytes=d.integer("lossless_bytes", optional=True),
        metrics=metrics,
        configs=configs,
        lora=lora,
        codes=d.text("codes", optional=True),
        exact=_parse_exact(d.doc["exact"], where) if d.doc.get("exact") is not None else None,
    )


def _parse_numbers(d: Doc, tensors: int) -> MemberNumbers:
    """A member's ``errors`` (required) and ``fidelity`` (optional), one number per tensor each,
    from the member's record or its entry in a numbers section."""
    errors = nonnegative_numbers(d.array("errors"))
    if errors is None or len(errors) != tensors:
        raise FormatError(f"{d.where}: errors must list one non-negative number per tensor ({tensors})")
    fidelity = None
    if d.obj("fidelity", optional=True) is not None:
        f = Doc(d.doc["fidelity"], f"{d.where}: fidelity")
        svd_errors = f.numbers("svd_errors", optional=True, count=tensors)
        fidelity = FidelityRecord(
            f.numbers("norms", count=tensors),
            f.numbers("delta_errors", count=tensors),
            f.numbers("mean_errors", count=tensors),
            svd_errors,
            f.numbers("svd_ranks", optional=svd_errors is None, count=tensors, ints=True),
        )
    return MemberNumbers(errors, fidelity)


def _parse_exact(value: Any, where: str) -> dict[str, ExactEntry]:
    """A member's lossless tier (spec §9.1): tensor name -> its sha256 and, optionally, residual.
    Which tensors and blobs the entries may name is checked with the other references."""
    if not isinstance(value, dict):
        raise FormatError(f"{where}: field 'exact' must be an object")
    out = {}
    for name, spec in value.items():
        e = Doc(spec, f"{where}: exact entry {name!r}")
        sha = e.text("sha256")
        if not _SHA256.fullmatch(sha):
            raise FormatError(f"{e.where}: sha256 must be 64 lowercase hex digits")
        blob = e.text("blob", optional=True)
        if blob is None:
            if any(e.doc.get(k) is not None for k in ("coding", "base")):
                raise FormatError(f"{e.where}: 'coding' and 'base' need a residual 'blob'")
            out[name] = ExactEntry(sha)
            continue
        coding = e.choice("coding", RESIDUAL_CODINGS)
        base = e.text("base", optional=True)
        if (base is None) != (coding == "bits"):
            raise FormatError(f"{e.where}: coding {coding!r} {'takes no' if coding == 'bits' else 'needs a'} 'base'")
        chunks = e.doc.get("chunk_sha256")
        if chunks is not None and not (
            isinstance(chunks, list) and chunks and all(isinstance(c, str) and _SHA256.fullmatch(c) for c in chunks)
        ):
            raise FormatError(f"{e.where}: chunk_sha256 must be a non-empty list of 64-hex-digit sha256s")
        out[name] = ExactEntry(sha, blob, coding, base, None if chunks is None else tuple(chunks))
    return out


def _metrics(value: dict[str, Any], where: str) -> dict[str, dict[str, float]]:
    """``{"original": {name: number}, "bundle": {...}}``: finite numbers under string keys."""
    out: dict[str, dict[str, float]] = {}
    for key, scores in value.items():
        if not isinstance(scores, dict) or not all(
            isinstance(k, str) and (is_int(v) or isinstance(v, float)) and math.isfinite(v) for k, v in scores.items()
        ):
            raise FormatError(f"{where}: {key!r} must map metric names to finite numbers")
        out[key] = {k: float(v) for k, v in scores.items()}
    return out
