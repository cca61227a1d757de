"""ResidualAdd: add ``alpha * vector`` to the residual stream where a trigger fires.

The minimal intervention the steering blocks build on (SEAL's steering, arXiv 2504.07986 §3,
adds its vector at "\\n\\n" tokens inside the think span: ``when=OnTokens("\\n\\n") & InThink()``).
It fires per row and per position, in the prefill and in every decode step, so the edited keys
and values land in the KV cache exactly once per position. The add goes through
``surgery.kernels.masked_add`` (Triton on CUDA, torch elsewhere).

Example:
    >>> import surgery, torch
    >>> from interventions import ResidualAdd
    >>> add = ResidualAdd(torch.ones(576), site="resid_pre.10", alpha=2.0,
    ...                   when=surgery.OnTokens("\\n\\n"))
    >>> add.to_dict()["config"]["site"]
    'resid_pre.10'
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, add) as tr:                             # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=32, chat=True)
    >>> add.fired()           # per row: positions whose fed token contained "\\n\\n"  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.blocks import Intervention, register_block
from surgery.kernels import masked_add
from surgery.decode.records import StepRecords
from surgery.sites import Site
from surgery.step import Step
from surgery.triggers import Always, OnText, StepWindow, Trigger

__all__ = ["ResidualAdd", "ResidualAddConfig"]


@dataclass(frozen=True)
class ResidualAddConfig:
    site: str = field(default="resid_pre.0", metadata={"help": "where to add: resid_pre.L, resid_post.L, attn_out.L or mlp_out.L"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the vector"})
    when: Trigger = field(default_factory=Always, metadata={"help": "where it fires (a surgery trigger)"})


@register_block("residual_add")
class ResidualAdd(Intervention):
    """Add ``alpha * vector`` at ``site`` at the (row, position) pairs where ``when`` fires.

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): the trigger and the add are tensor
    ops, and where it fired goes into per-run device buffers
    (:class:`~surgery.decode.records.StepRecords`), so a compiled decode step holds it.

    Args:
        vector: ``[d_model]``, finite, on the model's device and in its dtype.
        site: a residual-width site, e.g. ``"resid_pre.20"`` (negative block index from the end).
        alpha: scale.
        when: a trigger (default: every position).
    """

    graph_safe = True  # see surgery.blocks.Block.graph_safe
    config_class = ResidualAddConfig

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> ResidualAdd:
        vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 4
        return cls(vector.to(device=model.device, dtype=model.dtype), site=f"resid_pre.{model.n_layers // 2}",
                   alpha=0.0 if identity else 1.0, when=OnText("\n\n") | StepWindow(3, 5))

    # `vector` is checked here with errors for people (not by jaxtyping), hence the plain annotation
    def __init__(self, vector: Tensor, site: str = "resid_pre.0", alpha: float = 1.0, when: Trigger | None = None):
        if not isinstance(vector, Tensor) or vector.ndim != 1:
            shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(f"ResidualAdd needs a 1-D vector of width d_model, got {shape}")
        if not vector.is_floating_point():
            raise ValueError(f"ResidualAdd needs a floating-point vector, got {vector.dtype}")
        if vector.device.type != "meta" and not torch.isfinite(vector).all():
            raise ValueError("ResidualAdd's vector contains NaN or infinite values")
        if Site.parse(site).kind == "logits":
            raise ValueError("ResidualAdd adds to the residual stream: pick a site other than 'logits'")
        if not isinstance(alpha, (int, float)) or alpha != alpha:
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.vector = vector.detach()
        self.config = ResidualAddConfig(site=site, alpha=float(alpha), when=when if when is not None else Always())
        self._fired = StepRecords()

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        site = model.resolve_site(self.config.site)
        if self.vector.shape[0] != model.site_width(site):
            raise ValueError(
                f"ResidualAdd's vector has width {self.vector.shape[0]}, but {model.name} has "
                f"d_model={model.site_width(site)} at {site}"
            )
        if self.vector.device != model.device:
            raise ValueError(
                f"ResidualAdd's vector is on {self.vector.device}, the model on {model.device}: "
                f"pass vector.to('{model.device}')"
            )
        if self.vector.dtype != model.dtype:
            raise ValueError(
                f"ResidualAdd's vector is {self.vector.dtype}, the model {model.dtype}: "
                f"pass vector.to({model.dtype})"
            )
        self.config.when.bind(model)

    def reset(self, batch_size: int) -> None:
        self._fired.clear()

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        self._fired.admit(rows)

    def retire(self, slot: int, row: int) -> None:
        self._fired.retire(slot, row)

    def edit(self, site: str, value: Tensor, step: Step) -> Tensor:
        fire = self.config.when(step)
        if not step.is_rerun:  # a recomputed position was already recorded
            self._fired.add(step, step.positions, fire)  # device tensors: no sync while decoding
        return masked_add(value, fire, self.vector, self.config.alpha)

    # ---- a per-row table: rows with different vectors or alphas at one site, one masked add ----
    def table_key(self):
        return (ResidualAdd, self.config.site, self.config.when)

    def table_row(self) -> Tensor:
        return self.vector * self.config.alpha  # rounded to the model's dtype, as masked_add does

    def table_edit(self, site: str, value: Tensor, step: Step, table: Tensor) -> tuple[Tensor, Tensor]:
        fire = self.config.when(step)
        return masked_add(value, fire, table), fire

    def keep_fired(self, row: int, positions: list[int]) -> None:
        self._fired.keep(row, positions)

    def fired(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Per row of the last run (or of ``rows``, :meth:`~surgery.blocks.Block.by_row`), the
        position ids where the vector was added, in order.

        Position ``p`` is the row's ``p``-th token (0-based, padding not counted): a prompt
        token when ``p < prompt_length``, else generated token ``p - prompt_length``.
        """
        return self._fired.per_row(rows)

    def by_row(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        return self.fired(rows)

    def tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}
