"""Our engine on the HF model, on a TransformerLens bridge and on an nnsight model, against the
same steering written in each library's own idiom.

Run: python benchmarks/bench_backends.py [--batch 8] [--new-tokens 64] [--reps 3] [--device cpu]
                                         [--library all|hf|nnsight|tl]

SmolLM2-135M-Instruct on the first GSM8K test questions (chat template applied as text), greedy,
every row generating exactly ``--new-tokens`` (no EOS stop, so every row does the same work).
The steering is the same everywhere: add a fixed vector to the residual stream entering block
15 at the token that completes a "\\n\\n" (SmolLM2 writes it as two "\\n" tokens, so ours is
``OnText("\\n\\n")`` and the idioms look at the previous fed token too). Rows, timed ``--reps``
times in interleaved order after one warm-up, medians:

  hf_generate        HF ``generate``, nothing attached (reference speed)
  ours_hf            ``surgery.trace(model, ResidualAdd(..., when=OnText("\\n\\n")))``
  nnsight_idiom      ``lm.generate`` + ``tracer.iter``: per step read the fed ids, add where a
                     newline token follows one (``lm.model.layers[15].input``)
  ours_nnsight       our engine on ``surgery.wrap(lm)`` (the same HF module)
  nnsight_blocks     our ResidualAdd inside nnsight's own ``lm.generate`` (``NNsightBlocks``)
  tl_idiom           ``bridge.hooks(...)`` around ``bridge.generate``: a hook on ``embed.hook_in``
                     keeps the fed ids, one on ``blocks.15.hook_in`` adds the vector
  ours_bridge        our engine on ``surgery.wrap(bridge)``
  tl_hooks           our ResidualAdd inside ``bridge.generate`` (``TLHooks``)

The bridge rows run on a booted copy of the model (TransformerLens rebuilds it in place, with
eager attention and hook points in every block); the others on an unbooted copy. Ratios compare
each of our rows with the idiom of the same library (> 1.00: ours is faster).
"""

from __future__ import annotations

import functools
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import gsm8k_questions, model_options, time_rows  # noqa: E402
from interventions import ResidualAdd  # noqa: E402
from surgery.prompts import apply_chat_template  # noqa: E402
from surgery.hosts.nnsight_blocks import NNsightBlocks  # noqa: E402
from surgery.hosts.tl_hooks import TLHooks  # noqa: E402
from surgery.triggers import OnText  # noqa: E402

LAYER = 15


def main() -> None:
    parser = model_options(__doc__.split("\n")[0], new_tokens=64, reps=3)
    parser.add_argument("--library", choices=["all", "hf", "nnsight", "tl"], default="all",
                        help="time only this library's rows (with HF's, the reference)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # nnsight's and TransformerLens's notices
    import nnsight
    from transformer_lens.model_bridge import TransformerBridge

    model = surgery.load(device=args.device)
    booted = surgery.load(device=args.device)
    bridge = TransformerBridge.boot_transformers("smollm2", hf_model=booted.module, tokenizer=booted.tokenizer)
    bridged = surgery.wrap(bridge, booted.tokenizer)
    lm = nnsight.LanguageModel(model.module, tokenizer=model.tokenizer)
    wrapped_lm = surgery.wrap(lm)

    texts = apply_chat_template(model, gsm8k_questions(args.batch))
    n = args.new_tokens
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype) * 4
    starts_newline = torch.tensor([t.startswith("\n") for t in model.vocabulary_texts], device=model.device)
    ends_newline = torch.tensor([t.endswith("\n") for t in model.vocabulary_texts], device=model.device)
    fires = {}

    def steering():
        return ResidualAdd(vector, site=f"resid_pre.{LAYER}", when=OnText("\n\n"))

    def ours(target):
        with surgery.trace(target, add := steering()) as tr:
            tokens = tr.generate(texts, n, eos_token_ids=[], progress=False).token_ids
        fires["ours"] = sum(map(len, add.fired()))
        return tokens

    def separator_after(ids, previous):
        """Where a newline token follows a token ending in a newline (the fed ids [B, T], and
        the previous step's last fed id per row or None in the prefill)."""
        before = ids.new_zeros(ids.shape)  # id 0 ends no line
        before[:, 1:] = ids[:, :-1]
        if previous is not None:
            before[:, 0] = previous
        return starts_newline[ids] & ends_newline[before]

    def hf_generate():
        ids, mask = surgery.encode_prompts(model, texts)
        with torch.no_grad():
            return model.module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False)

    def nnsight_idiom():
        with torch.no_grad(), lm.generate(texts, max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
            previous = None
            for _ in tracer.iter[:n]:
                ids = lm.model.embed_tokens.input
                hidden = lm.model.layers[LAYER].input
                hidden[separator_after(ids, previous)] += vector
                previous = ids[:, -1]
            out = tracer.result.save()
        return out

    def nnsight_blocks():
        blocks = NNsightBlocks(lm, add := steering(), eos_token_ids=[])
        with torch.no_grad(), lm.generate(max_new_tokens=n, min_new_tokens=n, do_sample=False) as tracer:
            with tracer.invoke(texts):
                for _ in tracer.iter[:n]:
                    blocks.step()
            with tracer.invoke():
                out = tracer.result.save()
        fires["nnsight_blocks"] = sum(map(len, add.fired()))
        return out

    def tl_idiom():
        fed = {}

        def keep_ids(ids, hook):
            fed["here"] = separator_after(ids, fed.get("last"))
            fed["last"] = ids[:, -1]
            return ids

        def steer(resid, hook):
            return resid + fed["here"][..., None] * vector

        hooks = [("embed.hook_in", keep_ids), (f"blocks.{LAYER}.hook_in", steer)]
        with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
            return bridge.generate(texts, max_new_tokens=n, do_sample=False, stop_at_eos=False, prepend_bos=False,
                                   return_type="tokens", verbose=False)

    def tl_hooks():
        with torch.no_grad(), TLHooks(bridge, add := steering(), eos_token_ids=[], tokenizer=booted.tokenizer) as hooks:
            with bridge.hooks(fwd_hooks=hooks.fwd_hooks()):
                tokens = bridge.generate(texts, max_new_tokens=n, do_sample=False, stop_at_eos=False, prepend_bos=False,
                                         return_type="tokens", verbose=False)
        fires["tl_hooks"] = sum(map(len, add.fired()))
        return tokens

    rows = {
        "hf_generate": hf_generate,
        "ours_hf": functools.partial(ours, model),
        "nnsight_idiom": nnsight_idiom,
        "ours_nnsight": functools.partial(ours, wrapped_lm),
        "nnsight_blocks": nnsight_blocks,
        "tl_idiom": tl_idiom,
        "ours_bridge": functools.partial(ours, bridged),
        "tl_hooks": tl_hooks,
    }
    library_of = {"nnsight_idiom": "nnsight", "ours_nnsight": "nnsight", "nnsight_blocks": "nnsight",
                  "tl_idiom": "tl", "ours_bridge": "tl", "tl_hooks": "tl"}
    rows = {name: fn for name, fn in rows.items() if args.library in ("all", library_of.get(name, "hf"))}
    for fn in rows.values():  # warm-up
        fn()
    expected = ours(model)
    checks = {
        "nnsight idiom": ("nnsight_idiom", lambda: nnsight_idiom()[:, -n:].tolist()),
        "ours on nnsight": ("ours_nnsight", lambda: ours(wrapped_lm)),
        "NNsightBlocks": ("nnsight_blocks", lambda: nnsight_blocks()[:, -n:].tolist()),
        "TransformerLens idiom": ("tl_idiom", lambda: tl_idiom()[:, -n:].tolist()),
        "ours on the bridge": ("ours_bridge", lambda: ours(bridged)),
        "TLHooks": ("tl_hooks", lambda: tl_hooks()[:, -n:].tolist()),
    }
    same = {name: run() == expected for name, (row, run) in checks.items() if row in rows}
    fired = fires.pop("ours")
    assert all(count == fired for count in fires.values()), (fired, fires)
    times = time_rows(rows, args.reps)

    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens = args.batch * n
    print(f"\nSmolLM2-135M-Instruct, {model.dtype}, {device}; batch {args.batch}, {n} new tokens, median of {args.reps}")
    print(f"steering fired {fired} times a run; same tokens as our engine on HF: "
          + ", ".join(f"{name} {ok}" for name, ok in same.items()))
    print(f"{'row':<16}{'median s':>10}{'tok/s':>9}{'vs idiom':>10}")
    idiom_of = {"ours_hf": "hf_generate", "ours_nnsight": "nnsight_idiom", "nnsight_blocks": "nnsight_idiom",
                "ours_bridge": "tl_idiom", "tl_hooks": "tl_idiom"}
    for name in rows:
        median = statistics.median(times[name])
        ratio = f"{statistics.median(times[idiom_of[name]]) / median:>9.2f}x" if name in idiom_of else ""
        print(f"{name:<16}{median:>10.3f}{tokens / median:>9.1f}{ratio:>10}")
    if "ours_hf" in rows:
        print("(ours_hf is compared with plain HF generate: the cost of steering on top of generation)")


if __name__ == "__main__":
    main()
