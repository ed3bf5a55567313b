"""The optional API key: required as `Authorization: Bearer KEY` (or `X-API-Key: KEY`) on every API endpoint;
`/health` and the static demo page (which asks for the key and sends it) stay open."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

from cheers.serve.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` (or `X-API-Key: KEY`) on everything but OPEN_PATHS."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            auth = headers.get(b"authorization", b"").strip()
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
            if not token or not hmac.compare_digest(token, self.key):
                err = ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if not token
                               else "invalid API key", code="invalid_api_key")
                resp = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
