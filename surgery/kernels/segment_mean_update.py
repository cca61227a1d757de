"""``segment_mean_update``: one decode step of streaming segment-mean pooling, checked and dispatched.

The op :class:`probes.ReasoningGraph` runs for every decoded token: add each row's new hidden
state into a running float32 sum and count, write the mean of the rows whose segment (reasoning
step) ended into a per-row buffer of step vectors, advance the step counters, clear the sums.
:func:`segment_mean_update` checks its inputs (the errors say how to fix them), then runs the
torch reference (:func:`surgery.kernels.reference.segment_mean_update`) or the Triton kernel
(:mod:`surgery.kernels.triton_segment_mean_update`), as
:func:`~surgery.kernels.backend.kernel_backend` chooses. Both update the state tensors in place
and never synchronise with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .backend import TRITON_X_DTYPES, kernel_backend, require_triton

__all__ = ["segment_mean_update"]

_BACKENDS = ("torch", "triton")
_NAME = "segment_mean_update"


def _check_segment_mean_update_inputs(
    x: Tensor,
    valid: Tensor,
    ended: Tensor,
    keep: Tensor,
    total: Tensor,
    count: Tensor,
    buffer: Tensor,
    n_steps: Tensor,
) -> None:
    named = (
        ("x", x), ("valid", valid), ("ended", ended), ("keep", keep),
        ("total", total), ("count", count), ("buffer", buffer), ("n_steps", n_steps),
    )  # fmt: skip
    for name, value in named:
        if not isinstance(value, Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if total.ndim != 2 or total.dtype != torch.float32:
        raise ValueError(
            f"{_NAME}: total (the running sums) must be a float32 [batch, d] tensor, got "
            f"{total.dtype} of shape {tuple(total.shape)}; create it with "
            "torch.zeros(batch, d, dtype=torch.float32)"
        )
    batch, d = total.shape
    if x.ndim != 2:
        hint = " Take the last position with hidden[:, -1]." if x.ndim == 3 else ""
        raise ValueError(f"{_NAME}: x must be 2-D [batch, d], got shape {tuple(x.shape)}.{hint}")
    if tuple(x.shape) != (batch, d):
        raise ValueError(
            f"{_NAME}: x shape {tuple(x.shape)} does not match total's [batch, d] = {(batch, d)}; "
            "the state must be created for this batch and this site's width"
        )
    if not x.is_floating_point():
        raise ValueError(f"{_NAME}: x must have a floating dtype, got {x.dtype}; convert it with x.float()")
    for name, flag in (("valid", valid), ("ended", ended), ("keep", keep)):
        if flag.dtype != torch.bool:
            raise ValueError(
                f"{_NAME}: {name} must have dtype torch.bool, got {flag.dtype}; convert it with "
                f"{name}.bool()"
            )
        if tuple(flag.shape) != (batch,):
            raise ValueError(
                f"{_NAME}: {name} must be [batch] = {(batch,)}, one flag per row, got shape "
                f"{tuple(flag.shape)}"
            )
    for name, counter in (("count", count), ("n_steps", n_steps)):
        if counter.dtype != torch.int64 or tuple(counter.shape) != (batch,):
            raise ValueError(
                f"{_NAME}: {name} must be an int64 [batch] = {(batch,)} tensor, got {counter.dtype} "
                f"of shape {tuple(counter.shape)}; create it with torch.zeros(batch, dtype=torch.long)"
            )
    if buffer.ndim != 3 or buffer.dtype != torch.float32 or buffer.shape[0] != batch or buffer.shape[2] != d:
        raise ValueError(
            f"{_NAME}: buffer must be a float32 [batch, capacity, d] tensor with batch={batch} and "
            f"d={d}, got {buffer.dtype} of shape {tuple(buffer.shape)}; create it with "
            "torch.zeros(batch, capacity, d)"
        )
    for name, value in named:
        if value.device != total.device:
            raise ValueError(
                f"{_NAME}: {name} is on {value.device} but total is on {total.device}; move it "
                f"with {name}.to(total.device)"
            )
    for name, state in (("total", total), ("count", count), ("buffer", buffer), ("n_steps", n_steps)):
        if not state.is_contiguous():
            raise ValueError(
                f"{_NAME}: {name} must be contiguous, since it is updated in place; keep the state "
                f"in a contiguous tensor ({name} = {name}.contiguous(), once, when it is created)"
            )


def segment_mean_update(
    x: Tensor,
    valid: Tensor,
    ended: Tensor,
    keep: Tensor,
    total: Tensor,
    count: Tensor,
    buffer: Tensor,
    n_steps: Tensor,
    *,
    backend: str | None = None,
) -> None:
    """One decode step of streaming segment-mean pooling, in place on the state tensors.

    Checks the inputs, then runs :func:`surgery.kernels.reference.segment_mean_update` (torch)
    or the Triton kernel (one launch, no host sync). Per row, in this order: where ``valid``,
    ``total += x`` (in float32) and ``count += 1``; where ``ended``,
    ``buffer[row, n_steps[row]] = total / max(count, 1)`` (the token that ends a segment
    belongs to it); where ``keep``, ``n_steps += 1``; where ``ended``, ``total`` and ``count``
    are cleared. ``total``, ``count``, ``buffer`` and ``n_steps`` are modified in place and
    nothing is returned; nothing else in ``buffer`` changes.

    ``n_steps[row]`` must be below ``capacity`` wherever ``ended``: grow the buffer beforehand
    (checking it here would cost a host sync). An ended row whose slot is past the end writes
    nothing, on both backends, rather than write out of bounds.

    Args:
        x: New hidden states ``[batch, d]``, any floating dtype (float16, bfloat16, float32 or
            float64 on the Triton backend), e.g. ``hidden[:, -1]`` (read through its stride).
        valid: Boolean ``[batch]``; False rows (padding, finished rows) add nothing.
        ended: Boolean ``[batch]``; True where this token ends the row's segment.
        keep: Boolean ``[batch]``; True where the step counter advances (a subset of ``ended``
            for segments worth keeping).
        total: Running sums, float32 ``[batch, d]``, contiguous; updated in place.
        count: Token counts, int64 ``[batch]``, contiguous; updated in place.
        buffer: Segment means, float32 ``[batch, capacity, d]``, contiguous; written in place.
        n_steps: Segments kept per row, int64 ``[batch]``, contiguous; updated in place.
        backend: ``"torch"``, ``"triton"``, or None to let :func:`kernel_backend` choose (from
            ``total``). ``"triton"`` also accepts CPU tensors when triton runs in its interpreter
            (``TRITON_INTERPRET=1`` set before triton is imported), which is how tests run it.

    Raises:
        ValueError: Shapes, dtypes, devices or contiguity do not fit (the message says what was
            expected and how to fix it), an unknown ``backend``, or an ``x`` dtype the Triton
            kernel lacks.
        TypeError: An argument is not a tensor.
        RuntimeError: The Triton backend was requested but triton is not installed.

    Example:
        >>> import torch
        >>> total, count = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
        >>> buffer, n_steps = torch.zeros(2, 8, 3), torch.zeros(2, dtype=torch.long)
        >>> valid = torch.tensor([True, True])
        >>> for k, ends in enumerate([[False, False], [True, False]]):
        ...     ended = torch.tensor(ends)
        ...     x = torch.full((2, 3), float(k))  # token 0 carries 0s, token 1 carries 1s
        ...     segment_mean_update(x, valid, ended, ended, total, count, buffer, n_steps)
        >>> buffer[0, 0], n_steps, count  # row 0's step: the mean of 0 and 1; row 1 still open
        (tensor([0.5000, 0.5000, 0.5000]), tensor([1, 0]), tensor([0, 2]))
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"{_NAME}: backend must be 'torch', 'triton' or None, got {backend!r}")
    _check_segment_mean_update_inputs(x, valid, ended, keep, total, count, buffer, n_steps)
    chosen = kernel_backend(total) if backend is None else backend
    if chosen == "torch":
        reference.segment_mean_update(x, valid, ended, keep, total, count, buffer, n_steps)
        return
    require_triton()
    # imported here, not at the top: that module imports triton, which may be absent
    from .triton_segment_mean_update import segment_mean_update_triton

    if x.dtype not in TRITON_X_DTYPES:
        raise ValueError(
            f"{_NAME}: the Triton kernel has no {x.dtype} version of x (it reads "
            f"{', '.join(str(t) for t in TRITON_X_DTYPES)}); use backend='torch' or convert x with x.float()"
        )
    segment_mean_update_triton(x, valid, ended, keep, total, count, buffer, n_steps)
