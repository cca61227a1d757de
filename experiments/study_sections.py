"""The plain sections of a study's TOML file: ``[model]``, ``[dataset]``, ``[prompt]``, ``[generation]``.

Each section is a frozen dataclass whose fields are the section's keys (with their defaults);
:func:`parse_section` checks a table's keys and value types against it, then the section's own
rules apply (a dtype that exists, a dataset file that exists, a template with ``{question}``).
Errors are :class:`~experiments.config_checks.StudyConfigError` naming the field and the fix.
:mod:`experiments.study_config` documents the whole file.

Example:
    >>> parse_section("generation", {"max_new_tokens": 64, "temperature": 1}, GenerationSpec)
    GenerationSpec(max_new_tokens=64, batch_size=8, do_sample=False, temperature=1.0, top_p=1.0, seed=0, stop_strings=())
    >>> parse_section("prompt", {"template": "Solve: {problem}"}, PromptSpec)
    Traceback (most recent call last):
    ...
    experiments.config_checks.StudyConfigError: prompt.template: unknown field(s) {problem}: the template must hold {question} and no other field (write {{ and }} for literal braces)
"""

from __future__ import annotations

import dataclasses
import re
import string
import typing
from dataclasses import dataclass
from pathlib import Path

import surgery
from experiments.config_checks import StudyConfigError, check_keys, check_value, field_path
from experiments.model_shape import EMBEDDED
from experiments.problems import Problem

__all__ = [
    "DATASET_FORMATS",
    "DATASET_SAMPLES",
    "DTYPES",
    "DatasetSpec",
    "GenerationSpec",
    "ModelSpec",
    "PromptSpec",
    "parse_section",
]

DTYPES = ("float32", "float16", "bfloat16")
DATASET_FORMATS = ("gsm8k", "math", "json", "csv", "parquet")
DATASET_SAMPLES = ("gsm8k",)
_FORMAT_OF_SUFFIX = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: which model, in which dtype, on which device (``name`` resolved: a folder is absolute)."""

    name: str = EMBEDDED
    dtype: str = "float32"
    device: str = "auto"

    def load(self) -> surgery.Model:
        """Load the model (:func:`surgery.load`); ``"auto"`` picks CUDA when there is one."""
        import torch

        return surgery.load(None if self.name == EMBEDDED else self.name,
                            device=None if self.device == "auto" else self.device, dtype=getattr(torch, self.dtype))


@dataclass(frozen=True)
class DatasetSpec:
    """``[dataset]``: a file (``path``, absolute) or a shipped ``sample``, its format, which problems."""

    path: str | None = None
    sample: str | None = None
    format: str | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class PromptSpec:
    """``[prompt]``: the text the model gets for a problem, and whether it goes in the chat template."""

    template: str = "{question}"
    chat: bool = True

    def render(self, problem: Problem) -> str:
        """The prompt for ``problem``."""
        return self.template.format(question=problem.question)


@dataclass(frozen=True)
class GenerationSpec:
    """``[generation]``: the decode settings of every condition (:func:`surgery.generate`'s options)."""

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()


def parse_section(name: str, table, cls: type, base: str | Path = "."):
    """The section ``name`` (one of the dataclasses here, ``cls``) from its TOML table, checked.

    Args:
        name: ``"model"``, ``"dataset"``, ``"prompt"`` or ``"generation"``.
        table: the table as tomllib read it.
        cls: the section's dataclass.
        base: the folder relative paths start from (the TOML file's); paths come back absolute.
    """
    if not isinstance(table, dict):
        raise StudyConfigError(name, f"expected a [{name}] section, got {table!r}")
    hints = typing.get_type_hints(cls)
    check_keys(name, table, [f.name for f in dataclasses.fields(cls)])
    values = {key: check_value(field_path(name, key), value, hints[key]) for key, value in table.items()}
    spec = cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
    check = _CHECKS[name]
    return check(spec, Path(base)) if name in ("model", "dataset") else check(spec)


def _model(spec: ModelSpec, base: Path) -> ModelSpec:
    if spec.dtype not in DTYPES:
        raise StudyConfigError("model.dtype", f"{spec.dtype!r} is not one of {', '.join(DTYPES)}")
    if not _DEVICE.fullmatch(spec.device):
        raise StudyConfigError("model.device", f"{spec.device!r} is not a device: write auto, cpu, mps, cuda or cuda:N")
    if spec.name == EMBEDDED:
        return spec
    local = (base / Path(spec.name).expanduser()).resolve()
    if local.is_dir() or local.is_file():
        return dataclasses.replace(spec, name=str(local))
    if spec.name.startswith((".", "/", "~")) or spec.name.endswith(".gguf") or spec.name.count("/") > 1:
        raise StudyConfigError(
            "model.name", f"no folder or .gguf file at {local}. Give a model folder (relative to this file or "
            f'absolute), an HF id such as "HuggingFaceTB/SmolLM2-135M-Instruct", or "{EMBEDDED}"'
        )
    return spec


def _dataset(spec: DatasetSpec, base: Path) -> DatasetSpec:
    if (spec.path is None) == (spec.sample is None):
        raise StudyConfigError("dataset", f'give either path = "file" or sample = one of {", ".join(DATASET_SAMPLES)}')
    if spec.sample is not None:
        if spec.sample not in DATASET_SAMPLES:
            samples = ", ".join(DATASET_SAMPLES)
            raise StudyConfigError("dataset.sample", f"{spec.sample!r} is not a shipped sample: use one of {samples}")
        spec = dataclasses.replace(spec, format=spec.format or spec.sample)
    else:
        file = (base / Path(spec.path).expanduser()).resolve()
        if not file.is_file():
            raise StudyConfigError(
                "dataset.path", f'no file at {file} (paths start from the TOML file\'s folder). Fix the path, or use '
                f'sample = "{DATASET_SAMPLES[0]}" for the sample shipped with experiments'
            )
        inferred = _FORMAT_OF_SUFFIX.get(file.suffix)
        if spec.format is None and inferred is None:
            formats = ", ".join(DATASET_FORMATS)
            raise StudyConfigError("dataset.format", f"cannot tell the format of {file.name}: write format = one of {formats}")
        spec = dataclasses.replace(spec, path=str(file), format=spec.format or inferred)
    if spec.format not in DATASET_FORMATS:
        raise StudyConfigError("dataset.format", f"{spec.format!r} is not one of {', '.join(DATASET_FORMATS)}")
    if spec.limit is not None and spec.limit < 1:
        raise StudyConfigError("dataset.limit", f"must be at least 1, got {spec.limit} (leave it out for every problem)")
    if spec.offset < 0:
        raise StudyConfigError("dataset.offset", f"must be 0 or more, got {spec.offset}")
    return spec


def _prompt(spec: PromptSpec) -> PromptSpec:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(spec.template) if name is not None}
    except ValueError as error:
        raise StudyConfigError("prompt.template", f"{error}: write {{{{ and }}}} for literal braces") from None
    if names != {"question"}:
        extra = sorted(names - {"question"})
        problem = f"unknown field(s) {', '.join('{' + n + '}' for n in extra)}" if extra else "no {question} field"
        raise StudyConfigError("prompt.template", f"{problem}: the template must hold {{question}} and no other "
                                                  "field (write {{ and }} for literal braces)")
    return spec


def _generation(spec: GenerationSpec) -> GenerationSpec:
    for key, ok, rule in (
        ("max_new_tokens", spec.max_new_tokens >= 1, "at least 1"),
        ("batch_size", spec.batch_size >= 1, "at least 1"),
        ("temperature", spec.temperature > 0, "above 0 (do_sample = false decodes greedily)"),
        ("top_p", 0 < spec.top_p <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise StudyConfigError(field_path("generation", key), f"must be {rule}, got {getattr(spec, key)!r}")
    return spec


_CHECKS = {"model": _model, "dataset": _dataset, "prompt": _prompt, "generation": _generation}
