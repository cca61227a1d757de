"""``centred_gaussian_gram``: the right-centred Gaussian Gram matrix of nHSIC, checked and dispatched.

For each row ``v`` of its input, ``K H`` with ``K[i, j] = exp(-(v_i - v_j)² / (2σ²))`` and
``H = I - 11ᵀ/d``, computed as ``expm1(...)`` minus its row means, in float64: the matrix
:func:`probes.hsic.nhsic` builds for the answer side of every problem and, when the low-rank
path does not apply, for every token. :func:`centred_gaussian_gram` checks its inputs (the
errors say how to fix them), then runs the torch reference
(:func:`surgery.kernels.reference.centred_gaussian_gram`) or the Triton kernel
(:mod:`surgery.kernels.triton_centred_gaussian_gram`), as
:func:`~surgery.kernels.backend.kernel_backend` chooses; unlike the other ops, a float64 input
(what nHSIC passes) has a Triton kernel too (:data:`~surgery.kernels.backend.TRITON_V_DTYPES`).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import reference
from .backend import TRITON_V_DTYPES, kernel_backend, require_triton

__all__ = ["centred_gaussian_gram"]

_BACKENDS = ("torch", "triton")
_NAME = "centred_gaussian_gram"


def _check_centred_gaussian_gram_inputs(v: Tensor, sigma: float) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{_NAME}: v must be a torch.Tensor, got {type(v).__name__}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(
            f"{_NAME}: sigma must be a Python number, got {type(sigma).__name__}; for a 0-d "
            "tensor pass sigma.item()"
        )
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{_NAME}: sigma must be a positive finite bandwidth, got {sigma!r} (the paper uses 50)")
    if v.ndim == 0:
        raise ValueError(f"{_NAME}: v must have at least one dimension [..., d], got a 0-d tensor; use v.reshape(1)")
    if not v.is_floating_point():
        raise ValueError(f"{_NAME}: v must have a floating dtype, got {v.dtype}; convert it with v.double()")


def centred_gaussian_gram(v: Tensor, sigma: float, *, backend: str | None = None) -> Tensor:
    """Right-centred Gaussian Gram matrix ``K H`` over the coordinates of each row of ``v``, float64.

    Checks the inputs, then runs :func:`surgery.kernels.reference.centred_gaussian_gram` (torch)
    or the Triton kernel (one launch). Each row's ``d`` coordinates are ``d`` scalar samples;
    ``K[i, j] = exp(-(v_i - v_j)² / (2σ²))``, ``H = I - 11ᵀ/d``, and the result is
    ``expm1(-(v_i - v_j)² / (2σ²))`` minus its row means (``K H = (K - 1) H``; ``expm1`` keeps
    the small entries next to 1). ``v`` is read exactly in float64 and the result is float64
    whatever its dtype: the nHSIC solve is too ill-conditioned for float32 (see
    :mod:`probes.hsic`). The two backends agree to float64 rounding (a few ulps of the largest
    entry), not bit for bit: their ``expm1`` and row sums round differently.

    Args:
        v: ``[..., d]`` with a floating dtype; leading dimensions are a batch.
        sigma: The kernel bandwidth σ > 0 (a Python number).
        backend: ``"torch"``, ``"triton"``, or None to let :func:`kernel_backend` choose (Triton
            for CUDA tensors of a dtype in :data:`TRITON_V_DTYPES` when triton is installed).
            ``"triton"`` also accepts CPU tensors when triton runs in its interpreter
            (``TRITON_INTERPRET=1`` set before triton is imported), which is how tests run it.

    Returns:
        A new float64 tensor ``[..., d, d]`` on ``v``'s device.

    Raises:
        ValueError: ``v`` is 0-d or not floating, ``sigma`` is not positive and finite, an
            unknown ``backend``, or a dtype the Triton kernel lacks.
        TypeError: ``v`` is not a tensor, or ``sigma`` is not a number.
        RuntimeError: The Triton backend was requested but triton is not installed.

    Example:
        >>> import torch
        >>> gram = centred_gaussian_gram(torch.tensor([[0.0, 1.0, 5.0], [2.0, 2.0, 2.0]]), 2.0)
        >>> gram.shape, gram.dtype
        (torch.Size([2, 3, 3]), torch.float64)
        >>> bool(gram.sum(-1).abs().max() < 1e-15), bool((gram[1] == 0).all())  # centred rows
        (True, True)
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"{_NAME}: backend must be 'torch', 'triton' or None, got {backend!r}")
    _check_centred_gaussian_gram_inputs(v, sigma)
    sigma = float(sigma)
    chosen = kernel_backend(v, dtypes=TRITON_V_DTYPES) if backend is None else backend
    if chosen == "torch":
        return reference.centred_gaussian_gram(v, sigma)
    require_triton()
    if v.dtype not in TRITON_V_DTYPES:
        raise ValueError(
            f"{_NAME}: the Triton kernel has no {v.dtype} version (it reads "
            f"{', '.join(str(t) for t in TRITON_V_DTYPES)}); use backend='torch' or convert v with v.double()"
        )
    # imported here, not at the top: that module imports triton, which may be absent
    from .triton_centred_gaussian_gram import centred_gaussian_gram_triton

    return centred_gaussian_gram_triton(v, sigma)
