"""Tukey peaks and their statistics against hand-computed fences."""

import math

import pytest
import torch
from tolerance import close

from probes.peaks import PeakStats, tukey_peaks


def test_tukey_peaks_by_hand_with_interpolated_quartiles():
    # sorted: 1 2 2 3 3 4 5 6 7 20 25 30 (n = 12, linear interpolation at q·(n-1))
    # Q1 at 2.75: 2 + 0.75·1 = 2.75; median at 5.5: 4.5; Q3 at 8.25: 7 + 0.25·13 = 10.25
    # IQR = 7.5, fence = 10.25 + 11.25 = 21.5: 30 (index 7) and 25 (index 11) are peaks, 20 is not
    values = torch.tensor([1, 20, 3, 4, 5, 6, 7, 30, 3, 2, 2, 25], dtype=torch.float64)
    peaks, stats = tukey_peaks(values)
    assert peaks.tolist() == [7, 11]
    assert (stats.count, stats.min_gap, stats.max_gap, stats.mean_gap) == (2, 4, 4, 4.0)
    assert close(stats.ratio, 2 / 12)
    assert close(stats.mean, 9.0)  # 108 / 12
    assert close(stats.std, math.sqrt(2078 / 12 - 81))  # population std
    assert close(stats.aom, ((30 - 4.5) + (25 - 4.5)) / 2 / 7.5)


def test_tukey_peaks_gaps_and_degenerate_cases():
    # nine 1s, three 10s: Q1 = 1, median = 1, Q3 at 8.25 = 1 + 0.25·9 = 3.25, fence = 6.625
    peaks, stats = tukey_peaks(torch.tensor([10.0, 1, 10, 1, 1, 1, 1, 10, 1, 1, 1, 1]))
    assert peaks.tolist() == [0, 2, 7]
    assert (stats.min_gap, stats.max_gap, stats.mean_gap) == (2, 5, 3.5)
    assert close(stats.aom, 9 / 2.25)
    peaks, stats = tukey_peaks(torch.ones(5))
    assert peaks.tolist() == [] and stats == PeakStats(0, 0.0, None, None, None, 1.0, 0.0, None)
    peaks, stats = tukey_peaks(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]))
    assert peaks.tolist() == [4] and stats.min_gap is None and stats.aom is None  # IQR 0
    with pytest.raises(ValueError, match="empty"):
        tukey_peaks(torch.zeros(0))
