"""The numbers a study reports per condition: accuracy with a confidence interval, tokens, thoughts, MI peaks.

:func:`condition_summaries` reads a store's records (one per problem and condition) and returns
one :class:`ConditionSummary` per condition, in the order first seen; :func:`format_table` prints
them as the terminal table ``surgery run`` ends with.

Accuracy's interval is Wilson's score interval (95 %: ``z = 1.96``), which stays inside [0, 1]
and behaves at 0 and n correct, unlike the normal approximation.

Example:
    >>> [round(bound, 4) for bound in wilson_interval(8, 10)]
    [0.4902, 0.9433]
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["ConditionSummary", "condition_summaries", "format_table", "wilson_interval"]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for ``correct`` successes out of ``n`` (``(0, 1)`` when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class ConditionSummary:
    """One condition of a study.

    Attributes:
        condition: its name.
        n: problems stored.
        correct: problems graded correct.
        accuracy, low, high: ``correct / n`` and its Wilson 95 % interval.
        mean_tokens, sd_tokens: generated tokens per problem.
        thoughts: thought counts per label over all problems (probes that classify thoughts).
        mean_peaks: MI peaks per problem (MI probes), None without one.
        fired: per intervention, the problems where it acted at least once.
    """

    condition: str
    n: int = 0
    correct: int = 0
    accuracy: float = 0.0
    low: float = 0.0
    high: float = 1.0
    mean_tokens: float = 0.0
    sd_tokens: float = 0.0
    thoughts: dict[str, int] = field(default_factory=dict)
    mean_peaks: float | None = None
    fired: dict[str, int] = field(default_factory=dict)


def condition_summaries(records: Iterable[dict]) -> list[ConditionSummary]:
    """Summaries per condition of store records (``{"problem", "condition", "payload"}``)."""
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["condition"], []).append(record["payload"])
    return [_summarise(condition, payloads) for condition, payloads in grouped.items()]


def _summarise(condition: str, payloads: list[dict]) -> ConditionSummary:
    n = len(payloads)
    correct = sum(bool(p["grade"]["correct"]) for p in payloads)
    tokens = [p["n_tokens"] for p in payloads]
    thoughts: Counter = Counter()
    peaks: list[int] = []
    for payload in payloads:
        for summary in payload.get("probes", {}).values():
            if isinstance(summary, dict) and isinstance(summary.get("counts"), dict):
                thoughts.update(summary["counts"])
            if isinstance(summary, dict) and "peaks" in summary and "values" in summary:
                peaks.append(len(summary["peaks"]))
    fired = Counter(name for p in payloads for name, where in p.get("fired", {}).items() if where)
    low, high = wilson_interval(correct, n)
    return ConditionSummary(
        condition=condition, n=n, correct=correct, accuracy=correct / n if n else 0.0, low=low, high=high,
        mean_tokens=statistics.fmean(tokens) if tokens else 0.0,
        sd_tokens=statistics.pstdev(tokens) if len(tokens) > 1 else 0.0,
        thoughts=dict(sorted(thoughts.items())), mean_peaks=statistics.fmean(peaks) if peaks else None,
        fired=dict(fired),
    )


def format_table(summaries: Iterable[ConditionSummary]) -> str:
    """The summaries as a plain-text table, one line per condition."""
    header = f"{'condition':<14}{'n':>5}{'accuracy':>10}{'95% CI':>16}{'tokens':>14}{'MI peaks':>10}  thoughts"
    lines = [header, "-" * len(header)]
    for s in summaries:
        thoughts = ", ".join(f"{label} {count}" for label, count in s.thoughts.items()) or "-"
        peaks = "-" if s.mean_peaks is None else f"{s.mean_peaks:.1f}"
        lines.append(f"{s.condition:<14}{s.n:>5}{s.accuracy:>10.1%}{f'[{s.low:.2f}, {s.high:.2f}]':>16}"
                     f"{f'{s.mean_tokens:.1f} ± {s.sd_tokens:.1f}':>14}{peaks:>10}  {thoughts}")
    return "\n".join(lines)
