"""The bodies of ``/v1/chat/completions`` and ``/v1/completions``, as pydantic models.

The OpenAI fields a decoding toolkit can honour exactly are read (``messages`` or ``prompt``,
``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``stream``, ``stream_options``), plus this toolkit's two: ``interventions`` and ``probes``, lists
of block tables in a study condition's JSON form (:mod:`experiments.serving.request_blocks`).
Fields that would change the output in ways this server does not implement (``logprobs``,
penalties, ``logit_bias``, tools, ``response_format`` other than text, ``echo``, ``suffix``,
``best_of`` > 1) are refused by name rather than silently ignored; other unknown fields (``user``,
``metadata``...) are ignored, as OpenAI-compatible servers do.

``temperature = 0`` decodes greedily (the argmax); otherwise each row samples from its own
random stream (:mod:`surgery.decode.sampling`).

Example:
    >>> body = ChatBody.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
    ...                                 "temperature": 0, "stop": "\\n"})
    >>> body.stops(), body.greedy, body.user_messages()
    (('\\n',), True, [{'role': 'user', 'content': 'Hi'}])
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experiments.serving.errors import RequestError

__all__ = ["ChatBody", "CompletionBody"]

#: Fields refused unless left at their neutral value: field -> (neutral values, what to do).
_UNSUPPORTED = {
    "logprobs": ((None, False, 0), "log-probabilities are not returned: leave logprobs out"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned: leave top_logprobs out"),
    "presence_penalty": ((None, 0, 0.0), "penalties would change the tokens: leave presence_penalty at 0"),
    "frequency_penalty": ((None, 0, 0.0), "penalties would change the tokens: leave frequency_penalty at 0"),
    "logit_bias": ((None, {}), "use a token_mask intervention instead of logit_bias"),
    "tools": ((None, []), "tool calls are not supported: leave tools out"),
    "tool_choice": ((None, "none", "auto"), "tool calls are not supported: leave tool_choice out"),
    "functions": ((None, []), "function calls are not supported: leave functions out"),
    "echo": ((None, False), "echo is not supported: prepend the prompt yourself"),
    "suffix": ((None, ""), "suffix (insertion) is not supported: leave it out"),
    "best_of": ((None, 1), "best_of is not supported: ask for n completions and pick"),
}


class _Body(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    interventions: list[dict[str, Any]] | None = None
    probes: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        """Refuse the OpenAI fields this server would not honour (see the module docstring).

        Raises:
            RequestError: naming the field and what to do instead.
        """
        extra = self.model_extra or {}
        for name, (neutral, fix) in _UNSUPPORTED.items():
            if name in extra and not any(extra[name] == value for value in neutral):
                raise RequestError(name, f"{name}={extra[name]!r} is not supported by this server: {fix}")
        response_format = extra.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise RequestError("response_format", "only text output is supported: leave response_format out")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (``temperature = 0``)."""
        return self.temperature == 0

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a chunk carrying ``usage`` (``stream_options``)."""
        return bool((self.stream_options or {}).get("include_usage"))

    def stops(self) -> tuple[str, ...]:
        """The stop strings (OpenAI allows up to 4; empty strings are refused)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop", f"{len(stops)} stop strings given; at most 4 are allowed")
        if any(not s for s in stops):
            raise RequestError("stop", "stop strings must not be empty")
        return tuple(stops)


class ChatBody(_Body):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def budget(self) -> int | None:
        """``max_completion_tokens`` or, failing that, ``max_tokens`` (None: the server's limit)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def user_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and text (text parts joined).

        Raises:
            RequestError: a message without a role, or with content that is not text.
        """
        out = []
        for i, message in enumerate(self.messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str):
                raise RequestError(f"messages[{i}].role", "each message needs a role: system, user or assistant")
            if isinstance(content, list):
                texts = [part.get("text") for part in content if isinstance(part, dict)]
                if len(texts) != len(content) or any(part.get("type") != "text" for part in content):
                    raise RequestError(f"messages[{i}].content", "only text parts are supported: "
                                       '[{"type": "text", "text": "..."}]')
                content = "".join(texts)
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content", "content must be a string or a list of text parts")
            out.append({"role": role, "content": content})
        return out


class CompletionBody(_Body):
    """``POST /v1/completions`` (one prompt or several: each gets ``n`` choices)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)

    def budget(self) -> int | None:
        """``max_tokens`` (16 when not given, as OpenAI)."""
        return self.max_tokens

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts: strings, or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("prompt", "no prompt given: pass a string or a list of strings")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)
