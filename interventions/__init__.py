"""Interventions: blocks that change what the model computes, inside a surgery trace."""

from interventions.residual_add import ResidualAdd, ResidualAddConfig
from interventions.steering import SteeringVector, seal_trigger
from interventions.token_mask import TokenMask, TokenMaskConfig

__all__ = ["ResidualAdd", "ResidualAddConfig", "SteeringVector", "TokenMask", "TokenMaskConfig", "seal_trigger"]
