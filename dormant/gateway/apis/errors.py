"""Each API's own error shape, chosen by path: what the gateway's exception handlers and the
auth middleware answer with, so an Anthropic or Ollama client can read our refusals.

    /v1/messages...   Anthropic: {"type": "error", "error": {"type", "message"}}
    /api/...          Ollama:    {"error": "message"}
    anything else     OpenAI:    {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from dormant.errors import DormantError

ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api/"

# Anthropic's error types by HTTP status (its "Errors" page); 529 is its "overloaded"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 504: "timeout_error"}


def anthropic_error_body(exc: DormantError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def error_body_for(path: str, exc: DormantError) -> dict[str, Any]:
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_body(exc)
    if path.startswith(OLLAMA_PREFIX):
        return {"error": exc.message}
    return exc.to_openai_body()


def error_response_for(path: str, exc: DormantError) -> JSONResponse:
    return JSONResponse(error_body_for(path, exc), status_code=exc.status_code, headers=exc.headers())
