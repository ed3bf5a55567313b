"""Who may use the server. With an API key: `Authorization: Bearer KEY` (or `X-API-Key: KEY`) on every API
endpoint; `/health` and the static demo page (which asks for the key and sends it) stay open. Without a key (a
loopback server): requests must name the server by an IP address, `localhost` or a host given with
`--allowed-host`, and must not come from another web origin, so that a web page can neither drive the server nor
read its answers by DNS rebinding."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Collection
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from cheers.serve.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})


async def refuse(err: ApiError, scope: dict, receive: Any, send: Any) -> None:
    await JSONResponse(err.body(), status_code=err.status, headers=err.response_headers())(scope, receive, send)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` (or `X-API-Key: KEY`) on everything but OPEN_PATHS."""

    def __init__(self, app: Any, key: str):
        if not key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            auth = headers.get(b"authorization", b"").strip()
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"").strip()
            if not token or not hmac.compare_digest(token, self.key):
                err = ApiError(401, "missing API key: send 'Authorization: Bearer <key>'" if not token
                               else "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await refuse(err, scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(value: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class LocalOriginMiddleware:
    """Without an API key: 403 for a Host header that is not an IP address, localhost or an allowed host (DNS
    rebinding: a page's own domain resolving to this server), and for requests a browser sends from another
    origin (their Origin header names a different host:port than Host). `/health` stays open."""

    def __init__(self, app: Any, allowed_hosts: Collection[str] = ()):
        self.app = app
        self.allowed = {host_name(h) for h in allowed_hosts if h.strip()}

    def host_ok(self, name: str) -> bool:
        return is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in self.allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            host = headers.get(b"host", b"").decode("latin-1")
            if not self.host_ok(host_name(host)):
                err = ApiError(403, f"Host {host!r} is not allowed on a server without an API key; use its IP "
                                    "address or localhost, start it with --allowed-host NAME, or set an API key",
                               code="host_not_allowed")
                await refuse(err, scope, receive, send)
                return
            origin = headers.get(b"origin")
            if origin is not None:
                o = origin.decode("latin-1").strip()
                netloc = urlsplit(o).netloc.lower() if "://" in o else ""
                if netloc != host.strip().lower():
                    err = ApiError(403, f"cross-origin request from {o!r} refused: a server without an API key "
                                        "only answers its own pages and non-browser clients", code="cross_origin")
                    await refuse(err, scope, receive, send)
                    return
        await self.app(scope, receive, send)
