"""NNsightBlocks: our blocks inside nnsight's own lm.generate / lm.trace give our engine's tokens,
fired positions and probe results, on a batch of different lengths with rows stopping early;
token-choice blocks and missing sites are refused; the model is left as found, also after an
exception.

Both sides get the same prompt strings, chat template applied beforehand (nnsight tokenizes raw
strings itself), so the prompts open <think> and SEAL's trigger fires."""

import dataclasses
import warnings

import pytest
import torch
from conftest import ANSWERS, PROMPTS, all_hooks, assert_same_probe_results, build_tokenizer, frequent_words, logits_of, tiny_model
from tolerance import assert_close

import surgery
from interventions import RepresentationRecycling, ResidualAdd, SteeringVector, ThinkingTokenInsertion, TokenMask
from probes import MIEstimator, ReasoningGraph, RecordSite, ThoughtClassifier
from surgery.hosts.nnsight_blocks import NNsightBlocks
from surgery.prompts import apply_chat_template
from surgery.sites import ARCHITECTURES
from surgery.triggers import Always, OnText, StepWindow

nnsight = pytest.importorskip("nnsight")
# an open tracer.all() loop ends with this warning by design (nnsight says so itself)
pytestmark = pytest.mark.filterwarnings("ignore:.*was never reached:UserWarning")

NEW_TOKENS = 16


def fresh(kind):
    """A tiny model of its own (nnsight patches the module and its tokenizer), its nnsight
    LanguageModel and the templated prompts."""
    model = tiny_model(kind, build_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        lm = nnsight.LanguageModel(model.module, tokenizer=model.tokenizer)
    return model, lm, apply_chat_template(model, PROMPTS)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    return fresh(request.param)


def vector(model, scale=2.0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * scale


def nnsight_generate(lm, blocks, prompts, eos=None, new_tokens=NEW_TOKENS):
    """The adapter in nnsight's own generate: tokens per row, cut after EOS."""
    stop = {} if eos is None else {"eos_token_id": eos}
    with lm.generate(max_new_tokens=new_tokens, do_sample=False, **stop) as tracer:
        with tracer.invoke(prompts):
            for _ in tracer.all():
                blocks.step()
        with tracer.invoke():
            ids = tracer.result.save()
    return blocks.generated(ids)


def engine_generate(model, blocks, prompts, eos=None):
    with surgery.trace(model, *blocks) as tr:
        return tr.generate(prompts, NEW_TOKENS, eos_token_ids=None if eos is None else [eos])


def stop_token(model, make, prompts):
    """A token the blocks' run emits early in some rows but not in all, so rows stop at different steps."""
    rows = engine_generate(model, make(model), prompts).token_ids
    for column in range(2, NEW_TOKENS):
        for token in (row[column] for row in rows):
            if 0 < sum(token in row for row in rows) < len(rows):
                return token
    raise AssertionError(f"no token stops some rows but not all: {rows}")


def steering(model):
    v = vector(model)
    return [
        SteeringVector(v, layer=1),  # SEAL: "\n\n" inside <think>
        ResidualAdd(v * 0.5, site="resid_post.0", when=Always()),
        ResidualAdd(v * 0.3, site="attn_out.-1", when=Always()),  # attention returns a tuple
        ResidualAdd(v, site="mlp_out.0", when=StepWindow(2, 6)),
    ]


# single characters (SEAL's vocabulary rule) hit the top token of random weights within a few steps
def token_masks(model):
    return [TokenMask(["e", "Wait"], penalty=-4.0, match="token"), TokenMask(["a"], penalty=None, match="token")]


def text_masks(model):
    return [TokenMask([".", "let me"], penalty=-5.0, match="text", when=OnText("\n") | StepWindow(2, 8)),
            TokenMask(["e"], penalty=None, match="text")]


@pytest.mark.parametrize("make", [steering, token_masks, text_masks], ids=lambda f: f.__name__)
def test_interventions_give_our_engines_tokens_inside_nnsights_generate(setup, make):
    model, lm, prompts = setup
    eos = stop_token(model, make, prompts)
    ours = make(model)
    out = engine_generate(model, ours, prompts, eos)
    assert "eos" in out.stop_reasons and "length" in out.stop_reasons, out.stop_reasons
    assert all(sum(map(len, block.fired())) > 0 for block in ours)  # every block acted
    assert out.token_ids != engine_generate(model, [], prompts, eos).token_ids
    theirs = make(model)
    tokens = nnsight_generate(lm, NNsightBlocks(lm, *theirs, eos_token_ids=[eos]), prompts, eos)
    assert tokens == out.token_ids
    for a, b in zip(ours, theirs, strict=True):
        assert b.fired() == a.fired() and b.by_row() == a.by_row()


def probes(model):
    return [SteeringVector(vector(model), layer=1), RecordSite("resid_post.-1", when=OnText("\n\n")),
            MIEstimator(answers=ANSWERS), ThoughtClassifier("resid_pre.1"), ReasoningGraph(n_clusters=2)]


def test_probes_fed_inside_nnsights_generate_find_what_they_find_under_our_trace(setup):
    model, lm, prompts = setup
    eos = stop_token(model, probes, prompts)
    ours = probes(model)
    out = engine_generate(model, ours, prompts, eos)
    theirs = probes(model)
    assert nnsight_generate(lm, NNsightBlocks(lm, *theirs, eos_token_ids=[eos]), prompts, eos) == out.token_ids
    assert len(ours[1].result().rows) > 0
    assert_close(theirs[1].result(), ours[1].result(), precision=torch.float32)
    assert_same_probe_results([theirs[2].result(), theirs[3].result(), theirs[4].result()],
                              [ours[2].result(out), ours[3].result(), ours[4].result()])


def test_one_forward_in_lm_trace_equals_our_run(setup):
    model, lm, prompts = setup

    def make():
        return [ResidualAdd(vector(model), site="resid_pre.1", when=OnText("\n\n")), RecordSite("resid_post.-1"),
                TokenMask(frequent_words(model, 1), penalty=-4.0)]

    ours = make()
    with surgery.trace(model, *ours) as tr:
        expected = tr.run(prompts)
    theirs = make()
    blocks = NNsightBlocks(lm, *theirs)
    with torch.no_grad(), lm.trace(prompts):  # as in the module docstring
        blocks.step()
        logits = lm.lm_head.output.save()  # read after the blocks: the masked logits
    assert sum(map(len, ours[0].fired())) > 0 and sum(map(len, ours[2].fired())) > 0
    assert torch.equal(logits, expected)
    assert theirs[0].fired() == ours[0].fired() and theirs[2].fired() == ours[2].fired()
    assert_close(theirs[1].result(), ours[1].result(), precision=torch.float32)


def test_the_module_docstring_example_runs_and_matches_our_trace():
    model, lm, _ = fresh("llama")
    vector_, tokenizer = vector(model), model.tokenizer
    hf_model = model.module
    prompts = ["What is 7 * 8?", "3 + 5?"]

    def make():
        return SteeringVector(vector_, layer=1), TokenMask(["Wait"], penalty=-3.0), MIEstimator(answers=["56", "8"])

    # --- the example, as written in surgery/hosts/nnsight_blocks.py ---
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(hf_model, tokenizer=tokenizer)
    steer, mask, mi = make()
    blocks = NNsightBlocks(lm, steer, mask, mi)
    with lm.generate(max_new_tokens=32, do_sample=False) as tracer:
        with tracer.invoke(["What is 7 * 8?", "3 + 5?"]):
            for _ in tracer.all():
                blocks.step()
        with tracer.invoke():  # survives rows stopping early
            ids = tracer.result.save()
    # ---
    ours = make()
    with surgery.trace(model, *ours) as tr:
        out = tr.generate(prompts, 32)
    assert blocks.generated(ids) == out.token_ids
    assert steer.fired() == ours[0].fired() and mask.by_row() == ours[1].by_row()
    assert_close(mi.result().values, ours[2].result(out).values, precision=torch.float32)


def test_token_choice_blocks_are_refused_with_the_way_to_run_them(setup):
    model, lm, _ = setup
    for block in (ThinkingTokenInsertion(words=(" Wait",), budget=4), RepresentationRecycling(layer=0)):
        with pytest.raises(ValueError, match=rf"{type(block).__name__} change\(s\) the tokens.*surgery\.trace\(surgery\.wrap\(lm\)"):
            NNsightBlocks(lm, ResidualAdd(vector(model), site="resid_pre.0"), block)


def test_sites_the_model_lacks_are_clear_errors(setup, monkeypatch):
    model, lm, _ = setup
    with pytest.raises(ValueError, match="out of range"):
        NNsightBlocks(lm, RecordSite("resid_post.9"))
    with pytest.raises(ValueError, match="unknown site"):
        NNsightBlocks(lm, RecordSite("resid_mid.1"))
    kind = model.architecture.name
    monkeypatch.setitem(ARCHITECTURES, kind, dataclasses.replace(ARCHITECTURES[kind], mlp="feed_forward"))
    with pytest.raises(ValueError, match=r"mlp_out.1 lives at module 'model.layers.1.feed_forward'.*no such module"):
        NNsightBlocks(lm, RecordSite("mlp_out.1"))


def test_what_the_adapter_cannot_follow_is_an_error_not_a_drift(setup):
    model, lm, prompts = setup
    blocks = NNsightBlocks(lm, RecordSite("resid_post.0", when=OnText("\n\n")))
    with pytest.raises(RuntimeError, match=r"did not see every forward pass.*tracer.all\(\)"):
        with lm.generate(prompts, max_new_tokens=4, do_sample=False) as tracer:
            for _ in tracer.iter[1:4]:  # skips the prefill
                blocks.step()
    with pytest.raises(ValueError, match="needs the KV cache"):
        with lm.generate(prompts, max_new_tokens=2, do_sample=False, use_cache=False) as tracer:
            for _ in tracer.iter[:2]:
                blocks.step()


def test_after_use_and_after_an_exception_the_model_is_left_as_found():
    model, lm, prompts = fresh("llama")
    with torch.no_grad():
        plain = lm.generate(prompts, max_new_tokens=8, do_sample=False)
    before, hooks = logits_of(model), all_hooks(model.module)
    stack = [*steering(model), *text_masks(model), *probes(model)[1:]]
    blocks = NNsightBlocks(lm, *stack)
    first = nnsight_generate(lm, blocks, prompts)
    assert all_hooks(model.module) == hooks and torch.equal(logits_of(model), before)
    with pytest.raises(ValueError, match="stop at step 2"):
        with lm.generate(max_new_tokens=8, do_sample=False) as tracer:
            with tracer.invoke(prompts):
                for _ in tracer.all():
                    if blocks.step().index == 2:
                        raise ValueError("stop at step 2")
    assert all_hooks(model.module) == hooks
    assert torch.equal(logits_of(model), before)
    with torch.no_grad():
        assert torch.equal(lm.generate(prompts, max_new_tokens=8, do_sample=False), plain)
    assert nnsight_generate(lm, blocks, prompts) == first  # the next run starts clean
