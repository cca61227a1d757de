"""Time the torch reference against the dispatcher for surgery.kernels.masked_add.

Run: python benchmarks/bench_kernels.py [--dtype bfloat16] [--reps 30]

On a CUDA machine with triton installed the dispatcher runs the Triton kernel. On CPU the
dispatcher runs the reference too, so both rows time the same code; the Triton interpreter is
not timed, since its speed says nothing about the kernel's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from surgery.kernels import kernel_backend, masked_add, reference  # noqa: E402

SHAPES = [(8, 1, 576), (8, 256, 576), (8, 1, 1536), (8, 512, 1536)]


def median_us(fn, reps, inner, cuda):
    """Median over `reps` of the mean time of `inner` back-to-back calls, in microseconds."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repetition")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    backend = kernel_backend(torch.empty(0, device=device, dtype=dtype))
    print(f"device={device} dtype={args.dtype} dispatcher backend={backend} "
          f"median of {args.reps} x {args.inner} calls")
    if backend != "triton":
        print("note: the dispatcher runs the torch reference here; the Triton row needs a GPU "
              "with triton installed (the interpreter is not timed).")

    print(f"{'shape':>16} {'reference us':>13} {'dispatcher us':>14} {'ratio':>7}")
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        vector = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
        mask = (torch.rand(shape[:2], generator=gen) < 0.5).to(device)
        ref = median_us(lambda: reference.masked_add(hidden, mask, vector, 1.5), args.reps,
                        args.inner, cuda)
        disp = median_us(lambda: masked_add(hidden, mask, vector, 1.5), args.reps, args.inner,
                         cuda)
        print(f"{str(shape):>16} {ref:>13.1f} {disp:>14.1f} {ref / disp:>6.2f}x")
    print("ratio = reference time / dispatcher time (above 1: the dispatcher is faster)")


if __name__ == "__main__":
    main()
