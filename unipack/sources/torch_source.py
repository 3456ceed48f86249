"""A PyTorch ``.bin``/``.pt`` state dict as a source.

Such files are pickles, and unpickling can run arbitrary code: they are opened ONLY with
``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors and plain
containers and refuses everything else before building it (a hostile file is an InputError,
and its payload never runs). The result must be a flat ``dict[str, Tensor]``: a model object or
a training checkpoint with optimizer state is refused with a message saying what to save instead.

Memory: a state dict cannot be read one tensor at a time like safetensors. Files in torch's zip
format (the default since PyTorch 1.6) are memory-mapped (``mmap=True``), so only the pages of
tensors being read are resident; legacy (pre-zip) files are loaded whole into memory, for as long
as the source is open.

A pickle says how big each tensor is; the bytes it really holds may be far fewer. A tensor whose
strides overlap (``torch.zeros(1).expand(2**40)`` saves 4 bytes) would be materialised at its
claimed size by the first copy, so every tensor is checked before anything is copied: no
overlapping elements, its bytes within its storage, and all tensors together within a few times
the storage bytes present (tied weights share storage; thousands of names on one storage are an
amplification, not a model). A legacy (pre-zip) file's declared storage sizes are read from its
pickle without unpickling it (``torch_legacy``) before ``torch.load`` allocates them (it does as
it reads the pickle, before it reads any data).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unipack.errors import FormatError, InputError, first_line
from unipack.sources.base import TensorInfo, check_tensor_key
from unipack.sources.files import require_file
from unipack.sources.torch_legacy import STATE_DICT_PICKLE, PickleWalkError, declared_storage_elements

if TYPE_CHECKING:
    import torch

#: File suffixes read as PyTorch pickles (everything else that is a file is read as safetensors).
TORCH_SUFFIXES = (".bin", ".pt", ".pth")

#: torch dtype name -> safetensors dtype name; the dtypes unipack can store.
_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
#: dtypes numpy cannot hold: their bits are viewed as the unsigned integer of the same width
#: (what ``format.dtypes.holder`` uses for them).
_BIT_VIEWS = {"BF16": "uint16", "F8_E4M3": "uint8", "F8_E5M2": "uint8"}

EXPECTED = "a flat dict of tensor names to tensors (save model.state_dict() with torch.save, or save as .safetensors)"

#: The most the tensors of one file may add up to, as a multiple of the storage bytes it holds
#: (tied weights repeat a tensor under a few names; see the module docstring).
MAX_SHARING = 8


class TorchSource:
    """The tensors of one ``torch.save``-d state dict, loaded (memory-mapped where possible)."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], file_size: int) -> None:
        self._path, self._state, self.file_size = path, state, file_size
        self.tensors = {
            name: TensorInfo(_DTYPE_NAMES[str(t.dtype).removeprefix("torch.")], tuple(t.shape))
            for name, t in state.items()
        }

    @classmethod
    def open(cls, path: Path) -> TorchSource:
        require_file(path, "checkpoint")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return cls(path, load_state_dict(path), size)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def metadata(self) -> dict[str, str] | None:
        return None

    @property
    def configs(self) -> dict[str, str] | None:
        return None

    @property
    def files(self) -> tuple[tuple[Path, int], ...]:
        return ((self._path, self.file_size),)

    def read(self, name: str) -> np.ndarray:
        import torch

        # A strided view (a transpose, a slice) is copied here, one tensor at a time, not at
        # load: its size was checked against the bytes its storage holds (``_plain``).
        tensor = self._state[name].contiguous()
        view = _BIT_VIEWS.get(self.tensors[name].dtype)
        if view is not None:
            tensor = tensor.view(getattr(torch, view))
        array = tensor.numpy()
        array.flags.writeable = False  # it may share the file's memory map; callers only read
        return array

    def close(self) -> None:
        self._state = {}  # drops the tensors, and with them the memory map


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, checked to be a flat dict of dense CPU tensors whose
    bytes the file holds (strided views stay views until ``TorchSource.read``)."""
    import torch

    try:
        zipped = zipfile.is_zipfile(path)  # mmap needs torch's zip format; legacy files load whole
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not zipped:
        _check_legacy_storages(path, size)
    loaded = _torch_load(path, mmap=zipped)
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: holds {_kind(loaded)}, not a state dict; expected {EXPECTED}")
    state: dict[str, torch.Tensor] = {}
    storages: dict[int, int] = {}  # bytes of each distinct storage (views share one)
    total = 0
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise InputError(f"{path}: has {_kind(name)} key {str(name)[:40]!r}; expected {EXPECTED}")
        if not isinstance(value, torch.Tensor):
            nested = " (a nested state dict? save that dict itself)" if isinstance(value, dict) else ""
            raise InputError(
                f"{path}: entry {name[:80]!r} is {_kind(value)}, not a tensor{nested}; expected {EXPECTED}"
            )
        state[check_tensor_key(name, path)] = _plain(value, name, path)
        storage = value.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # _cdata: one per storage, shared by its views
        total += value.numel() * value.element_size()
        held = sum(storages.values())
        if total > MAX_SHARING * held + 1024 * 1024:
            raise InputError(
                f"{path}: its tensors add up to {total:,} bytes from {held:,} bytes of storage (more "
                f"than {MAX_SHARING} names per tensor's bytes); save each tensor once"
            )
    return state


def _torch_load(path: Path, *, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``, its failures as unipack errors naming the file."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the checks decide
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises, the file is the problem
        if type(exc).__name__ == "UnpicklingError" or "Weights only load failed" in str(exc):
            raise InputError(
                f"{path}: not a plain state dict loadable with torch.load(weights_only=True) "
                f"(refusing to unpickle arbitrary objects): {_refusal(exc)}; expected "
                f"{EXPECTED}"
            ) from None
        raise FormatError(
            f"{path}: cannot load as a PyTorch checkpoint ({first_line(exc, with_type=True)}); the file "
            f"may be truncated or not a torch.save file"
        ) from None


def _check_legacy_storages(path: Path, size: int) -> None:
    """Refuse a legacy (pre-zip) file declaring more storage than it holds, before ``torch.load``
    allocates it (see ``torch_legacy``): every element takes at least a byte after the pickles."""
    try:
        with open(path, "rb") as f:
            elements, end = declared_storage_elements(f)
    except PickleWalkError as exc:
        if exc.index < STATE_DICT_PICKLE:
            return  # not a torch file at all: torch.load refuses it before allocating anything
        raise FormatError(
            f"{path}: cannot load as a PyTorch checkpoint ({exc}); the file may be truncated or not a torch.save file"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if elements > size - end:
        raise FormatError(
            f"{path}: declares {elements:,} storage elements but holds {max(size - end, 0):,} bytes after "
            f"its pickles; the file is truncated or corrupt: re-save it"
        )


def _plain(tensor: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """A dense CPU tensor of a dtype unipack stores, whose elements are distinct and in its storage
    (tied tensors stay separate names)."""
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise InputError(
            f"{path}: tensor {name[:80]!r} is {'quantized' if tensor.is_quantized else 'sparse'}; "
            f"only dense tensors can be merged (convert it with .to_dense() / .dequantize())"
        )
    if tensor.device.type != "cpu":  # map_location="cpu" moves real devices; "meta" tensors hold no data
        raise InputError(
            f"{path}: tensor {name[:80]!r} is on device {tensor.device.type!r} and holds no "
            f"values to merge; save the real weights"
        )
    if dtype not in _DTYPE_NAMES:
        raise InputError(
            f"{path}: tensor {name[:80]!r} has dtype {dtype}, which unipack cannot store "
            f"(supported: {', '.join(sorted(_DTYPE_NAMES))})"
        )
    if _may_overlap(tuple(tensor.shape), tuple(tensor.stride())):
        raise InputError(
            f"{path}: tensor {name[:80]!r} of shape {list(tensor.shape)} has overlapping strides "
            f"{list(tensor.stride())} (an expand()ed or as_strided view, e.g. stride 0): its "
            f"{tensor.numel():,} elements are not in the file; save tensor.clone() instead"
        )
    claimed = tensor.numel() * tensor.element_size()
    present = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if claimed > present:
        raise InputError(
            f"{path}: tensor {name[:80]!r} claims {claimed:,} bytes but its storage holds {max(present, 0):,}; "
            f"the file is corrupt: re-save it"
        )
    return tensor.detach()


def _may_overlap(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether two elements of a strided view may share memory (conservatively: views that
    torch's own slicing, transposing and permuting make always pass).

    Taking the dimensions by increasing stride, each stride must exceed the furthest offset the
    smaller ones reach; an empty tensor has no elements to overlap.
    """
    if 0 in shape:
        return False
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _refusal(exc: BaseException) -> str:
    """The one line of torch's long weights_only message that names what was refused."""
    text = str(exc)
    for pattern in (
        r"Unsupported global: GLOBAL [\w.]+",
        r"unsupported GLOBAL [\w.]+",
        r"Unsupported operand \d+",
        r"WeightsUnpickler error: [^\n]+",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(0).rstrip(". ")
    return first_line(exc, with_type=True)


def _kind(value: Any) -> str:
    """``"an int"``, ``"a Linear"``: the value's type, for a message."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
