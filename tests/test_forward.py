"""surgery.decode.forward: the model calls of a run use the names the installed transformers gives them."""

import warnings

import pytest
from conftest import PROMPTS, frequent_words

import surgery
from interventions import RepresentationRecycling


def _deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecated" in str(w.message)]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_run_with_re_runs_calls_the_model_without_a_deprecation_warning(tiny, cache):
    """transformers 5.24 deprecated past_key_values= for cache= (removal announced for 5.40): the
    prefill, every decode step and both kinds of re-run (recycling's partial one from block 1 and,
    at the prefill, the whole model) pass the cache by the current name."""
    words = frequent_words(tiny)
    rr = RepresentationRecycling(layer=1, trigger_words=words, probability=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with surgery.trace(tiny, rr) as tr:
            out = tr.generate(PROMPTS, 12, chat=True, cache=cache)
    assert rr.reruns() > 0 and any(out.token_ids)
    assert _deprecations(caught) == []
