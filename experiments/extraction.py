"""A SEAL steering vector from a finished study's traces: ``surgery extract-vector``.

:func:`extract_vector` reads the records of one condition of a study's output folder (the rows'
prompts and the token ids the model generated), and hands them to
:meth:`interventions.SteeringVector.from_thoughts`: each completion is cut into thoughts at its
"\\n\\n" separators, each thought classified (execution, reflection, transition), the residual
stream entering block ``layer`` read at each thought's opening separator in one forward pass over
prompt + completion, and ``S = mean(execution) - mean(reflection ∪ transition)``. The prompts
are read as the study rendered them (its chat setting included), and the completions as the
model's own token ids, so each state is the one the model had while generating.

By default every row counts, correct or not (SEAL pools correct and incorrect traces); with
``correct`` and ``incorrect`` the pool is SEAL's released selection: the first ``correct`` rows
graded correct and the first ``incorrect`` graded incorrect, in dataset order (500 and 500 of
MATH train in the release). A study whose model never reflects gives no reflection thought: the
error says so, with the counts (a random-weights smoke run may pass ``allow_empty_classes``).

Example::

    vector = extract_vector("runs/traces", layer=21)       # the folder's only condition
    vector = extract_vector("runs/traces", layer=20, correct=500, incorrect=500)   # as released
    vector.metadata["class_counts"], vector.save("seal.safetensors")
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import surgery
from experiments.store import ResultStore
from experiments.study_sections import ModelSpec, PromptSpec
from interventions import SteeringVector
from probes import ThoughtClassifier, fit_linear_probe
from surgery.thoughts import thought_states

__all__ = ["extract_thought_probe", "extract_vector", "seal_layer", "select_rows", "study_traces"]


def seal_layer(n_layers: int) -> int:
    """SEAL's depth for a model with ``n_layers`` blocks: block 20 of 28 (R1-Distill-Qwen), scaled.

    >>> seal_layer(28), seal_layer(30), seal_layer(64)
    (20, 21, 46)
    """
    return round(n_layers * 20 / 28)


def study_traces(
    folder: str | os.PathLike, condition: str | None = None, *, correct: int | None = None,
    incorrect: int | None = None,
) -> tuple[dict, list[tuple[str, list[int]]]]:
    """The study's config and the ``(prompt, generated token ids)`` of the rows of ``condition``.

    Args:
        folder: the study's output folder.
        condition: which condition's rows; may be left out when the study has one condition.
        correct, incorrect: keep only the first this many rows graded correct (incorrect), in
            dataset order (:func:`select_rows`); None for one of them: every such row.

    Raises:
        ValueError: no condition named where there are several, an unknown condition, or a
            condition without rows yet.
    """
    config, _, records = _rows(folder, condition, correct, incorrect)
    return config, [(record["payload"]["prompt"], record["payload"]["token_ids"]) for record in records]


def _rows(folder, condition: str | None, correct: int | None, incorrect: int | None) -> tuple[dict, str, list[dict]]:
    store = ResultStore.of_folder(folder)
    conditions = list(store.config["conditions"])
    if condition is None:
        if len(conditions) != 1:
            raise ValueError(f"{folder} holds {len(conditions)} conditions ({', '.join(conditions)}): name the one "
                             "whose traces make the vector (--condition NAME)")
        condition = conditions[0]
    if condition not in conditions:
        raise ValueError(f"{folder} has no condition {condition!r}; its conditions are {', '.join(conditions)}")
    records = [record for record in store.records() if record["condition"] == condition]
    if not records:
        raise ValueError(f"{folder} has no finished row of condition {condition!r} yet: run the study first")
    if correct is not None or incorrect is not None:
        records = select_rows(records, correct, incorrect)
    return store.config, condition, records


def select_rows(records: list[dict], correct: int | None, incorrect: int | None) -> list[dict]:
    """The first ``correct`` records graded correct and the first ``incorrect`` graded incorrect,
    in dataset order (ids ``<name>-<index>`` sort by index), kept in that order.

    None means every record of that grade. Fewer than asked is not an error: the vector's
    metadata says how many of each were used.

    >>> rows = [{"problem": f"t-{i}", "payload": {"grade": {"correct": i % 3 == 0}}} for i in (4, 0, 3, 1, 2)]
    >>> [r["problem"] for r in select_rows(rows, correct=1, incorrect=2)]
    ['t-0', 't-1', 't-2']
    """
    def index(record: dict) -> tuple[int, str]:
        number = record["problem"].rsplit("-", 1)[-1]
        return (int(number), "") if number.isdigit() else (-1, record["problem"])

    kept, left = [], {True: correct, False: incorrect}
    for record in sorted(records, key=index):
        grade = bool(record["payload"].get("grade", {}).get("correct"))
        if left[grade] is None or left[grade] > 0:
            kept.append(record)
            left[grade] = None if left[grade] is None else left[grade] - 1
    return kept


def extract_vector(
    folder: str | os.PathLike,
    *,
    layer: int | None = None,
    condition: str | None = None,
    model: surgery.Model | None = None,
    batch_size: int = 8,
    progress: bool = True,
    correct: int | None = None,
    incorrect: int | None = None,
    allow_empty_classes: bool = False,
    options: dict | None = None,
) -> SteeringVector:
    """SEAL's vector from the traces of one condition of a finished (or partly finished) study.

    Args:
        folder: the study's output folder.
        layer: the block whose input the vector is read at (and added to); default
            :func:`seal_layer` of the model's depth.
        condition: the condition whose rows are used (default: the study's only condition).
        model: the study's model, loaded; default: loaded from the study's ``[model]``.
        batch_size: traces per forward pass.
        progress: a progress bar over the batches.
        correct, incorrect: SEAL's released selection (:func:`select_rows`); None: every row.
        allow_empty_classes: for random-weights smoke runs, whose noise holds no reflection: a
            class without thoughts has mean 0 (said in the metadata) instead of an error.
        options: more keyword arguments of :meth:`SteeringVector.from_thoughts` (its released
            modes, e.g. how empty thoughts count).

    Returns:
        The vector; its ``metadata`` names the model, site, class counts and the source folder
        (with the number of correct and incorrect traces used).
    """
    config, condition, records = _rows(folder, condition, correct, incorrect)
    traces = [(record["payload"]["prompt"], record["payload"]["token_ids"]) for record in records]
    model = ModelSpec(**config["model"]).load() if model is None else model
    layer = seal_layer(model.n_layers) if layer is None else layer
    chat = PromptSpec(**config["prompt"]).engine_chat
    vector = SteeringVector.from_thoughts(model, traces, layer, chat=chat, batch_size=batch_size, progress=progress,
                                          allow_empty_classes=allow_empty_classes, **(options or {}))
    right = sum(bool(record["payload"].get("grade", {}).get("correct")) for record in records)
    source = {"study": config["name"], "folder": str(Path(folder).resolve()), "condition": condition,
              "correct": correct, "incorrect": incorrect, "used": {"correct": right, "incorrect": len(records) - right}}
    return SteeringVector.from_config(dataclasses.replace(vector.config, metadata={**vector.metadata, "source": source}),
                                      vector.tensors())


def extract_thought_probe(
    folder: str | os.PathLike,
    *,
    site: str | None = None,
    condition: str | None = None,
    model: surgery.Model | None = None,
    batch_size: int = 8,
    test_size: float = 0.25,
    progress: bool = True,
) -> ThoughtClassifier:
    """An online thought classifier from a study's traces: what gated SEAL steering reads.

    Every thought of the traces (the rows of ``condition``) is labelled by SEAL's keyword rules
    and read at its opening separator at ``site`` (:func:`surgery.thoughts.thought_states`, the
    states :meth:`SteeringVector.from_thoughts` averages); :func:`probes.fit_linear_probe` fits
    a linear probe from states to labels on ``1 - test_size`` of them and reports its held-out
    accuracy against chance. The returned :class:`~probes.ThoughtClassifier` carries it and
    publishes the ``"predicted"`` signal while decoding.

    Args:
        folder: the study's output folder.
        site: where the states are read; default ``resid_pre.{seal_layer - 1}``, the block
            below SEAL's, so steering at :func:`seal_layer` can read this forward's prediction.
        condition: whose rows (default: the study's only condition).
        model: the study's model, loaded; default: loaded from the study's ``[model]``.
        batch_size: traces per forward pass.
        test_size: the held-out fraction.
        progress: a progress bar over the batches.

    Example::

        classifier = extract_thought_probe("runs/demo/traces")
        classifier.linear_probe.held_out_accuracy, classifier.linear_probe.chance_accuracy
        surgery.save_blocks("thought_probe.safetensors", [classifier])
    """
    config, traces = study_traces(folder, condition)
    model = ModelSpec(**config["model"]).load() if model is None else model
    site = f"resid_pre.{seal_layer(model.n_layers) - 1}" if site is None else site
    states, labels = thought_states(model, traces, site, chat=PromptSpec(**config["prompt"]).engine_chat,
                                    batch_size=batch_size, progress=progress)
    return ThoughtClassifier(site, linear_probe=fit_linear_probe(states, labels, test_size=test_size))
