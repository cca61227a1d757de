"""``surgery run STUDY --check``: everything a study needs, checked without loading any weights.

:func:`check_study` reads the study as ``surgery run`` would (with the same options), which
already checks every field, block, site and layer against the model's shipped config and every
vector's width (:mod:`experiments.study_config`); then it checks what the run will read: the
tokenizer (it loads, it has the chat template the prompt needs; the first prompt is rendered and
counted), the dataset (the local file reads, or the hub name is well-formed, with or without a
local copy; a ``--random-weights`` run is offline, so it needs the local copy), the vectors the
recipes will make (and their traces studies, checked the same way) and the output folder. It
returns what it checked, one line each, and the errors, each naming the field and the fix.

Example::

    report = check_study("studies/replications/seal-math500.toml")
    print("\\n".join(report.lines)); report.ok
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from experiments.config_checks import StudyConfigError
from experiments.store import config_hash
from experiments.run_overrides import RunOverrides
from experiments.study_config import StudyConfig, load_study_config
from experiments.study_sections import local_tokenizer

__all__ = ["CheckReport", "check_study"]


@dataclass
class CheckReport:
    """What :func:`check_study` found: ``lines`` (what was checked) and ``errors`` (field: fix)."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error."""
        return not self.errors


def check_study(path: str | os.PathLike, overrides: RunOverrides | None = None) -> CheckReport:
    """Check the study at ``path`` as ``surgery run`` with ``overrides`` would run it; load no weights.

    Layers, sites and widths are always checked against the model's exact config; with
    ``overrides.random_weights`` the offline variant is checked too (its shrunk widths, its local
    tokenizer, and the local copy of its dataset, since it cannot reach a hub).
    """
    overrides = overrides or RunOverrides()
    report = CheckReport()
    try:
        config = load_study_config(path, dataclasses.replace(overrides, random_weights=False))
        if overrides.random_weights:
            load_study_config(path, overrides)
    except (StudyConfigError, FileNotFoundError) as error:
        report.errors.append(str(error))
        return report
    _check(config, report, indent="", offline=overrides.random_weights)
    return report


def _check(config: StudyConfig, report: CheckReport, indent: str, offline: bool) -> None:
    say = report.lines.append
    model = config.model
    say(f"{indent}study      {config.source}: every field, block, site and layer checked")
    say(f"{indent}model      {model.name}")
    if model.config is not None:
        from surgery.hosts.loading import read_config, shrink_config

        exact = read_config(model.config)
        say(f"{indent}  config   {model.config}: {exact.model_type}, {exact.num_hidden_layers} blocks, d_model "
            f"{exact.hidden_size}, vocabulary {exact.vocab_size} (layers and widths checked against it)")
        small = shrink_config(exact, model.smoke_shrink)
        say(f"{indent}  offline  --random-weights builds it with random weights"
            + (f", widths divided by {model.smoke_shrink}: d_model {small.hidden_size}, {small.num_attention_heads} "
               f"head(s), intermediate {small.intermediate_size}" if model.smoke_shrink > 1 else ", at its exact widths"))
    tokenizer = _tokenizer(config, report, indent)
    _dataset(config, report, indent, tokenizer, offline)
    for condition, specs in config.conditions.items():
        blocks = ", ".join(_describe(spec) for spec in specs) or "no intervention"
        say(f"{indent}condition  {condition}: {blocks}; {config.max_new_tokens(condition)} new tokens at most")
    for name, spec in config.probes.items():
        say(f"{indent}probe      {name}: {_describe(spec)}")
    for recipe in config.recipes:
        state = "made" if recipe.made else "not made yet: `surgery run` makes it first"
        grades = f"first {_count(recipe.correct)} correct + first {_count(recipe.incorrect)} incorrect rows"
        say(f"{indent}recipe     {recipe.field}: vector at layer {recipe.layer} from {grades} of "
            f"{Path(recipe.traces.source).name} -> {recipe.path} ({state})")
        _check(recipe.traces, report, indent + "  | ", offline)
    _output(config, report, indent)


def _count(value: int | None) -> str:
    return "every" if value is None else str(value)


def _describe(spec) -> str:
    keys = ("site", "layer", "alpha", "words", "peak_rule", "top_k", "precision", "n_clusters", "probability", "budget")
    shown = ", ".join(f"{key} {spec.config[key]!r}" for key in keys if spec.config.get(key) is not None)
    return f"{spec.type}" + (f" ({shown})" if shown else "")


def _tokenizer(config: StudyConfig, report: CheckReport, indent: str):
    model = config.model
    if model.tokenizer is None:
        report.lines.append(f"{indent}tokenizer  the model's own (no local tokenizer: --random-weights cannot run)")
        return None
    try:
        tokenizer = local_tokenizer(model.tokenizer)
    except (OSError, ValueError) as error:
        report.errors.append(f"model.tokenizer: {model.tokenizer} does not load as a tokenizer ({error}). Give the "
                             "folder of a saved tokenizer")
        return None
    note = ""
    if model.config is not None:
        from surgery.hosts.loading import read_config

        vocabulary = read_config(model.config).vocab_size
        if len(tokenizer) > vocabulary:
            note = (f"; NOT this model's tokenizer ({len(tokenizer)} entries > its vocabulary of {vocabulary}): offline "
                    "runs substitute it and widen the random model's vocabulary; a run with weights uses the model's own")
    if config.prompt.chat and not getattr(tokenizer, "chat_template", None):
        report.errors.append(f"prompt.chat: the tokenizer at {model.tokenizer} has no chat template: set chat = false, "
                             "or give a tokenizer with one")
    report.lines.append(f"{indent}tokenizer  {model.tokenizer}: {len(tokenizer)} entries"
                        + (", chat template" if getattr(tokenizer, "chat_template", None) else "") + note)
    return tokenizer


def _dataset(config: StudyConfig, report: CheckReport, indent: str, tokenizer, offline: bool) -> None:
    from experiments.datasets import load_problems, sample_problems

    spec = config.dataset
    say = report.lines.append
    problems = None
    if spec.sample is not None:
        problems = sample_problems()[spec.offset:][: spec.limit]
        say(f"{indent}dataset    the shipped {spec.sample} sample: {len(problems)} problems")
    elif spec.path is not None and Path(spec.path).is_file():
        fmt = spec.format if spec.format in ("gsm8k", "math") else None
        try:
            problems = load_problems(spec.path, format=fmt, limit=spec.limit, offset=spec.offset, name=spec.id_prefix,
                                     question_field=spec.question_field, answer_field=spec.answer_field)
        except (OSError, ValueError) as error:
            report.errors.append(f"dataset.path: {error}")
            return
        source = f"{spec.hub} ({spec.split}) from the hub when it answers, else its local copy " if spec.hub else ""
        say(f"{indent}dataset    {source}{spec.path}: {len(problems)} problems read (first answer {problems[0].answer!r})"
            if problems else f"{indent}dataset    {spec.path}: no problems")
    else:
        copy = f"its local copy {spec.path} does not exist" if spec.path else "no local copy (dataset.path)"
        fix = (f"download it (`hf download {spec.hub} --repo-type dataset`), write the split as .jsonl to "
               f"{spec.path or 'a file named by dataset.path'}, or pass --dataset FILE")
        if offline:
            report.errors.append(f"dataset.path: a --random-weights run is offline and {copy}: {fix}")
        else:
            say(f"{indent}dataset    {spec.hub} ({spec.split}{', ' + spec.subset if spec.subset else ''}) from the hub; "
                f"{copy}, so the run needs the hub (offline: {fix})")
    if problems and tokenizer is not None:
        try:
            prompt = config.prompt.render(problems[0], tokenizer)
        except ValueError as error:
            report.errors.append(f"prompt.system: {error}")
            return
        if config.prompt.engine_chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        say(f"{indent}prompt     {len(ids)} tokens for the first problem: {tokenizer.decode(ids)[:160]!r}...")


def _output(config: StudyConfig, report: CheckReport, indent: str) -> None:
    stored = Path(config.output) / "config.json"
    if not stored.is_file():
        report.lines.append(f"{indent}output     {config.output} (new)")
        return
    try:
        same = json.loads(stored.read_text(encoding="utf-8"))["config_hash"] == config_hash(config.to_dict())
    except (ValueError, KeyError):
        same = False
    if same or any(not recipe.made for recipe in config.recipes):  # a missing vector changes the hash until made
        report.lines.append(f"{indent}output     {config.output} (resumes what is there)")
    else:
        report.errors.append(f"output: {config.output} holds the results of another study: write this one to another "
                             "folder (output = ..., or --output), or delete that folder to start over")
