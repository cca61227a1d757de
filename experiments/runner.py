"""Run a study: every (problem, condition) generated, graded, summarised and appended to its store.

:func:`run_study` takes a checked :class:`~experiments.study_config.StudyConfig`, opens its
:class:`~experiments.store.ResultStore` in ``config.output`` (refused if the folder holds another
study), and skips what the store already has: killed at any moment, the same call continues
where it stopped, and nothing is done twice. For each condition, the problems still to do run in
batches of ``generation.batch_size`` inside one trace holding the condition's interventions and
fresh probes; each row is graded (:func:`experiments.grading.grade`), summarised
(:func:`experiments.row_summaries.summarise_rows`), its tensors written to
``tensors/<condition>/<problem id>.safetensors`` and then its record appended (the record is the
commit: a sidecar without its record is simply written again).

Rows do not depend on the batch they run in (our engine's contract; sampling draws each row from
its own stream, keyed by the problem id), so a resumed run and a sharded one (``shard=(i, n)``:
every n-th problem from the i-th) store what one uninterrupted run stores.

Continuous batching (the default, ``continuous=True``): the pending (problem, condition) pairs
of every condition whose blocks follow rows through slots go through one slot pool
(:mod:`surgery.decode.slots`) of ``generation.batch_size`` slots, in one generation
(:func:`run_pool`): one trace holds the union of the conditions' interventions, each row carrying
its condition's (a stack per row, :mod:`surgery.decode.row_stacks`; a steering vector per
condition is one per-row table, :mod:`surgery.decode.row_tables`), and one set of the study's
probes carried by every row; a finished row's slot is taken at once by the next pair, whatever
its condition, and its record is appended the moment it finishes (``on_row``): a kill loses only
the rows in flight. With ``generation.cache = "static"`` and ``compile = true`` the whole study
is one compile of the decode step. Each record equals what the condition's own batches store
(tested). Conditions that cannot share a pool (the released TTTS passes, recycling's released
coin) run in batches per condition as before.

Example::

    config = load_study_config("EXPERIMENT.toml")
    store = run_study(config)                     # progress bar with rate and ETA
    [r["payload"]["grade"]["correct"] for r in store.records()]
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

import surgery
from experiments.block_specs import released_passes
from experiments.grading import grade
from experiments.problems import Problem
from experiments.row_summaries import RowSummary, summarise_row, summarise_rows
from experiments.store import ResultStore
from experiments.study_config import StudyConfig
from interventions.released_ttts import ReleasedTTTSOutput, trace_generate
from surgery.decode.generation_output import FinishedRow
from surgery.files.storage import atomic_path

__all__ = ["block_names", "compile_settings", "poolable", "run_batch", "run_pool", "run_study", "study_problems",
           "tensor_path"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def study_problems(config: StudyConfig) -> list[Problem]:
    """The study's problems: its ``[dataset]`` file, hub dataset (its local copy when the hub
    cannot be reached) or shipped sample, offset and limit applied."""
    from experiments.datasets import load_problems, sample_problems

    spec = config.dataset
    if spec.sample is not None:
        problems = sample_problems()
        end = None if spec.limit is None else spec.offset + spec.limit
        return problems[spec.offset : end]
    fmt = spec.format if spec.format in ("gsm8k", "math") else None  # json/csv/parquet: read by suffix
    return load_problems(spec.hub or spec.path, format=fmt, limit=spec.limit, offset=spec.offset, split=spec.split,
                         subset=spec.subset, fallback=spec.path if spec.hub else None, name=spec.id_prefix,
                         question_field=spec.question_field, answer_field=spec.answer_field)


def block_names(config: StudyConfig, condition: str) -> list[str]:
    """Names of a condition's interventions in its records: the block type, ``#2``... when repeated."""
    names, seen = [], {}
    for spec in config.conditions[condition]:
        seen[spec.type] = seen.get(spec.type, 0) + 1
        names.append(spec.type if seen[spec.type] == 1 else f"{spec.type}#{seen[spec.type]}")
    return names


def tensor_path(folder: str | Path, condition: str, problem_id: str) -> Path:
    """Where a row's tensors go: ``folder/tensors/<condition>/<problem id>.safetensors`` (names made safe)."""
    return Path(folder) / "tensors" / _UNSAFE.sub("_", condition) / f"{_UNSAFE.sub('_', problem_id)}.safetensors"


def run_batch(config: StudyConfig, condition: str, problems: Sequence[Problem], model: surgery.Model):
    """Generate ``problems`` under ``condition`` in one trace; one :class:`RowSummary` per problem,
    its record holding the grade."""
    interventions = dict(zip(block_names(config, condition), config.build_blocks(condition, model), strict=True))
    probes = config.build_probes(model, problems)
    gen = config.generation
    prompts = [config.prompt.render(problem, model.tokenizer) for problem in problems]
    start = time.perf_counter()
    with surgery.trace(model, *interventions.values(), *probes.values()) as tr:
        # tr.generate, or the released TTTS passes when a ThinkingTokenInsertion(joins="released") is attached
        out = trace_generate(tr, prompts, config.max_new_tokens(condition), chat=config.prompt.engine_chat,
                             do_sample=gen.do_sample, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed,
                             stop_strings=gen.stop_strings, row_keys=[problem.id for problem in problems],
                             progress=False, **compile_settings(config))
    seconds = time.perf_counter() - start
    rows = summarise_rows(out, interventions, probes, model.tokenizer, prompts=prompts, seconds=seconds)
    released = out.records() if isinstance(out, ReleasedTTTSOutput) else None
    for i, (problem, row) in enumerate(zip(problems, rows, strict=True)):
        if released is not None:  # the three passes; "text" is the answer pass, the one the release grades
            row.record["released_ttts"] = released[i]
        row.record["grade"] = grade(row.record["text"], problem.answer).to_dict()
    return rows


def poolable(config: StudyConfig, condition: str, model: surgery.Model) -> bool:
    """Whether ``condition`` can share a slot pool: every block follows rows through slots, none
    runs the released TTTS passes (three text-joined generations of their own) and none draws
    from one random stream per run (recycling's released coin, whose draws depend on the rows
    beside it: its condition keeps its own batches, as the release ran)."""
    blocks = config.build_blocks(condition, model)
    return all(released_passes(block.config) is None and block.follows_rows for block in blocks)


def run_pool(config: StudyConfig, pairs: Sequence[tuple[Problem, str]], model: surgery.Model,
             on_row: Callable[[int, RowSummary], None] | None = None) -> list[RowSummary]:
    """Generate ``pairs`` ((problem, condition), any mix of conditions) through one slot pool;
    one :class:`RowSummary` per pair, in order, each equal to what ``run_batch`` gives it.

    ``on_row(i, summary)`` gets pair ``i``'s summary the moment its row leaves its slot (other
    rows still running): :func:`run_study` appends its record then. The summaries are then not
    kept (a long study's sidecar tensors would pile up in memory): the result is empty.
    """
    problems = [problem for problem, _ in pairs]
    conditions = list(dict.fromkeys(condition for _, condition in pairs))
    interventions = {c: dict(zip(block_names(config, c), config.build_blocks(c, model), strict=True)) for c in conditions}
    probes = config.build_probes(model, problems)
    prompts = [config.prompt.render(problem, model.tokenizer) for problem in problems]
    stacks = [[*interventions[condition].values(), *probes.values()] for _, condition in pairs]
    gen = config.generation
    union = [block for c in conditions for block in interventions[c].values()]
    summaries: dict[int, RowSummary] = {}
    slots = min(gen.batch_size, len(pairs))

    def finished(row: FinishedRow) -> None:
        problem, condition = pairs[row.row]
        # its time in a slot, shared with the rows beside it: the pool's wall time split between its rows
        summary = summarise_row(row, interventions[condition], probes, model.tokenizer, prompt=prompts[row.row],
                                seconds=row.seconds / slots)
        summary.record["grade"] = grade(summary.record["text"], problem.answer).to_dict()
        if on_row is None:
            summaries[row.row] = summary
        else:
            on_row(row.row, summary)

    with surgery.trace(model, *union, *probes.values()) as tr:
        tr.generate(prompts, [config.max_new_tokens(c) for _, c in pairs], chat=config.prompt.engine_chat,
                    do_sample=gen.do_sample, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed,
                    stop_strings=gen.stop_strings, row_keys=[problem.id for problem in problems], shared_keys=True,
                    progress=False, batch_size=gen.batch_size, stacks=stacks, on_row=finished, **compile_settings(config))
    return [summaries[i] for i in sorted(summaries)]


def compile_settings(config: StudyConfig) -> dict:
    """The decode step's cache and compile options of ``config.generation`` (``surgery.generate``'s)."""
    gen = config.generation
    return {"cache": gen.cache, "compile": gen.compile} if gen.compile else {"cache": gen.cache}


def _save(store: ResultStore, problem: Problem, condition: str, row) -> None:
    if row.tensors:
        path = tensor_path(store.folder, condition, problem.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as staging:
            save_file(row.tensors, str(staging))
        row.record["tensors"] = str(path.relative_to(store.folder))
    store.append(problem.id, condition, row.record)


def run_study(config: StudyConfig, *, model: surgery.Model | None = None, problems: Sequence[Problem] | None = None,
              shard: tuple[int, int] | None = None, progress: bool = True, continuous: bool = True) -> ResultStore:
    """Run what ``config`` asks and its store lacks; return the store.

    Args:
        config: the checked study (:func:`~experiments.study_config.load_study_config`).
        model: the loaded model; default: ``config.model.load()``, and only when something is
            left to do.
        problems: the problems; default: :func:`study_problems`.
        shard: ``(index, count)``: run only problems ``index, index + count, ...`` (workers).
        progress: a progress bar over (problem, condition) pairs, with rate and ETA.
        continuous: one slot pool for every condition that can share it (the module
            docstring); False: batches per condition.
    """
    store = ResultStore(config.output, config.to_dict())
    problems = list(study_problems(config) if problems is None else problems)
    if len({problem.id for problem in problems}) != len(problems):
        raise ValueError("the study's problems have repeated ids: each problem needs its own id")
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {shard} is not (index, count) with 0 <= index < count")
        problems = problems[index::count]
    done = store.done()
    todo = {c: [p for p in problems if (p.id, c) not in done] for c in config.conditions}
    total = sum(map(len, todo.values()))
    if total == 0:
        return store
    model = config.model.load() if model is None else model
    batch_size = config.generation.batch_size
    pooled = [c for c in todo if todo[c] and continuous and poolable(config, c, model)]
    with tqdm(total=total, unit="run", desc=config.name, disable=not progress, dynamic_ncols=True) as bar:
        pairs = [(problem, condition) for condition in pooled for problem in todo[condition]]
        if pairs:
            bar.set_postfix_str(", ".join(pooled))

            def save(i: int, row: RowSummary) -> None:  # the moment the row finishes
                _save(store, *pairs[i], row)
                bar.update(1)

            run_pool(config, pairs, model, on_row=save)
        for condition, pending in todo.items():
            if condition in pooled:
                continue
            bar.set_postfix_str(condition)
            for first in range(0, len(pending), batch_size):
                batch = pending[first : first + batch_size]
                for problem, row in zip(batch, run_batch(config, condition, batch, model), strict=True):
                    _save(store, problem, condition, row)
                bar.update(len(batch))
    return store
