"""Peaks and their statistics: Tukey's fence against hand-computed fences; the released top-k
rule against our transcription of the released notebook's."""

import dataclasses
import math

import pytest
import torch
from tolerance import close

from probes.peaks import PeakStats, kth_largest_so_far, running_top_k_peaks, top_k_peaks, tukey_peaks


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


# ---- the released notebook's rule: the top k values ----------------------------------------


def notebook_top_k(values, k):
    """Reference, in our words, for how ChnQ/MI-Peaks ``src/plot_mi_peaks.ipynb`` picks peaks.

    The notebook orders a series' indices from the largest value to the smallest with Python's
    stable sort (``reverse=True`` keeps the stability), and keeps the first 20. Said by counts:
    index t is kept when the values ranked ahead of it (strictly larger anywhere, or equal and
    earlier) are fewer than k. Series of k values or fewer keep every index. Ascending here.
    """
    v = [float(x) for x in values]
    return [t for t in range(len(v)) if sum(x > v[t] for x in v) + sum(x == v[t] for x in v[:t]) < k]


def test_top_k_peaks_by_hand():
    values = torch.tensor([1, 20, 3, 4, 5, 6, 7, 30, 3, 2, 2, 25], dtype=torch.float64)
    peaks, stats = top_k_peaks(values, k=3)
    assert peaks.tolist() == [1, 7, 11]  # 30, 25, 20
    # the same statistics as Tukey's for the same peaks: median 4.5, IQR 7.5 (see above)
    assert (stats.count, stats.min_gap, stats.max_gap, stats.mean_gap) == (3, 4, 6, 5.0)
    assert close(stats.ratio, 3 / 12) and close(stats.mean, 9.0)
    assert close(stats.aom, ((20 - 4.5) + (30 - 4.5) + (25 - 4.5)) / 3 / 7.5)
    # ties: three 5s compete for the last two places; the earliest win
    assert top_k_peaks(torch.tensor([5.0, 1, 5, 9, 5]), k=3)[0].tolist() == [0, 2, 3]
    # shorter than k: every token; a flat series: the first k
    assert top_k_peaks(torch.tensor([3.0, 1.0]), k=20)[0].tolist() == [0, 1]
    peaks, stats = top_k_peaks(torch.ones(30), k=20)
    assert peaks.tolist() == list(range(20)) and stats.aom is None and stats.min_gap == 1  # IQR 0


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("n", [1, 5, 20, 21, 64])
def test_top_k_peaks_equals_the_notebook_rule(k, n):
    g = torch.Generator().manual_seed(100 * k + n)
    tied = torch.randint(0, 6, (n,), generator=g).to(torch.float32) / 8  # many ties, exact in float32
    spread = torch.randn(n, generator=g, dtype=torch.float64)
    for values in (tied, spread):
        peaks, stats = top_k_peaks(values, k)
        assert peaks.tolist() == notebook_top_k(values, k)
        assert stats.count == min(k, n)


def test_top_k_peaks_refuses_bad_input():
    for k in (0, -1, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            top_k_peaks(torch.ones(4), k)
    for k in (2.5, None):
        with pytest.raises((ValueError, TypeError)):  # jaxtyping's TypeError under pytest, ours otherwise
            top_k_peaks(torch.ones(4), k)
    with pytest.raises(ValueError, match="empty"):
        top_k_peaks(torch.zeros(0))
    with pytest.raises(ValueError, match=r"NaN values \(at indices \[1\]\)"):
        top_k_peaks(torch.tensor([1.0, float("nan"), 2.0]))
    for peaks_of in (tukey_peaks, top_k_peaks):
        with pytest.raises(ValueError, match="ratio_steps must be one of"):
            peaks_of(torch.ones(4), ratio_steps="tokens")


# ---- PeakStats.ratio as the released code counts ------------------------------------------


def test_ratio_steps_released_total_tokens_divides_by_one_fewer():
    """cal_mi.py stores total_tokens = generated ids without the last: N - 1 for N MI values."""
    values = torch.randn(512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for peaks_of in (tukey_peaks, lambda v, **kw: top_k_peaks(v, 20, **kw)):
        peaks, stats = peaks_of(values)
        released_peaks, released = peaks_of(values, ratio_steps="released_total_tokens")
        assert released_peaks.tolist() == peaks.tolist()
        assert close(stats.ratio, len(peaks) / 512) and close(released.ratio, len(peaks) / 511)
        assert dataclasses.replace(released, ratio=stats.ratio) == stats  # nothing else changes
    assert top_k_peaks(values, 20, "released_total_tokens")[1].ratio == 20 / 511
    assert math.isnan(top_k_peaks(torch.ones(1), 20, "released_total_tokens")[1].ratio)  # 0 steps
    assert tukey_peaks(torch.ones(1))[1].ratio == 0.0


# ---- the running top-k rule (the closed-loop "peak" signal with peak_rule="top_k") ----------


def reference_running_top_k(values, k, warmup):
    """t fires when t >= warmup, at least k values came before it, and fewer than k of them are
    at least as large as m_t (so m_t takes a place in the top k of the series so far)."""
    v = [float(x) for x in values]
    return [t for t in range(len(v)) if t >= warmup and t >= k and sum(x >= v[t] for x in v[:t]) < k]


@pytest.mark.parametrize("k, warmup", [(1, 1), (3, 2), (3, 8), (20, 16)])
def test_running_top_k_peaks_equals_the_reference_and_holds_the_offline_peaks(k, warmup):
    g = torch.Generator().manual_seed(k + warmup)
    for values in (torch.randn(80, generator=g, dtype=torch.float64),
                   torch.randint(0, 5, (80,), generator=g).to(torch.float64)):
        running = running_top_k_peaks(values, k, warmup).tolist()
        assert running == reference_running_top_k(values, k, warmup)
        offline = [t for t in top_k_peaks(values, k)[0].tolist() if t >= max(warmup, k)]
        assert set(offline) <= set(running)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        running_top_k_peaks(torch.ones(4), 2, 0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        running_top_k_peaks(torch.ones(4), 0, 1)


def test_kth_largest_so_far_equals_sorting_each_prefix():
    g = torch.Generator().manual_seed(3)
    history = torch.randn(3, 10, generator=g, dtype=torch.float64)
    history[1, :6] = torch.tensor([2.0, 2.0, 1.0, 2.0, 0.0, 3.0])  # ties
    for k in (1, 3, 10, 12):
        for count in ([0, 5, 10], [3, 6, 2], [10, 10, 10]):
            got = kth_largest_so_far(history, torch.tensor(count), k)
            for row, n in enumerate(count):
                want = sorted(history[row, :n].tolist(), reverse=True)[k - 1] if n >= k else math.inf
                assert got[row].item() == want
