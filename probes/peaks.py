"""MI peaks: the tokens above Tukey's upper fence, and statistics of one sequence of MI values.

Paper: Qian et al., arXiv 2506.02867, section 3 (MI peaks: ``m_t > Q3 + 1.5·IQR``, Tukey's upper
fence) and section 4 (thinking tokens at the peaks); the statistics are those of
``../shared/METHODS.md`` section 2. :class:`probes.mi.MIEstimator` applies :func:`tukey_peaks`
to each row's values.

Deviations: none from the formulas. Quartiles use :func:`torch.quantile`'s linear
interpolation (numpy's default too) and everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surgery.results import result_part

__all__ = ["PeakStats", "tukey_peaks"]


@result_part
@dataclass(frozen=True)
class PeakStats:
    """Summary of one sequence's MI values (METHODS.md section 2).

    Attributes:
        count: number of peaks.
        ratio: ``count / steps`` (steps = number of values).
        min_gap, max_gap, mean_gap: gaps (in tokens) between consecutive peaks; None with
            fewer than 2 peaks.
        mean: mean of ``m``.
        std: population standard deviation of ``m`` (``ddof = 0``, as numpy's default).
        aom: mean over peaks of ``|m_t - median| / IQR``; None without peaks or when IQR is 0.
    """

    count: int
    ratio: float
    min_gap: int | None
    max_gap: int | None
    mean_gap: float | None
    mean: float
    std: float
    aom: float | None


def tukey_peaks(values: Float[Tensor, " steps"]) -> tuple[Int[Tensor, " peaks"], PeakStats]:
    """Peaks by Tukey's upper fence: ``{t : m_t > Q3 + 1.5·IQR}``, and their statistics.

    Quartiles and the median come from :func:`torch.quantile` with its default linear
    interpolation (numpy's default ``"linear"`` too). Computed in float64.

    Args:
        values: one sequence's MI values, one per generated token.

    Returns:
        (peak indices ascending, :class:`PeakStats`).

    Example:
        >>> import torch
        >>> peaks, stats = tukey_peaks(torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0]))
        >>> peaks.tolist(), stats.count, stats.min_gap, stats.ratio
        ([3, 7], 2, 4, 0.25)
    """
    if values.numel() == 0:
        raise ValueError("tukey_peaks needs at least one value (got an empty sequence)")
    v = values.detach().to(torch.float64).cpu()
    q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    iqr = q3 - q1
    peaks = (v > q3 + 1.5 * iqr).nonzero().flatten()
    gaps = peaks.diff().tolist()
    count = len(peaks)
    aom = None
    if count and iqr > 0:
        aom = float(((v[peaks] - median).abs() / iqr).mean())
    stats = PeakStats(
        count=count,
        ratio=count / len(v),
        min_gap=min(gaps) if gaps else None,
        max_gap=max(gaps) if gaps else None,
        mean_gap=sum(gaps) / len(gaps) if gaps else None,
        mean=float(v.mean()),
        std=float(v.std(correction=0)),
        aom=aom,
    )
    return peaks, stats
