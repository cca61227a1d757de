"""``surgery demo``: a small real study on GSM8K with the embedded model, offline, end to end.

Three stages, each one the project's ordinary tools on study files the demo writes into its
folder (so ``surgery run FOLDER/study.toml`` reruns or extends the study by hand):

1. **Traces** (``traces.toml``): the model solves problems 41-60 of the shipped GSM8K sample,
   disjoint from the evaluated ones. SmolLM2-135M-Instruct almost never reflects on its own (on
   the first 20 test problems: 82 thoughts, all execution), so these prompts ask it to check each
   step in a paragraph starting "Wait, let me check", and it samples (temperature 0.7). The model
   still decides, at each blank line, whether it checks: the reflection thoughts are its own
   text, read at its own separators. Nothing is written for it.
2. **Vector** (``seal.safetensors``): :func:`experiments.extraction.extract_vector` on those
   traces: ``mean(execution) - mean(reflection ∪ transition)`` of the residual stream entering
   block :func:`~experiments.extraction.seal_layer` (21 of 30), read at each thought's opening
   separator (SEAL, METHODS.md §1), with its class counts. It fires at every generated blank
   line (:func:`interventions.seal_trigger_for`: SmolLM2 has no think tags). Beside it,
   ``thought_probe.safetensors``: :func:`experiments.extraction.extract_thought_probe` fits a
   linear probe from the same thoughts' states at ``resid_pre.20`` to their keyword labels
   (held-out accuracy printed beside chance).
3. **Study** (``study.toml``): the first ``problems`` problems of the sample, greedy, under seven
   conditions: plain; SEAL steering; SEAL's token-mask baseline; thinking-token insertion;
   representation recycling; and two closed-loop ones, where a block fires on what a probe of
   the same run measures while decoding (:class:`surgery.signals.OnSignal`): ``seal_gated``
   (SEAL's vector only at blank lines the thought probe says open a reflection or transition)
   and ``rr_peaks`` (recycling where the MI of the emitting state crosses the row's running
   Tukey fence). All three probes (MI estimator, the thought classifier with its linear probe,
   reasoning graph) on every condition; then ``report.html`` and the terminal table.

Every stage is resumable: killed at any moment, ``surgery demo`` continues where it stopped (the
vector is written once, atomically, after its traces are complete).

Example::

    report = run_demo("runs/demo", problems=12)     # about 9 minutes on a 2-core CPU
"""

from __future__ import annotations

import os
from pathlib import Path

from experiments.extraction import extract_thought_probe, extract_vector, seal_layer
from experiments.runner import run_study
from experiments.study_config import load_study_config
from experiments.summary import condition_summaries, format_table
from interventions import SteeringVector
from surgery.files.saving import load_blocks, save_blocks

__all__ = ["EVALUATED_MAX", "TRACE_PROBLEMS", "run_demo", "write_study_files"]

TRACE_PROBLEMS = (40, 20)  # offset and count in the shipped sample: its problems 41-60
EVALUATED_MAX = TRACE_PROBLEMS[0]  # the evaluated problems come before the traces' ones

_COMMON = """\
[model]
name = "embedded"
device = "{device}"

[dataset]
sample = "gsm8k"
offset = {offset}
limit = {limit}
"""

TRACES_TOML = """\
# Stage 1 of `surgery demo`: the model's own traces, on problems disjoint from the study's, asked to
# check its steps (it rarely reflects unasked). The SEAL vector is extracted from them.
name = "demo-traces"
output = "traces"
""" + _COMMON + """
[prompt]
template = \"\"\"{{question}}
Solve it step by step, one step per paragraph. After each step, write a paragraph that starts with "Wait, let me check" and verify that step.\"\"\"
chat = true

[generation]
max_new_tokens = {max_new_tokens}
batch_size = {batch_size}
do_sample = true
temperature = 0.7
seed = 0

[conditions.plain]
blocks = []
"""

STUDY_TOML = """\
# Stage 3 of `surgery demo`: seven conditions (two closed loop), all three probes. seal.safetensors and
# thought_probe.safetensors are stage 2's vector and linear thought probe.
name = "demo"
output = "study"
""" + _COMMON + """
[prompt]
template = \"\"\"{{question}}
Think step by step, one step per paragraph, then give the final answer after ####.\"\"\"
chat = true

[generation]
max_new_tokens = {max_new_tokens}
batch_size = {batch_size}

[conditions.plain]
blocks = []

[conditions.seal]                       # SEAL: the vector added at every generated blank line
blocks = [{{ type = "steering_vector", from = "seal.safetensors" }}]

[conditions.mask]                       # SEAL's baseline: -3 on tokens containing these words
blocks = [{{ type = "token_mask", words = ["wait", "alternatively"], penalty = -3.0 }}]

[conditions.tts]                        # thinking-token insertion: " Wait" where a row stops, or at {first_budget} tokens
blocks = [{{ type = "thinking_token_insertion", words = [" Wait"], first_budget = {first_budget}, budget = {tts_budget}, answer_prompt = " Final answer:", answer_tokens = 12 }}]

[conditions.rr]                         # representation recycling at thinking tokens (released: p = 0.5)
blocks = [{{ type = "representation_recycling", layer = {layer}, probability = 0.5, seed = 0 }}]

# Closed loop: the blocks fire where a probe of this same run measures something, while decoding.
[conditions.seal_gated]                 # SEAL's vector only at blank lines the thought probe says open a reflection/transition
blocks = [{{ type = "steering_vector", from = "seal.safetensors", when = {{ kind = "and", left = {{ kind = "and", left = {{ kind = "text", text = "\\n\\n" }}, right = {{ kind = "step_window", start = 1 }} }}, right = {{ kind = "signal", source = "thought_classifier", signal = "predicted", op = "in", value = ["reflection", "transition"] }} }} }}]

[conditions.rr_peaks]                   # recycling where the MI of the emitting state crosses the row's running Tukey fence
blocks = [{{ type = "representation_recycling", layer = {layer}, when = {{ kind = "signal", source = "mi_estimator", signal = "peak" }} }}]

[probes]
mi = {{ type = "mi_estimator", answers_from = "dataset" }}
thoughts = {{ type = "thought_classifier", from = "thought_probe.safetensors" }}   # at resid_pre.{probe_layer}, with its linear probe
graph = {{ type = "reasoning_graph", n_clusters = 12 }}
"""


def write_study_files(folder: str | os.PathLike, *, problems: int = 12, max_new_tokens: int = 160,
                      batch_size: int = 8, device: str = "auto", layer: int = 21) -> tuple[Path, Path]:
    """Write ``traces.toml`` and ``study.toml`` into ``folder``; return their paths."""
    if not 1 <= problems <= EVALUATED_MAX:
        raise ValueError(f"the demo evaluates 1 to {EVALUATED_MAX} problems (problems {EVALUATED_MAX + 1}-"
                         f"{sum(TRACE_PROBLEMS)} of the sample make its vector), got {problems}")
    if max_new_tokens < 32:
        raise ValueError(f"max_new_tokens must be at least 32 for reasoning to happen, got {max_new_tokens}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    common = {"device": device, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    traces = folder / "traces.toml"
    traces.write_text(TRACES_TOML.format(offset=TRACE_PROBLEMS[0], limit=TRACE_PROBLEMS[1], **common))
    first_budget = max_new_tokens * 2 // 3
    study = folder / "study.toml"
    study.write_text(STUDY_TOML.format(offset=0, limit=problems, layer=layer, probe_layer=layer - 1, first_budget=first_budget,
                                       tts_budget=max_new_tokens - first_budget, **common))
    return traces, study


def run_demo(folder: str | os.PathLike = "runs/demo", *, problems: int = 12, max_new_tokens: int = 160,
             batch_size: int = 8, device: str = "auto", progress: bool = True) -> Path:
    """Run the three stages into ``folder`` (resuming what is there); return the report's path."""
    folder = Path(folder)
    layer = seal_layer(30)  # SmolLM2-135M: 30 blocks
    traces_toml, study_toml = write_study_files(folder, problems=problems, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, device=device, layer=layer)
    traces = load_study_config(traces_toml)
    model = traces.model.load()
    print(f"[1/3] traces: {traces.dataset.limit} problems disjoint from the study's, asked to check their steps")
    run_study(traces, model=model, progress=progress)
    vector_path = folder / "seal.safetensors"
    if not vector_path.exists():
        print(f"[2/3] SEAL vector from those traces at resid_pre.{layer}")
        extract_vector(traces.output, layer=layer, model=model, progress=progress).save(vector_path)
    vector = SteeringVector.load(vector_path)
    counts = vector.metadata["class_counts"]
    print(f"      thoughts in the traces: {', '.join(f'{k} {v}' for k, v in counts.items())}; "
          f"|S| = {vector.vector.norm():.2f}")
    probe_path = folder / "thought_probe.safetensors"
    if not probe_path.exists():
        print(f"      thought probe from the same thoughts at resid_pre.{layer - 1} (what gated steering reads)")
        classifier = extract_thought_probe(traces.output, site=f"resid_pre.{layer - 1}", model=model, progress=progress)
        save_blocks(probe_path, [classifier], model)
    probe = load_blocks(probe_path)[0].linear_probe
    print(f"      linear thought probe: held-out accuracy {probe.held_out_accuracy:.2f} "
          f"(chance {probe.chance_accuracy:.2f}, {sum(probe.test_counts.values())} held-out thoughts)")
    study = load_study_config(study_toml)
    print(f"[3/3] study: {problems} problems x {len(study.conditions)} conditions ({', '.join(study.conditions)})")
    store = run_study(study, model=model, progress=progress)
    print(f"\n{study.name}: results in {store.results_path}\n")
    print(format_table(condition_summaries(store.records())))
    from experiments.report import write_report

    report = write_report(study.output, progress=progress)
    print(f"\nreport: {report}")
    return report
