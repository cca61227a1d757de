"""Plain torch reference ops: the specification, the CPU path and the test oracle for the kernels.

Every op here is written for clarity, not speed. The Triton kernels in this package must agree
with these functions (bit for bit where the arithmetic allows it); when in doubt about what a
kernel should do, this file is the answer.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["centred_gaussian_gram", "mask_logits", "masked_add", "nearest_centroid", "segment_mean_update"]


def masked_add(
    hidden: Float[Tensor, "batch pos d_model"],
    mask: Bool[Tensor, "batch pos"],
    vector: Float[Tensor, " d_model"] | Float[Tensor, "batch d_model"],
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
        vector: The direction to add, ``[d_model]``, or one per row, ``[batch, d_model]``; same
            dtype and device as ``hidden``.
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
    if scaled.ndim == 2:  # one vector per row
        scaled = scaled.unsqueeze(1)
    return torch.where(mask.unsqueeze(-1), hidden + scaled, hidden)


# --- streaming segment-mean pooling and the centred Gaussian Gram matrix (nHSIC) ---------------


def segment_mean_update(
    x: Float[Tensor, "batch d"],
    valid: Bool[Tensor, " batch"],
    ended: Bool[Tensor, " batch"],
    keep: Bool[Tensor, " batch"],
    total: Float[Tensor, "batch d"],
    count: Tensor,
    buffer: Float[Tensor, "batch capacity d"],
    n_steps: Tensor,
) -> None:
    """One decode step of streaming segment-mean pooling, in place on the state tensors.

    Each row keeps a running float32 sum ``total`` and a token count ``count`` of its current
    segment, and a buffer of finished segment means with a counter ``n_steps``. For one new
    hidden state per row, in this order:

    1. where ``valid``: ``total += x`` (``x`` rounded to float32 first) and ``count += 1``;
    2. where ``ended``: ``buffer[row, n_steps[row]] = total / max(count, 1)``, so the token that
       ends a segment belongs to it; a slot outside ``[0, capacity)`` is not written (the caller
       grows the buffer beforehand; checking here would cost a host sync);
    3. where ``keep``: ``n_steps += 1`` (a segment ended but not kept leaves its mean in the
       free slot, to be overwritten by the next one);
    4. where ``ended``: ``total`` and ``count`` are reset to zero.

    Nothing else in ``buffer`` changes. No validation is done here; use
    :func:`surgery.kernels.segment_mean_update` for checked inputs.

    Args:
        x: The new hidden state of each row, ``[batch, d]``, any floating dtype.
        valid: Boolean ``[batch]``; False rows (padding, finished rows) add nothing.
        ended: Boolean ``[batch]``; True where this token ends the row's segment.
        keep: Boolean ``[batch]``; True where the row's step counter advances (normally a
            subset of ``ended``).
        total: Running sums ``[batch, d]``, float32; updated in place.
        count: Token counts ``[batch]``, int64; updated in place.
        buffer: Segment means ``[batch, capacity, d]``, float32, contiguous; written in place.
        n_steps: Segments kept per row ``[batch]``, int64; updated in place.

    Example:
        >>> import torch
        >>> total, count = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
        >>> buffer, n_steps = torch.zeros(1, 4, 2), torch.zeros(1, dtype=torch.long)
        >>> yes, no = torch.tensor([True]), torch.tensor([False])
        >>> segment_mean_update(torch.tensor([[1.0, 2.0]]), yes, no, no, total, count, buffer, n_steps)
        >>> segment_mean_update(torch.tensor([[3.0, 6.0]]), yes, yes, yes, total, count, buffer, n_steps)
        >>> buffer[0, 0], n_steps, total, count
        (tensor([2., 4.]), tensor([1]), tensor([[0., 0.]]), tensor([0]))
    """
    total += torch.where(valid[:, None], x.float(), 0.0)
    count += valid.long()
    batch, capacity, d = buffer.shape
    if capacity > 0:
        # Each row's slot in a flat [batch * capacity, d] view (buffer is contiguous): one
        # index_select and one index_copy_, no host sync. (buffer[rows, n_steps] = ... is the
        # same op, but on a busy 2-core CPU its 2-thread path took ~10 ms for 8 rows, against
        # ~8 us with one thread; these two stayed at ~8 us either way.)
        slots = buffer.view(batch * capacity, d)
        index = torch.arange(batch, device=buffer.device) * capacity + n_steps.clamp(0, capacity - 1)
        write = ended & (n_steps >= 0) & (n_steps < capacity)
        mean = total / count.clamp(min=1)[:, None].float()
        slots.index_copy_(0, index, torch.where(write[:, None], mean, slots.index_select(0, index)))
    n_steps += keep.long()
    total.masked_fill_(ended[:, None], 0.0)
    count.masked_fill_(ended, 0)


def centred_gaussian_gram(v: Float[Tensor, "*batch d"], sigma: float) -> Float[Tensor, "*batch d d"]:
    """Right-centred Gaussian Gram matrix ``K H`` over the coordinates of each row of ``v``, float64.

    ``K[i, j] = exp(-(v_i - v_j)² / (2σ²))`` and ``H = I - 11ᵀ/d``. Since ``1 1ᵀ H = 0``,
    ``K H = (K - 1) H``: the result is ``E = expm1(-(v_i - v_j)² / (2σ²))`` minus its row means
    (right-multiplying by ``H`` subtracts row means). ``expm1`` keeps the small entries that
    ``exp`` would round away next to 1. The input is converted to float64 first (exact for every
    floating dtype up to float64); the result is float64 whatever the input dtype, since the
    nHSIC solve needs it (see :mod:`probes.hsic`).

    No validation is done here; use :func:`surgery.kernels.centred_gaussian_gram` for checked
    inputs.

    Args:
        v: ``[..., d]``; each row's ``d`` coordinates are the samples.
        sigma: The kernel bandwidth σ.

    Returns:
        A new float64 tensor ``[..., d, d]`` on ``v``'s device; each row of it sums to ~0.

    Example:
        >>> import torch
        >>> centred_gaussian_gram(torch.tensor([0.0, 0.0, 3.0]), sigma=1.0)
        tensor([[ 0.3296,  0.3296, -0.6593],
                [ 0.3296,  0.3296, -0.6593],
                [-0.3296, -0.3296,  0.6593]], dtype=torch.float64)
    """
    v = v.to(torch.float64)
    diff = v[..., :, None] - v[..., None, :]
    k1 = torch.expm1(diff.square_().mul_(-0.5 / sigma**2))
    return k1.sub_(k1.mean(dim=-1, keepdim=True))

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
