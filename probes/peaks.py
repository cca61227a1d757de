"""MI peaks: the tokens above Tukey's upper fence (or the top k values), and statistics of one
sequence of MI values.

Two rules on a finished sequence. :func:`tukey_peaks` is the paper's text: the fence comes
from all its values. :func:`top_k_peaks` is the released code's (the plotting notebook of
ChnQ/MI-Peaks, commit bcee82c, takes the 20 largest values of each series as its peaks; the
released code has no IQR rule): offered to reproduce the published figures.

Their running twins are what a decoder can apply while it generates (what closed-loop
recycling fires on, :class:`probes.mi.MIEstimator`'s ``"peak"`` signal); the first ``warmup``
tokens of a row never are peaks:

- :func:`running_peaks`: token ``t`` is a peak when ``m_t > Q3 + 1.5·IQR`` of the row's values
  *before* it, ``m_0 .. m_{t-1}``. :func:`fence_so_far` computes that fence for a batch of rows
  on the device, with fixed shapes and no host sync, and gives the same numbers as
  :func:`torch.quantile` (tested: equal firing positions).
- :func:`running_top_k_peaks`: token ``t`` is a peak when the row has at least ``k`` values
  before it and ``m_t`` is above the k-th largest of them, i.e. ``m_t`` enters the top ``k``
  of the series so far (:func:`kth_largest_so_far` on the device). Every offline
  :func:`top_k_peaks` position at or after ``max(warmup, k)`` is among them (a value in the top
  k of the whole series is in the top k of every prefix that holds it), but the running rule
  fires more: also on values that later tokens push out of the top k.

Paper: Qian et al., arXiv 2506.02867, section 3 (MI peaks: ``m_t > Q3 + 1.5·IQR``, Tukey's upper
fence) and section 4 (thinking tokens at the peaks); the statistics are those of
``../shared/METHODS.md`` section 2. :class:`probes.mi.MIEstimator` applies :func:`tukey_peaks`
(or, with ``peak_rule="top_k"``, :func:`top_k_peaks`) to each row's values.

Deviations: none from the formulas. Quartiles use :func:`torch.quantile`'s linear
interpolation (numpy's default too) and everything is computed in float64. ``PeakStats.ratio``
divides by the number of values; ``ratio_steps="released_total_tokens"`` divides by one fewer,
the released ``total_tokens`` (see :data:`RATIO_STEPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surgery.files.results import result_part

__all__ = [
    "PEAK_RULES",
    "PeakStats",
    "RATIO_STEPS",
    "fence_so_far",
    "kth_largest_so_far",
    "running_peaks",
    "running_top_k_peaks",
    "top_k_peaks",
    "tukey_peaks",
]

PEAK_RULES = ("tukey", "top_k")
"""Which tokens are peaks (``MIEstimator(peak_rule=...)``): ``"tukey"`` (the paper's text,
section 3: above Tukey's upper fence, :func:`tukey_peaks`) or ``"top_k"`` (the released
notebook: the k largest values, :func:`top_k_peaks`)."""

RATIO_STEPS = ("values", "released_total_tokens")
"""What :attr:`PeakStats.ratio` divides the peak count by.

- ``"values"`` (default): the number of MI values, one per generated token.
- ``"released_total_tokens"``: one fewer. The released ``cal_mi.py`` stores a problem's
  ``total_tokens`` as the generated ids without the last one (``outputs[0][:, prompt:-1]``)
  while it computes one MI value per forward, so its token count is ``N - 1`` for ``N`` values
  (the paper's "24.54 peaks per 511 steps" for 512 generated tokens). With a single value the
  ratio is then NaN (0 steps).
"""


@result_part
@dataclass(frozen=True)
class PeakStats:
    """Summary of one sequence's MI values (METHODS.md section 2).

    Attributes:
        count: number of peaks.
        ratio: ``count / steps``; steps = number of values, or one fewer with
            ``ratio_steps="released_total_tokens"`` (:data:`RATIO_STEPS`).
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


def _check_peak_rule(peak_rule: str) -> None:
    if peak_rule not in PEAK_RULES:
        raise ValueError(
            f"peak_rule must be one of {PEAK_RULES}, got {peak_rule!r}: 'tukey' for Tukey's upper fence (the "
            "paper's text), 'top_k' for the top_k largest values (the released notebook; set top_k=20)"
        )


def _check_ratio_steps(ratio_steps: str) -> None:
    if ratio_steps not in RATIO_STEPS:
        raise ValueError(
            f"ratio_steps must be one of {RATIO_STEPS} (what PeakStats.ratio divides by), got {ratio_steps!r}: "
            "'values' for the number of MI values, 'released_total_tokens' for one fewer, as the released code counts"
        )


def _as_series(values: Tensor, caller: str) -> Tensor:
    if values.numel() == 0:
        raise ValueError(f"{caller} needs at least one value (got an empty sequence)")
    return values.detach().to(torch.float64).cpu()


def _peak_stats(v: Tensor, peaks: Tensor, ratio_steps: str) -> PeakStats:
    """:class:`PeakStats` of the float64 series ``v`` with these (ascending) peaks."""
    q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    iqr = q3 - q1
    gaps = peaks.diff().tolist()
    count = len(peaks)
    aom = None
    if count and iqr > 0:
        aom = float(((v[peaks] - median).abs() / iqr).mean())
    steps = len(v) if ratio_steps == "values" else len(v) - 1
    return PeakStats(
        count=count,
        ratio=count / steps if steps else float("nan"),
        min_gap=min(gaps) if gaps else None,
        max_gap=max(gaps) if gaps else None,
        mean_gap=sum(gaps) / len(gaps) if gaps else None,
        mean=float(v.mean()),
        std=float(v.std(correction=0)),
        aom=aom,
    )


def tukey_peaks(
    values: Float[Tensor, " steps"], ratio_steps: str = "values"
) -> tuple[Int[Tensor, " peaks"], PeakStats]:
    """Peaks by Tukey's upper fence: ``{t : m_t > Q3 + 1.5·IQR}``, and their statistics.

    The rule of the paper's text (arXiv 2506.02867, section 3). Quartiles and the median come
    from :func:`torch.quantile` with its default linear interpolation (numpy's default
    ``"linear"`` too). Computed in float64.

    Args:
        values: one sequence's MI values, one per generated token.
        ratio_steps: what ``PeakStats.ratio`` divides by (:data:`RATIO_STEPS`): ``"values"``
            (default) or ``"released_total_tokens"`` (one fewer, as the released code counts).

    Returns:
        (peak indices ascending, :class:`PeakStats`).

    Example:
        >>> import torch
        >>> peaks, stats = tukey_peaks(torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0]))
        >>> peaks.tolist(), stats.count, stats.min_gap, stats.ratio
        ([3, 7], 2, 4, 0.25)
        >>> tukey_peaks(torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0]), "released_total_tokens")[1].ratio
        0.2857142857142857
    """
    _check_ratio_steps(ratio_steps)
    v = _as_series(values, "tukey_peaks")
    q1, q3 = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    peaks = (v > q3 + 1.5 * (q3 - q1)).nonzero().flatten()
    return peaks, _peak_stats(v, peaks, ratio_steps)


def _check_k(k, name: str = "k") -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive integer (how many of the largest values are peaks), got {k!r}")


def top_k_peaks(
    values: Float[Tensor, " steps"], k: int = 20, ratio_steps: str = "values"
) -> tuple[Int[Tensor, " peaks"], PeakStats]:
    """Peaks as the released code takes them: the ``k`` largest values of the sequence.

    The plotting notebook of ChnQ/MI-Peaks (``src/plot_mi_peaks.ipynb``, commit bcee82c) ranks
    a series' indices by value, largest first, with Python's stable ``sorted(..., reverse=True)``,
    and keeps the first 20 (its comment: "approximately take top-20"). So, as there:

    - ties rank the earlier token first (a tie at the k-th place keeps the earliest tokens);
    - a series with ``k`` values or fewer has every token as a peak;
    - the count is always ``min(k, len(values))``, whatever the values look like.

    The notebook keeps the indices in rank order; here they are returned ascending, as
    :func:`tukey_peaks` returns them, and the statistics (gaps, AOM about the median and IQR)
    are the same as for :func:`tukey_peaks`. Computed in float64 (exact for float32 values, so
    the ranking is the notebook's).

    Args:
        values: one sequence's MI values, one per generated token (no NaN: they have no rank).
        k: how many of the largest values are peaks (the notebook: 20).
        ratio_steps: what ``PeakStats.ratio`` divides by (:data:`RATIO_STEPS`).

    Returns:
        (peak indices ascending, :class:`PeakStats`).

    Raises:
        ValueError: ``k < 1``, an empty sequence, NaN values, or an unknown ``ratio_steps``.

    Example:
        >>> import torch
        >>> peaks, stats = top_k_peaks(torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 5.0]), k=2)
        >>> peaks.tolist(), stats.count, stats.ratio           # three 5s tie: the earliest two
        ([1, 3], 2, 0.3333333333333333)
        >>> top_k_peaks(torch.tensor([1.0, 2.0]), k=20)[0].tolist()  # shorter than k: all
        [0, 1]
    """
    _check_k(k)
    _check_ratio_steps(ratio_steps)
    v = _as_series(values, "top_k_peaks")
    if v.isnan().any():
        raise ValueError(
            f"top_k_peaks cannot rank NaN values (at indices {v.isnan().nonzero().flatten().tolist()[:10]}): "
            "drop or replace them first"
        )
    ranked = torch.sort(v, descending=True, stable=True).indices  # stable: equal values keep index order
    peaks = ranked[:k].sort().values
    return peaks, _peak_stats(v, peaks, ratio_steps)


def running_peaks(values: Float[Tensor, " steps"], warmup: int) -> Int[Tensor, " peaks"]:
    """The online rule on a finished sequence: ``t`` with ``t >= warmup`` and ``m_t`` above the
    upper Tukey fence of ``m_0 .. m_{t-1}`` (quartiles by :func:`torch.quantile`, linear).

    This is the offline reference of what :class:`probes.mi.MIEstimator` publishes while
    decoding (its ``"peak"`` signal, ``peak_rule="tukey"``): the same positions from the same
    values.

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


def running_top_k_peaks(values: Float[Tensor, " steps"], k: int, warmup: int) -> Int[Tensor, " peaks"]:
    """The online top-k rule on a finished sequence: ``t`` with ``t >= warmup``, at least ``k``
    values before it, and ``m_t`` above the k-th largest of ``m_0 .. m_{t-1}``.

    That is, ``m_t`` enters the top ``k`` of the series so far (ties rank the earlier token
    first, as :func:`top_k_peaks`, so a value equal to the k-th largest does not). The offline
    reference of :class:`probes.mi.MIEstimator`'s ``"peak"`` signal with ``peak_rule="top_k"``.
    Every :func:`top_k_peaks` position ``t >= max(warmup, k)`` is among these.

    Example:
        >>> import torch
        >>> running_top_k_peaks(torch.tensor([1.0, 3.0, 2.0, 4.0, 1.0, 3.0, 5.0]), k=2, warmup=1).tolist()
        [2, 3, 6]
    """
    _check_k(k)
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the threshold needs a value before the token), got {warmup}")
    v = _as_series(values, "running_top_k_peaks")
    peaks = [t for t in range(max(warmup, k), len(v)) if v[t] > v[:t].topk(k).values[-1]]
    return torch.tensor(peaks, dtype=torch.long)


def kth_largest_so_far(
    history: Float[Tensor, "batch capacity"], count: Int[Tensor, " batch"], k: int
) -> Float[Tensor, " batch"]:
    """Per row, the k-th largest of its first ``count`` values (+inf when ``count < k``).

    The threshold of :func:`running_top_k_peaks`: device ops on fixed shapes (a descending
    sort of the history with unused slots at -inf, then one gather), no host sync, as
    :func:`fence_so_far`.

    Example:
        >>> import torch
        >>> history = torch.tensor([[1.0, 4.0, 3.0, 9.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        >>> kth_largest_so_far(history, torch.tensor([3, 1]), k=2).tolist()
        [3.0, inf]
    """
    _check_k(k)
    capacity = history.shape[1]
    used = torch.arange(capacity, device=history.device) < count[:, None]
    ordered = torch.where(used, history, -torch.inf).sort(dim=1, descending=True).values
    kth = ordered[:, min(k, capacity) - 1]
    return torch.where(count >= k, kth, torch.inf)
