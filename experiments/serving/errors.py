"""Errors a request gets back, in the OpenAI form: a status and ``{"error": {message, type, param, code}}``.

Every refusal names the field (``param``, dotted: ``interventions[0].site``) and says what to do
instead, so a client sees at once what to fix; the server keeps serving.

Example:
    >>> error = RequestError("max_tokens", "asks for 9000 tokens; this server allows 4096: lower max_tokens")
    >>> error.status, error.body()["error"]["param"], error.body()["error"]["type"]
    (400, 'max_tokens', 'invalid_request_error')
"""

from __future__ import annotations

__all__ = ["RequestError", "queue_full", "unknown_model"]


class RequestError(Exception):
    """A request the server refuses, with what the client should change.

    Args:
        param: the request field at fault (dotted path), or None when no single field is.
        message: what is wrong and the fix.
        status: the HTTP status (400 bad input, 404 unknown model, 429 overloaded).
        code: OpenAI's machine-readable code, when one applies.
    """

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.message, self.status, self.code = param, message, status, code

    @property
    def kind(self) -> str:
        """OpenAI's error ``type`` for this status."""
        return "rate_limit_exceeded" if self.status == 429 else "invalid_request_error"

    def body(self) -> dict:
        """The JSON body of the response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unknown_model(name: str, served: list[str]) -> RequestError:
    """The 404 for a ``model`` this server does not serve."""
    return RequestError("model", f"this server serves {', '.join(map(repr, served))}, not {name!r}: set model to one "
                        "of them (GET /v1/models lists them)", status=404, code="model_not_found")


def queue_full(limit: int) -> RequestError:
    """The 429 once ``limit`` requests already wait."""
    return RequestError(None, f"the server is at its queue limit ({limit} requests waiting): retry later, or start it "
                        "with a larger --max-queue or more --replicas", status=429, code="queue_full")
