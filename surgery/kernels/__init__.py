"""Fused hot ops (on hidden states, logits and K-means points), with a torch reference and optional Triton kernels.

One module per piece, as for every op:

- :mod:`~surgery.kernels.reference`: the plain torch version of each op (the specification, the
  CPU path and the test oracle);
- :mod:`~surgery.kernels.backend`: which implementation runs (:func:`kernel_backend`,
  :func:`triton_available`, the ``SURGERY_KERNELS`` variable, the dtypes Triton handles);
- one module per op with its checked dispatcher: :mod:`~surgery.kernels.masked_add` (steering),
  :mod:`~surgery.kernels.mask_logits` (TokenMask), :mod:`~surgery.kernels.segment_mean_update`
  (ReasoningGraph's step pooling), :mod:`~surgery.kernels.centred_gaussian_gram` (nHSIC's
  centred kernel, float64), :mod:`~surgery.kernels.nearest_centroid` (K-means assignment);
- one module per Triton kernel, ``triton_<op>``, and :mod:`~surgery.kernels.triton_common`,
  what they share (storage rounding, launch checks). These import triton at top level, so the
  dispatchers import them lazily, once triton is known to be available.

This package only re-exports the public names.
"""

from .backend import TRITON_DTYPES, kernel_backend, triton_available
from .centred_gaussian_gram import centred_gaussian_gram
from .mask_logits import mask_logits
from .masked_add import masked_add
from .nearest_centroid import nearest_centroid
from .segment_mean_update import segment_mean_update

__all__ = [
    "TRITON_DTYPES",
    "centred_gaussian_gram",
    "kernel_backend",
    "mask_logits",
    "masked_add",
    "nearest_centroid",
    "segment_mean_update",
    "triton_available",
]
