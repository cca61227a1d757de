"""Interventions: blocks that change what the model computes, inside a surgery trace."""

from interventions.recycling import RepresentationRecycling, RepresentationRecyclingConfig
from interventions.residual_add import ResidualAdd, ResidualAddConfig
from interventions.steering import SteeringVector, seal_trigger
from interventions.thinking_tokens import ThinkingTokenInsertion, ThinkingTokenInsertionConfig
from interventions.token_mask import TokenMask, TokenMaskConfig

__all__ = [
    "RepresentationRecycling",
    "RepresentationRecyclingConfig",
    "ResidualAdd",
    "ResidualAddConfig",
    "SteeringVector",
    "ThinkingTokenInsertion",
    "ThinkingTokenInsertionConfig",
    "TokenMask",
    "TokenMaskConfig",
    "seal_trigger",
]
