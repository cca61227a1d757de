"""Every plot writes a PNG."""

import pytest
import torch
from conftest import PNG_MAGIC

from probes.graph_metrics import analyse
from probes.plots import plot_trajectory


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
