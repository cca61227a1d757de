"""Interventions: blocks that change what the model computes, inside a surgery trace."""

from interventions.residual_add import ResidualAdd, ResidualAddConfig
from interventions.steering import SteeringVector, seal_trigger

__all__ = ["ResidualAdd", "ResidualAddConfig", "SteeringVector", "seal_trigger"]
