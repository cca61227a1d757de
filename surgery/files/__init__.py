"""The files room: what the toolkit writes to disk and reads back.

One file format (safetensors with a JSON header, never pickle), saved blocks
(:func:`surgery.save_blocks` / :func:`surgery.load_blocks`, checked against the model) and saved
probe results. It imports the core only.

- :mod:`~surgery.files.results`: Saving and loading probe results: ``result.save(path)``,
  ``Type.load(path)``, no pickle;
- :mod:`~surgery.files.saving`: Saving an experiment's blocks to one file and loading them back,
  checked against a model;
- :mod:`~surgery.files.storage`: The one file format of the toolkit: tensors as safetensors,
  everything else as JSON in its header.

This package only names its modules: the public API is ``surgery``'s.

Example:
    >>> import surgery
    >>> from surgery.files import saving
    >>> saving.save_blocks is surgery.save_blocks
    True
"""

from surgery.files import results, saving, storage

__all__ = ["results", "saving", "storage"]
