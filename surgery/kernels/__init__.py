"""Fused ops on hidden states, with a torch reference and optional Triton kernels.

One module per piece, as for every op:

- :mod:`~surgery.kernels.reference`: the plain torch version of each op (the specification, the
  CPU path and the test oracle);
- :mod:`~surgery.kernels.backend`: which implementation runs (:func:`kernel_backend`,
  :func:`triton_available`, the ``SURGERY_KERNELS`` variable, the dtypes Triton handles);
- one module per op with its checked dispatcher: :mod:`~surgery.kernels.masked_add`;
- one module per Triton kernel: :mod:`~surgery.kernels.triton_masked_add`. These import triton
  at top level, so the dispatchers import them lazily, once triton is known to be available.

This package only re-exports the public names.
"""

from .backend import TRITON_DTYPES, kernel_backend, triton_available
from .masked_add import masked_add

__all__ = ["TRITON_DTYPES", "kernel_backend", "masked_add", "triton_available"]
