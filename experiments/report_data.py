"""What a study's report reads from its folder, and the numbers it computes before plotting.

:func:`read_study` opens a folder written by :func:`experiments.runner.run_study` (its
``config.json`` and ``results.jsonl``, checked by :class:`~experiments.store.ResultStore`) as a
:class:`StudyResults`: the config, the records in file order, the conditions in the order the
runner wrote them, and :func:`~experiments.summary.condition_summaries`. The functions after it
turn the records into what :mod:`experiments.report_plots` draws:

- :func:`peak_statistics`: per condition, the MI-peak statistics of one MI probe, averaged over
  problems (arXiv 2506.02867, §3; METHODS.md §2), and the most frequent peak tokens;
- :func:`graph_analyses`: per condition, the step vectors of every row (the sidecars'
  ``<probe>.steps``) clustered and measured by :func:`probes.graph_metrics.analyse`, the
  function :meth:`probes.ReasoningGraph.analyse` calls (arXiv 2506.05744, §3; METHODS.md §3);
- :func:`fired_offsets`: per condition and intervention, where it acted, relative to the first
  generated token.

Deviation from the paper: the reasoning graph's K-means is fitted per condition (the paper fits
one per model, dataset and layer), with K capped at the condition's number of steps.

Example::

    study = read_study("runs/gsm8k-baselines")
    [(s.condition, s.accuracy) for s in study.summaries]
    peak_statistics(study, "mi")[0]["mean_count"]
    graph_analyses(study, "graph")["plain"].cycle_detection_ratio
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from experiments.store import ResultStore
from experiments.summary import ConditionSummary, condition_summaries
from probes.graph_metrics import GraphAnalysis, analyse
from probes.reasoning_graph import ReasoningGraphConfig

__all__ = ["FiredPositions", "StudyResults", "fired_offsets", "graph_analyses", "peak_statistics", "read_study",
           "trigger_text"]

#: Blocks whose ``fired`` entries are generated-token indices already (every other block records
#: position ids, 0 at the row's first prompt token: see each block's ``by_row``).
GENERATED_INDEX_BLOCKS = frozenset({"thinking_token_insertion"})


@dataclass
class StudyResults:
    """A study folder as the report reads it.

    Attributes:
        folder: the study's output folder.
        config: the study's config (``config.json``'s ``"config"``: ``StudyConfig.to_dict()``).
        records: the stored records (``{"problem", "condition", "payload"}``), in file order.
        conditions: conditions with records, in the order first stored (the config's order for
            a run of ``run_study``); then any of the config's conditions without records.
        summaries: :func:`~experiments.summary.condition_summaries` of the records.
    """

    folder: Path
    config: dict
    records: list[dict]
    conditions: list[str]
    summaries: list[ConditionSummary] = field(default_factory=list)

    def probes_of_type(self, block_type: str) -> list[str]:
        """Names of the study's probes of one registry type (e.g. ``"mi_estimator"``), sorted."""
        return sorted(name for name, spec in self.config.get("probes", {}).items() if spec.get("type") == block_type)

    def payloads(self, condition: str) -> list[tuple[str, dict]]:
        """``(problem id, payload)`` of each record of ``condition``, in file order."""
        return [(r["problem"], r["payload"]) for r in self.records if r["condition"] == condition]

    def problems(self) -> list[str]:
        """Problem ids in the order first stored."""
        return list(dict.fromkeys(r["problem"] for r in self.records))

    def interventions(self, condition: str) -> list[tuple[str, str]]:
        """``(record name, block type)`` of a condition's interventions, as the runner names them."""
        seen: Counter = Counter()
        names = []
        for spec in self.config.get("conditions", {}).get(condition, []):
            seen[spec["type"]] += 1
            names.append((spec["type"] if seen[spec["type"]] == 1 else f"{spec['type']}#{seen[spec['type']]}", spec["type"]))
        return names


def read_study(folder: str | Path) -> StudyResults:
    """Read a study folder: its config (hash checked) and every complete record.

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder`` (not a study folder).
        ValueError: a damaged config or results file (the message names the line).
    """
    folder = Path(folder)
    store = ResultStore.of_folder(folder)
    config = store.config
    records = list(store.records())
    summaries = condition_summaries(records)
    conditions = [s.condition for s in summaries]
    conditions += [c for c in config.get("conditions", {}) if c not in conditions]
    return StudyResults(folder, config, records, conditions, summaries)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def peak_statistics(study: StudyResults, probe: str, top_tokens: int = 8) -> list[dict]:
    """Per condition with records of MI probe ``probe``: its peak statistics over problems.

    Returns:
        One dict per condition: ``condition``, ``n`` (problems), ``counts``, ``ratios``, ``aoms``
        (one entry per problem; AOM None without peaks), ``mean_count``, ``mean_ratio``,
        ``mean_gap``, ``mean_aom``, ``mean_mi`` (None where no problem has the statistic),
        ``with_peaks`` (problems with at least one peak) and ``tokens`` (the ``top_tokens`` most
        frequent peak tokens, stripped, with their counts).
    """
    rows = []
    for condition in study.conditions:
        stats = [p["probes"][probe] for _, p in study.payloads(condition) if probe in p.get("probes", {})]
        if not stats:
            continue
        counts = [len(s["peaks"]) for s in stats]
        tokens = Counter(t.strip() or repr(t) for s in stats for t in s.get("peak_tokens", []))
        rows.append({
            "condition": condition, "n": len(stats), "counts": counts,
            "ratios": [s["stats"].get("ratio") for s in stats], "aoms": [s["stats"].get("aom") for s in stats],
            "mean_count": statistics.fmean(counts), "mean_ratio": _mean([s["stats"].get("ratio") for s in stats]),
            "mean_gap": _mean([s["stats"].get("mean_gap") for s in stats]),
            "mean_aom": _mean([s["stats"].get("aom") for s in stats]),
            "mean_mi": _mean([s["stats"].get("mean") for s in stats]),
            "with_peaks": sum(c > 0 for c in counts), "tokens": tokens.most_common(top_tokens),
        })
    return rows


def graph_analyses(study: StudyResults, probe: str) -> dict[str, GraphAnalysis]:
    """Per condition, its rows' reasoning graphs: K-means over the condition's steps pooled.

    K, the seed and ``n_init`` are the probe's (``config.json``); K is capped at the number of
    steps of the condition (at least 1). Rows without a sidecar count as rows without steps.

    Returns:
        condition -> :class:`~probes.graph_metrics.GraphAnalysis`, its samples in file order;
        conditions without records of the probe are left out.
    """
    defaults = ReasoningGraphConfig()
    options = study.config.get("probes", {}).get(probe, {}).get("config", {})
    n_clusters = options.get("n_clusters", defaults.n_clusters)
    found = {}
    for condition in study.conditions:
        payloads = [p for _, p in study.payloads(condition) if probe in p.get("probes", {})]
        if not payloads:
            continue
        steps = []
        for payload in payloads:
            sidecar = study.folder / payload["tensors"] if payload.get("tensors") else None
            tensors = load_file(str(sidecar)) if sidecar is not None and sidecar.is_file() else {}
            steps.append(tensors.get(f"{probe}.steps", torch.zeros(0, 0)))
        width = max((int(s.shape[1]) for s in steps if s.ndim == 2 and s.shape[0]), default=0)
        steps = [s if s.shape[0] else torch.zeros(0, width) for s in steps]
        total = sum(int(s.shape[0]) for s in steps)
        found[condition] = analyse(steps, max(1, min(n_clusters, total)), seed=options.get("seed", defaults.seed),
                                   n_init=options.get("n_init", defaults.n_init))
    return found


@dataclass
class FiredPositions:
    """Where one intervention of one condition acted.

    Attributes:
        condition, name, block_type: the condition, the intervention's record name, its type.
        offsets: every firing, as an offset from the first generated token (negative: in the
            prompt); position ids minus the row's ``prompt_tokens``, or the block's own
            generated-token index (:data:`GENERATED_INDEX_BLOCKS`). Absolute position ids when
            the records do not hold ``prompt_tokens`` (``relative`` False).
        per_problem: problem id -> number of firings, for every problem of the condition.
        relative: whether ``offsets`` are relative to the first generated token.
        rule: where it fires, from its config's trigger (:func:`trigger_text`); "" without one.
    """

    condition: str
    name: str
    block_type: str
    offsets: list[int]
    per_problem: dict[str, int]
    relative: bool
    rule: str = ""


def trigger_text(data: dict | None) -> str:
    """A trigger's JSON form (``Trigger.to_dict``) as a short formula; closed-loop reads show
    as ``probe.signal``.

    >>> print(trigger_text({"kind": "and", "left": {"kind": "text", "text": "\\n\\n", "case_sensitive": True},
    ...               "right": {"kind": "signal", "source": "thought_classifier", "signal": "predicted", "op": "in",
    ...                         "value": ["reflection", "transition"], "previous": False}}))
    text '\\n\\n' & thought_classifier.predicted in [reflection, transition]
    """
    if not data:
        return ""
    kind = data.get("kind")
    if kind in ("and", "or"):
        return f"{trigger_text(data['left'])} {'&' if kind == 'and' else '|'} {trigger_text(data['right'])}"
    if kind == "not":
        return f"~({trigger_text(data['inner'])})"
    if kind == "signal":
        value = data.get("value")
        shown = f"[{', '.join(map(str, value))}]" if isinstance(value, list) else value
        comparison = "" if data.get("op") == "true" else f" {data['op']} {shown}"
        return f"{data['source']}.{data['signal']}{comparison}" + (" (previous step)" if data.get("previous") else "")
    if kind == "text":
        return f"text {data['text']!r}"
    if kind == "tokens":
        return f"tokens {', '.join(map(repr, data.get('strings', [])))}{' ids ' + str(data['ids']) if data.get('ids') else ''}"
    if kind == "step_window":
        return f"steps {data.get('start', 0)}…{'' if data.get('stop') is None else data['stop']}"
    return {"in_think": "in <think>", "always": "always"}.get(kind, str(kind))


def fired_offsets(study: StudyResults) -> list[FiredPositions]:
    """Per condition and intervention keeping positions (``fired`` lists of ints), where it acted.

    Interventions whose ``fired`` entries are None (nothing kept per row) or not position lists
    are left out, as are conditions without interventions.
    """
    found = []
    for condition in study.conditions:
        payloads = study.payloads(condition)
        blocks = study.config.get("conditions", {}).get(condition, [])
        specs = {name: spec for (name, _), spec in zip(study.interventions(condition), blocks)}
        for name, block_type in study.interventions(condition):
            entries = [(problem, p.get("fired", {}).get(name), p.get("prompt_tokens")) for problem, p in payloads]
            if not entries or not all(isinstance(e, list) and all(type(x) is int for x in e) for _, e, _ in entries):
                continue
            relative = block_type in GENERATED_INDEX_BLOCKS or all(isinstance(n, int) for _, _, n in entries)
            shift = (lambda n: 0) if block_type in GENERATED_INDEX_BLOCKS or not relative else (lambda n: n)
            offsets = [x - shift(n) for _, e, n in entries for x in e]
            config = specs[name].get("config", {}) if name in specs else {}
            rule = trigger_text(config.get("when"))
            if rule and config.get("words"):  # e.g. the token mask: its words, where its trigger holds
                rule = f"its words, {rule}"
            found.append(FiredPositions(condition, name, block_type, offsets,
                                        {problem: len(e) for problem, e, _ in entries}, relative, rule))
    return found
