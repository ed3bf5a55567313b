"""The JSON error model: every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status naming the offending field."""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error"}


class ApiError(Exception):
    """An error answered to the client as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}

    def response_headers(self) -> dict[str, str]:
        """The headers to send, plus the error code for the access log (which removes it from the response)."""
        return {**self.headers, "X-Cheers-Error-Code": self.code or self.type}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 naming the offending field."""
    return ApiError(400, message, param=param, code=code)


def json_type(v: Any) -> str:
    """How an error message describes a JSON value ('the string ...', 'an array', ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__
