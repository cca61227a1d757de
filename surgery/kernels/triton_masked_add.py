"""Triton kernel for :func:`surgery.kernels.reference.masked_add`.

This module imports triton at top level: import it only when triton is available (the
dispatcher in :mod:`surgery.kernels.masked_add` does this lazily). Use the dispatcher
:func:`surgery.kernels.masked_add`, which validates its inputs, rather than calling the launcher
here directly. The dtypes it handles are :data:`surgery.kernels.backend.TRITON_DTYPES`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import TRITON_DTYPES

__all__ = ["masked_add_triton"]

# Largest block of d_model one program handles per loop step; wider rows loop.
_MAX_BLOCK = 1024


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _f32_to_bf16_rtne(x):
    # float32 -> bfloat16, round to nearest even, done on the bits. The same code runs on GPUs
    # (where it matches the hardware conversion) and in the Triton interpreter, whose plain
    # float32 -> bfloat16 cast truncates instead of rounding.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x0040  # NaN in, NaN out (sign kept, quiet bit set)
    top = tl.where(x != x, quiet_nan, rounded)
    return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _to_storage(x, dtype: tl.constexpr):
    # float32 -> storage dtype with round to nearest even.
    if dtype == tl.bfloat16:
        return _f32_to_bf16_rtne(x)
    else:
        return x.to(dtype)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _masked_add_kernel(
    hidden_ptr,
    mask_ptr,
    vector_ptr,
    out_ptr,
    alpha,
    d_model,
    BLOCK: tl.constexpr,
):
    # One program per (batch * pos) row of a contiguous [rows, d_model] view.
    row = tl.program_id(0).to(tl.int64)
    base = row * d_model
    selected = tl.load(mask_ptr + row) != 0
    for start in range(0, d_model, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < d_model
        h = tl.load(hidden_ptr + base + cols, mask=in_row, other=0.0)
        v = tl.load(vector_ptr + cols, mask=in_row, other=0.0)
        # alpha * v is rounded to the storage dtype first, as in the reference.
        scaled = _to_storage(v.to(tl.float32) * alpha, h.dtype)
        added = _to_storage(h.to(tl.float32) + scaled.to(tl.float32), h.dtype)
        # Unselected rows store the loaded value as is: bit-identical copy.
        out = tl.where(selected, added, h)
        tl.store(out_ptr + base + cols, out, mask=in_row)


def _is_interpreted() -> bool:
    """True when the kernel was built by the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return type(_masked_add_kernel).__name__ == "InterpretedFunction"


def masked_add_triton(hidden: Tensor, mask: Tensor, vector: Tensor, alpha: float = 1.0) -> Tensor:
    """Triton version of :func:`surgery.kernels.reference.masked_add`.

    Inputs are assumed to be checked already (shapes, bool mask, same device and dtype); the
    dispatcher :func:`surgery.kernels.masked_add` does that. Non-contiguous inputs are copied to
    contiguous ones first.

    Args:
        hidden: ``[batch, pos, d_model]`` float16, bfloat16 or float32 tensor.
        mask: Boolean ``[batch, pos]`` tensor on the same device.
        vector: ``[d_model]`` tensor with ``hidden``'s dtype and device.
        alpha: Scale applied to ``vector`` before adding.

    Returns:
        A new contiguous tensor shaped like ``hidden``.

    Example:
        >>> import torch
        >>> hidden = torch.zeros(1, 2, 3, device="cuda")  # doctest: +SKIP
        >>> mask = torch.tensor([[True, False]], device="cuda")  # doctest: +SKIP
        >>> masked_add_triton(hidden, mask, torch.ones(3, device="cuda"))  # doctest: +SKIP
        tensor([[[1., 1., 1.],
                 [0., 0., 0.]]], device='cuda:0')
    """
    if hidden.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"the Triton masked_add kernel supports {[str(d) for d in TRITON_DTYPES]}, "
            f"got hidden.dtype={hidden.dtype}; use backend='torch' for this dtype"
        )
    if not hidden.is_cuda and not _is_interpreted():
        raise RuntimeError(
            f"the Triton masked_add kernel needs CUDA tensors, got device {hidden.device}; move "
            "the tensors to a GPU, use backend='torch', or set TRITON_INTERPRET=1 before triton is "
            "first imported to run the kernel in the (slow) interpreter"
        )
    hidden_c = hidden.contiguous()
    out = torch.empty_like(hidden_c)
    batch, pos, d_model = hidden_c.shape
    rows = batch * pos
    if rows == 0 or d_model == 0:
        return out
    mask_c = mask.contiguous()
    vector_c = vector.contiguous()
    block = min(triton.next_power_of_2(d_model), _MAX_BLOCK)
    with torch.cuda.device(hidden_c.device) if hidden_c.is_cuda else nullcontext():
        _masked_add_kernel[(rows,)](
            hidden_c,
            mask_c,
            vector_c,
            out,
            float(alpha),
            d_model,
            BLOCK=block,
            # No fused multiply-add: keeps float32 results identical to the torch reference.
            enable_fp_fusion=False,
        )
    return out

