"""The main job: generate short chains of thought on the embedded model, plain and steered.

Runs a few built-in arithmetic word problems (:data:`surgery.examples.ARITHMETIC_PROBLEMS`)
through the default model twice (nothing attached, then a :class:`~interventions.ResidualAdd`
firing at every "\\n\\n" token) and prints the texts, where the add fired, and timings. Run it
with ``surgery demo`` (``--help`` for options).

Example:
    >>> from surgery.demo import run_demo
    >>> report = run_demo(max_new_tokens=32, n_problems=2)                 # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
import time

import torch

from surgery.examples import ARITHMETIC_PROBLEMS

__all__ = ["run_demo"]


def _steering_vector(model, layer: int, scale: float, seed: int) -> torch.Tensor:
    """A random unit direction scaled to ``scale`` x the median residual norm entering ``layer``.

    A stand-in for a real steering vector (SEAL extraction comes with the SteeringVector block):
    it shows the mechanics (where the add fires, what it costs) on a model we can ship.
    """
    import surgery
    from probes import RecordSite

    probe = RecordSite(f"resid_pre.{layer}")
    with surgery.trace(model, probe) as tr:
        tr.run(ARITHMETIC_PROBLEMS, chat=True)
    # the median, not the mean: a few positions (the first token) carry norms 10-100x the rest
    norm = probe.result().values.norm(dim=-1).median()
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.d_model, generator=generator)
    return (direction / direction.norm() * norm * scale).to(device=model.device, dtype=model.dtype)


def _show(title: str, out, fired=None, model=None) -> None:
    print(f"\n=== {title}: {out.timings['new_tokens']:.0f} tokens in {out.timings['total_s']:.1f} s "
          f"({out.timings['tokens_per_s']:.1f} tok/s, prefill {out.timings['prefill_s'] * 1000:.0f} ms)")
    for i, text in enumerate(out.texts):
        print(f"--- problem {i + 1} ({out.lengths[i]} tokens, stopped: {out.stop_reasons[i]})")
        print(textwrap.indent(text.strip() or "(empty)", "    "))
        if fired is not None:
            generated = [p - out.prompt_lengths[i] for p in fired[i] if p >= out.prompt_lengths[i]]
            print(f"    >> the add fired at {len(fired[i])} positions: {len(generated)} generated "
                  f"tokens {generated} and {len(fired[i]) - len(generated)} prompt tokens")


def run_demo(
    *,
    max_new_tokens: int = 96,
    n_problems: int = 4,
    layer: int = 15,
    scale: float = 0.5,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Load the embedded model, generate plain and steered, print everything; return the figures."""
    import surgery
    from interventions import ResidualAdd

    if not 1 <= n_problems <= len(ARITHMETIC_PROBLEMS):
        raise ValueError(f"n_problems must be in 1..{len(ARITHMETIC_PROBLEMS)}, got {n_problems}")
    start = time.perf_counter()
    model = surgery.load(device=device)
    load_s = time.perf_counter() - start
    print(f"loaded {model} in {load_s:.1f} s")
    problems = ARITHMETIC_PROBLEMS[:n_problems]

    plain = surgery.generate(model, problems, max_new_tokens, chat=True)
    _show("nothing attached", plain)

    vector = _steering_vector(model, layer, scale, seed)
    add = ResidualAdd(vector, site=f"resid_pre.{layer}", when=surgery.OnText("\n\n"))
    with surgery.trace(model, add) as tr:
        steered = tr.generate(problems, max_new_tokens, chat=True)
    fired = add.fired()
    _show(f"ResidualAdd at resid_pre.{layer} wherever the text reaches '\\n\\n' (random direction, "
          f"{scale} x median residual norm = {vector.norm():.1f})", steered, fired)

    changed = sum(a != b for a, b in zip(plain.token_ids, steered.token_ids))
    ratio = steered.timings["tokens_per_s"] / plain.timings["tokens_per_s"]
    print(f"\nsummary: load {load_s:.1f} s; plain {plain.timings['tokens_per_s']:.1f} tok/s, "
          f"steered {steered.timings['tokens_per_s']:.1f} tok/s (ratio {ratio:.2f}); "
          f"the add fired {sum(map(len, fired))} times; {changed}/{len(problems)} outputs changed")
    return {"load_s": load_s, "plain": plain, "steered": steered, "fired": fired, "changed": changed}
