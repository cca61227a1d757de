"""ReasoningGraph: reasoning steps as a walk over hidden-state clusters, and its topology.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3). The generated
text is cut into steps at newlines; each step becomes the mean hidden state of its tokens at
block ``int(0.9 * L)``; one K-means over the steps of all samples turns every step into a node;
consecutive steps in different clusters give directed edges weighted by the Euclidean distance
of the two step vectors. Per sample: cycles, diameter, average path length, clustering and the
small-world index; over samples: the cycle detection ratio.

Two halves:

- the probe :class:`ReasoningGraph` (registry name ``"reasoning_graph"``) streams the step
  vectors while decoding and keeps only one vector per step, never every hidden state;
- the analysis (:func:`fit_clusters`, :func:`kmeans_torch`, :func:`build_graph`,
  :func:`graph_metrics`, :func:`cycle_detection_ratio`, :func:`analyse`,
  :func:`plot_trajectory`) works on step vectors alone, no model needed.

Paper-compatible defaults: site ``resid_pre.{int(0.9 * n_layers)}`` (the residual stream
entering that block, which is HF ``hidden_states[int(0.9 * L)]``, the index the released code
uses), split on single newlines, drop steps whose stripped text has <= 5 characters, K=200,
k-means++, ``n_init=10``, seed 0, K-means fitted on all samples pooled.

Deviations and decisions:

- Only reasoning steps are embedded: the prompt is not (the released code is off by one and
  embeds prompt lines too). Everything the model generates counts, also after ``</think>``.
- Steps are cut at token granularity: a token whose text ends with ``"\\n"`` ends the current
  step and belongs to it. A token with a newline in its middle does not cut (rare in BPE
  vocabularies, which keep newlines at token ends).
- "Long enough" is the released rule ``len(step_text.strip()) > min_chars``, computed exactly
  while streaming from per-token offsets of the first and last non-whitespace character.
- The last generated token (EOS, or the one that hit the length limit) is never fed back, so it
  has no hidden state and no step contains it. An unfinished trailing step (no newline after
  it) is kept if it is long enough.
- A repeated transition c -> c' keeps the *minimum* of its distances as the edge weight (the
  shortest observed hop; ``count`` on the edge says how often it was taken).

Example (standalone analysis; the probe's own example needs a model, see the class)::

    >>> import torch
    >>> steps = [torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.1, 0.0], [0.0, 5.0]])]
    >>> result = analyse(steps, n_clusters=3, n_init=1)
    >>> result.metrics[0].has_cycle, result.metrics[0].cycle_count, result.cycle_detection_ratio
    (True, 1, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from surgery.blocks import Probe, register_block
from surgery.results import SavedResult
from surgery.step import Step

__all__ = [
    "GraphAnalysis",
    "GraphMetrics",
    "ReasoningGraph",
    "ReasoningGraphConfig",
    "StepClusters",
    "analyse",
    "build_graph",
    "cycle_detection_ratio",
    "fit_clusters",
    "graph_metrics",
    "kmeans_torch",
    "plot_trajectory",
]

STEP_RULES = ("line",)
_INITIAL_CAPACITY = 64


@dataclass(frozen=True)
class ReasoningGraphConfig:
    site: str | None = field(
        default=None, metadata={"help": "site to pool; None = resid_pre.{int(0.9 * n_layers)} (HF hidden_states index)"}
    )
    n_clusters: int = field(default=200, metadata={"help": "K of the pooled K-means"})
    step: str = field(default="line", metadata={"help": "step rule: 'line' = a token ending with '\\n' ends a step"})
    min_chars: int = field(default=5, metadata={"help": "keep steps whose stripped text has more characters"})
    seed: int = field(default=0, metadata={"help": "K-means random_state"})
    n_init: int = field(default=10, metadata={"help": "K-means restarts (best inertia kept)"})


# ---- the probe -------------------------------------------------------------------------------
@register_block("reasoning_graph")
class ReasoningGraph(Probe):
    """Stream one mean hidden-state vector per reasoning step; analyse them as a graph.

    Paper: Topology of Reasoning (arXiv 2506.05744), §3; METHODS.md §3. Deviations: see the
    module docstring (only generated tokens are embedded; steps cut at token granularity).

    While decoding, each row keeps a running sum ``[d]``, a token count and the offsets needed
    for ``len(text.strip())`` on the device. When a token ending with ``"\\n"`` is fed, the
    row's mean is written into a per-row buffer ``[batch, capacity, d]`` at the row's step
    counter (a scatter, no host sync), and the counter advances only if the step is long
    enough. Memory therefore grows with the number of kept steps, not with tokens x width. The
    one host sync is the capacity check: the host keeps an upper bound on the largest step
    counter (it grows by one per decode step) and reads the true maximum ``m`` only when that
    bound reaches the capacity, then grows the buffer to ``m + max(64, m // 2)`` slots if it
    has less; so at most one sync per 64 decode steps (per ``m / 2`` once rows hold ``m``
    steps), and the buffer holds at most ``1.5 m + 64`` vectors per row. The prefill is
    ignored, as are re-runs.

    Args:
        site: the site to pool. ``None`` (default) picks ``resid_pre.{int(0.9 * n_layers)}``
            when the trace binds the probe (:meth:`for_model` writes it out beforehand).
        n_clusters: K of the K-means in :meth:`analyse` (the paper: 200).
        step: the step rule; only ``"line"`` (the released code's split on single newlines).
        min_chars: a step is kept if ``len(text.strip()) > min_chars`` (released code: 5).
        seed: K-means ``random_state``.
        n_init: K-means restarts.

    Example::

        import surgery
        from probes import ReasoningGraph

        model = surgery.load()
        graph = ReasoningGraph.for_model(model, n_clusters=20)
        with surgery.trace(model, graph) as tr:
            out = tr.generate(prompts, max_new_tokens=512, chat=True)
        steps = graph.result()            # per row: [n_steps, d_model]
        found = graph.analyse()           # labels, graphs, metrics, cycle detection ratio
        plot_trajectory(steps[0], found.labels[0], found.centers, "row0.png")
    """

    config_class = ReasoningGraphConfig

    def __init__(
        self,
        site: str | None = None,
        n_clusters: int = 200,
        step: str = "line",
        min_chars: int = 5,
        seed: int = 0,
        n_init: int = 10,
    ):
        if step not in STEP_RULES:
            raise ValueError(f"unknown step rule {step!r}: supported {', '.join(map(repr, STEP_RULES))}")
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
        if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
            raise ValueError(f"n_init must be a positive int, got {n_init!r}")
        if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
            raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
        self.config = ReasoningGraphConfig(site, n_clusters, step, min_chars, int(seed), n_init)
        self._site: str | None = None
        self._steps: list[Tensor] | None = None

    @classmethod
    def for_model(cls, model, **options) -> ReasoningGraph:
        """The probe with its default site written out for ``model`` (``resid_pre.{int(0.9 L)}``)."""
        options.setdefault("site", cls.default_site(model))
        return cls(**options)

    @staticmethod
    def default_site(model) -> str:
        """``resid_pre.{int(0.9 * n_layers)}``: HF ``hidden_states[int(0.9 L)]``, as the paper."""
        return f"resid_pre.{int(0.9 * model.n_layers)}"

    def sites(self) -> tuple[str, ...]:
        site = self.config.site or self._site
        if site is None:
            raise ValueError(
                "ReasoningGraph(site=None) picks its site from the model when it is bound (a trace "
                "does that): call bind(model) first, or use ReasoningGraph.for_model(model, ...)"
            )
        return (site,)

    def bind(self, model) -> None:
        site = self.config.site if self.config.site is not None else self.default_site(model)
        resolved = model.resolve_site(site)
        if resolved.kind == "logits":
            raise ValueError("ReasoningGraph pools hidden states: pick a resid/attn/mlp site, not 'logits'")
        self._site = str(resolved)
        self._width = model.site_width(resolved)
        self._device = model.device
        texts = model.vocabulary_texts
        # Per vocabulary entry: does it end a line, its length, and the offsets of its first and
        # (one past) last non-whitespace character, so len(step.strip()) streams exactly.
        self._ends_line = torch.tensor([t.endswith("\n") for t in texts], dtype=torch.bool, device=self._device)
        self._length = torch.tensor([len(t) for t in texts], dtype=torch.long, device=self._device)
        self._first = torch.tensor([len(t) - len(t.lstrip()) for t in texts], dtype=torch.long, device=self._device)
        self._last = torch.tensor([len(t.rstrip()) for t in texts], dtype=torch.long, device=self._device)
        self._has_text = torch.tensor([bool(t.strip()) for t in texts], dtype=torch.bool, device=self._device)
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        device, width = getattr(self, "_device", "cpu"), getattr(self, "_width", 0)
        zeros = lambda dtype: torch.zeros(batch_size, dtype=dtype, device=device)  # noqa: E731
        self._sum = torch.zeros(batch_size, width, dtype=torch.float32, device=device)
        self._count = zeros(torch.long)
        self._chars = zeros(torch.long)  # characters of the step so far
        self._start = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # first non-space
        self._end = zeros(torch.long)  # one past the last non-space
        self._n_steps = zeros(torch.long)
        self._buffer = torch.zeros(batch_size, _INITIAL_CAPACITY, width, dtype=torch.float32, device=device)
        self._bound = 0  # host-side upper bound on max(self._n_steps)
        self._steps = None

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        if step.is_prefill:
            return
        self._steps = None
        tokens, valid = step.token_ids[:, -1], step.valid[:, -1]
        x = value[:, -1].float()
        self._sum += torch.where(valid[:, None], x, 0.0)
        self._count += valid.long()
        has_text = self._has_text[tokens] & valid
        self._start = torch.where(has_text & (self._start < 0), self._chars + self._first[tokens], self._start)
        self._end = torch.where(has_text, self._chars + self._last[tokens], self._end)
        self._chars += torch.where(valid, self._length[tokens], 0)
        ended = self._ends_line[tokens] & valid
        self._close(ended)

    def _long_enough(self) -> Tensor:
        """Rows whose current step has ``len(text.strip()) > min_chars``."""
        return (self._start >= 0) & (self._end - self._start.clamp(min=0) > self.config.min_chars)

    def _mean(self) -> Tensor:
        return self._sum / self._count.clamp(min=1)[:, None].float()

    def _close(self, ended: Tensor) -> None:
        """Write the mean of rows whose step ``ended``; advance the counter where it is long enough."""
        self._ensure_capacity()
        keep = ended & self._long_enough()
        rows = torch.arange(self._sum.shape[0], device=self._sum.device)
        mean = self._mean()
        # Every row writes at its own counter; only kept rows advance, so the others' writes
        # land in a free slot and are overwritten later (no boolean indexing, no sync).
        self._buffer[rows, self._n_steps] = mean
        self._n_steps = self._n_steps + keep.long()
        self._bound += 1
        clear = ended[:, None]
        self._sum = torch.where(clear, 0.0, self._sum)
        self._count = torch.where(ended, 0, self._count)
        self._chars = torch.where(ended, 0, self._chars)
        self._start = torch.where(ended, -1, self._start)
        self._end = torch.where(ended, 0, self._end)

    def _ensure_capacity(self) -> None:
        capacity = self._buffer.shape[1]
        if self._bound < capacity:
            return
        self._bound = int(self._n_steps.max()) if self._n_steps.numel() else 0  # the one host sync
        # Headroom of max(64, half the steps held) until the next check: few syncs, and the
        # buffer stays within 1.5 x steps + 64 slots.
        target = self._bound + max(_INITIAL_CAPACITY, self._bound // 2)
        if target > capacity:
            grown = self._buffer.new_zeros(self._buffer.shape[0], target, self._buffer.shape[2])
            grown[:, :capacity] = self._buffer
            self._buffer = grown

    def held_bytes(self) -> int:
        """Bytes of device state the probe holds now (what the benchmark measures)."""
        tensors = (self._sum, self._count, self._chars, self._start, self._end, self._n_steps, self._buffer)
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> list[Tensor]:
        """Step vectors per row: a list of ``[n_steps_i, d]`` float32 tensors on the model's device.

        Includes each row's unfinished trailing step when it is long enough (see the class).
        """
        if self._steps is None:
            if not hasattr(self, "_sum"):
                raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
            # Read-only, so result() is repeatable and works outside the engine's inference mode.
            counts = self._n_steps.tolist()
            tails = ((self._count > 0) & self._long_enough()).tolist()
            mean = self._mean()
            self._steps = [
                torch.cat([self._buffer[row, :n], mean[row : row + 1]]) if tail else self._buffer[row, :n].clone()
                for row, (n, tail) in enumerate(zip(counts, tails))
            ]
        return list(self._steps)

    def analyse(self, n_clusters: int | None = None, kmeans: str = "sklearn") -> GraphAnalysis:
        """:func:`analyse` on :meth:`result` with this probe's K, seed and ``n_init``."""
        k = self.config.n_clusters if n_clusters is None else n_clusters
        return analyse(self.result(), k, seed=self.config.seed, n_init=self.config.n_init, kmeans=kmeans)


# ---- clustering --------------------------------------------------------------------------------
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
    re-seeded at the points farthest from their centers. Its seeds draw from torch's generator,
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
            d2 = _sq_distances(X, x_sq, centers)
            closest, labels = d2.min(1)
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
        labels = _sq_distances(X, x_sq, centers).argmin(1)
        inertia = float(((X - centers[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centers, inertia)
    return best


# ---- graph and metrics -----------------------------------------------------------------------
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


def cycle_detection_ratio(metrics: Sequence[GraphMetrics]) -> float:
    """Share of samples whose reasoning graph has a cycle (0.0 for no samples).

    Example:
        >>> import torch
        >>> one = graph_metrics([0, 1, 0], build_graph([0, 1, 0], torch.zeros(3, 1)))
        >>> two = graph_metrics([0, 1], build_graph([0, 1], torch.zeros(2, 1)))
        >>> cycle_detection_ratio([one, two])
        0.5
    """
    return sum(m.has_cycle for m in metrics) / len(metrics) if metrics else 0.0


@dataclass
class GraphAnalysis(SavedResult):
    """Everything :func:`analyse` found.

    Attributes:
        labels: per sample, the cluster of each step (int64 arrays).
        centers: ``[n_clusters, d]`` cluster centers (CPU float32; ``[0, d]`` when there were no steps).
        graphs: per sample, its :func:`build_graph`.
        metrics: per sample, its :class:`GraphMetrics`.
        cycle_detection_ratio: share of samples with a cycle.
        inertia: the K-means inertia (0.0 when there were no steps).
    """

    labels: list[np.ndarray]
    centers: Tensor
    graphs: list[nx.DiGraph]
    metrics: list[GraphMetrics]
    cycle_detection_ratio: float
    inertia: float


def analyse(
    step_vectors: Sequence[Float[Tensor, "_ d"]],
    n_clusters: int = 200,
    seed: int = 0,
    n_init: int = 10,
    kmeans: str = "sklearn",
) -> GraphAnalysis:
    """Cluster the steps of all samples pooled, then build and measure each sample's graph.

    Args:
        step_vectors: per sample, ``[n_steps_i, d]`` (e.g. :meth:`ReasoningGraph.result`).
        n_clusters: K (at most the total number of steps, else a ValueError).
        seed, n_init: K-means settings.
        kmeans: ``"sklearn"`` (:func:`fit_clusters`, the reference) or ``"torch"``
            (:func:`kmeans_torch` on the vectors' device).

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
    return GraphAnalysis(labels, centers, graphs, metrics, cycle_detection_ratio(metrics), inertia)


# ---- plot --------------------------------------------------------------------------------------
def plot_trajectory(
    step_vectors: Float[Tensor, "n d"], labels, centers: Float[Tensor, "k d"], path: str | Path
) -> Path:
    """Save a PNG of one sample's reasoning as a trajectory in a 2-D PCA projection.

    The PCA is fitted on the sample's steps and the centers of the clusters it visits. Steps
    are small dots coloured by time, joined by arrows in order; visited cluster centers are
    labelled nodes; the graph's edges are drawn between them (width grows with the count).

    Args:
        step_vectors: ``[n, d]`` the sample's step vectors (``n >= 1``).
        labels: ``[n]`` their clusters.
        centers: ``[k, d]`` all cluster centers (e.g. ``GraphAnalysis.centers``).
        path: where to write the PNG.

    Returns:
        The path written.

    Example::

        found = analyse(steps, n_clusters=20)
        plot_trajectory(steps[0], found.labels[0], found.centers, "row0.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    labels = _as_labels(labels)
    if not labels:
        raise ValueError("plot_trajectory needs at least one step; this sample has none")
    if len(labels) != step_vectors.shape[0]:
        raise ValueError(f"{len(labels)} labels for {step_vectors.shape[0]} step vectors: give one label per step")
    steps = step_vectors.detach().float().cpu().numpy()
    visited = list(dict.fromkeys(labels))
    nodes = centers.detach().float().cpu().numpy()[visited]
    points = np.concatenate([steps, nodes])
    n_components = min(2, points.shape[0], points.shape[1])
    if np.ptp(points, axis=0).max() > 0:
        projected = PCA(n_components=n_components).fit_transform(points)
        projected = np.pad(projected, ((0, 0), (0, 2 - n_components)))
    else:  # one point in all: nothing to project
        projected = np.zeros((points.shape[0], 2))
    xy, node_xy = projected[: len(steps)], dict(zip(visited, projected[len(steps) :]))

    graph = build_graph(labels, step_vectors.detach().float().cpu())
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    for a, b, count in graph.edges(data="count"):
        ax.annotate("", xy=node_xy[b], xytext=node_xy[a], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.8 + 0.6 * count,
                                    connectionstyle="arc3,rad=0.15", shrinkA=9, shrinkB=9))
    colors = plt.cm.viridis(np.linspace(0, 1, len(xy)))
    for i in range(len(xy) - 1):
        ax.annotate("", xy=xy[i + 1], xytext=xy[i], zorder=2,
                    arrowprops=dict(arrowstyle="->", color=colors[i], lw=1.0, shrinkA=2, shrinkB=2))
    dots = ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(len(xy)), cmap="viridis", s=14, zorder=3)
    centers_xy = np.array([node_xy[c] for c in visited])
    ax.scatter(centers_xy[:, 0], centers_xy[:, 1], s=220, facecolor="white", edgecolor="crimson", lw=1.5, zorder=4)
    for c in visited:
        ax.text(*node_xy[c], str(c), ha="center", va="center", fontsize=7, color="crimson", zorder=5)
    fig.colorbar(dots, ax=ax, label="step")
    from matplotlib.lines import Line2D

    ax.legend(handles=[
        Line2D([], [], color="0.6", lw=1.4, label="graph edge (cluster to cluster)"),
        Line2D([], [], color=plt.cm.viridis(0.5), lw=1.0, marker=".", label="step trajectory"),
        Line2D([], [], ls="", marker="o", ms=10, mfc="white", mec="crimson", label="cluster center (id)"),
    ], loc="best", fontsize=7, framealpha=0.8)
    metrics = graph_metrics(labels, graph)
    ax.set_title(f"reasoning trajectory: {len(labels)} steps, {len(visited)} clusters, "
                 f"cycles {metrics.cycle_count} (max {metrics.cycle_count_max})", fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
