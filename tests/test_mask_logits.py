"""Tests for mask_logits: the torch reference, the Triton kernels against it, the checked dispatcher.

Mirrors surgery/kernels/mask_logits.py, with the pieces of the op beside it (reference.py's
mask_logits and triton_mask_logits.py), as one test file per kernel op. Without a GPU the Triton
kernels run in the interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before triton
is imported). Token edits and masks are compared exactly: the kernel rounds as torch does.
"""

import doctest
import importlib

import pytest
import torch

import surgery.kernels as kernels
from surgery.kernels import backend, kernel_backend, mask_logits, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Odd and non-power-of-two vocabularies; 9000 and 4097 are wider than the kernel's BLOCK (4096),
# so a row spans several programs with a partial last one. [batch, pos, vocab] too.
SHAPES = [(1, 1), (3, 33), (2, 5, 77), (4, 1000), (2, 9000), (1, 2, 4097)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PENALTIES = [None, -2.7, 0.0]
CONFIGS = ["vocab", "all", "forced", "nothing"]


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


def _inputs(shape, dtype, config="all", seed=0, device=DEVICE, levels=None):
    """Logits and the optional masks; ``levels`` draws integer logits (many exact ties)."""
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = shape[:-1], shape[-1]
    if levels is None:
        logits = 3 * torch.randn(shape, generator=gen)
    else:
        logits = torch.randint(levels, shape, generator=gen).float()
    forced = torch.where(torch.rand(rows, generator=gen) < 0.5, torch.randint(vocab, rows, generator=gen), -1)
    options = {
        "vocab_mask": torch.rand(vocab, generator=gen) < 0.3,
        "extra_mask": torch.rand(shape, generator=gen) < 0.1,
        "active": torch.rand(rows, generator=gen) < 0.7,
        "forced": forced,
    }
    keep = {"vocab": ("vocab_mask",), "all": tuple(options), "forced": ("forced",), "nothing": ()}[config]
    options = {name: value.to(device) for name, value in options.items() if name in keep}
    return logits.to(dtype=dtype, device=device), options


def _split(options):
    options = dict(options)
    return options.pop("vocab_mask", None), options


# --- Triton kernels vs reference ------------------------------------------------------------


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(needs_triton, shape, dtype, config, penalty):
    logits, options = _inputs(shape, dtype, config)
    vocab_mask, rest = _split(options)
    before = logits.clone()

    edited, top_masked = mask_logits(logits, vocab_mask, penalty, **rest, backend="triton")
    expected, expected_top = reference.mask_logits(logits, vocab_mask, penalty, **rest)

    assert edited.shape == logits.shape and edited.dtype == dtype and edited.device == logits.device
    assert top_masked.shape == shape[:-1] and top_masked.dtype == torch.bool
    # bit for bit: the penalty and the sum are rounded as torch rounds them; -inf and 0 exact
    assert torch.equal(edited, expected)
    assert torch.equal(top_masked, expected_top)
    assert torch.equal(logits, before)
    assert edited.data_ptr() != logits.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_top_token_follows_torch_argmax_on_ties_and_nan(needs_triton, dtype):
    # integer logits: exact ties within and across the kernel's blocks; then NaNs in some rows
    # (torch.argmax: the first NaN wins), a row of -inf and a row all equal
    logits, options = _inputs((8, 9000), dtype, "all", seed=3, levels=4)
    logits[1, 6000] = logits[1, 8500] = float("nan")
    logits[2, 100] = float("nan")
    logits[3] = float("-inf")
    logits[4] = 1.0
    logits[5, 5000] = float("inf")
    vocab_mask, rest = _split(options)
    for penalty in (None, -1.5):
        edited, top_masked = mask_logits(logits, vocab_mask, penalty, **rest, backend="triton")
        expected, expected_top = reference.mask_logits(logits, vocab_mask, penalty, **rest)
        torch.testing.assert_close(edited, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(top_masked, expected_top)
        # the mask decides top_masked: hitting every odd token must change it on some rows
        odd = torch.arange(9000, device=DEVICE) % 2 == 1
        assert torch.equal(mask_logits(logits, odd, penalty, backend="triton")[1],
                           reference.mask_logits(logits, odd, penalty)[1])
    # the top's first occurrence is in the second block, a tie in the third: the first wins
    row = torch.zeros(1, 9000, dtype=dtype, device=DEVICE)
    row[0, 5001] = row[0, 8200] = 2.0
    only = torch.zeros(9000, dtype=torch.bool, device=DEVICE)
    for hit, expected in ((5001, True), (8200, False)):
        only[:] = False
        only[hit] = True
        assert mask_logits(row, only, backend="triton")[1].tolist() == [expected]
        assert reference.mask_logits(row, only)[1].tolist() == [expected]


@pytest.mark.parametrize("penalty", [None, -2.0])
def test_forced_rows_are_one_hot_whatever_the_mask(needs_triton, penalty):
    logits, _ = _inputs((3, 5000), torch.float32)
    banned = torch.ones(5000, dtype=torch.bool, device=DEVICE)  # even the forced tokens
    forced = torch.tensor([4999, -1, 0], device=DEVICE)
    for choice in ("torch", "triton"):
        edited, _ = mask_logits(logits, banned, penalty, forced=forced, backend=choice)
        assert edited.argmax(-1)[0] == 4999 and edited.argmax(-1)[2] == 0
        for row in (0, 2):
            assert edited[row, forced[row]] == 0 and torch.isneginf(edited[row]).sum() == 4999
        assert torch.equal(edited[1], reference.mask_logits(logits[1:2], banned, penalty)[0][0])


def test_triton_non_contiguous_inputs(needs_triton):
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(3, 6, 2 * 301, generator=gen).to(DEVICE)
    logits = full[:, -2:, ::2]  # [3, 2, 301], strided (the trace hands blocks such slices)
    vocab_mask = (torch.rand(2 * 301, generator=gen) < 0.3).to(DEVICE)[::2]
    extra = (torch.rand(301, generator=gen) < 0.2).to(DEVICE).expand(3, 2, 301)  # stride 0
    active = (torch.rand(2, 3, generator=gen) < 0.5).to(DEVICE).t()
    assert not logits.is_contiguous() and not vocab_mask.is_contiguous() and not active.is_contiguous()
    before = logits.clone()

    out = mask_logits(logits, vocab_mask, -1.0, extra_mask=extra, active=active, backend="triton")

    expected = reference.mask_logits(logits, vocab_mask, -1.0, extra, active)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 0, 8)], ids=str)
def test_triton_empty(needs_triton, shape):
    logits, options = _inputs(shape, torch.float32)
    vocab_mask, rest = _split(options)
    edited, top_masked = mask_logits(logits, vocab_mask, None, **rest, backend="triton")
    assert edited.shape == logits.shape and top_masked.shape == shape[:-1]


def test_triton_rejects_unsupported_dtype(needs_triton):
    logits, _ = _inputs((2, 8), torch.float64)
    with pytest.raises(ValueError, match="no torch.float64"):
        mask_logits(logits, backend="triton")


def test_the_kernel_uses_the_one_dtype_list(needs_triton):
    triton_mask_logits = importlib.import_module("surgery.kernels.triton_mask_logits")

    assert callable(triton_mask_logits.mask_logits_triton)
    assert kernels.mask_logits is mask_logits
    assert triton_mask_logits.TRITON_DTYPES is backend.TRITON_DTYPES


# --- dispatcher (the backend choice itself: tests/test_backend.py) ---------------------------


def test_env_torch_forces_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    logits, options = _inputs((2, 8), torch.float32)
    vocab_mask, rest = _split(options)
    assert kernel_backend(logits) == "torch"

    calls = []
    real = reference.mask_logits

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "mask_logits", spy)
    edited, _ = mask_logits(logits, vocab_mask, -2.0, **rest)
    assert len(calls) == 1
    assert torch.equal(edited, real(logits, vocab_mask, -2.0, **rest)[0])


def test_env_triton_forces_triton(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    logits, options = _inputs((2, 8), torch.float32)
    assert kernel_backend(logits) == "triton"
    monkeypatch.setattr(reference, "mask_logits", lambda *a, **k: pytest.fail("used torch"))
    edited, _ = mask_logits(logits, options["vocab_mask"])
    assert edited.shape == logits.shape


def test_a_bad_env_value_reaches_the_dispatcher(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    logits, _ = _inputs((2, 4), torch.float32)
    with pytest.raises(ValueError, match="SURGERY_KERNELS"):
        mask_logits(logits)


def test_default_backend_matches_reference_exactly(no_env):
    logits, options = _inputs((3, 7, 300), torch.float32, device=torch.device("cpu"))
    vocab_mask, rest = _split(options)
    edited, top_masked = mask_logits(logits, vocab_mask, -2.5, **rest)
    expected, expected_top = reference.mask_logits(logits, vocab_mask, -2.5, **rest)
    assert torch.equal(edited, expected) and torch.equal(top_masked, expected_top)


def test_reference_semantics():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.5], [1.0, 5.0, 2.0, 0.5], [1.0, 5.0, 2.0, 0.5]])
    vocab_mask = torch.tensor([False, True, False, False])
    extra = torch.tensor([[False] * 4, [False, False, True, False], [False] * 4])
    active = torch.tensor([True, True, False])
    forced = torch.tensor([-1, -1, 3])
    inf = float("inf")

    edited, top = reference.mask_logits(logits, vocab_mask, -3.0, extra, active, forced)
    assert torch.equal(edited, torch.tensor([[1.0, 2.0, 2.0, 0.5], [1.0, 2.0, -1.0, 0.5], [-inf, -inf, -inf, 0.0]]))
    assert top.tolist() == [True, True, False]  # row 2 is inactive: its top was not masked
    edited, _ = reference.mask_logits(logits, vocab_mask, None, extra, active)
    assert torch.equal(edited[1], torch.tensor([1.0, -inf, -inf, 0.5])) and torch.equal(edited[2], logits[2])
    # bfloat16: the penalty is rounded to bfloat16 first, as `logits + penalty` on the CPU
    half = logits.bfloat16()
    assert torch.equal(reference.mask_logits(half, vocab_mask, -2.7)[0], torch.where(vocab_mask, half + -2.7, half))


# --- input checks ---------------------------------------------------------------------------


def _bad(**replace):
    logits, options = _inputs((2, 3, 8), torch.float32, device=torch.device("cpu"))
    args = {"logits": logits, **options}
    args.update(replace)
    logits = args.pop("logits")
    return (logits, args.pop("vocab_mask")), args


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"vocab_mask": torch.zeros(7, dtype=torch.bool)}, "expected (8,), one entry per vocabulary token"),
        ({"vocab_mask": torch.zeros(8, dtype=torch.long)}, "vocab_mask.bool()"),
        ({"extra_mask": torch.zeros(2, 3, dtype=torch.bool)}, "expected (2, 3, 8), one entry per logit"),
        ({"active": torch.ones(2, dtype=torch.bool)}, "active shape (2,) does not fit logits (2, 3, 8)"),
        ({"active": torch.ones(2, 3)}, "active.bool()"),
        ({"forced": torch.zeros(2, 3, dtype=torch.int32)}, "forced.long()"),
        ({"forced": torch.full((2, 3), 8)}, "outside [-1, 8)"),
        ({"forced": torch.full((2, 3), -2)}, "outside [-1, 8)"),
        ({"logits": torch.zeros(8)}, "logits.unsqueeze(0)"),
        ({"logits": torch.zeros(2, 3, 8, dtype=torch.long)}, "floating dtype"),
        ({"logits": torch.zeros(2, 3, 0), "vocab_mask": None, "extra_mask": None}, "empty vocabulary"),
        ({"vocab_mask": torch.zeros(8, dtype=torch.bool, device="meta")}, "vocab_mask.to(logits.device)"),
        ({"active": torch.ones(2, 3, dtype=torch.bool, device="meta")}, "active.to(logits.device)"),
    ],
    ids=["vocab-width", "vocab-dtype", "extra-shape", "active-shape", "active-dtype", "forced-dtype",
         "forced-high", "forced-low", "logits-1d", "logits-int", "logits-empty", "vocab-device", "active-device"],
)
def test_input_errors(no_env, replace, message):
    args, options = _bad(**replace)
    with pytest.raises(ValueError) as info:
        mask_logits(*args, -1.0, **options)
    assert message in str(info.value)


def test_bad_backend_penalty_and_types(no_env):
    (logits, vocab_mask), _ = _bad()
    with pytest.raises(ValueError, match="backend must be"):
        mask_logits(logits, vocab_mask, backend="cuda")
    for penalty in (torch.tensor(2.0), float("inf"), float("nan"), True):
        with pytest.raises(TypeError, match="penalty"):
            mask_logits(logits, vocab_mask, penalty)
    # our message outside pytest, jaxtyping's (which names the parameter too) under it
    with pytest.raises(TypeError, match="vocab_mask"):
        mask_logits(logits, [True] * 8)
    with pytest.raises(TypeError, match="logits"):
        mask_logits(logits.tolist())


def test_docstring_examples(no_env):
    for module in (importlib.import_module("surgery.kernels.mask_logits"), reference):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
