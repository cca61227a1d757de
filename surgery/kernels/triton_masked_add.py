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
from .triton_common import check_launch, to_storage

__all__ = ["masked_add_triton"]

# Largest block of d_model one program handles per loop step; wider rows loop.
_MAX_BLOCK = 1024






@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _masked_add_kernel(
    hidden_ptr,
    mask_ptr,
    vector_ptr,
    out_ptr,
    alpha,
    d_model,
    pos,
    vector_row_stride,
    BLOCK: tl.constexpr,
):
    # One program per (batch * pos) row of a contiguous [rows, d_model] view; the vector is
    # shared (vector_row_stride 0) or one per batch row (vector_row_stride d_model).
    row = tl.program_id(0).to(tl.int64)
    base = row * d_model
    vector_base = (row // pos) * vector_row_stride
    selected = tl.load(mask_ptr + row) != 0
    for start in range(0, d_model, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < d_model
        h = tl.load(hidden_ptr + base + cols, mask=in_row, other=0.0)
        v = tl.load(vector_ptr + vector_base + cols, mask=in_row, other=0.0)
        # alpha * v is rounded to the storage dtype first, as in the reference.
        scaled = to_storage(v.to(tl.float32) * alpha, h.dtype)
        added = to_storage(h.to(tl.float32) + scaled.to(tl.float32), h.dtype)
        # Unselected rows store the loaded value as is: bit-identical copy.
        out = tl.where(selected, added, h)
        tl.store(out_ptr + base + cols, out, mask=in_row)




def masked_add_triton(hidden: Tensor, mask: Tensor, vector: Tensor, alpha: float = 1.0) -> Tensor:
    """Triton version of :func:`surgery.kernels.reference.masked_add`.

    Inputs are assumed to be checked already (shapes, bool mask, same device and dtype); the
    dispatcher :func:`surgery.kernels.masked_add` does that. Non-contiguous inputs are copied to
    contiguous ones first.

    Args:
        hidden: ``[batch, pos, d_model]`` float16, bfloat16 or float32 tensor.
        mask: Boolean ``[batch, pos]`` tensor on the same device.
        vector: ``[d_model]`` or ``[batch, d_model]`` (one per row) with ``hidden``'s dtype and device.
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
    check_launch("masked_add", "hidden", hidden, TRITON_DTYPES)
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
            pos,
            d_model if vector_c.ndim == 2 else 0,
            BLOCK=block,
            # No fused multiply-add: keeps float32 results identical to the torch reference.
            enable_fp_fusion=False,
        )
    return out

