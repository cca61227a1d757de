"""``mask_logits``: penalise, forbid or force tokens in the logits in one pass, checked and dispatched.

The op behind :class:`interventions.TokenMask` (and forced tokens for a GPU engine): a
vocabulary mask and a per-row mask, gated per row, add a penalty or set ``-inf``; forced rows
become one-hot; and, from the same read of the logits, whether the mask hit each row's
would-be top token. :func:`mask_logits` checks its inputs (the errors say how to fix them),
then runs the torch reference (:func:`surgery.kernels.reference.mask_logits`) or the Triton
kernels (:mod:`surgery.kernels.triton_mask_logits`), as
:func:`~surgery.kernels.backend.kernel_backend` chooses.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import reference
from .backend import ENV_VAR, TRITON_DTYPES, kernel_backend, require_triton

__all__ = ["mask_logits"]

_BACKENDS = ("torch", "triton")


def _check_mask_logits_inputs(logits, vocab_mask, penalty, extra_mask, active, forced) -> None:
    named = (("logits", logits), ("vocab_mask", vocab_mask), ("extra_mask", extra_mask),
             ("active", active), ("forced", forced))
    if not isinstance(logits, Tensor):
        raise TypeError(f"mask_logits: logits must be a torch.Tensor, got {type(logits).__name__}")
    for name, value in named[1:]:
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"mask_logits: {name} must be a torch.Tensor or None, got {type(value).__name__}")
    if penalty is not None and (
        isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not -math.inf < penalty < math.inf
    ):
        raise TypeError(
            f"mask_logits: penalty must be a finite Python number, or None to forbid the masked "
            f"tokens (-inf), got {penalty!r}; for a 0-d tensor pass penalty.item()"
        )
    if logits.ndim not in (2, 3):
        raise ValueError(
            f"mask_logits: logits must be [batch, vocab] or [batch, pos, vocab], got shape "
            f"{tuple(logits.shape)}" + (". Add a batch dimension with logits.unsqueeze(0)." if logits.ndim == 1 else "")
        )
    if not logits.is_floating_point():
        raise ValueError(
            f"mask_logits: logits must have a floating dtype, got {logits.dtype}; convert it with logits.float()"
        )
    rows, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    if vocab == 0:
        raise ValueError(
            "mask_logits: logits has an empty vocabulary dimension (last dim 0): there is no token to pick"
        )
    expected = {"vocab_mask": (vocab,), "extra_mask": tuple(logits.shape), "active": rows, "forced": rows}
    meaning = {
        "vocab_mask": "one entry per vocabulary token (e.g. model.vocabulary_mask(words))",
        "extra_mask": "one entry per logit, shaped like logits",
        "active": "one entry per row of logits (its shape without the vocabulary dim)",
        "forced": "one token id per row of logits (its shape without the vocabulary dim), -1 for none",
    }
    for name, value in named[1:]:
        if value is None:
            continue
        if name == "forced":
            if value.dtype != torch.int64:
                raise ValueError(
                    f"mask_logits: forced must have dtype torch.int64 (token ids, -1 for none), got "
                    f"{value.dtype}; convert it with forced.long()"
                )
        elif value.dtype != torch.bool:
            raise ValueError(
                f"mask_logits: {name} must have dtype torch.bool, got {value.dtype}; convert it with "
                f"{name}.bool(), or build it with a comparison"
            )
        if tuple(value.shape) != expected[name]:
            raise ValueError(
                f"mask_logits: {name} shape {tuple(value.shape)} does not fit logits "
                f"{tuple(logits.shape)}: expected {expected[name]}, {meaning[name]}"
            )
        if value.device != logits.device:
            raise ValueError(
                f"mask_logits: {name} is on {value.device} but logits is on {logits.device}; "
                f"move it with {name}.to(logits.device)"
            )
    # the range check needs the values on the host: done only where that costs no GPU sync
    if forced is not None and not forced.is_cuda and forced.numel():
        low, high = int(forced.min()), int(forced.max())
        if low < -1 or high >= vocab:
            raise ValueError(
                f"mask_logits: forced holds token ids from {low} to {high}, outside [-1, {vocab}) "
                f"(-1: no forced token; else a token id below the vocabulary size {vocab})"
            )


def mask_logits(
    logits: Tensor,
    vocab_mask: Tensor | None = None,
    penalty: float | None = None,
    *,
    extra_mask: Tensor | None = None,
    active: Tensor | None = None,
    forced: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Penalise (or forbid) masked tokens, force tokens, and say whether each row's top was masked.

    Checks the inputs, then runs :func:`surgery.kernels.reference.mask_logits` (torch) or the
    Triton kernels. A token is masked in a row when it is in ``vocab_mask`` or in the row's
    ``extra_mask`` and the row is ``active``; masked logits become ``logit + penalty`` (the
    penalty rounded to ``logits``' dtype first, as torch does on the CPU) or ``-inf`` when
    ``penalty`` is None. A row with ``forced[row] = t >= 0`` becomes ``0`` at ``t`` and ``-inf``
    elsewhere, whatever the mask (its argmax and only sample are ``t``). Every other logit is
    copied bit for bit; ``logits`` is not modified.

    Args:
        logits: ``[batch, vocab]`` or ``[batch, pos, vocab]``, floating (the rows are all dims
            but the last).
        vocab_mask: Boolean ``[vocab]`` on ``logits``' device: tokens masked in every active
            row. None: no such tokens.
        penalty: A finite Python number added to masked logits; None forbids them (``-inf``).
        extra_mask: Boolean, shaped like ``logits``: tokens masked in one row only (e.g. the
            tokens that would complete a phrase). None: none.
        active: Boolean ``[*rows]``: rows where the mask applies (a trigger). None: all rows.
        forced: int64 ``[*rows]``: the token forced in each row, ``-1`` for none. None: none.
            Ids outside ``[-1, vocab)`` raise on CPU; on CUDA they are not checked (that would
            cost a host sync per decode step) and leave the row all ``-inf``.
        backend: ``"torch"``, ``"triton"``, or None to let :func:`kernel_backend` choose.
            ``"triton"`` also accepts CPU tensors when triton runs in its interpreter
            (``TRITON_INTERPRET=1`` set before triton is imported), which is how tests run it.

    Returns:
        ``(edited, top_masked)``: a new tensor shaped like ``logits`` (same dtype and device),
        and boolean ``[*rows]``: whether the mask (not the forcing) hit the argmax of the
        unedited logits (the first on ties; NaN counts as the largest, as :func:`torch.argmax`).

    Raises:
        ValueError: Shapes, dtypes, devices or forced ids do not fit (the message says what was
            expected and how to fix it), an unknown ``backend``, or a dtype the Triton kernel
            lacks.
        TypeError: An argument is not a tensor, or ``penalty`` is not a finite number.
        RuntimeError: The Triton backend was requested but triton is not installed.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 3.0, 2.0]])
        >>> banned = torch.tensor([False, True, False])
        >>> edited, top_masked = mask_logits(logits, banned, active=torch.tensor([True, True]))
        >>> edited
        tensor([[1., -inf, 2.],
                [4., -inf, 2.]])
        >>> top_masked
        tensor([ True, False])
        >>> mask_logits(logits, banned, -1.0, forced=torch.tensor([-1, 1]))[0]
        tensor([[1., 2., 2.],
                [-inf, 0., -inf]])
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"mask_logits: backend must be 'torch', 'triton' or None, got {backend!r}")
    _check_mask_logits_inputs(logits, vocab_mask, penalty, extra_mask, active, forced)
    penalty = None if penalty is None else float(penalty)
    chosen = kernel_backend(logits) if backend is None else backend
    if chosen == "torch":
        return reference.mask_logits(logits, vocab_mask, penalty, extra_mask, active, forced)
    require_triton()
    if logits.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"mask_logits: the Triton kernel has no {logits.dtype} version (it supports "
            f"{', '.join(str(d) for d in TRITON_DTYPES)}); use backend='torch' or {ENV_VAR}=auto"
        )
    # imported here, not at the top: that module imports triton, which may be absent
    from .triton_mask_logits import mask_logits_triton

    return mask_logits_triton(logits, vocab_mask, penalty, extra_mask, active, forced)
