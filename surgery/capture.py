"""Reading a site's value at chosen positions with one forward pass, stopped early.

Example::

    site = model.resolve_site("resid_pre.15")
    vectors = states_at(model, site, [token_ids_a, token_ids_b], [[3, 9], [5]])   # [3, d_model]
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.prompts import encode_prompts
from surgery.sites import Site, hook_site

__all__ = ["states_at"]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the site has been read."""


def states_at(model, site: Site, rows: list[list[int]], positions: list[list[int]]) -> Tensor:
    """The value at ``site`` at the given positions of token-id rows: ``[n, width]``, in order.

    One forward pass over the left-padded rows, stopped right after ``site`` is read, keeping
    only the requested vectors (row by row, positions ascending).
    """
    ids, attention = encode_prompts(model, rows)
    width = ids.shape[1]
    wanted = torch.zeros_like(ids, dtype=torch.bool)
    for row, (tokens, places) in enumerate(zip(rows, positions)):
        for place in places:
            wanted[row, width - len(tokens) + place] = True
    wanted = wanted.to(model.device)
    kept: list[Tensor] = []

    def capture(value: Tensor) -> Tensor:
        kept.append(value[wanted].detach().clone())
        raise _Captured

    module, kind = model.architecture.module_for(model.module, site)
    handle = hook_site(module, kind, capture)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.inference_mode():
            model.module(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                         position_ids=position_ids.to(model.device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return kept[0]
