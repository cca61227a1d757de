"""What :class:`~probes.thought_classifier.ThoughtClassifier` returns: each row's thoughts,
labelled, and the hidden state at the separator that opens each one.

:class:`ClassifiedThoughts` is a saved result (:mod:`surgery.files.results`): ``save`` and
``load`` round-trip it through one safetensors file, and it plots its class counts and states.

Example:
    >>> import torch
    >>> found = ClassifiedThoughts([[ClassifiedThought(0, "execution", "7 * 8 = 56.", 12)]],
    ...                            [torch.zeros(1, 4)], "resid_pre.3", 1)
    >>> found.counts()
    {'execution': 1, 'reflection': 0, 'transition': 0}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from probes.plots import plot_thoughts
from surgery.files.results import SavedResult, result_part
from surgery.thoughts import THOUGHT_CLASSES

__all__ = ["ClassifiedThought", "ClassifiedThoughts"]


@result_part
@dataclass(frozen=True)
class ClassifiedThought:
    """One thought of one row.

    Attributes:
        index: its place among the row's thoughts (0, 1, ...).
        label: SEAL's keyword class, one of ``surgery.thoughts.THOUGHT_CLASSES``.
        text: the thought's text (not stripped).
        position: position id (0 at the row's first prompt token) of the token completing its
            opening "\\n\\n"; its state is the row's ``states[index]``.
        predicted: the linear probe's label for that state, or None without a probe.
    """

    index: int
    label: str
    text: str
    position: int
    predicted: str | None = None


@dataclass
class ClassifiedThoughts(SavedResult):
    """What :class:`ThoughtClassifier` found in the last run, per batch row.

    Attributes:
        thoughts: per row, its thoughts in order.
        states: per row, ``[n_thoughts, d_model]``: row ``i``'s ``states[i][j]`` is the site's
            value at ``thoughts[i][j].position`` (on the model's device, in its dtype).
        site: the site read (resolved, e.g. ``"resid_pre.3"``).
        n_recorded: vectors kept while decoding (one per ``OnText`` hit, prompt included),
            before the selection of one per thought.
    """

    thoughts: list[list[ClassifiedThought]]
    states: list[Tensor]
    site: str
    n_recorded: int

    def labels(self) -> list[str]:
        """Every thought's keyword label, rows concatenated."""
        return [t.label for row in self.thoughts for t in row]

    def predicted(self) -> list[str | None]:
        """Every thought's linear-probe label (None without a probe), rows concatenated."""
        return [t.predicted for row in self.thoughts for t in row]

    def all_states(self) -> Float[Tensor, "n d_model"]:
        """Every thought's state, rows concatenated: ``[n, d_model]`` (aligned with :meth:`labels`)."""
        return torch.cat(self.states)

    def states_by_label(self) -> dict[str, Tensor]:
        """Label -> ``[n_label, d_model]`` states of that label over all rows (every class, maybe empty)."""
        states, labels = self.all_states(), self.labels()
        return {c: states[[i for i, label in enumerate(labels) if label == c]] for c in THOUGHT_CLASSES}

    def counts(self) -> dict[str, int]:
        """Label -> number of thoughts over all rows (every class, zeros included)."""
        found = Counter(self.labels())
        return {c: found[c] for c in THOUGHT_CLASSES}

    def plot(self, path) -> None:
        """Save a PNG: thought counts per class, and the states in 2-D (PCA) coloured by class
        (:func:`probes.plots.plot_thoughts`)."""
        plot_thoughts(self, path)
