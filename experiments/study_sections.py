"""The plain sections of a study's TOML file: ``[model]``, ``[dataset]``, ``[prompt]``, ``[generation]``.

Each section is a frozen dataclass whose fields are the section's keys (with their defaults);
:func:`parse_section` checks a table's keys and value types against it, then the section's own
rules apply (a dtype that exists, a model config that reads, a shrink factor that divides its
widths, a dataset file that exists or a well-formed hub name, a template with ``{question}``).
Errors are :class:`~experiments.config_checks.StudyConfigError` naming the field and the fix.
:mod:`experiments.study_config` documents the whole file.

Example:
    >>> parse_section("generation", {"max_new_tokens": 64, "temperature": 1}, GenerationSpec)
    GenerationSpec(max_new_tokens=64, batch_size=8, do_sample=False, temperature=1.0, top_p=1.0, seed=0, stop_strings=(), cache='dynamic', compile=False)
    >>> parse_section("prompt", {"template": "Solve: {problem}"}, PromptSpec)
    Traceback (most recent call last):
    ...
    experiments.config_checks.StudyConfigError: prompt.template: unknown field(s) {problem}: the template must hold {question} and no other field (write {{ and }} for literal braces)
"""

from __future__ import annotations

import dataclasses
import functools
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
    "local_tokenizer",
    "parse_section",
]

DTYPES = ("float32", "float16", "bfloat16")
DATASET_FORMATS = ("gsm8k", "math", "json", "csv", "parquet")
DATASET_SAMPLES = ("gsm8k",)
_FORMAT_OF_SUFFIX = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class ModelSpec:
    """``[model]``: which model, in which dtype, on which device (paths resolved: absolute).

    A replication study names the hub id a GPU user loads (``name``), the model's shipped
    ``config`` (its depth and widths for the checks, and the architecture of the offline random
    model) and a local ``tokenizer`` folder (for the offline runs). ``random_weights`` (set by
    ``surgery run --random-weights``) builds the model from ``config`` with seeded random
    weights and that tokenizer, its widths divided by ``smoke_shrink``, in float32 on a CPU.
    """

    name: str = EMBEDDED
    dtype: str = "float32"
    device: str = "auto"
    config: str | None = None
    tokenizer: str | None = None
    smoke_shrink: int = 1
    random_weights: bool = False

    def load(self) -> surgery.Model:
        """Load the model (:func:`surgery.load`), or build its random stand-in
        (:func:`surgery.hosts.loading.load_from_config`); ``"auto"`` picks CUDA when there is one."""
        import torch

        device = None if self.device == "auto" else self.device
        if self.random_weights:
            from surgery.hosts.loading import load_from_config

            device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.float32 if device.type == "cpu" else getattr(torch, self.dtype)
            return load_from_config(self.config, local_tokenizer(self.tokenizer), shrink=self.smoke_shrink, device=device,
                                    dtype=dtype, name=self.label)
        return surgery.load(None if self.name == EMBEDDED else self.name, device=device, dtype=getattr(torch, self.dtype))

    @property
    def label(self) -> str:
        """How reports name the model: the name, and for random weights what they stand in for."""
        if not self.random_weights:
            return self.name
        widths = f", widths divided by {self.smoke_shrink}" if self.smoke_shrink > 1 else ""
        return f"{self.name} (random weights{widths})"


@functools.lru_cache(maxsize=4)
def local_tokenizer(folder: str):
    """The tokenizer saved in ``folder``, read once per process (the toolkit never changes a tokenizer).

    Raises:
        OSError, ValueError: no tokenizer there (transformers' error).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@dataclass(frozen=True)
class DatasetSpec:
    """``[dataset]``: a file (``path``, absolute), a hub dataset (``hub``, with ``path`` its local
    copy, read when the hub cannot be reached) or a shipped ``sample``; its format, which problems."""

    path: str | None = None
    sample: str | None = None
    format: str | None = None
    limit: int | None = None
    offset: int = 0
    hub: str | None = None
    split: str = "test"
    subset: str | None = None
    question_field: str | None = None
    answer_field: str | None = None

    @property
    def id_prefix(self) -> str | None:
        """Problem ids start with this (``MATH-500-test-17``), whichever copy is read; None: the file's stem."""
        return None if self.hub is None else f"{self.hub.rsplit('/', 1)[-1]}-{self.split}"


@dataclass(frozen=True)
class PromptSpec:
    """``[prompt]``: the text the model gets for a problem, whether it goes in the chat template,
    and the chat's system message (``system``; with it the study renders the template itself)."""

    template: str = "{question}"
    chat: bool = True
    system: str | None = None

    def render(self, problem: Problem, tokenizer=None) -> str:
        """The prompt for ``problem``: the template filled in; with a ``system`` message, the whole
        chat (system and user turns, generation prompt) as the tokenizer's template writes it, its
        leading BOS text removed (tokenizing adds the BOS once, as SEAL's released code does)."""
        text = self.template.format(question=problem.question)
        if not (self.chat and self.system is not None):
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt.system needs the model's tokenizer, with a chat template, to render the chat")
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        return rendered[len(bos):] if bos and rendered.startswith(bos) else rendered

    @property
    def engine_chat(self) -> bool:
        """The ``chat`` flag the engine gets: False when :meth:`render` already wrote the chat."""
        return self.chat and self.system is None


@dataclass(frozen=True)
class GenerationSpec:
    """``[generation]``: the decode settings of every condition (:func:`surgery.generate`'s options).

    ``cache = "static"`` with ``compile = true`` compiles the decode step once for the whole
    pool of a study (every condition's blocks in one graph, their parameters in device buffers);
    blocks that are not graph-safe decode eagerly, with a warning.
    """

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    cache: str = "dynamic"
    compile: bool = False


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
    spec = _model_files(spec, base)
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


def _model_files(spec: ModelSpec, base: Path) -> ModelSpec:
    """``config`` and ``tokenizer`` made absolute and checked; ``smoke_shrink`` against the config."""
    from surgery.hosts.loading import read_config, shrink_config

    changes = {}
    if spec.config is not None:
        changes["config"] = str((base / Path(spec.config).expanduser()).resolve())
        try:
            read_config(changes["config"])
        except (OSError, ValueError) as error:
            raise StudyConfigError("model.config", f"{error}. Give the model's config.json (relative to this file)") from None
    if spec.tokenizer is not None:
        changes["tokenizer"] = str((base / Path(spec.tokenizer).expanduser()).resolve())
        if not Path(changes["tokenizer"]).is_dir():
            raise StudyConfigError("model.tokenizer", f"no folder at {changes['tokenizer']}: give the folder of a saved "
                                                      "tokenizer (tokenizer.json, tokenizer_config.json)")
    if spec.smoke_shrink < 1:
        raise StudyConfigError("model.smoke_shrink", f"must be at least 1 (1: the exact widths), got {spec.smoke_shrink}")
    if spec.config is not None:
        try:
            shrink_config(changes["config"], spec.smoke_shrink)
        except ValueError as error:
            raise StudyConfigError("model.smoke_shrink", str(error)) from None
    if spec.random_weights and (spec.config is None or spec.tokenizer is None):
        missing = " and ".join(key for key in ("config", "tokenizer") if getattr(spec, key) is None)
        raise StudyConfigError("model", f"random weights need the model's config and a local tokenizer: add {missing} "
                                        'to [model] (config = "config.json", tokenizer = "tokenizer folder")')
    return dataclasses.replace(spec, **changes)


def _dataset(spec: DatasetSpec, base: Path) -> DatasetSpec:
    if spec.sample is not None and (spec.path is not None or spec.hub is not None):
        raise StudyConfigError("dataset", "give either sample = ... or a path (and/or a hub dataset), not both")
    if spec.sample is None and spec.path is None and spec.hub is None:
        raise StudyConfigError("dataset", f'give path = "file", hub = "owner/name" (with path = its local copy) or '
                                          f'sample = one of {", ".join(DATASET_SAMPLES)}')
    if spec.hub is not None and not _HUB_NAME.fullmatch(spec.hub):
        raise StudyConfigError("dataset.hub", f'{spec.hub!r} is not a hub dataset name: write owner/name, e.g. '
                                              '"HuggingFaceH4/MATH-500" (a local file goes in path = "...")')
    if spec.sample is not None:
        if spec.sample not in DATASET_SAMPLES:
            samples = ", ".join(DATASET_SAMPLES)
            raise StudyConfigError("dataset.sample", f"{spec.sample!r} is not a shipped sample: use one of {samples}")
        spec = dataclasses.replace(spec, format=spec.format or spec.sample)
    elif spec.path is not None:
        file = (base / Path(spec.path).expanduser()).resolve()
        if spec.hub is None and not file.is_file():
            raise StudyConfigError(
                "dataset.path", f'no file at {file} (paths start from the TOML file\'s folder). Fix the path, name the '
                f'hub dataset it copies (hub = "owner/name"), or use sample = "{DATASET_SAMPLES[0]}" for the sample '
                "shipped with experiments"
            )
        inferred = _FORMAT_OF_SUFFIX.get(file.suffix)
        if spec.format is None and inferred is None:
            formats = ", ".join(DATASET_FORMATS)
            raise StudyConfigError("dataset.format", f"cannot tell the format of {file.name}: write format = one of {formats}")
        spec = dataclasses.replace(spec, path=str(file), format=spec.format or inferred)
    if spec.format is not None and spec.format not in DATASET_FORMATS:
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
    if spec.system is not None and not spec.chat:
        raise StudyConfigError("prompt.system", "a system message needs the chat template: set chat = true, or remove it")
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
    if spec.cache not in ("dynamic", "static"):
        raise StudyConfigError(field_path("generation", "cache"), f'must be "dynamic" or "static", got {spec.cache!r}')
    if spec.compile and spec.cache != "static":
        raise StudyConfigError(field_path("generation", "compile"),
                               'needs cache = "static" (a compiled step must see the same KV memory every step)')
    return spec


_CHECKS = {"model": _model, "dataset": _dataset, "prompt": _prompt, "generation": _generation}
