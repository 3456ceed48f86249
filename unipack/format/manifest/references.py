"""References between records: every blob a record names exists with the shape and dtype it must
have, each blob is named once, and none is unaccounted for (spec §3.5, §4.4, §7.3).

What a record names comes from its params (``StorageParams.blob_refs``, ``member_blobs``), so
the rules here hold for every scheme without knowing any.
"""

from __future__ import annotations

import math

from unipack.errors import FormatError
from unipack.format import dtypes
from unipack.format.manifest.records import BlobRecord, BlobRef, Manifest, TensorRecord
from unipack.format.manifest.storages import STORAGE_FORMATS

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
    for mem in m.members:
        # One pass over the records per member gathers what the checks below need (the sizes of
        # its coefficient and codes blobs, the raw keys the records require): this loop runs
        # members x tensors times and is most of the time spent checking a manifest.
        total = code_bytes = 0
        required: dict[str, tuple[TensorRecord, tuple[int, ...] | None]] = {}
        for t in m.tensors:
            p = t.params
            block = p.coefficient_shape(t, mem)
            if block is not None:
                total += math.prod(block)
            codes = p.code_bytes(t, mem)
            if codes is not None:
                code_bytes += codes
            for key, shape in p.member_blobs(t, mem):
                required[key] = (t, shape)
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
    unused = set(m.blobs) - used
    if unused:
        raise FormatError(f"{where}: blobs {sorted(unused)[:5]} are not referenced by any record")
