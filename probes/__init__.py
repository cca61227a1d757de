"""Probes: blocks that observe a model inside a surgery trace and report a result.

Every public name of every module here is exported (see :mod:`surgery.discovery`): a new probe
is its module and its test file, nothing else.
"""

from surgery.discovery import export_modules

__all__ = export_modules(__name__, __path__, globals())
