"""Encode one LoRA module at chosen ranks, and rebuild an adapter's PEFT factors from a bundle.

Storage rounds the bases U, V and the cores to the coefficient dtype; extraction turns a core
back into factors B', A' of the adapter's own rank r, with its own PEFT scale s folded in, and
rounds them to the adapter's dtype. The error recorded for a member is the error of exactly
those factors (what a user gets from ``extract --format peft``), measured from r x r Grams like
everything else here: no out x in matrix is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from unipack.core.linalg import least_squares_projector
from unipack.core.lora import LoraFactors, LoraModel, reconstruct_factors
from unipack.format import dtypes


@dataclass
class EncodedLora:
    """A module stored at (k_out, k_in): bases and cores held in the coefficient dtype."""

    ranks: tuple[int, int]
    left: np.ndarray | None  # U, out x k_out, held as holder(coef dtype); None at k_out = 0
    right: np.ndarray | None  # V, in x k_in; None at k_in = 0
    cores: list[np.ndarray | None]  # per adapter, k_out x k_in held as holder(coef dtype); None if untouched
    errors: list[float]  # per adapter: relative error of its extracted factors (0 if untouched)


def encode(
    model: LoraModel,
    adapters: list[LoraFactors | None],
    k_out: int,
    k_in: int,
    coef_dtype: str,
    member_dtypes: list[str | None],
) -> EncodedLora:
    """Round U_k, V_k to ``coef_dtype``, fit each core to the rounded bases, round it, and
    measure each adapter's extracted factors (rounded to its own dtype) against the original."""
    u_held, u = dtypes.store_as(model.u[:, :k_out], coef_dtype)
    v_held, v = dtypes.store_as(model.v[:, :k_in], coef_dtype)
    # A rounded (F16/BF16) basis is not exactly orthonormal: least-squares projectors keep the
    # cores optimal for the bases actually stored (for F32 this is Uᵀ and V to rounding).
    left_proj = least_squares_projector(u)  # out x k_out: coordinates = Pᵀ x
    right_proj = least_squares_projector(v)
    cores: list[np.ndarray | None] = []
    errors: list[float] = []
    for f, dtype in zip(adapters, member_dtypes):
        if f is None:
            cores.append(None)
            errors.append(0.0)
            continue
        assert dtype is not None
        core = f.scale * ((left_proj.T @ f.b) @ (f.a @ right_proj))
        core_held, core_values = dtypes.store_as(core, coef_dtype)
        cores.append(core_held)
        b2, a2 = peft_factors(u, core_values, v, f.rank, f.scale, dtype)
        errors.append(product_error(f, LoraFactors(a2, b2, f.scale)))
    return EncodedLora((k_out, k_in), u_held if k_out else None, v_held if k_in else None, cores, errors)


def peft_factors(
    u: np.ndarray, core: np.ndarray, v: np.ndarray, rank: int, scale: float, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') as float64 values already rounded to ``dtype``, with s · B' A' ≈ U core Vᵀ.

    B', A' have exactly the adapter's rank r (zero columns / rows pad an update of lower rank),
    so the adapter's own adapter_config.json (r, lora_alpha, rank_pattern, alpha_pattern,
    use_rslora) applies unchanged. Its scale s is folded in as 1/s, split evenly between the two
    factors (the sign on B'); an adapter with s = 0 has a zero update and gets zero factors.
    """
    out_dim, in_dim = u.shape[0], v.shape[0]
    b = np.zeros((out_dim, rank))
    a = np.zeros((rank, in_dim))
    if scale != 0.0 and core.size:
        b1, a1, _ = reconstruct_factors(u, core, v, rank)
        root = math.sqrt(1.0 / abs(scale))
        kept = b1.shape[1]
        b[:, :kept] = b1 * (root if scale > 0 else -root)
        a[:kept] = a1 * root
    return dtypes.to_float(dtypes.from_float(b, dtype), dtype), dtypes.to_float(dtypes.from_float(a, dtype), dtype)


def product_error(original: LoraFactors, approx: LoraFactors) -> float:
    """||ΔW - ΔŴ||_F / ||ΔW||_F (absolute if ΔW = 0) for two factored updates.

    ΔW - ΔŴ = G H with G = [s B, -ŝ B̂] (out x 2r) and H = [A; Â] (2r x in). With the thin QRs
    G = Q_g R_g and Hᵀ = Q_h R_h, ||G H|| = ||R_g R_hᵀ|| (2r x 2r): the difference is formed
    entry by entry, so a tiny error is as accurate as a large one (a Gram-trace formula would
    subtract ||ΔW||² from nearly itself and lose everything below ~1e-8).
    """
    g = np.concatenate([original.scale * original.b, -approx.scale * approx.b], axis=1)
    h = np.concatenate([original.a, approx.a], axis=0)
    core = np.asarray(np.linalg.qr(g, mode="r")) @ np.asarray(np.linalg.qr(h.T, mode="r")).T
    diff = float(np.linalg.norm(core))
    norm = original.norm
    return diff / norm if norm > 0.0 else diff


def stored_bytes(model: LoraModel, k_out: int, k_in: int, coef_dtype: str) -> int:
    """Bytes (before lossless compression) of a module stored at (k_out, k_in)."""
    return model.stored_values(k_out, k_in) * dtypes.itemsize(coef_dtype)


def factor_bytes(adapters: list[LoraFactors | None], member_dtypes: list[str | None]) -> int:
    """Bytes of the adapters' own factors (the ``factors`` form, and the inputs' LoRA part)."""
    return sum(
        f.rank * (f.out_dim + f.in_dim) * dtypes.itemsize(d)
        for f, d in zip(adapters, member_dtypes)
        if f is not None and d is not None
    )
