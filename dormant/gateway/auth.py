"""Bearer-key check for every route but /health (a pure ASGI middleware: streams pass untouched)."""

from __future__ import annotations

import hmac

from dormant.errors import AuthenticationFailed
from dormant.gateway.responses import error_response

OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        response = error_response(AuthenticationFailed(
            "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`."))
        await response(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        # Compare against every key (no early exit), each in constant time.
        return any([hmac.compare_digest(token, key) for key in self._keys])
