"""Request bodies at the edge: a size limit (413) and JSON a client cannot use to hurt us (400).

Both are decided here, before a request reaches its replica, so no worker ever sees such a
body and a stream's headers never go out for it (issue 15, items 1 and 7):

* `BodyLimit` (ASGI middleware) refuses a body above `max_bytes` from its Content-Length at
  once, and a chunked one as soon as its running count passes the limit: a 50 MB body is
  answered without being read.
* `parse_json` refuses JSON nested deeper than MAX_JSON_DEPTH before `json.loads` recurses
  into it, lone surrogates ("\\ud800": not text, the worker's tokenizer cannot encode them),
  and NaN / Infinity (not JSON; `1e400` parses as inf), each 400 naming the param.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from dormant.errors import InvalidRequest, RequestTooLarge
from dormant.gateway.responses import error_response

# An OpenAI request is a handful of levels deep (messages[i].content[j].text); tool schemas
# nest more. 64 leaves room for those and none for a stack-exhausting body.
MAX_JSON_DEPTH = 64
# json.loads of a few MB blocks the event loop for tens of ms: parse big bodies off it
THREAD_PARSE_BYTES = 1 << 20

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# depth does not depend on the bracket's kind (a mismatch is json.loads's to refuse): {} -> []
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_DEEP_RUN = re.compile(rb"\[{%d}" % (MAX_JSON_DEPTH + 1))
# what could hold a lone surrogate (only as a \u escape: raw bytes would not be UTF-8) or a
# non-finite number (NaN, Infinity, or past 1.8e308); only then are the values walked
_SUSPECT = re.compile(rb"\\u[dD][89a-fA-F]|NaN|Infinity|[0-9][eE]\+?[0-9]{3}|[0-9]{300}")


class BodyLimit:
    """413 for a request body above `max_bytes`, checked before and while it is read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counted_receive, send)

    def _error(self) -> RequestTooLarge:
        return RequestTooLarge(f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                               "(setting `max_request_body_bytes`).")

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(self._error())
        # the unread body stays on the socket: this connection cannot carry another request
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body, or InvalidRequest (400) naming what is wrong."""
    if len(raw) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(_parse, raw)
    return _parse(raw)


def _parse(raw: bytes) -> Any:
    if _too_deep(raw):
        raise InvalidRequest(f"The request body is JSON nested more than {MAX_JSON_DEPTH} levels deep.")
    try:
        value = json.loads(raw)
    except RecursionError:  # a backstop: _too_deep already refuses what could get here
        raise InvalidRequest(f"The request body is JSON nested more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if _SUSPECT.search(raw):
        _check_values(value, "")
    return value


def _too_deep(raw: bytes) -> bool:
    """Whether brackets outside strings nest past MAX_JSON_DEPTH, with C-speed passes only:
    strip strings and all but brackets, then peel innermost pairs; a long run of openers is
    deep at once. At most MAX_JSON_DEPTH passes, each shorter than the last."""
    brackets = _STRING.sub(b"", raw).translate(_AS_SQUARE, _NOT_BRACKET)
    for _ in range(MAX_JSON_DEPTH + 1):
        if not brackets:
            return False
        if _DEEP_RUN.search(brackets):
            return True
        peeled = brackets.replace(b"[]", b"")
        if len(peeled) == len(brackets):
            return False  # unbalanced: json.loads says what is wrong with it
        brackets = peeled
    return True


def _check_values(value: Any, path: str) -> None:
    """Every string is text (UTF-8-encodable) and every number finite; recursion is bounded
    by MAX_JSON_DEPTH. The error names the param as protocol.parse_request does."""
    if isinstance(value, str):
        if not value.isascii() and not _is_text(value):
            raise InvalidRequest(f"Invalid value for '{path or 'body'}': the string holds a lone surrogate "
                                 "(not valid Unicode text).", param=path or None)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"Invalid value for '{path or 'body'}': {value!r} is not a finite number.",
                                 param=path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not key.isascii() and not _is_text(key):
                raise InvalidRequest("The request body has a key that holds a lone surrogate.", param=path or None)
            _check_values(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, f"{path}[{i}]")


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
