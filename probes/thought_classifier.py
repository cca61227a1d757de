"""ThoughtClassifier: SEAL's thoughts, labelled by keywords and paired with their hidden states.

SEAL (Chen et al., "SEAL: Steerable Reasoning Calibration of Large Language Models for Free",
arXiv 2504.07986, §3 "thoughts" and "thought classes"; METHODS.md §1) cuts a reasoning trace
into thoughts at blank lines, labels each one execution, reflection or transition by keyword
rules, and represents it by the hidden state at the separator that opens it. This module is
the probe side of that recipe:

* :class:`ThoughtClassifier` (mode 1, keyword rules) records, while the model generates (or in
  ``tr.run``), the site's value at every token where the text reaches ``"\\n\\n"``
  (:class:`~surgery.triggers.OnText`, so a blank line written as two ``"\\n"`` tokens counts),
  and the fed token ids; its :meth:`~ThoughtClassifier.result` rebuilds each row's text, splits
  and labels it with :mod:`surgery.thoughts` and keeps, per thought, the state at the token
  :func:`surgery.thoughts.thought_positions` names.
* :func:`probes.linear_probe.fit_linear_probe` (mode 2) trains a multinomial logistic
  regression (scikit-learn) from states to labels on a held-out split; passed as
  ``linear_probe=`` to the classifier it also labels every separator state online, one small
  matmul on the device per step.

Which text is read:
    * ``tr.generate``: the completion (the generated tokens that were fed back), read as
      :func:`~surgery.thoughts.thought_positions` reads it: inside ``<think>`` when the prompt
      ends inside one (reasoning chat templates), else from its beginning (models without
      think tokens, e.g. SmolLM2), up to the first ``</think>``. Separators in the prompt are
      never thoughts.
    * ``tr.run`` (no decode step): the prompt itself, from just after its first ``<think>``
      (or from its beginning when it has none) to the first ``</think>`` after it. A
      ``tr.generate`` whose rows all stopped at their first token is read the same way.

Deviations from SEAL:
    * The "think differently" keyword is spelled correctly (the released code misspells it,
      so it never matches there); see :mod:`surgery.thoughts`.
    * A maximal run of newlines is ONE separator (SEAL: every token containing "\\n\\n"); its
      state is taken at the token that completes the run's first "\\n\\n". ``OnText`` fires at
      every occurrence (twice in "\\n\\n\\n" written as three "\\n" tokens); the extra states are
      recorded while decoding and dropped in :meth:`~ThoughtClassifier.result`.
    * Default site ``resid_pre.-1`` (input to the last block); SEAL reads block 20 of 28
      (R1-Distill-Qwen) or 55 of 64 (QwQ-32B): pass ``site="resid_pre.20"`` to match.
    * The linear probe (mode 2) is not in the paper; see :mod:`probes.linear_probe`.

Example::

    import surgery
    from probes import ThoughtClassifier, fit_linear_probe

    model = surgery.load("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    with surgery.trace(model, ThoughtClassifier("resid_pre.20")) as tr:
        tr.generate(prompts, max_new_tokens=2048, chat=True)
    found = tr.blocks[0].result()
    found.counts()                      # {'execution': 812, 'reflection': 95, 'transition': 17}
    probe = fit_linear_probe(found.all_states(), found.labels())
    probe.held_out_accuracy             # 0.9...
    online = ThoughtClassifier("resid_pre.20", linear_probe=probe)
    with surgery.trace(model, online) as tr:
        tr.generate(new_prompts, max_new_tokens=2048, chat=True)
    [(t.label, t.predicted) for t in online.result().thoughts[0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.classified_thoughts import ClassifiedThought, ClassifiedThoughts
from probes.fed_tokens import FedTokens
from probes.linear_probe import LinearThoughtProbe
from surgery.blocks import Probe, register_block
from surgery.signals import SignalBoard, SignalSpec
from surgery.step import Step
from surgery.thoughts import THOUGHT_CLASSES, completion_prefix, split_thoughts, thought_positions
from surgery.triggers import OnText, Trigger

__all__ = [
    "ClassifiedThought",
    "ClassifiedThoughts",
    "ThoughtClassifier",
    "ThoughtClassifierConfig",
]


@dataclass(frozen=True)
class ThoughtClassifierConfig:
    site: str = field(default="resid_pre.-1", metadata={"help": "where to read each thought's state"})
    separator: str = field(default="\n\n", metadata={"help": 'the thought separator (only "\\n\\n": surgery.thoughts splits at newline runs)'})
    when: Trigger = field(default_factory=lambda: OnText("\n\n"), metadata={"help": "where states are recorded (OnText(separator))"})
    linear_probe: dict | None = field(default=None, metadata={"help": "the linear probe's report (None: no probe)"})


@register_block("thought_classifier")
class ThoughtClassifier(Probe):
    """Label SEAL's thoughts by keywords and keep each thought's state at ``site``.

    Not graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): it keeps each ended thought's
    state by boolean indexing (a data-dependent shape) in a Python list; with it attached a
    compiled run decodes eagerly.

    Paper: SEAL, arXiv 2504.07986, §3 (thoughts, classes, representative states); see the
    module docstring for the text that is read and the deviations.

    Signals (with ``linear_probe`` only; :mod:`surgery.signals`, read with
    :class:`~surgery.signals.OnSignal`), for each row's last position every forward:
    ``"predicted"`` (class: the linear probe's label of the thought opened there, -1 where the
    text does not reach a separator there) and ``"probability"`` (its softmax probability,
    NaN elsewhere). SEAL steering gated on it fires only where the opened thought is predicted
    reflection or transition: ``when=seal_trigger_for(model) & OnSignal(classifier,
    "predicted", "in", ["reflection", "transition"])``, with the classifier at a site before the
    steering's (e.g. ``resid_pre.19`` for steering at ``resid_pre.20``).

    While the model runs it keeps only the vectors at the tokens where the text reaches the
    separator (``OnText``) and the fed token ids; :meth:`result` labels the thoughts and pairs
    each with its state. With ``linear_probe`` every recorded state is also labelled on the
    device as it is recorded, reported as ``ClassifiedThought.predicted``. With ``batch_size``
    (continuous batching) :meth:`result` lists every prompt in order, each as it is alone
    (``result(rows=[i])``: prompt ``i`` alone, readable as soon as it has retired).

    Args:
        site: any site but ``logits`` (default ``"resid_pre.-1"``; SEAL: ``"resid_pre.20"`` for
            R1-Distill-Qwen-1.5B/7B).
        separator: ``"\\n\\n"``, the only separator :mod:`surgery.thoughts` knows.
        linear_probe: a :class:`~probes.linear_probe.LinearThoughtProbe` (from
            :func:`~probes.linear_probe.fit_linear_probe`) of the same width as the site, to
            label separators online.

    Example::

        with surgery.trace(model, ThoughtClassifier("resid_pre.20")) as tr:
            tr.generate(["What is 7 * 8?"], max_new_tokens=256, chat=True)
        found = tr.blocks[0].result()
        [(t.label, t.position) for t in found.thoughts[0]], found.states[0].shape
    """

    config_class = ThoughtClassifierConfig

    def __init__(self, site: str = "resid_pre.-1", separator: str = "\n\n", linear_probe: LinearThoughtProbe | None = None):
        if separator != "\n\n":
            raise ValueError(
                f'ThoughtClassifier supports only separator="\\n\\n", got {separator!r}: SEAL thoughts '
                "(surgery.thoughts) are split at runs of two or more newlines"
            )
        if linear_probe is not None and not isinstance(linear_probe, LinearThoughtProbe):
            raise TypeError(f"linear_probe must be a LinearThoughtProbe (from fit_linear_probe), got {type(linear_probe).__name__}")
        self.config = ThoughtClassifierConfig(
            site=site,
            separator=separator,
            when=OnText(separator),
            linear_probe=linear_probe.report() if linear_probe is not None else None,
        )
        self.linear_probe = linear_probe
        self._model = None
        self._tokens = FedTokens()  # per row: the prompt's and the fed tokens' ids
        self.reset(0)

    @classmethod
    def from_config(cls, config: ThoughtClassifierConfig, tensors: dict[str, Tensor]) -> ThoughtClassifier:
        probe = None
        if config.linear_probe is not None:
            probe = LinearThoughtProbe.from_report(config.linear_probe, tensors["linear_probe.weight"],
                                                   tensors["linear_probe.bias"])
        return cls(site=config.site, separator=config.separator, linear_probe=probe)

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> ThoughtClassifier:
        return cls(f"resid_pre.{model.n_layers // 2}")

    def tensors(self) -> dict[str, Tensor]:
        if self.linear_probe is None:
            return {}
        return {"linear_probe.weight": self.linear_probe.weight, "linear_probe.bias": self.linear_probe.bias}

    def by_row(self, rows: Sequence[int] | None = None) -> list:
        """Per row, ``([(label, position, text) per thought], states)``; ``rows`` as in :meth:`result`."""
        found = self.result(rows)
        return [([(t.label, t.position, t.text) for t in thoughts], states)
                for thoughts, states in zip(found.thoughts, found.states)]

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        site = model.resolve_site(self.config.site)
        if site.kind == "logits":
            raise ValueError(
                "ThoughtClassifier cannot read 'logits' (the prefill computes them at the last position only): "
                "pick a residual site such as 'resid_pre.-1'"
            )
        width = model.site_width(site)
        if self.linear_probe is not None:
            if self.linear_probe.d_model != width:
                raise ValueError(
                    f"the linear probe was fit on {self.linear_probe.d_model}-wide states, but {site} of "
                    f"{model.name} is {width} wide: fit it on states from this site"
                )
            self._weight = self.linear_probe.weight.to(device=model.device, dtype=torch.float64)
            self._bias = self.linear_probe.bias.to(device=model.device, dtype=torch.float64)
        self.config.when.bind(model)
        self._model, self._site, self._width = model, str(site), width
        self._canonical_site = site.canonical
        self.signal_board = SignalBoard(self.signals())

    def signals(self) -> dict[str, SignalSpec]:
        if self.linear_probe is None:
            return {}
        site = getattr(self, "_canonical_site", self.config.site)
        classes = tuple(self.linear_probe.classes)
        others = tuple(c for c in THOUGHT_CLASSES if c not in classes)  # e.g. no transition in its training set
        return {"predicted": SignalSpec("predicted", "class", site, classes, others),
                "probability": SignalSpec("probability", "float", site)}

    def signal_hint(self) -> str:
        if self.linear_probe is None:
            return ("its signals need the online linear probe: ThoughtClassifier(site, "
                    "linear_probe=fit_linear_probe(states, labels))")
        return ""

    def reset(self, batch_size: int) -> None:
        self._tokens.reset(batch_size)
        self._hits: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []  # slots, positions, values, predicted
        self._retired: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}  # per finished row: its hits
        if self.signal_board is not None:
            self.signal_board.clear()

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        self._tokens.observe(step)
        hits = self.config.when(step)  # only valid positions: none at the slots an admission leaves alone
        rows, columns = hits.nonzero(as_tuple=True)
        values = value[rows, columns].clone()
        predicted = None
        if self.linear_probe is not None:
            predicted = (values.double() @ self._weight.T + self._bias).argmax(dim=-1)
            if self.signals_read:
                self._publish(value[:, -1], hits[:, -1], step)
        self._hits.append((rows, step.positions[rows, columns], values, predicted))

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        """New rows take the slots where ``rows`` holds: forget their tokens, states and signals."""
        self._tokens.admit(rows)
        if self.signal_board is not None:
            self.signal_board.admit(rows)
        if self._hits:
            slots, positions, values, predicted = self._gathered()
            keep = ~rows[slots]
            self._hits = [(slots[keep], positions[keep], values[keep], None if predicted is None else predicted[keep])]

    def retire(self, slot: int, row: int) -> None:
        """Keep ``slot``'s tokens and recorded states as prompt ``row``'s."""
        self._tokens.retire(slot, row)
        self._retired[row] = self._of_slot(slot, self._gathered())

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Every recorded state as one ``(slots, positions, values, predicted)`` (kept so)."""
        if len(self._hits) > 1:
            slots, positions, values, predicted = zip(*self._hits)
            self._hits = [(torch.cat(slots), torch.cat(positions), torch.cat(values),
                           torch.cat(predicted) if self.linear_probe is not None else None)]
        return self._hits[0]

    @staticmethod
    def _of_slot(slot: int, hits) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(positions, values, predicted)`` of the states recorded in ``slot``."""
        slots, positions, values, predicted = hits
        mine = slots == slot
        return positions[mine], values[mine], None if predicted is None else predicted[mine]

    def _publish(self, last: Tensor, opens: Tensor, step: Step) -> None:
        """The signals of the step's last position: the class the linear probe gives a thought
        opened there, and its probability (-1 and NaN where no separator ends there)."""
        scores = last.double() @ self._weight.T + self._bias
        probability, predicted = scores.softmax(dim=-1).max(dim=-1)
        self.signal_board.publish("predicted", torch.where(opens, predicted, -1), step)
        self.signal_board.publish("probability", torch.where(opens, probability, torch.nan), step)

    def result(self, rows: Sequence[int] | None = None) -> ClassifiedThoughts:
        """The thoughts of the last run, labelled, each with its state.

        Args:
            rows: prompt indices (default: every row of the last run); under continuous batching
                a row is readable as soon as it has retired (``tr.generate(..., on_row=...)``),
                before the run ends. ``thoughts`` and ``states`` then hold those rows, in that
                order, and ``n_recorded`` counts their vectors only.

        Raises:
            RuntimeError: the probe has not run.
            ValueError: a row of ``rows`` that has not retired yet (continuous batching), or that
                the last (fixed) batch does not have.
        """
        tokens = [] if self._model is None else self._tokens.rows(rows)
        if self._model is None or (rows is None and not tokens):
            raise RuntimeError("ThoughtClassifier has no result yet: run tr.generate(...) or tr.run(...) in a trace first")
        model, texts = self._model, self._model.vocabulary_texts
        chosen = list(range(len(tokens)) if rows is None else rows)
        # after a continuous run, per prompt (tokens checked above that each has retired); else per row of the batch
        pooled = bool(self._retired) or (self._tokens.pooled and rows is not None)
        hits = [self._retired[i] for i in chosen] if pooled else \
            [self._of_slot(i, self._gathered()) for i in chosen]
        all_thoughts, all_states = [], []
        for row, (prompt, fed), (positions, values, predicted) in zip(chosen, tokens, hits):
            # no decode step (tr.run, or stopped at the first token): the prompt is the trace
            prompt, completion = (prompt, fed) if fed is not None else ([], prompt)
            where = {position: k for k, position in enumerate(positions.tolist())}
            predicted = predicted.tolist() if predicted is not None else None
            found = thought_positions(model, prompt, completion)
            text = completion_prefix(model, prompt) + "".join(texts[t] for t in completion)
            pieces = split_thoughts(text)
            if [label for _, label in found] != [p.label for p in pieces]:  # same rules, same text
                raise RuntimeError("ThoughtClassifier: thought_positions and split_thoughts disagree; please report this")
            keep, thoughts = [], []
            for piece, (position, label) in zip(pieces, found):
                k = where.get(position)
                if k is None:
                    raise RuntimeError(
                        f"ThoughtClassifier recorded no state at row {row}, position {position} (a thought's "
                        "separator); please report this"
                    )
                keep.append(k)
                guess = self.linear_probe.classes[predicted[k]] if predicted is not None else None
                thoughts.append(ClassifiedThought(len(thoughts), label, piece.text, position, guess))
            all_thoughts.append(thoughts)
            all_states.append(values[torch.tensor(keep, dtype=torch.long, device=values.device)])
        return ClassifiedThoughts(all_thoughts, all_states, self._site, sum(len(p) for p, _, _ in hits))
