"""Continuous batching (``generate(..., batch_size=N)``): every prompt as it is alone.

The reference is each prompt run alone through the fixed-batch engine (itself tested against HF
``generate``). Prompts differ in length and budget, so rows finish at different steps and later
prompts are admitted into freed slots mid-run, on both tiny architectures, greedy and sampled,
with the dynamic and the static cache.
"""

import pytest
from conftest import PROMPTS

import surgery
from surgery.decode.slot_forward import SlotForward

LONG = "A longer prompt: the train leaves at noon and the apples cost 3 each."
MIXED = [*PROMPTS, LONG, "x", PROMPTS[0]]  # a repeated prompt too (its sampling key: second copy)
BUDGETS = [5, 20, 9, 14, 12, 3, 7]


def stop_id(model) -> int:
    """A token some rows emit early, so rows stop on EOS at different steps."""
    return surgery.generate(model, PROMPTS, 12, chat=True).token_ids[1][4]


def alone(model, prompts, budgets, **options):
    """Each prompt alone; sampled rows keep the key they have among all the prompts."""
    keys = surgery.decode.sampling.row_keys_for(*surgery.encode_prompts(model, prompts, chat=options.get("chat", False)))
    outs = []
    for i, prompt in enumerate(prompts):
        extra = {"row_keys": [keys[i]]} if options.get("do_sample") else {}
        outs.append(surgery.generate(model, [prompt], budgets[i], **options, **extra))
    return outs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_each_prompt_gets_its_alone_tokens_and_stop_reason(tiny, cache, do_sample):
    options = dict(chat=True, cache=cache, do_sample=do_sample, seed=3, temperature=0.9, eos_token_ids=[stop_id(tiny)])
    pooled = surgery.generate(tiny, MIXED, BUDGETS, batch_size=3, **options)
    for i, single in enumerate(alone(tiny, MIXED, BUDGETS, **options)):
        assert pooled.token_ids[i] == single.token_ids[0], f"prompt {i}"
        assert pooled.stop_reasons[i] == single.stop_reasons[0]
        assert pooled.texts[i] == single.texts[0] and pooled.prompt_lengths[i] == single.prompt_lengths[0]
    assert pooled.lengths == [len(t) for t in pooled.token_ids]
    if not do_sample:
        assert "eos" in pooled.stop_reasons and "length" in pooled.stop_reasons
    assert pooled.timings["steps"] < sum(BUDGETS)  # slots were reused, not run one after another


def test_one_budget_for_all_and_as_many_slots_as_prompts_equal_the_fixed_batch(tiny_llama):
    eos = [stop_id(tiny_llama)]
    fixed = surgery.generate(tiny_llama, PROMPTS, 16, chat=True, eos_token_ids=eos)
    for slots in (1, 2, 4, 8):
        pooled = surgery.generate(tiny_llama, PROMPTS, 16, chat=True, eos_token_ids=eos, batch_size=slots)
        assert pooled.token_ids == fixed.token_ids and pooled.stop_reasons == fixed.stop_reasons


def test_a_budget_list_without_batch_size_runs_every_prompt_in_one_pool(tiny_llama):
    out = surgery.generate(tiny_llama, PROMPTS, [3, 1, 4, 2])
    assert out.lengths == [3, 1, 4, 2] and out.stop_reasons == ["length"] * 4


def test_stop_strings_follow_each_row(tiny_llama):
    text = surgery.generate(tiny_llama, PROMPTS, 12, chat=True).texts[3]
    stop = text[4:6]  # occurs in one row's text, maybe others'
    pooled = surgery.generate(tiny_llama, [*PROMPTS, PROMPTS[3]], [12, 6, 12, 12, 12], chat=True, stop_strings=[stop], batch_size=2)
    for i, single in enumerate(alone(tiny_llama, [*PROMPTS, PROMPTS[3]], [12, 6, 12, 12, 12], chat=True, stop_strings=[stop])):
        assert pooled.token_ids[i] == single.token_ids[0] and pooled.stop_reasons[i] == single.stop_reasons[0]
    assert "stop_string" in pooled.stop_reasons


def test_the_cache_stays_within_the_slots_and_its_bound(tiny_llama, monkeypatch):
    """200 prompts through 4 slots: the KV cache never has more than 4 rows nor more columns than
    the longest prompt plus its budget."""
    prompts = [f"Question {i}: what is {i} + {i % 7}?" for i in range(200)]
    budgets = [2 + i % 5 for i in range(200)]
    shapes = []
    feed = SlotForward.feed

    def watch(self, *args):
        shapes.append((tuple(self.cache.layers[0].keys.shape), self.columns, self.bound))
        return feed(self, *args)

    monkeypatch.setattr(SlotForward, "feed", watch)
    out = surgery.generate(tiny_llama, prompts, budgets, batch_size=4)
    assert out.lengths == budgets
    assert {shape[0] for shape, _, _ in shapes} == {4}
    assert max(columns for _, columns, _ in shapes) <= shapes[0][2]
    assert max(shape[2] for shape, _, _ in shapes) <= shapes[0][2]
    assert shapes[0][2] == max(len(surgery.encode_prompts(tiny_llama, [p])[0][0]) + b for p, b in zip(prompts, budgets))


def test_a_dynamic_pool_keeps_only_the_columns_its_live_rows_span(tiny_llama, monkeypatch):
    """Rows of very different lengths through 3 slots: at every feed the cache's first column is
    a live row's first (no leading column only finished rows needed), and the cache is exactly as
    wide as its longest-lived row (prompt plus tokens so far) needs."""
    prompts = [f"Question {i}: what is {i} + {i % 7}?" + " and more" * (i % 4) for i in range(24)]
    budgets = [3 + (7 * i) % 29 for i in range(24)]
    spans = []
    feed = SlotForward.feed

    def watch(self, *args):
        live = [start for start in self.starts if start is not None]
        spans.append((min(live), self.columns, self.cache.layers[0].keys.shape[2]))
        return feed(self, *args)

    monkeypatch.setattr(SlotForward, "feed", watch)
    pooled = surgery.generate(tiny_llama, prompts, budgets, batch_size=3)
    assert spans and all(first == 0 and columns == width for first, columns, width in spans)
    assert max(columns for _, columns, _ in spans) < spans[0][1] + max(budgets)  # never grows without end
    for i, single in enumerate(alone(tiny_llama, prompts[:6], budgets[:6])):
        assert pooled.token_ids[i] == single.token_ids[0]


def test_a_static_pool_compacts_in_place(tiny_llama, monkeypatch):
    """With a static cache, admissions and compaction move no buffer: the addresses a compiled
    step captured stay valid."""
    addresses = set()
    feed = SlotForward.feed

    def watch(self, *args):
        addresses.add((self.cache.layers[0].keys.data_ptr(), self.mask.data_ptr()))
        return feed(self, *args)

    monkeypatch.setattr(SlotForward, "feed", watch)
    prompts = [f"Q{i}: {'so ' * (i % 6)}go" for i in range(24)]
    budgets = [3 + (5 * i) % 11 for i in range(24)]
    pooled = surgery.generate(tiny_llama, prompts, budgets, batch_size=3, cache="static")
    assert len(addresses) == 1
    for i, single in enumerate(alone(tiny_llama, prompts, budgets, cache="static")):
        assert pooled.token_ids[i] == single.token_ids[0]


def test_bad_batch_sizes_and_budgets_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        surgery.generate(tiny_llama, PROMPTS, 4, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        surgery.generate(tiny_llama, PROMPTS, 4, batch_size=True)
    with pytest.raises(ValueError, match="one budget per prompt"):
        surgery.generate(tiny_llama, PROMPTS, [4, 4], batch_size=2)
    with pytest.raises(ValueError, match="positive integers"):
        surgery.generate(tiny_llama, PROMPTS, [4, 0, 4, 4], batch_size=2)
    with pytest.raises(ValueError, match="context"):
        surgery.generate(tiny_llama, PROMPTS, [4, 4, 4, 400], batch_size=2)


def test_a_block_without_the_row_lifecycle_is_refused_by_name(tiny_llama):
    from surgery.blocks import Intervention

    class Forgetful(Intervention):
        config_class, config = None, None

        def sites(self):
            return ("resid_pre.0",)

        def edit(self, site, value, step):
            return value

    with surgery.trace(tiny_llama, Forgetful()) as tr:
        with pytest.raises(ValueError, match="Forgetful do.* not implement admit/retire"):
            tr.generate(PROMPTS, 4, batch_size=2)
        assert tr.generate(PROMPTS, 4).lengths == [4] * 4  # without batch_size it runs as before


def test_an_interrupted_run_leaves_the_model_clean(tiny_llama):
    calls = []

    def stop_after_a_few(step):
        calls.append(step)
        if len(calls) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surgery.generate(tiny_llama, PROMPTS * 3, 8, batch_size=2, on_step=stop_after_a_few)
    assert calls[-1] is None  # told the run ended
    again = surgery.generate(tiny_llama, PROMPTS, 8, batch_size=2)
    assert again.token_ids == surgery.generate(tiny_llama, PROMPTS, 8).token_ids


def test_each_row_counts_its_own_steps(tiny_llama):
    seen = []
    surgery.generate(tiny_llama, PROMPTS, [2, 5, 3, 4], batch_size=2,
                     on_choose=lambda choice: seen.append((choice.index, choice.indices.tolist())))
    assert seen[0] == (0, [0, 0])
    assert [index for index, _ in seen] == list(range(len(seen)))
    assert any(indices[0] != indices[1] for _, indices in seen)  # rows admitted at different steps
    assert any(0 in indices for _, indices in seen[1:])  # an admitted row starts at its own 0


def test_each_row_is_handed_over_as_it_finishes_with_its_time_in_a_slot(tiny_llama):
    rows = []
    out = surgery.generate(tiny_llama, MIXED, BUDGETS, chat=True, batch_size=3, on_row=rows.append)
    assert [row.row for row in rows] != sorted(row.row for row in rows)  # in the order they finished
    assert sorted(row.row for row in rows) == list(range(len(MIXED)))
    for row in rows:
        assert (row.token_ids, row.text, row.stop_reason) == (out.token_ids[row.row], out.texts[row.row],
                                                              out.stop_reasons[row.row])
        assert 0 < row.seconds <= out.timings["total_s"]
    assert sum(row.seconds for row in rows) / 3 <= out.timings["total_s"]  # slot time shared between 3 slots
