"""Which implementation of a kernel op runs: the torch reference or a Triton kernel.

Triton is chosen for CUDA tensors of a dtype the Triton kernels handle (:data:`TRITON_DTYPES`)
when triton is installed; torch otherwise. The environment variable ``SURGERY_KERNELS``
overrides the choice at each call: ``torch`` always uses torch, ``triton`` always uses Triton,
and ``auto`` (or unset / empty) picks as above. Nothing here imports triton except
:func:`triton_available`, which only tries to.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR", "TRITON_DTYPES", "TRITON_V_DTYPES", "TRITON_X_DTYPES", "kernel_backend", "require_triton", "triton_available",
]

#: The environment variable that overrides the backend choice.
ENV_VAR = "SURGERY_KERNELS"
_ALLOWED_ENV_VALUES = ("", "auto", "torch", "triton")

#: Storage dtypes the Triton kernels handle (their arithmetic is done in float32).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Two ops read float64 too. Their dtypes live here, not in their dispatchers, because the Triton
# modules check them at launch and the dispatchers import the Triton modules (lazily): the other
# way round would be an import circle.

#: Input dtypes the Triton kernel of :mod:`~surgery.kernels.centred_gaussian_gram` reads; the
#: result is float64 for all of them.
TRITON_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Dtypes of the new hidden state ``x`` the Triton kernel of
#: :mod:`~surgery.kernels.segment_mean_update` reads (it accumulates in float32).
TRITON_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported. The answer is computed once and cached.

    Returns:
        True if ``import triton`` succeeds, else False.

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _env_choice() -> str:
    value = os.environ.get(ENV_VAR, "")
    if value not in _ALLOWED_ENV_VALUES:
        allowed = ", ".join(repr(v) for v in _ALLOWED_ENV_VALUES)
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a valid value; allowed values are {allowed} "
            f"('' and 'auto' pick Triton for CUDA tensors when triton is installed). "
            f"Fix the variable or unset it."
        )
    return value


def require_triton() -> None:
    """Raise a RuntimeError that says how to proceed when triton cannot be imported.

    Raises:
        RuntimeError: triton is not installed (or fails to import).
    """
    if not triton_available():
        raise RuntimeError(
            "the Triton backend was requested but triton cannot be imported; install it "
            f"(pip install triton), use backend='torch', or set {ENV_VAR}=torch or auto"
        )


def kernel_backend(tensor: Tensor, *, dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES) -> str:
    """Name the backend that the kernel ops use for ``tensor``.

    ``SURGERY_KERNELS`` is read at each call. ``torch`` forces torch and ``triton`` forces
    Triton. Otherwise (unset, ``""`` or ``auto``) the answer is ``"torch"`` when triton is not
    installed, when ``tensor`` is not on a CUDA device, or when its dtype has no Triton kernel
    (only those in ``dtypes`` do), and ``"triton"`` otherwise. Inside code that
    ``torch.compile`` is tracing (a compiled decode step), ``auto`` picks ``"torch"``: the
    compiler fuses the reference's ops into its own kernels with the rest of the step.

    Args:
        tensor: The tensor the op will run on (for ``masked_add``, ``hidden``).
        dtypes: The dtypes the op's Triton kernel handles: :data:`TRITON_DTYPES` unless the op
            says otherwise (the nHSIC Gram matrix also takes float64).

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: ``SURGERY_KERNELS`` has a value other than ``""``, ``"auto"``, ``"torch"``
            or ``"triton"``.
        RuntimeError: ``SURGERY_KERNELS=triton`` but triton is not installed.

    Example:
        >>> import torch
        >>> kernel_backend(torch.zeros(2, 3))  # a CPU tensor
        'torch'
    """
    choice = _env_choice()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        require_triton()
        return "triton"
    if torch.compiler.is_compiling():
        return "torch"
    if not triton_available() or not tensor.is_cuda or tensor.dtype not in dtypes:
        return "torch"
    return "triton"
