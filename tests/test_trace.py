"""The Trace: hooks on and off, ordering at a site, nesting, bad blocks."""

import pytest
import torch
from conftest import PROMPTS, all_hooks, logits_of
from tolerance import assert_close

import surgery
from interventions import ResidualAdd
from probes import RecordSite
from surgery.blocks import Intervention


class Scale(Intervention):
    """Multiply the value at a site (test helper, not registered)."""

    def __init__(self, site, factor, log):
        self.config, self.site, self.factor, self.log = None, site, factor, log

    def sites(self):
        return (self.site,)

    def edit(self, site, value, step):
        self.log.append(("scale", self.factor))
        return value * self.factor


def test_model_is_bit_identical_after_a_trace(tiny):
    before, hooks = logits_of(tiny), all_hooks(tiny.module)
    add = ResidualAdd(torch.ones(tiny.d_model), site="resid_pre.1", alpha=3.0)
    with surgery.trace(tiny, add, RecordSite("mlp_out.0")) as tr:
        steered = tr.generate(PROMPTS, 8)
        assert len(all_hooks(tiny.module) - hooks) == 2
    assert all_hooks(tiny.module) == hooks and tiny._active_trace is None
    assert torch.equal(logits_of(tiny), before)
    assert steered.token_ids != surgery.generate(tiny, PROMPTS, 8).token_ids


def test_hooks_come_off_when_the_body_raises(tiny_llama):
    before, hooks = logits_of(tiny_llama), all_hooks(tiny_llama.module)
    with pytest.raises(KeyboardInterrupt):
        with surgery.trace(tiny_llama, ResidualAdd(torch.ones(64), site="resid_post.-1")) as tr:
            tr.generate(PROMPTS, 4)
            raise KeyboardInterrupt
    assert all_hooks(tiny_llama.module) == hooks and tiny_llama._active_trace is None
    assert torch.equal(logits_of(tiny_llama), before)


def test_hooks_come_off_when_a_block_raises_mid_generation(tiny_llama):
    class Boom(Scale):
        def edit(self, site, value, step):
            if step.index == 2:
                raise RuntimeError("boom")
            return value

    hooks = all_hooks(tiny_llama.module)
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.trace(tiny_llama, Boom("resid_pre.0", 1.0, [])) as tr:
            tr.generate(PROMPTS, 6)
    assert all_hooks(tiny_llama.module) == hooks


def test_nothing_attached_equals_plain_generation(tiny):
    with surgery.trace(tiny) as tr:
        traced = tr.generate(PROMPTS, 16, chat=True)
    assert traced.token_ids == surgery.generate(tiny, PROMPTS, 16, chat=True).token_ids


def test_interventions_run_in_order_and_probes_see_their_result(tiny_llama):
    log = []
    plain = RecordSite("resid_post.1")
    with surgery.trace(tiny_llama, plain) as tr:
        tr.run(PROMPTS)
    baseline = plain.result().values

    record = RecordSite("resid_post.1")
    first, second = Scale("resid_post.1", 2.0, log), Scale("resid_post.1", 3.0, log)
    with surgery.trace(tiny_llama, record, first) as tr:  # the probe is added first on purpose
        tr.add(second)
        tr.run(PROMPTS)
    assert log == [("scale", 2.0), ("scale", 3.0)]
    assert_close(record.result().values, baseline * 6.0)


def test_traces_do_not_nest(tiny_llama):
    hooks = all_hooks(tiny_llama.module)
    with surgery.trace(tiny_llama):
        with pytest.raises(RuntimeError, match="traces do not nest"):
            with surgery.trace(tiny_llama):
                pass
    assert all_hooks(tiny_llama.module) == hooks and tiny_llama._active_trace is None


def test_a_bad_block_leaves_the_model_untouched(tiny_llama):
    hooks = all_hooks(tiny_llama.module)
    good = ResidualAdd(torch.ones(64), site="resid_pre.0")
    bad = ResidualAdd(torch.ones(65), site="resid_pre.1")
    with pytest.raises(ValueError, match="width 65"):
        with surgery.trace(tiny_llama, good, bad):
            pass
    assert all_hooks(tiny_llama.module) == hooks and tiny_llama._active_trace is None
    with surgery.trace(tiny_llama, good) as tr:
        with pytest.raises(ValueError, match="out of range"):
            tr.add(ResidualAdd(torch.ones(64), site="resid_pre.4"))
        assert len(all_hooks(tiny_llama.module) - hooks) == 1
        with pytest.raises(ValueError, match="already attached"):
            tr.add(good)
        with pytest.raises(TypeError, match="Interventions or Probes"):
            tr.add(object())


def test_forward_passes_outside_generate_are_untouched(tiny_llama):
    before = logits_of(tiny_llama)
    with surgery.trace(tiny_llama, ResidualAdd(torch.ones(64), site="resid_pre.0", alpha=5.0)):
        assert torch.equal(logits_of(tiny_llama), before)


def test_trace_needs_a_wrapped_model_and_an_open_context(tiny_llama):
    with pytest.raises(TypeError, match="surgery.wrap"):
        surgery.trace(tiny_llama.module)
    tr = surgery.trace(tiny_llama)
    with pytest.raises(RuntimeError, match="inside the"):
        tr.generate(PROMPTS, 2)
    with pytest.raises(RuntimeError, match="inside the"):
        tr.add(RecordSite())
