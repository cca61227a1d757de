"""The study report: one self-contained report.html (figures embedded as PNG data URIs, nothing
fetched) with the summary's numbers, written from a real tiny study folder; `surgery run` and
`surgery report` write it; a study without probes or interventions still reports."""

import base64
import io
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import PNG_MAGIC
from test_runner import write_study

from experiments.cli import main
from experiments.report import write_report
from experiments.report_data import fired_offsets, graph_analyses, peak_statistics, read_study
from experiments.runner import run_study, study_problems
from experiments.study_config import load_study_config
from experiments.summary import condition_summaries
from probes.peaks import running_peaks

CONDITIONS = ["plain", "mask", "tts"]
PROBLEMS = 3


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A tiny study (three conditions, three problems, all three probes) run once; its output folder."""
    folder = tmp_path_factory.mktemp("report")
    config = load_study_config(write_study(folder, conditions=CONDITIONS))
    run_study(config, problems=study_problems(config)[:PROBLEMS], progress=False)
    return Path(config.output)


def images(page: str) -> list[bytes]:
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(sources) == page.count("<img ")
    prefix = "data:image/png;base64,"
    assert all(source.startswith(prefix) for source in sources), [s[:40] for s in sources]
    return [base64.b64decode(source[len(prefix):], validate=True) for source in sources]


def assert_self_contained(page: str) -> None:
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    for png in images(page):
        assert png.startswith(PNG_MAGIC)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100


def summary_cells(page: str, condition: str) -> list[str]:
    row = re.search(rf'<tr id="summary-{condition}">(.*?)</tr>', page).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_the_report_embeds_every_figure_and_shows_the_summary_numbers(study):
    path = write_report(study, progress=False)
    assert path == study / "report.html"
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    pngs = sorted(p.name for p in (study / "report").glob("*.png"))
    assert pngs == ["accuracy_tokens.png", "fired.png", "graph_graph.png", "mi_curves_mi.png", "mi_peaks_mi.png",
                    "thoughts.png"]
    assert len(images(page)) == len(pngs)
    for png in pngs:
        assert (study / "report" / png).read_bytes().startswith(PNG_MAGIC)
    for section in ("<h2>Summary</h2>", "<h2>Accuracy and length</h2>", "<h2>Thought types</h2>", "<h2>MI peaks (mi)</h2>",
                    "<h2>Reasoning graphs (graph)</h2>", "<h2>Where the interventions acted</h2>", "<h2>Config</h2>",
                    "<details>", "<h1>tiny</h1>"):
        assert section in page, section
    assert f"first {PROBLEMS} of {PROBLEMS} problems" in page
    summaries = condition_summaries(read_study(study).records)
    assert [s.condition for s in summaries] == CONDITIONS  # the config's order
    for s in summaries:
        cells = summary_cells(page, s.condition)
        assert cells[:8] == [s.condition, str(s.n), str(s.correct), f"{s.accuracy:.1%}", f"[{s.low:.3f}, {s.high:.3f}]",
                             f"{s.mean_tokens:.1f}", f"{s.sd_tokens:.1f}", cells[7]]
        assert cells[8] == f"{s.mean_peaks:.2f}"


def test_fired_positions_are_offsets_from_the_first_generated_token(study):
    results = read_study(study)
    fired = {f.condition: f for f in fired_offsets(results)}
    assert sorted(fired) == ["mask", "tts"]  # plain has no intervention
    assert all(f.relative for f in fired.values())
    tokens = {(problem, c): p["n_tokens"] for c in CONDITIONS for problem, p in results.payloads(c)}
    longest = max(tokens.values())
    # a token mask reads the logits of a fed position: the last prompt position (-1) chooses the first token
    assert fired["mask"].offsets and all(-1 <= x <= longest - 2 for x in fired["mask"].offsets)
    assert all(0 <= x < longest for x in fired["tts"].offsets)
    assert sum(fired["mask"].per_problem.values()) == len(fired["mask"].offsets)
    assert len(fired["mask"].per_problem) == PROBLEMS


def test_a_closed_loop_condition_shows_its_signal_and_fires_where_its_own_mi_peaks(tmp_path):
    config = load_study_config(write_study(tmp_path, conditions=["rr_peaks"], max_new_tokens=16))
    run_study(config, problems=study_problems(config)[:PROBLEMS], progress=False)
    results = read_study(config.output)
    (fired,) = fired_offsets(results)
    assert fired.rule == "mi_estimator.peak" and fired.offsets
    for _, payload in results.payloads("rr_peaks"):  # the running-fence rule on the row's own stored values
        values = torch.tensor(payload["probes"]["mi"]["values"], dtype=torch.float64)
        emitted = [p - payload["prompt_tokens"] + 1 for p in payload["fired"]["representation_recycling"]]
        assert emitted == running_peaks(values, 3).tolist()
    page = write_report(config.output, progress=False).read_text()
    assert "mi_estimator.peak" in page and "marks a closed loop" in page


def test_graphs_and_peaks_are_computed_per_condition(study):
    results = read_study(study)
    analyses = graph_analyses(results, "graph")
    assert list(analyses) == CONDITIONS
    for condition, found in analyses.items():
        assert len(found.metrics) == PROBLEMS
        steps = sum(p["probes"]["graph"]["n_steps"] for _, p in results.payloads(condition))
        assert [m.n_steps for m in found.metrics] == [p["probes"]["graph"]["n_steps"] for _, p in results.payloads(condition)]
        assert found.centers.shape[0] == max(1, min(2, steps)) or steps == 0  # the probe's K = 2, capped
    rows = peak_statistics(results, "mi")
    assert [r["condition"] for r in rows] == CONDITIONS
    for row, s in zip(rows, results.summaries):
        assert row["mean_count"] == pytest.approx(s.mean_peaks)


def test_surgery_report_rewrites_it_and_prints_the_table(study, capsys):
    (study / "report.html").unlink(missing_ok=True)
    assert main(["report", str(study), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (study / "report.html").exists() and f"report: {study / 'report.html'}" in printed
    assert any(line.startswith("mask") for line in printed.splitlines())


def test_surgery_report_on_a_folder_that_is_not_a_study_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()  # nothing written into it


def test_a_study_without_probes_or_interventions_reports_what_it_has(tmp_path, capsys):
    """`surgery run` ends with the report; one condition, no probe, no intervention, no MI section."""
    study = write_study(tmp_path, conditions=["plain"], max_new_tokens=4)
    study.write_text(study.read_text().split("[probes]")[0])
    assert main(["run", str(study), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert f"report: {tmp_path / 'out' / 'report.html'}" in printed
    assert_self_contained(page)
    assert "<h2>Summary</h2>" in page and "<h2>Accuracy and length</h2>" in page
    for absent in ("Thought types", "MI peaks", "Reasoning graphs", "Where the interventions acted"):
        assert f"<h2>{absent}" not in page
    assert [p.name for p in (tmp_path / "out" / "report").glob("*.png")] == ["accuracy_tokens.png"]
    assert summary_cells(page, "plain")[8] == "–"  # no MI peaks: shown as a dash


def test_a_vector_loaded_from_a_file_is_shown_with_where_its_traces_came_from(tmp_path):
    import torch

    from experiments.store import ResultStore
    from interventions import SteeringVector

    traces = tmp_path / "traces"
    ResultStore(traces, {"name": "my-traces", "dataset": {"sample": "gsm8k", "offset": 40}, "generation": {"temperature": 0.7},
                         "prompt": {"template": "{question} Check each step."}})
    study_toml = write_study(tmp_path, conditions=["plain", "seal"])
    source = {"study": "my-traces", "folder": str(traces), "condition": "plain"}
    SteeringVector(torch.ones(64), layer=1, metadata={"class_counts": {"execution": 5, "reflection": 2, "transition": 0},
                                                       "n_traces": 7, "source": source}).save(tmp_path / "seal.safetensors")
    config = load_study_config(study_toml)
    run_study(config, problems=study_problems(config)[:1], progress=False)
    page = write_report(config.output, progress=False).read_text(encoding="utf-8")
    section = page[page.index("Where the loaded blocks came from"):]
    assert "from 7 traces whose thoughts were execution 5, reflection 2, transition 0" in section
    assert "study my-traces" in section and "{question} Check each step." in section and "&quot;offset&quot;: 40" in section
    (tmp_path / "seal.safetensors").write_bytes(b"changed")
    page = write_report(config.output, progress=False).read_text(encoding="utf-8")
    assert "the file is gone or changed since the study ran" in page


def test_a_thought_probe_loaded_from_a_file_is_shown_with_its_held_out_accuracy(tmp_path):
    from probes import ThoughtClassifier, fit_linear_probe
    from surgery.files.saving import save_blocks

    study_toml = write_study(tmp_path, conditions=["plain"])
    states = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    probe = fit_linear_probe(states, ["execution", "reflection"] * 6)
    save_blocks(tmp_path / "thought_probe.safetensors", [ThoughtClassifier("resid_pre.2", linear_probe=probe)])
    text = study_toml.read_text().replace('thoughts = { type = "thought_classifier", site = "resid_pre.2" }',
                                          'thoughts = { type = "thought_classifier", from = "thought_probe.safetensors" }')
    study_toml.write_text(text)
    config = load_study_config(study_toml)
    run_study(config, problems=study_problems(config)[:1], progress=False)
    section = write_report(config.output, progress=False).read_text(encoding="utf-8")
    section = section[section.index("Where the loaded blocks came from"):]
    assert (f"probe thoughts</b>: thought_classifier from thought_probe.safetensors at resid_pre.2, with a linear probe "
            f"over execution, reflection: held-out accuracy {probe.held_out_accuracy:.3f} against chance "
            f"{probe.chance_accuracy:.3f}") in section
