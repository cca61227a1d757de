"""Fused ops on hidden states, with a torch reference and optional Triton kernels.

One module per piece, as for every op:

- :mod:`~surgery.kernels.reference`: the plain torch version of each op (the specification, the
  CPU path and the test oracle);
- :mod:`~surgery.kernels.backend`: which implementation runs (:func:`kernel_backend`,
  :func:`triton_available`, the ``SURGERY_KERNELS`` variable, the dtypes Triton handles);
- one module per op with its checked dispatcher: :mod:`~surgery.kernels.masked_add`;
- one module per Triton kernel: :mod:`~surgery.kernels.triton_masked_add`. These import triton
  at top level, so the dispatchers import them lazily, once triton is known to be available.

Also streaming segment-mean pooling (:mod:`~surgery.kernels.segment_mean_update`, the step
vectors of :class:`probes.ReasoningGraph`) and the centred Gaussian Gram matrix of nHSIC
(:mod:`~surgery.kernels.centred_gaussian_gram`, float64, used by :mod:`probes.hsic`), each with
its Triton kernel module (``triton_segment_mean_update``, ``triton_centred_gaussian_gram``).

This package only re-exports the public names.
"""

from .backend import TRITON_DTYPES, kernel_backend, triton_available
from .masked_add import masked_add

__all__ = ["TRITON_DTYPES", "kernel_backend", "masked_add", "triton_available"]

# Streaming segment-mean pooling and the centred Gaussian Gram matrix (nHSIC).
from .centred_gaussian_gram import centred_gaussian_gram  # noqa: E402
from .segment_mean_update import segment_mean_update  # noqa: E402

__all__ = sorted([*__all__, "centred_gaussian_gram", "segment_mean_update"])
