"""What the HTTP layer asks of the server: the loaded model, its scheduler, and a request turned into a job.

:class:`ServerSettings` holds what ``surgery serve`` was started with; :class:`Server` loads the
model, starts the :class:`~experiments.serving.scheduler.Scheduler` and checks each request
before it queues: the model name (or a preset stack's name), the prompt against the context, the
token budget against the server's limit, the stop strings, unsupported OpenAI fields, and the
request's blocks (:mod:`experiments.serving.request_blocks`). What fails is a
:class:`~experiments.serving.errors.RequestError` naming the field; nothing has run yet.

Presets (``--stack NAME=FILE.json``, a JSON object with ``interventions`` and/or ``probes``)
serve a stack under a model name of its own, for evaluation harnesses that cannot add fields to
a request: ``model: "NAME"`` runs the preset's blocks, then any the request adds.

Example::

    server = Server(ServerSettings(slots=8, files=Path("vectors")))
    job = server.chat_job(ChatBody.model_validate(body), send=print)
    server.scheduler.submit(job)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import surgery
from experiments.serving.errors import RequestError, unknown_model
from experiments.serving.request_blocks import RequestStack, parse_stack
from experiments.serving.request_schema import ChatBody, CompletionBody
from experiments.serving.scheduler import Job, Scheduler

__all__ = ["Server", "ServerSettings", "read_preset"]


@dataclass
class ServerSettings:
    """How ``surgery serve`` was started.

    Attributes:
        model: None for the embedded SmolLM2-135M-Instruct, else an HF id, folder or .gguf file.
        model_id: the name clients give as ``model`` (default: the model's folder or file name).
        device, dtype: where and how the model is loaded (defaults as :func:`surgery.load`).
        slots: rows decoded together.
        max_tokens: the most tokens one completion may ask for.
        max_queue: requests that may wait before the server answers 429.
        files: the directory ``from`` files are read from (None: none are).
        presets: model name -> a stack (``{"interventions": [...], "probes": [...]}``).
        cache: the decode step's KV cache, ``"dynamic"`` or ``"static"``.
    """

    model: str | None = None
    model_id: str | None = None
    device: str | None = None
    dtype: str | None = None
    slots: int = 8
    max_tokens: int = 2048
    max_queue: int = 256
    files: Path | None = None
    presets: dict[str, dict] = field(default_factory=dict)
    cache: str = "dynamic"


def read_preset(text: str) -> tuple[str, dict]:
    """``NAME=FILE.json`` (the ``--stack`` option) as ``(name, stack)``.

    Raises:
        ValueError: not NAME=FILE, an unreadable file, or JSON that is not such an object.
    """
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--stack takes NAME=FILE.json, got {text!r}")
    stack = json.loads(Path(path).read_text())
    if not isinstance(stack, dict) or not set(stack) <= {"interventions", "probes"}:
        raise ValueError(f"{path}: expected a JSON object with 'interventions' and/or 'probes' lists")
    return name, stack


class Server:
    """The model, its scheduler and the checks before a request queues (module docstring).

    Args:
        settings: how the server was started.
        model: an already loaded model (tests); None loads ``settings.model``.
    """

    def __init__(self, settings: ServerSettings, model: surgery.Model | None = None):
        import torch

        self.settings = settings
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        self.model = model if model is not None else surgery.load(settings.model, device=settings.device, dtype=dtype)
        self.model_id = settings.model_id or Path(str(self.model.name)).name
        for name in settings.presets:  # refuse a bad preset at start, not per request
            try:
                self._preset_stack(name, rows=1)
            except RequestError as error:
                raise ValueError(f"--stack {name}: {error.param}: {error.message}") from None
        self.scheduler = Scheduler(self.model, settings.slots, settings.max_queue, settings.cache, settings.max_tokens)

    @property
    def model_ids(self) -> list[str]:
        """The names ``model`` may take: the model's, then the presets'."""
        return [self.model_id, *self.settings.presets]

    def close(self) -> None:
        """Stop the decode thread."""
        self.scheduler.close()

    def chat_job(self, body: ChatBody, send) -> Job:
        """Check a chat request and make its job (``send`` receives its events).

        Raises:
            RequestError: naming the field and the fix.
        """
        body.check_supported()
        tokenizer = self.model.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("messages", f"{self.model_id}'s tokenizer has no chat template: use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(body.user_messages(), tokenize=False, add_generation_prompt=True)
        except RequestError:
            raise
        except Exception as error:  # noqa: BLE001 (the template may refuse a message order)
            raise RequestError("messages", f"the chat template refused these messages: {error}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._job(body, [ids], "messages", send)

    def completion_job(self, body: CompletionBody, send) -> Job:
        """Check a completions request and make its job.

        Raises:
            RequestError: naming the field and the fix.
        """
        body.check_supported()
        prompts = body.prompt_list()
        if all(isinstance(p, str) for p in prompts):
            rows = self.model.tokenizer(prompts)["input_ids"]
        else:
            rows = [list(p) for p in prompts]
            vocab = self.model.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for row in rows for t in row):
                raise RequestError("prompt", f"token ids must be integers in 0..{vocab - 1}")
        return self._job(body, rows, "prompt", send)

    def _job(self, body, rows: list[list[int]], prompt_field: str, send) -> Job:
        if body.model not in self.model_ids:
            raise unknown_model(body.model, self.model_ids)
        if any(len(row) == 0 for row in rows):
            raise RequestError(prompt_field, "the prompt encodes to no tokens: give some text")
        context, longest = self.model.max_context, max(len(row) for row in rows)
        limit = self.settings.max_tokens
        budget = body.budget()
        if context is not None and longest >= context:
            raise RequestError(prompt_field, f"the prompt has {longest} tokens; {self.model_id}'s context holds "
                               f"{context}: shorten it", code="context_length_exceeded")
        if budget is None:
            budget = limit if context is None else min(limit, context - longest)
        if budget > limit:
            raise RequestError("max_tokens", f"asks for {budget} tokens; this server allows at most {limit} per "
                               f"completion: lower max_tokens (or start the server with a larger --max-tokens)")
        if context is not None and longest + budget > context:
            raise RequestError("max_tokens", f"the prompt has {longest} tokens, and {longest} + max_tokens {budget} "
                               f"exceeds {self.model_id}'s context of {context}: lower max_tokens to at most "
                               f"{context - longest}", code="context_length_exceeded")
        n_rows = len(rows) * body.n
        stack = parse_stack(body.interventions, body.probes, files=self.settings.files, model=self.model, rows=n_rows)
        if body.model in self.settings.presets:
            stack = self._preset_stack(body.model, n_rows) + stack
        return Job(prompts=rows, n=body.n, max_tokens=budget, greedy=body.greedy, temperature=body.temperature,
                   top_p=body.top_p, seed=body.seed, stops=body.stops(), stream=body.stream, stack=stack, send=send)

    def _preset_stack(self, name: str, rows: int) -> RequestStack:
        preset = self.settings.presets[name]
        return parse_stack(preset.get("interventions"), preset.get("probes"), files=self.settings.files,
                           model=self.model, rows=rows)
