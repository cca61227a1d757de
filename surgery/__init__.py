"""surgery: composable interventions and probes on reasoning language models.

Example::

    import surgery
    model = surgery.load()                   # SmolLM2-135M-Instruct, offline
    with surgery.trace(model, *blocks) as tr:
        out = tr.generate(prompts, max_new_tokens=64)
    out.texts, out.token_ids, out.lengths
"""

from surgery.blocks import Block, Intervention, Probe, TokenChoice, block_class, register_block, registered_blocks
from surgery.engine import GenerationOutput, generate, run
from surgery.loading import EMBEDDED_MODEL, load
from surgery.model import Model, wrap
from surgery.prompts import encode_prompts
from surgery.sites import Site
from surgery.step import Step
from surgery.trace import Trace, trace
from surgery.triggers import Always, And, InThink, Not, OnText, OnTokens, Or, StepWindow, Trigger

__all__ = [
    "Always",
    "And",
    "Block",
    "EMBEDDED_MODEL",
    "GenerationOutput",
    "InThink",
    "Intervention",
    "Model",
    "Not",
    "OnText",
    "OnTokens",
    "Or",
    "Probe",
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
    "register_block",
    "registered_blocks",
    "run",
    "trace",
    "wrap",
]
