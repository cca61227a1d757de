"""ReasoningGraph: memory of the streaming step pooling vs keeping every hidden state; K-means speed.

Run: python benchmarks/bench_graph.py [--width 576] [--batch 4] [--points 2000] [--clusters 200]

Table 1 feeds the probe's ``observe`` with fabricated decode Steps (random hidden states of
``--width``, tokens from a made-up vocabulary where about one token in 12 ends a line) for N
generated tokens, and reports the bytes the probe holds afterwards beside the bytes a
keep-everything approach holds (every decode step's ``[batch, 1, width]`` value cloned, what a
naive per-step pooling after generation needs). Both are exact tensor byte counts.

Table 2 times scikit-learn's KMeans (k-means++, n_init) against ``kmeans_torch`` on the same
random step-like points on CPU and prints the inertia ratio (torch / sklearn; < 1 is better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

from probes.kmeans import kmeans_torch  # noqa: E402
from probes.reasoning_graph import ReasoningGraph  # noqa: E402
from surgery.sites import Site  # noqa: E402
from surgery.step import Step  # noqa: E402


class _Vocabulary:
    """What ReasoningGraph.bind reads from a model; no weights."""

    def __init__(self, width: int):
        words = [f" word{i}" for i in range(110)]
        self.vocabulary_texts = words + [f" end of step {i}.\n" for i in range(10)]  # 10 in 120 end a line
        self.d_model, self.n_layers, self.device, self.name = width, 30, torch.device("cpu"), "synthetic"

    def resolve_site(self, site):
        return Site.parse(site).resolve(self.n_layers)

    def site_width(self, site):
        return self.d_model


def memory_table(width: int, batch: int, lengths=(256, 1024, 4096)) -> None:
    model = _Vocabulary(width)
    print(f"\n## memory after N generated tokens (batch {batch}, width {width}, float32)\n")
    print(f"{'N':>6} {'steps/row':>10} {'streaming_bytes':>16} {'keep_all_bytes':>15} {'keep_all/streaming':>19}")
    for n in lengths:
        probe = ReasoningGraph(site="resid_pre.27")
        probe.bind(model)
        probe.reset(batch)
        generator = torch.Generator().manual_seed(n)
        tokens = torch.randint(len(model.vocabulary_texts), (batch, n), generator=generator)
        step = Step.prefill(torch.zeros(batch, 4, dtype=torch.long), torch.ones(batch, 4))
        finished = torch.zeros(batch, dtype=torch.bool)
        kept = []
        for k in range(n):
            step = step.next(tokens[:, k], finished, (None, None))
            value = torch.randn(batch, 1, width, generator=generator)
            probe.observe("resid_pre.27", value, step)
            kept.append(value.clone())  # the naive alternative: every hidden state
        streaming = probe.held_bytes()
        keep_all = sum(v.numel() * v.element_size() for v in kept)
        steps = sum(len(v) for v in probe.result()) / batch
        print(f"{n:>6} {steps:>10.1f} {streaming:>16,} {keep_all:>15,} {keep_all / streaming:>18.1f}x")


def kmeans_table(points: int, width: int, clusters: int, n_init: int) -> None:
    from sklearn.cluster import KMeans

    generator = torch.Generator().manual_seed(0)
    # step-like data: a few hundred loose groups plus noise, as pooled reasoning steps
    anchors = torch.randn(clusters * 2, width, generator=generator) * 3
    X = anchors[torch.randint(len(anchors), (points,), generator=generator)] + torch.randn(points, width, generator=generator)
    print(f"\n## K-means on {points} x {width} points, K={clusters}, n_init={n_init}, CPU "
          f"({torch.get_num_threads()} torch threads)\n")
    print(f"{'method':>14} {'seconds':>8} {'inertia':>14} {'inertia/sklearn':>16} {'speed vs sklearn':>17}")
    start = time.perf_counter()
    reference = KMeans(n_clusters=clusters, init="k-means++", n_init=n_init, random_state=0).fit(X.numpy())
    sk_s = time.perf_counter() - start
    start = time.perf_counter()
    _, _, inertia = kmeans_torch(X, clusters, seed=0, n_init=n_init)
    torch_s = time.perf_counter() - start
    print(f"{'sklearn':>14} {sk_s:>8.2f} {reference.inertia_:>14,.0f} {1.0:>16.4f} {1.0:>16.2f}x")
    print(f"{'kmeans_torch':>14} {torch_s:>8.2f} {inertia:>14,.0f} {inertia / reference.inertia_:>16.4f} "
          f"{sk_s / torch_s:>16.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--n-init", type=int, default=10)
    args = parser.parse_args()
    memory_table(args.width, args.batch)
    kmeans_table(args.points, args.width, args.clusters, args.n_init)


if __name__ == "__main__":
    main()
