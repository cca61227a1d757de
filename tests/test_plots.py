"""Every plot writes a PNG."""

import pytest
import torch
from conftest import ANSWERS, PNG_MAGIC, PROMPTS

import surgery
from probes.graph_metrics import analyse
from probes.mi import MIEstimator
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


def test_classified_thoughts_plot(tiny, tmp_path):
    classifier = ThoughtClassifier("resid_pre.1")
    with surgery.trace(tiny, classifier) as tr:
        tr.generate(PROMPTS, 24, chat=True)
    found = classifier.result()
    found.plot(tmp_path / "thoughts.png")
    assert (tmp_path / "thoughts.png").read_bytes()[:8] == PNG_MAGIC
    plot_thoughts(found, tmp_path / "direct.png")
    assert (tmp_path / "direct.png").read_bytes() == (tmp_path / "thoughts.png").read_bytes()
