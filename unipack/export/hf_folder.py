"""``extract --format hf``: a member as a Hugging Face model folder that ``from_pretrained`` loads.

The folder holds the member's recorded config files, verbatim, and its weights as
``model.safetensors`` or, above ``max_shard_size``, as numbered shards plus
``model.safetensors.index.json`` (the layout ``save_pretrained`` writes). Shards are planned
from the manifest's dtypes and shapes before any tensor is read, then filled by iterating the
member's tensors once, so memory holds one tensor at a time, never the whole model. The folder
is built in a temp directory beside the target and renamed into place (``atomic_directory``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from unipack.bundle.reader import BundleReader
from unipack.errors import FormatError, OptionsError
from unipack.export.targets import check_folder_target
from unipack.format import dtypes
from unipack.format.atomic import atomic_directory, ensure_directory
from unipack.format.safetensors_file import encode_header

#: ``save_pretrained``'s default shard limit, in the same units (GB = 10^9 bytes).
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

Entry = tuple[str, str, tuple[int, ...], int]  # name, dtype, shape, nbytes (as encode_header takes)

#: Why a LoRA bundle has no plain Hugging Face folder, and the two ways it has.
LORA_HINT = (
    "{path}: holds LoRA adapters, not models; extract them with --format peft, or fold one into its "
    "base model with --base BASE_DIR (base=)"
)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([+-]?[0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class HFExport:
    """What ``Bundle.extract_hf`` wrote: ``files`` are names inside ``directory``, in writing order."""

    member: str
    directory: Path
    files: tuple[str, ...]
    sharded: bool
    has_config: bool
    base: Path | None = None  # the base model folder a LoRA adapter was folded into (``--base``)

    @property
    def note(self) -> str | None:
        """The one line to show a user when the folder cannot be loaded as it is, else None."""
        if self.has_config:
            return None
        return (
            f"no config.json recorded for member {self.member}: the folder has weights only "
            f"(merge the member's Hugging Face folder to keep its config)"
        )


def parse_size(value: str | int, what: str = "--max-shard-size") -> int:
    """Bytes from ``500MB``, ``5GB``, ``5GiB``, ``20KB`` or a plain byte count.

    Units follow Hugging Face's ``max_shard_size``: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB
    powers of 2 (case does not matter); fractions are allowed (``1.5GB``) and rounded down.
    """
    if isinstance(value, bool):
        raise OptionsError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        number = Decimal(value)
    else:
        m = _SIZE.fullmatch(str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise OptionsError(
                f"{what}: {str(value)[:40]!r} is not a size; give bytes or a number with "
                f"KB/MB/GB (powers of 10) or KiB/MiB/GiB (powers of 2), e.g. 5GB or 500MB"
            )
        try:
            number = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
        except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
            raise OptionsError(f"{what}: {str(value)[:40]!r} is not a size") from None
    if number < 1:
        raise OptionsError(f"{what}: must be at least 1 byte (got {str(value)[:40]!r})")
    return int(number)


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Greedy shards in tensor order: a tensor starts a new shard when it would overflow the
    current one; tensors are never split, so one larger than the limit gets a shard of its own."""
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not shards or (shards[-1] and size + entry[3] > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    return shards or [[]]


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``, as transformers names them."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_hf_folder(
    bundle: BundleReader,
    member: str,
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> HFExport:
    """Write ``member`` as a Hugging Face model folder at ``directory`` (see the module docstring)."""
    limit = parse_size(max_shard_size, "max_shard_size")
    rec = bundle.member(member)  # a clear error for an unknown member, before any file work
    if bundle.is_lora:
        raise OptionsError(LORA_HINT.format(path=bundle.path))
    target = Path(directory)
    check_folder_target(bundle, target, force=force)
    entries = bundle.tensor_entries(member)
    configs = {k: v for k, v in (rec.configs or {}).items() if k != INDEX_NAME}  # ours describes our shards
    arrays = ((t.name, dtype, array) for t, dtype, array in bundle.iter_arrays(member))
    written, sharded = write_weights_folder(
        target,
        configs=configs,
        entries=entries,
        arrays=arrays,
        metadata=rec.metadata,
        max_shard_size=limit,
        force=force,
    )
    return HFExport(member, target, written, sharded, "config.json" in configs)


def write_weights_folder(
    target: Path,
    *,
    configs: dict[str, str],
    entries: list[Entry],
    arrays: Iterator[tuple[str, str, np.ndarray]],
    metadata: dict[str, str] | None,
    max_shard_size: int,
    force: bool,
) -> tuple[tuple[str, ...], bool]:
    """The folder itself: ``configs`` verbatim, then the weights planned by ``entries`` (sharded
    above ``max_shard_size`` bytes, with an index) filled from ``arrays`` (``(name, dtype, array)``
    in ``entries`` order, one at a time), built beside ``target`` and renamed into place.
    Returns the names written, in writing order, and whether the weights are sharded."""
    shards = plan_shards(entries, max_shard_size)
    names = shard_names(len(shards))
    # transformers refuses safetensors weights whose metadata lacks format=pt, and these are torch tensors.
    metadata = {**(metadata or {}), "format": "pt"}
    written: list[str] = []
    with atomic_directory(target, force=force) as tmp:
        for name, text in configs.items():
            (tmp / name).write_bytes(text.encode("utf-8"))
            written.append(name)
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, metadata, arrays)
            written.append(name)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(e[3] for e in entries)},
                "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(INDEX_NAME)
    return tuple(written), len(shards) > 1


def write_hf_folders(
    bundle: BundleReader,
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
) -> list[HFExport]:
    """Every member into ``directory/<member>/`` (member names are validated inert).

    Every target is checked before the first is written, so a refused one does not leave the
    run half done.
    """
    out_dir = Path(directory)
    limit = parse_size(max_shard_size, "max_shard_size")
    if bundle.is_lora:
        raise OptionsError(LORA_HINT.format(path=bundle.path))
    ensure_directory(out_dir)
    for name in bundle.members:
        check_folder_target(bundle, out_dir / name, force=force)
    return [write_hf_folder(bundle, name, out_dir / name, max_shard_size=limit, force=force) for name in bundle.members]


def _write_shard(
    path: Path, shard: list[Entry], metadata: dict[str, str], arrays: Iterator[tuple[str, str, np.ndarray]]
) -> None:
    """One shard: its header from the plan, then its tensors' bytes as they are yielded."""
    with open(path, "xb") as f:
        f.write(encode_header(shard, metadata))
        for name, dtype, _, nbytes in shard:
            got_name, got_dtype, array = next(arrays)
            data = dtypes.to_bytes(array, got_dtype)
            if got_name != name or got_dtype != dtype or len(data) != nbytes:
                raise FormatError(
                    f"{path.name}: tensor {name!r} does not match its planned "
                    f"{dtype} {nbytes}-byte entry (corrupt bundle, or a file changed while it was read?)"
                )
            f.write(data)
