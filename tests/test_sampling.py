"""Sampling per row: the sampler against direct multinomial draws, and a sampled row's tokens
the same alone as anywhere in a batch (also with a token-forcing block attached)."""

import hashlib

import pytest
import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from interventions import ThinkingTokenInsertion
from surgery.decode.sampling import RowSampler, row_keys_for, row_seed, sampling_probs

HOT = {"do_sample": True, "temperature": 3.0}  # near-uniform: two streams agreeing on many tokens is impossible
TARGET, OTHERS = PROMPTS[1], [PROMPTS[0], PROMPTS[2], PROMPTS[3]]  # the others differ in length from it


def reference_seed(seed, key):
    """The hash written out: BLAKE2b-64 of "seed NUL type NUL key", little-endian, top bit dropped."""
    text = f"{seed}\x00{type(key).__name__}\x00{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def reference_probs(logits, temperature, top_p):
    """Nucleus sampling, literally: per row, keep the top tokens until their mass reaches top_p."""
    probs = (logits.double() / temperature).softmax(dim=-1)
    out = torch.zeros_like(probs)
    for i, row in enumerate(probs):
        mass = 0.0
        for token in row.argsort(descending=True).tolist():
            if mass >= top_p:
                break
            out[i, token] = row[token]
            mass += float(row[token])
    return out / out.sum(dim=-1, keepdim=True)


# ---- the sampler alone --------------------------------------------------------------------------
def test_row_seed_is_the_stable_hash_of_seed_and_key():
    for seed, key in [(0, "a"), (3, "a"), (3, 7), (-1, "prompt:5,6#0")]:
        assert row_seed(seed, key) == reference_seed(seed, key)
    assert row_seed(0, 1) != row_seed(0, "1")  # an int key is not its string
    assert 0 <= row_seed(2**40, "x") < 2**63
    with pytest.raises(TypeError, match="1.5"):  # ours, or the runtime type checker's
        row_seed(0, 1.5)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (2.0, 0.3)])
def test_sampling_probs_equal_the_literal_nucleus(temperature, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    assert_close(sampling_probs(logits, temperature, top_p), reference_probs(logits, temperature, top_p).float())


def test_each_row_draws_like_multinomial_on_its_own_generator():
    keys, seed, steps = ["a", 7, "prompt:1,2#0", "b"], 11, 6
    logits = torch.randn(steps, len(keys), 30, generator=torch.Generator().manual_seed(0)) * 2
    sampler = RowSampler(seed, keys, temperature=1.3, top_p=0.8)
    drawn = torch.stack([sampler.sample(logits[k]) for k in range(steps)], dim=1)
    for i, key in enumerate(keys):
        generator = torch.Generator().manual_seed(reference_seed(seed, key))
        expected = [int(torch.multinomial(sampling_probs(logits[k, i : i + 1], 1.3, 0.8), 1, generator=generator))
                    for k in range(steps)]
        assert drawn[i].tolist() == expected
    # the same rows in another order, fewer of them: each row's draws are its own
    alone = RowSampler(seed, [keys[2], keys[0]], temperature=1.3, top_p=0.8)
    again = torch.stack([alone.sample(logits[k, [2, 0]]) for k in range(steps)], dim=1)
    assert again.tolist() == [drawn[2].tolist(), drawn[0].tolist()]


def test_no_seed_draws_one_from_torchs_global_generator():
    logits = torch.zeros(2, 400)
    torch.manual_seed(5)
    a = RowSampler(None, ["a", "b"]).sample(logits)
    torch.manual_seed(5)
    b = RowSampler(None, ["a", "b"]).sample(logits)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="logits have 3 rows"):
        RowSampler(0, ["a", "b"]).sample(torch.zeros(3, 4))


def test_default_keys_are_the_prompt_and_its_copy_number():
    ids = torch.tensor([[0, 5, 6], [5, 6, 7], [0, 5, 6], [0, 5, 6]])
    assert row_keys_for(ids, (ids > 0).long()) == ["prompt:5,6#0", "prompt:5,6,7#0", "prompt:5,6#1", "prompt:5,6#2"]
    assert row_keys_for(ids[:2], (ids[:2] > 0).long(), ["x", 3]) == ["x", 3]


@pytest.mark.parametrize(
    "row_keys, error, message",
    [(["a"], ValueError, "one key per prompt"), ("ab", ValueError, "one key per prompt"),
     (["a", "a"], ValueError, "unique"), (["a", None], TypeError, "strings or ints|'row_keys'"),
     (["a", True], TypeError, "strings or ints|'row_keys'")],
)
def test_bad_row_keys_are_clear_errors(tiny_llama, row_keys, error, message):
    with pytest.raises(error, match=message):
        surgery.generate(tiny_llama, PROMPTS[:2], 2, row_keys=row_keys, **HOT)


# ---- through the engine ---------------------------------------------------------------------------
def test_a_sampled_row_is_the_same_alone_and_at_any_place_in_a_batch(tiny):
    alone = surgery.generate(tiny, [TARGET], 16, chat=True, seed=3, **HOT).token_ids[0]
    for place in range(3):
        batch = OTHERS[:place] + [TARGET] + OTHERS[place:]
        out = surgery.generate(tiny, batch, 16, chat=True, seed=3, **HOT)
        assert len(set(out.prompt_lengths)) == len(batch)  # the target sits among other lengths
        assert out.token_ids[place] == alone, f"row {place}"
    other_seed = surgery.generate(tiny, [TARGET], 16, chat=True, seed=4, **HOT).token_ids[0]
    assert other_seed != alone


def test_rows_finishing_early_do_not_shift_a_rows_draws(tiny_llama):
    free = surgery.generate(tiny_llama, OTHERS, 12, chat=True, seed=3, **HOT)
    eos = free.token_ids[0][1]  # the first other row stops at its second token
    out = surgery.generate(tiny_llama, OTHERS + [TARGET], 12, chat=True, seed=3, eos_token_ids=[eos], **HOT)
    alone = surgery.generate(tiny_llama, [TARGET], 12, chat=True, seed=3, eos_token_ids=[eos], **HOT)
    assert out.stop_reasons[0] == "eos" and out.lengths[0] == 2
    assert out.token_ids[3] == alone.token_ids[0]


def test_an_explicit_key_names_the_stream_wherever_the_row_sits(tiny_llama):
    alone = surgery.generate(tiny_llama, [TARGET], 12, seed=1, row_keys=["a"], **HOT).token_ids[0]
    first = surgery.generate(tiny_llama, [TARGET, OTHERS[0]], 12, seed=1, row_keys=["a", "b"], **HOT)
    last = surgery.generate(tiny_llama, OTHERS + [TARGET], 12, seed=1, row_keys=[0, 1, 2, "a"], **HOT)
    assert first.token_ids[0] == alone == last.token_ids[3]
    renamed = surgery.generate(tiny_llama, [TARGET], 12, seed=1, row_keys=["b"], **HOT).token_ids[0]
    assert renamed != alone


def test_copies_of_one_prompt_differ_and_the_first_is_the_prompt_alone(tiny_llama):
    out = surgery.generate(tiny_llama, [TARGET, OTHERS[0], TARGET], 12, seed=2, **HOT)
    alone = surgery.generate(tiny_llama, [TARGET], 12, seed=2, **HOT).token_ids[0]
    assert out.token_ids[0] == alone != out.token_ids[2]


def test_greedy_ignores_seed_and_row_keys(tiny_llama):
    plain = surgery.generate(tiny_llama, PROMPTS, 10)
    keyed = surgery.generate(tiny_llama, PROMPTS, 10, seed=9, row_keys=["a", "b", "c", "d"])
    assert keyed.token_ids == plain.token_ids


def test_a_row_samples_the_same_alone_and_batched_with_forced_tokens(tiny):
    """Thinking-token insertion forces a word at each row's stop (here its 4th token), then an
    answer prompt: forced tokens use the row's draw of their step, alone as in the batch."""
    def tts():
        return ThinkingTokenInsertion(words=(" Wait", " Hmm"), budget=4, max_insertions=2, answer_prompt=" So",
                                      answer_tokens=2, first_budget=4)

    batch_block, alone_block = tts(), tts()
    with surgery.trace(tiny, batch_block) as tr:
        out = tr.generate(OTHERS + [TARGET], 24, chat=True, seed=6, row_keys=["x", "y", "z", "t"], **HOT)
    with surgery.trace(tiny, alone_block) as tr:
        alone = tr.generate([TARGET], 24, chat=True, seed=6, row_keys=["t"], **HOT)
    assert batch_block.insertions()[3] and batch_block.insertions()[3] == alone_block.insertions()[0]
    assert out.token_ids[3] == alone.token_ids[0] and out.stop_reasons[3] == alone.stop_reasons[0]
    word = tiny.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    assert out.token_ids[3][4 : 4 + len(word)] == word  # the forced word really is in the row
