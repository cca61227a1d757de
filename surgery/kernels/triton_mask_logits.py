"""Triton kernels for :func:`surgery.kernels.reference.mask_logits`.

This module imports triton at top level: import it only when triton is available (the
dispatcher in :mod:`surgery.kernels.mask_logits` does this lazily). Use the dispatcher
:func:`surgery.kernels.mask_logits`, which validates its inputs, rather than calling the launcher
here directly. The dtypes it handles are :data:`surgery.kernels.backend.TRITON_DTYPES`.

Two launches. The first reads each block of a row once: it writes the edited block and the
block's partial argmax (its largest value and the first index of it, or its first NaN). The
second, one program per row, reduces those partials to the row's top token and looks up
whether the mask hit it. The vocabulary is split over many programs, so a few rows of a
150k-entry vocabulary still fill the GPU.
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

__all__ = ["mask_logits_triton"]

# Vocabulary entries one program of the edit kernel handles.
_BLOCK = 4096


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _mask_logits_kernel(
    logits_ptr,
    vocab_mask_ptr,
    extra_ptr,
    active_ptr,
    forced_ptr,
    out_ptr,
    part_value_ptr,
    part_index_ptr,
    penalty,
    vocab,
    n_chunks,
    HAS_VOCAB: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_FORCED: tl.constexpr,
    HARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (row, chunk) of a contiguous [rows, vocab] view handles one BLOCK of the row.
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < vocab
    base = row * vocab
    x = tl.load(logits_ptr + base + cols, mask=in_row, other=0.0)
    masked = tl.zeros([BLOCK], dtype=tl.int1)
    if HAS_VOCAB:
        masked = masked | (tl.load(vocab_mask_ptr + cols, mask=in_row, other=0) != 0)
    if HAS_EXTRA:
        masked = masked | (tl.load(extra_ptr + base + cols, mask=in_row, other=0) != 0)
    if HAS_ACTIVE:
        masked = masked & (tl.load(active_ptr + row) != 0)
    if HARD:
        # chosen in float32 (exact for every storage dtype): Triton 3.7's interpreter cannot make a
        # bfloat16 constant (no get_bf16), and 3.7.1 is what torch 2.13's CUDA build runs
        edited = tl.where(masked, float("-inf"), x.to(tl.float32)).to(x.dtype)
    else:
        # penalty comes rounded to the storage dtype; the sum is taken in float32, rounded once
        edited = tl.where(masked, to_storage(x.to(tl.float32) + penalty, x.dtype), x)
    if HAS_FORCED:
        forced = tl.load(forced_ptr + row)
        one_hot = tl.where(cols == forced, 0.0, float("-inf")).to(x.dtype)
        edited = tl.where(forced >= 0, one_hot, edited)
    tl.store(out_ptr + base + cols, edited, mask=in_row)

    # This block's part of torch.argmax over the unedited row: the first NaN if there is one,
    # else the first index of the largest value.
    xf = x.to(tl.float32)
    is_nan = (xf != xf) & in_row
    nan_index = tl.min(tl.where(is_nan, cols, vocab), axis=0)
    clean = tl.where(in_row & ~is_nan, xf, float("-inf"))
    best = tl.max(clean, axis=0)
    best_index = tl.min(tl.where(in_row & (clean == best), cols, vocab), axis=0)
    has_nan = nan_index < vocab
    tl.store(part_value_ptr + row * n_chunks + chunk, tl.where(has_nan, float("nan"), best))
    tl.store(part_index_ptr + row * n_chunks + chunk, tl.where(has_nan, nan_index, best_index))


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _mask_logits_top_kernel(
    part_value_ptr,
    part_index_ptr,
    vocab_mask_ptr,
    extra_ptr,
    active_ptr,
    top_masked_ptr,
    vocab,
    n_chunks,
    HAS_VOCAB: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    # One program per row: the chunks' partials -> the row's argmax -> was it masked?
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS)
    ok = chunks < n_chunks
    value = tl.load(part_value_ptr + row * n_chunks + chunks, mask=ok, other=float("-inf"))
    index = tl.load(part_index_ptr + row * n_chunks + chunks, mask=ok, other=0)
    is_nan = (value != value) & ok
    nan_index = tl.min(tl.where(is_nan, index, vocab), axis=0)
    clean = tl.where(is_nan, float("-inf"), value)
    best = tl.max(clean, axis=0)
    # chunks are in column order, so the smallest index among the best chunks is the first
    best_index = tl.min(tl.where(ok & ~is_nan & (clean == best), index, vocab), axis=0)
    top = tl.where(nan_index < vocab, nan_index, best_index).to(tl.int64)
    hit = top < 0  # False, as a scalar int1
    if HAS_VOCAB:
        hit = hit | (tl.load(vocab_mask_ptr + top) != 0)
    if HAS_EXTRA:
        hit = hit | (tl.load(extra_ptr + row * vocab + top) != 0)
    if HAS_ACTIVE:
        hit = hit & (tl.load(active_ptr + row) != 0)
    tl.store(top_masked_ptr + row, hit)




def mask_logits_triton(
    logits: Tensor,
    vocab_mask: Tensor | None = None,
    penalty: float | None = None,
    extra_mask: Tensor | None = None,
    active: Tensor | None = None,
    forced: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`surgery.kernels.reference.mask_logits`.

    Inputs are assumed to be checked already (shapes, dtypes, devices, ``vocab >= 1``); the
    dispatcher :func:`surgery.kernels.mask_logits` does that. Non-contiguous inputs are copied
    to contiguous ones first.

    Args:
        logits: ``[*rows, vocab]`` float16, bfloat16 or float32 tensor.
        vocab_mask: Boolean ``[vocab]`` or None.
        penalty: Added to masked logits; None sets them to ``-inf``.
        extra_mask: Boolean ``[*rows, vocab]`` or None.
        active: Boolean ``[*rows]`` or None.
        forced: int64 ``[*rows]`` (``-1``: none) or None.

    Returns:
        ``(edited, top_masked)``: a new contiguous tensor like ``logits``, boolean ``[*rows]``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 3.0, 2.0]], device="cuda")  # doctest: +SKIP
        >>> mask_logits_triton(logits, torch.tensor([False, True, False], device="cuda"))  # doctest: +SKIP
        (tensor([[1., -inf, 2.]], device='cuda:0'), tensor([True], device='cuda:0'))
    """
    check_launch("mask_logits", "logits", logits, TRITON_DTYPES)
    logits_c = logits.contiguous()
    out = torch.empty_like(logits_c)
    top_masked = torch.zeros(logits_c.shape[:-1], dtype=torch.bool, device=logits.device)
    vocab = logits_c.shape[-1]
    rows = top_masked.numel()
    if rows == 0:
        return out, top_masked
    block = min(triton.next_power_of_2(vocab), _BLOCK)
    n_chunks = triton.cdiv(vocab, block)
    part_value = torch.empty(rows, n_chunks, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(rows, n_chunks, dtype=torch.int32, device=logits.device)
    # absent inputs: any tensor will do as the pointer, the constexpr flag keeps it unread
    vocab_c = logits_c if vocab_mask is None else vocab_mask.contiguous()
    extra_c = logits_c if extra_mask is None else extra_mask.contiguous()
    active_c = logits_c if active is None else active.contiguous()
    forced_c = logits_c if forced is None else forced.contiguous()
    # the penalty rounded to the storage dtype on the host (as the reference does), exact in float32
    step = 0.0 if penalty is None else float(torch.tensor(float(penalty), dtype=logits.dtype))
    flags = dict(HAS_VOCAB=vocab_mask is not None, HAS_EXTRA=extra_mask is not None,
                 HAS_ACTIVE=active is not None)
    with torch.cuda.device(logits_c.device) if logits_c.is_cuda else nullcontext():
        _mask_logits_kernel[(rows, n_chunks)](
            logits_c, vocab_c, extra_c, active_c, forced_c, out, part_value, part_index,
            step, vocab, n_chunks,
            HAS_FORCED=forced is not None, HARD=penalty is None, BLOCK=block,
            num_warps=8 if block >= 2048 else 4, **flags,
        )
        _mask_logits_top_kernel[(rows,)](
            part_value, part_index, vocab_c, extra_c, active_c, top_masked, vocab, n_chunks,
            CHUNKS=triton.next_power_of_2(n_chunks), **flags,
        )
    return out, top_masked
