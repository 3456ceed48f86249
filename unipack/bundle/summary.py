"""What a bundle costs and how faithful it is: the numbers ``unipack info`` prints.

Bytes are taken from the file's own header, so the parts add up exactly to the file size, and
they are split as ``unipack report`` splits them (header, manifest, padding, then blobs by role).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from unipack.errors import FormatError
from unipack.format.manifest import MANIFEST_BLOB, NUMBERS_BLOB, Manifest
from unipack.format.safetensors_file import SafetensorsHeader
from unipack.schemes import scheme_of

#: Byte parts of a bundle file, in file order, the same as ``unipack report``'s. ``factors``: LoRA
#: modules kept as the adapters' own factors (``form: factors``), apart from ``raw`` so that a LoRA
#: bundle's bytes for updates are bases + coefficients + factors. ``residuals``: the lossless
#: tier (spec §9); the lossy tier is everything else.
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


@dataclass(frozen=True)
class MemberSummary:
    name: str
    source: str
    source_bytes: int
    own_bytes: int  # this member's coefficients and raw tensors
    worst_error: float
    worst_tensor: str | None


@dataclass(frozen=True)
class BundleSummary:
    path: str
    format_version: int
    created_by: str
    file_bytes: int
    input_bytes: int
    parts: dict[str, int]
    storage_counts: dict[str, int]  # "shared/rows", "shared/flat", "raw", "exact"
    rank_min: int | None
    rank_median: float | None
    rank_max: int | None
    members: list[MemberSummary]
    options: dict[str, Any]
    #: The base model referenced, not stored (``merge --base``, spec §11): ``source``, ``sha256``,
    #: ``tensors``, ``bytes`` (what ``ratio`` leaves out); None for a bundle that holds everything.
    base: dict[str, Any] | None = None

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.file_bytes if self.file_bytes else 0.0

    @property
    def worst_error(self) -> float:
        return max((m.worst_error for m in self.members), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["worst_error"] = self.worst_error
        return d


def blob_parts(manifest: Manifest) -> dict[str, str]:
    """Each blob's part, from the records that reference it (blob names are not normative)."""
    roles: dict[str, str] = {}
    for m in manifest.members:
        if m.coefficients is not None:
            roles[m.coefficients] = "coefficients"
        if m.codes is not None:
            roles[m.codes] = "deltas"
        for e in (m.exact or {}).values():
            if e.blob is not None:  # the lossless tier (spec §9): what `extract --exact` adds
                roles[e.blob] = "residuals"
    for t in manifest.tensors:
        roles.update(scheme_of(t).blob_parts(t, manifest))
    return roles


def header_parts(header: SafetensorsHeader, header_bytes: bytes) -> dict[str, int]:
    """The bytes that are not blobs, in three parts: ``manifest`` (the manifest as a JSON string
    inside the header, or the compressed manifest tensor of format version 4 and, from version 9,
    the members' numbers tensor beside it), ``padding`` (the
    spaces that align the data section) and ``header`` (the rest: the length prefix, the blob
    entries and the other metadata)."""
    body = header_bytes[8:]
    padding = len(body) - len(body.rstrip(b" "))
    compressed = header.tensors.get(MANIFEST_BLOB)
    if compressed is not None:
        numbers = header.tensors.get(NUMBERS_BLOB)  # the members' numbers: part of the manifest
        nbytes = compressed.nbytes + (numbers.nbytes if numbers is not None else 0)
        return {"header": header.data_start - padding, "manifest": nbytes, "padding": padding}
    manifest = 0
    text = (header.metadata or {}).get("manifest", "")
    for ascii_only in (False, True):  # as unipack writes it, or as another writer may escape it
        encoded = json.dumps(text, ensure_ascii=ascii_only).encode("utf-8")
        if encoded in body:
            manifest = len(encoded)
            break
    return {"header": header.data_start - manifest - padding, "manifest": manifest, "padding": padding}


def read_header_bytes(header: SafetensorsHeader) -> bytes:
    """The header as stored in the file (``info`` splits it into parts)."""
    try:
        with open(header.path, "rb") as f:
            data = f.read(header.data_start)
    except OSError as exc:
        raise FormatError(f"{header.path}: cannot read its header ({exc.strerror or exc})") from None
    if len(data) != header.data_start:
        raise FormatError(f"{header.path}: changed while it was read (its header is shorter now); open it again")
    return data


def summarize(manifest: Manifest, header: SafetensorsHeader, header_bytes: bytes | None = None) -> BundleSummary:
    """``header_bytes``: the header as stored, when the caller has it (else read from the file)."""
    parts = dict.fromkeys(PARTS, 0)
    parts.update(header_parts(header, header_bytes if header_bytes is not None else read_header_bytes(header)))
    stored = {name: e.nbytes for name, e in header.tensors.items()}
    for name, part in blob_parts(manifest).items():
        parts[part] += stored[name]
    counts: dict[str, int] = {}
    ranks = []
    for t in manifest.tensors:
        scheme = scheme_of(t)
        counts[scheme.label] = counts.get(scheme.label, 0) + 1
        rank = scheme.rank(t)
        if rank is not None:
            ranks.append(rank)
    members = []
    for m in manifest.members:
        own = (
            sum(stored[b] for b in m.raw.values())
            + (stored[m.coefficients] if m.coefficients is not None else 0)
            + (stored[m.codes] if m.codes is not None else 0)
        )
        worst = max(range(len(m.errors)), key=m.errors.__getitem__, default=None)
        members.append(
            MemberSummary(
                m.name,
                m.source,
                m.source_bytes,
                own,
                m.errors[worst] if worst is not None else 0.0,
                manifest.tensors[worst].name if worst is not None and m.errors[worst] > 0 else None,
            )
        )
    return BundleSummary(
        path=str(header.path),
        format_version=manifest.format_version,
        created_by=manifest.created_by,
        file_bytes=header.file_size,
        input_bytes=int(manifest.stats.get("input_bytes", 0)),
        parts=parts,
        storage_counts=counts,
        rank_min=min(ranks) if ranks else None,
        rank_median=statistics.median(ranks) if ranks else None,
        rank_max=max(ranks) if ranks else None,
        members=members,
        options=manifest.options,
        base=None
        if manifest.base is None
        else {
            "source": manifest.base.source,
            "sha256": manifest.base.sha256,
            "tensors": len(manifest.base.tensors),
            "bytes": manifest.base.nbytes,
        },
    )
