"""Triton kernel for :func:`surgery.kernels.reference.segment_mean_update`.

This module imports triton at top level: import it only when triton is available (the
dispatcher in :mod:`surgery.kernels.segment_mean_update` does this lazily). Use the dispatcher
:func:`surgery.kernels.segment_mean_update`, which validates its inputs, rather than calling the
launcher here directly.

One program per row does the whole per-token update of that row's state in one pass over
``d``: add the new state into the running sum, write the segment mean into the buffer where the
segment ended, clear the sum, then update the count and the step counter. The row's scalars
(count, step counter, flags) are read before anything is written, so no other program depends
on them: no host sync, no second launch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import TRITON_X_DTYPES
from .triton_common import check_launch

__all__ = ["segment_mean_update_triton"]

# Largest block of d one program handles per loop step; wider rows loop.
_MAX_BLOCK = 1024


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _segment_mean_update_kernel(
    x_ptr,
    valid_ptr,
    ended_ptr,
    keep_ptr,
    total_ptr,
    count_ptr,
    buffer_ptr,
    n_steps_ptr,
    d,
    x_row_stride,
    capacity,
    BLOCK: tl.constexpr,
):
    # One program per row; total is [batch, d], buffer [batch, capacity, d], both contiguous.
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(valid_ptr + row) != 0
    ended = tl.load(ended_ptr + row) != 0
    keep = tl.load(keep_ptr + row) != 0
    count = tl.load(count_ptr + row) + valid.to(tl.int64)
    n_steps = tl.load(n_steps_ptr + row)
    # A slot outside the buffer is never written (the reference skips it too).
    write = ended & (n_steps >= 0) & (n_steps < capacity)
    # Row flags become column limits: cols < 0 masks a whole row out. (The interpreter
    # mishandles a scalar flag & a block mask.)
    read_limit = tl.where(valid, d, 0)
    write_limit = tl.where(write, d, 0)
    divisor = tl.maximum(count, 1).to(tl.float32)
    total_row = total_ptr + row * d
    slot = buffer_ptr + (row * capacity + n_steps) * d
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < d
        # Invalid rows add 0.0, as the reference's torch.where(valid, x, 0.0) does.
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=cols < read_limit, other=0.0)
        total = tl.load(total_row + cols, mask=in_row, other=0.0) + x.to(tl.float32)
        # IEEE division (a plain "/" may be approximate on GPUs), as torch divides.
        mean = tl.fdiv(total, divisor, ieee_rounding=True)
        tl.store(slot + cols, mean, mask=cols < write_limit)
        tl.store(total_row + cols, tl.where(ended, 0.0, total), mask=in_row)
    tl.store(count_ptr + row, tl.where(ended, 0, count))
    tl.store(n_steps_ptr + row, n_steps + keep.to(tl.int64))




def segment_mean_update_triton(
    x: Tensor,
    valid: Tensor,
    ended: Tensor,
    keep: Tensor,
    total: Tensor,
    count: Tensor,
    buffer: Tensor,
    n_steps: Tensor,
) -> None:
    """Triton version of :func:`surgery.kernels.reference.segment_mean_update`, in place.

    Inputs are assumed to be checked already (shapes, dtypes, one device, contiguous state
    tensors); the dispatcher :func:`surgery.kernels.segment_mean_update` does that. ``x`` is
    read through its row stride (``x = hidden[:, -1]`` needs no copy) when its last dimension
    is contiguous, else copied; the flags are copied when not contiguous (``batch`` bytes).

    Args:
        x: ``[batch, d]`` new hidden states, float16, bfloat16, float32 or float64.
        valid: Boolean ``[batch]``: rows whose token counts.
        ended: Boolean ``[batch]``: rows whose segment this token ends.
        keep: Boolean ``[batch]``: rows whose step counter advances.
        total: ``[batch, d]`` float32 running sums, contiguous; updated in place.
        count: ``[batch]`` int64 token counts, contiguous; updated in place.
        buffer: ``[batch, capacity, d]`` float32 segment means, contiguous; written in place.
        n_steps: ``[batch]`` int64 step counters, contiguous; updated in place.

    Example:
        >>> import torch
        >>> total = torch.zeros(1, 3, device="cuda")  # doctest: +SKIP
        >>> count = torch.zeros(1, dtype=torch.long, device="cuda")  # doctest: +SKIP
        >>> buffer = torch.zeros(1, 8, 3, device="cuda")  # doctest: +SKIP
        >>> n_steps = torch.zeros(1, dtype=torch.long, device="cuda")  # doctest: +SKIP
        >>> yes = torch.tensor([True], device="cuda")  # doctest: +SKIP
        >>> x = torch.ones(1, 3, device="cuda")  # doctest: +SKIP
        >>> segment_mean_update_triton(x, yes, yes, yes, total, count, buffer, n_steps)  # doctest: +SKIP
        >>> buffer[0, 0], n_steps  # doctest: +SKIP
        (tensor([1., 1., 1.], device='cuda:0'), tensor([1], device='cuda:0'))
    """
    check_launch("segment_mean_update", "x", x, TRITON_X_DTYPES)
    batch, d = total.shape
    if batch == 0:
        return
    if d > 0 and x.stride(1) != 1:
        x = x.contiguous()
    valid_c, ended_c, keep_c = valid.contiguous(), ended.contiguous(), keep.contiguous()
    block = min(triton.next_power_of_2(max(d, 1)), _MAX_BLOCK)
    with torch.cuda.device(total.device) if total.is_cuda else nullcontext():
        _segment_mean_update_kernel[(batch,)](
            x,
            valid_c,
            ended_c,
            keep_c,
            total,
            count,
            buffer,
            n_steps,
            d,
            x.stride(0),
            buffer.shape[1],
            BLOCK=block,
            # No fused multiply-add: keeps the float32 sums identical to the torch reference.
            enable_fp_fusion=False,
        )
