"""What ``surgery run``'s options change in a study: :class:`RunOverrides`.

``--random-weights``, ``--limit N``, ``--max-new-tokens N``, ``--dataset FILE`` and ``--output
FOLDER`` are written into the study's TOML tables before any check
(:func:`experiments.study_config.load_study_config`), so a study run with them is checked as
written, its store's fingerprint says what ran, and the traces studies its recipes run
(:mod:`experiments.recipes`) get the same options.

Example:
    >>> overrides = RunOverrides(limit=2, max_new_tokens=8, random_weights=True)
    >>> data = overrides.apply({"output": "runs/x", "dataset": {"path": "a.jsonl", "limit": 100},
    ...                         "conditions": {"plain": {"blocks": [], "max_new_tokens": 4096}}})
    >>> data["output"], data["dataset"], data["generation"], data["conditions"]["plain"]["max_new_tokens"]
    ('runs/x-random-weights', {'path': 'a.jsonl', 'limit': 2}, {'max_new_tokens': 8}, 8)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunOverrides"]


@dataclass(frozen=True)
class RunOverrides:
    """What ``surgery run``'s options change in a study, and in the traces studies its recipes run.

    Attributes:
        random_weights: build the model from ``[model] config`` with random weights
            (``--random-weights``); the output folder becomes ``<output>-random-weights``.
        limit: only the first this many problems (``--limit``).
        max_new_tokens: this many new tokens (``--max-new-tokens``).
        dataset: a local file read instead of ``[dataset]``'s source (``--dataset``), absolute.
        output: the output folder (``--output``), absolute; a recipe's traces study then writes
            to ``<output>/recipes/<its name>``.
    """

    random_weights: bool = False
    limit: int | None = None
    max_new_tokens: int | None = None
    dataset: str | None = None
    output: str | None = None

    def apply(self, data: dict) -> dict:
        """The study's TOML tables with these overrides written in (a copy; other tables untouched)."""
        data = copy.deepcopy(data)

        def section(name: str) -> dict:  # a table that is not one is left for the checks to name
            table = data.setdefault(name, {})
            return table if isinstance(table, dict) else {}

        if self.random_weights:
            section("model")["random_weights"] = True
            if self.output is None and isinstance(data.get("output"), str):
                data["output"] = data["output"].rstrip("/") + "-random-weights"
        if self.dataset is not None:
            kept = ("limit", "offset", "question_field", "answer_field")
            data["dataset"] = {key: v for key, v in section("dataset").items() if key in kept} | {"path": self.dataset}
        if self.limit is not None:
            section("dataset")["limit"] = self.limit
        if self.max_new_tokens is not None:
            section("generation")["max_new_tokens"] = self.max_new_tokens
            conditions = data.get("conditions")
            for table in conditions.values() if isinstance(conditions, dict) else ():
                if isinstance(table, dict) and "max_new_tokens" in table:  # a condition's own limit too
                    table["max_new_tokens"] = self.max_new_tokens
        if self.output is not None:
            data["output"] = self.output
        return data

    def for_recipe(self, study_output: str, recipe_study: str | os.PathLike) -> RunOverrides:
        """These overrides for the traces study (file ``recipe_study``) a recipe runs: when we moved
        our output folder, its output moves into ours, ``recipes/<its file's stem>``."""
        output = None if self.output is None else str(Path(study_output) / "recipes" / Path(recipe_study).stem)
        return dataclasses.replace(self, output=output)
