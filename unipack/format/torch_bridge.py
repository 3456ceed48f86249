"""numpy arrays (as unipack holds them) to torch tensors, including bf16 and float8 bit patterns."""

from __future__ import annotations

import numpy as np
import torch

_VIEW_AS = {
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor owning a copy of ``array`` (held as ``dtypes.holder(dtype)``) with the right dtype."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    target = _VIEW_AS.get(dtype)
    return tensor.view(target) if target is not None else tensor
