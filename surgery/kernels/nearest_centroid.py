"""``nearest_centroid``: K-means' assignment step (nearest center per point), checked and dispatched.

The inner loop of :func:`probes.kmeans.kmeans_torch`: for each point, the index of its nearest
center and the squared distance to it. :func:`nearest_centroid` checks its inputs (the errors
say how to fix them), then runs the torch reference
(:func:`surgery.kernels.reference.nearest_centroid`, which builds the ``[n, k]`` distance
matrix) or the Triton kernel (:mod:`surgery.kernels.triton_nearest_centroid`, which does not),
as :func:`~surgery.kernels.backend.kernel_backend` chooses.
"""

from __future__ import annotations

from torch import Tensor

from . import reference
from .backend import ENV_VAR, TRITON_DTYPES, kernel_backend, require_triton

__all__ = ["nearest_centroid"]

_BACKENDS = ("torch", "triton")


def _check_nearest_centroid_inputs(points: Tensor, centers: Tensor) -> None:
    for name, value in (("points", points), ("centers", centers)):
        if not isinstance(value, Tensor):
            raise TypeError(f"nearest_centroid: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 2:
            hint = f" Add the leading dim with {name}.unsqueeze(0)." if value.ndim == 1 else ""
            raise ValueError(
                f"nearest_centroid: {name} must be 2-D [{'n' if name == 'points' else 'k'}, d], got shape "
                f"{tuple(value.shape)}.{hint}"
            )
        if not value.is_floating_point():
            raise ValueError(
                f"nearest_centroid: {name} must have a floating dtype, got {value.dtype}; convert it "
                f"with {name}.float()"
            )
    if centers.shape[0] == 0:
        raise ValueError("nearest_centroid: centers is empty (k = 0): pass at least one center")
    if centers.shape[1] != points.shape[1]:
        raise ValueError(
            f"nearest_centroid: centers width {centers.shape[1]} does not match points width "
            f"d={points.shape[1]}; both must live in the same space (same layer, same model)"
        )
    if centers.device != points.device:
        raise ValueError(
            f"nearest_centroid: centers is on {centers.device} but points is on {points.device}; "
            "move it with centers.to(points.device)"
        )
    if centers.dtype != points.dtype:
        raise ValueError(
            f"nearest_centroid: centers dtype {centers.dtype} does not match points dtype "
            f"{points.dtype}; cast it with centers.to(points.dtype)"
        )


def nearest_centroid(points: Tensor, centers: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """For each point, the index of its nearest center and the squared distance to it.

    Checks the inputs, then runs :func:`surgery.kernels.reference.nearest_centroid` (torch) or
    the Triton kernel. Distances use the expanded form ``||x||² - 2 x·c + ||c||²`` clamped at 0,
    accumulated in float32 (float64 for float64 inputs, which always run in torch); ties go to
    the lowest center index. The two backends sum in different orders, so their distances agree
    to float32 rounding of ``||x||² + ||c||²``, and labels agree wherever the two nearest
    centers are further apart than that. NaN points get unspecified labels.

    Args:
        points: ``[n, d]``, float32, float64, bfloat16 or float16.
        centers: ``[k, d]``, ``k >= 1``, with ``points``' dtype and device.
        backend: ``"torch"``, ``"triton"``, or None to let :func:`kernel_backend` choose.
            ``"triton"`` also accepts CPU tensors when triton runs in its interpreter
            (``TRITON_INTERPRET=1`` set before triton is imported), which is how tests run it.

    Returns:
        ``(labels, sq_distances)``: int64 ``[n]``, and ``[n]`` float64 for float64 inputs,
        float32 otherwise, on ``points``' device.

    Raises:
        ValueError: Shapes, dtypes or devices do not fit (the message says what was expected
            and how to fix it), an unknown ``backend``, or a dtype the Triton kernel lacks.
        TypeError: An argument is not a tensor.
        RuntimeError: The Triton backend was requested but triton is not installed.

    Example:
        >>> import torch
        >>> points = torch.tensor([[0.0, 0.0], [4.0, 1.0], [9.0, 9.0]])
        >>> labels, sq_distances = nearest_centroid(points, torch.tensor([[0.0, 1.0], [5.0, 1.0]]))
        >>> labels, sq_distances
        (tensor([0, 1, 1]), tensor([ 1.,  1., 80.]))
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"nearest_centroid: backend must be 'torch', 'triton' or None, got {backend!r}")
    _check_nearest_centroid_inputs(points, centers)
    chosen = kernel_backend(points) if backend is None else backend
    if chosen == "torch":
        return reference.nearest_centroid(points, centers)
    require_triton()
    if points.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"nearest_centroid: the Triton kernel has no {points.dtype} version (it supports "
            f"{', '.join(str(d) for d in TRITON_DTYPES)}); use backend='torch' or {ENV_VAR}=auto"
        )
    # imported here, not at the top: that module imports triton, which may be absent
    from .triton_nearest_centroid import nearest_centroid_triton

    return nearest_centroid_triton(points, centers)
