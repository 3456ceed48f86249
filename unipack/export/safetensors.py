"""``extract``: a member as one ``.safetensors`` file, its original ``__metadata__`` kept.

The header is planned from the manifest alone (``BundleReader.tensor_entries``), then the
member's tensors are written as the reader rebuilds them, one at a time: memory holds one
tensor, never the whole member. Written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import os
from pathlib import Path

from unipack.bundle.reader import BundleReader
from unipack.format import dtypes
from unipack.format.atomic import atomic_write, check_writable, ensure_directory
from unipack.format.safetensors_file import encode_header


def write_safetensors(
    bundle: BundleReader, member: str, path: str | os.PathLike[str], *, force: bool = False, exact: bool = False
) -> Path:
    """Write ``member`` as a .safetensors file at ``path``; returns the path. ``exact``: bit for bit
    from the lossless tier (the same bytes as the original's tensors).

    ``path`` must not be the bundle itself (under any spelling): with ``force`` that would put
    one member where the whole bundle was.
    """
    rec = bundle.member(member)
    out = Path(path)
    header = encode_header(bundle.tensor_entries(member), rec.metadata)
    with atomic_write(out, force=force, inputs=[bundle.path]) as f:
        f.write(header)
        for _, dtype, array in bundle.iter_arrays(member, exact=exact):
            f.write(dtypes.byte_view(array, dtype))  # no copy of a contiguous tensor
    return out


def write_safetensors_all(
    bundle: BundleReader, directory: str | os.PathLike[str], *, force: bool = False, exact: bool = False
) -> list[Path]:
    """Every member into ``directory/<member>.safetensors`` (member names are validated inert).

    Every target is checked before the first is written: a refusal (an existing file without
    ``force``, the bundle itself) must not leave some members written and others not.
    """
    out_dir = Path(directory)
    ensure_directory(out_dir)
    targets = [(name, out_dir / f"{name}.safetensors") for name in bundle.members]
    for _, target in targets:
        check_writable(target, force=force, inputs=[bundle.path])
    return [write_safetensors(bundle, name, target, force=force, exact=exact) for name, target in targets]
