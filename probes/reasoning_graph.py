"""ReasoningGraph: the probe that gives one hidden-state vector per reasoning step.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3). The generated
text is cut into steps at newlines; each step becomes the mean hidden state of its tokens at
block ``int(0.9 * L)``. The probe :class:`ReasoningGraph` (registry name ``"reasoning_graph"``)
makes those step vectors in one of two ways: ``steps="streaming"`` (the default) streams them
while decoding and keeps only one vector per step, never every hidden state;
``steps="released"`` re-encodes the text after generation as the authors' released code does
(:mod:`probes.released_steps`). :meth:`ReasoningGraph.analyse` hands them to
:func:`probes.graph_metrics.analyse` (pooled K-means in :mod:`probes.kmeans`, graphs and
metrics in :mod:`probes.graph_metrics`); :func:`probes.plots.plot_trajectory` draws one sample.

Paper-compatible defaults: site ``resid_pre.{int(0.9 * n_layers)}`` (the residual stream
entering that block, which is HF ``hidden_states[int(0.9 * L)]``, the index the released code
uses), split on single newlines, drop steps whose stripped text has <= 5 characters, K=200,
k-means++, ``n_init=10``, seed 0, K-means fitted on all samples pooled.

Deviations and decisions of ``steps="streaming"`` (``"released"``: see
:mod:`probes.released_steps`):

- Only reasoning steps are embedded: the prompt is not (the released code is off by one and
  embeds prompt lines too). Everything the model generates counts, also after ``</think>``.
- Steps are cut at token granularity: a token whose text ends with ``"\\n"`` ends the current
  step and belongs to it. A token with a newline in its middle does not cut (rare in BPE
  vocabularies, which keep newlines at token ends).
- "Long enough" is the released rule ``len(step_text.strip()) > min_chars``, computed exactly
  while streaming from per-token offsets of the first and last non-whitespace character.
- The last generated token (EOS, or the one that hit the length limit) is never fed back, so it
  has no hidden state and no step contains it. An unfinished trailing step (no newline after
  it) is kept if it is long enough.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.graph_metrics import GraphAnalysis, analyse
from probes.released_steps import TextRecorder, check_released_options, released_step_vectors
from surgery.blocks import Probe, register_block
from surgery.kernels import segment_mean_update
from surgery.files.results import SavedResult
from surgery.step import Step

__all__ = ["ReasoningGraph", "ReasoningGraphConfig", "StepVectors"]

STEP_RULES = ("line",)
STEP_SOURCES = ("streaming", "released")
RELEASED_ONLY = ("prompt_line", "drop_last_step", "max_length", "template", "questions")
_INITIAL_CAPACITY = 64


@dataclass(frozen=True)
class ReasoningGraphConfig:
    site: str | None = field(
        default=None, metadata={"help": "site to pool; None = resid_pre.{int(0.9 * n_layers)} (HF hidden_states index)"}
    )
    n_clusters: int = field(default=200, metadata={"help": "K of the pooled K-means"})
    step: str = field(default="line", metadata={"help": "step rule: 'line' = a token ending with '\\n' ends a step"})
    min_chars: int = field(default=5, metadata={"help": "keep steps whose stripped text has more characters"})
    seed: int = field(default=0, metadata={"help": "K-means random_state"})
    n_init: int = field(default=10, metadata={"help": "K-means restarts (best inertia kept)"})
    steps: str = field(default="streaming", metadata={"help": "'streaming' (pooled while decoding) or 'released' "
                                                              "(the text re-encoded after generation, as released)"})
    prompt_line: bool = field(default=True, metadata={"help": "released: a prompt line first, as released"})
    drop_last_step: bool = field(default=True, metadata={"help": "released: never embed the last line, as released"})
    max_length: int | None = field(default=8192, metadata={"help": "released: truncation in tokens (None: none)"})
    template: str | None = field(default=None, metadata={"help": "released: '{question}' template; None = released"})
    questions: tuple[str, ...] | None = field(default=None, metadata={"help": "released: per row; None = the prompts"})


@dataclass
class StepVectors(SavedResult, Sequence):
    """What :class:`ReasoningGraph` kept: one ``[n_steps, d]`` float32 tensor of step vectors per row.

    It reads as the list of those tensors (``steps[0]``, ``len(steps)``, ``for row in steps``),
    which is what :func:`~probes.graph_metrics.analyse` takes.

    Attributes:
        rows: per row, its step vectors in order.
        site: the site pooled (resolved, e.g. ``"resid_pre.27"``).
        steps: how they were made, ``"streaming"`` or ``"released"`` (the probe's ``steps``).
    """

    rows: list[Tensor]
    site: str
    steps: str = "streaming"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> Tensor:
        return self.rows[row]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.rows)


@register_block("reasoning_graph")
class ReasoningGraph(Probe):
    """One mean hidden-state vector per reasoning step, streamed or as released; analysed as a graph.

    Not graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): the pooling is one device kernel,
    but the step buffer grows on a host-side bound counted per step (the memory stays ~1.5x the
    steps, not tokens x width); with it attached a compiled run decodes eagerly.

    Paper: Topology of Reasoning (arXiv 2506.05744), §3; METHODS.md §3. Deviations: see the
    module docstring (only generated tokens are embedded; steps cut at token granularity).

    ``steps="released"`` keeps only token ids while decoding (a
    :class:`~probes.released_steps.TextRecorder`); :meth:`result` then runs
    :func:`~probes.released_steps.released_step_vectors` on each row's question and generated
    text, one forward per row with the model bound. The question is ``questions[row]`` when
    given, else the row's prompt: its user turn when it was chat-templated (``chat=True``), else
    its text (:func:`~probes.released_steps.prompt_question`); :meth:`released_inputs` shows both.

    ``steps="streaming"``: while decoding, each row keeps a running sum ``[d]``, a token count and
    the offsets needed for ``len(text.strip())`` on the device. When a token ending with
    ``"\\n"`` is fed, the row's mean is written into a per-row buffer ``[batch, capacity, d]`` at
    the row's step counter (no host sync), and the counter advances only if the step is long
    enough; the pooling itself is one fused op per token
    (:func:`surgery.kernels.segment_mean_update`, a Triton kernel on CUDA). Memory therefore
    grows with the number of kept steps, not with tokens x width. The one host sync is the
    capacity check: the host keeps an upper bound on the largest step counter (it grows by one
    per decode step) and reads the true maximum ``m`` only when that bound reaches the capacity,
    then grows the buffer to ``m + max(64, m // 2)`` slots if it has less; so at most one sync
    per 64 decode steps (per ``m / 2`` once rows hold ``m`` steps), and the buffer holds at most
    ``1.5 m + 64`` vectors per row. The prefill is ignored, as are re-runs.

    Args:
        site: the site to pool. ``None`` (default) picks ``resid_pre.{int(0.9 * n_layers)}``
            when the trace binds the probe (:meth:`for_model` writes it out beforehand).
        n_clusters: K of the K-means in :meth:`analyse` (the paper: 200).
        step: the step rule; only ``"line"`` (the released code's split on single newlines).
        min_chars: a step is kept if ``len(text.strip()) > min_chars`` (released code: 5).
        seed: K-means ``random_state``.
        n_init: K-means restarts.
        steps: ``"streaming"`` (default) or ``"released"``. The options below are released
            only (a ValueError with ``"streaming"``); their defaults are the released choices.
        prompt_line: True: the first vector is a prompt line, as released (the released start,
            segment ``len(question.strip().split("\\n"))``); False: only reasoning tokens.
        drop_last_step: True: the last kept line is never embedded, as released; False: it is.
        max_length: truncation of the re-encoded text in tokens (released: 8192); None: none.
        template: the question template with ``{question}``; None: the released GSM8K one
            (:data:`~probes.released_steps.RELEASED_TEMPLATE`).
        questions: one question per row of the next run; None: from the prompts (above).

    Example:
        >>> ReasoningGraph().config.steps
        'streaming'
        >>> released = ReasoningGraph(steps="released")
        >>> released.config.prompt_line, released.config.drop_last_step, released.config.max_length
        (True, True, 8192)

    With a model::

        import surgery
        from probes import ReasoningGraph, plot_trajectory

        model = surgery.load()
        graph = ReasoningGraph.for_model(model, n_clusters=20)   # or steps="released"
        with surgery.trace(model, graph) as tr:
            out = tr.generate(prompts, max_new_tokens=512, chat=True)
        steps = graph.result()            # per row: [n_steps, d_model]
        found = graph.analyse()           # labels, graphs, metrics, cycle detection ratio
        plot_trajectory(steps[0], found.labels[0], found.centers, "row0.png")
    """

    config_class = ReasoningGraphConfig

    def __init__(
        self,
        site: str | None = None,
        n_clusters: int = 200,
        step: str = "line",
        min_chars: int = 5,
        seed: int = 0,
        n_init: int = 10,
        steps: str = "streaming",
        prompt_line: bool = True,
        drop_last_step: bool = True,
        max_length: int | None = 8192,
        template: str | None = None,
        questions: Sequence[str] | None = None,
    ):
        if step not in STEP_RULES:
            raise ValueError(f"unknown step rule {step!r}: supported {', '.join(map(repr, STEP_RULES))}")
        if steps not in STEP_SOURCES:
            raise ValueError(f"unknown steps={steps!r}: 'streaming' (pooled while decoding, the default) or "
                             "'released' (the text re-encoded after generation, as the released code does)")
        check_released_options(prompt_line, drop_last_step, max_length, template, questions)
        for name, value, kind in (("n_clusters", n_clusters, "positive"), ("n_init", n_init, "positive"),
                                  ("min_chars", min_chars, "non-negative")):
            if isinstance(value, bool) or not isinstance(value, int) or value < (kind == "positive"):
                raise ValueError(f"{name} must be a {kind} int, got {value!r}")
        questions = None if questions is None else tuple(questions)
        self.config = ReasoningGraphConfig(site, n_clusters, step, min_chars, int(seed), n_init, steps, prompt_line,
                                           drop_last_step, max_length, template, questions)
        changed = [key for key in RELEASED_ONLY if getattr(self.config, key) != getattr(ReasoningGraphConfig(), key)]
        if steps == "streaming" and changed:
            raise ValueError(f"only steps='released' takes {', '.join(changed)}: add steps='released', or leave "
                             "them at their defaults")
        self._released = TextRecorder(questions) if steps == "released" else None
        self._site: str | None = None
        self._steps: list[Tensor] | None = None

    @classmethod
    def for_model(cls, model, **options) -> ReasoningGraph:
        """The probe with its default site written out for ``model`` (``resid_pre.{int(0.9 L)}``)."""
        options.setdefault("site", cls.default_site(model))
        return cls(**options)

    @staticmethod
    def default_site(model) -> str:
        """``resid_pre.{int(0.9 * n_layers)}``: HF ``hidden_states[int(0.9 L)]``, as the paper."""
        return f"resid_pre.{int(0.9 * model.n_layers)}"

    def sites(self) -> tuple[str, ...]:
        site = self.config.site or self._site
        if site is None:
            raise ValueError(
                "ReasoningGraph(site=None) picks its site from the model when it is bound (a trace "
                "does that): call bind(model) first, or use ReasoningGraph.for_model(model, ...)"
            )
        return (site,)

    def bind(self, model) -> None:
        site = self.config.site if self.config.site is not None else self.default_site(model)
        resolved = model.resolve_site(site)
        if resolved.kind == "logits":
            raise ValueError("ReasoningGraph pools hidden states: pick a resid/attn/mlp site, not 'logits'")
        self._site = str(resolved)
        self._width = model.site_width(resolved)
        self._device = model.device
        if self._released is not None:
            self._model = model  # result() re-encodes with it
            return self.reset(0)
        texts = model.vocabulary_texts
        # Per vocabulary entry: does it end a line, its length, and the offsets of its first and
        # (one past) last non-whitespace character, so len(step.strip()) streams exactly.
        self._ends_line = torch.tensor([t.endswith("\n") for t in texts], dtype=torch.bool, device=self._device)
        self._length = torch.tensor([len(t) for t in texts], dtype=torch.long, device=self._device)
        self._first = torch.tensor([len(t) - len(t.lstrip()) for t in texts], dtype=torch.long, device=self._device)
        self._last = torch.tensor([len(t.rstrip()) for t in texts], dtype=torch.long, device=self._device)
        self._has_text = torch.tensor([bool(t.strip()) for t in texts], dtype=torch.bool, device=self._device)
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        self._steps = None
        if self._released is not None:
            self._released.reset(batch_size)
            return
        device, width = getattr(self, "_device", "cpu"), getattr(self, "_width", 0)
        zeros = lambda dtype: torch.zeros(batch_size, dtype=dtype, device=device)  # noqa: E731
        self._sum = torch.zeros(batch_size, width, dtype=torch.float32, device=device)
        self._count = zeros(torch.long)
        self._chars = zeros(torch.long)  # characters of the step so far
        self._start = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # first non-space
        self._end = zeros(torch.long)  # one past the last non-space
        self._n_steps = zeros(torch.long)
        self._buffer = torch.zeros(batch_size, _INITIAL_CAPACITY, width, dtype=torch.float32, device=device)
        self._bound = 0  # host-side upper bound on max(self._n_steps)

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        if self._released is not None:
            self._steps = None
            self._released.observe(step)
            return
        if step.is_prefill:
            return
        self._steps = None
        tokens, valid = step.token_ids[:, -1], step.valid[:, -1]
        has_text = self._has_text[tokens] & valid
        self._start = torch.where(has_text & (self._start < 0), self._chars + self._first[tokens], self._start)
        self._end = torch.where(has_text, self._chars + self._last[tokens], self._end)
        self._chars += torch.where(valid, self._length[tokens], 0)
        ended = self._ends_line[tokens] & valid
        self._close(value[:, -1], valid, ended)

    def _long_enough(self) -> Tensor:
        """Rows whose current step has ``len(text.strip()) > min_chars``."""
        return (self._start >= 0) & (self._end - self._start.clamp(min=0) > self.config.min_chars)

    def _mean(self) -> Tensor:
        return self._sum / self._count.clamp(min=1)[:, None].float()

    def _close(self, x: Tensor, valid: Tensor, ended: Tensor) -> None:
        """Pool the new states ``x``; where the step ``ended``, store its mean and start a new one.

        One :func:`~surgery.kernels.segment_mean_update` (a Triton kernel on CUDA): adds ``x``
        into the running sums where ``valid`` (the token that ends a step belongs to it), writes
        the mean of ended rows at their step counter, advances the counter where the step is
        long enough, and clears the sums, in place, with no host sync. The text offsets are
        cleared here.
        """
        self._ensure_capacity()
        keep = ended & self._long_enough()
        segment_mean_update(x, valid, ended, keep, self._sum, self._count, self._buffer, self._n_steps)
        self._bound += 1
        self._chars = torch.where(ended, 0, self._chars)
        self._start = torch.where(ended, -1, self._start)
        self._end = torch.where(ended, 0, self._end)

    def _ensure_capacity(self) -> None:
        capacity = self._buffer.shape[1]
        if self._bound < capacity:
            return
        self._bound = int(self._n_steps.max()) if self._n_steps.numel() else 0  # the one host sync
        # Headroom of max(64, half the steps held) until the next check: few syncs, and the
        # buffer stays within 1.5 x steps + 64 slots.
        target = self._bound + max(_INITIAL_CAPACITY, self._bound // 2)
        if target > capacity:
            grown = self._buffer.new_zeros(self._buffer.shape[0], target, self._buffer.shape[2])
            grown[:, :capacity] = self._buffer
            self._buffer = grown

    def held_bytes(self) -> int:
        """Bytes of device state the probe holds now (what the benchmark measures)."""
        if self._released is not None:
            return self._released.held_bytes()
        tensors = (self._sum, self._count, self._chars, self._start, self._end, self._n_steps, self._buffer)
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> StepVectors:
        """Step vectors per row: ``[n_steps_i, d]`` float32 tensors on the model's device.

        Streaming: includes each row's unfinished trailing step when it is long enough (see the
        class). Released: one forward per row, on the first call after a run.
        """
        if self._steps is None and self._released is not None:
            inputs, c = self.released_inputs(), self.config  # first: it says when the probe has not run
            self._steps = released_step_vectors(self._model, *inputs, site=self._site, min_chars=c.min_chars,
                                                prompt_line=c.prompt_line, drop_last_step=c.drop_last_step,
                                                max_length=c.max_length, template=c.template)
        if self._steps is None:
            if not hasattr(self, "_sum"):
                raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
            # Read-only, so result() is repeatable and works outside the engine's inference mode.
            counts = self._n_steps.tolist()
            tails = ((self._count > 0) & self._long_enough()).tolist()
            mean = self._mean()
            self._steps = [
                torch.cat([self._buffer[row, :n], mean[row : row + 1]]) if tail else self._buffer[row, :n].clone()
                for row, (n, tail) in enumerate(zip(counts, tails))
            ]
        return StepVectors(list(self._steps), self._site, self.config.steps)

    def released_inputs(self) -> tuple[list[str], list[str]]:
        """``steps="released"``: the questions and generated texts :meth:`result` re-encodes, per row.

        The texts are ``out.texts`` without each row's last token (never fed back: an EOS, or
        the token that hit ``max_new_tokens``; :class:`~probes.released_steps.TextRecorder`).
        """
        if self._released is None:
            raise ValueError("released_inputs() belongs to ReasoningGraph(steps='released')")
        if not hasattr(self, "_model"):
            raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
        return self._released.inputs(self._model.tokenizer)

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> ReasoningGraph:
        return cls(n_clusters=2, min_chars=1, n_init=1)

    def by_row(self) -> list[Tensor]:
        return list(self.result())

    def analyse(self, n_clusters: int | None = None, kmeans: str = "sklearn", min_steps: int = 0) -> GraphAnalysis:
        """:func:`probes.graph_metrics.analyse` on :meth:`result` with this probe's K, seed and ``n_init``.

        ``min_steps``: samples with fewer steps are left out of the cycle detection ratio (0:
        none). The released denominator is ``min_steps=1`` with ``steps="released"`` and
        ``min_steps=2`` when streaming (:func:`~probes.graph_metrics.cycle_detection_ratio`).
        """
        k = self.config.n_clusters if n_clusters is None else n_clusters
        return analyse(self.result(), k, seed=self.config.seed, n_init=self.config.n_init, kmeans=kmeans,
                       min_steps=min_steps)
