"""surgery: composable interventions and probes on reasoning language models.

The core, one idea per module:

- models: ``loading`` (:func:`load`), ``model`` (:class:`Model`, :func:`wrap`), ``sites``
  (:class:`Site` and the per-architecture tables);
- running: ``prompts`` (:func:`encode_prompts`, the chat template, the context check),
  ``engine`` (:func:`generate`, :func:`run`), ``sampling`` (one random stream per row, so a
  sampled row does not depend on its batch), ``stopping`` (when rows stop, and why), ``step``
  (:class:`Step`, what blocks see per forward pass), ``capture`` (reading a site at chosen
  positions);
- blocks: ``blocks`` (:class:`Intervention`, :class:`Probe`, :class:`TokenChoice`, the
  registry), ``trace`` (:func:`trace`), ``triggers`` and ``text_match`` (where blocks fire), ``signals`` (probe values triggers read in the same run),
  ``kernels`` (hot ops: torch reference, Triton kernels, the backend choice), ``discovery``
  (packages export their modules);
- files: ``config_json`` (a block's config to JSON and back), ``storage`` (the one format: safetensors + a JSON header, never pickle), ``saving``
  (:func:`save_blocks` / :func:`load_blocks`, checked against the model), ``results`` (probe
  results save and load);
- text and data: ``thoughts`` (SEAL's thoughts and the think tags), ``examples`` (a few word
  problems for quick tries and tests);
- the app: ``demo`` and ``cli`` (the ``surgery`` command; nothing else imports them).

Example::

    import surgery
    model = surgery.load()                   # SmolLM2-135M-Instruct, offline
    with surgery.trace(model, *blocks) as tr:
        out = tr.generate(prompts, max_new_tokens=64)
    out.texts, out.token_ids, out.lengths
"""

from surgery.blocks import Block, Intervention, Probe, TokenChoice, block_class, register_block, registered_blocks
from surgery.decode.engine import GenerationOutput, generate, run
from surgery.hosts.loading import EMBEDDED_MODEL, load
from surgery.model import Model
from surgery.files.saving import load_blocks, save_blocks
from surgery.prompts import encode_prompts
from surgery.signals import OnSignal
from surgery.sites import Site
from surgery.step import Step
from surgery.decode.trace import Trace, trace
from surgery.triggers import (Always, And, FromPromptEnd, InThink, Not, OnText, OnTokens, Or, SealThinkFlag, StepWindow,
                              Trigger)
from surgery.hosts.wrapping import wrap

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
