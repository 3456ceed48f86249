"""Rebuild one member's tensor from a shared record's mean, basis and coefficients."""

from __future__ import annotations

import numpy as np

from unipack.format.manifest import TensorRecord


def reconstruct(t: TensorRecord, mean: np.ndarray, basis: np.ndarray | None, coef: np.ndarray | None) -> np.ndarray:
    """float64 values of a shared tensor (the spec's reference arithmetic).

    ``mean`` has the tensor's shape; ``basis`` and ``coef`` have the shapes the record
    declares (``basis_shape()``, ``coef_shape()``) and are None at rank 0.
    """
    assert t.shape is not None
    values = np.asarray(mean, dtype=np.float64)
    if t.rank == 0 or basis is None or coef is None:
        return values.reshape(t.shape).copy()
    if t.scheme == "flat":
        return (values.reshape(-1) + coef @ basis).reshape(t.shape)  # (k,) @ (k, D)
    delta = coef @ basis.T if t.side == "right" else basis @ coef  # (m,k)@(k,n) or (m,k)@(k,n)
    return (values.reshape(t.matrix) + delta).reshape(t.shape)
