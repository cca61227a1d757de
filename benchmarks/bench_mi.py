"""Tokens per second of the batched nHSIC estimator vs per-token Python loops, side by side.

Run: python benchmarks/bench_mi.py [--dims 576 1536] [--tokens 8 4] [--reps 3] [--device cpu]

Random vectors (scale 30, like residual streams), no model. All rows use float64, the dtype the
probe computes in (float32 is off by 1e-2..1e-1 relative, see probes/hsic.py). Rows, each timed
``--reps`` times in interleaved order after one warm-up, median reported:

  batched           probes.hsic: Ry computed once and kept as a truncated SVD (rank r); each
                    token's Kx factored by a batched pivoted Cholesky (rank q, ~24 on real
                    SmolLM2 states) and the trace taken through the push-through identity:
                    O(d·q² + d·q·r + q³) per token; an exact batched LU when q would be large
  loop_cached_ry    a Python loop over tokens of the literal formula with Ry computed once:
                    Rx = K̃x · inv(K̃x + εmI), tr(Rx · Ry)  (≈ 6.7·d³ per token)
  loop_as_released  the same loop recomputing Ry for every token, as the released code does
                    (≈ 12·d³ per token)

The script checks that all three agree (warns above 1e-6 relative) before timing and prints ratios
batched / loop (> 1 means the batched estimator is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from probes.hsic import _answer_factors, _nhsic_given_factors, _ratio_matrix  # noqa: E402


def loop_formula(x: torch.Tensor, y: torch.Tensor, sigma: float, epsilon: float, ry=None) -> torch.Tensor:
    """The paper's formula one token at a time (explicit H, exp, inv, matmuls), float64."""
    m = x.shape[-1]
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    H = eye - 1.0 / m

    def ratio(v):
        kt = torch.exp(-((v[:, None] - v[None, :]) ** 2) / (2 * sigma**2)) @ H
        return kt @ torch.linalg.inv(kt + epsilon * m * eye)

    out = []
    for xi in x:
        r_y = ratio(y) if ry is None else ry
        out.append(torch.trace(ratio(xi) @ r_y))
    return torch.stack(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 4], help="tokens per measurement, per dim")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sigma", type=float, default=50.0)
    parser.add_argument("--epsilon", type=float, default=1e-5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} dtype=float64 reps={args.reps} (median)")
    print(f"{'d':>6} {'tokens':>6} {'batched tok/s':>14} {'loop_cached_ry':>15} {'loop_as_released':>17} "
          f"{'x cached':>9} {'x released':>11}")
    for d, n in zip(args.dims, args.tokens):
        g = torch.Generator().manual_seed(d)
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 30).to(device)
        y = (torch.randn(d, generator=g, dtype=torch.float64) * 30).to(device)
        s, e = args.sigma, args.epsilon
        ry = _ratio_matrix(y, s, e)
        factors = _answer_factors(y, s, e)
        runs = {
            "batched": lambda: _nhsic_given_factors(x, *factors, s, e),
            "loop_cached_ry": lambda: loop_formula(x, y, s, e, ry=ry),
            "loop_as_released": lambda: loop_formula(x, y, s, e),
        }
        results = {name: fn() for name, fn in runs.items()}  # warm-up and agreement check
        for name, got in results.items():
            worst = float(((got - results["batched"]) / results["batched"]).abs().max())
            if not worst < 1e-6:
                print(f"WARNING d={d}: {name} differs from batched by {worst:.2e} relative", file=sys.stderr)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, fn in runs.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        rate = {name: n / statistics.median(t) for name, t in times.items()}
        print(f"{d:>6} {n:>6} {rate['batched']:>14.2f} {rate['loop_cached_ry']:>15.2f} {rate['loop_as_released']:>17.2f} "
              f"{rate['batched'] / rate['loop_cached_ry']:>8.1f}x {rate['batched'] / rate['loop_as_released']:>10.1f}x")


if __name__ == "__main__":
    main()
