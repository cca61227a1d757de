"""The unit of a study: one problem with a stable id, its question and its reference answer.

Datasets yield :class:`Problem` objects; the store keys results by ``(problem.id, condition)``;
shards split problems by id. The id is what makes a run resumable and a sharded run equal to a
single-process one, so it must not depend on the order of loading or on the batch.

Example::

    >>> from experiments.problems import Problem
    >>> p = Problem(id="gsm8k-test-0", question="What is 7 * 8?", answer="56")
    >>> p.id, p.answer
    ('gsm8k-test-0', '56')
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Problem"]


@dataclass(frozen=True)
class Problem:
    """One problem of a study.

    Attributes:
        id: stable and unique within a dataset (e.g. ``"gsm8k-test-17"``: source and line).
        question: the text the model is asked (before any prompt template).
        answer: the reference final answer as the dataset gives it (e.g. ``"72"`` from
            GSM8K's ``#### 72``, or the content of MATH's last ``\\boxed{...}``).
        solution: the dataset's worked solution, when it has one (not shown to the model).
        meta: anything else the dataset carries (level, subject, ...), JSON-serialisable.
    """

    id: str
    question: str
    answer: str
    solution: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a problem needs a non-empty string id, got {self.id!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"problem {self.id!r} has no question text")
