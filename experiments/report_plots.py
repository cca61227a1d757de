"""The figures of a study's report, as PNG files: one function per figure.

Each function draws what :mod:`experiments.report_data` computed, with the one matplotlib setup
of :mod:`probes.plots` (Agg, the figure always closed), conditions in the study's order and one
colour per condition across figures. A function returns the PNG's path, or None when the study
has nothing to draw for it (no MI probe, no thoughts, no intervention keeping positions).

- :func:`plot_accuracy_tokens`: accuracy with Wilson 95 % intervals beside mean generated
  tokens with normal 95 % intervals;
- :func:`plot_thought_counts`: SEAL thought classes per condition (arXiv 2504.07986, §3);
- :func:`plot_mi_curves`: MI per generated token for the first problems, peaks and their
  tokens marked (arXiv 2506.02867, §3);
- :func:`plot_peak_statistics`: peaks per problem, their ratio to tokens, and AOM;
- :func:`plot_reasoning_graph`: one sample's reasoning graph drawn with networkx (arXiv
  2506.05744, §3);
- :func:`plot_fired`: where each intervention acted, and how often per problem.

Example::

    study = read_study("runs/gsm8k-baselines")
    plot_accuracy_tokens(study, "accuracy_tokens.png")
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from experiments.report_data import FiredPositions, StudyResults
from probes.plots import _figure  # the one matplotlib setup (Agg, always closed)
from surgery.thoughts import THOUGHT_CLASSES

__all__ = ["condition_colours", "plot_accuracy_tokens", "plot_fired", "plot_mi_curves", "plot_peak_statistics",
           "plot_reasoning_graph", "plot_thought_counts", "token_interval"]

_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
          "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False}
_THOUGHT_COLOURS = {"execution": "tab:blue", "reflection": "tab:orange", "transition": "tab:green"}
_DPI = 110
_LINE_STYLES = ("-", "--", ":", "-.")


@contextmanager
def _styled(path, *grid, **subplots):
    import matplotlib

    with matplotlib.rc_context(_STYLE), _figure(path, *grid, save_dpi=_DPI, save_format="png", **subplots) as drawn:
        yield drawn


def condition_colours(conditions: list[str]) -> dict[str, str]:
    """One colour per condition, the same in every figure (matplotlib's tab10 cycle)."""
    return {c: f"C{i % 10}" for i, c in enumerate(conditions)}


def token_interval(tokens: list[int]) -> tuple[float, float]:
    """Mean generated tokens and the half-width of its normal 95 % interval, ``1.96·s/√n``
    (``s`` the sample standard deviation; 0 with fewer than two problems).

    Example:
        >>> [round(x, 3) for x in token_interval([10, 20, 30])]
        [20.0, 11.316]
    """
    if not tokens:
        return 0.0, 0.0
    half = 1.96 * statistics.stdev(tokens) / math.sqrt(len(tokens)) if len(tokens) > 1 else 0.0
    return statistics.fmean(tokens), half


def _show(token: str) -> str:
    """A token's text for a label: stripped, newlines shown as ``\\n``, at most 12 characters."""
    text = token.strip() or token
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return text if len(text) <= 12 else text[:11] + "…"


def plot_accuracy_tokens(study: StudyResults, path: str | Path) -> Path | None:
    """Accuracy per condition (Wilson 95 % interval) beside mean generated tokens (mean ± 1.96·s/√n)."""
    summaries = study.summaries
    if not summaries:
        return None
    names = [s.condition for s in summaries]
    colours = condition_colours(study.conditions)
    x = np.arange(len(names))
    path = Path(path)
    with _styled(path, 1, 2, figsize=(max(8, 1.6 * len(names) + 4), 4.2)) as (fig, (left, right)):
        accuracy = [s.accuracy for s in summaries]
        errors = [[s.accuracy - s.low for s in summaries], [s.high - s.accuracy for s in summaries]]
        left.bar(x, accuracy, color=[colours[n] for n in names], yerr=errors, capsize=6, ecolor="0.25")
        left.scatter(x, accuracy, marker="D", s=30, color="0.15", zorder=3, clip_on=False)
        for i, s in enumerate(summaries):
            left.text(i, s.high + 0.02, f"{s.correct}/{s.n}", ha="center", va="bottom", fontsize=10)
        left.set_ylim(0, 1.12)
        left.set_ylabel("accuracy (share correct)")
        left.set_title("accuracy, Wilson 95% interval")
        means = [token_interval([p["n_tokens"] for _, p in study.payloads(n)]) for n in names]
        right.bar(x, [m for m, _ in means], color=[colours[n] for n in names], yerr=[h for _, h in means],
                  capsize=6, ecolor="0.25")
        for i, (m, h) in enumerate(means):
            right.text(i, m + h, f"{m:.0f}", ha="center", va="bottom", fontsize=10)
        right.set_ylim(0, max((m + h for m, h in means), default=1) * 1.15 or 1)
        right.set_ylabel("generated tokens per problem")
        right.set_title("mean tokens, 95% interval")
        for ax in (left, right):
            ax.set_xticks(x, names)
            ax.set_xlabel("condition")
    return path


def plot_thought_counts(study: StudyResults, path: str | Path) -> Path | None:
    """Thoughts per class and condition: totals (grouped bars) and each class's share (stacked)."""
    summaries = [s for s in study.summaries if s.thoughts]
    if not summaries:
        return None
    names = [s.condition for s in summaries]
    x = np.arange(len(names))
    width = 0.8 / len(THOUGHT_CLASSES)
    path = Path(path)
    with _styled(path, 1, 2, figsize=(max(9, 1.8 * len(names) + 5), 4.2)) as (fig, (totals, shares)):
        bottom = np.zeros(len(names))
        for k, label in enumerate(THOUGHT_CLASSES):
            counts = np.array([s.thoughts.get(label, 0) for s in summaries])
            bars = totals.bar(x + (k - 1) * width, counts, width, color=_THOUGHT_COLOURS[label], label=label)
            totals.bar_label(bars, fontsize=8, padding=1)
            share = counts / np.maximum([sum(s.thoughts.values()) for s in summaries], 1)
            shares.bar(x, share, 0.6, bottom=bottom, color=_THOUGHT_COLOURS[label], label=label)
            bottom += share
        totals.yaxis.set_major_locator(MaxNLocator(integer=True))
        totals.set_ylabel("thoughts (all problems)")
        totals.set_title("thoughts per class")
        totals.margins(y=0.12)
        shares.set_ylabel("share of the condition's thoughts")
        shares.set_ylim(0, 1)
        shares.set_title("class shares")
        for ax in (totals, shares):
            ax.set_xticks(x, names)
            ax.set_xlabel("condition")
        shares.legend(title="thought class", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return path


def plot_mi_curves(study: StudyResults, probe: str, path: str | Path, max_problems: int = 6,
                   max_labels: int = 5) -> Path | None:
    """MI per generated token, one panel per problem (the first ``max_problems``), one line per
    condition; peaks are dots, the ``max_labels`` highest of each line labelled with their token."""
    problems = [p for p in study.problems()
                if any(probe in r["payload"].get("probes", {}) for r in study.records if r["problem"] == p)]
    problems = problems[:max_problems]
    if not problems:
        return None
    colours = condition_colours(study.conditions)
    styles = {c: _LINE_STYLES[i % len(_LINE_STYLES)] for i, c in enumerate(study.conditions)}
    widths = {c: 1.0 + 1.2 * (len(study.conditions) - 1 - i) / max(1, len(study.conditions) - 1)
              for i, c in enumerate(study.conditions)}  # earlier conditions drawn wider: equal curves stay visible
    columns = 2 if len(problems) > 1 else 1
    rows = math.ceil(len(problems) / columns)
    path = Path(path)
    with _styled(path, rows, columns, figsize=(7.2 * columns, 3.4 * rows), squeeze=False) as (fig, axes):
        for ax, problem in zip(axes.flat, problems):
            labels: dict[tuple[int, str], list] = {}  # (token index, token) -> [height, conditions labelling it]
            for condition in study.conditions:
                payload = next((p for q, p in study.payloads(condition) if q == problem), None)
                summary = payload.get("probes", {}).get(probe) if payload else None
                if not summary or not summary.get("values"):
                    continue
                values = np.array([np.nan if v is None else v for v in summary["values"]], dtype=float)
                ax.plot(np.arange(len(values)), values, lw=widths[condition], ls=styles[condition],
                        color=colours[condition], alpha=0.85)
                peaks = np.array(summary["peaks"], dtype=int)
                if len(peaks):
                    ax.scatter(peaks, values[peaks], s=28, color=colours[condition], edgecolor="black", lw=0.6, zorder=3)
                    for i in np.argsort(-values[peaks])[:max_labels]:
                        entry = labels.setdefault((int(peaks[i]), summary["peak_tokens"][i]), [values[peaks[i]], []])
                        entry[0] = np.nanmax([entry[0], values[peaks[i]]])
                        entry[1].append(condition)
            # one label per peak token, in its condition's colour, or black when several conditions share it
            for n, ((t, word), (height, where)) in enumerate(sorted(labels.items())):
                ax.annotate(_show(word), (t, height), xytext=(0, 7 + 10 * (n % 2)), textcoords="offset points",
                            ha="center", fontsize=9, fontweight="bold", zorder=4,
                            color=colours[where[0]] if len(where) == 1 else "black")
            ax.set_title(problem, fontsize=11)
            ax.set_xlabel("generated token")
            ax.set_ylabel("MI with the answer")
            ax.margins(y=0.2)
        for ax in list(axes.flat)[len(problems):]:
            ax.set_visible(False)
        # one legend, above the first panel (the layout makes room for it; a figure legend gets none)
        handles = [Line2D([], [], color=colours[c], ls=styles[c], lw=widths[c], label=c) for c in study.conditions]
        axes.flat[0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.12), ncol=len(handles),
                            fontsize=10, title_fontsize=10, frameon=False, alignment="left",
                            title="condition · dots: MI peaks · black label: a peak token shared by conditions")
    return path


def plot_peak_statistics(rows: list[dict], path: str | Path, colours: dict[str, str]) -> Path | None:
    """Per problem (dots) and per condition (bars: means): peaks, peaks per token, AOM."""
    if not rows:
        return None
    names = [r["condition"] for r in rows]
    x = np.arange(len(names))
    jitter = np.random.default_rng(0)
    panels = (("counts", "peaks per problem"), ("ratios", "peaks per generated token"),
              ("aoms", "AOM (mean |m - median| / IQR)"))
    path = Path(path)
    with _styled(path, 1, 3, figsize=(max(12, 2.4 * len(names) + 6), 4.0)) as (fig, axes):
        for ax, (key, label) in zip(axes, panels):
            for i, row in enumerate(rows):
                values = [v for v in row[key] if v is not None]
                if values:
                    ax.bar(i, statistics.fmean(values), 0.6, color=colours[row["condition"]], alpha=0.45)
                    ax.scatter(i + jitter.uniform(-0.18, 0.18, len(values)), values, s=16, color=colours[row["condition"]],
                               edgecolor="black", lw=0.4, zorder=3, clip_on=False)
                else:
                    ax.text(i, 0, "none", ha="center", va="bottom", fontsize=9, color="0.4")
            ax.set_xticks(x, names)
            ax.set_xlabel("condition")
            ax.set_ylabel(label)
            ax.set_title(label.split(" (")[0])
            ax.set_ylim(bottom=0)
    return path


def plot_reasoning_graph(graph, labels, title: str, path: str | Path) -> Path:
    """One sample's reasoning graph: nodes are clusters (size: visits), arrows the transitions
    (width: how often taken); the first step's cluster is green, the last one's red."""
    import networkx as nx

    labels = [int(x) for x in labels]
    path = Path(path)
    with _styled(path, figsize=(7.5, 6.2)) as (fig, ax):
        if graph.number_of_nodes() == 0:
            ax.text(0.5, 0.5, "no steps", ha="center", va="center", transform=ax.transAxes)
        else:
            layout = nx.kamada_kawai_layout(graph) if graph.number_of_nodes() > 2 else nx.circular_layout(graph)
            visits = [graph.nodes[n].get("visits", 1) for n in graph.nodes]
            colours = ["tab:green" if n == labels[0] else "tab:red" if n == labels[-1] else "white" for n in graph.nodes]
            nx.draw_networkx_nodes(graph, layout, ax=ax, node_size=[300 + 180 * v for v in visits], node_color=colours,
                                   edgecolors="0.2", linewidths=1.2)
            nx.draw_networkx_labels(graph, layout, ax=ax, font_size=9)
            nx.draw_networkx_edges(graph, layout, ax=ax, width=[0.8 + 0.9 * c for _, _, c in graph.edges(data="count")],
                                   edge_color="0.45", arrows=True, arrowstyle="-|>", arrowsize=14,
                                   connectionstyle="arc3,rad=0.12", node_size=[300 + 180 * v for v in visits])
            ax.margins(0.08)  # room for the largest nodes at the edges
        ax.legend(handles=[
            Line2D([], [], ls="", marker="o", ms=10, mfc="tab:green", mec="0.2", label="first step's cluster"),
            Line2D([], [], ls="", marker="o", ms=10, mfc="tab:red", mec="0.2", label="last step's cluster"),
            Line2D([], [], ls="", marker="o", ms=14, mfc="white", mec="0.2", label="cluster (size: visits)"),
            Line2D([], [], color="0.45", lw=2, label="transition (width: times taken)"),
        ], loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=9, frameon=False)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    return path


def plot_fired(fired: list[FiredPositions], problems: list[str], path: str | Path,
               colours: dict[str, str]) -> Path | None:
    """Per intervention (one row of panels): a histogram of where it acted, relative to the
    first generated token, and the number of firings per problem."""
    if not fired:
        return None
    path = Path(path)
    with _styled(path, len(fired), 2, figsize=(13, 3.3 * len(fired)), squeeze=False,
                 gridspec_kw={"width_ratios": (1.4, 1)}) as (fig, axes):
        for (where, counts), item in zip(axes, fired):
            colour = colours.get(item.condition, "C0")
            label = f"{item.condition}: {item.name}"
            if item.offsets:
                low, high = min(item.offsets), max(item.offsets)
                step = max(1, math.ceil((high - low + 1) / 40))  # at most 40 bins, each a whole number of tokens
                where.hist(item.offsets, bins=np.arange(low, high + step + 1, step) - 0.5, color=colour,
                           edgecolor="black", lw=0.4)
                where.set_xlim(low - max(3, step), high + max(3, step))
                if item.relative and min(item.offsets) < 0:
                    where.axvline(-0.5, color="0.3", ls="--", lw=1, label="end of the prompt")
                    where.legend(loc="upper right")
            else:
                where.text(0.5, 0.5, "never acted", ha="center", va="center", transform=where.transAxes, color="0.4")
                where.set_xticks([])
                where.set_yticks([])
            where.set_xlabel("generated token index" if item.block_type == "thinking_token_insertion" else
                             "position − prompt length (generated-token offset)" if item.relative else
                             "position id (prompt lengths not recorded)")
            where.set_ylabel("firings")
            where.yaxis.set_major_locator(MaxNLocator(integer=True))
            where.set_title(f"{label}: where ({len(item.offsets)} firings)")
            order = [p for p in problems if p in item.per_problem]
            counts.bar(np.arange(len(order)), [item.per_problem[p] for p in order], color=colour)
            counts.set_xticks(np.arange(len(order)), [_short(p) for p in order], rotation=45, ha="right")
            counts.set_ylim(0, max(1, *item.per_problem.values()) * 1.1)
            counts.yaxis.set_major_locator(MaxNLocator(integer=True))
            counts.set_xlabel("problem")
            counts.set_ylabel("firings")
            counts.set_title(f"{label}: per problem")
    return path


def _short(problem: str) -> str:
    """A problem id for a tick label: its last 14 characters."""
    return problem if len(problem) <= 14 else "…" + problem[-13:]
