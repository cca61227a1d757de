"""Tests for segment_mean_update: the torch reference, the Triton kernel against it, the dispatcher.

Mirrors surgery/kernels/segment_mean_update.py, with the pieces of the op beside it
(reference.py's segment_mean_update and triton_segment_mean_update.py), as one test file per
kernel op. Without a GPU the Triton kernel runs in the interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1 before triton is imported).
"""

import doctest
import importlib

import pytest
import torch
from tolerance import assert_close

import surgery.kernels as kernels
from probes import ReasoningGraph
from surgery.kernels import kernel_backend, reference, segment_mean_update
from surgery.sites import Site
from surgery.step import Step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (batch, d, capacity): batch 1, odd and non-power-of-two widths; 2500 is wider than the
# kernel's largest BLOCK (1024), so it loops over d with a partial last block. Small
# capacities make some rows run past the buffer's end (those writes are skipped).
SHAPES = [(1, 1, 1), (3, 33, 4), (2, 576, 8), (4, 1000, 3), (2, 2500, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


def _state(batch, d, capacity, device=DEVICE):
    """Fresh (total, count, buffer, n_steps), the buffer filled with a marker value."""
    return (
        torch.zeros(batch, d, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.full((batch, capacity, d), -7.0, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )


def _steps(batch, d, dtype, n_steps=6, seed=0, device=DEVICE):
    """Per decode step: (x, valid, ended, keep); x is the last position of a [batch, 3, d] state,
    as ReasoningGraph passes it (a strided view)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        x = (3 * torch.randn(batch, 3, d, generator=gen)).to(dtype=dtype, device=device)[:, -1]
        valid = torch.rand(batch, generator=gen) < 0.8
        ended = (torch.rand(batch, generator=gen) < 0.5) & valid
        keep = ended & (torch.rand(batch, generator=gen) < 0.7)
        out.append((x, valid.to(device), ended.to(device), keep.to(device)))
    return out


def _run(steps, state, backend):
    for x, valid, ended, keep in steps:
        segment_mean_update(x, valid, ended, keep, *state, backend=backend)
    return state


class StubModel:
    """What ReasoningGraph.bind() reads from a model, over a made-up vocabulary (no weights)."""

    def __init__(self, texts, width, n_layers=2):
        self.vocabulary_texts, self.d_model, self.n_layers = texts, width, n_layers
        self.device = torch.device("cpu")

    def resolve_site(self, site):
        return Site.parse(site).resolve(self.n_layers)

    def site_width(self, site):
        return self.d_model


# --- Triton kernel vs reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(needs_triton, shape, dtype):
    batch, d, capacity = shape
    steps = _steps(batch, d, dtype)
    got = _run(steps, _state(*shape), "triton")
    want = _run(steps, _state(*shape), "torch")
    # Bit for bit: float32 adds and one IEEE division per element, in the same order as torch.
    for name, a, b in zip(("total", "count", "buffer", "n_steps"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int(want[3].max()) > 0  # some steps were kept


def test_triton_reads_strided_inputs_without_changing_them(needs_triton):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 2 * 65, 4, generator=gen).to(DEVICE)
    x = hidden[:, ::2, 1]  # [3, 65], a stride in the last dim too: the launcher copies it
    flags = torch.tensor([[True, False], [True, True], [False, True]], device=DEVICE)
    valid, ended, keep = flags[:, 0], flags[:, 1], flags[:, 1]  # not contiguous
    assert not x.is_contiguous() and not valid.is_contiguous()
    before = hidden.clone()
    got = _run([(x, valid, ended, keep)] * 2, _state(3, 65, 4), "triton")
    want = _run([(x, valid, ended, keep)] * 2, _state(3, 65, 4), "torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("shape", [(0, 16, 4), (2, 0, 4), (2, 8, 0)], ids=str)
def test_triton_empty(needs_triton, shape):
    batch, d, capacity = shape
    flags = torch.ones(batch, dtype=torch.bool, device=DEVICE)
    x = torch.ones(batch, d, device=DEVICE)
    for backend in ("triton", "torch"):
        total, count, buffer, n_steps = state = _state(*shape)
        segment_mean_update(x, flags, flags, flags, *state, backend=backend)
        # counts and step counters move even when there is nothing to pool or no slot
        assert count.tolist() == [0] * batch and n_steps.tolist() == [1] * batch, backend


def test_triton_rejects_an_x_dtype_it_lacks(needs_triton):
    float8 = getattr(torch, "float8_e4m3fn", None)
    if float8 is None:
        pytest.skip("this torch has no float8")
    state = _state(2, 8, 4)
    flags = torch.ones(2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="no torch.float8_e4m3fn version of x"):
        segment_mean_update(torch.zeros(2, 8, device=DEVICE).to(float8), flags, flags, flags, *state,
                            backend="triton")


def test_the_kernel_uses_the_one_dtype_list(needs_triton):
    triton_module = importlib.import_module("surgery.kernels.triton_segment_mean_update")
    dispatcher = importlib.import_module("surgery.kernels.segment_mean_update")

    assert callable(triton_module.segment_mean_update_triton)
    assert kernels.segment_mean_update is segment_mean_update
    assert triton_module.TRITON_X_DTYPES is dispatcher.TRITON_X_DTYPES


def test_reasoning_graph_gives_the_same_steps_on_both_backends(needs_triton, monkeypatch):
    # The probe's whole streaming path, run once per backend (the kernel in the interpreter).
    texts = ["abcdef\n", " x\n", "\n", "  hello world \n", "abc", " ", "de"]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(len(texts), (2, 90), generator=generator)
    values = torch.randn(2, 90, 5, generator=generator).to(torch.bfloat16)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SURGERY_KERNELS", backend)
        probe = ReasoningGraph(site="resid_pre.1", min_chars=2)
        probe.bind(StubModel(texts, width=5))
        probe.reset(2)
        step = Step.prefill(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
        finished = torch.zeros(2, dtype=torch.bool)
        with torch.inference_mode():
            for k in range(90):
                finished = finished | torch.tensor([False, k >= 70])
                step = step.next(tokens[:, k], finished, (None, None))
                probe.observe("resid_pre.1", values[:, k : k + 1], step)
        results.append(probe.result())
    assert [len(r) for r in results[0]] == [len(r) for r in results[1]] and len(results[0][0]) > 10
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- dispatcher (the backend choice itself: tests/test_backend.py) ---------------------------


def test_env_torch_forces_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    (x, valid, ended, keep), = _steps(2, 8, torch.float32, n_steps=1)
    state = _state(2, 8, 4)
    assert kernel_backend(state[0]) == "torch"
    calls = []
    real = reference.segment_mean_update
    monkeypatch.setattr(reference, "segment_mean_update", lambda *a: calls.append(a) or real(*a))
    segment_mean_update(x, valid, ended, keep, *state)
    assert len(calls) == 1


def test_env_triton_forces_triton(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    (x, valid, ended, keep), = _steps(2, 8, torch.float32, n_steps=1)
    state = _state(2, 8, 4)
    assert kernel_backend(state[0]) == "triton"
    monkeypatch.setattr(reference, "segment_mean_update", lambda *a: pytest.fail("used torch"))
    segment_mean_update(x, valid, ended, keep, *state)
    assert torch.equal(state[1], valid.long().masked_fill(ended, 0))


def test_a_bad_env_value_reaches_the_dispatcher(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    (x, valid, ended, keep), = _steps(1, 4, torch.float32, n_steps=1)
    with pytest.raises(ValueError, match="SURGERY_KERNELS"):
        segment_mean_update(x, valid, ended, keep, *_state(1, 4, 2))


def test_default_backend_is_the_reference_on_cpu(no_env):
    cpu = torch.device("cpu")
    steps = _steps(3, 40, torch.bfloat16, device=cpu)
    got = _run(steps, _state(3, 40, 8, device=cpu), None)
    want = _run(steps, _state(3, 40, 8, device=cpu), "torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_reference_semantics():
    # Row 0: tokens 1, 3 (ends, kept), 10 (ends, not kept), 20 (ends, kept), then one past the
    # buffer's end. Row 1: invalid at step 1, then 4 and 6 (ends, kept).
    xs = [[1.0, 5.0], [3.0, 4.0], [10.0, 6.0], [20.0, 2.0]]
    valid = [[True, False], [True, True], [True, True], [True, True]]
    ended = [[False, False], [True, False], [True, True], [True, False]]
    keep = [[False, False], [True, False], [False, True], [True, False]]
    total, count, buffer, n_steps = state = _state(2, 1, 2, device=torch.device("cpu"))
    for k in range(4):
        reference.segment_mean_update(torch.tensor(xs[k])[:, None], torch.tensor(valid[k]), torch.tensor(ended[k]),
                                      torch.tensor(keep[k]), *state)
    assert buffer[0, :, 0].tolist() == [2.0, 20.0]  # mean(1, 3); 10 was overwritten by 20
    assert buffer[1, :, 0].tolist() == [5.0, -7.0]  # mean(4, 6); the marker is untouched
    assert n_steps.tolist() == [2, 1] and count.tolist() == [0, 1] and total[:, 0].tolist() == [0.0, 2.0]
    # n_steps[0] == capacity: an ended row writes nothing (never out of bounds), still advances
    one = torch.tensor([True, False])
    reference.segment_mean_update(torch.tensor([[9.0], [0.0]]), one, one, one, *state)
    assert buffer[:, :, 0].tolist() == [[2.0, 20.0], [5.0, -7.0]] and n_steps.tolist() == [3, 1]


# --- input checks ---------------------------------------------------------------------------


def _args(**overrides):
    cpu = torch.device("cpu")
    flags = torch.tensor([True, False])
    args = dict(x=torch.zeros(2, 8), valid=flags, ended=flags, keep=flags)
    args.update(zip(("total", "count", "buffer", "n_steps"), _state(2, 8, 4, device=cpu)))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(x=torch.zeros(2, 9)), "x shape (2, 9) does not match total's [batch, d] = (2, 8)"),
        (dict(x=torch.zeros(2, 3, 8)), "hidden[:, -1]"),
        (dict(x=torch.zeros(2, 8, dtype=torch.long)), "x.float()"),
        (dict(valid=torch.ones(2, dtype=torch.long)), "valid.bool()"),
        (dict(ended=torch.ones(3, dtype=torch.bool)), "ended must be [batch] = (2,)"),
        (dict(total=torch.zeros(2, 8, dtype=torch.float64)), "total (the running sums) must be a float32"),
        (dict(count=torch.zeros(2, dtype=torch.int32)), "count must be an int64 [batch]"),
        (dict(n_steps=torch.zeros(3, dtype=torch.long)), "n_steps must be an int64 [batch]"),
        (dict(buffer=torch.zeros(2, 4, 9)), "buffer must be a float32 [batch, capacity, d]"),
        (dict(keep=torch.ones(2, dtype=torch.bool, device="meta")), "keep.to(total.device)"),
        (dict(buffer=torch.zeros(2, 8, 4).transpose(1, 2)), "buffer must be contiguous"),
        (dict(total=torch.zeros(8, 2).t()), "total must be contiguous"),
    ],
    ids=["x-width", "x-3d", "x-int", "valid-dtype", "ended-shape", "total-dtype", "count-dtype",
         "n_steps-shape", "buffer-width", "keep-device", "buffer-strided", "total-strided"],
)
def test_input_errors(no_env, overrides, message):
    with pytest.raises(ValueError) as info:
        segment_mean_update(**_args(**overrides))
    assert message in str(info.value)


def test_bad_backend_and_types(no_env):
    with pytest.raises(ValueError, match="backend must be"):
        segment_mean_update(**_args(), backend="cuda")
    # ours outside pytest, jaxtyping's (the annotations are checked under pytest) here
    with pytest.raises(TypeError, match="x must be a torch.Tensor|parameter 'x'"):
        segment_mean_update(**_args(x=[[0.0] * 8] * 2))


def test_docstring_examples(no_env):
    for module in (importlib.import_module("surgery.kernels.segment_mean_update"), reference):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
