"""K-means over the reasoning steps of all samples pooled: scikit-learn's, and its torch twin.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3 "Nodes"): one
K-means per model, dataset and layer, over the step vectors of every sample together, turns
each step into a node (its cluster). :func:`fit_clusters` is the reference (scikit-learn,
k-means++, ``n_init`` restarts; paper-compatible defaults K=200, ``n_init=10``, seed 0);
:func:`kmeans_torch` is the same algorithm in torch on any device (labels differ from
scikit-learn's at the same seed, inertia is within 1%, tested). :func:`probes.graph_metrics.analyse`
picks one of the two.

Deviations: none in the clustering itself; the torch twin draws its seeds from torch's
generator, not NumPy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from surgery.kernels import nearest_centroid

__all__ = ["StepClusters", "fit_clusters", "kmeans_torch"]


@dataclass
class StepClusters:
    """One K-means over the steps of all samples pooled.

    Attributes:
        labels: per sample, the cluster of each step (int64 arrays, empty for samples with none).
        centers: ``[n_clusters, d]`` cluster centers (float32, CPU).
        inertia: sum of squared distances of the steps to their centers.
    """

    labels: list[np.ndarray]
    centers: Tensor
    inertia: float


def _pooled(step_vectors: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    if isinstance(step_vectors, Tensor):
        raise TypeError("step_vectors is a list of [n_steps, d] tensors, one per sample (wrap one tensor in a list)")
    sizes = [int(v.shape[0]) for v in step_vectors]
    widths = {int(v.shape[1]) for v in step_vectors if v.ndim == 2}
    if any(v.ndim != 2 for v in step_vectors) or len(widths) > 1:
        raise ValueError(
            f"step_vectors must be [n_steps, d] tensors of one width d, got shapes {[tuple(v.shape) for v in step_vectors]}"
        )
    if not step_vectors:
        return torch.zeros(0, 0), sizes
    return torch.cat([v.detach().float().cpu() for v in step_vectors]), sizes


def _check_k(n_clusters: int, n_steps: int) -> None:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n_clusters > n_steps:
        raise ValueError(
            f"n_clusters={n_clusters} is more than the {n_steps} step vectors to cluster: lower n_clusters "
            f"(at most {n_steps}) or collect more reasoning steps (more samples or longer generations)"
        )


def fit_clusters(
    step_vectors: Sequence[Float[Tensor, "_ d"]], n_clusters: int = 200, seed: int = 0, n_init: int = 10
) -> StepClusters:
    """scikit-learn K-means (k-means++, ``n_init`` restarts) on the steps of all samples pooled.

    METHODS.md §3 "Nodes": one K-means per model, dataset and layer, not per sample.

    Args:
        step_vectors: per sample, ``[n_steps_i, d]`` (any device; clustered on CPU in float32).
        n_clusters: K; at most the total number of steps (else a ValueError says so).
        seed: ``random_state``.
        n_init: restarts; the run with the lowest inertia is kept.

    Returns:
        :class:`StepClusters` with labels split back per sample.

    Example:
        >>> import torch
        >>> found = fit_clusters([torch.tensor([[0.0, 0.0], [9.0, 9.0]]), torch.tensor([[0.1, 0.0]])], 2)
        >>> [len(x) for x in found.labels], bool(found.labels[0][0] == found.labels[1][0]), round(found.inertia, 3)
        ([2, 1], True, 0.005)
    """
    from sklearn.cluster import KMeans

    X, sizes = _pooled(step_vectors)
    _check_k(n_clusters, X.shape[0])
    km = KMeans(n_clusters=n_clusters, init="k-means++", n_init=n_init, random_state=seed).fit(X.numpy())
    labels = np.split(km.labels_.astype(np.int64), np.cumsum(sizes)[:-1])
    return StepClusters(labels, torch.from_numpy(km.cluster_centers_).float(), float(km.inertia_))


def _sq_distances(X: Tensor, x_sq: Tensor, C: Tensor) -> Tensor:
    return (x_sq[:, None] - 2 * X @ C.T + (C * C).sum(1)[None]).clamp_(min=0)


def _kmeans_plus_plus(X: Tensor, x_sq: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ (as scikit-learn: 2 + ln k candidates per center, keep the best)."""
    n = X.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=generator, device=X.device)
    centers = [X[first]]
    closest = _sq_distances(X, x_sq, X[first])[:, 0]
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, device=X.device, dtype=X.dtype) * closest.sum()
        candidates = torch.searchsorted(closest.cumsum(0), draws).clamp_(max=n - 1)
        to_candidates = torch.minimum(closest[None], _sq_distances(X, x_sq, X[candidates]).T)  # [trials, n]
        best = to_candidates.sum(1).argmin()
        closest = to_candidates[best]
        centers.append(X[candidates[best]][None])
    return torch.cat(centers)


def kmeans_torch(
    X: Float[Tensor, "n d"], k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> tuple[Tensor, Tensor, float]:
    """K-means in torch (greedy k-means++ init, Lloyd iterations, best of ``n_init``), any device.

    The GPU twin of :func:`fit_clusters`' scikit-learn K-means: same init scheme, same
    convergence rule (squared center shift <= ``tol`` x mean feature variance), empty clusters
    re-seeded at the points farthest from their centers. The assignment step is
    :func:`surgery.kernels.nearest_centroid` (a Triton kernel on CUDA, which never builds the
    ``[n, k]`` distance matrix; torch elsewhere). Its seeds draw from torch's generator,
    so labels differ from scikit-learn's at the same seed; inertia is within 1% (tested). One
    host sync per Lloyd iteration (the convergence test).

    Args:
        X: ``[n, d]`` points (float32 or float64; kept on their device).
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of the torch generator.
        n_init: restarts; the lowest inertia wins.
        max_iter: Lloyd iterations per restart.
        tol: relative convergence tolerance (scikit-learn's meaning).

    Returns:
        ``(labels [n] int64, centers [k, d], inertia)``.

    Example:
        >>> import torch
        >>> X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
        >>> labels, centers, inertia = kmeans_torch(X, 2, n_init=2)
        >>> bool(labels[0] == labels[1]) and bool(labels[2] == labels[3]) and bool(labels[0] != labels[2]), inertia
        (True, 1.0)
    """
    if not X.is_floating_point():
        raise TypeError(f"kmeans_torch needs floating point points, got {X.dtype}")
    _check_k(k, X.shape[0])
    generator = torch.Generator(device=X.device).manual_seed(int(seed))
    x_sq = (X * X).sum(1)
    threshold = float(tol * X.var(0, correction=0).mean()) if X.shape[0] > 1 else 0.0
    best: tuple[Tensor, Tensor, float] | None = None
    for _ in range(n_init):
        centers = _kmeans_plus_plus(X, x_sq, k, generator)
        for _ in range(max_iter):
            labels, closest = nearest_centroid(X, centers)  # Triton on CUDA: no [n, k] matrix
            counts = torch.bincount(labels, minlength=k)
            # one-hot matmul: much faster than index_add_ on CPU, and a plain GEMM on GPU
            one_hot = torch.zeros(k, X.shape[0], dtype=X.dtype, device=X.device).scatter_(0, labels[None], 1.0)
            sums = one_hot @ X
            new = sums / counts.clamp(min=1)[:, None].to(X.dtype)
            empty = counts == 0
            n_empty = int(empty.sum())
            if n_empty:
                new[empty] = X[closest.topk(n_empty).indices]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= threshold:
                break
        labels, _ = nearest_centroid(X, centers)
        inertia = float(((X - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centers, inertia)
    return best
