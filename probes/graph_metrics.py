"""Reasoning graphs of step clusters and their topology: cycles, diameter, path length, small world.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3). Once K-means
(:mod:`probes.kmeans`) has turned every step into a node, consecutive steps in different
clusters give directed edges weighted by the Euclidean distance of the two step vectors
(:func:`build_graph`). Per sample: cycles, diameter, average path length, clustering and the
small-world index (:func:`graph_metrics`); over samples: the cycle detection ratio
(:func:`cycle_detection_ratio`). :func:`analyse` does it all from step vectors alone (e.g.
:meth:`probes.reasoning_graph.ReasoningGraph.result`), no model needed.

Deviation: a repeated transition c -> c' keeps the *minimum* of its distances as the edge
weight (the shortest observed hop; ``count`` on the edge says how often it was taken).

Example::

    >>> import torch
    >>> steps = [torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.1, 0.0], [0.0, 5.0]])]
    >>> result = analyse(steps, n_clusters=3, n_init=1)
    >>> result.metrics[0].has_cycle, result.metrics[0].cycle_count, result.cycle_detection_ratio
    (True, 1, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes.kmeans import _pooled, fit_clusters, kmeans_torch
from surgery.files.results import SavedResult, result_part

__all__ = [
    "GraphAnalysis",
    "GraphMetrics",
    "analyse",
    "build_graph",
    "cycle_detection_ratio",
    "graph_metrics",
]


def build_graph(labels, vectors: Float[Tensor, "n d"]) -> nx.DiGraph:
    """The reasoning graph of one sample: clusters as nodes, step transitions as weighted edges.

    One node per visited cluster (attribute ``visits``: steps in it). For consecutive steps in
    different clusters an edge ``c_t -> c_{t+1}`` with ``weight`` = Euclidean distance of the
    two step vectors; self-transitions are dropped; a repeated edge keeps the minimum distance
    and counts how often it was taken (``count``).

    Args:
        labels: ``[n]`` cluster of each step (list, numpy or torch ints).
        vectors: ``[n, d]`` the step vectors.

    Example:
        >>> import torch
        >>> g = build_graph([0, 1, 1, 0], torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 0.0], [0.0, 0.0]]))
        >>> sorted(g.edges(data="weight"))
        [(0, 1, 5.0), (1, 0, 3.0)]
    """
    labels = _as_labels(labels)
    if len(labels) != vectors.shape[0]:
        raise ValueError(f"{len(labels)} labels for {vectors.shape[0]} step vectors: give one label per step")
    graph = nx.DiGraph()
    for label in labels:
        graph.add_node(label)
        graph.nodes[label]["visits"] = graph.nodes[label].get("visits", 0) + 1
    if len(labels) > 1:
        hops = (vectors[1:].double() - vectors[:-1].double()).norm(dim=1).tolist()
        for a, b, distance in zip(labels, labels[1:], hops):
            if a == b:
                continue
            if graph.has_edge(a, b):
                data = graph.edges[a, b]
                data["weight"] = min(data["weight"], distance)
                data["count"] += 1
            else:
                graph.add_edge(a, b, weight=distance, count=1)
    return graph


@result_part
@dataclass(frozen=True)
class GraphMetrics:
    """Topology of one sample's reasoning graph (METHODS.md §3 "Metrics per sample").

    Attributes:
        n_steps, n_nodes, n_edges: sizes.
        has_cycle: some cluster is visited again after leaving it (a gap > 1 step).
        cycle_count: released rule: for the first cluster to be revisited (in step order),
            its number of separate visits minus one.
        cycle_count_max: the same count, maximised over clusters.
        diameter: largest finite weighted shortest-path distance over ordered node pairs
            (directed Dijkstra; in hidden-state units).
        average_path_length: mean of those weighted distances (the weighted ``L``).
        average_hops: mean hop count of the shortest paths over the same pairs (hop ``L``).
        clustering: mean local clustering of the undirected simple graph over nodes of degree
            >= 2 only.
        small_world_hops: ``S = (C/C_rand) / (L/L_rand)`` with ``L = average_hops``.
        small_world_weighted: the same with ``L = average_path_length``.

    Empty or single-node graphs give zeros (no cycle).
    """

    n_steps: int
    n_nodes: int
    n_edges: int
    has_cycle: bool
    cycle_count: int
    cycle_count_max: int
    diameter: float
    average_path_length: float
    average_hops: float
    clustering: float
    small_world_hops: float
    small_world_weighted: float


def _as_labels(labels) -> list[int]:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().tolist()
    return [int(x) for x in np.asarray(labels).reshape(-1).tolist()]


def _visits(labels: list[int]) -> tuple[dict[int, int], int | None]:
    """Separate visits (runs of consecutive steps) per cluster, and the first revisited cluster."""
    runs: dict[int, int] = {}
    first = None
    for i, label in enumerate(labels):
        if i == 0 or labels[i - 1] != label:
            runs[label] = runs.get(label, 0) + 1
            if runs[label] == 2 and first is None:
                first = label
    return runs, first


def _small_world(clustering: float, path_length: float, n: int, mean_degree: float) -> float:
    if n < 2 or mean_degree <= 1 or clustering <= 0 or path_length <= 0:
        return 0.0
    c_rand = mean_degree / (n - 1)
    l_rand = math.log(n) / math.log(mean_degree)
    return (clustering / c_rand) / (path_length / l_rand)


def graph_metrics(labels, graph: nx.DiGraph) -> GraphMetrics:
    """Cycle and topology metrics of one sample (see :class:`GraphMetrics`).

    Args:
        labels: the sample's cluster sequence (with self-transitions; they count as one visit).
        graph: its :func:`build_graph`.

    Example:
        >>> import torch
        >>> labels = [0, 1, 0, 2, 0]
        >>> g = build_graph(labels, torch.tensor([[0.0], [1.0], [0.0], [2.0], [0.0]]))
        >>> m = graph_metrics(labels, g)
        >>> m.has_cycle, m.cycle_count, m.diameter, m.average_path_length
        (True, 2, 3.0, 2.0)
    """
    labels = _as_labels(labels)
    runs, first = _visits(labels)
    weighted = [d for source, targets in nx.all_pairs_dijkstra_path_length(graph) for target, d in targets.items() if source != target]
    hops = [d for source, targets in nx.all_pairs_shortest_path_length(graph) for target, d in targets.items() if source != target]
    undirected = nx.Graph(graph.to_undirected(as_view=True))
    undirected.remove_edges_from(nx.selfloop_edges(undirected))
    local = nx.clustering(undirected)
    eligible = [node for node, degree in undirected.degree() if degree >= 2]
    clustering = float(np.mean([local[node] for node in eligible])) if eligible else 0.0
    n = undirected.number_of_nodes()
    mean_degree = 2 * undirected.number_of_edges() / n if n else 0.0
    apl = float(np.mean(weighted)) if weighted else 0.0
    average_hops = float(np.mean(hops)) if hops else 0.0
    return GraphMetrics(
        n_steps=len(labels),
        n_nodes=graph.number_of_nodes(),
        n_edges=graph.number_of_edges(),
        has_cycle=first is not None,
        cycle_count=runs[first] - 1 if first is not None else 0,
        cycle_count_max=max((r - 1 for r in runs.values()), default=0),
        diameter=float(max(weighted)) if weighted else 0.0,
        average_path_length=apl,
        average_hops=average_hops,
        clustering=clustering,
        small_world_hops=_small_world(clustering, average_hops, n, mean_degree),
        small_world_weighted=_small_world(clustering, apl, n, mean_degree),
    )


def cycle_detection_ratio(metrics: Sequence[GraphMetrics], min_steps: int = 0) -> float:
    """Share of samples whose reasoning graph has a cycle (0.0 when no sample counts).

    Args:
        metrics: one :class:`GraphMetrics` per sample.
        min_steps: only samples with at least this many steps count, in the numerator and the
            denominator. The default 0 counts every sample. The released code (METHODS.md §3
            "What the released code does") skips samples with at most one kept line, so they are
            not in its denominator: that is ``min_steps=1`` on
            ``ReasoningGraph(steps="released")`` vectors (such rows have none) and
            ``min_steps=2`` on streaming ones (one step per kept line). A sample with fewer
            than 3 steps has no cycle, so only the denominator changes.

    Example:
        >>> import torch
        >>> one = graph_metrics([0, 1, 0], build_graph([0, 1, 0], torch.zeros(3, 1)))
        >>> two = graph_metrics([0, 1], build_graph([0, 1], torch.zeros(2, 1)))
        >>> empty = graph_metrics([], build_graph([], torch.zeros(0, 1)))
        >>> cycle_detection_ratio([one, two, empty]), cycle_detection_ratio([one, two, empty], min_steps=1)
        (0.3333333333333333, 0.5)
    """
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be an int >= 0 (samples with fewer steps are not counted), got {min_steps!r}")
    counted = [m for m in metrics if m.n_steps >= min_steps]
    return sum(m.has_cycle for m in counted) / len(counted) if counted else 0.0


@dataclass
class GraphAnalysis(SavedResult):
    """Everything :func:`analyse` found.

    Attributes:
        labels: per sample, the cluster of each step (int64 arrays).
        centers: ``[n_clusters, d]`` cluster centers (CPU float32; ``[0, d]`` when there were no steps).
        graphs: per sample, its :func:`build_graph`.
        metrics: per sample, its :class:`GraphMetrics`.
        cycle_detection_ratio: share of samples with a cycle, among those with at least
            ``min_steps`` steps.
        inertia: the K-means inertia (0.0 when there were no steps).
        min_steps: the ratio's :func:`cycle_detection_ratio` ``min_steps`` (0: every sample).
    """

    labels: list[np.ndarray]
    centers: Tensor
    graphs: list[nx.DiGraph]
    metrics: list[GraphMetrics]
    cycle_detection_ratio: float
    inertia: float
    min_steps: int = 0


def analyse(
    step_vectors: Sequence[Float[Tensor, "_ d"]],
    n_clusters: int = 200,
    seed: int = 0,
    n_init: int = 10,
    kmeans: str = "sklearn",
    min_steps: int = 0,
) -> GraphAnalysis:
    """Cluster the steps of all samples pooled, then build and measure each sample's graph.

    Args:
        step_vectors: per sample, ``[n_steps_i, d]`` (e.g.
            :meth:`probes.reasoning_graph.ReasoningGraph.result`).
        n_clusters: K (at most the total number of steps, else a ValueError).
        seed, n_init: K-means settings.
        kmeans: ``"sklearn"`` (:func:`probes.kmeans.fit_clusters`, the reference) or ``"torch"``
            (:func:`probes.kmeans.kmeans_torch` on the vectors' device).
        min_steps: samples with fewer steps are left out of the cycle detection ratio (default
            0: none; the released denominator: see :func:`cycle_detection_ratio`). They are
            still clustered, and their graphs and metrics are still returned.

    Returns:
        :class:`GraphAnalysis`. When no sample has any step it is the documented empty result:
        empty labels and graphs, all-zero metrics, ratio 0.0, centers ``[0, d]`` (no K-means
        is fitted, whatever ``n_clusters``).

    Example:
        >>> import torch
        >>> empty = analyse([torch.zeros(0, 4), torch.zeros(0, 4)], n_clusters=200)
        >>> empty.cycle_detection_ratio, empty.centers.shape, empty.metrics[0].n_steps
        (0.0, torch.Size([0, 4]), 0)
    """
    if kmeans not in ("sklearn", "torch"):
        raise ValueError(f"kmeans is 'sklearn' or 'torch', got {kmeans!r}")
    cycle_detection_ratio([], min_steps)  # checks min_steps before any clustering
    X, sizes = _pooled(step_vectors)
    if X.shape[0] == 0:
        width = step_vectors[0].shape[1] if step_vectors else 0
        labels = [np.zeros(0, dtype=np.int64) for _ in sizes]
        centers, inertia = torch.zeros(0, width), 0.0
    elif kmeans == "sklearn":
        found = fit_clusters(step_vectors, n_clusters, seed, n_init)
        labels, centers, inertia = found.labels, found.centers, found.inertia
    else:
        device_X = torch.cat([v.detach().float() for v in step_vectors])
        flat, centers, inertia = kmeans_torch(device_X, n_clusters, seed, n_init)
        labels = np.split(flat.cpu().numpy().astype(np.int64), np.cumsum(sizes)[:-1])
        centers = centers.cpu()
    graphs = [build_graph(lab, v.detach().float().cpu()) for lab, v in zip(labels, step_vectors)]
    metrics = [graph_metrics(lab, g) for lab, g in zip(labels, graphs)]
    return GraphAnalysis(labels, centers, graphs, metrics, cycle_detection_ratio(metrics, min_steps), inertia, min_steps)
