"""References between records: every blob a record names exists with the shape and dtype it must
have, each blob is named once, and none is unaccounted for (spec §3.5, §4.4, §7.3).

What a record names comes from its params (``StorageParams.blob_refs``, ``member_blobs``), so
the rules here hold for every scheme without knowing any.
"""

from __future__ import annotations

import math

from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest.records import (
    BASE_REF_FORMAT_VERSION,
    CHUNKED_CODEC,
    EXACT_TIER_FORMAT_VERSION,
    MAX_BASE_DEPTH,
    MEAN_BASE,
    RESIDUAL_DTYPES,
    BlobRecord,
    BlobRef,
    Manifest,
    MemberRecord,
    TensorRecord,
)
from unipack.format.manifest.storages import STORAGE_FORMATS

#: The member a ``per_member_blocks = False`` record's ``member_blobs`` is asked about: its answer
#: is the same for every member.
_NO_MEMBER = MemberRecord(name="", source="", source_bytes=0, metadata=None, coefficients=None)

#: The dtypes a coefficient blob may have: the merge's ``--dtype`` (spec §3.2).
COEF_DTYPES = tuple(dtypes.STORAGE_DTYPES.values())


def check_references(m: Manifest, where: str) -> None:
    used: set[str] = set()
    coef_dtype: str | None = None  # every basis and coefficient blob shares one dtype

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

    def ref(r: BlobRef, owner: str) -> None:
        nonlocal coef_dtype
        if r.absent is not None:
            if r.name is not None:
                raise FormatError(f"{where}: {owner}: {r.absent}")
            return
        expected = coef_dtype if r.dtype == "coef" else None if r.dtype == "float" else r.dtype
        b = blob(r.name, r.what, r.shape, expected)
        if r.dtype == "coef":
            coef_dtype = coef_dtype or b.dtype
        if r.dtype in ("coef", "float") and b.dtype not in dtypes.FLOAT_DTYPES:
            raise FormatError(f"{where}: {owner}: {r.what.removeprefix(owner).strip()} blob must be float")

    by_name = {t.name: t for t in m.tensors}
    _check_base(m, where)
    for t in m.tensors:
        what = f"tensor {t.name!r}"
        version = STORAGE_FORMATS[t.params.scheme_name].min_format_version
        if m.format_version < version:
            raise FormatError(
                f"{where}: {what}: {t.storage} modules need format version {version}, "
                f"the manifest says {m.format_version}"
            )
        for r in t.params.blob_refs(t):
            ref(r, what)
        for name, needed in t.params.sized_by_members(t, m.members).items():
            if m.blobs[name].shape != needed:
                raise FormatError(
                    f"{where}: {what}: blob {name!r} has shape {list(m.blobs[name].shape)}, "
                    f"the members need {list(needed)}"
                )
    # What the records need of a member that holds none of them raw, computed once: the sizes of
    # its coefficient and codes blobs and the raw keys they require. Records whose needs vary by
    # member otherwise (``per_member_blocks``: LoRA modules) are asked member by member below.
    base_total = base_codes = 0
    base_required: dict[str, tuple[TensorRecord, tuple[int, ...] | None]] = {}
    static: dict[str, tuple[int, int]] = {}  # tensor name -> (its coefficients, its code bytes)
    per_member = [t for t in m.tensors if t.params.per_member_blocks]
    for t in m.tensors:
        p = t.params
        if p.per_member_blocks:
            continue
        block, codes = p.coefficient_shape(t, None), p.code_bytes(t, None)
        static[t.name] = (0 if block is None else math.prod(block), codes or 0)
        base_total += static[t.name][0]
        base_codes += static[t.name][1]
        for key, shape in p.member_blobs(t, _NO_MEMBER):
            base_required[key] = (t, shape)
    for mem in m.members:
        total, code_bytes, required = base_total, base_codes, base_required
        for tname in mem.raw:
            if tname in static:  # held raw: none of its coefficients or codes
                total -= static[tname][0]
                code_bytes -= static[tname][1]
        if per_member:
            required = dict(base_required)
            for t in per_member:
                p = t.params
                block = p.coefficient_shape(t, mem)
                if block is not None:
                    total += math.prod(block)
                codes = p.code_bytes(t, mem)
                if codes is not None:
                    code_bytes += codes
                for key, shape in p.member_blobs(t, mem):
                    required[key] = (t, shape)
                version_needed = p.member_format_version(t, mem)
                if m.format_version < version_needed:
                    raise FormatError(
                        f"{where}: member {mem.name!r}: holds lora module {t.name!r} as its own factors "
                        f"(an override), which needs format version {version_needed}, the manifest says "
                        f"{m.format_version}"
                    )
        what = f"member {mem.name!r}"
        for tname, dt in mem.dtypes.items():
            known = by_name.get(tname)
            if known is None:
                raise FormatError(f"{where}: {what}: dtype given for unknown tensor {tname!r}")
            if known.params.scheme_name == "exact" and tname not in mem.raw:
                raise FormatError(f"{where}: {what}: overrides the dtype of exact tensor {tname!r}")
            if (known.dtype in dtypes.FLOAT_DTYPES) != (dt in dtypes.FLOAT_DTYPES):
                raise FormatError(f"{where}: {what}: tensor {tname!r} dtype {dt} differs in kind from {known.dtype}")
        if total:
            b = blob(mem.coefficients, f"{what} coefficients", (total,), coef_dtype)
            if b.dtype not in COEF_DTYPES:  # a bundle of delta tensors only has no basis to fix it
                raise FormatError(
                    f"{where}: {what}: coefficient blob has dtype {b.dtype}, expected one of {', '.join(COEF_DTYPES)}"
                )
        elif mem.coefficients is not None:
            raise FormatError(f"{where}: {what}: names a coefficient blob but no tensor has rank > 0")
        if code_bytes:
            blob(mem.codes, f"{what} codes", (code_bytes,), "U8")
        elif mem.codes is not None:
            raise FormatError(f"{where}: {what}: names a codes blob but holds no delta tensor's codes")
        # Keys each record requires of this member (``required``): its own name (a raw tensor),
        # or others (the factors of a LoRA module it touches).
        own_names = {key for key, (t, _) in required.items() if key == t.name}
        if not own_names <= set(mem.raw) or not set(mem.raw) <= (set(by_name) | set(required)):
            raise FormatError(
                f"{where}: {what}: raw blobs {sorted(mem.raw)[:5]} do not cover the raw tensors "
                f"{sorted(own_names)[:5]} (or name unknown tensors)"
            )
        for key, (t, shape) in required.items():
            if key in own_names:
                continue
            if key not in mem.raw:
                raise FormatError(
                    f"{where}: {what}: touches lora module {t.name!r} (stored as factors) but "
                    f"has no raw blob for {key!r}"
                )
            blob(mem.raw[key], f"{what} lora factor {key!r}", shape, mem.dtype_of(t))
        for tname, bname in mem.raw.items():
            if tname in required and tname not in own_names:
                continue
            t = by_name[tname]
            if not t.params.overridable and tname not in own_names:
                raise FormatError(
                    f"{where}: {what}: raw entry {tname!r} names a lora module; its factors are "
                    f"stored under their own keys"
                )
            # A raw tensor's shape may vary by member; an override keeps the tensor's shape.
            blob(bname, f"{what} raw tensor {tname!r}", t.shape, mem.dtype_of(t))
    members = {mem.name: mem for mem in m.members}
    for mem in m.members:
        if mem.exact is not None:
            for tname, bname, dtype in _exact_blobs(m, mem, by_name, members, where):
                blob(bname, f"member {mem.name!r} residual of {tname!r}", by_name[tname].shape, dtype)
    unused = set(m.blobs) - used
    if unused:
        raise FormatError(f"{where}: blobs {sorted(unused)[:5]} are not referenced by any record")


def _check_base(m: Manifest, where: str) -> None:
    """Records centred on the base model and the manifest's base table name each other exactly,
    at the record's dtype and shape (spec §11.3)."""
    centred = {t.name: t for t in m.tensors if t.params.base_centred(t)}
    listed = {} if m.base is None else m.base.tensors
    for name, t in centred.items():
        if m.format_version < BASE_REF_FORMAT_VERSION:
            raise FormatError(
                f"{where}: tensor {name!r} is centred on a base model, which needs format version "
                f"{BASE_REF_FORMAT_VERSION}, the manifest says {m.format_version}"
            )
        b = listed.get(name)
        if b is None:
            raise FormatError(
                f"{where}: tensor {name!r} is centred on the base model, which the manifest does not list"
            )
        if b.dtype != t.dtype or b.shape != t.shape:
            raise FormatError(
                f"{where}: tensor {name!r}: base tensor {b.name!r} is {b.dtype} {list(b.shape)}, "
                f"the record {t.dtype} {list(t.shape or ())}"
            )
    stray = sorted(set(listed) - set(centred))
    if stray:
        raise FormatError(f"{where}: manifest base lists {stray[:3]}, which no delta record is centred on")


def _exact_blobs(
    m: Manifest, mem: MemberRecord, by_name: dict[str, TensorRecord], members: dict[str, MemberRecord], where: str
) -> list[tuple[str, str, str]]:
    """Check a member's lossless tier (spec §9.3); returns ``(tensor, residual blob, blob dtype)``
    for each entry that has a residual."""
    what = f"{where}: member {mem.name!r}: exact"
    assert mem.exact is not None
    if m.format_version < EXACT_TIER_FORMAT_VERSION:
        raise FormatError(f"{what}: a lossless tier needs format version {EXACT_TIER_FORMAT_VERSION}")
    if set(mem.exact) != set(by_name):
        raise FormatError(f"{what}: must have one entry per tensor of the bundle ({len(by_name)})")
    out = []
    for tname, e in mem.exact.items():
        if e.blob is None:
            continue
        t, dtype = by_name[tname], mem.dtype_of(by_name[tname])
        if t.shape is None or dtype not in dtypes.FLOAT_DTYPES:
            raise FormatError(f"{what}: {tname!r}: a residual needs a float tensor of one shape")
        if e.base == MEAN_BASE:
            if t.mean is None and not t.params.base_centred(t):
                raise FormatError(f"{what}: {tname!r}: base 'mean', but the tensor has no stored mean or base center")
        elif e.base is not None:
            _check_member_base(mem, tname, t, members, what)
        # §9.1: chunk digests exactly for a chunked residual (their count is checked against its
        # index when it is read: the index is in the blob's bytes).
        rec = m.blobs.get(e.blob)
        if rec is not None and (e.chunks is not None) != (rec.codec == CHUNKED_CODEC):
            raise FormatError(f"{what}: {tname!r}: chunk_sha256 is given exactly for a {CHUNKED_CODEC} residual")
        out.append((tname, e.blob, RESIDUAL_DTYPES[dtypes.itemsize(dtype)]))
    return out


def _check_member_base(
    mem: MemberRecord, tname: str, t: TensorRecord, members: dict[str, MemberRecord], what: str
) -> None:
    """A chain of member bases: other members with a tier, at the same dtype, at most
    MAX_BASE_DEPTH long (which also rules out cycles)."""
    dtype, current, depth = mem.dtype_of(t), mem, 0
    while True:
        assert current.exact is not None
        base = current.exact[tname].base
        if base is None or base == MEAN_BASE:
            return
        depth += 1
        ref = members.get(base)
        if ref is None or ref is current or ref.exact is None or tname not in ref.exact:
            raise FormatError(f"{what}: {tname!r}: base {base!r} is not another member with a lossless tier")
        if ref.dtype_of(t) != dtype:
            raise FormatError(f"{what}: {tname!r}: base member {base!r} holds the tensor at another dtype")
        if depth > MAX_BASE_DEPTH:
            raise FormatError(
                f"{what}: {tname!r}: a chain of more than {MAX_BASE_DEPTH} member bases (or a cycle) from {mem.name!r}"
            )
        current = ref
