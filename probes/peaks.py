"""MI peaks: the tokens above Tukey's upper fence, and statistics of one sequence of MI values.

Two rules. :func:`tukey_peaks` is the paper's, on a finished sequence: the fence comes from all
its values. :func:`running_peaks` is the one a decoder can apply while it generates (what
closed-loop recycling fires on, :class:`probes.mi.MIEstimator`'s ``"peak"`` signal): token
``t`` is a peak when ``t >= warmup`` and ``m_t > Q3 + 1.5·IQR`` of the row's values *before*
it, ``m_0 .. m_{t-1}``; the first ``warmup`` tokens never are. :func:`fence_so_far` computes that
fence for a batch of rows on the device, with fixed shapes and no host sync, and gives the
same numbers as :func:`torch.quantile` (tested: equal firing positions).

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

__all__ = ["PeakStats", "fence_so_far", "running_peaks", "tukey_peaks"]


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


def running_peaks(values: Float[Tensor, " steps"], warmup: int) -> Int[Tensor, " peaks"]:
    """The online rule on a finished sequence: ``t`` with ``t >= warmup`` and ``m_t`` above the
    upper Tukey fence of ``m_0 .. m_{t-1}`` (quartiles by :func:`torch.quantile`, linear).

    This is the offline reference of what :class:`probes.mi.MIEstimator` publishes while
    decoding (its ``"peak"`` signal): the same positions from the same values.

    Example:
        >>> import torch
        >>> running_peaks(torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0]), warmup=3).tolist()
        [3, 7]
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the fence needs a value before the token), got {warmup}")
    v = values.detach().to(torch.float64).cpu()
    quartiles = torch.tensor([0.25, 0.75], dtype=torch.float64)
    peaks = []
    for t in range(warmup, len(v)):
        q1, q3 = torch.quantile(v[:t], quartiles).tolist()
        if v[t] > q3 + 1.5 * (q3 - q1):
            peaks.append(t)
    return torch.tensor(peaks, dtype=torch.long)


def fence_so_far(history: Float[Tensor, "batch capacity"], count: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """Per row, Tukey's upper fence ``Q3 + 1.5·IQR`` of its first ``count`` values.

    Device ops on fixed shapes (a sort of the history with unused slots at +inf, then the
    linear interpolation of :func:`torch.quantile`), no host sync. A row with ``count == 0``
    gets +inf (nothing is above it).

    Example:
        >>> import torch
        >>> history = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        >>> fence_so_far(history, torch.tensor([4, 0])).tolist()
        [5.5, inf]
    """
    capacity = history.shape[1]
    used = torch.arange(capacity, device=history.device) < count[:, None]
    ordered = torch.where(used, history, torch.inf).sort(dim=1).values
    last = (count - 1).clamp(min=0).to(history.dtype)[:, None]
    ranks = torch.tensor([0.25, 0.75], dtype=history.dtype, device=history.device) * last
    below = ranks.long()  # truncation, as torch.quantile
    above = ranks.ceil().long()
    q1, q3 = ordered.gather(1, below).lerp(ordered.gather(1, above), ranks - below).unbind(dim=1)
    return torch.where(count > 0, q3 + 1.5 * (q3 - q1), torch.inf)
