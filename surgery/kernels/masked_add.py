"""``masked_add``: add a vector to hidden states where a mask is True, checked and dispatched.

The op every steering block uses: ``hidden + alpha * vector`` at the selected positions, a bit
for bit copy elsewhere. :func:`masked_add` checks its inputs (the errors say how to fix them),
then runs the torch reference (:func:`surgery.kernels.reference.masked_add`) or the Triton
kernel (:mod:`surgery.kernels.triton_masked_add`), as :func:`~surgery.kernels.backend.kernel_backend`
chooses.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import reference
from .backend import ENV_VAR, TRITON_DTYPES, kernel_backend, require_triton

__all__ = ["masked_add"]

_BACKENDS = ("torch", "triton")


def _check_masked_add_inputs(hidden: Tensor, mask: Tensor, vector: Tensor, alpha: float) -> None:
    for name, value in (("hidden", hidden), ("mask", mask), ("vector", vector)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"masked_add: {name} must be a torch.Tensor, got {type(value).__name__}"
            )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"masked_add: alpha must be a Python number, got {type(alpha).__name__}; "
            "for a 0-d tensor pass alpha.item()"
        )
    if hidden.ndim != 3:
        hint = " Add a batch dimension with hidden.unsqueeze(0)." if hidden.ndim == 2 else ""
        raise ValueError(
            f"masked_add: hidden must be 3-D [batch, pos, d_model], got shape "
            f"{tuple(hidden.shape)}.{hint}"
        )
    if not hidden.is_floating_point():
        raise ValueError(
            f"masked_add: hidden must have a floating dtype, got {hidden.dtype}; "
            "convert it with hidden.float() (or .to(torch.bfloat16) etc.)"
        )
    batch, pos, d_model = hidden.shape
    if mask.dtype != torch.bool:
        raise ValueError(
            f"masked_add: mask must have dtype torch.bool, got {mask.dtype}; convert it with "
            "mask.bool() (e.g. an attention mask of 0/1 integers), or build it with a comparison "
            "such as token_ids == token_id"
        )
    if tuple(mask.shape) != (batch, pos):
        raise ValueError(
            f"masked_add: mask shape {tuple(mask.shape)} does not match hidden's first two dims "
            f"[batch, pos] = {(batch, pos)}; the mask needs one entry per (batch, position) of "
            f"hidden (hidden is {tuple(hidden.shape)})"
        )
    if vector.ndim not in (1, 2):
        hint = ""
        if vector.numel() == d_model:
            hint = " Remove the extra dims with vector.reshape(-1)."
        raise ValueError(
            f"masked_add: vector must be [d_model] (one for every row) or [batch, d_model] (one per "
            f"row), got shape {tuple(vector.shape)}.{hint}"
        )
    if vector.shape[-1] != d_model:
        raise ValueError(
            f"masked_add: vector width {vector.shape[-1]} does not match hidden's last dim "
            f"d_model={d_model}; the vector must live in the same residual stream as hidden "
            "(same model, same hidden size)"
        )
    if vector.ndim == 2 and vector.shape[0] != batch:
        hint = " For one vector on every row, remove the extra dim with vector.reshape(-1)." if len(vector) == 1 else ""
        raise ValueError(
            f"masked_add: a per-row vector needs one row per batch row, got {vector.shape[0]} rows for a "
            f"batch of {batch}.{hint}"
        )
    for name, value in (("mask", mask), ("vector", vector)):
        if value.device != hidden.device:
            raise ValueError(
                f"masked_add: {name} is on {value.device} but hidden is on {hidden.device}; "
                f"move it with {name}.to(hidden.device)"
            )
    if vector.dtype != hidden.dtype:
        raise ValueError(
            f"masked_add: vector dtype {vector.dtype} does not match hidden dtype {hidden.dtype}; "
            "cast it with vector.to(hidden.dtype)"
        )


def masked_add(
    hidden: Tensor,
    mask: Tensor,
    vector: Tensor,
    alpha: float = 1.0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Add ``alpha * vector`` to ``hidden`` at the positions where ``mask`` is True.

    Checks the inputs, then runs :func:`surgery.kernels.reference.masked_add` (torch) or the
    Triton kernel. Masked positions hold ``hidden + (alpha * vector)``, with ``alpha * vector``
    rounded to ``hidden``'s dtype first; other positions are copied bit for bit. ``hidden`` is
    not modified: the result is a new tensor.

    Args:
        hidden: Hidden states ``[batch, pos, d_model]`` with a floating dtype.
        mask: Boolean ``[batch, pos]`` on ``hidden``'s device; True where to add.
        vector: ``[d_model]``, or ``[batch, d_model]`` (one vector per row: a per-row
            parameter table, :mod:`surgery.decode.row_tables`), with ``hidden``'s dtype and device.
        alpha: Scale applied to ``vector`` (a Python number).
        backend: ``"torch"``, ``"triton"``, or None to let :func:`kernel_backend` choose.
            ``"triton"`` also accepts CPU tensors when triton runs in its interpreter
            (``TRITON_INTERPRET=1`` set before triton is imported), which is how tests run it.

    Returns:
        A new tensor shaped like ``hidden``, same dtype and device.

    Raises:
        ValueError: Shapes, dtypes or devices do not fit (the message says what was expected
            and how to fix it), an unknown ``backend``, or a dtype the Triton kernel lacks.
        TypeError: An argument is not a tensor, or ``alpha`` is not a number.
        RuntimeError: The Triton backend was requested but triton is not installed.

    Example:
        >>> import torch
        >>> hidden = torch.zeros(2, 2, 3)
        >>> mask = torch.tensor([[True, False], [False, True]])
        >>> out = masked_add(hidden, mask, torch.ones(3), alpha=0.5)
        >>> out[:, :, 0]
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
        >>> masked_add(hidden, mask, torch.tensor([[1.0, 1, 1], [2, 2, 2]]))[:, :, 0]  # one vector per row
        tensor([[1., 0.],
                [0., 2.]])
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"masked_add: backend must be 'torch', 'triton' or None, got {backend!r}")
    _check_masked_add_inputs(hidden, mask, vector, alpha)
    alpha = float(alpha)
    chosen = kernel_backend(hidden) if backend is None else backend
    if chosen == "torch":
        return reference.masked_add(hidden, mask, vector, alpha)
    require_triton()
    if hidden.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"masked_add: the Triton kernel has no {hidden.dtype} version (it supports "
            f"{', '.join(str(d) for d in TRITON_DTYPES)}); use backend='torch' or "
            f"{ENV_VAR}=auto"
        )
    # imported here, not at the top: that module imports triton, which may be absent
    from .triton_masked_add import masked_add_triton

    return masked_add_triton(hidden, mask, vector, alpha)
