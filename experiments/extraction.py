"""A SEAL steering vector from a finished study's traces: ``surgery extract-vector``.

:func:`extract_vector` reads the records of one condition of a study's output folder (the rows'
prompts and the token ids the model generated), and hands them to
:meth:`interventions.SteeringVector.from_thoughts`: each completion is cut into thoughts at its
"\\n\\n" separators, each thought classified (execution, reflection, transition), the residual
stream entering block ``layer`` read at each thought's opening separator in one forward pass over
prompt + completion, and ``S = mean(execution) - mean(reflection ∪ transition)``. The prompts
are read as the study rendered them (its chat setting included), and the completions as the
model's own token ids, so each state is the one the model had while generating.

Every row counts, correct or not (as in SEAL, which pools correct and incorrect traces). A
study whose model never reflects gives no reflection thought: the error says so, with the counts.

Example::

    vector = extract_vector("runs/traces", layer=21)       # the folder's only condition
    vector.metadata["class_counts"], vector.save("seal.safetensors")
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import surgery
from experiments.store import ResultStore
from experiments.study_sections import ModelSpec
from interventions import SteeringVector
from probes import ThoughtClassifier, fit_linear_probe
from surgery.thoughts import thought_states

__all__ = ["extract_thought_probe", "extract_vector", "seal_layer", "study_traces"]


def seal_layer(n_layers: int) -> int:
    """SEAL's depth for a model with ``n_layers`` blocks: block 20 of 28 (R1-Distill-Qwen), scaled.

    >>> seal_layer(28), seal_layer(30), seal_layer(64)
    (20, 21, 46)
    """
    return round(n_layers * 20 / 28)


def study_traces(folder: str | os.PathLike, condition: str | None = None) -> tuple[dict, list[tuple[str, list[int]]]]:
    """The study's config and the ``(prompt, generated token ids)`` of every row of ``condition``.

    Args:
        folder: the study's output folder.
        condition: which condition's rows; may be left out when the study has one condition.

    Raises:
        ValueError: no condition named where there are several, an unknown condition, or a
            condition without rows yet.
    """
    store = ResultStore.of_folder(folder)
    conditions = list(store.config["conditions"])
    if condition is None:
        if len(conditions) != 1:
            raise ValueError(f"{folder} holds {len(conditions)} conditions ({', '.join(conditions)}): name the one "
                             "whose traces make the vector (--condition NAME)")
        condition = conditions[0]
    if condition not in conditions:
        raise ValueError(f"{folder} has no condition {condition!r}; its conditions are {', '.join(conditions)}")
    traces = [(record["payload"]["prompt"], record["payload"]["token_ids"])
              for record in store.records() if record["condition"] == condition]
    if not traces:
        raise ValueError(f"{folder} has no finished row of condition {condition!r} yet: run the study first")
    return store.config, traces


def extract_vector(
    folder: str | os.PathLike,
    *,
    layer: int | None = None,
    condition: str | None = None,
    model: surgery.Model | None = None,
    batch_size: int = 8,
    progress: bool = True,
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

    Returns:
        The vector; its ``metadata`` names the model, site, class counts and the source folder.
    """
    config, traces = study_traces(folder, condition)
    model = ModelSpec(**config["model"]).load() if model is None else model
    layer = seal_layer(model.n_layers) if layer is None else layer
    vector = SteeringVector.from_thoughts(model, traces, layer, chat=config["prompt"]["chat"],
                                          batch_size=batch_size, progress=progress)
    source = {"study": config["name"], "folder": str(Path(folder).resolve()),
              "condition": condition or next(iter(config["conditions"]))}
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
    states, labels = thought_states(model, traces, site, chat=config["prompt"]["chat"], batch_size=batch_size,
                                    progress=progress)
    return ThoughtClassifier(site, linear_probe=fit_linear_probe(states, labels, test_size=test_size))
