"""The wrapped model: an HF causal LM, its tokenizer, its site table and facts about it.

Example:
    >>> import surgery
    >>> model = surgery.load()                       # doctest: +SKIP
    >>> model.n_layers, model.d_model                # doctest: +SKIP
    (30, 576)
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from surgery.sites import Architecture, Site, architecture_of
from surgery.text_match import TextMatcher
from surgery.think_tags import THINK_CLOSE, THINK_OPEN

__all__ = ["Model"]


class Model:
    """An HF causal LM with its tokenizer, as every part of the toolkit sees it.

    Build one with :func:`surgery.load` or :func:`surgery.wrap`; do not construct it directly.

    Attributes:
        module: the wrapped ``nn.Module`` (an HF ``...ForCausalLM``), unchanged by the toolkit
            outside a trace.
        tokenizer: its tokenizer (padding is done on the left by the toolkit, whatever its setting).
        architecture: the site table of its family.
        name: a label for reports and saved experiments.
        host: the ``TransformerBridge`` or nnsight model it came from (None for a plain HF model).
    """

    def __init__(self, module: nn.Module, tokenizer, *, name: str | None = None, architecture=None, host=None):
        self.module = module
        self.tokenizer = tokenizer
        self.architecture: Architecture = architecture if architecture is not None else architecture_of(module)
        self.host = host  # the TransformerBridge or nnsight model the user wrapped, if any
        config = module.config
        self.name = name or getattr(config, "_name_or_path", None) or type(module).__name__
        self._active_trace = None
        self._vocabulary_masks: dict[tuple, torch.Tensor] = {}
        self._text_matchers: dict[tuple[str, bool], TextMatcher] = {}

    # ---- facts -------------------------------------------------------------------------------
    @property
    def config(self):
        return self.module.config

    @property
    def n_layers(self) -> int:
        return len(self.architecture.block_list(self.module))

    @property
    def d_model(self) -> int:
        return self.module.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed ``len(tokenizer)`` when the embedding is padded)."""
        return self.module.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def max_context(self) -> int | None:
        """The longest sequence the model's position scheme supports, if the config says."""
        config = self.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Token ids that end a row: the generation config's EOS ids and the tokenizer's."""
        ids: list[int] = []
        generation_config = getattr(self.module, "generation_config", None)
        for source in (getattr(generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is None:
                continue
            for token_id in [source] if isinstance(source, int) else source:
                if token_id not in ids:
                    ids.append(int(token_id))
        return tuple(ids)

    @cached_property
    def pad_token_id(self) -> int:
        """The id fed to finished rows and used for left padding (falls back to EOS)."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        if self.eos_token_ids:
            return self.eos_token_ids[0]
        raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")

    @cached_property
    def think_token_ids(self) -> tuple[int | None, int | None]:
        """Ids of ``<think>`` and ``</think>`` when the vocabulary has them as single tokens."""
        vocabulary = self.tokenizer.get_vocab()
        return vocabulary.get(THINK_OPEN), vocabulary.get(THINK_CLOSE)

    # ---- vocabulary --------------------------------------------------------------------------
    @cached_property
    def vocabulary_texts(self) -> list[str]:
        """The decoded text of every token id, ``""`` for ids the tokenizer does not know."""
        known = len(self.tokenizer)
        texts = self.tokenizer.batch_decode([[i] for i in range(min(known, self.vocab_size))])
        return texts + [""] * (self.vocab_size - len(texts))

    def vocabulary_mask(self, strings: tuple[str, ...], *, case_sensitive: bool = True) -> torch.Tensor:
        """Boolean ``[vocab]`` mask of token ids whose text contains any of ``strings``.

        Computed once per (strings, case) and kept on the model's device.

        Example::

            mask = model.vocabulary_mask(("\\n\\n",))
            mask[model.tokenizer.encode(".\\n\\n")].any()
            tensor(True)
        """
        key = (tuple(strings), case_sensitive)
        mask = self._vocabulary_masks.get(key)
        if mask is None or mask.device != self.device:
            needles = strings if case_sensitive else tuple(s.lower() for s in strings)
            texts = self.vocabulary_texts if case_sensitive else [t.lower() for t in self.vocabulary_texts]
            flags = [any(needle in text for needle in needles) for text in texts]
            mask = torch.tensor(flags, dtype=torch.bool, device=self.device)
            self._vocabulary_masks[key] = mask
        return mask

    def text_matcher(self, text: str, case_sensitive: bool = True) -> TextMatcher:
        """The streaming matcher of ``text`` over this vocabulary (built once, on the device)."""
        key = (text, case_sensitive)
        matcher = self._text_matchers.get(key)
        if matcher is None or matcher.hit.device != self.device:
            matcher = TextMatcher(text, self.vocabulary_texts, self.device, case_sensitive=case_sensitive)
            self._text_matchers[key] = matcher
        return matcher

    # ---- sites -------------------------------------------------------------------------------
    def resolve_site(self, site: str | Site) -> Site:
        """Parse and range-check a site against this model (negative block indices resolved)."""
        return Site.parse(site).resolve(self.n_layers)

    def site_width(self, site: str | Site) -> int:
        """Width of the last dimension of the tensor at ``site``."""
        return self.vocab_size if Site.parse(site).kind == "logits" else self.d_model

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, architecture={self.architecture.name}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )

