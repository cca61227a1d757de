"""ClassifiedThoughts: the thought classifier's result, its summaries and its file round trip."""

import torch

from probes.classified_thoughts import ClassifiedThought, ClassifiedThoughts


def found() -> ClassifiedThoughts:
    """Two rows: three thoughts, then one; states numbered so each can be traced."""
    rows = [[ClassifiedThought(0, "execution", "7 * 8 = 56.", 10, "execution"),
             ClassifiedThought(1, "reflection", "Wait, let me check.", 17, "transition"),
             ClassifiedThought(2, "execution", "So 56.", 25)],
            [ClassifiedThought(0, "transition", "Alternatively, count.", 9)]]
    states = [torch.arange(12.0).reshape(3, 4), torch.full((1, 4), -1.0)]
    return ClassifiedThoughts(rows, states, "resid_pre.3", 6)


def test_labels_states_and_counts_follow_the_rows_in_order():
    result = found()
    assert result.labels() == ["execution", "reflection", "execution", "transition"]
    assert result.predicted() == ["execution", "transition", None, None]
    assert torch.equal(result.all_states()[3], torch.full((4,), -1.0))
    assert result.counts() == {"execution": 2, "reflection": 1, "transition": 1}
    by_label = result.states_by_label()
    assert torch.equal(by_label["execution"], torch.stack([torch.arange(4.0), torch.arange(8.0, 12.0)]))
    assert by_label["reflection"].shape == (1, 4) and by_label["transition"].shape == (1, 4)


def test_saved_and_loaded_it_is_the_same_result(tmp_path):
    result = found()
    result.save(tmp_path / "thoughts.safetensors")
    loaded = ClassifiedThoughts.load(tmp_path / "thoughts.safetensors")
    assert loaded.thoughts == result.thoughts and (loaded.site, loaded.n_recorded) == ("resid_pre.3", 6)
    assert all(torch.equal(a, b) for a, b in zip(loaded.states, result.states, strict=True))
