"""RepresentationRecycling: the cached re-run against a slow, obvious full-sequence reference."""

import json

import pytest
import torch
from conftest import PROMPTS, frequent_words

import surgery
from interventions import RepresentationRecycling
from interventions.recycling import coin


def reference_tokens(model, prompt, generated, layer, recycled):
    """The reference's greedy token at every generated position (see :func:`reference_logits`)."""
    return reference_logits(model, prompt, generated, layer, recycled).argmax(-1).tolist()


def reference_logits(model, prompt, generated, layer, recycled):
    """Full sequence, no cache: before block ``layer`` runs, each recycled position (in order)
    gets the block's own output there as its input, so the block is applied twice at it.
    Returns the logits that predict each generated token, ``[n_generated, vocab]``."""
    ids, _ = surgery.encode_prompts(model, [prompt], chat=True)
    full = torch.tensor([ids[0].tolist() + generated])
    block = model.architecture.block_list(model.module)[layer]

    def double(module, args, kwargs):
        hidden = args[0].clone()
        for position in sorted(recycled):
            once = module.forward(hidden, *args[1:], **kwargs)
            once = once[0] if isinstance(once, tuple) else once
            hidden[:, position] = once[:, position]
        return (hidden, *args[1:]), kwargs

    handle = block.register_forward_pre_hook(double, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model.module(input_ids=full, use_cache=False).logits[0]
    finally:
        handle.remove()
    return logits[ids.shape[1] - 1 : -1]


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_matches_the_full_sequence_reference_token_for_token(tiny, layer):
    words = frequent_words(tiny)
    recycled_any = False
    for prompt in PROMPTS:
        rr = RepresentationRecycling(layer=layer, trigger_words=words)
        with surgery.trace(tiny, rr) as tr:
            out = tr.generate([prompt], 20, chat=True)
        fired = rr.fired()[0]
        recycled_any |= bool(fired)
        assert out.token_ids[0] == reference_tokens(tiny, prompt, out.token_ids[0], layer % tiny.n_layers, fired)
    assert recycled_any


def test_the_first_token_can_be_recycled_and_is_recorded(tiny):
    texts = tiny.vocabulary_texts
    firsts = surgery.generate(tiny, PROMPTS, 1, chat=True).token_ids
    prompt, first = next((p, ids[0]) for p, ids in zip(PROMPTS, firsts) if texts[ids[0]].strip())
    word = texts[first].strip()
    rr = RepresentationRecycling(layer=1, trigger_words=(word,))
    with surgery.trace(tiny, rr) as tr:
        out = tr.generate([prompt], 8, chat=True)
    prompt_length = out.prompt_lengths[0]
    assert rr.fired()[0][0] == prompt_length - 1  # the prefill's last position
    assert out.token_ids[0] == reference_tokens(tiny, prompt, out.token_ids[0], 1, rr.fired()[0])


def test_recycling_changes_tokens_and_rows_match_alone(tiny):
    words = frequent_words(tiny)

    def go(prompts, **options):
        rr = RepresentationRecycling(layer=1, trigger_words=words, **options)
        with surgery.trace(tiny, rr) as tr:
            out = tr.generate(prompts, 20, chat=True)
        return out.token_ids, rr.fired()

    tokens, fired = go(PROMPTS)
    assert tokens != surgery.generate(tiny, PROMPTS, 20, chat=True).token_ids
    for i, prompt in enumerate(PROMPTS):
        alone, alone_fired = go([prompt])
        assert alone[0] == tokens[i] and alone_fired[0] == fired[i]
    half, half_fired = go(PROMPTS, probability=0.5, seed=3)
    assert sum(map(len, half_fired)) < sum(map(len, fired)) or half != tokens
    for i, prompt in enumerate(PROMPTS):  # the coin is per row, not per batch
        alone, alone_fired = go([prompt], probability=0.5, seed=3)
        assert alone[0] == half[i] and alone_fired[0] == half_fired[i]


def test_coin_is_uniform_and_seeded():
    keys = torch.arange(2000) * 7919
    positions = torch.arange(2000) % 97
    u = coin(0, keys, positions)
    assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0 and float(u.max()) < 1
    assert torch.equal(u, coin(0, keys, positions)) and not torch.equal(u, coin(1, keys, positions))


def test_triggers_that_never_come_up_change_nothing(tiny):
    plain = surgery.generate(tiny, PROMPTS, 16, chat=True)
    texts = tiny.vocabulary_texts
    emitted = {texts[t].strip() for ids in plain.token_ids for t in ids}
    unused = tuple(w for w in ("Wait", "Hmm", "So", "Let", "First") if w in {t.strip() for t in texts} and w not in emitted)
    assert unused
    rr = RepresentationRecycling(layer=0, trigger_words=unused)
    with surgery.trace(tiny, rr) as tr:
        assert tr.generate(PROMPTS, 16, chat=True).token_ids == plain.token_ids
    assert rr.fired() == [[]] * len(PROMPTS)


def test_bad_settings_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        with surgery.trace(tiny_llama, RepresentationRecycling(layer=4, trigger_words=("Wait",))):
            pass
    with pytest.raises(ValueError, match="cannot encode the trigger words"):
        with surgery.trace(tiny_llama, RepresentationRecycling(layer=0, trigger_words=("Supercalifragilistic",))):
            pass
    for probability in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability must be in"):
            RepresentationRecycling(layer=0, probability=probability)
    with pytest.raises(ValueError, match="non-empty trigger words"):
        RepresentationRecycling(layer=0, trigger_words=())


def test_probes_see_each_recycled_position_once(tiny):
    from probes import RecordSite

    rr = RepresentationRecycling(layer=1, trigger_words=frequent_words(tiny))
    record = RecordSite("resid_post.0")
    with surgery.trace(tiny, rr, record) as tr:
        out = tr.generate(PROMPTS, 16, chat=True)
    assert sum(map(len, rr.fired())) > 0
    found = record.result()
    pairs = list(zip(found.rows.tolist(), found.positions.tolist()))
    assert len(pairs) == len(set(pairs))  # no position recorded twice
    assert len(pairs) == sum(out.prompt_lengths) + sum(n - 1 for n in out.lengths)


# ---- the released coin and trigger ids (ChnQ/MI-Peaks RR_model.py, RR_evaluate.py) ---------------------------

class CountingRandom:
    """Python's ``random.Random`` that counts its draws."""

    def __init__(self, seed):
        import random

        self.stream, self.draws = random.Random(seed), 0

    def random(self):
        self.draws += 1
        return self.stream.random()


def released_rr_reference(model, prompts, layer, trigger_ids, n, eos, rng, probability=0.5, slots=1):
    """The released RR loop, transcribed in our words, on the HF model (``slots=1``: one prompt
    at a time, the released order).

    Per step: a forward on the fed tokens with the cache, block ``layer``'s output kept; the
    argmax is the candidate; an EOS candidate ends the row (no draw); a trigger candidate draws
    ``rng.random() < probability`` (only then: the ``and`` short-circuits) and, when it wins,
    the step is run again from the cache as it was before it, with block ``layer``'s input at
    the last position replaced by the output kept, and the new argmax is emitted (the recycled
    cache is kept). ``slots``: how many rows run at once, taking turns step by step in slot order
    (the order our batch draws in); when rows end, the next prompts take their slots, lowest
    slot first, and start at the next step (continuous batching's order; ``slots=len(prompts)``:
    a fixed batch in lockstep). Returns per row (tokens, the EOS left out; recycled position ids).
    """
    from transformers import DynamicCache

    block = model.architecture.block_list(model.module)[layer]
    state = {"keep": True, "swap": False, "kept": None}

    def keep_output(module, args, output):
        if state["keep"]:
            state["kept"] = (output[0] if isinstance(output, tuple) else output).clone()

    def swap_input(module, args, kwargs):
        if not state["swap"]:
            return None
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, -1:] = state["kept"][:, -1:]
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    rows = []
    for prompt in prompts:
        ids, _ = surgery.encode_prompts(model, [prompt], chat=True)
        rows.append({"fed": ids, "cache": DynamicCache(), "tokens": [], "recycled": [], "done": False,
                     "position": ids.shape[1] - 1})

    def step(row):
        before = row["cache"].get_seq_length()
        logits = model.module(input_ids=row["fed"], past_key_values=row["cache"], use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        if token in eos:
            row["done"] = True
            return
        if token in trigger_ids and rng.random() < probability:
            # the cache as it was before this step (transformers 4.46 handed the released code a copy)
            row["cache"].crop(before - row["cache"].get_seq_length())
            state["keep"], state["swap"] = False, True
            try:
                logits = model.module(input_ids=row["fed"], past_key_values=row["cache"], use_cache=True).logits[0, -1]
            finally:
                state["keep"], state["swap"] = True, False
            token = int(logits.argmax())
            row["recycled"].append(row["position"])
        row["tokens"].append(token)
        row["fed"] = torch.tensor([[token]])
        row["position"] += 1
        row["done"] = len(row["tokens"]) == n

    handles = [block.register_forward_hook(keep_output), block.register_forward_pre_hook(swap_input, with_kwargs=True)]
    try:
        with torch.no_grad():
            waiting = list(rows)
            live = [waiting.pop(0) if waiting else None for _ in range(slots)]
            while any(row is not None for row in live):
                for row in live:
                    if row is not None:
                        step(row)
                for slot, row in enumerate(live):
                    if row is not None and row["done"]:
                        live[slot] = waiting.pop(0) if waiting else None
    finally:
        for handle in handles:
            handle.remove()
    return [(row["tokens"], row["recycled"]) for row in rows]


def assert_rows_equal(out, fired, expected, eos):
    for i, (tokens, recycled) in enumerate(expected):
        ours = out.token_ids[i]
        assert ours == (tokens + [ours[-1]] if out.stop_reasons[i] == "eos" else tokens), i
        assert out.stop_reasons[i] != "eos" or ours[-1] in eos
        assert fired[i] == recycled, i


def released_setup(model):
    from interventions.recycling_triggers import trigger_ids_for_words

    ids = trigger_ids_for_words(model, frequent_words(model, 6))
    plain = surgery.generate(model, PROMPTS, 16, chat=True).token_ids
    eos = [next(t for t in plain[1][2:] if t not in plain[0] and t not in ids)]  # ends some rows early, not all
    return ids, eos


def test_released_coin_one_prompt_at_a_time_equals_the_released_loop(tiny):
    ids, eos = released_setup(tiny)
    rr = RepresentationRecycling(layer=1, trigger_ids=ids, probability=0.5, coin="released", seed=0)
    outs, fired = [], []
    for prompt in PROMPTS:  # one block, the prompts in order: the stream goes on across runs
        with surgery.trace(tiny, rr) as tr:
            outs.append(tr.generate([prompt], 16, chat=True, eos_token_ids=eos))
        fired.append(rr.fired()[0])
    rng = CountingRandom(0)
    expected = released_rr_reference(tiny, PROMPTS, 1, set(ids), 16, eos, rng)
    for out, row_fired, row in zip(outs, fired, expected):
        assert_rows_equal(out, [row_fired], [row], eos)
    assert rr.coin_draws == rng.draws > sum(map(len, fired)) > 0  # some triggers drew and lost
    assert any(o.stop_reasons[0] == "eos" for o in outs)
    rr.restart_coin(3)  # going on from 3 draws: the stream a fresh process would have after them
    twin = CountingRandom(0)
    [twin.random() for _ in range(3)]
    assert rr._stream.random() == twin.random() and rr.coin_draws == 3


def test_released_coin_in_a_batch_draws_step_by_step_in_row_order(tiny):
    ids, eos = released_setup(tiny)
    prompts = [*PROMPTS, *PROMPTS]  # twins draw at the same steps, so the order within a step shows
    rr = RepresentationRecycling(layer=-1, trigger_ids=ids, probability=0.5, coin="released", seed=1)
    with surgery.trace(tiny, rr) as tr:
        out = tr.generate(prompts, 16, chat=True, eos_token_ids=eos)
    rng = CountingRandom(1)
    expected = released_rr_reference(tiny, prompts, tiny.n_layers - 1, set(ids), 16, eos, rng, slots=len(prompts))
    assert_rows_equal(out, rr.fired(), expected, eos)
    assert rr.coin_draws == rng.draws > sum(map(len, rr.fired())) > 0
    assert len(set(out.lengths)) > 1  # rows end at different steps: finished rows draw no more
    assert any(rr.fired()[i] != rr.fired()[i + len(PROMPTS)] for i in range(len(PROMPTS)))  # twins drew apart


def test_released_coin_that_always_wins_is_the_plain_rule(tiny_llama):
    ids, eos = released_setup(tiny_llama)

    def go(**options):
        rr = RepresentationRecycling(layer=1, trigger_ids=ids, **options)
        with surgery.trace(tiny_llama, rr) as tr:
            return tr.generate(PROMPTS, 12, chat=True, eos_token_ids=eos).token_ids, rr.fired()

    plain = go()
    assert go(coin="released", probability=1.0) == plain and sum(map(len, plain[1])) > 0
    words = RepresentationRecycling(layer=1, trigger_words=frequent_words(tiny_llama, 6))
    with surgery.trace(tiny_llama, words) as tr:  # the ids of the words are the words' rule
        assert tr.generate(PROMPTS, 12, chat=True, eos_token_ids=eos).token_ids == plain[0]


def test_released_options_round_trip_and_refuse_bad_input(tiny_llama):
    from surgery.blocks import Block
    from surgery.triggers import Always

    rr = RepresentationRecycling(layer=0, trigger_ids=[7, 3, 7], coin="released", probability=0.5)
    assert rr.config.trigger_ids == (3, 7)
    again = Block.from_dict(json.loads(json.dumps(rr.to_dict())))
    assert again.config == rr.config
    with pytest.raises(ValueError, match="coin must be one of"):
        RepresentationRecycling(layer=0, coin="python")
    for ids in ([], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="trigger_ids must be"):
            RepresentationRecycling(layer=0, trigger_ids=ids)
    with pytest.raises(ValueError, match="not both"):
        RepresentationRecycling(layer=0, trigger_ids=[3], when=Always())
    with pytest.raises(ValueError, match="seed must be an integer"):
        RepresentationRecycling(layer=0, seed=True)
    with pytest.raises(ValueError, match="draws must be"):
        rr.restart_coin(-1)
    with pytest.raises(ValueError, match="another tokenizer"):
        with surgery.trace(tiny_llama, RepresentationRecycling(layer=0, trigger_ids=[14144])):
            pass


# ---- continuous batching (generate(..., batch_size=N)): the row lifecycle -------------------------------------

def test_in_slots_each_prompt_gets_its_alone_tokens_and_fired_positions_with_partial_reruns(tiny, monkeypatch):
    """The hash coin is per prompt: admitted mid-run into a freed slot, a prompt recycles and
    emits what it does alone. One-token prompts are admitted too: their prefill records
    one-position block inputs for the admitted row only, which the engine must not re-run the
    pool from (LayerInputs.forget: the first recompute after an admission is a full one)."""
    from surgery.decode.partial_rerun import LayerInputs
    from surgery.triggers import Always

    partial = []
    rerun = LayerInputs.rerun
    monkeypatch.setattr(LayerInputs, "rerun", lambda self, start: partial.append(start) or rerun(self, start))
    prompts = [PROMPTS[0], "Wait", PROMPTS[3], "So", PROMPTS[1], "Wait"]
    budgets = [5, 12, 9, 7, 10, 6]

    def go(prompts, budgets, rr=None, **options):
        rr = rr or RepresentationRecycling(layer=1, when=Always(), probability=0.5, seed=3)  # fires often
        with surgery.trace(tiny, rr) as tr:
            out = tr.generate(prompts, budgets, **options)
        return out, rr

    out, rr = go(prompts, budgets, batch_size=2)
    assert len(partial) > 0 and rr.reruns() > len(partial)  # partial re-runs, and full ones after admissions
    assert out.timings["steps"] < sum(budgets)  # slots were shared
    fired = rr.fired()
    assert len(fired) == len(prompts) and sum(map(len, fired)) > 0
    for i, prompt in enumerate(prompts):
        alone, alone_rr = go([prompt], budgets[i])
        assert alone.token_ids[0] == out.token_ids[i] and alone.stop_reasons[0] == out.stop_reasons[i], i
        assert alone_rr.fired()[0] == fired[i] == alone_rr.by_row()[0], i
    again, _ = go(prompts, 8, rr)  # the same block in a fixed batch afterwards: as a fresh block
    fresh, fresh_rr = go(prompts, 8)
    assert again.token_ids == fresh.token_ids and rr.fired() == fresh_rr.fired() and rr.reruns() == fresh_rr.reruns()


def test_in_slots_the_hash_coin_reads_each_admitted_prompt(tiny):
    """The word rule with the coin, chat prompts, a repeated prompt: each prompt's tokens and
    recycled positions equal its run alone, and differ from a pool run without the coin."""
    words = frequent_words(tiny)
    prompts, budgets = [*PROMPTS, PROMPTS[1]], [6, 20, 9, 14, 11]

    def go(prompts, budgets, probability, **options):
        rr = RepresentationRecycling(layer=-1, trigger_words=words, probability=probability, seed=5)
        with surgery.trace(tiny, rr) as tr:
            return tr.generate(prompts, budgets, chat=True, **options).token_ids, rr.fired()

    tokens, fired = go(prompts, budgets, 0.5, batch_size=2)
    assert sum(map(len, fired)) > 0 and fired != go(prompts, budgets, 1.0, batch_size=2)[1]
    for i, prompt in enumerate(prompts):
        assert go([prompt], budgets[i], 0.5) == ([tokens[i]], [fired[i]]), i


def test_released_coin_in_slots_draws_pool_step_by_step_in_slot_order(tiny):
    """The released stream is the run's: under continuous batching each pool step draws for its
    candidates in slot order (the docstring's rule), and batch_size=1 is the released order."""
    ids, eos = released_setup(tiny)
    for slots, prompts in ((2, [*PROMPTS, *PROMPTS]), (1, PROMPTS)):
        rr = RepresentationRecycling(layer=1, trigger_ids=ids, probability=0.5, coin="released", seed=2)
        with surgery.trace(tiny, rr) as tr:
            out = tr.generate(prompts, 16, chat=True, eos_token_ids=eos, batch_size=slots)
        rng = CountingRandom(2)
        expected = released_rr_reference(tiny, prompts, 1, set(ids), 16, eos, rng, slots=slots)
        assert_rows_equal(out, rr.fired(), expected, eos)
        assert rr.coin_draws == rng.draws > sum(map(len, rr.fired())) > 0
        assert len(set(out.lengths)) > 1  # rows end at different steps: slots are taken mid-run
