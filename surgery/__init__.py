"""surgery: composable interventions and probes on reasoning language models.

One idea per module, in rooms that import one way (the table is in ``tests/test_layering.py``):

- the core, directly in ``surgery/``: ``model`` (:class:`Model`), ``sites`` (:class:`Site` and
  the per-architecture tables), ``step`` (:class:`Step`, what blocks see per forward pass),
  ``blocks`` (:class:`Intervention`, :class:`Probe`, :class:`TokenChoice`, the registry),
  ``config_json`` (a block's config to JSON and back), ``triggers`` and ``text_match`` (where
  blocks fire), ``signals`` (probe values triggers read in the same run), ``prompts``
  (:func:`encode_prompts`, the chat template, the context check), ``capture`` (reading a site at
  chosen positions), ``thoughts`` (SEAL's thoughts) and ``think_tags``, ``examples`` (a few word
  problems for quick tries and tests), ``discovery`` (packages export their modules). It imports
  the kernels only;
- ``kernels/``: hot ops (torch reference, Triton kernels, the backend choice); nothing else;
- ``decode/``: ``engine`` (:func:`generate`, :func:`run`), ``forward`` (the model calls of a run,
  compiled step), ``kv_cache`` (dynamic or static), ``partial_rerun`` (re-running blocks L..),
  ``sampling`` (one random stream per row, so a sampled row does not depend on its batch),
  ``stopping`` (when rows stop, and why), ``records`` (where blocks acted, on the device), ``trace``
  (:func:`trace`, the Trace that runs the engine). It imports the core and the kernels;
- ``hosts/``: ``loading`` (:func:`load`), ``wrapping`` (:func:`wrap`: which host a model comes
  from), ``bridge`` and ``nnsight_host`` (TransformerLens bridges and nnsight models as backends),
  ``tl_hooks`` and ``nnsight_blocks`` (our blocks inside their own loops). It imports the core and
  decode;
- ``files/``: ``storage`` (the one format: safetensors + a JSON header, never pickle), ``saving``
  (:func:`save_blocks` / :func:`load_blocks`, checked against the model), ``results`` (probe
  results save and load). It imports the core;
- this package: the public API below, from every room. The app (``demo``, ``cli``, the
  ``surgery`` command) is ``experiments``; nothing here imports it.

Example::

    import surgery
    model = surgery.load()                   # SmolLM2-135M-Instruct, offline
    with surgery.trace(model, *blocks) as tr:
        out = tr.generate(prompts, max_new_tokens=64)
    out.texts, out.token_ids, out.lengths
"""

from surgery.blocks import Block, Intervention, Probe, TokenChoice, block_class, register_block, registered_blocks
from surgery.decode.engine import GenerationOutput, generate, run
from surgery.decode.trace import Trace, trace
from surgery.files.saving import load_blocks, save_blocks
from surgery.hosts.loading import EMBEDDED_MODEL, load
from surgery.hosts.wrapping import wrap
from surgery.model import Model
from surgery.prompts import encode_prompts
from surgery.signals import OnSignal
from surgery.sites import Site
from surgery.step import Step
from surgery.triggers import (Always, And, FromPromptEnd, InThink, Not, OnText, OnTokens, Or, SealThinkFlag, StepWindow,
                              Trigger)

__all__ = [
    "Always",
    "And",
    "Block",
    "EMBEDDED_MODEL",
    "FromPromptEnd",
    "GenerationOutput",
    "InThink",
    "Intervention",
    "Model",
    "Not",
    "OnSignal",
    "OnText",
    "OnTokens",
    "Or",
    "Probe",
    "SealThinkFlag",
    "Site",
    "Step",
    "StepWindow",
    "TokenChoice",
    "Trace",
    "Trigger",
    "block_class",
    "encode_prompts",
    "generate",
    "load",
    "load_blocks",
    "register_block",
    "registered_blocks",
    "run",
    "save_blocks",
    "trace",
    "wrap",
]
