"""OpenAI-shaped error responses and SSE error events."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from dormant.errors import DormantError
from dormant.protocol import sse_event


def error_response(exc: DormantError) -> JSONResponse:
    return JSONResponse(exc.to_openai_body(), status_code=exc.status_code, headers=exc.headers())


def error_event(exc: DormantError) -> bytes:
    """A stream's last word before `data: [DONE]`, as vLLM and OpenAI send mid-stream errors."""
    return sse_event(exc.to_openai_body())
