"""A Hugging Face model folder as a source: its weight files, its index, its config files.

The layouts ``save_pretrained`` writes, in the order transformers looks for them:
``model.safetensors``; sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``; and the older ``pytorch_model.bin``, or sharded
``pytorch_model-0000i-of-0000n.bin`` with ``pytorch_model.bin.index.json``. Every shard's header
is read once; a tensor is read from its shard alone, so a sharded model is never loaded whole
(``.bin`` shards are memory-mapped, see ``torch_source``).

The index must agree with the shards exactly: every name it maps is in that shard, every tensor
of a shard is mapped to it, every file it names exists, and every shard on disk is listed.
A folder that disagrees with itself (a half-finished download, a stale shard left by an
earlier save) would otherwise merge silently wrong weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from unipack.errors import InputError
from unipack.format.safetensors_file import reject_duplicate_keys
from unipack.sources.base import TensorSource
from unipack.sources.files import exists, open_file, require_file
from unipack.sources.hf_configs import read_configs
from unipack.sources.safetensors_source import MAX_INPUT_HEADER_BYTES
from unipack.sources.url import InputPath
from unipack.sources.weights import open_weights_file

#: (single weight file, index file, shard file name pattern, how to open one file), in lookup order.
#: Each file is opened as what its content is (``weights``), whatever its layout calls it.
LAYOUTS: tuple[tuple[str, str, re.Pattern[str], Callable[[Path], TensorSource]], ...] = (
    (
        "model.safetensors",
        "model.safetensors.index.json",
        re.compile(r"model-(\d+)-of-(\d+)\.safetensors"),
        open_weights_file,
    ),
    (
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin"),
        open_weights_file,
    ),
)


class HFFolderSource:
    """A model folder: its weight files (shards) and, per tensor, the shard that holds it."""

    def __init__(self, path: InputPath, shards: list[TensorSource], configs: dict[str, str] | None) -> None:
        self._path, self._shards, self.configs = path, shards, configs
        # Shards in file order, each in its own data order: the state dict's order for HF saves.
        self._where = {name: shard for shard in shards for name in shard.tensors}
        self.tensors = {name: info for shard in shards for name, info in shard.tensors.items()}

    @property
    def path(self) -> InputPath:
        return self._path

    @property
    def shards(self) -> tuple[TensorSource, ...]:
        return tuple(self._shards)

    @property
    def file_size(self) -> int:
        return sum(s.file_size for s in self._shards)

    @property
    def metadata(self) -> dict[str, str] | None:
        return self._shards[0].metadata

    @property
    def files(self) -> tuple[tuple[InputPath, int], ...]:
        return tuple(f for s in self._shards for f in s.files)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def open_folder(folder: Path) -> HFFolderSource:
    """Find the folder's weights, check the index against the shards, and keep its configs."""
    configs = read_configs(folder)  # first: a bad config fails before any .bin is loaded
    for single, index, pattern, opener in LAYOUTS:
        # exists(), not is_file(): a FIFO or a broken link in a weight file's place is reported as
        # what it is (by the opener), not skipped as if the folder had no weights.
        if exists(folder / single):
            shards = [opener(folder / single)]
            break
        if exists(folder / index):
            shards = _open_shards(folder, index, pattern, opener)
            break
    else:
        names = ", ".join(n for layout in LAYOUTS for n in layout[:2])
        raise InputError(
            f"{folder}: a folder without model weights (looked for {names}); give a Hugging "
            f"Face model folder, or list the checkpoint files in it (e.g. {folder}/*.safetensors)"
        )
    return HFFolderSource(folder, shards, configs)


def _open_shards(
    folder: Path, index_name: str, pattern: re.Pattern[str], opener: Callable[[Path], TensorSource]
) -> list[TensorSource]:
    index = folder / index_name
    weight_map = read_weight_map(index)
    files = sorted(set(weight_map.values()))
    for name in files:
        if not exists(folder / name):
            raise InputError(
                f"{folder / name}: a shard that {index_name} names is missing; re-download or re-save the folder"
            )
    check_every_shard_listed(folder, index, set(files), pattern)
    return open_listed_shards(index, weight_map, files, lambda name: opener(folder / name))


def open_listed_shards(
    index: InputPath, weight_map: dict[str, str], names: Sequence[str], open_one: Callable[[str], TensorSource]
) -> list[TensorSource]:
    """The shards ``names`` (``open_one(name)`` each), checked against the index's weight map;
    none left open if any fails."""
    shards: list[TensorSource] = []
    try:
        for name in names:
            shards.append(open_one(name))
            # Checked as each shard opens: the index then bounds the work, since a shard holding
            # tensors it does not list is refused before the next shard is parsed (the rest of the
            # agreement is checked once all are open).
            check_shard_listed(index, weight_map, name, shards[-1])
        check_index_matches(index, weight_map, dict(zip(names, shards)))
    except BaseException:
        close_sources(shards)
        raise
    return shards


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file name), checked for shape and sense."""
    require_file(index, "index")
    fd = open_file(index, "index")
    try:
        with open(fd, "rb") as f:  # owns fd from here: closed on the way out
            data = f.read(MAX_INPUT_HEADER_BYTES + 1)  # never more than the limit, whatever stat says
    except OSError as exc:
        raise InputError(f"{index}: cannot read ({exc.strerror or exc})") from None
    return parse_weight_map(index, data)


def parse_weight_map(index: InputPath, data: bytes) -> dict[str, str]:
    """``read_weight_map`` of the index's first ``MAX_INPUT_HEADER_BYTES + 1`` bytes ``data``."""
    if len(data) > MAX_INPUT_HEADER_BYTES:
        raise InputError(
            f"{index}: over the {MAX_INPUT_HEADER_BYTES:,}-byte limit for an index; not a model index, or corrupt"
        )
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
        raise InputError(f"{index}: not a valid JSON index ({exc}); re-download or re-save the folder") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise InputError(
            f'{index}: has no "weight_map" object of tensor names to shard file names; '
            f"re-download or re-save the folder"
        )
    for tensor, file_name in weight_map.items():
        if "/" in file_name or "\\" in file_name or file_name.startswith(".") or not file_name:
            # A shard is a file beside the index: never follow a name out of the folder.
            raise InputError(
                f"{index}: tensor {tensor[:80]!r} maps to {file_name[:80]!r}, not a file name in the folder"
            )
    return weight_map


def check_every_shard_listed(
    folder: InputPath, index: InputPath, listed: set[str], pattern: re.Pattern[str], entries: list[str] | None = None
) -> None:
    """No shard on disk the index ignores, and every shard ``i`` of ``n`` named ``-of-n`` listed
    (``entries``: the folder's file names, where it is not a local folder)."""
    if entries is None:
        assert isinstance(folder, Path)
        entries = [p.name for p in sorted(folder.iterdir())]
    for name in entries:
        path = folder / name
        if pattern.fullmatch(name) and name not in listed:
            raise InputError(
                f"{path}: a shard that {index.name} does not list (left by another save?); remove "
                f"it or restore the matching index"
            )
    numbers: dict[int, set[int]] = {}
    for name in listed:
        match = pattern.fullmatch(name)
        if match:
            numbers.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    for total, present in sorted(numbers.items()):
        missing = sorted(set(range(1, total + 1)) - present)
        if missing:
            raise InputError(
                f"{index}: lists no tensor in shard {missing[0]} of {total}; the index and the "
                f"shards do not match: re-download or re-save the folder"
            )


def check_index_matches(index: InputPath, weight_map: dict[str, str], shards: dict[str, TensorSource]) -> None:
    """Every mapped tensor is in its shard, and every shard's tensors are mapped to it."""
    for tensor, file_name in weight_map.items():
        if tensor not in shards[file_name].tensors:
            raise InputError(
                f"{index}: maps tensor {tensor[:80]!r} to {file_name}, which does not hold it; "
                f"the index and the shards do not match: re-download or re-save the folder"
            )
    for file_name, shard in shards.items():
        check_shard_listed(index, weight_map, file_name, shard, unlisted_only=False)


def check_shard_listed(
    index: InputPath, weight_map: dict[str, str], file_name: str, shard: TensorSource, *, unlisted_only: bool = True
) -> None:
    """Every tensor of the shard ``file_name`` is mapped to it by the index (``unlisted_only``:
    is listed at all, the check made as each shard opens)."""
    for tensor in shard.tensors:
        mapped = weight_map.get(tensor)
        if mapped != file_name and (mapped is None or not unlisted_only):
            where = f"maps it to {mapped}" if mapped is not None else "does not list it"
            raise InputError(
                f"{shard.path}: holds tensor {tensor[:80]!r} but {index.name} {where}; the "
                f"index and the shards do not match: re-download or re-save the folder"
            )


def close_sources(sources: list[TensorSource]) -> None:
    for s in sources:
        try:
            s.close()
        except OSError:
            pass
