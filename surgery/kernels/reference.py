"""Plain torch reference ops: the specification, the CPU path and the test oracle for the kernels.

Every op here is written for clarity, not speed. The Triton kernels in this package must agree
with these functions (bit for bit where the arithmetic allows it); when in doubt about what a
kernel should do, this file is the answer.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["masked_add"]


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


# --- streaming segment-mean pooling and the centred Gaussian Gram matrix (nHSIC) ---------------

__all__ = sorted([*__all__, "centred_gaussian_gram", "segment_mean_update"])


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
