"""Triton kernel for :func:`surgery.kernels.reference.centred_gaussian_gram`, in float64.

This module imports triton at top level: import it only when triton is available (the
dispatcher in :mod:`surgery.kernels.centred_gaussian_gram` does this lazily). Use the
dispatcher :func:`surgery.kernels.centred_gaussian_gram`, which validates its inputs, rather
than calling the launchers here directly.

Each program takes a tile of ``BLOCK_I`` rows of one batch item's ``d x d`` matrix and makes
two passes over the columns: the first sums ``expm1(-(v_i - v_j)² / (2σ²))`` into the row
sums, the second recomputes the same values and writes them minus the row means. Recomputing
costs a second evaluation of the exponential but reads and writes the ``d²`` output once;
storing it and correcting it in place would move it three times.

Triton has no ``expm1`` that runs everywhere: ``libdevice.expm1`` exists on GPUs but not in the
interpreter the tests use. :func:`_expm1_f64` computes it from ``exp``, which in float64
lowers to libdevice's correctly rounded-to-1-ulp ``__nv_exp`` on NVIDIA GPUs (the fast
``ex2.approx`` path is float32 only) and to numpy's in the interpreter; it is accurate to a few
float64 ulps (the tests check 1e-15 relative against ``torch.expm1``).

Float literals in Triton code are float32 constants; every constant that must be float64
(``-1 / (2σ²)``, the series coefficients) is either loaded from a float64 tensor or computed in
float64 from integers that float32 holds exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import TRITON_V_DTYPES
from .triton_common import check_launch

__all__ = ["centred_gaussian_gram_triton", "expm1_triton"]

# Rows per program and columns per loop step. The accumulator is BLOCK_I x BLOCK_J float64.
_BLOCK_I = 32
_BLOCK_J = 64
# Below this |x|, expm1 is the Taylor series; above, exp(x) - 1 loses at most ~4 ulp
# (exp(x) / |exp(x) - 1| <= 3.9 there, and exp(x) - 1 is exact for x in [-ln 2, 0]).
_SERIES_BOUND = tl.constexpr(0.3)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _expm1_f64(x):
    # expm1 in float64. |x| < _SERIES_BOUND: Taylor series to x^12 / 12! (the next term is below 1e-16
    # relative), by Horner; otherwise exp(x) - 1. Both branches are evaluated (no divergence);
    # the series sees 0 where it is not used, so it never overflows.
    one = tl.cast(1.0, tl.float64)
    small = tl.abs(x) < _SERIES_BOUND
    t = tl.where(small, x, 0.0)
    # Coefficients 1/k! in float64: k! <= 12! is exact in float32, the division is float64.
    p = one / 479001600.0
    p = p * t + one / 39916800.0
    p = p * t + one / 3628800.0
    p = p * t + one / 362880.0
    p = p * t + one / 40320.0
    p = p * t + one / 5040.0
    p = p * t + one / 720.0
    p = p * t + one / 120.0
    p = p * t + one / 24.0
    p = p * t + one / 6.0
    p = p * t + one / 2.0
    p = p * t + one
    return tl.where(small, t * p, tl.exp(x) - one)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _expm1_elementwise_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Only for the accuracy test of _expm1_f64 (one float64 value per element).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0)
    tl.store(out_ptr + offsets, _expm1_f64(x), mask=in_range)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _centred_gaussian_gram_kernel(
    v_ptr,
    scale_ptr,
    out_ptr,
    d,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # Grid: (batch item, tile of BLOCK_I rows). v is [items, d] contiguous, out [items, d, d].
    item = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < d
    v_item = v_ptr + item * d
    scale = tl.load(scale_ptr)  # -1 / (2σ²), float64 (a float argument would be float32)
    v_i = tl.load(v_item + rows, mask=row_ok, other=0.0).to(tl.float64)
    sums = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float64)
    for start in range(0, d, BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        col_ok = cols < d
        v_j = tl.load(v_item + cols, mask=col_ok, other=0.0).to(tl.float64)
        diff = v_i[:, None] - v_j[None, :]
        # (diff * diff) * scale, the reference's order: the same float64 argument to expm1
        k1 = _expm1_f64(diff * diff * scale)
        sums += tl.where(col_ok[None, :], k1, 0.0)
    mean = tl.sum(sums, axis=1) / d
    out_rows = out_ptr + item * d * d + rows.to(tl.int64)[:, None] * d
    for start in range(0, d, BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        col_ok = cols < d
        v_j = tl.load(v_item + cols, mask=col_ok, other=0.0).to(tl.float64)
        diff = v_i[:, None] - v_j[None, :]
        k1 = _expm1_f64(diff * diff * scale)
        tl.store(out_rows + cols[None, :], k1 - mean[:, None], mask=row_ok[:, None] & col_ok[None, :])






def centred_gaussian_gram_triton(v: Tensor, sigma: float) -> Tensor:
    """Triton version of :func:`surgery.kernels.reference.centred_gaussian_gram`.

    Inputs are assumed to be checked already (a floating ``v`` with at least one dimension, a
    positive finite ``sigma``); the dispatcher :func:`surgery.kernels.centred_gaussian_gram`
    does that. ``v`` is copied to a contiguous ``[items, d]`` view first when it is not one.

    Args:
        v: ``[..., d]``, float16, bfloat16, float32 or float64.
        sigma: The kernel bandwidth σ.

    Returns:
        A new contiguous float64 tensor ``[..., d, d]``.

    Example:
        >>> import torch
        >>> v = torch.tensor([0.0, 0.0, 3.0], device="cuda")  # doctest: +SKIP
        >>> centred_gaussian_gram_triton(v, 1.0)[0]  # doctest: +SKIP
        tensor([ 0.3296,  0.3296, -0.6593], device='cuda:0', dtype=torch.float64)
    """
    check_launch("centred_gaussian_gram", "v", v, TRITON_V_DTYPES)
    d = v.shape[-1]
    if v.numel() == 0:
        return torch.empty(*v.shape, d, dtype=torch.float64, device=v.device)
    flat = v.reshape(-1, d).contiguous()
    out = torch.empty(flat.shape[0], d, d, dtype=torch.float64, device=v.device)
    # Computed in float64 on the host as the reference does (-0.5 / sigma**2), passed as a tensor.
    scale = torch.tensor([-0.5 / sigma**2], dtype=torch.float64, device=v.device)
    grid = (flat.shape[0], triton.cdiv(d, _BLOCK_I))
    with torch.cuda.device(v.device) if v.is_cuda else nullcontext():
        _centred_gaussian_gram_kernel[grid](flat, scale, out, d, BLOCK_I=_BLOCK_I, BLOCK_J=_BLOCK_J)
    return out.reshape(*v.shape, d)


def expm1_triton(x: Tensor) -> Tensor:
    """``expm1`` of a float64 tensor with the kernel's :func:`_expm1_f64` (for its accuracy test).

    Args:
        x: A float64 tensor.

    Returns:
        A new contiguous float64 tensor shaped like ``x``.
    """
    check_launch("expm1", "x", x, (torch.float64,))
    flat = x.contiguous().reshape(-1)
    out = torch.empty_like(flat)
    if flat.numel():
        block = 1024
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _expm1_elementwise_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), BLOCK=block)
    return out.reshape(x.shape)
