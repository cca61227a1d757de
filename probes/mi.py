"""MIEstimator: per-token mutual information with the answer, and its peaks (MI peaks).

Paper: Qian et al., "Demystifying Reasoning Dynamics with Mutual Information: Thinking Tokens are
Information Peaks in LLM Reasoning", arXiv 2506.02867, section 3 (MI along the reasoning
trajectory, nHSIC estimator; Tukey's upper fence for peaks) and section 4 (thinking tokens at the
peaks). The formulas we follow are in ``../shared/METHODS.md`` section 2. This module is the
probe; the estimator's mathematics is in :mod:`probes.hsic`, the peaks in :mod:`probes.peaks`.

Per generated token t, ``h_t`` is the site's value (default ``resid_post.-1``, the last block's
output before the final norm) at the position that *emits* token t: the prefill's last position
emits token 0, decode step k's fed position emits token k. ``h_y`` is the site's value at the last
token of the reference answer run alone through the model (one vector per problem). The
paper-compatible score is ``m_t = nHSIC(h_t, h_y)`` with the d coordinates taken as d paired
scalar samples (see :func:`probes.hsic.nhsic`).

Deviations from the released code (each released choice is a named mode, to reproduce
published figures; the defaults follow the paper's text):

- float64 throughout, and the same value computed cheaper (``Ry`` once per problem, when the
  probe is bound, kept as a truncated SVD; low-rank token kernels): see :mod:`probes.hsic`.
  ``precision="float32"`` computes as released (float32, ``torch.inverse``, op for op).
- Tukey peaks, as the paper's text says; ``peak_rule="top_k"``: the released notebook's top 20
  values (:func:`probes.peaks.top_k_peaks`). ``PeakStats.ratio`` per value; the released code
  counts one token fewer: ``ratio_steps="released_total_tokens"``.
- representation-recycling re-runs are not observed (the trace calls no probe for them): the
  first pass is kept.
- rows that have finished are still computed in the batched solve (no host sync per step) and
  dropped in :meth:`MIEstimator.result`; pass the generation output, ``result(out)``, to cut
  each row to exactly its generated tokens.

Example::

    import surgery
    from probes import MIEstimator
    model = surgery.load()
    mi = MIEstimator(answers=["56"])
    with surgery.trace(model, mi) as tr:
        out = tr.generate(["What is 7 * 8?"], max_new_tokens=64, chat=True)
    res = mi.result(out)
    res.values[0], res.peaks[0], res.stats[0]
    res.peak_token_texts(out, model.tokenizer)
    res.plot("mi.png")
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from probes.hsic import _answer_factors, _check_precision, _nhsic_given_factors, nhsic_sync_free
from probes.hsic import _nhsic_released_float32, _released_ratio_float32
from probes.mi_rows import RowSeries, SlotAnswers
from probes.peaks import PeakStats, _check_k, _check_peak_rule, _check_ratio_steps, fence_so_far, kth_largest_so_far
from probes.peaks import top_k_peaks, tukey_peaks
from probes.plots import plot_mi
from surgery.blocks import Probe, register_block
from surgery.capture import states_at
from surgery.files.results import SavedResult
from surgery.signals import SignalBoard, SignalSpec
from surgery.step import Step

__all__ = ["MIEstimator", "MIEstimatorConfig", "MIResult"]


@dataclass(frozen=True)
class MIEstimatorConfig:
    site: str = field(default="resid_post.-1", metadata={"help": "the site whose value is h_t (and h_y)"})
    answers: tuple[str, ...] | None = field(
        default=None, metadata={"help": "reference answer text per prompt row (h_y = its last token's state)"}
    )
    sigma: float = field(default=50.0, metadata={"help": "Gaussian kernel bandwidth (paper: 50, grid 50-400)"})
    epsilon: float = field(default=1e-5, metadata={"help": "ridge of the nHSIC estimator (paper: 1e-5)"})
    warmup: int = field(default=16, metadata={"help": "tokens of a row before its running fence may mark a peak (signal 'peak')"})
    kernel_rank: int = field(default=64, metadata={"help": "pivoted-Cholesky columns per token on the sync-free path"})
    sync_free: bool | None = field(
        default=None, metadata={"help": "fixed work per token, no host sync (None: when a trigger reads its signals)"}
    )
    peak_rule: str = field(default="tukey", metadata={"help": "'tukey' (paper: Q3 + 1.5 IQR) or 'top_k' (released)"})
    top_k: int = field(default=20, metadata={"help": "peaks per series with peak_rule='top_k' (released: 20)"})
    precision: str = field(default="float64", metadata={"help": "'float64' or 'float32' (released; checks figures)"})
    ratio_steps: str = field(default="values", metadata={"help": "ratio per 'values' or 'released_total_tokens'"})


@dataclass
class MIResult(SavedResult):
    """What :class:`MIEstimator` measured, one entry per prompt row.

    Attributes:
        values: float64 ``[n_tokens]`` per row: ``m_t`` for each generated token (CPU), float32
            numbers with ``precision="float32"``.
        peaks: int64 peak indices per row, ascending, by ``peak_rule``.
        stats: :class:`~probes.peaks.PeakStats` per row.
        peak_rule: the rule that made ``peaks`` and ``stats``: ``"tukey"``
            (:func:`probes.peaks.tukey_peaks`) or ``"top_k"`` (:func:`probes.peaks.top_k_peaks`).
        top_k: ``k`` of the ``"top_k"`` rule; None for ``"tukey"``.
        ratio_steps: what ``stats[i].ratio`` divides by (:data:`probes.peaks.RATIO_STEPS`).
        precision: how ``values`` were computed (:data:`probes.hsic.PRECISIONS`).
    """

    values: list[Tensor]
    peaks: list[Tensor]
    stats: list[PeakStats]
    peak_rule: str = "tukey"
    top_k: int | None = None
    ratio_steps: str = "values"
    precision: str = "float64"

    def peak_token_texts(self, out, tokenizer) -> list[list[str]]:
        """The generated tokens at the peaks, per row, as decoded text.

        Args:
            out: the :class:`~surgery.decode.engine.GenerationOutput` of the same run.
            tokenizer: the model's tokenizer (``model.tokenizer``).
        """
        return [
            [tokenizer.decode([out.token_ids[row][t]]) for t in peaks.tolist()] for row, peaks in enumerate(self.peaks)
        ]

    def plot(self, path, row: int = 0) -> None:
        """Save a PNG of ``m_t`` over tokens for one row, peaks marked, with the Tukey fence
        when ``peak_rule`` is ``"tukey"`` (:func:`probes.plots.plot_mi`)."""
        plot_mi(self, path, row)


@register_block("mi_estimator")
class MIEstimator(Probe):
    """Per-token MI between the emitting state ``h_t`` and the answer state ``h_y`` (MI peaks).

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`) only on the sync-free path (below):
    then an instance says so, and a compiled decode step holds it (its values, fence and count
    live in device buffers written in place). By default the per-token pivoted Cholesky asks
    the host every 8 columns whether every row has converged, and a compiled run with it
    attached decodes eagerly.

    Signals (:mod:`surgery.signals`, read with :class:`~surgery.signals.OnSignal`), published
    at its site for each row's emitting position every forward:

    - ``"value"`` (float): ``m_t`` of the token this forward emits (NaN for finished rows);
    - ``"fence"`` (float): Tukey's upper fence of the row's values before it
      (:func:`probes.peaks.fence_so_far`; +inf before the first value); with
      ``peak_rule="top_k"`` their k-th largest (:func:`probes.peaks.kth_largest_so_far`);
    - ``"peak"`` (bool): ``m_t`` is above that fence and the row has at least ``warmup``
      values before it: :func:`probes.peaks.running_peaks` (``"top_k"``:
      :func:`probes.peaks.running_top_k_peaks`, which fires at every offline top-k peak and more
      often), the rule a decoder can apply while it generates (closed-loop recycling fires on it).

    When a trigger reads its signals (or with ``sync_free=True``) each token's ``m_t`` comes from
    :func:`probes.hsic.nhsic_sync_free`: exactly ``kernel_rank`` pivoted-Cholesky columns, no
    host sync (equal to the default path to ~1e-10 relative for every token whose kernel
    converges within them; :meth:`result` warns about any that did not).

    With ``precision="float32"`` each ``m_t`` is the released estimator's (:func:`probes.hsic.nhsic`,
    ≈ 6·d³ FLOPs per token, no host sync; ``kernel_rank`` unused).

    Paper: arXiv 2506.02867, section 3 (nHSIC, Tukey peaks); see the module docstring for the
    definitions and the deviations (float64 and a cheaper but equal formula, both in
    :mod:`probes.hsic`; re-runs ignored). The released code's choices (ChnQ/MI-Peaks bcee82c)
    are modes: to check a published series set all of ``peak_rule="top_k"`` (its notebook's 20
    largest values), ``precision="float32"`` and ``ratio_steps="released_total_tokens"``.

    Args:
        site: where ``h_t`` and ``h_y`` are read (default the last block's output).
        answers: reference answer text, one per prompt row, in prompt order. Each is tokenized
            as a plain (non-chat) prompt and run alone; ``h_y`` is the state at its last token.
        sigma: Gaussian kernel bandwidth.
        epsilon: ridge.
        warmup: a row's first ``warmup`` tokens never mark a ``"peak"`` (the running fence needs
            a history to mean something).
        kernel_rank: columns of the token kernel's factor on the sync-free path.
        sync_free: force the sync-free path on (True) or off (False); None: on when a trigger
            reads the probe's signals.
        peak_rule: ``"tukey"`` (the paper's text) or ``"top_k"`` (:data:`probes.peaks.PEAK_RULES`).
        top_k: peaks per series with ``peak_rule="top_k"`` (the released notebook's 20).
        precision: ``"float64"`` or ``"float32"``, the released estimator's precision, for checking
            published series (:data:`probes.hsic.PRECISIONS`).
        ratio_steps: ``PeakStats.ratio``'s denominator (:data:`probes.peaks.RATIO_STEPS`).

    The answer states and ``Ry`` are computed when the probe is bound (entering the trace), in
    one batched forward; every ``generate`` or ``run`` must then have ``len(answers)`` rows.
    Under continuous batching (``generate(..., batch_size=N)``) each slot holds the answer of
    the prompt in it (:class:`~probes.mi_rows.SlotAnswers`), a row's series and signals start
    empty when it is admitted, and :meth:`result` lists every prompt in prompt order, each as
    it is alone (``result(rows=[i])``: prompt ``i`` alone, readable as soon as it has retired).

    Example::

        mi = MIEstimator(answers=["56", "8"])
        with surgery.trace(model, mi) as tr:
            out = tr.generate(["What is 7 * 8?", "3 + 5?"], max_new_tokens=128, chat=True)
        mi.result(out).stats[0].count

    The released choices, as a study's TOML or the block registry keep them:

    >>> from surgery.blocks import Block
    >>> released = MIEstimator(answers=["56"], peak_rule="top_k", top_k=20, precision="float32",
    ...                        ratio_steps="released_total_tokens")
    >>> config = Block.from_dict(released.to_dict()).config
    >>> config.peak_rule, config.top_k, config.precision, config.ratio_steps
    ('top_k', 20, 'float32', 'released_total_tokens')
    """

    config_class = MIEstimatorConfig

    def __init__(
        self, site: str = "resid_post.-1", answers: Sequence[str] | None = None, sigma: float = 50.0,
        epsilon: float = 1e-5, warmup: int = 16, kernel_rank: int = 64, sync_free: bool | None = None,
        peak_rule: str = "tukey", top_k: int = 20, precision: str = "float64", ratio_steps: str = "values",
    ):
        if answers is not None:
            if isinstance(answers, str) or not all(isinstance(a, str) and a for a in answers):
                raise TypeError("answers must be a list of non-empty strings, one per prompt row")
            answers = tuple(answers)
        if not sigma > 0 or not epsilon > 0:
            raise ValueError(f"sigma and epsilon must be positive, got sigma={sigma}, epsilon={epsilon}")
        for name, number in (("warmup", warmup), ("kernel_rank", kernel_rank)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{name} must be a positive integer, got {number!r}")
        _check_peak_rule(peak_rule)
        _check_k(top_k, "top_k")
        _check_precision(precision)
        _check_ratio_steps(ratio_steps)
        self.config = MIEstimatorConfig(site=site, answers=answers, sigma=float(sigma), epsilon=float(epsilon),
                                        warmup=warmup, kernel_rank=kernel_rank, sync_free=sync_free,
                                        peak_rule=peak_rule, top_k=top_k, precision=precision, ratio_steps=ratio_steps)
        self._ry: tuple[Tensor, ...] | None = None  # the answers' Ry: see bind
        self._answer_states: Tensor | None = None
        self._series: RowSeries | None = None
        self._slots: SlotAnswers | None = None  # continuous batching: each slot's answer

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> MIEstimator:
        # one answer per prompt, made from the prompt alone (a row's answer is the same alone or batched)
        return cls(answers=[f"The answer is {len(prompt) % 10}." for prompt in prompts] or None)

    def by_row(self, rows: Sequence[int] | None = None) -> list[Tensor]:
        """Per row, its MI values (:attr:`MIResult.values`); ``rows`` as in :meth:`result`."""
        return self.result(rows=rows).values

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        site = model.resolve_site(self.config.site)
        if site.kind == "logits":
            raise ValueError("MIEstimator needs a residual-width site such as 'resid_post.-1', not 'logits' (d = vocab)")
        if not self.config.answers:
            raise ValueError("MIEstimator needs the reference answers: MIEstimator(answers=[...]), one string per prompt")
        self._answer_states = self._last_token_states(model, site, list(self.config.answers))
        ry_of = _released_ratio_float32 if self.config.precision == "float32" else _answer_factors
        ry = ry_of(self._answer_states, self.config.sigma, self.config.epsilon)
        self._ry = ry if isinstance(ry, tuple) else (ry,)  # float64: (left, right); float32: (Ry,)
        self._site = site.canonical
        self.signal_board = SignalBoard(self.signals())

    def signals(self) -> dict[str, SignalSpec]:
        site = getattr(self, "_site", self.config.site)
        return {name: SignalSpec(name, kind, site) for name, kind in (("value", "float"), ("fence", "float"), ("peak", "bool"))}

    def use_signals(self, names) -> None:
        super().use_signals(names)
        self.graph_safe = self.sync_free  # this instance: see the class docstring

    @property
    def sync_free(self) -> bool:
        """Whether this run computes ``m_t`` on the fixed-work path (see the class docstring)."""
        return bool(self.signals_read) if self.config.sync_free is None else self.config.sync_free

    @staticmethod
    def _last_token_states(model, site, texts: list[str]) -> Float[Tensor, "n d"]:
        """The site's value at each text's last token, one forward (float64)."""
        rows = [model.tokenizer(text)["input_ids"] for text in texts]
        return states_at(model, site, rows, [[len(row) - 1] for row in rows]).to(torch.float64)

    def _wrong_count(self, rows: int) -> ValueError:
        return ValueError(f"MIEstimator has {len(self.config.answers or ())} answers but this run has {rows} prompt "
                          "rows: pass one answer per prompt, in prompt order")

    def reset(self, batch_size: int) -> None:
        if batch_size > len(self.config.answers or ()):  # fewer rows: see observe (slots) and result
            raise self._wrong_count(batch_size)
        self._series = None
        self._slots = None  # continuous batching: each slot's answer (admit)
        if self.signal_board is not None:
            self.signal_board.clear()

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        if self._slots is None:
            self._slots = SlotAnswers(self._ry, len(rows))
        self._slots.admit(rows, prompts)
        if self._series is not None:
            self._series.admit(rows)
        self.signal_board.admit(rows)

    def retire(self, slot: int, row: int) -> None:
        self._series.retire(slot, row)

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        # The last position of every forward emits the next token (prompts are left-padded).
        config = self.config
        if self._slots is None and value.shape[0] != len(config.answers):
            raise self._wrong_count(value.shape[0])
        ry = self._ry if self._slots is None else self._slots.factors  # each row's answer
        if config.precision == "float32":  # as released, each row against its own Ry; exact in float64
            mi = _nhsic_released_float32(value[:, -1], *ry, config.sigma, config.epsilon).to(torch.float64)
            converged = torch.ones_like(mi, dtype=torch.bool)
        elif self.sync_free:
            rank = min(config.kernel_rank, value.shape[-1])
            mi, converged = nhsic_sync_free(value[:, -1], *ry, config.sigma, config.epsilon, rank)
        else:
            mi = _nhsic_given_factors(value[:, -1], *ry, config.sigma, config.epsilon)
            converged = torch.ones_like(mi, dtype=torch.bool)
        if self._series is None:
            self._series = RowSeries(mi.shape[0], step.capacity or 8, mi.device, growable=step.capacity == 0,
                                     pooled=self._slots is not None)
        valid = step.valid[:, -1]
        series = self._series
        if self.signals_read:  # nobody reads them: no sort of the history per step
            if config.peak_rule == "tukey":
                fence = fence_so_far(series.values, series.count)
            else:
                fence = kth_largest_so_far(series.values, series.count, config.top_k)
            self.signal_board.publish("value", torch.where(valid, mi, torch.nan), step)
            self.signal_board.publish("fence", fence, step)
            self.signal_board.publish("peak", valid & (series.count >= config.warmup) & (mi > fence), step)
        series.append(mi, converged, valid)

    def result(self, out=None, rows: Sequence[int] | None = None) -> MIResult:
        """Per-row MI values (one per generated token), peaks and statistics of the last run.

        A step's record belongs to a row when the step feeds the row a valid token: such a step
        emits the row's next token (a step that would feed the token a row stopped on is not
        valid, see :class:`~surgery.step.Step`), so each row gets one value per generated token.

        Args:
            out: the run's :class:`~surgery.decode.engine.GenerationOutput`; when given, it is checked
                against the values (one per generated token of each row; with ``rows``, of those
                rows: ``out.lengths[r]``).
            rows: prompt indices (default: every row of the last run); under continuous batching
                a row is readable as soon as it has retired (``tr.generate(..., on_row=...)``),
                before the run ends. The lists of the result then hold those rows, in that order.

        Raises:
            ValueError: a row of ``rows`` not retired yet; with ``rows=None``, fewer prompts than answers.
        """
        config = self.config
        described = dict(peak_rule=config.peak_rule, top_k=config.top_k if config.peak_rule == "top_k" else None,
                         ratio_steps=config.ratio_steps, precision=config.precision)
        if self._series is None:
            if rows:
                raise ValueError(f"MIEstimator has recorded nothing for row {rows[0]} yet: read a row once it has run")
            return MIResult([], [], [], **described)
        # fewer prompts than answers: only a whole run's result can tell (mid-run, some are still to come)
        if rows is None and self._slots is not None and self._slots.admitted != len(config.answers):
            raise self._wrong_count(self._slots.admitted)
        values, converged = self._series.rows(rows)
        unconverged = sum(int((~c).sum()) for c in converged)
        if unconverged:
            warnings.warn(
                f"MIEstimator: {unconverged} token(s) needed more than kernel_rank={self.config.kernel_rank} "
                "pivoted-Cholesky columns; their values are those of the rank-limited kernel. Raise kernel_rank.",
                stacklevel=2,
            )
        if out is not None:
            lengths = list(out.lengths) if rows is None else [out.lengths[row] for row in rows]
            if any(len(v) not in (0, n) for v, n in zip(values, lengths, strict=True)):
                raise ValueError(
                    f"out does not match this probe's last run: lengths {lengths}, "
                    f"recorded {[len(v) for v in values]} values per row"
                )
        none = (torch.zeros(0, dtype=torch.long), PeakStats(0, float("nan"), None, None, None, float("nan"), float("nan"), None))
        if config.peak_rule == "tukey":  # below: a row that does not carry the probe (stacks) has no values
            found = [tukey_peaks(v, config.ratio_steps) if len(v) else none for v in values]
        else:
            found = [top_k_peaks(v, config.top_k, config.ratio_steps) if len(v) else none for v in values]
        return MIResult(values=values, peaks=[p for p, _ in found], stats=[s for _, s in found], **described)
