"""API-key check for every route but /health (a pure ASGI middleware: streams pass untouched).

The key is `Authorization: Bearer <key>` (OpenAI, Ollama clients) or `x-api-key: <key>`
(Anthropic's clients); a refusal has the shape of the API its path belongs to.
"""

from __future__ import annotations

import hmac

from dormant.errors import AuthenticationFailed
from dormant.gateway.apis.errors import error_response_for

OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self._allowed(headers.get(b"authorization", b""), headers.get(b"x-api-key", b"")):
            return await self.app(scope, receive, send)
        response = error_response_for(scope["path"], AuthenticationFailed(
            "Incorrect or missing API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`."))
        await response(scope, receive, send)

    def _allowed(self, header: bytes, x_api_key: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        token = token or x_api_key.strip()
        if not token:
            return False
        # Compare against every key (no early exit), each in constant time.
        return any([hmac.compare_digest(token, key) for key in self._keys])
