"""The compiled decode step (``generate(cache="static", compile=...)``): one graph for the whole
run with the graph-safe blocks inside, and the same tokens and records as the eager step.

On a CPU the step is compiled with ``backend="eager"`` and ``fullgraph=True``: dynamo must trace
every decode step's forward, hooks and blocks included, into one graph without a break (what a
CUDA graph needs), while the graph runs the same torch ops as eager mode. On CUDA,
``compile=True`` adds inductor and CUDA-graph replay (mode "reduce-overhead"); those figures come
from benchmarks/bench_gpu.py.
"""

import warnings

import pytest
import torch
from conftest import PROMPTS, frequent_words
from test_block_contract import stop_token
from torch._dynamo.utils import counters

import interventions  # noqa: F401  (registers the shipped blocks)
import probes  # noqa: F401
import surgery
from interventions import RepresentationRecycling, SteeringVector, ThinkingTokenInsertion, TokenMask
from probes import MIEstimator
from surgery.blocks import registered_blocks

ON_CPU = {"backend": "eager", "fullgraph": True}
NEW_TOKENS = 16
GRAPH_SAFE = {"residual_add", "steering_vector", "token_mask", "representation_recycling", "thinking_token_insertion"}


def generate(model, blocks, compile, eos=None):
    with surgery.trace(model, *blocks) as tr:
        return tr.generate(PROMPTS, NEW_TOKENS, chat=True, cache="static", compile=compile,
                           eos_token_ids=None if eos is None else [eos])


def stack(model, alpha=1.0):
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5 * alpha
    return [
        SteeringVector(vector, layer=1, when=surgery.OnText("\n\n")),
        TokenMask(["Hmm", "let me check"], penalty=-4.0),
        RepresentationRecycling(layer=1, trigger_words=frequent_words(model)),
        ThinkingTokenInsertion(words=(" Wait",), budget=6, answer_prompt=" So", answer_tokens=2),
    ]


def test_the_graph_safe_blocks_are_the_declared_ones():
    assert {name for name, cls in registered_blocks().items() if cls.graph_safe} == GRAPH_SAFE


@pytest.mark.parametrize("name", sorted(GRAPH_SAFE))
def test_each_graph_safe_block_compiles_into_one_graph_with_eager_tokens(tiny, name):
    cls = registered_blocks()[name]
    eos = stop_token(tiny)
    eager_block, compiled_block = cls.example(tiny, PROMPTS), cls.example(tiny, PROMPTS)
    eager = generate(tiny, [eager_block], False, eos)
    counters.clear()
    compiled = generate(tiny, [compiled_block], ON_CPU, eos)
    assert compiled.token_ids == eager.token_ids and compiled.stop_reasons == eager.stop_reasons
    assert compiled_block.by_row() == eager_block.by_row()
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 1  # 0: compiled by an earlier test with the same stack


def test_the_stack_compiles_once_and_each_run_reads_its_own_blocks(tiny_llama):
    model = tiny_llama
    runs = {}
    counters.clear()
    for alpha in (1.0, 3.0):  # a different vector in a new trace: no stale value from the first run
        eager_blocks, compiled_blocks = stack(model, alpha), stack(model, alpha)
        eager = generate(model, eager_blocks, False)
        compiled = generate(model, compiled_blocks, ON_CPU)
        assert compiled.token_ids == eager.token_ids
        assert [b.by_row() for b in compiled_blocks] == [b.by_row() for b in eager_blocks]
        assert any(compiled_blocks[0].fired()) and any(compiled_blocks[2].fired())
        runs[alpha] = compiled.token_ids
    assert runs[1.0] != runs[3.0]
    assert counters["stats"]["unique_graphs"] <= 1 and sum(counters["graph_break"].values()) == 0
    # another stack on the same model (hooks at other sites): not the graph compiled for the first
    only_mask = [TokenMask(["Hmm"], penalty=-50.0)]
    assert generate(model, only_mask, ON_CPU).token_ids == generate(model, [TokenMask(["Hmm"], penalty=-50.0)], False).token_ids


def test_a_block_that_is_not_graph_safe_decodes_eagerly_with_a_warning(tiny_llama):
    answers = ["8", "56", "The answer is 30.", "So 16"]
    eager = generate(tiny_llama, [MIEstimator(answers=answers)], False)
    with pytest.warns(UserWarning, match="MIEstimator keep.* per-step state on the host.*decodes eagerly"):
        compiled = generate(tiny_llama, [MIEstimator(answers=answers)], ON_CPU)
    assert compiled.token_ids == eager.token_ids


def test_closed_loop_recycling_compiles_with_its_mi_probe_inside(tiny_llama):
    """The MI probe on its sync-free path (its signal is read) is graph-safe: recycling at
    measured peaks runs in one compiled graph, firing where the eager step fires."""
    answers = ["8", "56", "The answer is 30.", "So 16"]

    def closed_loop():
        mi = MIEstimator(answers=answers, warmup=4)
        return [RepresentationRecycling(layer=1, when=surgery.OnSignal(mi, "peak")), mi]

    eager_blocks, compiled_blocks = closed_loop(), closed_loop()
    eager = generate(tiny_llama, eager_blocks, False)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "decodes eagerly" warning: it compiles
        compiled = generate(tiny_llama, compiled_blocks, ON_CPU)
    assert compiled.token_ids == eager.token_ids and any(eager_blocks[0].fired())
    assert compiled_blocks[0].fired() == eager_blocks[0].fired()
    for ours, theirs in zip(compiled_blocks[1].result().values, eager_blocks[1].result().values):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)  # float32 states, ill-conditioned estimator
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] <= 1


def test_compile_needs_the_static_cache_and_valid_options(tiny_llama):
    with pytest.raises(ValueError, match="compile needs cache='static'"):
        surgery.generate(tiny_llama, PROMPTS, 4, compile=True)
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        surgery.generate(tiny_llama, PROMPTS, 4, cache="static", compile="fast")
    with pytest.raises(ValueError, match=r"compile\['regions'\] must be True or False"):
        surgery.generate(tiny_llama, PROMPTS, 4, cache="static", compile={"regions": "yes"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing attached: no warning, the plain step compiles
        plain = surgery.generate(tiny_llama, PROMPTS, 8, cache="static", compile=ON_CPU)
    assert plain.token_ids == surgery.generate(tiny_llama, PROMPTS, 8).token_ids


# ---- continuous batching: one compiled step for the whole pool, admissions never recompile ----
POOL_PROMPTS = [*PROMPTS, "x", PROMPTS[0], "Another question here"]
POOL_BUDGETS = [5, 20, 9, 14, 3, 7, 11]


def pool_stack(model):
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5
    return [SteeringVector(vector, layer=1, when=surgery.OnText("\n\n")), TokenMask(["Hmm"], penalty=-4.0),
            ThinkingTokenInsertion(words=(" Wait",), budget=4, answer_prompt=" So", answer_tokens=2, first_budget=6)]


@pytest.mark.parametrize("compile", [ON_CPU, True], ids=["eager-backend", "inductor"])
def test_a_compiled_pool_gives_each_prompt_its_alone_tokens_in_one_graph(tiny_llama, compile):
    """``compile=True`` on a CPU is inductor (the real compiler): rows admitted into freed slots
    mid-run reuse the one compiled step (the static cache and mask are edited in place)."""
    counters.clear()
    blocks = pool_stack(tiny_llama)
    with surgery.trace(tiny_llama, *blocks) as tr:
        pooled = tr.generate(POOL_PROMPTS, POOL_BUDGETS, chat=True, cache="static", compile=compile, batch_size=3)
    assert counters["stats"]["unique_graphs"] <= 1 and sum(counters["graph_break"].values()) == 0
    for i, prompt in enumerate(POOL_PROMPTS):
        alone = pool_stack(tiny_llama)
        with surgery.trace(tiny_llama, *alone) as tr:
            single = tr.generate([prompt], POOL_BUDGETS[i], chat=True)
        assert pooled.token_ids[i] == single.token_ids[0] and pooled.stop_reasons[i] == single.stop_reasons[0]
        assert [b.by_row()[i] for b in blocks] == [b.by_row()[0] for b in alone]


def test_a_compiled_pool_with_a_steering_vector_per_row_is_one_graph(tiny_llama):
    """Distinct vectors and alphas per row (a per-row table, surgery/decode/row_tables.py) sit in
    device buffers written at admission: the pool still compiles once, each row as alone."""
    def vectors():
        gen = torch.Generator().manual_seed(1)
        return [SteeringVector(torch.randn(tiny_llama.d_model, generator=gen) * 5, layer=1, alpha=(0.5, 1.0, -2.0)[i % 3],
                               when=surgery.OnText("\n\n") | surgery.StepWindow(2, 4)) for i in range(4)]

    blocks = vectors()
    carried = [i % 5 for i in range(len(POOL_PROMPTS))]  # 4: no vector
    counters.clear()
    with surgery.trace(tiny_llama, *blocks) as tr:
        pooled = tr.generate(POOL_PROMPTS, POOL_BUDGETS, chat=True, cache="static", compile=ON_CPU, batch_size=3,
                             stacks=[[blocks[c]] if c < 4 else [] for c in carried])
    assert counters["stats"]["unique_graphs"] <= 1 and sum(counters["graph_break"].values()) == 0
    for i, prompt in enumerate(POOL_PROMPTS):
        alone = [vectors()[carried[i]]] if carried[i] < 4 else []
        with surgery.trace(tiny_llama, *alone) as tr:
            single = tr.generate([prompt], POOL_BUDGETS[i], chat=True)
        assert pooled.token_ids[i] == single.token_ids[0] and pooled.stop_reasons[i] == single.stop_reasons[0]
        if alone:
            assert blocks[carried[i]].fired()[i] == alone[0].fired()[0]


def test_a_study_of_three_conditions_is_one_compile(tmp_path):
    """``[generation] cache = "static", compile = true``: every condition's rows share one pool and
    one compiled decode step (inductor on the CPU); each record as in the eager study."""
    from test_runner import by_key, write_study

    from experiments.runner import run_study
    from experiments.study_config import load_study_config

    def study(folder, **generation):
        path = write_study(folder, conditions=["plain", "seal", "mask"], **generation)
        text = path.read_text()
        path.write_text(text[: text.index("[probes]")])  # graph-safe interventions only
        return load_study_config(path)

    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    eager = by_key(run_study(study(tmp_path / "eager"), progress=False, continuous=False))
    counters.clear()
    compiled = by_key(run_study(study(tmp_path / "compiled", cache="static", compile=True), progress=False))
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["graph_break"].values()) == 0
    assert sorted(compiled) == sorted(eager)
    for key in eager:
        assert (compiled[key]["token_ids"], compiled[key]["fired"]) == (eager[key]["token_ids"], eager[key]["fired"]), key


# ---- each decoder block compiled once for all layers (surgery/decode/block_regions.py) ----
def capturing(regions: bool):
    """torch.compile options whose backend keeps each graph dynamo hands it (and runs it as is)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    return graphs, {"backend": backend, "fullgraph": True, "regions": regions}


def region_calls(graph) -> list[str]:
    """The nested compile region each ``invoke_subgraph`` call of ``graph`` runs, in order."""
    return [node.args[1] for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]


@pytest.mark.parametrize("site", ["resid_pre.1", "attn_out.1"])
def test_the_blocks_are_one_region_stamped_out_per_layer_with_eager_tokens(tiny_llama, site):
    """A hook on a block (resid_pre) leaves every block one region, traced once; a hook inside one
    (attn_out) makes dynamo inline that block (compiled on its own). Either way the tokens and firings are the eager step's,
    and after the run the blocks' forwards are their own again."""
    from interventions import ResidualAdd

    def blocks():
        vector = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(2)) * 5
        return [ResidualAdd(vector, site=site, when=surgery.StepWindow(1, 6)), TokenMask(["Hmm"], penalty=-4.0)]

    with surgery.trace(tiny_llama, *(eager_blocks := blocks())) as tr:
        eager = tr.generate(PROMPTS, NEW_TOKENS, chat=True, cache="static")
    torch._dynamo.reset()  # a first compile: a cache length seen before makes dynamo recompile
    # with dynamic shapes, and such a recompile inlines the blocks again (their own compile each)
    layers = tiny_llama.architecture.block_list(tiny_llama.module)
    calls = {}
    for regions in (True, False):
        graphs, options = capturing(regions)
        with surgery.trace(tiny_llama, *(compiled_blocks := blocks())) as tr:
            compiled = tr.generate(PROMPTS, NEW_TOKENS, chat=True, cache="static", compile=options)
        assert compiled.token_ids == eager.token_ids
        assert [b.by_row() for b in compiled_blocks] == [b.by_row() for b in eager_blocks]
        assert len(graphs) == 1 and not any("forward" in vars(layer) for layer in layers)
        calls[regions] = region_calls(graphs[0])
    assert calls[False] == []
    inside = site.startswith("attn_out")
    assert len(calls[True]) == len(layers) - inside and len(set(calls[True])) == 1


def test_each_pool_compiles_for_its_own_shape_never_with_symbolic_sizes(tiny_llama):
    """A pool has one cache shape for its whole run: a second pool of another length in the same
    process gets a graph of its own sizes (dynamo would otherwise recompile with symbolic sizes,
    a slower step), with tokens as each prompt alone."""
    torch._dynamo.reset()
    seen = []
    for budgets in (POOL_BUDGETS, [b + 5 for b in POOL_BUDGETS]):
        graphs, options = capturing(True)
        with surgery.trace(tiny_llama, *pool_stack(tiny_llama)) as tr:
            pooled = tr.generate(POOL_PROMPTS, budgets, chat=True, cache="static", compile=options, batch_size=3)
        assert len(graphs) == 1
        seen.append([value for value in graphs[0].graph.nodes if value.op == "placeholder"])
        with surgery.trace(tiny_llama, *pool_stack(tiny_llama)) as tr:
            single = tr.generate([POOL_PROMPTS[1]], budgets[1], chat=True)
        assert pooled.token_ids[1] == single.token_ids[0]
    for placeholders in seen:
        assert not any(isinstance(node.meta.get("example_value"), torch.SymInt) for node in placeholders)
        assert not any(isinstance(node.meta.get("example_value"), torch.Tensor) and
                       any(isinstance(size, torch.SymInt) for size in node.meta["example_value"].shape)
                       for node in placeholders)
