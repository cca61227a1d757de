"""Saving an experiment's blocks to one file and loading them back, checked against a model.

:func:`save_blocks` writes a list of blocks (interventions, probes, triggers inside their
configs) as one ``.safetensors`` file (:mod:`surgery.files.storage`): each block's config as JSON
(:meth:`~surgery.blocks.Block.to_dict`), its tensors (a steering vector, a linear probe's
weights) as named tensors, and, when a model is given, what the blocks were made for
(architecture, width, depth, vocabulary size). :func:`load_blocks` rebuilds them
(:meth:`~surgery.blocks.Block.from_dict`) and, given a model, checks each one against it before
returning: a block with tensors must come from the same architecture and width, and every block
is bound (layer range, vocabulary), with an error that says what to do on a mismatch.

Example::

    save_blocks("seal-run.safetensors", [steer, mask, rr], model)
    steer, mask, rr = load_blocks("seal-run.safetensors", model)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from surgery.files import storage
from surgery.blocks import Block, registered_blocks

__all__ = ["load_blocks", "model_facts", "save_blocks"]

FORMAT = "surgery.blocks"
VERSION = 1


def model_facts(model) -> dict:
    """What saved blocks record about the model they were made for."""
    return {
        "name": model.name,
        "architecture": model.architecture.name,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "vocab_size": model.vocab_size,
    }


def save_blocks(path: str | os.PathLike, blocks: Sequence, model=None) -> Path:
    """Write ``blocks`` to ``path`` (one ``.safetensors`` file); returns the path.

    Args:
        path: the file to write (parent folders are created; written atomically).
        blocks: interventions and probes, in order.
        model: the model they were made for (recommended: :func:`load_blocks` then checks it).
    """
    blocks = list(blocks)
    if not all(isinstance(block, Block) for block in blocks):
        kinds = sorted({type(b).__name__ for b in blocks if not isinstance(b, Block)})
        raise TypeError(f"save_blocks saves surgery blocks, got {kinds}")
    tensors = {f"{i}.{name}": t for i, block in enumerate(blocks) for name, t in block.tensors().items()}
    document = {
        "model": model_facts(model) if model is not None else None,
        "blocks": [block.to_dict() for block in blocks],
    }
    return storage.write(path, FORMAT, VERSION, document, tensors)


def _mismatch(saved: dict | None, model) -> str | None:
    if saved is None:
        return None
    facts = model_facts(model)
    differ = [key for key in ("architecture", "d_model") if saved[key] != facts[key]]
    if not differ:
        return None
    return (
        f"it was saved for {saved['name']} ({saved['architecture']}, d_model={saved['d_model']}), and "
        f"{model.name} is {facts['architecture']} with d_model={facts['d_model']}"
    )


def load_blocks(
    path: str | os.PathLike, model=None, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> list[Block]:
    """Read the blocks :func:`save_blocks` wrote, in order.

    Args:
        path: the file.
        model: when given, tensors move to its device (floating ones to its dtype) and every
            block is checked against it (see the module docstring).
        device, dtype: where to put the tensors without a model (default: as saved, on the CPU).

    Raises:
        ValueError: the file is not a blocks file (see :func:`surgery.files.storage.read`), names a
            block this installation does not know, or a block does not fit ``model``.
    """
    document, tensors = storage.read(path, FORMAT, VERSION)
    if model is not None:
        device, dtype = model.device, model.dtype
    saved_for = document.get("model")
    blocks = []
    for i, data in enumerate(document["blocks"]):
        own = {}
        for key, tensor in tensors.items():
            index, _, name = key.partition(".")
            if index == str(i):
                floating = tensor.is_floating_point() and dtype is not None
                own[name] = tensor.to(device=device or tensor.device, dtype=dtype if floating else tensor.dtype)
        if data.get("block") not in registered_blocks():
            raise ValueError(
                f"{path}: block {i} is {data.get('block')!r}, which is not registered here. Import the package "
                f"that defines it first (interventions, probes, or your own). Registered: {sorted(registered_blocks())}"
            )
        block = Block.from_dict(data, own)
        if model is not None:
            _check(block, i, own, saved_for, model, path)
        blocks.append(block)
    return blocks


def _check(block: Block, index: int, tensors: dict, saved_for: dict | None, model, path) -> None:
    label = f"block {index} ({block.name}) in {path}"
    mismatch = _mismatch(saved_for, model)
    if tensors and mismatch:
        raise ValueError(
            f"{label} does not fit {model.name}: {mismatch}. Its tensors belong to that model: load it onto "
            "that model, or build the block again for this one (e.g. SteeringVector.from_thoughts)."
        )
    try:
        block.bind(model)
    except ValueError as error:
        hint = f" ({mismatch})" if mismatch else ""
        raise ValueError(f"{label} does not fit {model.name}{hint}: {error}") from None
