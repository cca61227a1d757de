"""Time the torch reference against the dispatcher for the surgery.kernels ops.

Run: python benchmarks/bench_kernels.py [--dtype bfloat16] [--reps 30]

One table per op: masked_add (steering, in ``--dtype``), mask_logits (TokenMask, on float32
logits as the engine hands them), nearest_centroid (K-means' assignment, on float32 points
as kmeans_torch pools them), then segment_mean_update (ReasoningGraph's pooling per decode
step, hidden states in ``--dtype``) and centred_gaussian_gram (nHSIC's K H, float64). On a
CUDA machine with triton installed the dispatcher runs the Triton kernel, and each row also says what fraction of the device's copy bandwidth the
dispatcher reaches: the time of a plain ``Tensor.copy_`` moving the same bytes (inputs read +
outputs written), measured in the same run, over the dispatcher's time. The sizes then fill the
device (logits 128 x 151936, 200000 points x 1536 against 256 centers); on CPU they are smaller.
On CPU the dispatcher runs the reference too, so both columns time the same code; the Triton
interpreter is not timed, since its speed says nothing about the kernel's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from surgery.kernels import kernel_backend, mask_logits, masked_add, nearest_centroid, reference  # noqa: E402

SHAPES = [(8, 1, 576), (8, 256, 576), (8, 1, 1536), (8, 512, 1536)]  # masked_add, [batch, pos, d_model]
# mask_logits, [batch, vocab]: Qwen2's vocabulary (R1-Distill) on GPU, SmolLM2's on CPU
LOGITS_GPU = [(8, 151936), (128, 151936)]
LOGITS_CPU = [(8, 49152), (32, 49152)]
# nearest_centroid, (points, d, centers): the paper's K=200 and a wide model on GPU
POINTS_GPU = [(50000, 576, 200), (200000, 1536, 256)]
POINTS_CPU = [(4000, 64, 16), (20000, 576, 64)]


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


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Table:
    """Prints one op's rows: reference and dispatcher times, and on CUDA the copy bandwidth."""

    def __init__(self, title, args, cuda, device):
        self.args, self.cuda, self.device = args, cuda, device
        print(f"\n{title}")
        print(f"{'case':>34} {'MB moved':>9} {'reference us':>13} {'dispatcher us':>14} {'ratio':>7} "
              f"{'copy us':>9} {'of copy bw':>10}")

    def row(self, case, moved, reference_fn, dispatcher_fn):
        args = self.args
        ref = median_us(reference_fn, args.reps, args.inner, self.cuda)
        disp = median_us(dispatcher_fn, args.reps, args.inner, self.cuda)
        copy, share = "-", "-"
        if self.cuda:  # a copy of moved/2 bytes reads and writes `moved` bytes
            src = torch.empty(moved // 2, dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            copy_us = median_us(lambda: dst.copy_(src), args.reps, args.inner, True)
            copy, share = f"{copy_us:.1f}", f"{copy_us / disp:.0%}"
        print(f"{case:>34} {moved / 1e6:>9.1f} {ref:>13.1f} {disp:>14.1f} {ref / disp:>6.2f}x "
              f"{copy:>9} {share:>10}")


def bench_masked_add(args, cuda, device):
    dtype = getattr(torch, args.dtype)
    table = Table(f"masked_add ({args.dtype})", args, cuda, device)
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        vector = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
        mask = (torch.rand(shape[:2], generator=gen) < 0.5).to(device)
        moved = 2 * nbytes(hidden) + nbytes(mask, vector)
        table.row(str(shape), moved, lambda: reference.masked_add(hidden, mask, vector, 1.5),
                  lambda: masked_add(hidden, mask, vector, 1.5))


def bench_mask_logits(args, cuda, device):
    table = Table("mask_logits (float32)", args, cuda, device)
    for shape in LOGITS_GPU if cuda else LOGITS_CPU:
        gen = torch.Generator().manual_seed(0)
        logits = (3 * torch.randn(shape, generator=gen)).to(device)
        banned = (torch.rand(shape[1], generator=gen) < 0.01).to(device)
        active = (torch.rand(shape[0], generator=gen) < 0.5).to(device)
        extra = (torch.rand(shape, generator=gen) < 0.001).to(device)
        forced = torch.where(torch.rand(shape[0], generator=gen) < 0.25, 7, -1).to(device)
        cases = [  # SEAL's penalty on vocabulary entries; a hard mask with phrases and forcing
            ("penalty", dict(penalty=-3.0, active=active)),
            ("-inf, phrases, forced", dict(penalty=None, active=active, extra_mask=extra, forced=forced)),
        ]
        for name, options in cases:
            inputs = [value for value in options.values() if isinstance(value, torch.Tensor)]
            moved = 2 * nbytes(logits) + nbytes(banned, *inputs) + shape[0]  # + one bool out per row
            table.row(f"{shape} {name}", moved, lambda: reference.mask_logits(logits, banned, **options),
                      lambda: mask_logits(logits, banned, **options))


def bench_nearest_centroid(args, cuda, device):
    table = Table("nearest_centroid (float32)", args, cuda, device)
    for n, d, k in POINTS_GPU if cuda else POINTS_CPU:
        gen = torch.Generator().manual_seed(0)
        points = torch.randn(n, d, generator=gen).to(device)
        centers = torch.randn(k, d, generator=gen).to(device)
        moved = nbytes(points, centers) + n * (8 + 4)  # int64 labels and float32 distances out
        table.row(f"{n} x {d} vs {k}", moved, lambda: reference.nearest_centroid(points, centers),
                  lambda: nearest_centroid(points, centers))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="masked_add's dtype (the other ops run in the dtype of their call sites)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repetition")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = kernel_backend(torch.empty(0, device=device, dtype=torch.float32))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device={device} ({name}) dispatcher backend={backend} median of {args.reps} x {args.inner} calls")
    if backend != "triton":
        print("note: the dispatcher runs the torch reference here, so torch is timed against torch; the "
              "Triton rows need a GPU with triton installed (the interpreter is not timed).")
    bench_masked_add(args, cuda, device)
    bench_mask_logits(args, cuda, device)
    bench_nearest_centroid(args, cuda, device)
    bench_pooling_and_gram(getattr(torch, args.dtype), args.reps, args.inner, device)
    print("\nratio = reference time / dispatcher time (above 1: the dispatcher is faster); MB moved = "
          "inputs read + outputs written; of copy bw = (copy_ time for those bytes) / dispatcher time")


# --- segment_mean_update (ReasoningGraph's pooling) and centred_gaussian_gram (nHSIC's K H) -----

# (batch, d, capacity) per decode step; GPU sizes fill the device, CPU ones stay quick
POOL_SHAPES = {"cuda": [(8, 1536, 256), (128, 1536, 256)], "cpu": [(8, 576, 64), (8, 1536, 64)]}
# (batch, d): nHSIC's per-token K H in float64 (d x d per row)
GRAM_SHAPES = {"cuda": [(8, 576), (128, 1536)], "cpu": [(4, 256), (8, 576)]}


def copy_us(n_bytes, reps, inner, device):
    """Median time of a plain copy_ that reads and writes n_bytes in all (n_bytes / 2 each way)."""
    src = torch.empty(max(n_bytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_us(lambda: dst.copy_(src), reps, inner, device.type == "cuda")


def print_row(label, ref, disp, n_bytes, copy):
    fraction = f"{copy / disp:>9.2f}" if copy is not None else f"{'-':>9}"
    print(f"{label:>22} {ref:>13.1f} {disp:>14.1f} {ref / disp:>6.2f}x {n_bytes / 1e6:>9.2f} {fraction}")


def bench_pooling_and_gram(dtype, reps, inner, device):
    """Rows for segment_mean_update and centred_gaussian_gram: reference vs dispatcher, and on
    CUDA the fraction of the device's copy bandwidth the dispatcher reaches (bytes = inputs read
    + outputs written; a copy_ of the same bytes timed in the same run)."""
    from surgery.kernels import centred_gaussian_gram, segment_mean_update

    cuda = device.type == "cuda"
    size = "cuda" if cuda else "cpu"
    print()
    print(f"{'op / shape':>22} {'reference us':>13} {'dispatcher us':>14} {'ratio':>7} {'MB moved':>9} "
          f"{'of copy bw':>9}")
    pool_backend = kernel_backend(torch.empty(0, device=device))
    for batch, d, capacity in POOL_SHAPES[size]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, d, generator=gen).to(device=device, dtype=dtype)
        valid = torch.ones(batch, dtype=torch.bool, device=device)
        ended = (torch.rand(batch, generator=gen) < 1 / 8).to(device)  # ~a step per 8 tokens
        keep = torch.zeros_like(ended)  # counters stay put: every call writes the same slots
        state = (torch.zeros(batch, d, device=device), torch.zeros(batch, dtype=torch.long, device=device),
                 torch.zeros(batch, capacity, d, device=device), torch.zeros(batch, dtype=torch.long, device=device))
        ref = median_us(lambda: reference.segment_mean_update(x, valid, ended, keep, *state), reps, inner, cuda)
        disp = median_us(lambda: segment_mean_update(x, valid, ended, keep, *state), reps, inner, cuda)
        # x and the sums read, the sums and the ended rows' means written, flags and counters
        n_bytes = x.numel() * x.element_size() + 2 * batch * d * 4 + int(ended.sum()) * d * 4 + batch * (3 + 32)
        copy = copy_us(n_bytes, reps, inner, device) if cuda else None
        print_row(f"pool {batch}x{d} cap {capacity}", ref, disp, n_bytes, copy)
    gram_backend = None
    for batch, d in GRAM_SHAPES[size]:
        v = (30 * torch.randn(batch, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).to(device)
        gram_backend = kernel_backend(v, dtypes=(torch.float64,))
        gram_inner = max(1, inner // 5) if cuda else 1  # each call writes batch * d² float64
        ref = median_us(lambda: reference.centred_gaussian_gram(v, 50.0), reps, gram_inner, cuda)
        disp = median_us(lambda: centred_gaussian_gram(v, 50.0), reps, gram_inner, cuda)
        n_bytes = batch * d * 8 + batch * d * d * 8
        copy = copy_us(n_bytes, reps, gram_inner, device) if cuda else None
        print_row(f"gram f64 {batch}x{d}", ref, disp, n_bytes, copy)
    print(f"dispatcher backends: pool {pool_backend}, gram {gram_backend}; 'of copy bw' = copy_ time "
          "of the same bytes / dispatcher time (CUDA only)")
    if "triton" not in (pool_backend, gram_backend):
        print("note: no Triton here, so both columns time the torch reference (the dispatcher adds "
              "only its input checks); the kernels need a GPU with triton installed.")


if __name__ == "__main__":
    main()
