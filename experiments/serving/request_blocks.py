"""A request's ``interventions`` and ``probes``: block tables checked like a study's, built per wave.

Each entry is a block table in the JSON form of a study condition (:mod:`experiments.block_specs`)::

    {"type": "steering_vector", "from": "seal.safetensors", "alpha": -1.0}
    {"type": "token_mask", "words": ["Wait"], "penalty": -5.0}
    {"type": "mi_estimator", "answers": ["18"]}

It is data, never code: the type must be registered, every key is a field of its config class
with the type its hints say, sites are parsed, layers checked against the served model, and a
``from`` file is a safetensors file (:mod:`surgery.files.storage`) under the directory the server
was started with (``--files``): a path that leads outside it, a missing file or a vector made for
another model is refused. A probe with an ``answers`` field (the MI estimator) takes one answer,
or one per completion the request asks for; there is no dataset to take them from.

Blocks are built for each wave of the scheduler (:mod:`experiments.serving.scheduler`), fresh per
request, so no request sees another's state.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(n_layers=2, d_model=8, name="tiny", architecture=SimpleNamespace(name="llama"))
    >>> stack = parse_stack([{"type": "token_mask", "words": ["Wait"]}], None, files=None, model=model, rows=1)
    >>> stack.names, stack.interventions[0].config["penalty"]
    (['token_mask'], -3.0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from experiments.block_specs import BlockSpec, parse_block, released_passes
from experiments.config_checks import StudyConfigError, field_path
from experiments.model_shape import ModelShape
from experiments.serving.errors import RequestError
from surgery.blocks import Block, registered_blocks

__all__ = ["RequestStack", "parse_stack"]


@dataclass(frozen=True)
class RequestStack:
    """A request's checked blocks, ready to build for a wave.

    Attributes:
        interventions: the intervention specs, in request order.
        probes: the probe specs, in request order.
        names: how the response names each intervention (its type, ``type#2`` when repeated).
        probe_names: likewise for the probes.
        answers: probe index -> the answers the request gave it (one, or one per row).
    """

    interventions: tuple[BlockSpec, ...] = ()
    probes: tuple[BlockSpec, ...] = ()
    names: list[str] = dataclasses.field(default_factory=list)
    probe_names: list[str] = dataclasses.field(default_factory=list)
    answers: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __add__(self, other: RequestStack) -> RequestStack:
        """This stack's blocks, then ``other``'s (a preset's stack, then the request's own)."""
        shift = len(self.probes)
        return _named(self.interventions + other.interventions, self.probes + other.probes,
                      {**self.answers, **{i + shift: a for i, a in other.answers.items()}})

    def build(self, model, positions: list[int], wave_rows: int) -> tuple[dict[str, Block], dict[str, Block]]:
        """Fresh blocks for one wave: ``(name -> intervention, name -> probe)``.

        Args:
            model: the served model.
            positions: this request's rows among the wave's rows (its answers go there).
            wave_rows: how many rows the wave runs (a probe with answers needs one per row).
        """
        interventions = {name: spec.build(model) for name, spec in zip(self.names, self.interventions)}
        probes = {}
        for i, (name, spec) in enumerate(zip(self.probe_names, self.probes)):
            given = self.answers.get(i)
            if given is None:
                probes[name] = spec.build(model)
                continue
            answers = [given[0]] * wave_rows
            for k, position in enumerate(positions):
                answers[position] = given[k % len(given)]
            probes[name] = spec.build(model, answers=answers)
        return interventions, probes


def parse_stack(interventions, probes, *, files: Path | None, model, rows: int) -> RequestStack:
    """Check a request's ``interventions`` and ``probes`` lists (see the module docstring).

    Args:
        interventions, probes: the request's lists of block tables, or None.
        files: the directory ``from`` files must lie in (None: the server reads no files).
        model: the served model (its shape and name).
        rows: how many rows the request runs (its prompts times ``n``): answers come one, or one per row.

    Raises:
        RequestError: naming the field (``interventions[0].site``) and the fix.
    """
    shape = ModelShape(model.n_layers, model.d_model, model.architecture.name)
    specs: dict[str, list[BlockSpec]] = {"interventions": [], "probes": []}
    answers: dict[int, tuple[str, ...]] = {}
    for key, kind, given in (("interventions", "intervention", interventions), ("probes", "probe", probes)):
        for i, table in enumerate(given or []):
            path = field_path(key, i)
            table = dict(table)
            if "answers" in table and kind == "probe":
                answers[len(specs[key])] = _answers(field_path(path, "answers"), table.pop("answers"), rows)
                table["answers_from"] = "dataset"  # filled in per wave by RequestStack.build
            elif "answers_from" in table:
                raise RequestError(field_path(path, "answers_from"), "this server has no dataset: give the reference "
                                   'answers themselves, "answers": ["..."] (one, or one per completion)')
            if "from" in table:
                _check_file(field_path(path, "from"), table["from"], files)
            try:
                spec = parse_block(path, table, files or ".", shape, kind=kind, model_name=model.name)
            except StudyConfigError as error:
                raise RequestError(error.field, str(error).removeprefix(f"{error.field}: ")) from None
            _check_poolable(path, spec)
            specs[key].append(spec)
    return _named(tuple(specs["interventions"]), tuple(specs["probes"]), answers)


def _named(interventions: tuple, probes: tuple, answers: dict) -> RequestStack:
    return RequestStack(interventions, probes, _names(interventions), _names(probes), answers)


def _names(specs) -> list[str]:
    names, seen = [], {}
    for spec in specs:
        seen[spec.type] = seen.get(spec.type, 0) + 1
        names.append(spec.type if seen[spec.type] == 1 else f"{spec.type}#{seen[spec.type]}")
    return names


def _answers(path: str, value, rows: int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise RequestError(path, 'expected a list of non-empty reference answers, e.g. ["18"]')
    if len(value) not in (1, rows):
        raise RequestError(path, f"{len(value)} answers given; give one (for every completion) or {rows} (one per "
                           "completion of this request)")
    return tuple(value)


def _check_file(path: str, value, files: Path | None) -> None:
    """A ``from`` path must name a .safetensors file inside ``files``."""
    if files is None:
        raise RequestError(path, "this server reads no files: start it with --files DIR and name files relative to "
                           "DIR, or leave `from` out")
    if not isinstance(value, str) or not value.endswith(".safetensors"):
        raise RequestError(path, f"expected the name of a .safetensors file under the server's --files directory, "
                           f"got {value!r}")
    root = files.resolve()
    target = (root / value).resolve()
    if not target.is_relative_to(root):
        raise RequestError(path, f"{value!r} lies outside the directory this server reads files from: name a file "
                           "relative to that directory (no '..', no absolute path elsewhere)")


def _check_poolable(path: str, spec: BlockSpec) -> None:
    """Requests share a slot pool: every block must follow rows through slots, none run released passes."""
    cls = registered_blocks()[spec.type]
    if cls.admit is Block.admit or cls.retire is Block.retire:
        raise RequestError(path, f"{spec.type} does not follow rows through the server's shared slots; run it with "
                           "`surgery run` instead")
    key = released_passes(spec.config)
    if key is not None:
        raise RequestError(field_path(path, key), f'{key} = "released" runs its own passes over the whole batch '
                           'and cannot share the server\'s slots: leave it at the default, or use `surgery run`')
