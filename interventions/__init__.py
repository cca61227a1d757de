"""Interventions: blocks that change what the model computes, inside a surgery trace.

Every public name of every module here is exported (see :mod:`surgery.discovery`): a new
intervention is its module and its test file, nothing else.
"""

from surgery.discovery import export_modules

__all__ = export_modules(__name__, __path__, globals())
