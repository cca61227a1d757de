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
