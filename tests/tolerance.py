"""The suite's one tolerance policy for float comparisons.

Two computations of the same float quantity that may round differently (a row alone and in a
padded batch, a cached decode step and one uncached forward, a kernel and its torch reference,
a fast formula and the literal one) agree when, element by element,

    |actual - expected| <= rtol * |expected| + rtol * scale

where ``rtol`` is set by the precision of the computation (:data:`RTOL`) and ``scale`` is the
magnitude of what is compared: the largest ``|expected|`` of the tensor (or of the scalar), so
that an element near zero in a tensor of states of magnitude 10 is held to the same absolute
error as its neighbours. The precision is the compared values' dtype, unless the values were
computed in a wider dtype from narrower inputs (float64 MI values from float32 hidden states):
then pass the narrowest dtype of the chain as ``precision``. Where ``expected`` is exactly zero
everywhere, pass ``scale`` (the magnitude of the inputs).

A method-specific approximation (a truncated low-rank factorisation, K-means restarts) may pass
its own ``rtol``, with a comment that says why. Integers, booleans, tokens, masks and positions
are compared exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = ["RTOL", "assert_close", "close"]

RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}
"""Relative tolerance by the precision of the computation (see the module docstring)."""


def _rtol(precision, rtol):
    if rtol is not None:
        return rtol
    if precision not in RTOL:
        raise TypeError(f"no tolerance for {precision}: floats are compared in {sorted(map(str, RTOL))}")
    return RTOL[precision]


def assert_close(actual, expected, *, precision: torch.dtype | None = None, rtol: float | None = None,
                 scale: float | None = None, path: str = "value") -> None:
    """Assert ``actual`` equals ``expected`` under the policy; lists, tuples, dicts and
    dataclasses are compared element by element, non-floats exactly."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
        if not expected.is_floating_point():
            assert torch.equal(actual.cpu(), expected.cpu()), f"{path}: {actual} != {expected}"
            return
        tol = _rtol(precision or expected.dtype, rtol)
        magnitude = scale if scale is not None else (float(expected.abs().max()) if expected.numel() else 0.0)
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol * magnitude,
                                   msg=lambda m: f"{path}: {m} (tolerance policy: rtol {tol}, scale {magnitude:.3g})")
        return
    if isinstance(expected, np.ndarray):
        assert_close(torch.from_numpy(np.asarray(actual)), torch.from_numpy(expected), precision=precision,
                     rtol=rtol, scale=scale, path=path)
        return
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        for f in dataclasses.fields(expected):
            assert_close(getattr(actual, f.name), getattr(expected, f.name), precision=precision, rtol=rtol,
                         scale=scale, path=f"{path}.{f.name}")
        return
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, precision=precision, rtol=rtol, scale=scale, path=f"{path}[{i}]")
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{path}: keys {actual!r} != {expected!r}"
        for key in expected:
            assert_close(actual[key], expected[key], precision=precision, rtol=rtol, scale=scale, path=f"{path}[{key!r}]")
        return
    if isinstance(expected, float) and not isinstance(actual, bool):
        assert close(actual, expected, precision=precision, rtol=rtol, scale=scale), (
            f"{path}: {actual!r} != {expected!r} (tolerance policy: rtol {_rtol(precision or torch.float64, rtol)})"
        )
        return
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def close(actual: float, expected: float, *, precision: torch.dtype | None = None, rtol: float | None = None,
          scale: float | None = None) -> bool:
    """Whether two numbers agree under the policy (precision float64 unless given)."""
    tol = _rtol(precision or torch.float64, rtol)
    if math.isnan(expected):
        return math.isnan(actual)
    magnitude = abs(expected) if scale is None else scale
    return abs(actual - expected) <= tol * abs(expected) + tol * magnitude
