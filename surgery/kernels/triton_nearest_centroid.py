"""Triton kernel for :func:`surgery.kernels.reference.nearest_centroid`.

This module imports triton at top level: import it only when triton is available (the
dispatcher in :mod:`surgery.kernels.nearest_centroid` does this lazily). Use the dispatcher
:func:`surgery.kernels.nearest_centroid`, which validates its inputs, rather than calling the
launcher here directly. The dtypes it handles are :data:`surgery.kernels.backend.TRITON_DTYPES`.

Each program takes a block of points, walks the centers a tile at a time (each tile's dot
products accumulated over ``d`` in float32 by ``tl.dot``, full float32 precision for float32
inputs, no TF32) and keeps a running minimum: the ``[n, k]`` distance matrix never exists.
The block sizes are reasonable defaults, not tuned on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import TRITON_DTYPES
from .triton_common import check_launch, is_interpreted

__all__ = ["nearest_centroid_triton"]


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _nearest_centroid_kernel(
    points_ptr,
    centers_ptr,
    labels_ptr,
    sq_distances_ptr,
    n,
    k,
    d,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    # ||x||² of the block's points, in float32
    x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        x = tl.load(points_ptr + rows[:, None] * d + dims[None, :],
                    mask=row_ok[:, None] & (dims < d)[None, :], other=0.0).to(tl.float32)
        x_sq += tl.sum(x * x, axis=1)
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k_start in range(0, k, BLOCK_K):
        cents = k_start + tl.arange(0, BLOCK_K)
        cent_ok = cents < k
        dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        c_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, d, BLOCK_D):
            dims = start + tl.arange(0, BLOCK_D)
            dim_ok = (dims < d)[None, :]
            x = tl.load(points_ptr + rows[:, None] * d + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
            c = tl.load(centers_ptr + cents[:, None].to(tl.int64) * d + dims[None, :],
                        mask=cent_ok[:, None] & dim_ok, other=0.0)
            if UPCAST:  # float32 operands: the same products (exact), another path into tl.dot
                x, c = x.to(tl.float32), c.to(tl.float32)
            dot = tl.dot(x, tl.trans(c), dot, input_precision="ieee")
            cf = c.to(tl.float32)
            c_sq += tl.sum(cf * cf, axis=1)
        # the reference's expanded form, in its order: (||x||² - 2 x·c) + ||c||², clamped at 0
        sq = tl.maximum(x_sq[:, None] - 2.0 * dot + c_sq[None, :], 0.0)
        sq = tl.where(cent_ok[None, :], sq, float("inf"))
        tile_best = tl.min(sq, axis=1)
        tile_index = tl.min(tl.where(sq == tile_best[:, None], cents[None, :], k), axis=1)
        better = tile_best < best  # strict: on ties the earlier tile (lower index) stays
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64), best_index)
    tl.store(labels_ptr + rows, best_index, mask=row_ok)
    tl.store(sq_distances_ptr + rows, best, mask=row_ok)




def nearest_centroid_triton(points: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`surgery.kernels.reference.nearest_centroid`.

    Inputs are assumed to be checked already (2-D, same width, dtype and device, ``k >= 1``);
    the dispatcher :func:`surgery.kernels.nearest_centroid` does that. Non-contiguous inputs
    are copied to contiguous ones first.

    Args:
        points: ``[n, d]`` float16, bfloat16 or float32 tensor.
        centers: ``[k, d]`` with ``points``' dtype and device.

    Returns:
        ``(labels, sq_distances)``: int64 ``[n]`` and float32 ``[n]``.

    Example:
        >>> import torch
        >>> points = torch.tensor([[0.0, 0.0], [4.0, 1.0]], device="cuda")  # doctest: +SKIP
        >>> nearest_centroid_triton(points, torch.tensor([[0.0, 1.0], [5.0, 1.0]], device="cuda"))  # doctest: +SKIP
        (tensor([0, 1], device='cuda:0'), tensor([1., 1.], device='cuda:0'))
    """
    check_launch("nearest_centroid", "points", points, TRITON_DTYPES)
    points_c, centers_c = points.contiguous(), centers.contiguous()
    n, d = points_c.shape
    k = centers_c.shape[0]
    labels = torch.zeros(n, dtype=torch.int64, device=points.device)
    sq_distances = torch.zeros(n, dtype=torch.float32, device=points.device)
    if n == 0:
        return labels, sq_distances
    wide = points.dtype == torch.float32  # float32 tiles take twice the registers
    block_n, block_k = 64, 64
    block_d = 32 if wide else 64
    with torch.cuda.device(points_c.device) if points_c.is_cuda else nullcontext():
        _nearest_centroid_kernel[(triton.cdiv(n, block_n),)](
            points_c, centers_c, labels, sq_distances, n, k, d,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
            # the interpreter's tl.dot mistreats bfloat16 (triton 3.x): give it float32 there
            UPCAST=is_interpreted() and points.dtype == torch.bfloat16,
            # no fused multiply-add in the elementwise part: closer to torch's rounding
            enable_fp_fusion=False,
        )
    return labels, sq_distances
