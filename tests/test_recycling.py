"""RepresentationRecycling: the cached re-run against a slow, obvious full-sequence reference."""

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
