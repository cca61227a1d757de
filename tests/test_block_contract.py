"""The contract every registered block passes, on the tiny Llama and Qwen2 models.

The blocks come from the registry (after importing interventions and probes), so a block
registered anywhere is checked as soon as its module is imported; each offers
``Block.example(model, prompts, identity)``. The checks:

1. ``to_dict`` -> JSON -> ``from_dict`` (with its tensors), and ``save_blocks`` -> ``load_blocks``,
   give an equal block.
2. Identity settings give tokens identical to no block; a probe never changes tokens.
3. Every row of a batch behaves as it would alone: same tokens and same ``by_row()`` entry.
   Also under continuous batching (``batch_size=2`` over prompts of different lengths and
   budgets, so rows are admitted into freed slots mid-run): the row lifecycle
   (``admit``/``retire``) leaks nothing from one row into the next in its slot; and with rows
   that carry the block sharing slots with rows that do not (a stack per row), each row gets
   what it gets alone under its own stack; and with prompts that join the running pool
   (``late_rows``: a server's requests arriving while it decodes) into a slot that started empty.
4. Hooks are gone, and the model computes exactly what it did, after an exception in the body.

The last tests plant a bug of each kind in a throwaway block and show the check catches it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import PROMPTS, all_hooks, logits_of
from tolerance import assert_close

import interventions  # noqa: F401  (registers the shipped blocks)
import probes  # noqa: F401
import surgery
from surgery.blocks import Block, Intervention, Probe, register_block, registered_blocks
from surgery.decode.late_rows import LateRow, LateRows
from surgery.files.saving import load_blocks, save_blocks
from surgery.triggers import Always, Trigger

NEW_TOKENS = 20


def contract_blocks() -> list[str]:
    return sorted(registered_blocks())


def stop_token(model) -> int:
    """An id that stops some rows early but not all, so rows finish at different steps."""
    return surgery.generate(model, PROMPTS, 12, chat=True).token_ids[1][4]


def run(model, blocks, prompts, eos):
    with surgery.trace(model, *blocks) as tr:
        return tr.generate(prompts, NEW_TOKENS, chat=True, eos_token_ids=[eos])


def same_block(a: Block, b: Block) -> None:
    assert type(a) is type(b)
    assert a.config == b.config and a.to_dict() == b.to_dict()
    ours, theirs = a.tensors(), b.tensors()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name].cpu(), theirs[name].cpu()), name


def check_round_trip(model, cls, tmp_path) -> None:
    block = cls.example(model, PROMPTS)
    again = Block.from_dict(json.loads(json.dumps(block.to_dict())), block.tensors())
    same_block(again, block)
    path = save_blocks(tmp_path / f"{cls.name}.safetensors", [block, block], model)
    loaded = load_blocks(path, model)
    assert len(loaded) == 2
    for copy in loaded:
        same_block(copy, block)


def check_identity(model, cls) -> None:
    eos = stop_token(model)
    plain = surgery.generate(model, PROMPTS, NEW_TOKENS, chat=True, eos_token_ids=[eos])
    out = run(model, [cls.example(model, PROMPTS, identity=True)], PROMPTS, eos)
    assert out.token_ids == plain.token_ids and out.stop_reasons == plain.stop_reasons
    if issubclass(cls, Probe):  # also in a single forward: the logits are untouched
        with surgery.trace(model, cls.example(model, PROMPTS)) as tr:
            logits = tr.run(PROMPTS, chat=True)
        assert torch.equal(logits, surgery.run(model, PROMPTS, chat=True))


def check_rows_alone(model, cls) -> None:
    eos = stop_token(model)
    batched = cls.example(model, PROMPTS)
    out = run(model, [batched], PROMPTS, eos)
    rows = batched.by_row()
    for i, prompt in enumerate(PROMPTS):
        alone = cls.example(model, [prompt])
        alone_out = run(model, [alone], [prompt], eos)
        assert alone_out.token_ids[0] == out.token_ids[i], f"row {i}: tokens differ alone and batched"
        assert alone_out.stop_reasons[0] == out.stop_reasons[i]
        if rows is not None:
            # float32 hidden states, padded batch against a single row
            assert_close(alone.by_row()[0], rows[i], precision=torch.float32, path=f"{cls.name}.by_row()[{i}]")


#: Budgets that end rows at different steps, so later prompts take freed slots mid-run.
BUDGETS = [6, 20, 9, 14]


def check_rows_alone_in_slots(model, cls) -> None:
    eos = stop_token(model)
    prompts = [*PROMPTS, PROMPTS[1]]  # a repeated prompt, too
    budgets = [*BUDGETS, 11]
    pooled = cls.example(model, prompts)
    finished, early = [], {}

    def on_row(row):  # read the moment the row leaves its slot, other rows still running
        finished.append(row)
        early[row.row] = pooled.by_row(rows=[row.row])

    with surgery.trace(model, pooled) as tr:
        out = tr.generate(prompts, budgets, chat=True, eos_token_ids=[eos], batch_size=2, on_row=on_row)
    rows = pooled.by_row()
    assert out.timings["steps"] < sum(budgets)  # slots really were shared
    assert sorted(row.row for row in finished) == list(range(len(prompts)))
    for row in finished:
        assert (row.token_ids, row.text, row.stop_reason) == (out.token_ids[row.row], out.texts[row.row],
                                                              out.stop_reasons[row.row])
        if rows is not None:  # an entry read at retirement is the entry read after the run
            assert_close(early[row.row], [rows[row.row]], precision=torch.float32, path=f"{cls.name}.by_row(rows=[{row.row}])")
    for i, prompt in enumerate(prompts):
        alone = cls.example(model, [prompt])
        with surgery.trace(model, alone) as tr:
            alone_out = tr.generate([prompt], budgets[i], chat=True, eos_token_ids=[eos])
        assert alone_out.token_ids[0] == out.token_ids[i], f"row {i}: tokens differ alone and in slots"
        assert alone_out.stop_reasons[0] == out.stop_reasons[i]
        if rows is not None:
            assert len(rows) == len(prompts)
            assert_close(alone.by_row()[0], rows[i], precision=torch.float32, path=f"{cls.name}.by_row()[{i}] in slots")


def check_mixed_stacks(model, cls) -> None:
    """Rows with and without the block share the slots: each row as alone under its own stack."""
    eos = stop_token(model)
    prompts, budgets = [*PROMPTS, PROMPTS[1]], [*BUDGETS, 11]
    block = cls.example(model, prompts)
    carries = [True, False, True, False, False]
    with surgery.trace(model, block) as tr:
        out = tr.generate(prompts, budgets, chat=True, eos_token_ids=[eos], batch_size=2,
                          stacks=[[block] if c else [] for c in carries])
    assert_rows_as_alone(model, cls, prompts, budgets, carries, out, block.by_row(), eos, "mixed")


def assert_rows_as_alone(model, cls, prompts, budgets, carries, out, rows, eos, how: str) -> None:
    """Each prompt of ``out`` has the tokens, stop reason and (where it carries the block) the
    ``by_row()`` entry of its run alone, under a fresh example block or none."""
    for i, prompt in enumerate(prompts):
        alone = cls.example(model, [prompt])
        with surgery.trace(model, *([alone] if carries[i] else [])) as tr:
            single = tr.generate([prompt], budgets[i], chat=True, eos_token_ids=[eos])
        assert single.token_ids[0] == out.token_ids[i], f"row {i} ({how}, carries: {carries[i]}): tokens differ"
        assert single.stop_reasons[0] == out.stop_reasons[i]
        if rows is not None and carries[i]:
            assert_close(alone.by_row()[0], rows[i], precision=torch.float32, path=f"{cls.name}.by_row()[{i}] {how}")


def check_late_rows(model, cls) -> None:
    """Prompts that join the running pool (surgery.decode.late_rows), with and without the block,
    into a pool whose second slot starts empty: each row as alone under its own stack."""
    eos = stop_token(model)
    prompts, budgets = [*PROMPTS, PROMPTS[1]], [*BUDGETS, 11]
    block = cls.example(model, prompts)
    carries = [True, True, False, True, False]
    ids = [surgery.encode_prompts(model, [p], chat=True)[0][0].tolist() for p in prompts]
    arriving = [LateRow(ids[i], budgets[i], f"late:{i}", [block] if carries[i] else []) for i in range(1, len(prompts))]
    take = lambda free: [arriving.pop(0) for _ in range(min(free, 1, len(arriving)))]  # noqa: E731 (one per free step)
    with surgery.trace(model, block) as tr:
        out = tr.generate(prompts[:1], budgets[:1], chat=True, eos_token_ids=[eos], batch_size=2, stacks=[[block]],
                          late_rows=LateRows(take, capacity=max(budgets), bound=64))
    assert len(out.token_ids) == len(prompts) and not arriving
    assert_rows_as_alone(model, cls, prompts, budgets, carries, out, block.by_row(), eos, "late")


def check_hooks_gone_after_an_exception(model, cls) -> None:
    before, hooks = logits_of(model), all_hooks(model.module)
    with pytest.raises(KeyboardInterrupt):
        with surgery.trace(model, cls.example(model, PROMPTS)) as tr:
            tr.generate(PROMPTS, 4, chat=True)
            raise KeyboardInterrupt
    assert all_hooks(model.module) == hooks and model._active_trace is None
    assert torch.equal(logits_of(model), before)


CHECKS = [check_round_trip, check_identity, check_rows_alone, check_rows_alone_in_slots, check_mixed_stacks,
          check_late_rows, check_hooks_gone_after_an_exception]


@pytest.mark.parametrize("name", contract_blocks())
def test_contract(tiny, name, tmp_path):
    cls = registered_blocks()[name]
    check_round_trip(tiny, cls, tmp_path)
    check_identity(tiny, cls)
    check_rows_alone(tiny, cls)
    check_rows_alone_in_slots(tiny, cls)
    check_mixed_stacks(tiny, cls)
    check_late_rows(tiny, cls)
    check_hooks_gone_after_an_exception(tiny, cls)


def test_the_contract_covers_every_shipped_block():
    shipped = {
        "residual_add", "steering_vector", "token_mask", "thinking_token_insertion", "representation_recycling",
        "record_site", "mi_estimator", "thought_classifier", "reasoning_graph",
    }
    assert shipped <= set(contract_blocks())


# ---- planted bugs: each check must catch its kind ---------------------------------------------
@dataclass(frozen=True)
class PlantConfig:
    site: str = "resid_pre.1"
    scale: float = 1.0
    when: Trigger = field(default_factory=Always)


class Plant(Intervention):
    """Adds ``scale`` x the reversed state; its ``bug`` breaks one point of the contract."""

    config_class = PlantConfig
    bug = ""

    def __init__(self, site: str = "resid_pre.1", scale: float = 1.0, when: Trigger | None = None):
        self.config = PlantConfig(site, scale, when or Always())

    @classmethod
    def example(cls, model, prompts=(), identity=False):
        return cls(scale=0.0 if identity and cls.bug != "identity" else 2.0)

    def to_dict(self):
        data = super().to_dict()
        if self.bug == "round_trip":
            data["config"].pop("scale")
        return data

    def sites(self):
        return (self.config.site,)

    def bind(self, model):
        if self.bug == "hooks":  # a hook of its own, never removed
            model.module.get_submodule("lm_head").register_forward_hook(lambda *args: None)

    def edit(self, site, value, step):
        if self.bug == "rows":
            return value + self.config.scale * value.mean(dim=0, keepdim=True)
        return value + self.config.scale * value.flip(-1)  # row by row: fine


class PlantProbe(Probe):
    """A probe that edits the value it is shown, in place."""

    config_class = PlantConfig

    def __init__(self, site: str = "resid_pre.1", scale: float = 1.0, when: Trigger | None = None):
        self.config = PlantConfig(site, scale, when or Always())

    @classmethod
    def example(cls, model, prompts=(), identity=False):
        return cls()

    def sites(self):
        return (self.config.site,)

    def observe(self, site, value, step):
        value.mul_(1.5)


@pytest.mark.parametrize(
    "bug, check",
    [("round_trip", check_round_trip), ("identity", check_identity), ("rows", check_rows_alone), ("hooks", check_hooks_gone_after_an_exception)],
)
def test_each_check_catches_a_planted_bug(tokenizer, bug, check, tmp_path, monkeypatch):
    from conftest import tiny_model

    model = tiny_model("llama", tokenizer, seed=1)  # its own copy: the hook plant must not leak
    monkeypatch.setattr("surgery.blocks._REGISTRY", dict(registered_blocks()))
    broken = register_block(f"plant_{bug}")(type(f"Plant_{bug}", (Plant,), {"bug": bug}))
    args = (model, broken, tmp_path) if check is check_round_trip else (model, broken)
    clean = register_block("plant_clean")(type("PlantClean", (Plant,), {}))
    check(*((model, clean, tmp_path) if check is check_round_trip else (model, clean)))  # the clean twin passes
    with pytest.raises(AssertionError):
        check(*args)


def test_a_probe_that_changes_tokens_is_caught(tokenizer, monkeypatch):
    from conftest import tiny_model

    model = tiny_model("llama", tokenizer, seed=1)
    monkeypatch.setattr("surgery.blocks._REGISTRY", dict(registered_blocks()))
    register_block("plant_probe")(PlantProbe)
    assert "plant_probe" in contract_blocks()  # picked up by the contract's parametrisation source
    with pytest.raises(AssertionError):
        check_identity(model, PlantProbe)
