"""Plots of probe results, as PNG files: one matplotlib setup shared by every plot.

:func:`_figure` is the setup, written once: the non-interactive Agg backend, one figure, the PNG
saved on leaving, and the figure always closed (also when drawing fails), so plotting in a loop
or on a headless machine leaks nothing.

- :func:`plot_trajectory`: one sample's reasoning steps as a path through its K-means clusters
  in 2-D (Topology of Reasoning, arXiv 2506.05744, §3; see :mod:`probes.reasoning_graph`).
- :func:`plot_mi`: one row's per-token MI with its peaks and, for Tukey peaks, the fence (arXiv
  2506.02867, §3; see :mod:`probes.mi`); ``MIResult.plot`` calls it.
- :func:`plot_thoughts`: thought counts per class and the thought states in 2-D (SEAL, arXiv
  2504.07986, §3; see :mod:`probes.thought_classifier`); ``ClassifiedThoughts.plot`` calls it.

The result modules import this one for their ``plot`` methods, so this one imports none of them:
each plot reads the attributes of the result it is given, which its docstring names.

Deviations: these are our own views of each probe's result, not reproductions of the papers'
figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from probes.graph_metrics import _as_labels, build_graph, graph_metrics
from surgery.thoughts import THOUGHT_CLASSES

__all__ = ["plot_mi", "plot_thoughts", "plot_trajectory"]


@contextmanager
def _figure(
    path, *grid: int, save_dpi: int | None = None, save_format: str | None = None, **subplots
) -> Iterator[tuple]:
    """Select Agg, yield ``(figure, axes)`` of ``plt.subplots(*grid, **subplots)``; on leaving,
    lay it out tight and save it to ``path`` (``save_dpi`` and ``save_format`` are
    ``Figure.savefig``'s ``dpi`` and ``format``: None keeps matplotlib's default, the figure's
    dpi and the file name's extension), and close the figure, also after an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=save_dpi, format=save_format)
    finally:
        plt.close(fig)


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

        found = analyse(steps, n_clusters=20)         # probes.graph_metrics.analyse
        plot_trajectory(steps[0], found.labels[0], found.centers, "row0.png")
    """
    from matplotlib import cm
    from matplotlib.lines import Line2D
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
    path = Path(path)
    with _figure(path, figsize=(7, 6), dpi=120, save_format="png") as (fig, ax):
        for a, b, count in graph.edges(data="count"):
            ax.annotate("", xy=node_xy[b], xytext=node_xy[a], zorder=1,
                        arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.8 + 0.6 * count,
                                        connectionstyle="arc3,rad=0.15", shrinkA=9, shrinkB=9))
        colors = cm.viridis(np.linspace(0, 1, len(xy)))
        for i in range(len(xy) - 1):
            ax.annotate("", xy=xy[i + 1], xytext=xy[i], zorder=2,
                        arrowprops=dict(arrowstyle="->", color=colors[i], lw=1.0, shrinkA=2, shrinkB=2))
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(len(xy)), cmap="viridis", s=14, zorder=3)
        centers_xy = np.array([node_xy[c] for c in visited])
        ax.scatter(centers_xy[:, 0], centers_xy[:, 1], s=220, facecolor="white", edgecolor="crimson", lw=1.5, zorder=4)
        for c in visited:
            ax.text(*node_xy[c], str(c), ha="center", va="center", fontsize=7, color="crimson", zorder=5)
        fig.colorbar(dots, ax=ax, label="step")
        ax.legend(handles=[
            Line2D([], [], color="0.6", lw=1.4, label="graph edge (cluster to cluster)"),
            Line2D([], [], color=cm.viridis(0.5), lw=1.0, marker=".", label="step trajectory"),
            Line2D([], [], ls="", marker="o", ms=10, mfc="white", mec="crimson", label="cluster center (id)"),
        ], loc="best", fontsize=7, framealpha=0.8)
        metrics = graph_metrics(labels, graph)
        ax.set_title(f"reasoning trajectory: {len(labels)} steps, {len(visited)} clusters, "
                     f"cycles {metrics.cycle_count} (max {metrics.cycle_count_max})", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    return path


def plot_mi(result, path, row: int = 0) -> None:
    """Save a PNG of ``m_t`` over tokens for one row, its peaks marked.

    The peaks are the result's (``result.peak_rule``): with ``"tukey"`` the fence
    ``Q3 + 1.5·IQR`` they are above is drawn too; with ``"top_k"`` (the released notebook's
    rule) there is no fence, and the legend says ``top k values``.

    Args:
        result: what :class:`probes.mi.MIEstimator` measured (a :class:`~probes.mi.MIResult`: its
            ``values``, ``peaks``, ``peak_rule``, ``top_k`` and ``precision`` are read).
        path: where to write the PNG.
        row: the prompt row to draw.

    Example::

        plot_mi(mi.result(out), "mi.png", row=0)     # the same as mi.result(out).plot("mi.png")
    """
    values, peaks = result.values[row], result.peaks[row]
    rule = "" if result.peak_rule == "tukey" else f" (top {result.top_k})"
    with _figure(path, figsize=(8, 3), save_dpi=120) as (fig, ax):
        released = ", float32 as released" if result.precision == "float32" else ""
        ax.plot(range(len(values)), values.tolist(), lw=1, label=f"MI (nHSIC{released})")
        label = "peaks" if result.peak_rule == "tukey" else f"peaks (top {result.top_k} values)"
        ax.scatter(peaks.tolist(), values[peaks].tolist(), color="red", zorder=3, label=label)
        if result.peak_rule == "tukey":
            q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype)).tolist()
            ax.axhline(q3 + 1.5 * (q3 - q1), color="grey", ls="--", lw=0.8, label="Q3 + 1.5 IQR")
        ax.set_xlabel("generated token")
        ax.set_ylabel("MI with answer")
        ax.set_title(f"row {row}: {len(peaks)} peaks{rule} / {len(values)} tokens")
        ax.legend(loc="upper right", fontsize="small")


def plot_thoughts(result, path) -> None:
    """Save a PNG: thought counts per class, and the states in 2-D (PCA) coloured by class.

    Args:
        result: what :class:`probes.thought_classifier.ThoughtClassifier` found (a
            :class:`~probes.thought_classifier.ClassifiedThoughts`: its ``counts()``,
            ``all_states()``, ``labels()`` and ``site`` are read).
        path: where to write the PNG.

    Example::

        plot_thoughts(classifier.result(), "thoughts.png")   # the same as classifier.result().plot(...)
    """
    from sklearn.decomposition import PCA

    counts = result.counts()
    colours = {"execution": "tab:blue", "reflection": "tab:orange", "transition": "tab:green"}
    with _figure(path, 1, 2, figsize=(10, 4), save_dpi=110) as (figure, (bars, scatter)):
        bars.bar(list(counts), list(counts.values()), color=[colours[c] for c in counts])
        bars.set_title("thoughts per class")
        states, labels = result.all_states().float().cpu().numpy(), result.labels()
        if len(states) >= 2:
            points = PCA(n_components=2).fit_transform(states)
            for label in THOUGHT_CLASSES:
                keep = [i for i, found in enumerate(labels) if found == label]
                scatter.scatter(points[keep, 0], points[keep, 1], s=18, color=colours[label], label=label)
            scatter.legend()
        scatter.set_title(f"thought states at {result.site} (PCA)")
