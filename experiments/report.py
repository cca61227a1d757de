"""A study's report: one self-contained ``report.html`` and its figures as PNG files.

:func:`write_report` reads a folder written by :func:`experiments.runner.run_study`
(:func:`experiments.report_data.read_study`), draws the figures of
:mod:`experiments.report_plots` into ``folder/report/`` and writes ``folder/report.html``, every
figure embedded as a ``data:image/png;base64`` URI: the page opens from disk with no server, no
script and nothing fetched, and can be mailed as one file. Sections:

- the summary table (the numbers of :func:`experiments.summary.condition_summaries`, the table
  ``surgery run`` prints) and accuracy and mean tokens per condition with 95 % intervals;
- thought classes per condition (a thought-classifier probe);
- MI curves of the first problems with their peaks and peak tokens, and peak statistics per
  condition (an MI probe);
- reasoning-graph metrics per condition and one drawn graph (a reasoning-graph probe);
- where each intervention acted, relative to the first generated token;
- the study's config.

A section whose probe the study lacks is left out; a figure says in its caption what it shows.

Example (on a study folder; ``surgery report runs/gsm8k-baselines`` does the same):
    >>> import tempfile
    >>> from experiments.store import ResultStore
    >>> folder = tempfile.mkdtemp()
    >>> store = ResultStore(folder, {"name": "demo", "conditions": {"plain": []}})
    >>> store.append("p0", "plain", {"n_tokens": 12, "grade": {"correct": True}})
    >>> path = write_report(folder, progress=False)
    >>> path.name, sorted(p.name for p in (path.parent / "report").iterdir())
    ('report.html', ['accuracy_tokens.png'])
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import re
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from experiments.report_data import StudyResults, fired_offsets, graph_analyses, peak_statistics, read_study
from experiments.report_plots import (
    condition_colours,
    plot_accuracy_tokens,
    plot_fired,
    plot_mi_curves,
    plot_peak_statistics,
    plot_reasoning_graph,
    plot_thought_counts,
    token_interval,
)
from surgery.files.saving import load_blocks
from surgery.files.storage import atomic_path

__all__ = ["write_report"]

MI_PANELS = 6  # problems drawn in the MI figure
_NUMERIC = re.compile(r"^[-–\[(]?[\d–]")  # cells right-aligned: numbers, intervals, dashes
MI_LABELS = 5  # peaks labelled with their token per line of the MI figure
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #555; } table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; } td { white-space: nowrap; }
td.text { text-align: left; white-space: normal; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; } figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #444; font-size: 0.92em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; } .note { color: #666; }
"""


def write_report(folder: str | Path, *, progress: bool = True) -> Path:
    """Write ``folder/report.html`` and ``folder/report/*.png`` for the study in ``folder``.

    Args:
        folder: a study's output folder (its ``config.json`` and ``results.jsonl``).
        progress: a progress bar over the report's sections.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: ``folder`` is not a study folder.

    Example::

        write_report("runs/gsm8k-baselines")      # runs/gsm8k-baselines/report.html
    """
    study = read_study(folder)
    figures = study.folder / "report"
    figures.mkdir(exist_ok=True)
    sections = [_summary_section, _vector_section, _thought_section, _mi_section, _graph_section, _fired_section]
    body = []
    with tqdm(sections, desc="report", unit="section", disable=not progress, dynamic_ncols=True) as bar:
        for section in bar:
            body.append(section(study, figures))
    path = study.folder / "report.html"
    with atomic_path(path) as staging:
        staging.write_text(_page(study, "".join(body)), encoding="utf-8")
    return path


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, digits: int = 2) -> str:
    """A table cell: ``–`` for None or NaN, else the number with ``digits`` decimals."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], ids: list[str] | None = None) -> str:
    """An HTML table; ``rows`` hold cells already escaped; ``ids`` name the rows (``<tr id=...>``)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    ids = ids or [""] * len(rows)
    lines = []
    for row_id, row in zip(ids, rows, strict=True):
        attribute = f' id="{_e(row_id)}"' if row_id else ""
        lines.append(f"<tr{attribute}>" + "".join(f"<td>{cell}</td>" if _NUMERIC.match(cell) else
                                                  f"<td class='text'>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _embed(path: Path | None, caption: str) -> str:
    """The PNG at ``path`` as an embedded ``<img>`` with its caption ('' when there is none)."""
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.stem)}">'
            f"<figcaption>{caption} <span class='note'>(report/{_e(path.name)})</span></figcaption></figure>")


def _summary_section(study: StudyResults, figures: Path) -> str:
    if not study.summaries:
        return "<h2>Summary</h2><p>No results stored yet.</p>"
    rows, ids = [], []
    for s in study.summaries:
        mean, half = token_interval([p["n_tokens"] for _, p in study.payloads(s.condition)])
        thoughts = ", ".join(f"{label} {count}" for label, count in s.thoughts.items()) or "–"
        fired = ", ".join(f"{name} {s.fired.get(name, 0)}/{s.n}" for name, _ in study.interventions(s.condition)) or "–"
        rows.append([_e(s.condition), str(s.n), str(s.correct), f"{s.accuracy:.1%}", f"[{s.low:.3f}, {s.high:.3f}]",
                     f"{s.mean_tokens:.1f}", f"{s.sd_tokens:.1f}", f"[{mean - half:.1f}, {mean + half:.1f}]",
                     _number(s.mean_peaks), _e(thoughts), _e(fired)])
        ids.append(f"summary-{s.condition}")
    table = _table(["condition", "n", "correct", "accuracy", "accuracy 95% CI (Wilson)", "mean tokens", "sd tokens",
                    "mean tokens 95% CI", "MI peaks / problem", "thoughts", "interventions acted (problems)"], rows, ids)
    caption = ("Left: share of problems graded correct per condition; error bars are Wilson 95% score intervals "
               "(numbers above: correct/n). Right: mean generated tokens per problem; error bars are mean ± "
               "1.96·s/√n with s the sample standard deviation (the table's sd is the population one).")
    return (f"<h2>Summary</h2>{table}<h2>Accuracy and length</h2>"
            + _embed(plot_accuracy_tokens(study, figures / "accuracy_tokens.png"), caption))


def _vector_section(study: StudyResults, figures: Path) -> str:
    """Where each block loaded from a file came from: its metadata and, for a vector extracted
    from a study's traces, that study's prompt, sampling and problems; for a thought classifier
    carrying a linear probe, the probe's held-out accuracy."""
    items = []
    loaded = [(condition, spec) for condition, specs in study.config.get("conditions", {}).items() for spec in specs]
    loaded += [(f"probe {name}", spec) for name, spec in study.config.get("probes", {}).items()]
    for condition, spec in loaded:
        if not spec.get("from"):
            continue
        path = Path(spec["from"])
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != spec.get("from_sha256"):
            items.append(f"<li><b>{_e(condition)}</b>: {_e(spec['type'])} from {_e(path)}: the file is gone or "
                         "changed since the study ran, so its metadata is not shown</li>")
            continue
        metadata = {key: value for block in load_blocks(path) for key, value in getattr(block, "metadata", {}).items()}
        source = metadata.pop("source", None)
        text = f"<b>{_e(condition)}</b>: {_e(spec['type'])} from {_e(path.name)}"
        if "class_counts" in metadata:
            counts = ", ".join(f"{label} {count}" for label, count in metadata["class_counts"].items())
            text += (f", extracted at {_e(metadata.get('site', '?'))} of {_e(metadata.get('model', '?'))} from "
                     f"{_e(metadata.get('n_traces', '?'))} traces whose thoughts were {_e(counts)}")
        probe = spec.get("config", {}).get("linear_probe")
        if probe:
            text += (f" at {_e(spec['config'].get('site', '?'))}, with a linear probe over {_e(', '.join(probe['classes']))}: "
                     f"held-out accuracy {probe['held_out_accuracy']:.3f} against chance {probe['chance_accuracy']:.3f} "
                     f"(trained on {_e(json.dumps(probe['train_counts']))}, held out {_e(json.dumps(probe['test_counts']))})")
        if metadata:
            text += "<pre>" + _e(json.dumps(metadata, sort_keys=True)) + "</pre>"
        origin = Path(source["folder"]) / "config.json" if isinstance(source, dict) else None
        if origin is not None and origin.is_file():
            traced = json.loads(origin.read_text(encoding="utf-8"))["config"]
            text += (f"The traces are condition {_e(source['condition'])} of study {_e(traced['name'])}: dataset "
                     f"{_e(json.dumps(traced['dataset'], sort_keys=True))}, generation "
                     f"{_e(json.dumps(traced['generation'], sort_keys=True))}, prompt template:"
                     f"<pre>{_e(traced['prompt']['template'])}</pre>")
        items.append(f"<li>{text}</li>")
    return f"<h2>Where the loaded blocks came from</h2><ul>{''.join(items)}</ul>" if items else ""


def _thought_section(study: StudyResults, figures: Path) -> str:
    path = plot_thought_counts(study, figures / "thoughts.png")
    if path is None:
        if study.probes_of_type("thought_classifier") and study.summaries:
            return ("<h2>Thought types</h2><p>The thought classifier found no thought in any condition (no blank-line "
                    "separator in the generated reasoning).</p>")
        return ""
    caption = ("Thoughts (text between blank lines of the generated reasoning, SEAL §3) by class: execution, "
               "reflection (\"wait\", \"let me check\"...), transition (\"alternatively\"...). Left: counts over "
               "all problems; right: each class's share of the condition's thoughts.")
    return "<h2>Thought types</h2>" + _embed(path, caption)


def _mi_section(study: StudyResults, figures: Path) -> str:
    parts = []
    colours = condition_colours(study.conditions)
    for probe in study.probes_of_type("mi_estimator"):
        shown = min(MI_PANELS, len(study.problems()))
        curves = plot_mi_curves(study, probe, figures / f"mi_curves_{probe}.png", max_problems=MI_PANELS,
                                max_labels=MI_LABELS)
        rows = peak_statistics(study, probe)
        stats = plot_peak_statistics(rows, figures / f"mi_peaks_{probe}.png", colours)
        if curves is None and stats is None:
            continue
        table = _table(
            ["condition", "problems", "with peaks", "peaks / problem", "peaks / token", "mean gap (tokens)", "mean AOM",
             "mean MI", "most frequent peak tokens"],
            [[_e(r["condition"]), str(r["n"]), str(r["with_peaks"]), _number(r["mean_count"]), _number(r["mean_ratio"], 4),
              _number(r["mean_gap"], 1), _number(r["mean_aom"]), _number(r["mean_mi"], 3),
              _e(", ".join(f"{token} ×{count}" for token, count in r["tokens"]) or "–")] for r in rows])
        parts.append(
            f"<h2>MI peaks ({_e(probe)})</h2>"
            + _embed(curves, f"MI between each generated token's representation and the answer's (nHSIC), for the "
                              f"first {shown} of {len(study.problems())} problems, one line per condition (lines "
                              "coincide where conditions generated the same tokens). Dots are peaks (Tukey's fence "
                              f"Q3 + 1.5·IQR of the row's values); the highest {MI_LABELS} of each line are labelled "
                              "with their token, once when several conditions share it (then in black).")
            + _embed(stats, "Peak statistics per condition: one dot per problem, bars are means. AOM is the mean "
                             "over a row's peaks of |m − median| / IQR (no dot for a row without peaks).")
            + table + "<p class='note'>Means over problems; gap and AOM over the problems that have them "
                      "(a gap needs two peaks).</p>")
    return "".join(parts)


def _graph_section(study: StudyResults, figures: Path) -> str:
    parts = []
    for probe in study.probes_of_type("reasoning_graph"):
        analyses = graph_analyses(study, probe)
        if not analyses:
            continue
        rows = []
        for condition, found in analyses.items():
            m = found.metrics
            mean = lambda key: statistics.fmean(getattr(x, key) for x in m) if m else None  # noqa: E731
            rows.append([_e(condition), str(len(m)), str(found.centers.shape[0]), _number(mean("n_steps"), 1),
                         _number(mean("n_nodes"), 1), _number(found.cycle_detection_ratio), _number(mean("cycle_count")),
                         _number(mean("cycle_count_max")), _number(mean("diameter"), 1),
                         _number(mean("average_path_length"), 1), _number(mean("average_hops")),
                         _number(mean("clustering")), _number(mean("small_world_hops")),
                         _number(mean("small_world_weighted"))])
        table = _table(["condition", "samples", "K", "steps", "nodes", "cycle detection", "cycles", "cycles (max)",
                        "diameter", "path length (weighted)", "path length (hops)", "clustering",
                        "small world (hops)", "small world (weighted)"], rows)
        drawn = _draw_one_graph(study, probe, analyses, figures)
        parts.append(
            f"<h2>Reasoning graphs ({_e(probe)})</h2>{table}<p class='note'>Per condition, the step vectors of all its "
            "problems are clustered together (K-means, the probe's K capped at the condition's steps); each problem's "
            "steps become a walk through the clusters. Means over problems: cycles (released rule: visits of the "
            "first revisited cluster minus one), diameter and path lengths (weighted in hidden-state units, or hops), "
            "clustering over nodes of degree ≥ 2, small-world index S with either path length.</p>" + drawn)
    return "".join(parts)


def _draw_one_graph(study: StudyResults, probe: str, analyses: dict, figures: Path) -> str:
    condition, found = next(iter(analyses.items()))
    problems = [q for q, p in study.payloads(condition) if probe in p.get("probes", {})]
    if not found.graphs:
        return ""
    # the sample with the most revisits (cycles show), then the most clusters, then the first
    i = max(range(len(found.graphs)), key=lambda j: (found.metrics[j].cycle_count_max, found.metrics[j].n_nodes, -j))
    m = found.metrics[i]
    title = f"{condition}, {problems[i]}: {m.n_steps} steps, {m.n_nodes} clusters, cycle count {m.cycle_count}"
    path = plot_reasoning_graph(found.graphs[i], found.labels[i], title, figures / f"graph_{probe}.png")
    return _embed(path, f"The reasoning graph of one problem of condition {_e(condition)} (its sample with the most "
                         "revisits, then the most clusters): nodes are clusters of steps, numbered by the condition's K-means, sized by visits; "
                         "arrows are transitions between consecutive steps in different clusters.")


def _fired_section(study: StudyResults, figures: Path) -> str:
    fired = fired_offsets(study)
    path = plot_fired(fired, study.problems(), figures / "fired.png", condition_colours(study.conditions))
    if path is None:
        return ""
    rows = [[_e(f.condition), _e(f.name), _e(f.rule or "its own rule"), str(sum(1 for c in f.per_problem.values() if c)),
             str(len(f.per_problem)),
             str(len(f.offsets)), _number(len(f.offsets) / len(f.per_problem) if f.per_problem else None, 1),
             (f"{min(f.offsets)} … {max(f.offsets)}" + ("" if f.relative else " (position ids)")) if f.offsets else "–"]
            for f in fired]
    table = _table(["condition", "intervention", "fires on", "problems acted on", "problems", "firings",
                    "firings / problem", "offset range"], rows)
    caption = ("Where each intervention acted. Left: firings by generated-token offset (position id minus the row's "
               "prompt length; for token masks and recycling the position whose logits choose the next token, so "
               "−1 chooses the first generated token; thinking-token insertion: the index of the inserted word). "
               "Right: firings per problem. Conditions without interventions are not shown. \"Fires on\" is the "
               "block's trigger; <code>probe.signal</code> marks a closed loop: it fires where that probe, attached to "
               "the same run, measured something while decoding (\"its own rule\": the block's built-in rule, e.g. "
               "recycling's thinking words, the token mask's words).")
    if not all(f.relative for f in fired):
        caption += (" This study's records do not hold prompt lengths (written before records kept "
                    "<code>prompt_tokens</code>): positions are shown as position ids, counted from the prompt's "
                    "first token.")
    return "<h2>Where the interventions acted</h2>" + _embed(path, caption) + table


def _page(study: StudyResults, body: str) -> str:
    config = study.config
    model = config.get("model", {})
    dataset = config.get("dataset", {})
    source = f"sample {dataset['sample']}" if dataset.get("sample") else dataset.get("path") or "?"
    results = study.folder / "results.jsonl"
    written = datetime.datetime.fromtimestamp(results.stat().st_mtime).strftime("%Y-%m-%d %H:%M") if results.exists() else "–"
    missing = [c for c in study.conditions if c not in {s.condition for s in study.summaries}]
    meta = (f"model <b>{_e(model.get('name', '?'))}</b> ({_e(model.get('dtype', '?'))}) · dataset <b>{_e(source)}</b> "
            f"({_e(dataset.get('format') or '')}, {len(study.problems())} problems) · conditions "
            f"{_e(', '.join(study.conditions))} · results written {written} · report made "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    note = f"<p class='note'>Conditions without results yet: {_e(', '.join(missing))}.</p>" if missing else ""
    settings = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(config.get('name', 'study'))} – "
            f"report</title><style>{_CSS}</style></head><body><h1>{_e(config.get('name', 'study'))}</h1>"
            f"<p class='meta'>{meta}</p>{note}{body}<h2>Config</h2><details><summary>the study's config "
            f"(config.json)</summary><pre>{_e(settings)}</pre></details></body></html>\n")
