"""Vector recipes: a steering block whose vector another study makes, reached in one command.

SEAL's vector comes from the model's own traces on other problems (the release: the first 500
correct and first 500 incorrect MATH *train* traces, read at layer 20). A study says so in the
steering block, instead of naming a file::

    [conditions.seal]
    blocks = [{ type = "steering_vector", alpha = 1.0,
                extract = { study = "seal-math-train-traces.toml", layer = 20, correct = 500, incorrect = 500 } }]

``extract`` keys: ``study`` (the traces study's TOML, relative to this file; required),
``layer`` (the block whose input is read, and steered; required), ``correct`` / ``incorrect``
(the first N rows graded correct / incorrect, in dataset order; leave one out for all of that
grade, both for every row), ``condition`` (whose rows, when the traces study has several) and
``options`` (more keyword arguments of :meth:`interventions.SteeringVector.from_thoughts`, e.g.
its released modes). A ``when`` given in the block also decides where extraction reads states.

The vector lives in the traces study's output folder, named by the recipe
(``vector-layer20-correct500-incorrect500.safetensors``); ``from`` is not given with ``extract``.
So a smoke run (``--random-weights``, ``--output``), whose traces study writes elsewhere, never
touches the real vector. ``surgery run`` makes what is missing first (:func:`make_vectors`):
it runs the traces study (resumable, as any study), extracts the vector, writes it, and reads
the study again, now with the vector's checksum. Until then the study is checked against a
stand-in vector of the model's width at that layer, so ``--check`` needs no model either.

Example::

    config = load_study_config("studies/replications/seal-math500.toml")
    [recipe.path for recipe in config.recipes if not recipe.made]
    config = make_vectors(config)          # runs the traces study and extracts, when missing
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.block_specs import BlockSpec, parse_block
from experiments.config_checks import StudyConfigError, check_keys, check_value, field_path
from experiments.model_shape import ModelShape
from interventions import SteeringVector
from surgery.triggers import Trigger

__all__ = ["VectorRecipe", "make_vectors", "recipe_block"]

_KEYS = ("condition", "correct", "incorrect", "layer", "options", "study")
_FIXED = ("model", "traces", "layer", "site", "chat", "batch_size", "progress", "vector", "metadata", "self", "options")


@dataclass(frozen=True)
class VectorRecipe:
    """How a steering block's vector is made: by :func:`experiments.extraction.extract_vector` on
    the rows of a traces study.

    Attributes:
        field: the block's TOML path (``conditions.seal.blocks[0]``).
        traces: the traces study, checked (a :class:`~experiments.study_config.StudyConfig`).
        path: where the vector is (or will be) written: in the traces study's output folder.
    """

    field: str
    traces: object
    layer: int
    correct: int | None
    incorrect: int | None
    condition: str | None
    options: dict
    path: str

    @property
    def made(self) -> bool:
        """Whether the vector file exists."""
        return Path(self.path).is_file()

    def make(self, model, progress: bool = True) -> Path:
        """Run the traces study (what its store lacks), extract the vector and write it."""
        from experiments.extraction import extract_vector
        from experiments.runner import run_study

        traces = self.traces
        run_study(traces, model=model, progress=progress)
        vector = extract_vector(traces.output, layer=self.layer, condition=self.condition, model=model,
                                progress=progress, correct=self.correct, incorrect=self.incorrect,
                                allow_empty_classes=traces.model.random_weights, options=dict(self.options))
        return vector.save(self.path)  # atomic: a stopped run leaves no half-written vector


def recipe_block(where: str, table: dict, base: Path, shape: ModelShape | None, label: str, model, overrides,
                 output: str, chain: tuple) -> tuple[BlockSpec, VectorRecipe]:
    """The steering block of ``table`` (which holds ``extract``) and its recipe, both checked.

    Args:
        where: the block's TOML path.
        table: the block's table as tomllib read it.
        base: the study file's folder.
        shape: the model's shape (required: the vector's width is checked against it).
        label: how errors name the model.
        model: the study's :class:`~experiments.study_sections.ModelSpec` (the traces study must run the same).
        overrides: the study's :class:`~experiments.run_overrides.RunOverrides` (applied to its traces study too).
        output: the study's output folder (a moved one takes the traces study's output along).
        chain: the study files being read, outermost first (a recipe may not lead back to them).
    """
    recipe_table = table["extract"]
    here = field_path(where, "extract")
    if table.get("type") != "steering_vector":
        raise StudyConfigError(here, "only a steering_vector block is made by a recipe: remove extract")
    if "from" in table:
        raise StudyConfigError(field_path(where, "from"), "give from = FILE or extract = { ... }, not both: a recipe's "
                               "vector lives in its traces study's output folder")
    if not isinstance(recipe_table, dict):
        raise StudyConfigError(here, f'expected a table such as {{ study = "traces.toml", layer = 20 }}, got {recipe_table!r}')
    check_keys(here, recipe_table, _KEYS)
    for key in ("study", "layer"):
        if key not in recipe_table:
            raise StudyConfigError(field_path(here, key), f'missing: write {key} = {"traces.toml" if key == "study" else 20}')
    hints = {"study": str, "layer": int, "correct": int, "incorrect": int, "condition": str, "options": dict}
    values = {key: check_value(field_path(here, key), value, hints[key]) for key, value in recipe_table.items()}
    for key in ("correct", "incorrect"):
        if values.get(key, 0) < 0:
            raise StudyConfigError(field_path(here, key), f"must be 0 or more (leave it out for every row), got {values[key]}")
    if shape is None:
        raise StudyConfigError(here, f"the width of {label} is unknown before it loads: give [model] config = "
                               '"config.json" so that the vector can be checked')
    layer = values["layer"]
    if not -shape.n_layers <= layer < shape.n_layers:
        raise StudyConfigError(field_path(here, "layer"), f"layer {layer} is out of range: {label} has {shape.n_layers} "
                               f"blocks, so the block index must be in 0..{shape.n_layers - 1}")
    path = base / values["study"]
    traces = _traces_study(field_path(here, "study"), path, model, overrides.for_recipe(output, path), chain)
    condition = values.get("condition")
    if condition is None and len(traces.conditions) != 1:
        raise StudyConfigError(field_path(here, "condition"), f"{traces.source} has conditions {', '.join(traces.conditions)}: "
                               "name the one whose rows make the vector")
    if condition is not None and condition not in traces.conditions:
        raise StudyConfigError(field_path(here, "condition"), f"{traces.source} has no condition {condition!r}: "
                               f"choose one of {', '.join(traces.conditions)}")
    options = _options(field_path(here, "options"), values.get("options", {}), table.get("when"))
    name = "-".join(part for part in (f"vector-layer{layer % shape.n_layers}", condition,
                                      f"correct{values.get('correct', 'all')}", f"incorrect{values.get('incorrect', 'all')}") if part)
    recipe = VectorRecipe(where, traces, layer % shape.n_layers, values.get("correct"), values.get("incorrect"),
                          condition, options, str(Path(traces.output) / f"{name}.safetensors"))
    block = {key: value for key, value in table.items() if key != "extract"}
    if recipe.made:
        return parse_block(where, {**block, "from": recipe.path}, base, shape, kind="intervention", model_name=label), recipe
    with tempfile.TemporaryDirectory() as folder:  # not made yet: check the block against a stand-in of its width
        stand_in = Path(folder) / "stand-in.safetensors"
        facts = {"architecture": shape.architecture, "d_model": shape.d_model}
        SteeringVector(torch.zeros(shape.d_model), layer=recipe.layer, metadata=facts).save(stand_in)
        spec = parse_block(where, {**block, "from": str(stand_in)}, base, shape, kind="intervention", model_name=label)
    return dataclasses.replace(spec, source=recipe.path, source_sha256=None), recipe


def _traces_study(where: str, path: Path, model, overrides, chain: tuple):
    from experiments.study_config import load_study_config

    path = path.resolve()
    if not path.is_file():
        raise StudyConfigError(where, f"no study file at {path} (relative to this study's file)")
    if str(path) in chain:
        raise StudyConfigError(where, f"{path} leads back to a study that needs it: a recipe's study cannot need this one")
    try:
        traces = load_study_config(path, overrides, _chain=chain)
    except StudyConfigError as error:
        raise StudyConfigError(where, f"{path}: {error}") from None
    ours = {key: value for key, value in dataclasses.asdict(model).items() if key != "device"}
    theirs = {key: value for key, value in dataclasses.asdict(traces.model).items() if key != "device"}
    if ours != theirs:
        differ = ", ".join(f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if ours[key] != theirs[key])
        raise StudyConfigError(where, f"{path} runs another model ({differ}): the vector must come from the model it "
                               "steers; give both studies the same [model]")
    return traces


def _options(where: str, options: dict, when) -> dict:
    accepted = set(inspect.signature(SteeringVector.from_thoughts).parameters) | set(
        inspect.signature(SteeringVector.__init__).parameters)
    known = sorted(accepted - set(_FIXED))
    check_keys(where, options, known)
    options = dict(options)
    if when is not None:
        options.setdefault("when", when)
    if isinstance(options.get("when"), dict):
        try:
            options["when"] = Trigger.from_dict(options["when"])
        except (TypeError, ValueError) as error:
            raise StudyConfigError(field_path(where, "when"), f"not a trigger ({error})") from None
    return options


def make_vectors(config, *, model=None, progress: bool = True):
    """Make every missing vector of ``config``'s recipes (one model for all), then read the study
    again; ``config`` itself when nothing is missing.

    Args:
        config: the checked :class:`~experiments.study_config.StudyConfig`.
        model: the loaded model (default: loaded from ``config.model`` when something is missing).
        progress: progress bars.

    Returns:
        The study, read again (its blocks now name the vectors' files and checksums).
    """
    from experiments.study_config import load_study_config

    missing = [recipe for recipe in config.recipes if not recipe.made]
    if not missing:
        return config
    model = config.model.load() if model is None else model
    for recipe in missing:
        print(f"{config.name}: making {recipe.field}'s vector from {Path(recipe.traces.source).name} "
              f"({recipe.traces.output})")
        vector = SteeringVector.load(recipe.make(model, progress=progress))
        counts = ", ".join(f"{label} {count}" for label, count in vector.metadata["class_counts"].items())
        used = vector.metadata["source"]["used"]
        note = f"; {vector.metadata['empty_classes_as_zero']}" if "empty_classes_as_zero" in vector.metadata else ""
        print(f"{config.name}: vector at {vector.config.site}, |S| = {vector.vector.norm():.3f}, from {used['correct']} "
              f"correct + {used['incorrect']} incorrect traces (thoughts: {counts}){note}")
    return load_study_config(config.source, config.overrides)
