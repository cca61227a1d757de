"""Interventions: blocks that change what the model computes, inside a surgery trace."""

from interventions.residual_add import ResidualAdd, ResidualAddConfig

__all__ = ["ResidualAdd", "ResidualAddConfig"]
