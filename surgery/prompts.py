"""Prompts to model inputs: the chat template, tokenizing, left padding, the context check.

Everything that turns what a user passes as prompts into ``input_ids`` and an
``attention_mask`` lives here, so the decode engine, the site reader (:mod:`surgery.capture`)
and steering-vector extraction all encode prompts the same way without going through the loop.

Example::

    input_ids, attention_mask = encode_prompts(model, ["What is 7 * 8?", "Hi"], chat=True)
    check_context(model, attention_mask, new_tokens=64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surgery.model import Model

__all__ = ["Prompts", "apply_chat_template", "check_context", "encode_prompts"]

#: What every entry point accepts as prompts: one string, strings, or token-id lists.
Prompts = str | Sequence[str] | Sequence[Sequence[int]]


def apply_chat_template(model: Model, prompts: Sequence[str]) -> list[str]:
    """Wrap each prompt in the tokenizer's chat template as a user turn, with the generation prompt.

    For reasoning models the generation prompt opens ``<think>``.

    Args:
        model: the wrapped model (its tokenizer must have a chat template).
        prompts: the user turns, one string per row.

    Returns:
        The templated texts, one per prompt, ready to tokenize without special tokens.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat=True, but {model.name}'s tokenizer has no chat template")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_prompts(model: Model, prompts: Prompts, *, chat: bool = False) -> tuple[Tensor, Tensor]:
    """Tokenize and left-pad prompts: ``(input_ids, attention_mask)``, both ``[batch, pos]`` on CPU.

    Args:
        model: the wrapped model.
        prompts: a string, a list of strings, or a list of token-id lists (used as they are).
        chat: wrap each string in the tokenizer's chat template as a user turn, with the
            generation prompt (see :func:`apply_chat_template`).

    Returns:
        ``input_ids`` (padding is ``model.pad_token_id``) and ``attention_mask`` (0 on padding).

    Raises:
        ValueError: no prompts, a prompt with no tokens, token ids outside the vocabulary, or
            ``chat=True`` without a chat template or with token-id prompts.
        TypeError: strings mixed with token-id lists.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: pass a non-empty list of strings (or of token-id lists)")
    tokenizer = model.tokenizer
    if all(isinstance(p, str) for p in prompts):
        if chat:
            rows = tokenizer(apply_chat_template(model, prompts), add_special_tokens=False)["input_ids"]
        else:
            rows = tokenizer(prompts)["input_ids"]
    elif all(isinstance(p, (list, tuple, Tensor)) for p in prompts):
        if chat:
            raise ValueError("chat=True needs string prompts, not token ids")
        rows = [[int(t) for t in (p.tolist() if isinstance(p, Tensor) else p)] for p in prompts]
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < model.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary (0..{model.vocab_size - 1})")
    else:
        kinds = sorted({type(p).__name__ for p in prompts})
        raise TypeError(f"prompts must all be strings or all token-id lists, got a mix of {kinds}")
    empty = [i for i, row in enumerate(rows) if len(row) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty} encode to no tokens: every prompt needs at least one token")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), model.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def check_context(model: Model, attention_mask: Tensor, new_tokens: int = 0) -> None:
    """Refuse prompts that, with ``new_tokens`` more, would not fit the model's context.

    Args:
        model: the wrapped model (nothing is checked when its config states no context length).
        attention_mask: ``[batch, pos]`` from :func:`encode_prompts`.
        new_tokens: tokens to be generated after the prompt (0 for a single forward pass).

    Raises:
        ValueError: naming the longest prompt, its length and the context, and what to lower.
    """
    context = model.max_context
    if context is None:
        return
    lengths = attention_mask.sum(dim=1)
    longest = int(lengths.max())
    if longest + new_tokens > context:
        row = int(lengths.argmax())
        room = f"; with max_new_tokens={new_tokens} that needs {longest + new_tokens}" if new_tokens else ""
        raise ValueError(
            f"prompt {row} has {longest} tokens{room}, more than the model's context of {context} "
            "positions: shorten the prompt" + (" or lower max_new_tokens" if new_tokens else "")
        )
