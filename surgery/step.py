"""The per-forward context every block sees: fed tokens, positions and per-row flags.

One :class:`Step` describes one forward pass of the decode engine: the prefill (``index == 0``,
every prompt position) or decode step ``k`` (``index == k``, one fed token per row). All fields
are tensors on the model's device, so deciding whether a trigger fires is a tensor op and never
a host-side loop over rows.

Example:
    >>> import torch
    >>> step = Step.prefill(torch.tensor([[5, 7, 9]]), torch.ones(1, 3, dtype=torch.bool),
    ...                     think_ids=(7, None))
    >>> step.in_think.tolist()
    [[False, True, True]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["Step", "seal_think_flag", "think_state"]


def think_state(
    token_ids: Int[Tensor, "batch pos"],
    valid: Bool[Tensor, "batch pos"],
    think_ids: tuple[int | None, int | None],
    before: Bool[Tensor, " batch"] | None = None,
) -> Bool[Tensor, "batch pos"]:
    """Whether each position is inside a ``<think>`` span, scanning left to right per row.

    The ``<think>`` token itself counts as inside, ``</think>`` as outside; the last of the two
    seen at or before a position decides. ``before`` is each row's state before the first
    position (False if omitted). Vectorised over rows and positions (a running maximum), no loop.
    """
    open_id, close_id = think_ids
    batch, length = token_ids.shape
    if before is None:
        before = torch.zeros(batch, dtype=torch.bool, device=token_ids.device)
    if open_id is None and close_id is None:
        return before[:, None].expand(batch, length).clone()
    opens = (token_ids == open_id) & valid if open_id is not None else torch.zeros_like(valid)
    closes = (token_ids == close_id) & valid if close_id is not None else torch.zeros_like(valid)
    index = torch.arange(length, device=token_ids.device).expand(batch, length)
    last_event = torch.where(opens | closes, index, -1).cummax(dim=1).values
    last_was_open = opens.gather(1, last_event.clamp(min=0))
    return torch.where(last_event >= 0, last_was_open, before[:, None])


def seal_think_flag(
    token_ids: Int[Tensor, "batch pos"],
    valid: Bool[Tensor, "batch pos"],
    think_ids: tuple[int | None, int | None],
) -> Bool[Tensor, " batch"]:
    """SEAL's released think flag after a prompt: whether the row's prompt holds a ``<think>``.

    The released SEAL code (VITA-Group/SEAL, as METHODS.md section 1 and issue 20 describe it)
    keeps one flag per row: set by a fed ``<think>``, cleared by a fed ``</think>``, and in the
    prefill only the last prompt position can be steered. Its prefill sets the flag when the
    prompt holds a ``<think>`` anywhere, whatever follows it, so a prompt with an earlier turn's
    closed ``<think>…</think>`` starts the completion *inside* (:func:`think_state` says outside).

    Example:
        >>> import torch
        >>> ids = torch.tensor([[7, 1, 8, 2], [1, 2, 3, 4]])
        >>> seal_think_flag(ids, torch.ones(2, 4, dtype=torch.bool), (7, 8)).tolist()
        [True, False]
    """
    open_id, _ = think_ids
    if open_id is None:
        return torch.zeros(token_ids.shape[0], dtype=torch.bool, device=token_ids.device)
    return ((token_ids == open_id) & valid).any(dim=1)


@dataclass(frozen=True)
class Step:
    """What one forward pass feeds, per row and position (all tensors on the model's device).

    Attributes:
        index: 0 for the prefill, k for the k-th decode step (which feeds generated token k-1).
        token_ids: the fed token ids, ``[batch, pos]`` (``pos`` is 1 in decode steps).
        positions: position ids, ``[batch, pos]`` (0 at each row's first real token).
        valid: False at left padding and for finished rows, ``[batch, pos]``; the token a row
            stopped on (EOS, a stop string's last token) is not valid either: alone, the row
            never feeds it.
        in_think: inside a ``<think>`` span, ``[batch, pos]``.
        seal_think: the released SEAL code's think flag, ``[batch, pos]``: at every prefill
            position whether the row's prompt holds a ``<think>`` (:func:`seal_think_flag`), then
            set by a fed ``<think>`` and cleared by a fed ``</think>``
            (:class:`~surgery.triggers.SealThinkFlag` reads it).
        finished: rows that have stopped (on an earlier token or on the token fed now), ``[batch]``.
        text_hits: for each string the engine tracks, keyed ``(string, case_sensitive)`` (see
            :class:`~surgery.triggers.OnText`), whether an occurrence of it ends at each fed
            token, ``[batch, pos]``.
        text_states: each tracked string's matcher state after each fed token, ``[batch, pos]``
            (what :meth:`~surgery.text_match.TextMatcher.completions` needs).
        is_rerun: True while the engine recomputes this step's last position (representation
            recycling). Probes are not called for re-runs; interventions that record where they
            acted skip them, so nothing counts twice.
        is_prefill: True for the prefill (``index == 0``), as a field of its own so that code in
            a compiled decode step reads a constant rather than the changing ``index``.
        index_on_device: ``index`` as a 0-d int64 tensor on the model's device (what a trigger
            compares with, so a compiled step is not specialised on each index).
        capacity: how many decode steps the run may take (``max_new_tokens``; 0 for a single
            forward): what a block sizes its per-step records by
            (:class:`~surgery.decode.records.StepRecords`).
        slots: under continuous batching (:mod:`surgery.decode.slots`), the prefill of rows admitted
            into a running pool: the slots they take. The step's tensors cover every slot of the
            pool (the other slots are padding, not valid), while the model runs on the admitted
            rows only; the trace hands blocks the pool-wide tensor. None otherwise.

    Under continuous batching each row counts its own steps: ``index_on_device`` is then
    ``[batch, 1]``, each row's own index (0 at its prefill), and ``index`` counts the pool's
    forwards.
    """

    index: int
    token_ids: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch pos"]
    valid: Bool[Tensor, "batch pos"]
    in_think: Bool[Tensor, "batch pos"]
    seal_think: Bool[Tensor, "batch pos"]
    finished: Bool[Tensor, " batch"]
    text_hits: dict[tuple[str, bool], Tensor] = field(default_factory=dict)
    text_states: dict[tuple[str, bool], Tensor] = field(default_factory=dict, repr=False)
    is_rerun: bool = False
    is_prefill: bool = False
    index_on_device: Tensor | None = None
    capacity: int = 0
    slots: tuple[int, ...] | None = None
    _tails: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def length(self) -> int:
        return self.token_ids.shape[1]

    def tail(self, length: int) -> Step:
        """This step restricted to its last ``length`` positions.

        Sites can carry fewer positions than were fed (the engine asks the head for the last
        position's logits only); a block aligns its masks with the value it edits this way.
        """
        if length == self.length:
            return self
        if length not in self._tails:
            self._tails[length] = Step(
                index=self.index,
                token_ids=self.token_ids[:, -length:],
                positions=self.positions[:, -length:],
                valid=self.valid[:, -length:],
                in_think=self.in_think[:, -length:],
                seal_think=self.seal_think[:, -length:],
                finished=self.finished,
                text_hits={text: hits[:, -length:] for text, hits in self.text_hits.items()},
                text_states={text: states[:, -length:] for text, states in self.text_states.items()},
                is_rerun=self.is_rerun,
                is_prefill=self.is_prefill,
                index_on_device=self.index_on_device,
                capacity=self.capacity,
                slots=self.slots,
            )
        return self._tails[length]

    @classmethod
    def prefill(
        cls,
        token_ids: Int[Tensor, "batch pos"],
        attention_mask: Tensor,
        think_ids: tuple[int | None, int | None] = (None, None),
        matchers: dict | None = None,
        capacity: int = 0,
    ) -> Step:
        """The step of a left-padded prompt batch; position ids come from the attention mask.

        ``matchers`` maps strings to :class:`~surgery.text_match.TextMatcher` objects whose
        occurrences this and later steps report in ``text_hits``; ``capacity`` is the run's
        number of decode steps.
        """
        valid = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        text_states, text_hits = {}, {}
        for text, matcher in (matchers or {}).items():
            text_states[text], text_hits[text] = matcher.scan(matcher.initial(token_ids.shape[0]), token_ids, valid)
        return cls(
            index=0,
            token_ids=token_ids,
            positions=positions,
            valid=valid,
            in_think=think_state(token_ids, valid, think_ids),
            seal_think=seal_think_flag(token_ids, valid, think_ids)[:, None].expand_as(valid).clone(),
            finished=torch.zeros(token_ids.shape[0], dtype=torch.bool, device=token_ids.device),
            text_hits=text_hits,
            text_states=text_states,
            is_prefill=True,
            index_on_device=torch.zeros((), dtype=torch.long, device=token_ids.device),
            capacity=capacity,
        )

    @classmethod
    def replay(
        cls,
        prompt_ids: Int[Tensor, " prompt"],
        completion_ids: Int[Tensor, " completion"],
        think_ids: tuple[int | None, int | None] = (None, None),
        matchers: dict | None = None,
    ) -> Step:
        """One row's finished trace as the steps that made it, folded into one ``[1, pos]`` step.

        Position ``p < len(prompt)`` is the prefill's (``index_on_device`` 0 there); completion
        token ``k`` was fed by decode step ``k + 1`` (its index). Every field a trigger reads
        (``in_think``, ``seal_think``, ``text_hits``, the step index) equals, position by
        position, what the prefill and the decode steps held while generating, so a trigger
        called on it says where it fired (:func:`surgery.thoughts.trigger_positions`).

        Example:
            >>> step = Step.replay(torch.tensor([5, 7]), torch.tensor([9, 8]), think_ids=(7, 8))
            >>> step.in_think.tolist(), step.index_on_device.tolist()
            ([[False, True, True, False]], [[0, 0, 1, 2]])
        """
        prompt, completion = prompt_ids.reshape(1, -1), completion_ids.reshape(1, -1)
        token_ids = torch.cat([prompt, completion], dim=1)
        valid = torch.ones_like(token_ids, dtype=torch.bool)
        n_prompt, length = prompt.shape[1], token_ids.shape[1]
        flag = seal_think_flag(prompt, valid[:, :n_prompt], think_ids)
        seal_think = torch.cat([flag[:, None].expand_as(prompt),
                                think_state(completion, valid[:, n_prompt:], think_ids, before=flag)], dim=1)
        text_states, text_hits = {}, {}
        for text, matcher in (matchers or {}).items():
            text_states[text], text_hits[text] = matcher.scan(matcher.initial(1), token_ids, valid)
        index = (torch.arange(length, device=token_ids.device) - n_prompt + 1).clamp(min=0)
        return cls(
            index=0,
            token_ids=token_ids,
            positions=torch.arange(length, device=token_ids.device)[None],
            valid=valid,
            in_think=think_state(token_ids, valid, think_ids),
            seal_think=seal_think,
            finished=torch.zeros(1, dtype=torch.bool, device=token_ids.device),
            text_hits=text_hits,
            text_states=text_states,
            index_on_device=index[None],
            capacity=completion.shape[1],
        )

    def splice(self, rows: Bool[Tensor, " batch"], admitted: Step) -> Step:
        """This step's last position, with the rows where ``rows`` holds taken from ``admitted``'s
        last position (the prefill of rows admitted into those slots; :mod:`surgery.decode.slots`).

        Every per-row field (tokens, positions, think flags, text matcher states, the row's own
        step index) then continues, in :meth:`next`, from where the admitted row's prefill
        ended, as it would alone.
        """
        own, new = self.tail(1), admitted.tail(1)
        pick = rows[:, None]

        def merge(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(pick if a.ndim == 2 else rows, b, a)

        index = own.index_on_device.reshape(-1, 1).expand(self.batch_size, 1)
        return Step(
            index=self.index,
            token_ids=merge(own.token_ids, new.token_ids),
            positions=merge(own.positions, new.positions),
            valid=merge(own.valid, new.valid),
            in_think=merge(own.in_think, new.in_think),
            seal_think=merge(own.seal_think, new.seal_think),
            finished=torch.where(rows, new.finished, own.finished),
            text_hits={text: merge(hits, new.text_hits[text]) for text, hits in own.text_hits.items()},
            text_states={text: merge(states, new.text_states[text]) for text, states in own.text_states.items()},
            index_on_device=merge(index, new.index_on_device.reshape(-1, 1).expand(self.batch_size, 1)),
            capacity=self.capacity,
        )

    def next(
        self, fed: Int[Tensor, " batch"], finished: Bool[Tensor, " batch"], think_ids, matchers: dict | None = None
    ) -> Step:
        """The decode step that feeds ``fed`` (one token per row) after this one."""
        valid = ~finished[:, None]
        text_states, text_hits = {}, {}
        for text, matcher in (matchers or {}).items():
            text_states[text], text_hits[text] = matcher.scan(self.text_states[text][:, -1], fed[:, None], valid)
        return Step(
            index=self.index + 1,
            token_ids=fed[:, None],
            positions=self.positions[:, -1:] + 1,
            valid=valid,
            in_think=think_state(fed[:, None], valid, think_ids, before=self.in_think[:, -1]),
            seal_think=think_state(fed[:, None], valid, think_ids, before=self.seal_think[:, -1]),
            finished=finished,
            text_hits=text_hits,
            text_states=text_states,
            index_on_device=self.index_on_device + 1,
            capacity=self.capacity,
        )
