"""LinearThoughtProbe: a linear probe from thought states to SEAL's thought labels (scikit-learn).

SEAL (Chen et al., "SEAL: Steerable Reasoning Calibration of Large Language Models for Free",
arXiv 2504.07986, §3 "thought classes"; METHODS.md §1) labels thoughts execution, reflection or
transition by keyword rules (:mod:`surgery.thoughts`). :func:`fit_linear_probe` (mode 2 of the
classifier) trains a multinomial logistic regression from the thoughts' hidden states (e.g. what
:class:`probes.thought_classifier.ThoughtClassifier` recorded) to those labels on a held-out
split; passed as ``linear_probe=`` to the classifier it also labels every separator state online,
one small matmul on the device per step.

Deviations from SEAL: the linear probe is not in the paper; it standardises features before the
logistic regression (folded into the weights for online use).

Example::

    from probes import ThoughtClassifier, fit_linear_probe

    probe = fit_linear_probe(found.all_states(), found.labels())   # found: ClassifiedThoughts
    probe.held_out_accuracy                                         # 0.9...
    online = ThoughtClassifier("resid_pre.20", linear_probe=probe)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["LinearThoughtProbe", "fit_linear_probe"]


@dataclass(frozen=True)
class LinearThoughtProbe:
    """A multinomial logistic regression from thought states to thought labels.

    Made by :func:`fit_linear_probe`; pass it to ``ThoughtClassifier(linear_probe=...)`` to
    label separators online.

    Attributes:
        classes: the labels, sorted (as scikit-learn orders them).
        weight: ``[n_classes, d_model]`` float64, the pipeline folded into one affine map
            (two rows for two classes: zeros, then the binary coefficients), so that
            ``argmax(states @ weight.T + bias)`` indexes :attr:`classes` as scikit-learn's
            ``predict`` does (tested); :meth:`predict` uses it.
        bias: ``[n_classes]`` float64.
        held_out_accuracy: accuracy on the held-out split.
        chance_accuracy: accuracy of always answering the held-out split's commonest label.
        train_counts: label -> number of training samples.
        test_counts: label -> number of held-out samples.
        stratified: whether the split kept the label proportions (needs at least two samples
            of every label and room for each label on both sides).
        pipeline: the fitted scikit-learn pipeline (``StandardScaler`` then
            ``LogisticRegression``), for inspection; None for a probe loaded from a file
            (saving keeps the folded map and the report, never a pickled pipeline).
    """

    classes: tuple[str, ...]
    weight: Tensor = field(repr=False)
    bias: Tensor = field(repr=False)
    held_out_accuracy: float
    chance_accuracy: float
    train_counts: dict[str, int]
    test_counts: dict[str, int]
    stratified: bool
    pipeline: object | None = field(default=None, repr=False, compare=False)

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    def predict(self, states: Float[Tensor, "n d_model"]) -> list[str]:
        """The predicted label of each state: the argmax of :meth:`scores` (scikit-learn's ``predict``).

        Args:
            states: ``[n, d_model]``, any device and float dtype.

        Returns:
            ``n`` labels, each one of :attr:`classes`.
        """
        if states.shape[0] == 0:
            return []
        return [self.classes[k] for k in self.scores(states).argmax(dim=-1).tolist()]

    def scores(self, states: Float[Tensor, "n d_model"]) -> Float[Tensor, "n n_classes"]:
        """The logits ``states @ weight.T + bias`` in float64 (what the online path computes)."""
        weight = self.weight.to(states.device)
        return states.to(weight.dtype) @ weight.T + self.bias.to(states.device)

    def report(self) -> dict:
        """Everything but the tensors and the pipeline, JSON-serialisable (see :meth:`from_report`)."""
        return {
            "classes": list(self.classes),
            "held_out_accuracy": self.held_out_accuracy,
            "chance_accuracy": self.chance_accuracy,
            "train_counts": self.train_counts,
            "test_counts": self.test_counts,
            "stratified": self.stratified,
        }

    @classmethod
    def from_report(cls, report: dict, weight: Tensor, bias: Tensor) -> LinearThoughtProbe:
        """The probe :meth:`report` and its ``weight`` / ``bias`` describe (``pipeline`` None)."""
        return cls(classes=tuple(report["classes"]), weight=weight.to(torch.float64), bias=bias.to(torch.float64),
                   **{k: v for k, v in report.items() if k != "classes"})


def _as_numpy(states: Tensor) -> np.ndarray:
    return states.detach().to(device="cpu", dtype=torch.float64).numpy()


def fit_linear_probe(
    states: Float[Tensor, "n d_model"], labels: Sequence[str], test_size: float = 0.25, seed: int = 0, max_iter: int = 5000
) -> LinearThoughtProbe:
    """Train a linear probe from thought states to labels and report its held-out accuracy.

    A ``StandardScaler`` then a multinomial ``LogisticRegression`` (lbfgs, L2, ``C=1``) are fit
    on a random split of ``1 - test_size`` of the samples, stratified by label when every label
    has at least two samples and both sides have room for every label; the rest is held out.

    Args:
        states: ``[n, d_model]``, e.g. ``ClassifiedThoughts.all_states()``.
        labels: ``n`` labels, e.g. ``ClassifiedThoughts.labels()``.
        test_size: fraction held out, in (0, 1); the held-out side gets ``ceil(test_size * n)``.
        seed: seeds the split (the fit itself is deterministic).
        max_iter: lbfgs iterations.

    Returns:
        The fitted :class:`LinearThoughtProbe`.

    Raises:
        ValueError: fewer than two distinct labels, lengths that differ, a ``test_size``
            outside (0, 1), or too few samples for a split with two labels to train on.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> states = torch.cat([torch.randn(20, 4) + 5, torch.randn(20, 4) - 5])
        >>> probe = fit_linear_probe(states, ["execution"] * 20 + ["reflection"] * 20)
        >>> probe.held_out_accuracy, probe.test_counts
        (1.0, {'execution': 5, 'reflection': 5})
        >>> probe.predict(torch.full((1, 4), 5.0))
        ['execution']
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = [str(label) for label in labels]
    n = len(labels)
    if states.shape[0] != n:
        raise ValueError(f"fit_linear_probe got {states.shape[0]} states but {n} labels: pass one label per state")
    counts = Counter(labels)
    if len(counts) < 2:
        raise ValueError(
            f"fit_linear_probe needs at least two distinct labels, got {dict(counts) or 'none'}: "
            "collect more traces (reflections and transitions are rarer than executions)"
        )
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size is the held-out fraction, in (0, 1); got {test_size}")
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_train < 2 or n_test < 1:
        raise ValueError(
            f"{n} samples are too few to split with test_size={test_size} ({n_train} to train, {n_test} held out): "
            "collect more thoughts or lower test_size"
        )
    stratified = min(counts.values()) >= 2 and n_test >= len(counts) and n_train >= len(counts)
    x, y = _as_numpy(states), np.array(labels)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=n_test, random_state=seed, stratify=y if stratified else None
    )
    if len(set(y_train)) < 2:
        raise ValueError(
            f"the training split holds only the label {y_train[0]!r} ({n} samples, labels {dict(counts)}): "
            "collect more samples of the rarer labels so a split can keep two of each"
        )
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    pipeline.fit(x_train, y_train)
    scaler, regression = pipeline[0], pipeline[-1]
    coef = regression.coef_ / scaler.scale_  # fold the scaling into the weights
    intercept = regression.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1:  # binary: the decision is coef . x + b > 0, i.e. argmax over [0, that]
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    test_counts = Counter(y_test.tolist())
    return LinearThoughtProbe(
        classes=tuple(str(c) for c in regression.classes_),
        pipeline=pipeline,
        weight=torch.from_numpy(np.ascontiguousarray(coef, dtype=np.float64)),
        bias=torch.from_numpy(np.ascontiguousarray(intercept, dtype=np.float64)),
        held_out_accuracy=float(pipeline.score(x_test, y_test)),
        chance_accuracy=max(test_counts.values()) / n_test,
        train_counts=dict(sorted(Counter(y_train.tolist()).items())),
        test_counts=dict(sorted(test_counts.items())),
        stratified=stratified,
    )
