"""One block of a study, as a TOML table: checked against the block registry, built later for a model.

A table names a registered block (``type``) and sets fields of its config class; nothing here
knows any block by name, so a newly registered block works in a study as it is::

    { type = "token_mask", words = ["Wait", "Alternatively"], penalty = -3.0 }
    { type = "representation_recycling", layer = 20, probability = 0.5 }
    { type = "steering_vector", from = "runs/vec.safetensors", alpha = 1.0 }
    { type = "mi_estimator", answers_from = "dataset" }

Three keys are not config fields:

- ``type``: the registry name (:func:`surgery.blocks.registered_blocks`).
- ``from``: a file written by :func:`surgery.files.saving.save_blocks` (``SteeringVector.save`` too)
  holding one block of this type: its tensors (a steering vector) and its config, which the
  other keys override. A TOML file cannot hold tensors, so blocks with tensors need it.
- ``answers_from = "dataset"``: for blocks with an ``answers`` field (the MI probe): the
  problems' reference answers, one per row, filled in by :meth:`BlockSpec.build`;
  ``answers_from = "solution"``: their reference solutions instead (the MI-peaks paper's ``h_y``
  is the state at the end of the solution text, METHODS.md section 2).

:func:`parse_block` checks everything it can before a model loads: the type, every key and its
type (from the config's type hints), the sites (:meth:`surgery.sites.Site.parse`), the layer
range and a file's vector against the model's shape (:mod:`experiments.model_shape`), and
what the block's constructor itself refuses (it is built once, on the CPU).

Example:
    >>> spec = parse_block("conditions.mask.blocks[0]", {"type": "token_mask", "words": ["Wait"]}, ".", None,
    ...                    kind="intervention")
    >>> spec.type, spec.config["words"], spec.config["penalty"]
    ('token_mask', ['Wait'], -3.0)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path

import interventions  # noqa: F401  (registers the interventions)
import probes  # noqa: F401  (registers the probes)
from experiments.config_checks import StudyConfigError, check_keys, check_value, field_path
from experiments.model_shape import ModelShape
from surgery.files import storage
from surgery.blocks import Block, Intervention, Probe, registered_blocks
from surgery.files.saving import FORMAT, VERSION, load_blocks
from surgery.sites import Site

__all__ = ["BlockSpec", "parse_block", "released_passes"]

RESERVED_KEYS = ("answers_from", "from", "type")
ANSWER_SOURCES = ("dataset", "solution")  # what answers_from may name: the final answers or the solutions
_KINDS = {"intervention": (Intervention, "[conditions.NAME] blocks"), "probe": (Probe, "[probes]")}


@dataclass(frozen=True)
class BlockSpec:
    """A checked block table: what :meth:`build` turns into a block once the model is loaded.

    Attributes:
        field: the table's TOML path (``conditions.seal.blocks[0]``), named in errors.
        type: the registry name.
        config: every field of the block's config in JSON form (defaults written out).
        source: the ``from`` file, absolute, or None.
        source_sha256: that file's SHA-256 (a re-extracted vector is another study).
        answers_from: ``"dataset"``, ``"solution"`` or None.
    """

    field: str
    type: str
    config: dict
    source: str | None = None
    source_sha256: str | None = None
    answers_from: str | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable and canonical (no TOML path: moving a table within a list moves it)."""
        return {"type": self.type, "config": self.config, "from": self.source, "from_sha256": self.source_sha256,
                "answers_from": self.answers_from}

    def build(self, model, answers: list[str] | None = None) -> Block:
        """The block for ``model`` (tensors on its device, in its dtype), through ``Block.from_dict``.

        Args:
            model: the loaded :class:`surgery.Model`.
            answers: the reference answers of the rows of one run (needed with ``answers_from``).
        """
        config = dict(self.config)
        if self.answers_from is not None:
            if answers is None:
                raise ValueError(f"{self.field} takes its answers from the dataset: pass the problems' answers")
            config["answers"] = list(answers)
        tensors = {}
        if self.source is not None:
            if hashlib.sha256(Path(self.source).read_bytes()).hexdigest() != self.source_sha256:
                raise ValueError(f"{self.field}: {self.source} changed since the study was read: read the study again")
            shape = ModelShape(model.n_layers, model.d_model, model.architecture.name)
            tensors = _saved_block(self.field, self.source, self.type, shape, model.name).tensors()
            tensors = {name: t.to(device=model.device, dtype=model.dtype if t.is_floating_point() else t.dtype)
                       for name, t in tensors.items()}
        return Block.from_dict({"block": self.type, "config": config}, tensors)


def released_passes(config) -> str | None:
    """The setting (``"joins"`` or ``"coin"``) by which a block's config (a config object or its
    JSON dict) runs the released code's passes over a whole batch, or None. Such a block cannot
    share a slot pool: the released TTTS passes are three text-joined generations of their own,
    and recycling's released coin draws from one random stream per run.

    Example:
        >>> released_passes({"joins": "released"}), released_passes({"coin": "per_row"})
        ('joins', None)
    """
    for key in ("joins", "coin"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value == "released":
            return key
    return None


def parse_block(
    path: str, table, base: str | Path, shape: ModelShape | None, *, kind: str, model_name: str = "the model"
) -> BlockSpec:
    """Check one block table (see the module docstring) and return its spec.

    Args:
        path: the table's TOML path, for errors.
        table: the table as tomllib read it.
        base: the folder relative ``from`` paths start from (the TOML file's).
        shape: the model's shape, or None when it is unknown before loading (no range checks).
        kind: ``"intervention"`` (a condition's blocks) or ``"probe"`` (``[probes]``).
        model_name: how errors name the model.

    Raises:
        StudyConfigError: naming the field and the fix.
    """
    registry = registered_blocks()
    wanted, section = _KINDS[kind]
    if not isinstance(table, dict):
        raise StudyConfigError(path, f'expected a table such as {{ type = "token_mask", words = ["Wait"] }}, got {table!r}')
    name = table.get("type")
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        what = "missing." if name is None else f"no block is registered as {name!r}."
        raise StudyConfigError(field_path(path, "type"), f"{what}{hint} Registered blocks: {', '.join(registry)}")
    cls = registry[name]
    if not issubclass(cls, wanted):
        other = "probe" if kind == "intervention" else "intervention"
        place = _KINDS[other][1]
        article = "a" if other == "probe" else "an"
        raise StudyConfigError(field_path(path, "type"), f"{name} is {article} {other}: list it under {place}")
    hints = typing.get_type_hints(cls.config_class)
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    check_keys(path, table, [*fields, *RESERVED_KEYS])
    given = {key: check_value(field_path(path, key), value, hints[key]) for key, value in table.items() if key in fields}
    for key, value in given.items():
        if (key == "site" or key.endswith("_site")) and isinstance(value, str):
            try:
                Site.parse(value)
            except ValueError as error:
                raise StudyConfigError(field_path(path, key), str(error)) from None
    answers_from = table.get("answers_from")
    if answers_from is not None and "answers" in given:
        raise StudyConfigError(field_path(path, "answers"), 'give answers or answers_from = "dataset", not both')
    if answers_from is not None and (answers_from not in ANSWER_SOURCES or "answers" not in fields):
        fix = ('write answers_from = "dataset" (final answers) or "solution" (reference solutions)'
               if "answers" in fields else f"{name} has no answers field: remove it")
        raise StudyConfigError(field_path(path, "answers_from"), f"cannot take answers from {answers_from!r}: {fix}")
    source, digest, base_config, tensors = None, None, {}, {}
    if "from" in table:
        source, digest = _source_file(field_path(path, "from"), table["from"], base)
        saved = _saved_block(field_path(path, "from"), source, name, shape, model_name)
        base_config, tensors = saved.to_dict()["config"], saved.tensors()
    block = _construct(path, name, {**base_config, **given}, tensors, has_source=source is not None)
    if shape is not None:
        _check_range(path, block, given, shape, model_name)
    return BlockSpec(path, name, block.to_dict()["config"], source, digest, answers_from)


def _source_file(path: str, value, base: str | Path) -> tuple[str, str]:
    if not isinstance(value, str):
        raise StudyConfigError(path, f"expected the path of a .safetensors file written by save_blocks, got {value!r}")
    file = (Path(base) / Path(value).expanduser()).resolve()
    if not file.is_file():
        raise StudyConfigError(
            path, f"no file at {file}. Give a file written by surgery.files.saving.save_blocks (or SteeringVector.save), "
            "relative to the study's TOML file or absolute"
        )
    return str(file), hashlib.sha256(file.read_bytes()).hexdigest()


def _saved_block(path: str, source: str, name: str, shape: ModelShape | None, model_name: str) -> Block:
    """The one block of type ``name`` in ``source``, checked against the model's shape."""
    try:
        document, _ = storage.read(source, FORMAT, VERSION)
        blocks = load_blocks(source)
    except (OSError, ValueError) as error:
        raise StudyConfigError(path, f"{error}") from None
    matching = [block for block in blocks if block.name == name]
    if len(matching) != 1:
        raise StudyConfigError(
            path, f"{source} holds {[b.name for b in blocks]}: expected exactly one {name}. Save that block alone "
            "(save_blocks(path, [block], model)) and point to that file"
        )
    block = matching[0]
    facts = document.get("model") or getattr(block.config, "metadata", None) or {}
    if shape is not None and block.tensors():
        ours = {"architecture": shape.architecture, "d_model": shape.d_model}
        if any(key in facts and facts[key] != value for key, value in ours.items()):
            made_for = facts.get("name") or facts.get("model") or "another model"
            raise StudyConfigError(
                path, f"{source} holds a {name} made for {made_for} ({facts.get('architecture', '?')}, "
                f"d_model={facts.get('d_model', '?')}), and the study's model {model_name} is {shape.architecture} with "
                f"d_model={shape.d_model}. Extract it again for {model_name} (e.g. SteeringVector.from_thoughts(model, "
                "traces, layer=...).save(path)) and point `from` to the new file"
            )
    return block


def _construct(path: str, name: str, config: dict, tensors: dict, has_source: bool) -> Block:
    """Build the block on the CPU, so that what its constructor refuses is refused now."""
    try:
        return Block.from_dict({"block": name, "config": config}, tensors)
    except (KeyError, TypeError) as error:
        error = f"missing {error.args[0]!r}" if isinstance(error, KeyError) else error
        if not has_source:
            raise StudyConfigError(
                path, f"{name} could not be built from these keys ({error}). A block with tensors (a steering vector) "
                'needs them from a file: from = "file.safetensors", written by surgery.files.saving.save_blocks or '
                "SteeringVector.save"
            ) from None
        raise StudyConfigError(path, f"{name} could not be built from these keys: {error}") from None
    except ValueError as error:
        raise StudyConfigError(path, f"{name} refuses these settings: {error}") from None


def _check_range(path: str, block: Block, given: dict, shape: ModelShape, model_name: str) -> None:
    """Every site and ``layer`` of the block fits the model's depth."""
    try:
        sites = [Site.parse(site) for site in block.sites()]
    except ValueError:  # a site chosen when the model is bound (ReasoningGraph's default)
        sites = []
    layer = getattr(block.config, "layer", None)
    if isinstance(layer, int) and not isinstance(layer, bool):
        sites.insert(0, Site("resid_pre", layer, written=f"layer {layer}"))  # named as given, before the sites it implies
    n = shape.n_layers
    for site in sites:
        if site.layer is not None and not -n <= site.layer < n:
            key = next((k for k, v in given.items() if v == str(site) or (k == "layer" and v == site.layer)), None)
            raise StudyConfigError(
                field_path(path, key) if key else path,
                f"{site} is out of range: {model_name} has {n} blocks, so the block index must be in 0..{n - 1} "
                f"(or {-n}..-1 from the end)",
            )
