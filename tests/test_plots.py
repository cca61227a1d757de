"""Every plot writes a PNG."""

import pytest
import torch
from conftest import ANSWERS, PNG_MAGIC, PROMPTS

import surgery
from probes.graph_metrics import analyse
from probes.mi import MIEstimator, MIResult
from probes.plots import plot_mi, plot_thoughts, plot_trajectory
from probes.thought_classifier import ThoughtClassifier


def test_plot_trajectory_writes_a_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    steps = torch.randn(12, 16, generator=generator)
    found = analyse([steps], n_clusters=4, n_init=2)
    path = plot_trajectory(steps, found.labels[0], found.centers, tmp_path / "trajectory.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    one = plot_trajectory(steps[:1], [0], steps[:1], tmp_path / "one.png")
    assert one.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="at least one step"):
        plot_trajectory(steps[:0], [], found.centers, tmp_path / "none.png")


def test_mi_result_plot(tiny_llama, tmp_path):
    probe = MIEstimator("resid_post.1", answers=ANSWERS, sigma=10.0)
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(PROMPTS, 10)
    path = tmp_path / "mi.png"
    probe.result().plot(path, row=1)
    assert path.read_bytes()[:8] == PNG_MAGIC
    plot_mi(probe.result(), tmp_path / "direct.png", row=1)
    assert (tmp_path / "direct.png").read_bytes() == path.read_bytes()


def drawn_mi(result, path, monkeypatch):
    """Plot with plot_mi and return its axes (kept past the figure's closing) to read what it drew."""
    from contextlib import contextmanager

    import probes.plots as plots

    kept, original = [], plots._figure

    @contextmanager
    def keeping(*args, **kwargs):
        with original(*args, **kwargs) as (fig, ax):
            kept.append(ax)
            yield fig, ax

    monkeypatch.setattr(plots, "_figure", keeping)
    plot_mi(result, path, row=0)
    assert path.read_bytes()[:8] == PNG_MAGIC
    return kept[0]


def test_mi_plot_marks_the_peaks_of_its_rule(monkeypatch, tmp_path):
    """Tukey peaks come with the fence they are above; top-k peaks (the released rule) without one."""
    from probes.peaks import top_k_peaks, tukey_peaks

    values = torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0, 1.5, 3.0], dtype=torch.float64)
    for rule, (peaks, stats), fences in (("tukey", tukey_peaks(values), 1), ("top_k", top_k_peaks(values, 3), 0)):
        result = MIResult([values], [peaks], [stats], peak_rule=rule, top_k=3 if rule == "top_k" else None)
        ax = drawn_mi(result, tmp_path / f"{rule}.png", monkeypatch)
        (dots,) = ax.collections
        assert dots.get_offsets()[:, 0].tolist() == peaks.tolist()
        assert dots.get_offsets()[:, 1].tolist() == values[peaks].tolist()
        lines = ax.get_lines()  # the MI curve, then the fence for Tukey's rule
        assert len(lines) == 1 + fences
        if fences:
            assert lines[1].get_ydata()[0] == 5.375  # Q3 2.75 + 1.5 · IQR 1.75
        assert ("top 3" in ax.get_title()) == (rule == "top_k")
    assert top_k_peaks(values, 3)[0].tolist() == [3, 7, 9] and tukey_peaks(values)[0].tolist() == [3, 7]


def test_classified_thoughts_plot(tiny, tmp_path):
    classifier = ThoughtClassifier("resid_pre.1")
    with surgery.trace(tiny, classifier) as tr:
        tr.generate(PROMPTS, 24, chat=True)
    found = classifier.result()
    found.plot(tmp_path / "thoughts.png")
    assert (tmp_path / "thoughts.png").read_bytes()[:8] == PNG_MAGIC
    plot_thoughts(found, tmp_path / "direct.png")
    assert (tmp_path / "direct.png").read_bytes() == (tmp_path / "thoughts.png").read_bytes()
