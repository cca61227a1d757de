"""ReasoningGraph: the probe that gives one hidden-state vector per reasoning step.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3). The generated
text is cut into steps at newlines; each step becomes the mean hidden state of its tokens at
block ``int(0.9 * L)``. The probe :class:`ReasoningGraph` (registry name ``"reasoning_graph"``)
makes those step vectors in one of two ways: ``steps="streaming"`` (the default) streams them
while decoding and keeps only one vector per step, never every hidden state
(:mod:`probes.streamed_steps`); ``steps="released"`` re-encodes the text after generation as
the authors' released code does (:mod:`probes.released_steps`). :meth:`ReasoningGraph.analyse`
hands them to :func:`probes.graph_metrics.analyse` (pooled K-means in :mod:`probes.kmeans`,
graphs and metrics in :mod:`probes.graph_metrics`); :func:`probes.plots.plot_trajectory` draws
one sample.

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

from torch import Tensor

from probes.graph_metrics import GraphAnalysis, analyse
from probes.released_steps import TextRecorder, check_released_options, released_step_vectors
from probes.streamed_steps import StreamedSteps
from surgery.blocks import Probe, register_block
from surgery.files.results import SavedResult
from surgery.step import Step

__all__ = ["ReasoningGraph", "ReasoningGraphConfig", "StepVectors"]

STEP_RULES = ("line",)
STEP_SOURCES = ("streaming", "released")
RELEASED_ONLY = ("prompt_line", "drop_last_step", "max_length", "template", "questions")


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
    the offsets needed for ``len(text.strip())`` on the device, and writes each ended step's mean
    into a per-row buffer (a :class:`~probes.streamed_steps.StreamedSteps`: one fused op per
    token, at most one host sync per 64 decode steps); memory grows with the number of kept
    steps, not with tokens x width. The prefill is ignored, as are re-runs.

    Under continuous batching (``generate(..., batch_size=N)``) the probe follows rows through
    their slots (:meth:`admit`, :meth:`retire`): :meth:`result` lists every prompt in order, each
    as it is alone (``result(rows=[i])``: prompt ``i`` alone, readable as soon as it has retired).

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
        self._streamed: StreamedSteps | None = None  # made in bind (it needs the vocabulary)
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
        if self._released is not None:
            self._model = model  # result() re-encodes with it
        else:
            self._streamed = StreamedSteps(model.vocabulary_texts, model.site_width(resolved), self.config.min_chars,
                                           model.device)
        self.reset(0)

    def _recorder(self) -> TextRecorder | StreamedSteps | None:
        """What the probe keeps while the model runs: token ids (released) or pooled steps."""
        return self._released if self._released is not None else self._streamed

    def reset(self, batch_size: int) -> None:
        self._steps = None
        if self._recorder() is not None:
            self._recorder().reset(batch_size)

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        """New rows take the slots where ``rows`` holds: forget what those slots held."""
        self._steps = None
        self._recorder().admit(rows)

    def retire(self, slot: int, row: int) -> None:
        """The row ``row`` finished in ``slot``: keep its tokens (released) or step vectors."""
        self._steps = None
        self._recorder().retire(slot, row)

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        if self._released is not None:
            self._steps = None
            self._released.observe(step)
        elif not step.is_prefill:
            self._steps = None
            self._streamed.observe(value, step)

    def held_bytes(self) -> int:
        """Bytes of device state the probe holds now (what the benchmark measures)."""
        return self._recorder().held_bytes()

    def result(self, rows: Sequence[int] | None = None) -> StepVectors:
        """Step vectors per row: ``[n_steps_i, d]`` float32 tensors on the model's device.

        Streaming: includes each row's unfinished trailing step when it is long enough (see the
        class). Released: one forward per row, on the first call after a run (with ``rows``: per
        call, for those rows only, unless a whole result is already at hand).

        Args:
            rows: prompt indices (default: every row of the last run); under continuous batching
                a row is readable as soon as it has retired (``tr.generate(..., on_row=...)``),
                before the run ends. The result then holds those rows, in that order.

        Raises:
            ValueError: under continuous batching, a row of ``rows`` that has not retired yet.
        """
        if rows is None:
            if self._steps is None:
                self._steps = self._step_vectors()
            return StepVectors(list(self._steps), self._site, self.config.steps)
        if self._steps is not None and self._released is not None:  # the whole run's, at hand: no forward again
            return StepVectors([self._steps[row] for row in rows], self._site, self.config.steps)
        # not cached: a partial result (other rows may still run)
        return StepVectors(self._step_vectors(rows), self._site, self.config.steps)

    def _step_vectors(self, rows: Sequence[int] | None = None) -> list[Tensor]:
        """The step vectors of ``rows`` (None: every row), re-encoded (released) or as pooled."""
        if self._released is not None:
            inputs, c = self.released_inputs(rows), self.config  # first: it says when the probe has not run
            return released_step_vectors(self._model, *inputs, site=self._site, min_chars=c.min_chars,
                                         prompt_line=c.prompt_line, drop_last_step=c.drop_last_step,
                                         max_length=c.max_length, template=c.template)
        if self._streamed is None:
            raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
        return self._streamed.rows(rows)

    def released_inputs(self, rows: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
        """``steps="released"``: the questions and generated texts :meth:`result` re-encodes, per row.

        The texts are ``out.texts`` without each row's last token (never fed back: an EOS, or
        the token that hit ``max_new_tokens``; :class:`~probes.released_steps.TextRecorder`).

        Args:
            rows: prompt indices (default: every row of the last run); under continuous batching
                a row is readable as soon as it has retired (``tr.generate(..., on_row=...)``),
                before the run ends.
        """
        if self._released is None:
            raise ValueError("released_inputs() belongs to ReasoningGraph(steps='released')")
        if not hasattr(self, "_model"):
            raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
        return self._released.inputs(self._model.tokenizer, rows)

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> ReasoningGraph:
        return cls(n_clusters=2, min_chars=1, n_init=1)

    def by_row(self, rows: Sequence[int] | None = None) -> list[Tensor]:
        """Per row, its step vectors; ``rows`` as in :meth:`result`."""
        return list(self.result(rows))

    def analyse(self, n_clusters: int | None = None, kmeans: str = "sklearn", min_steps: int = 0) -> GraphAnalysis:
        """:func:`probes.graph_metrics.analyse` on :meth:`result` with this probe's K, seed and ``n_init``.

        ``min_steps``: samples with fewer steps are left out of the cycle detection ratio (0:
        none). The released denominator is ``min_steps=1`` with ``steps="released"`` and
        ``min_steps=2`` when streaming (:func:`~probes.graph_metrics.cycle_detection_ratio`).
        """
        k = self.config.n_clusters if n_clusters is None else n_clusters
        return analyse(self.result(), k, seed=self.config.seed, n_init=self.config.n_init, kmeans=kmeans,
                       min_steps=min_steps)
