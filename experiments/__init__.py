"""Experiments: studies end to end on top of surgery, interventions and probes.

A study is a dataset of problems, conditions (lists of blocks), generation settings and an
output folder: graded runs appended to a resumable store, then a report. This package imports
the three others; none of them imports it.

Every public name of every module here is exported (see :mod:`surgery.discovery`). Optional
dependencies (Ray, Hugging Face ``datasets``) are imported where they are used, not here.
"""

from surgery.discovery import export_modules

__all__ = export_modules(__name__, __path__, globals())
