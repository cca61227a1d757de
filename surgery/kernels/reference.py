"""Plain torch reference ops: the specification, the CPU path and the test oracle for the kernels.

Every op here is written for clarity, not speed. The Triton kernels in this package must agree
with these functions (bit for bit where the arithmetic allows it); when in doubt about what a
kernel should do, this file is the answer.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["mask_logits", "masked_add", "nearest_centroid"]


def masked_add(
    hidden: Float[Tensor, "batch pos d_model"],
    mask: Bool[Tensor, "batch pos"],
    vector: Float[Tensor, " d_model"],
    alpha: float = 1.0,
) -> Float[Tensor, "batch pos d_model"]:
    """Add ``alpha * vector`` to the hidden states at the positions selected by ``mask``.

    The scaled vector is computed first, in ``hidden``'s dtype (``alpha * vector`` is rounded to
    that dtype), and then added: masked positions hold ``hidden + (alpha * vector)``. Positions
    where ``mask`` is False are copied unchanged, bit for bit. The input is never modified.

    No validation is done here; use :func:`surgery.kernels.masked_add` for checked inputs.

    Args:
        hidden: Hidden states, ``[batch, pos, d_model]``, any floating dtype.
        mask: Boolean ``[batch, pos]``; True where the vector is added.
        vector: The direction to add, ``[d_model]``, same dtype and device as ``hidden``.
        alpha: Scale applied to ``vector`` before adding.

    Returns:
        A new tensor shaped like ``hidden`` with the same dtype and device.

    Example:
        >>> import torch
        >>> hidden = torch.zeros(1, 3, 2)
        >>> mask = torch.tensor([[True, False, True]])
        >>> masked_add(hidden, mask, torch.tensor([1.0, 2.0]), alpha=2.0)
        tensor([[[2., 4.],
                 [0., 0.],
                 [2., 4.]]])
    """
    scaled = vector * alpha  # rounded to hidden's dtype before the add
    return torch.where(mask.unsqueeze(-1), hidden + scaled, hidden)


def mask_logits(
    logits: Float[Tensor, "*rows vocab"],
    vocab_mask: Bool[Tensor, " vocab"] | None = None,
    penalty: float | None = None,
    extra_mask: Bool[Tensor, "*rows vocab"] | None = None,
    active: Bool[Tensor, "*rows"] | None = None,
    forced: Int[Tensor, "*rows"] | None = None,
) -> tuple[Float[Tensor, "*rows vocab"], Bool[Tensor, "*rows"]]:
    """Penalise or forbid a set of tokens in the logits, force tokens, and report the top token.

    Each row (``[batch]`` or ``[batch, pos]``) of ``logits`` is one next-token distribution.
    A token is *masked* in a row when it is in ``vocab_mask`` or in that row's ``extra_mask``,
    and the row is ``active``. Masked logits get ``logit + penalty``, or ``-inf`` when
    ``penalty`` is None; as in ``logits + penalty`` on the CPU, ``penalty`` is rounded to
    ``logits``' dtype first (CUDA's eager torch would keep it in float32). A row with
    ``forced[row] = t >= 0`` instead becomes ``0`` at token ``t`` and ``-inf`` everywhere else
    (a one-hot distribution: its argmax and its only sample are ``t``, whatever the mask says).
    Other logits are copied bit for bit.

    The second result says, per row, whether the mask hit the row's would-be top token: the
    argmax of the *unedited* logits (the first one on ties, NaN counting as the largest, as
    :func:`torch.argmax`). Forcing does not change it.

    No validation is done here; use :func:`surgery.kernels.mask_logits` for checked inputs.

    Args:
        logits: ``[*rows, vocab]``, any floating dtype.
        vocab_mask: Boolean ``[vocab]``: tokens masked in every active row; None for none.
        penalty: Added to masked logits; None sets them to ``-inf``.
        extra_mask: Boolean ``[*rows, vocab]``: tokens masked in one row only; None for none.
        active: Boolean ``[*rows]``: rows where masking applies; None for all.
        forced: Integer ``[*rows]``: the token forced in each row, ``-1`` for none; None for none.

    Returns:
        ``(edited, top_masked)``: a new tensor like ``logits``, and a boolean ``[*rows]``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
        >>> edited, top_masked = mask_logits(logits, torch.tensor([False, True, False]), penalty=-2.5,
        ...                                  forced=torch.tensor([-1, 2]))
        >>> edited
        tensor([[1.0000, 0.5000, 2.0000],
                [  -inf,   -inf, 0.0000]])
        >>> top_masked
        tensor([True, True])
    """
    masked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    if vocab_mask is not None:
        masked = masked | vocab_mask
    if extra_mask is not None:
        masked = masked | extra_mask
    if active is not None:
        masked = masked & active[..., None]
    top_masked = masked.gather(-1, logits.argmax(dim=-1, keepdim=True))[..., 0]
    if penalty is None:
        edited = logits.masked_fill(masked, float("-inf"))
    else:
        step = torch.full((), penalty, dtype=logits.dtype, device=logits.device)  # rounded first
        edited = torch.where(masked, logits + step, logits)
    if forced is not None:
        columns = torch.arange(logits.shape[-1], device=logits.device)
        one_hot = torch.where(columns == forced[..., None], 0.0, float("-inf")).to(logits.dtype)
        edited = torch.where((forced >= 0)[..., None], one_hot, edited)
    return edited, top_masked


def nearest_centroid(
    points: Float[Tensor, "n d"], centers: Float[Tensor, "k d"]
) -> tuple[Int[Tensor, " n"], Float[Tensor, " n"]]:
    """For each point, the index of its nearest center and the squared distance to it.

    The squared distances use the expanded form ``||x||² - 2 x·c + ||c||²`` (one matrix product,
    as K-means implementations do), clamped at 0, then the minimum over centers; ties go to the
    lowest center index, as :meth:`torch.Tensor.min`. The ``[n, k]`` distance matrix is
    materialised here (the Triton kernel avoids it). Float64 inputs are computed in float64;
    every other dtype (float32, bfloat16, float16) in float32.

    No validation is done here; use :func:`surgery.kernels.nearest_centroid` for checked inputs.

    Args:
        points: ``[n, d]``, floating.
        centers: ``[k, d]``, same dtype and device as ``points``, ``k >= 1``.

    Returns:
        ``(labels, sq_distances)``: int64 ``[n]`` and ``[n]`` in the computation dtype
        (float64 for float64 inputs, float32 otherwise).

    Example:
        >>> import torch
        >>> points = torch.tensor([[0.0, 0.0], [4.0, 1.0], [9.0, 9.0]])
        >>> centers = torch.tensor([[0.0, 1.0], [5.0, 1.0]])
        >>> nearest_centroid(points, centers)
        (tensor([0, 1, 1]), tensor([ 1.,  1., 80.]))
    """
    wide = torch.float64 if points.dtype == torch.float64 else torch.float32
    points, centers = points.to(wide), centers.to(wide)
    sq = (points * points).sum(1)[:, None] - 2 * points @ centers.T + (centers * centers).sum(1)[None]
    sq_distances, labels = sq.clamp_(min=0).min(1)
    return labels, sq_distances
