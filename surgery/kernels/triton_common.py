"""What every Triton launcher here shares: the storage rounding and the launch checks.

This module imports triton at top level: only the ``triton_<op>`` modules import it, and the
dispatchers import those lazily, once triton is known to be available.

- :func:`to_storage`: a float32 value rounded to a storage dtype, round to nearest even (also
  for bfloat16 in the interpreter, whose plain cast truncates), so a kernel's result equals
  torch's bit for bit;
- :func:`is_interpreted`: whether triton runs in its interpreter (``TRITON_INTERPRET=1`` when
  triton was first imported), where kernels take CPU tensors;
- :func:`check_launch`: the dtype and device a launcher needs, with errors saying the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import no_type_check

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["check_launch", "is_interpreted", "to_storage"]


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def _f32_to_bf16_rtne(x):
    # float32 -> bfloat16, round to nearest even, done on the bits. The same code runs on GPUs
    # (where it matches the hardware conversion) and in the Triton interpreter, whose plain
    # float32 -> bfloat16 cast truncates instead of rounding.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x0040  # NaN in, NaN out (sign kept, quiet bit set)
    top = tl.where(x != x, quiet_nan, rounded)
    return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
@no_type_check  # keeps jaxtyping's import hook (active under pytest) off Triton code
def to_storage(x, dtype: tl.constexpr):
    # float32 -> storage dtype with round to nearest even.
    if dtype == tl.bfloat16:
        return _f32_to_bf16_rtne(x)
    else:
        return x.to(dtype)


def is_interpreted() -> bool:
    """True when triton's kernels are built by its interpreter (``TRITON_INTERPRET=1``)."""
    return type(to_storage).__name__ == "InterpretedFunction"


def check_launch(op: str, name: str, tensor: Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """Refuse a launch of ``op``'s kernel on ``tensor`` (the argument ``name``) of a dtype outside
    ``dtypes``, or on a CPU tensor outside the interpreter."""
    if tensor.dtype not in dtypes:
        raise ValueError(
            f"the Triton {op} kernel supports {[str(d) for d in dtypes]}, got {name}.dtype={tensor.dtype}; "
            "use backend='torch' for this dtype"
        )
    if not tensor.is_cuda and not is_interpreted():
        raise RuntimeError(
            f"the Triton {op} kernel needs CUDA tensors, got device {tensor.device}; move the tensors to a "
            "GPU, use backend='torch', or set TRITON_INTERPRET=1 before triton is first imported to run the "
            "kernel in the (slow) interpreter"
        )
