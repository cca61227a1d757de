"""The HTTP API: FastAPI routes in the OpenAI form, served by uvicorn, streamed with sse-starlette.

- ``GET /v1/models``: the served model and the preset stacks (``--stack``), each a model name.
- ``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI's bodies plus ``interventions``
  and ``probes`` (:mod:`experiments.serving.request_schema`). The response is OpenAI's plus
  ``surgery``: the names of the request's blocks and, per choice, its stop reason, where each
  intervention fired and each probe's summary (a study record's ``fired`` and ``probes``,
  :mod:`experiments.row_summaries`). Streamed (``stream: true``, server-sent events), each
  choice's last chunk carries its ``surgery`` entry.
- ``GET /surgery/stats``: waves run, rows finished and cancelled, requests waiting, busy slots, and
  the process id (which replica answered).

Errors come back in OpenAI's form (:mod:`experiments.serving.errors`): 400 with the field and
the fix, 404 for an unknown model, 429 at the queue limit. A client that disconnects, streaming
or not, has its rows stopped at the next token, which frees their slots.

Example::

    app = create_app(ServerSettings(slots=8))
    uvicorn.run(app, host="127.0.0.1", port=8000)
    # then: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from experiments.serving.errors import RequestError
from experiments.serving.request_schema import ChatBody, CompletionBody
from experiments.serving.scheduler import RowResult
from experiments.serving.server import Server, ServerSettings

__all__ = ["create_app"]


class _ClientGone(Exception):
    """The client disconnected before its response."""


def create_app(settings: ServerSettings, model=None) -> FastAPI:
    """The ASGI app; the model loads (and the decode thread starts) when the app starts.

    Args:
        settings: how the server is started.
        model: an already loaded model to serve (tests); None loads ``settings.model``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.server = await asyncio.to_thread(Server, settings, model)
        yield
        app.state.server.close()

    app = FastAPI(title="surgery serve", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(_, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        detail = RequestError(param, f"{param or 'the body'}: {first.get('msg')} (got {first.get('input')!r})")
        return JSONResponse(detail.body(), status_code=400)

    @app.get("/v1/models")
    async def models(request: Request):
        server: Server = request.app.state.server
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "surgery"}
                                           for name in server.model_ids]}

    @app.get("/surgery/stats")
    async def stats(request: Request):
        scheduler = request.app.state.server.scheduler
        return {**scheduler.stats, "waiting": len(scheduler.queue), "busy_slots": scheduler.busy_slots(),
                "slots": scheduler.slots, "pid": os.getpid()}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        return await _respond(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await _respond(request, body, chat=False)

    return app


async def _respond(request: Request, body, chat: bool):
    server: Server = request.app.state.server
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def send(event: tuple) -> None:  # from the decode thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = await asyncio.to_thread(server.chat_job if chat else server.completion_job, body, send)
    server.scheduler.submit(job)
    reply = _Reply(server.model_id if body.model == server.model_id else body.model, chat, job.stack, body)
    try:
        event = await _next(events, request, job)
        if event[0] == "error":
            raise event[1]
        if body.stream:
            return EventSourceResponse(_stream(events, job, reply), ping=15)
        results: list[RowResult] = []
        while True:
            event = await _next(events, request, job)
            if event[0] == "error":
                raise event[1]
            if event[0] == "row":
                results.append(event[1])
            if event[0] == "done":
                return reply.whole(sorted(results, key=lambda r: r.index))
    except _ClientGone:
        return JSONResponse({}, status_code=499)


async def _next(events: asyncio.Queue, request: Request, job) -> tuple:
    """The job's next event; a client that has gone cancels the job."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise _ClientGone from None


async def _stream(events: asyncio.Queue, job, reply: _Reply):
    """Server-sent events: a first chunk, text pieces, each choice's last chunk, then ``[DONE]``."""
    sent = [0] * job.rows
    usage = {"prompt": 0, "completion": 0}
    try:
        if reply.chat:
            for index in range(job.rows):
                yield reply.chunk(index, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event[0] == "text":
                _, index, piece = event
                sent[index] += len(piece)
                yield reply.chunk(index, {"content": piece})
            elif event[0] == "row":
                result: RowResult = event[1]
                rest = result.text[sent[result.index]:]
                usage["prompt"] += result.prompt_tokens if result.index % job.n == 0 else 0
                usage["completion"] += len(result.token_ids)
                yield reply.chunk(result.index, {"content": rest}, result.finish_reason,
                                  surgery={**reply.names(), "choice": result.surgery})
            elif event[0] == "error":
                yield {"data": json.dumps(event[1].body())}
                return
            elif event[0] == "done":
                if reply.body.include_usage:
                    yield reply.usage_chunk(usage["prompt"], usage["completion"])
                yield {"data": "[DONE]"}
                return
    finally:
        if job.done_rows < job.rows:  # the client went away mid-stream: free the slots
            job.cancelled.set()


class _Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, model_id: str, chat: bool, stack, body):
        self.model_id, self.chat, self.stack, self.body = model_id, chat, stack, body
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def names(self) -> dict:
        return {"interventions": self.stack.names, "probes": self.stack.probe_names}

    def whole(self, results: list[RowResult]) -> dict:
        if self.chat:
            choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                        "finish_reason": r.finish_reason, "logprobs": None} for r in results]
        else:
            choices = [{"index": r.index, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                       for r in results]
        n = self.body.n
        prompt_tokens = sum(r.prompt_tokens for r in results if r.index % n == 0)
        completion_tokens = sum(len(r.token_ids) for r in results)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "surgery": {**self.names(), "choices": [r.surgery for r in results]}}

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None, surgery: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": delta.get("content", ""), "finish_reason": finish_reason,
                      "logprobs": None}
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": [choice]}
        if surgery is not None:
            body["surgery"] = surgery
        return {"data": json.dumps(body)}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        return {"data": json.dumps(body)}
